"""Each guided denoiser call of an L4/L5 replay computed again by the zoo's denoiser, with the task's conditioning.

A guided call is credited from its entry alone: the entry holds each latent twice (or two
consecutive calls enter the same latents: trace.Replayer.paired), and the replay counts two rows
per image for it. What the two rows are computed with was not read. Red team round 26 (N0, P0)
kept each latent twice at the entry and ran both rows with the *conditional* labels or captions,
at timesteps `[t, t, t', t']` (or as two calls at t and t'): one pass served two conditional-only
steps, and passed hard L4 tasks faster than any honest setup (DiT U 1.565 against 1.525, SD 1.5
img2img 5.079 against 4.506). Reading the timestep or the conditioning where it is looked up is
not enough: those rows follow no seed, so a run can swap them after any reading point.

What is held here, on L4/L5 (on L1-L3 gold_calls.py runs the gold at the run's latents):

- **the two rows of each latent are at one timestep**: each call's timesteps are read off the
  input of the time embedding's first layer (`time_embedding.linear_1`, a `timestep_embedder`'s),
  the sinusoidal embedding of each row's timestep (`read_timesteps`); a guided call's two halves
  (a pair's two calls) must have bit-equal embeddings;
- **the call's output is a guided evaluation**: the zoo's denoiser computes each latent of the
  call again at the timestep read, once with the task's unconditional inputs and once with its
  sample's conditional ones (`TaskConditioning`: what the reference's own pipeline passes its
  denoiser; the sample a row is, from the sample probe). The run's two halves' difference (the
  guidance direction, conditional minus unconditional) must be the recomputed one's to within
  `DIRECTION_BOUND` (relative root mean square), in either order of the halves. The difference
  is read rather than each half, because the methods' errors (ToMe's merges, half precision) move
  both halves much alike, and on the tiny SD models the conditioning moves the output by 2-7 %
  where ToMe moves it by up to 30 %.

A call that reads a method's cache (DeepCache's cached steps, T-GATE's cached attention: a value a
`trace.CACHE_PRODUCERS` module made in an earlier call, read where that module computes nothing) is
computed with that value in place of the module's output (`cached_module`: DeepCache caches an up
block's block, T-GATE an attention's output projection), as the method computes it; a cache read of
any other module cannot be taken and fails. Without the cache in place, honest DeepCache moved the
guidance direction by up to 1.1 of itself on the tiny SD. See docs/integrity.md, session 43.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch

from pytest_diffbench import updates

#: the most the run's guidance direction (its conditional half's output minus its unconditional
#: half's) may differ from the recomputed one, relative root mean square over a call's rows. Honest
#: runs measured up to 0.49 (ToMe at ratio 0.7, max_downsample 2, on the tiny SD 2.1, where the
#: conditioning moves the output by 2-7 %), DeepCache's cached calls with their cache in place 0.36
#: (with ToMe), float32 forms without ToMe 1e-5 and less. A conditional half in place of the
#: unconditional one is 1.0 (the two halves equal), swapped timesteps 0.999, guidance dropped on
#: DeepCache's cached steps 0.87 (docs/integrity.md, session 43)
DIRECTION_BOUND = 0.75

#: the most each half of a guided call's output may differ from the recomputed half, relative root
#: mean square per latent, where the call merges no tokens or the task does not allow ToMe (the only
#: method whose output the recomputation does not reproduce): float32 forms agree to 1e-5, half
#: precision to ~1e-3 (session 43). A half computed at the next step's timestep differs by 3-6 % on
#: the tiny DiT, whose output follows the class far more than the timestep (red team round 27, F2)
HALF_BOUND = 0.01
#: the same where the call computed in float32 (honest forms 3e-7 at most) ...
HALF_BOUND_FULL = 1e-3
#: ... and in bfloat16 (autocast on a CPU: honest 0.0084 on the tiny DiT, 0.013 on the tiny SDXL,
#: eight times float16's rounding) or another dtype
HALF_BOUND_COARSE = 0.04


def half_bound(dtype: torch.dtype) -> float:
    """The bound on each half for a call whose output was computed in `dtype`; also the least share
    of the conditional half's output the direction is read against (`_differences`): in bfloat16
    the rounding of each half (1.3 % of the output on the tiny SDXL) outweighs the conditioning's
    effect late in the chain (1 %), and an honest run read 2.3 of its direction."""
    if dtype in (torch.float32, torch.float64):
        return HALF_BOUND_FULL
    return HALF_BOUND if dtype is torch.float16 else HALF_BOUND_COARSE

#: how far (absolute, on values in [-1, 1]) a row of the time embedding's input may sit from the
#: sinusoidal embedding of the timestep read off it, at the least: float32's sines of large angles
#: are off by 1e-4; in a lower precision four of its rounding steps (bfloat16 under autocast rounds
#: by up to 3.9e-3: an honest run failed at 2e-3)
EMBEDDING_TOLERANCE = 2e-3

#: the most values of the calls' entries, timesteps and outputs a replay keeps (updates.StepCheck's bound)
MAX_KEPT_ELEMENTS = updates.MAX_KEPT_ELEMENTS


def time_projections(pipe: Any) -> dict[str, Any]:
    """{name of the time embedding's first linear layer, as the replay books products (`unet.` or
    `transformer.` first): the `Timesteps` module whose output it takes} of `pipe`'s denoiser.
    SDXL's `add_embedding` (its size and crop conditioning) is not the timestep's."""
    from diffusers.models.embeddings import Timesteps

    found = {}
    for component in ("unet", "transformer"):
        denoiser = getattr(pipe, component, None)
        if denoiser is None:
            continue
        for name, module in denoiser.named_modules():
            if not isinstance(module, Timesteps) or name.rpartition(".")[2] != "time_proj":
                continue
            parent = name.rpartition(".")[0]
            embedder = f"{parent}.timestep_embedder" if parent else "time_embedding"
            found[f"{component}.{embedder}.linear_1"] = module
    return found


def read_timesteps(rows: torch.Tensor, projection: Any) -> torch.Tensor | None:
    """The timestep of each row of a time embedding's input (`projection`'s sinusoidal embedding,
    diffusers' get_timestep_embedding), read off its lowest frequency, whose angle stays under pi
    for every timestep a scheduler gives; None where a row is not the embedding of the timestep
    read (EMBEDDING_TOLERANCE) or the rows are not `projection`'s shape."""
    channels = int(projection.num_channels)
    if rows.dim() != 2 or rows.shape[1] != channels or channels < 4:
        return None
    half = channels // 2
    tolerance = max(EMBEDDING_TOLERANCE, 4 * torch.finfo(rows.dtype).eps) if rows.dtype.is_floating_point \
        else EMBEDDING_TOLERANCE
    rows = rows.detach().to(torch.float64)

    def read(index: int) -> tuple[torch.Tensor, float]:  # each row's angle at one frequency, and the frequency
        sine, cosine = ((rows[:, half + index], rows[:, index]) if projection.flip_sin_to_cos
                        else (rows[:, index], rows[:, half + index]))
        return (torch.atan2(sine, cosine),
                math.exp(-math.log(10000) * index / (half - projection.downscale_freq_shift)) * projection.scale)

    angle, frequency = read(half - 1)  # the lowest frequency: its angle stays under pi
    timesteps = angle / frequency
    # then each higher one, its turns counted from the reading so far: the rounding of a half-precision
    # embedding leaves the lowest frequency's reading off by up to a third of a step, the highest's by 1e-3
    for index in range(half - 2, -1, -1):
        angle, frequency = read(index)
        turns = torch.round((timesteps * frequency - angle) / (2 * math.pi))
        timesteps = (angle + 2 * math.pi * turns) / frequency
    with torch.no_grad():
        again = projection(timesteps.to(torch.float32)).to(torch.float64)
    if again.shape != rows.shape or not bool(torch.isfinite(rows).all()) \
            or float((again - rows).abs().max()) > tolerance:
        return None
    return timesteps.to(torch.float32)


