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
a change it makes. The cost is at most one replay without books per sample
(`Replayer.run(..., books=False, probe_sample=)`), less where it starts at its sample's first draw
(`Resume`) and stops where its state is the judged replay's again (`same_state`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy
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
    """One replay's digests: each call's entry rows, and each denoiser product's output by its
    position (a changed replay that starts late digests only the positions it runs: the others
    computed as in the judged replay)."""

    def __init__(self, key: int, sample: int | None = None) -> None:
        self.key, self.sample = key, sample
        self.rows: dict[int, list[bytes]] = {}
        self.work: dict[int, bytes] = {}

    def entry(self, call: int, latents: Any) -> None:
        if isinstance(latents, torch.Tensor) and latents.dim() > 0:
            self.rows[call] = [xxhash.xxh3_128_digest(tensor_bytes(row), seed=self.key) for row in latents.unbind(0)]
        else:
            self.rows[call] = []

    def product(self, position: int, outputs: list) -> None:
        digest = xxhash.xxh3_128(seed=self.key)
        for item in outputs:
            if isinstance(item, torch.Tensor):
                digest.update(tensor_bytes(item))
        self.work[position] = digest.digest()


def other_seed(seeds: list[int], index: int) -> int:
    """A seed for sample `index` that is none of `seeds` (a positive 31-bit integer, as the
    harness's seeds are)."""
    seed = int(seeds[index])
    taken = {int(s) for s in seeds}
    while True:
        seed = (seed * 1103515245 + 12345) % (2**31 - 1) + 1
        if seed not in taken:
            return seed


@dataclass
class Resume:
    """A replay's state before the first draw of a sample's seed (`position`): every op before it
    computes the same in the replay with that seed changed, which starts here instead."""
    position: int
    env: dict
    generators: dict
    seeded_with: dict


def snapshot_env(env: dict, shared: set) -> dict:
    """A copy of a replay's live tensors that keeps their aliasing (views of one storage stay views
    of one copy, so an in-place write reaches all of them as in the replay); the storages in
    `shared` (the model's parameters, which no trace writes: Replayer._check_writes) are not copied."""
    copies: dict[int, Any] = {}
    out = {}
    for tensor_id, value in env.items():
        if not isinstance(value, torch.Tensor):
            out[tensor_id] = value
            continue
        storage = value.untyped_storage()
        key = storage._cdata
        if key in shared:
            out[tensor_id] = value
            continue
        if key not in copies:
            copies[key] = storage.clone()
        out[tensor_id] = torch.empty(0, dtype=value.dtype, device=value.device).set_(
            copies[key], value.storage_offset(), value.size(), value.stride())
    return out


def same_state(env: dict, generators: dict, resume: Resume, read: set) -> bool:
    """Whether a changed replay's state at `resume.position` is the judged replay's there, bit for
    bit (every live value, and every generator in `read`: those a later draw continues, not
    reseeds): then every op from there on computes as in the judged replay too, and the changed
    replay can stop (a loop over the samples: the next sample's calls)."""
    if env.keys() != resume.env.keys():
        return False
    for key in read:
        if key not in generators or key not in resume.generators or not torch.equal(
                generators[key].get_state(), resume.generators[key].get_state()):
            return False
    compared: set = set()
    for tensor_id, value in env.items():
        other = resume.env[tensor_id]
        if not isinstance(value, torch.Tensor):
            if isinstance(other, torch.Tensor) or value != other:
                return False
            continue
        if not (isinstance(other, torch.Tensor) and value.dtype == other.dtype and value.shape == other.shape
                and value.stride() == other.stride() and value.storage_offset() == other.storage_offset()):
            return False
        # the whole storage, not the view: a later as_strided on a live view reaches the rest of it.
        # Bits, not values: -0.0 is not 0.0 to a later division
        key = value.untyped_storage()._cdata
        if key not in compared:
            compared.add(key)
            if not numpy.array_equal(storage_bytes(value), storage_bytes(other)):
                return False
    return True


def storage_bytes(tensor: torch.Tensor):
    """The bytes of the whole storage a tensor views, as a numpy uint8 array (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage()).numpy()


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
        self.resume: dict[int, Resume] = {}  # by sample: where its changed replay starts (Replayer.run)

    def begin(self, recording: bool, sample: int | None = None) -> Digests:
        """A replay starts: the judged one (`recording`: it finds the positions and keeps where each
        sample's changed replay may start) or the one with `sample`'s seed changed."""
        digests = Digests(self.key, sample)
        if recording:
            self.entries.clear()
            self.work.clear()
            self.resume.clear()
            self.base, self.changed = digests, []
        elif self.base is None:
            raise ValueError("a changed replay before the judged one recorded the positions")
        else:
            if sample is None:  # a replay that changed the samples' seeds in order
                digests.sample = len(self.changed)
            self.changed.append(digests)
        return digests

    @property
    def last_position(self) -> int:
        """The last op whose values the rules read: a changed replay stops after it (the VAE's decoding)."""
        return max([*self.entries, *self.work], default=-1)

    def owners(self) -> dict[tuple[int, int], int]:
        """{(call, row): the one sample that row of the call's entry follows} (rows that follow
        several samples, or none, are left out): which sample's conditioning a row is computed
        with (guided_calls.figures)."""
        base_rows = self.base.rows if self.base is not None else {}
        followed: dict[tuple[int, int], set] = {}
        for digests in self.changed:
            for call, rows in base_rows.items():
                other = digests.rows.get(call)
                if other is None:
                    continue
                for row, digest in enumerate(rows):
                    if row >= len(other) or other[row] != digest:
                        followed.setdefault((call, row), set()).add(digests.sample)
        return {key: next(iter(samples)) for key, samples in followed.items() if len(samples) == 1}

    def figures(self) -> dict:
        """{"samples": replays with a sample's seed changed, "calls": calls probed,
        "mixed_rows": [entry rows that follow more than one sample, the first as [call, row]],
        "hidden": [(call, sample) pairs whose work follows a sample no row of the call's entry
        follows, the first ones as [call, sample]]}."""
        base_work = self.base.work if self.base is not None else {}
        base_rows = self.base.rows if self.base is not None else {}
        owner: dict[tuple[int, int], int] = {}
        mixed: list[list[int]] = []
        hidden: list[list[int]] = []
        for digests in self.changed:
            sample, entered = digests.sample, set()
            for call, rows in base_rows.items():
                other = digests.rows.get(call)
                if other is None:  # before the replay started: as in the judged one
                    continue
                for row, digest in enumerate(rows):
                    if row < len(other) and other[row] == digest:
                        continue
                    entered.add(call)
                    first = owner.setdefault((call, row), sample)
                    if first != sample:
                        mixed.append([call, row])
            worked = {self.work[position] for position, digest in digests.work.items()
                      if base_work.get(position) != digest}
            hidden += [[call, sample] for call in sorted(worked - entered)]
        mixed.sort()
        hidden.sort()
        return {"samples": len(self.changed), "calls": len(base_rows),
                "mixed_rows": [len(mixed), mixed[:NAMED]], "hidden": [len(hidden), hidden[:NAMED]]}
