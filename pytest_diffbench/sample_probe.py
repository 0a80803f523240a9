"""Which samples each denoiser call of a replayed trace follows (red team rounds 22 and 23).

A guided denoiser call's entry (trace.ENTRY_MODULES: `conv_in`, the patch embedding) holds each
of its images' latents twice, and the replay credits those rows as the calls each image got
(evaluate._replayed_calls_per_image). Rounds 22 and 23 entered one image's latents twice and
brought a second image's latents into the call after the entry: on a weight computed from the
entry's (booked to no module), written in place into the first skip connection or the residual
stream, or returned by a hook as a module's output. Both images then got the conditional branch
alone (guidance dropped) on calls whose entry looked guided. Checking products of chosen modules
for two equal halves (trace.PRE_CONDITIONING_MODULES) only moved the swap past those modules.

Which image a row is cannot be read off its values; it can be read off the seeds. The harness
replays the trace once more per sample, with that sample's seed changed, and whatever changes
follows that sample. Two rules, on every denoiser call (a call runs from its entry to the next):

- each row of its entry follows at most one sample (an honest row is one image's latents, so a
  row that follows two is two images' latents mixed to pass as one);
- its work (the products booked to a denoiser module) follows only samples that some row of its
  entry follows. The work before the first entry follows none.

Digests are exact: a replay in one process on the same op sequence and shapes is bit-for-bit
repeatable, and any tolerance is room to hide a scaled-down row under. They are xxhash's XXH3
(128 bits) under a key drawn for each replay job, which no candidate sees: fast enough to read
every product (about 50 GB/s against blake2b's 1), and keyed, so a trace cannot be built to cancel
a change it makes. The cost is one replay without books per sample (`Replayer.run(..., books=False)`).
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
import xxhash

#: how many calls of each kind the figures name (the first of each is what a reader needs)
NAMED = 3


def tensor_bytes(tensor: torch.Tensor):
    """A tensor's bytes in its logical order, as a buffer (dtype and shape are the same in every
    replay: `Replayer.run` holds the changed replays to the judged one's shapes). Call it where
    the replay's modes are off (trace.harness_arithmetic): it may run torch ops of its own."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    try:
        return flat.numpy()
    except TypeError:  # a dtype numpy has not (bfloat16, float8): its bytes
        return flat.view(torch.uint8).numpy()


class Digests:
    """One replay's digests: each call's entry rows, and each call's denoiser work."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.rows: dict[int, list[bytes]] = {}
        self._work: dict[int, Any] = {}

    def entry(self, call: int, latents: Any) -> None:
        if isinstance(latents, torch.Tensor) and latents.dim() > 0:
            self.rows[call] = [xxhash.xxh3_128_digest(tensor_bytes(row), seed=self.key) for row in latents.unbind(0)]
        else:
            self.rows[call] = []

    def work(self, call: int, outputs: list) -> None:
        digest = self._work.get(call)
        if digest is None:
            digest = self._work[call] = xxhash.xxh3_128(seed=self.key)
        for item in outputs:
            if isinstance(item, torch.Tensor):
                digest.update(tensor_bytes(item))

    def works(self) -> dict[int, bytes]:
        return {call: digest.digest() for call, digest in self._work.items()}


def other_seed(seeds: list[int], index: int) -> int:
    """A seed for sample `index` that is none of `seeds` (a positive 31-bit integer, as the
    harness's seeds are)."""
    seed = int(seeds[index])
    taken = {int(s) for s in seeds}
    while True:
        seed = (seed * 1103515245 + 12345) % (2**31 - 1) + 1
        if seed not in taken:
            return seed


class SampleProbe:
    """The positions the judged replay found (each call's entry and the latents it multiplies,
    each product booked to a denoiser module and its call) and the digests of every replay at
    them: `base` from the judged replay, `changed[s]` from the replay with sample s's seed
    changed. trace.Replayer.run fills it; `figures` judges."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, int]] = {}  # op position -> (call, the latents' tensor id)
        self.work: dict[int, int] = {}  # op position -> call (-1 before the first entry)
        self.base: Digests | None = None
        self.changed: list[Digests] = []
        self.key = secrets.randbits(64)  # the digests' key, the same in every replay of this probe

    def begin(self, recording: bool) -> Digests:
        """A replay starts: the judged one (`recording`: it finds the positions) or a changed one."""
        digests = Digests(self.key)
        if recording:
            self.entries.clear()
            self.work.clear()
            self.base, self.changed = digests, []
        elif self.base is None:
            raise ValueError("a changed replay before the judged one recorded the positions")
        else:
            self.changed.append(digests)
        return digests

    def figures(self) -> dict:
        """{"samples": replays with a sample's seed changed, "calls": calls probed,
        "mixed_rows": [entry rows that follow more than one sample, the first as [call, row]],
        "hidden": [(call, sample) pairs whose work follows a sample no row of the call's entry
        follows, the first ones as [call, sample]]}."""
        base_works = self.base.works() if self.base is not None else {}
        base_rows = self.base.rows if self.base is not None else {}
        owner: dict[tuple[int, int], int] = {}
        mixed: list[list[int]] = []
        hidden: list[list[int]] = []
        for sample, digests in enumerate(self.changed):
            entered = set()
            for call, rows in base_rows.items():
                other = digests.rows.get(call, [])
                for row, digest in enumerate(rows):
                    if row < len(other) and other[row] == digest:
                        continue
                    entered.add(call)
                    first = owner.setdefault((call, row), sample)
                    if first != sample:
                        mixed.append([call, row])
            works = digests.works()
            hidden += [[call, sample] for call, digest in base_works.items()
                       if call not in entered and works.get(call) != digest]
        mixed.sort()
        hidden.sort()
        return {"samples": len(self.changed), "calls": len(base_rows),
                "mixed_rows": [len(mixed), mixed[:NAMED]], "hidden": [len(hidden), hidden[:NAMED]]}