class CallKeeper:
    """What the replay keeps of each denoiser call for `figures`: its entry's latents, the input
    of the first time-embedding product since the last call's output (a UNet embeds the timestep
    before its entry, a transformer after), and its output (the last product of its exit module,
    as the module's own function of that product's activation: updates.exit_output)."""

    def __init__(self, exit_modules: dict, projections: dict):
        self.exit_modules, self.projections = exit_modules, projections
        self.calls: list[dict] = []
        self.problem: str | None = None
        self._pending: tuple[str, torch.Tensor] | None = None
        self._elements = 0

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor | None:
        self._elements += tensor.numel()
        if self._elements > MAX_KEPT_ELEMENTS:
            self.problem = self.problem or f"the denoiser calls hold more than {MAX_KEPT_ELEMENTS} values to keep"
            return None
        return tensor.detach().clone()

    def enter(self, latents: torch.Tensor) -> None:
        self.calls.append({"latents": self._kept(latents), "time": None, "output": None, "unread": None,
                           "caches": {}, "merges": False})

    def merge_op(self, func: Any, args: tuple, kwargs: dict) -> None:
        """An op of the open call: whether it is tomesd's draw of a merge's destinations (the call
        merges tokens: its outputs are not the model's exactly, `figures`)."""
        if self.calls and not self.calls[-1]["merges"] and updates.merge_draw(func, args, kwargs) is not None:
            self.calls[-1]["merges"] = True

    def cache_read(self, producer: str, value: torch.Tensor) -> None:
        """A value the open call read from a method's cache (trace.CACHE_PRODUCERS), by the module
        that made it in an earlier call: the first read of each (the module's output itself)."""
        if self.calls and producer not in self.calls[-1]["caches"]:
            self.calls[-1]["caches"][producer] = self._kept(value)

    def timestep(self, module: str, operand: Any) -> None:
        if self._pending is None and isinstance(operand, torch.Tensor):
            kept = self._kept(operand)
            if kept is not None:
                self._pending = (module, kept)

    def leave(self, module: str, operand: Any) -> None:
        if not self.calls:
            return
        call = self.calls[-1]
        try:
            output, call["unread"] = updates.exit_output(self.exit_modules.get(module), module, operand)
        except Exception as exc:  # noqa: BLE001 - an operand the layer refuses: the call's output unread
            output, call["unread"] = None, f"{module}'s input could not be taken: {type(exc).__name__}: {exc}"[:300]
        call["output"] = self._kept(output) if output is not None else None
        if call["time"] is None:
            call["time"] = self._pending
        self._pending = None


