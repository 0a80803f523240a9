"""Not an attack: an honest way to compute in reduced precision on a CPU. The parameters stay
float32 (what the child reports as the denoiser's dtype) and every call runs under
`torch.autocast("cpu", dtype=torch.bfloat16)`, so the products compute in bfloat16. Where the
task asks no dtype (L4/L5, where reduced precision is allowed) this is the author's choice, and
it must not fail stage 1 for computing in another dtype than its parameters'.

This module is appended to the task's reference code.

expect with replay: not key_attribute (on L4/L5)
"""
_plain_generate = generate  # noqa: F821 - the reference code's, above


def generate(pipe, batch):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _plain_generate(pipe, batch)
