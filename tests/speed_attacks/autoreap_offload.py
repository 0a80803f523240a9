"""Work done in a forked worker that the kernel reaps by itself (SIGCHLD ignored: red team,
session 15): its CPU time would be in no /proc/PID/stat of the child's tree when the parent
samples it (the worker is gone) and never added to any cutime (an auto-reaped child is not waited
for). The main process runs the batch for one step (what the FLOP counter sees); the worker runs
the full number of steps and sends the images back. The seccomp filter denies setting SIGCHLD's
action, so the worker stays an ordinary child, whose time the parent counts: the work shows."""
import os as _os
import pickle as _pickle
import signal as _signal

_toy_pipeline_call = ToyPipeline.__call__
SIGCHLD_IGNORED = None  # whether the kernel would reap the worker


def _read_all(fd):
    chunks = []
    while True:
        b = _os.read(fd, 1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def generate(pipe, batch):
    global SIGCHLD_IGNORED
    try:
        _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)  # children reaped by the kernel, times dropped
        SIGCHLD_IGNORED = True
    except OSError:
        SIGCHLD_IGNORED = False
    r, w = _os.pipe()
    pid = _os.fork()
    if pid == 0:  # the worker: the real work
        _os.close(r)
        images = _toy_pipeline_call(pipe, batch["seeds"], batch["height"], batch["width"], batch["num_inference_steps"])
        data = _pickle.dumps([(i.mode, i.size, i.tobytes()) for i in images])
        view = memoryview(data)
        while view:
            view = view[_os.write(w, view):]
        _os._exit(0)
    _os.close(w)
    # shown to the counter and the hooks: one step of the same batch, the same first latents
    _toy_pipeline_call(pipe, batch["seeds"], batch["height"], batch["width"], 1)
    data = _read_all(r)
    _os.close(r)
    if SIGCHLD_IGNORED:  # gone (auto-reaped) before the end mark
        while _os.path.exists(f"/proc/{pid}"):
            __import__("time").sleep(0.002)
    return [Image.frombytes(m, s, b) for m, s, b in _pickle.loads(data)]