class _Stop(Exception):
    """Ends the reference's pipeline call at its denoiser's first call (its inputs are taken)."""


def _rows(value: Any, index: int, count: int) -> Any:
    """`value` (a denoiser keyword argument) with each tensor of `count` rows cut to row `index`."""
    if isinstance(value, torch.Tensor):
        return value[index:index + 1].detach().clone() if value.dim() > 0 and value.shape[0] == count else value
    if isinstance(value, dict):
        return {key: _rows(item, index, count) for key, item in value.items()}
    return value


def _stack(values: list) -> Any:
    """The rows of `_rows` side by side again, in order."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values) if first.dim() > 0 and first.shape[0] == 1 else first
    if isinstance(first, dict):
        return {key: _stack([value[key] for value in values]) for key in first}
    return first


class TaskConditioning:
    """The task's conditioning of each sample, as the reference's own pipeline passes it to its
    denoiser (prompt embeddings and their mask, SDXL's pooled embeddings and time ids, PixArt's
    resolution inputs, DiT's class labels): one row unconditional, one conditional, taken from the
    reference's first denoiser call on that sample alone (its pipeline call ends there). Harness
    code on the task's data: a failure here is the harness's."""

    def __init__(self, module: Any, pipe: Any, batch: dict, cond_first: bool):
        from pytest_diffbench.gold_calls import denoiser_of

        self.pipe = pipe
        component, self.denoiser = denoiser_of(pipe)
        exits = [layer for name, layer in updates.exit_modules_of(pipe).items() if name.startswith(component + ".")]
        if len(exits) != 1:
            raise ValueError(f"the reference's denoiser has {len(exits)} exit modules, not one")
        self.exit = exits[0]
        self.samples: list[tuple[dict, dict]] = []
        count = len(batch["seeds"])
        for sample in range(count):
            one = {key: (value[sample:sample + 1] if isinstance(value, list) else value) for key, value in batch.items()}
            taken: dict = {}

            def take(_module, args, kwargs):
                taken["args"], taken["kwargs"] = args, dict(kwargs)
                raise _Stop

            hook = self.denoiser.register_forward_pre_hook(take, with_kwargs=True)
            try:
                with torch.no_grad():
                    module.generate(pipe, one)
            except _Stop:
                pass
            finally:
                hook.remove()
            if "kwargs" not in taken:
                raise ValueError(f"the reference made no denoiser call on sample {sample}")
            kwargs = taken["kwargs"]
            for key in ("timestep", "return_dict"):
                kwargs.pop(key, None)
            rows = int(taken["args"][0].shape[0]) if taken["args"] else int(kwargs.pop("hidden_states").shape[0])
            if rows != 2:
                raise ValueError(f"the reference's first denoiser call on sample {sample} holds {rows} rows, "
                                 f"not a guided pair")
            cond, uncond = (0, 1) if cond_first else (1, 0)
            self.samples.append((_rows(kwargs, uncond, rows), _rows(kwargs, cond, rows)))

    def outputs(self, latents: torch.Tensor, timesteps: torch.Tensor, conditional: list[int | None],
                forced: dict | None = None) -> torch.Tensor:
        """The zoo's denoiser's exit-module output (float64, one row per latent) on `latents` at
        `timesteps`, each row with sample `conditional[i]`'s conditional inputs, or the
        unconditional ones where it is None. `forced`: {a module's path in the denoiser: the value
        its output is replaced with} (a method's cache the run's call read: `cached_module`).
        Raises ValueError where a forced value is not of its module's output's shape."""
        kwargs = _stack([self.samples[0][0] if sample is None else self.samples[sample][1] for sample in conditional])
        taken = {}

        def keep(_module, _args, out):
            taken["out"] = out

        def force(value):
            def replace(_module, _args, out):
                first = out[0] if isinstance(out, tuple) else out
                if not isinstance(first, torch.Tensor) or tuple(first.shape) != tuple(value.shape):
                    raise ValueError(f"a cache of {tuple(value.shape)} for a module's output of "
                                     f"{tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}")
                value_as = value.to(first.dtype)
                return (value_as,) + tuple(out[1:]) if isinstance(out, tuple) else value_as
            return replace

        hooks = [self.exit.register_forward_hook(keep)]
        try:
            for path, value in (forced or {}).items():
                hooks.append(self.denoiser.get_submodule(path).register_forward_hook(force(value)))
            with torch.no_grad():
                self.denoiser(latents.to(torch.float32), timestep=timesteps.to(torch.float32), **kwargs, return_dict=False)
        finally:
            for hook in hooks:
                hook.remove()
        return taken["out"].detach().to(torch.float64).reshape(latents.shape[0], -1)


#: a cache's module by the producer of the value read (trace.Producers): T-GATE's an attention's
#: output projection; DeepCache's a block of an up block (its output's producer is a module inside it)
_ATTENTION_CACHE = re.compile(r"^(?:unet|transformer)\.(.*\.attn[12]\.to_out\.0)$")
_BLOCK_CACHE = re.compile(r"^unet\.(up_blocks\.\d+\.(?:resnets|attentions|upsamplers)\.\d+)(?:\.|$)")


def cached_module(producer: str) -> str | None:
    """The path in the denoiser of the module whose output a cache read from `producer` stands
    for (DeepCache caches a block's output, T-GATE an attention's), or None for neither."""
    for pattern in (_ATTENTION_CACHE, _BLOCK_CACHE):
        found = pattern.match(producer)
        if found is not None:
            return found.group(1)
    return None


def guided_units(entries: list, paired: set) -> list[tuple[int, ...]]:
    """The guided calls of a replay as units: (call,) for an entry holding each latent twice,
    (call, next call) for a pair of calls on the same latents (Replayer.paired: consecutive)."""
    units, index = [], 0
    while index < len(entries):
        if entries[index][1]:
            units.append((index,))
        elif index in paired and index + 1 in paired:
            units.append((index, index + 1))
            index += 1
        index += 1
    return units


def figures(keeper: CallKeeper, entries: list, paired: set, owners: dict, conditioning: TaskConditioning,
            merging_allowed: bool = True) -> dict:
    """{"guided": guided units, "checked": those computed again, "cached": those of them that read
    a method's cache (computed with it in place: the module docstring), "timesteps_split": [units whose two rows of a latent were
    embedded at different timesteps, the first call], "unread": [units whose timesteps or output
    the replay could not read, or whose conditional rows follow no one sample, the first call],
    "worst_direction": [the largest relative difference of a latent's guidance direction from the
    recomputed one, its unit's first call], "worst_half": [the same of each half's output, its
    unit's first call, the bound for the dtype it computed in (`half_bound`): the largest share of
    its bound, on the units held exactly: those whose calls merge no tokens, or all where
    `merging_allowed` is False (the task does not allow ToMe), and their count "exact"], "cpu_s",
    "problem": the keeper's}.
    Each latent on its own: a figure pooled over a call's rows let a run forge some of its samples'
    rows under the bound (red team round 27, F1)."""
    started = time.process_time()
    found = {"guided": 0, "checked": 0, "cached": 0, "timesteps_split": [0, None], "unread": [0, None],
             "worst_direction": [0.0, None], "exact": 0, "worst_half": [0.0, None, HALF_BOUND],
             "problem": keeper.problem}

    def count(key: str, call: int, why: str | None = None) -> None:
        found[key][0] += 1
        if found[key][1] is None:
            found[key][1] = call
            if why is not None:
                found[key + "_why"] = why

    if keeper.problem is not None or len(keeper.calls) != len(entries):
        found["problem"] = keeper.problem or f"{len(keeper.calls)} calls kept of {len(entries)} entries"
        return found

    def by_row(output: torch.Tensor, rows: int) -> torch.Tensor | None:
        # one row per latent (a linear exit layer's product runs on its rows' tokens flattened)
        return output.reshape(rows, -1) if rows > 0 and output.numel() % rows == 0 else None

    def spread(times: torch.Tensor, rows: int) -> torch.Tensor:
        # one embedding for the call's rows is each row's (a timestep given once, broadcast after)
        return times.expand(rows, -1) if times.dim() == 2 and times.shape[0] == 1 else times

    for unit in guided_units(entries, paired):
        found["guided"] += 1
        first = unit[0]
        kept = [keeper.calls[call] for call in unit]
        missing = [what for call in kept for what in ("latents", "output", "time") if call[what] is None]
        if missing:
            count("unread", first, f"no {missing[0]}" + (f" ({kept[0]['unread']})" if kept[0]["unread"] else ""))
            continue
        if len(unit) == 1:
            rows = kept[0]["latents"].shape[0] // 2
            times, outputs = spread(kept[0]["time"][1], 2 * rows), by_row(kept[0]["output"], 2 * rows)
            halves_time = (times[:rows], times[rows:])
            latents = kept[0]["latents"][:rows]
            halves_out = (outputs[:rows], outputs[rows:]) if outputs is not None else None
            owner_rows = [[(first, j), (first, j + rows)] for j in range(rows)]
        else:
            rows = kept[0]["latents"].shape[0]
            times = [spread(call["time"][1], rows) for call in kept]
            halves_time = tuple(times)
            latents = kept[0]["latents"]
            halves_out = tuple(by_row(call["output"], rows) for call in kept)
            if any(out is None for out in halves_out):
                halves_out = None
            owner_rows = [[(first, j), (unit[1], j)] for j in range(rows)]
        if any(t.shape[0] != rows for t in halves_time) or halves_out is None:
            count("unread", first, "timesteps or outputs not of the entry's rows")
            continue
        if not torch.equal(halves_time[0], halves_time[1]):
            count("timesteps_split", first)
            continue
        projection = keeper.projections.get(kept[0]["time"][0])
        timesteps = read_timesteps(halves_time[0], projection) if projection is not None else None
        samples = [next((owners[key] for key in keys if key in owners), None) for keys in owner_rows]
        if timesteps is None or any(sample is None for sample in samples):
            count("unread", first, "rows of no one sample" if timesteps is not None
                  else "the time embedding's input is no timestep's embedding")
            continue
        # the caches each call read, fed to the modules the run did not compute (its cached steps)
        forced = [{cached_module(producer): value for producer, value in call["caches"].items()} for call in kept]
        if any(None in caches or any(value is None for value in caches.values()) for caches in forced):
            count("unread", first, "a cache read that is no DeepCache block's nor attention's output")
            continue
        if any(caches for caches in forced):
            found["cached"] += 1
        a, b = (half.detach().to(torch.float64).reshape(rows, -1) for half in halves_out)
        bound = max(half_bound(call["output"].dtype) for call in kept)
        try:
            # each order of the halves (diffusers' DiT puts the conditional one first): the unconditional
            # inputs on one, the rows' samples' conditional ones on the other; the order that fits better
            direction, half_error = min((_differences(conditioning, kept, latents, timesteps, samples, forced, a, b,
                                                      unconditional, bound) for unconditional in (0, 1)),
                                        key=lambda pair: _order(pair[0]))
        except ValueError as exc:
            count("unread", first, str(exc)[:200])
            continue
        found["checked"] += 1
        worst(found, "worst_direction", direction, first)
        if not merging_allowed or not any(call["merges"] for call in kept):
            found["exact"] += 1
            if found["worst_half"][1] is None or not half_error / bound <= found["worst_half"][0] / found["worst_half"][2]:
                found["worst_half"] = [float(f"{half_error:.4g}") if math.isfinite(half_error) else str(half_error),
                                       first, bound]
    found["cpu_s"] = round(time.process_time() - started, 3)
    return found


def _order(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def worst(found: dict, key: str, value: float, call: int) -> None:
    """Keep the larger of `found[key]` ([value, call]) and `value` (a NaN counts as the largest)."""
    if found[key][1] is None or not value <= found[key][0]:
        found[key] = [float(f"{value:.4g}") if math.isfinite(value) else str(value), call]


def _relative(found: torch.Tensor, wanted: torch.Tensor, least: torch.Tensor | None = None) -> float:
    """The largest over rows (latents) of the rows' relative root mean square difference (relative
    to `least`'s rows where those are the larger)."""
    size = wanted.pow(2).sum(dim=1)
    if least is not None:
        size = torch.maximum(size, least.pow(2).sum(dim=1))
    return float(((found - wanted).pow(2).sum(dim=1) / size.clamp_min(1e-300)).sqrt().max())


def _differences(conditioning: TaskConditioning, kept: list, latents: torch.Tensor, timesteps: torch.Tensor,
                 samples: list, forced: list, a: torch.Tensor, b: torch.Tensor, unconditional: int,
                 bound: float) -> tuple[float, float]:
    """(the largest over the latents of the relative root mean square difference of the run's
    guidance direction (its conditional half's output minus its unconditional half's: `a` and `b`
    are the halves, `unconditional` which one) from the zoo's denoiser's on the same rows; the same
    of each half's output itself), computed in the run's layout with the caches each call read (a
    guided call computes its halves together, a pair one per call)."""
    rows = latents.shape[0]
    roles = [[None] * rows, samples] if unconditional == 0 else [samples, [None] * rows]
    if len(kept) == 1:  # one call, its halves side by side
        out = conditioning.outputs(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                   roles[0] + roles[1], forced[0])
        halves = (out[:rows], out[rows:])
    else:
        halves = tuple(conditioning.outputs(latents, timesteps, role, caches) for role, caches in zip(roles, forced))
    wanted = halves[1 - unconditional] - halves[unconditional]
    found = (b - a) if unconditional == 0 else (a - b)
    if found.shape != wanted.shape:
        raise ValueError(f"outputs of {tuple(found.shape)}, the model's {tuple(wanted.shape)}")
    # the direction against at least `bound` of the conditional output: the rounding's share (half_bound)
    return (_relative(found, wanted, bound * halves[1 - unconditional]),
            max(_relative(a, halves[0]), _relative(b, halves[1])))
