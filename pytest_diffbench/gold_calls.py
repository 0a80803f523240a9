"""Each denoiser call of a replay against the gold's, evaluated at the same latents.

updates.StepCheck reads the steps *between* denoiser calls off the replay, and the two ends of each
pipeline call's chain. What a call computes from its latents was read by booking alone: its
timestep, the text embeddings after their lookup, SDXL's time ids, PixArt's resolution inputs, the
guidance halves and the exit layer's output all were the run's to choose. A run could move 0.4 of
the guidance into the exit layer's input (the layer is linear, so the conditional half's hidden
state mixed toward the unconditional one's is the same as its output mixed: the trust review of
session 37), and a decoy entry product could name latents the denoiser never saw.

On L1-L3 the gold is the specification. The harness runs the gold in the replay process on the
zoo's weights with a pre-hook
on the denoiser's entry module that replaces each call's latents by the run's call's (the same
samples, the same step), and holds the run's output of each call (its exit module's function of
its input: updates.exit_output) to the gold's, relative root mean square. Everything a call takes
besides its latents is then the gold's, and the run's output must be what the gold's call makes.

ToMe (tomesd) merges each transformer block's tokens to destinations drawn from a generator forked
off torch's global one, and its tiles (sx, sy) and randomness are settings the task leaves free.
The replay keeps each call's merges (updates.StepCheck.merge_op: the draw, and the matching the run
made); the gold's blocks then merge with the run's call's draws, in order (MergesOfTheRun), their
tiles read off the draws' shapes, and with the run's matching where it is optimal on the gold's
similarities (near-ties an honest form breaks otherwise than the gold's rounding). The ratio,
max_downsample and the parts merged stay the gold's, the task's (a run that merges other parts
fails the gold's work per module too: measured in session 39). A gold call whose rows come from
run calls of different draws, whose blocks take more or fewer merges than the run's call made, or
whose run matching is off, is a call the run's merges do not give (`merges_unmatched`). Only
tomesd's own code is followed (stage 1 requires it): a merge written otherwise (`topk`, `argmax`)
keeps no matching and fails here.

Plain functions over a StepCheck's kept calls: stages.step_mismatches judges the figures.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from typing import Any

import torch

from pytest_diffbench import updates

#: the most choices per tile of a ToMe draw the gold takes (tomesd's default 2 x 2 tiles: 4)
MAX_TILE_CHOICES = 64

#: the entry module of each denoiser component, whose input is a call's latents (trace.ENTRY_MODULES)
ENTRY_PATHS = {"unet": "conv_in", "transformer": "pos_embed.proj"}


def load_gold(code: str, dtype: str = "float32") -> Any:
    """The gold's module (its `load_pipeline` and `generate`) and the pipeline it loads on the CPU:
    (module, pipe). The gold is the harness's own code (task data), never a candidate's."""
    module = types.ModuleType("diffbench_gold")
    exec(compile(code, "<gold>", "exec"), module.__dict__)  # noqa: S102 - the task's gold, harness data
    pipe = module.load_pipeline("cpu", getattr(torch, dtype))
    return module, pipe


def denoiser_of(pipe: Any) -> tuple[str, Any]:
    for component in ENTRY_PATHS:
        denoiser = getattr(pipe, component, None)
        if denoiser is not None:
            return component, denoiser
    raise ValueError(f"{type(pipe).__name__} has no unet and no transformer")


class GoldCalls:
    """The gold's pipeline run over the task's batch with each denoiser call's latents replaced by
    the run's (`StepCheck.kept_by_sample`) and its output compared with the run's."""

    def __init__(self, module: Any, pipe: Any):
        self.module, self.pipe = module, pipe
        component, self.denoiser = denoiser_of(pipe)
        self.entry = self.denoiser.get_submodule(ENTRY_PATHS[component])
        exits = sorted((name, layer) for name, layer in updates.exit_modules_of(pipe).items()
                       if name.startswith(component + "."))
        if len(exits) != 1:
            raise ValueError(f"{type(pipe).__name__}'s {component} has exit modules {[n for n, _ in exits]}, not one")
        self.exit_name, self.exit = exits[0]

    def figures(self, check: "updates.StepCheck", batch: dict, canonical: bool = False) -> dict:
        """{"compared": calls of the gold whose latents were the run's and whose outputs were
        compared, "unmatched": [count, first gold call] (calls with no run call of the same samples
        and step, or of other rows), "worst_relative": [the run's output's difference from the
        gold's over the gold's, root mean square, the gold call], "scale_offset" and
        "guidance_offset" (the run's difference from the gold's outputs pooled over the calls along
        the gold's outputs and along its guidance direction, the difference of its halves, as shares
        of them; None where there is none), "cpu_s": the gold's run, "problem"}. `canonical`: the
        gold computes under canonical.CanonicalPrecision, as the replay of a half-precision task did;
        "merges_unmatched" (where the gold patches tomesd, else None): [count, first gold call] of the
        calls whose merges the run's draws could not give (the module docstring); "merges_differed":
        the merges whose matching was the run's within MATCHING_TOLERANCE where the gold's own differs
        (a near-tie broken otherwise: a figure, not judged)."""
        runs = check.kept_by_sample()
        per_call = check.per_call
        state = {"calls": 0, "samples": 0, "first": 0, "rows": None, "compared": 0,
                 "unmatched": [0, None], "worst": (0.0, None), "merges_unmatched": [0, None]}
        merging = MergesOfTheRun(self.denoiser)
        # the run's difference from the gold's outputs along the gold's own output (a scale) and, on
        # guided calls, along its guidance direction (the halves' difference), pooled over the calls:
        # rounding scatters and averages out there, a changed guidance or conditioning does not
        pooled = {"scale": 0.0, "size": 0.0, "guidance": 0.0, "direction": 0.0}

        def unmatched(n: int, key: str = "unmatched") -> None:
            state[key][0] += 1
            if state[key][1] is None:
                state[key][1] = n

        def replace(module, args):
            n = state["calls"]
            state["calls"] += 1
            latents = args[0]
            count, twice = updates._latent_count(latents)  # the gold's own: equal halves where it guides
            if n % per_call == 0:
                state["first"] = state["samples"]
                state["samples"] += count
            rows = _run_rows(runs, state["first"], count, twice, n % per_call)
            state["rows"] = None
            merging.begin(None)
            if rows is None or tuple(rows[0].shape) != tuple(latents.shape):
                unmatched(n)
                return None
            state["rows"] = (n, rows[1], twice, int(latents.shape[0]))
            merging.begin(rows[2])
            return (rows[0].to(latents.dtype),) + tuple(args[1:])

        def compare(module, args, out):
            if state["rows"] is None:
                return
            n, theirs, twice, rows = state["rows"]
            state["rows"] = None
            if not merging.end():
                unmatched(n, "merges_unmatched")
                return
            # one row per latent the call took (a transformer's tokens, a UNet's maps, flattened)
            mine = out.detach().double().reshape(rows, -1) if out.numel() % rows == 0 else None
            if mine is None or theirs.numel() != mine.numel():
                unmatched(n)
                return
            theirs = theirs.double().reshape(mine.shape)
            difference = theirs - mine
            relative = math.sqrt(float(difference.pow(2).sum()) / max(float(mine.pow(2).sum()), 1e-300))
            if not relative <= state["worst"][0]:  # NaN too
                state["worst"] = (relative, n)
            pooled["scale"] += float((difference * mine).sum())
            pooled["size"] += float(mine.pow(2).sum())
            if twice and mine.shape[0] % 2 == 0:
                half = mine.shape[0] // 2
                direction = mine[half:] - mine[:half]
                pooled["guidance"] += float(((difference[half:] - difference[:half]) * direction).sum())
                pooled["direction"] += float(direction.pow(2).sum())
            state["compared"] += 1

        from pytest_diffbench.canonical import CanonicalPrecision

        hooks = [self.entry.register_forward_pre_hook(replace), self.exit.register_forward_hook(compare)]
        started = time.process_time()
        try:
            with torch.no_grad(), CanonicalPrecision() if canonical else contextlib.nullcontext(), merging:
                self.module.generate(self.pipe, batch)
        finally:
            for hook in hooks:
                hook.remove()
        problem = None
        if state["calls"] == 0:
            problem = "the gold made no denoiser call"
        worst = state["worst"]
        return {"compared": state["compared"], "unmatched": state["unmatched"],
                "worst_relative": [float(f"{worst[0]:.4g}") if math.isfinite(worst[0]) else str(worst[0]), worst[1]],
                "scale_offset": _share(pooled["scale"], pooled["size"]),
                "guidance_offset": _share(pooled["guidance"], pooled["direction"]),
                "merges_unmatched": state["merges_unmatched"] if merging.active else None,
                "merges_differed": merging.differed if merging.active else None,
                "cpu_s": round(time.process_time() - started, 3), "problem": problem}


def _share(along: float, size: float) -> float | str | None:
    """along / size to four digits (None where size is 0; a NaN as its string, which no bound takes)."""
    if not size > 0:
        return None
    share = along / size
    return float(f"{share:.4g}") if math.isfinite(share) else str(share)


def _run_rows(runs: dict, first: int, count: int, twice: bool, position: int) -> tuple | None:
    """(the run's latents for the gold call of samples first..first+count at step `position`, in
    the gold call's row layout (the unconditional halves, then the conditional ones, where it
    guides), the run's outputs of those rows, and for each row the ToMe merges of the run's call
    that held it with the row's index there), or None where the run has no such call: each
    sample from the last run pipeline call that held it (earlier ones were a warm-up or a decoy:
    the images are the last calls'), its rows there picked out."""
    picked_latents, picked_outputs, merges_of_rows = [], [], []
    halves = (0, 1) if twice else (0,)
    for half in halves:
        for sample in range(first, first + count):
            found = runs.get((sample, position))
            if found is None:
                return None
            latents, output, row_count, run_twice, row, merges = found
            if run_twice != twice or output is None:
                return None
            index = row + half * row_count
            merges_of_rows.append((merges, index))
            picked_latents.append(latents[index:index + 1])
            outputs = output.reshape(latents.shape[0], -1) if output.numel() % latents.shape[0] == 0 else None
            if outputs is None:
                return None
            picked_outputs.append(outputs[index:index + 1])
    return torch.cat(picked_latents), torch.cat(picked_outputs), merges_of_rows


#: how far below the best similarity (cosine, in [-1, 1]) the run's choice of a destination, or the
#: least similar source it merged below the most similar it left, may sit on the gold's scores: the
#: rounding of honest forms of the same call (batched, attention sliced), where tomesd's greedy
#: matching is discontinuous at near-ties (the trust review of session 39, F1). Half precision: its
#: rounding (2^-11 relative per op) over the scores' few ops
MATCHING_TOLERANCE = {"full": 1e-4, "half": 1e-2}


class MergesOfTheRun:
    """tomesd's merges in the gold's denoiser made as the run's call made them (the module
    docstring): a context in which tomesd.merge.bipartite_soft_matching_random2d takes, for each
    block that merges, the next merge of the run's call (updates.StepCheck.merge_op) for the gold
    call's rows: its draw (tiles read off its shape), and where the run's destinations and merge
    order sit within MATCHING_TOLERANCE of optimal on the gold's own similarities, those (so that a
    near-tie the run broke otherwise than the gold's rounding would is no difference); else the
    call counts as one the run's merges do not give. Inert where the denoiser is not patched by
    tomesd."""

    def __init__(self, denoiser: Any):
        info = getattr(denoiser, "_tome_info", None)
        self.active = isinstance(info, dict) and isinstance(info.get("args"), dict)
        self.rows: list | None = None
        self.taken, self.failed = 0, False
        self.differed = 0  # merges whose matching, the run's within MATCHING_TOLERANCE, the gold's rounding breaks otherwise

    def begin(self, merges_of_rows: list | None) -> None:
        """The gold call's rows' merges ((the run call's merges, the row's index there) per row, as
        _run_rows gives them), or None where the gold call has no run call."""
        self.rows, self.taken, self.failed = merges_of_rows, 0, merges_of_rows is None

    def end(self) -> bool:
        """Whether the call's merges were all the run's: every draw taken, none missing."""
        matched = not self.active or (not self.failed and self.rows is not None
                                      and all(self.taken == len(merges) for merges, _ in self.rows))
        self.rows = None
        return matched

    def __enter__(self):
        if not self.active:
            return self
        import tomesd.merge

        self._module = tomesd.merge
        self._original = tomesd.merge.bipartite_soft_matching_random2d
        tomesd.merge.bipartite_soft_matching_random2d = self._merge
        return self

    def __exit__(self, *exc):
        if self.active:
            self._module.bipartite_soft_matching_random2d = self._original
        return False

    def _next(self) -> tuple | None:
        """The run's merge `taken` for the gold call's rows: (draw, choices, destinations, order),
        the last two of the gold's rows (None where the run kept none), or None where the rows'
        calls have no such merge or drew differently."""
        if not self.rows:
            return None
        picked = []
        for merges, row in self.rows:
            if self.taken >= len(merges):
                return None
            picked.append((merges[self.taken], row))
        (index, choices, _, _), _ = picked[0]
        if any(m[1] != choices or tuple(m[0].shape) != tuple(index.shape) or not torch.equal(m[0], index)
               for m, _ in picked[1:]):
            return None
        try:
            return index, choices, *self._rows_of(picked)
        except Exception:  # noqa: BLE001 - the run's merges, of shapes its code chose: none for these rows
            return None

    @staticmethod
    def _rows_of(picked: list) -> list:
        rows_of = []
        for slot in (2, 3):
            parts = [m[slot] for m, _ in picked]
            if any(part is None or part.dim() < 1 or row >= part.shape[0] for part, (_, row) in zip(parts, picked)):
                rows_of.append(None)
            else:
                rows_of.append(torch.cat([part[row:row + 1] for part, (_, row) in zip(parts, picked)]))
        return rows_of

    def _merge(self, metric, w, h, sx, sy, r, no_rand=False, generator=None):
        if r <= 0:  # tomesd returns before it draws
            return self._original(metric, w, h, sx, sy, r, no_rand=no_rand, generator=generator)
        merge = self._next()
        tiles = _tiles(h, w, merge[:2], (sx, sy)) if merge is not None else None
        generator = generator if generator is not None else torch.Generator()  # tomesd's compute_merge sets one
        if tiles is None:
            self.failed = True
            return self._original(metric, w, h, sx, sy, r, no_rand=no_rand, generator=generator)
        self.taken += 1
        index, choices, destinations, order = merge
        gold_tiles, (sx, sy) = (sx, sy), tiles
        tolerance = MATCHING_TOLERANCE["half" if metric.dtype in (torch.float16, torch.bfloat16) else "full"]
        sources = metric.shape[1] - (h // sy) * (w // sx)
        matching = _RunsMatching(destinations, order, min(sources, r), tolerance)

        def randint(high, size, *args, **kwargs):
            if int(high) != choices or tuple(size) != tuple(index.shape):  # not the draw _tiles made it: no match
                self.failed = True
                return torch.zeros(tuple(size), dtype=torch.int64)
            return index.clone()

        randint_before = torch.randint
        torch.randint = randint
        try:
            with matching:
                merged = self._original(metric, w, h, sx, sy, r, no_rand=False, generator=generator)
        except Exception:  # noqa: BLE001 - tiles the run's draw gave that tomesd refuses: its merges, not the gold's failure
            merged, matching.followed_by["max"] = None, False
        finally:
            torch.randint = randint_before
        if not matching.followed:
            self.failed = True
        elif matching.differed:
            self.differed += 1
        if merged is None:  # the gold's own merge in its place, for a call that fails as the run's anyway
            merged = self._original(metric, w, h, *gold_tiles, r, no_rand=no_rand, generator=generator)
        return merged


class _RunsMatching(torch.overrides.TorchFunctionMode):
    """Inside one tomesd merge: its first floating-point `max` along a dimension (each source's most
    similar destination) and its first floating-point `argsort` (the sources by that similarity,
    most similar first) answered with the run's, where the run's sit within `tolerance` of optimal
    on the gold's scores; `followed`: both were the run's."""

    def __init__(self, destinations, order, merged: int, tolerance: float):
        super().__init__()
        self.destinations, self.order, self.merged, self.tolerance = destinations, order, merged, tolerance
        self.seen = {"max": False, "argsort": False}
        self.followed_by = {"max": False, "argsort": False}
        self.differed = False  # the run's matching, taken, was not the one the gold's rounding makes

    @property
    def followed(self) -> bool:
        return all(self.followed_by.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            return self._answer(func, args, out)
        except Exception:  # noqa: BLE001 - the run's figures, made by its code: no match, never the gold's failure
            return out

    def _answer(self, func, args, out):
        source = args[0] if args else None
        if not isinstance(source, torch.Tensor) or not source.dtype.is_floating_point:
            return out
        if func in (torch.Tensor.max, torch.max) and not self.seen["max"] and isinstance(out, tuple):
            self.seen["max"] = True
            theirs = self.destinations
            best, _ = out
            if theirs is None or tuple(theirs.shape) != tuple(best.shape):
                return out
            if theirs.numel() == 0:  # no sources (1 x 1 tiles): nothing to choose
                self.followed_by["max"] = True
                return out
            if int(theirs.min()) < 0 or int(theirs.max()) >= source.shape[-1]:
                return out
            chosen = source.gather(-1, theirs.unsqueeze(-1)).squeeze(-1)
            if bool((chosen >= best - self.tolerance).all()):
                self.followed_by["max"] = True
                self.differed = self.differed or not torch.equal(theirs, out[1])
                return torch.return_types.max((chosen, theirs.clone()))
            return out
        if func in (torch.Tensor.argsort, torch.argsort) and not self.seen["argsort"]:
            self.seen["argsort"] = True
            theirs = self.order
            if theirs is None or tuple(theirs.shape) != tuple(out.shape) or source.dim() != 2 \
                    or not torch.equal(theirs.sort(dim=-1).values,
                                       torch.arange(source.shape[-1]).expand_as(theirs)):
                return out
            similarity = source.gather(-1, theirs)  # the gold's similarities in the run's order
            merged, kept = similarity[:, :self.merged], similarity[:, self.merged:]
            if merged.shape[1] == 0 or kept.shape[1] == 0 or bool(
                    (merged.min(dim=-1).values >= kept.max(dim=-1).values - self.tolerance).all()):
                self.followed_by["argsort"] = True
                self.differed = self.differed or not torch.equal(theirs, out)
                return theirs.clone()
            return out
        return out


def _tiles(h: int, w: int, drawn: tuple, prefer: tuple[int, int]) -> tuple[int, int] | None:
    """The tiles (sx, sy) of a draw of (h // sy, w // sx, 1) destinations among sy * sx choices
    (the gold's own first; then by sy, the first that fits: on a grid where two fit, e.g. 5 x 5 of
    12 choices, the gold may place its destinations otherwise than the run), or None where none
    gives that shape, its values are no choices, or the tiles are larger than MAX_TILE_CHOICES."""
    index, choices = drawn
    if not 0 < choices <= min(h * w, MAX_TILE_CHOICES) or index.numel() == 0 or int(index.min()) < 0 \
            or int(index.max()) >= choices:
        return None
    options = [prefer] + [(choices // sy, sy) for sy in range(1, choices + 1) if choices % sy == 0]
    for sx, sy in options:
        if sx > 0 and sy > 0 and sx * sy == choices and (h // sy, w // sx, 1) == tuple(index.shape):
            return sx, sy
    return None
