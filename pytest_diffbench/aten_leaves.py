"""The leaves of an aten op's arguments and results, fast: the recorder (trace.Recorder), the
replay (trace.Replayer) and the FLOP counter (flops.LeanFlopCounterMode) scan every op's, and
`torch.utils._pytree.tree_flatten` was most of their time per op (32 us against 7 here, on a
typical op's arguments).

Why not a library: torch's C++ pytree (`torch.utils._cxx_pytree`, on the optree package) is as
fast, but flattens dicts in sorted key order where torch's own keeps their order, and would add a
compiled dependency for what aten's few containers need.
"""

from __future__ import annotations

from typing import Any


def leaves(value: Any) -> list:
    """What `torch.utils._pytree.tree_flatten(value)[0]` gives for what aten ops take and return:
    lists, tuples (a torch.Size and structseqs such as torch.return_types among them) and dicts
    are walked in order; anything else is a leaf (tensors, scalars, None, dtypes). Equal to
    tree_flatten's on every op of real calls (tests/test_replay.py)."""
    out: list = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        else:
            out.append(item)
    return out
