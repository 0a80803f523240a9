"""Buys speed inside the cross-check's margin: the images are made by the reference's own pipeline
in a forked process (work no in-process counter sees), returned through a few torch ops; the
candidate's own process runs the reference at half the steps and throws the result away, so that
its FLOP count claims U > 1 (~2 on the denoiser) while the CPU time of the run (both processes) stays
within the cross-check's honest range (3.5x). Without the replay this passes with L = 0; with it,
the trace makes the child's images from constants, which replayed on the verdict's seeds are the
wrong images.

This module is appended to the task's reference code.

expect without replay: L ~ 0, U > 1.2, no cross-check violation
expect with replay: relative_quality
"""
import os as _os
import pickle as _pickle

_reference_generate = generate  # noqa: F821 - the reference code's, above


def generate(pipe, batch):
    import numpy
    import PIL.Image
    import torch

    read, write = _os.pipe()
    pid = _os.fork()
    if pid == 0:  # the hidden worker: the reference's images, sent back as arrays
        _os.close(read)
        try:
            arrays = [numpy.asarray(image) for image in _reference_generate(pipe, batch)]
            with _os.fdopen(write, "wb") as fh:
                fh.write(_pickle.dumps(arrays))
        finally:
            _os._exit(0)
    _os.close(write)
    with _os.fdopen(read, "rb") as fh:
        arrays = _pickle.loads(fh.read())
    _os.waitpid(pid, 0)
    _reference_generate(pipe, dict(batch, num_inference_steps=max(1, batch["num_inference_steps"] // 2)))  # counted
    images = []
    for array in arrays:  # through torch ops, so that the images come from a tensor of the call
        pixels = torch.from_numpy(array.copy()).float() / 255
        images.append(PIL.Image.fromarray((pixels * 255).round().clamp(0, 255).to(torch.uint8).numpy()))
    return images
