"""The step between denoiser calls, read by behaviour from the harness's replay (replay.py).

On L1-L3 the task fixes the scheduler, its step count, the guidance scale and (img2img) the
strength. What a candidate's process reports of them can be rewritten there (red team round 20
passed tasks with guidance 5.0 for 7.5, `guidance_rescale`, Karras sigmas and a third solver
order, with the report unchanged), so the harness reads them off what the replay computed: for
each denoiser call it has the latents that entered the denoiser (`trace.ENTRY_MODULES`) and the
denoiser's output (`EXIT_MODULES`), and the next call's latents are what the run's step made of
them. The check runs the task's own scheduler (diffusers', configured as the pipeline loads it
from the zoo, `from_config` as the gold does) on those figures, teacher-forced: each step takes
the run's latents and the run's denoiser output combined with the task's guidance scale, and its
result must be the next call's latents. A scheduler, its configuration, the guidance scale, a
rescale or any change of the latents between calls leaves a residual; the guidance scale also
gets its own reading (the offset along the direction the guidance scale moves the step).

Stochastic steps (ancestral samplers) add noise the harness does not redraw: their noise scale is
measured from the scheduler itself (two draws of known noise), the guidance offset is read
against that noise, and the residual must be noise of that scale, not more and not none.

Both ends of each pipeline call's chain are read too: its first call's latents must be the seeds'
draws (times init_noise_sigma; img2img, the init image's latents noised to the strength's first
timestep), and its last step's result the latents the VAE's decoder takes (`DECODER_ENTRY`).

Plain functions of tensors and a scheduler: stages.step_mismatches judges the figures.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

#: half precision's relative rounding (float16: 11 bits of mantissa)
HALF_UNIT = 2.0 ** -11

#: the module each denoiser call ends with, whose output is the call's prediction (before guidance)
EXIT_MODULES = frozenset({"unet.conv_out", "transformer.proj_out", "transformer.proj_out_2"})

#: the most draws (and encoder outputs, decoder inputs) of the latents' rank the check keeps between
#: two denoiser calls: honest pipelines make one per sample; a run past it fails (a problem)
MAX_DRAWS = 256

#: the most values (entry latents and outputs) the check keeps of a replay's denoiser calls for
#: gold_calls.py (a tiny run keeps thousands): a run past it fails (a problem)
MAX_KEPT_ELEMENTS = 1 << 24
#: the most ToMe merges (merge_op) one denoiser call keeps: tomesd draws once per transformer block
MAX_MERGE_DRAWS = 256
_SCATTERS = (torch.ops.aten.scatter_, torch.ops.aten.scatter)

#: the module the VAE's decoder begins with, whose input is the latents a pipeline call decodes
#: (divided by the VAE's scaling factor): the last step's result (every VAE of the zoo has it)
DECODER_ENTRY = "vae.post_quant_conv"

#: the module the VAE's encoder ends with, whose output is the moments of an init image's latents
#: (img2img: their mean and log variance, sampled with a draw of the seeds)
ENCODER_EXIT = "vae.quant_conv"


def standard_normal(func: Any, args: Any, kwargs: dict) -> bool:
    """Whether a draw op makes standard normal values: `torch.randn` (what diffusers' randn_tensor
    calls, for the initial latents and an ancestral step's noise alike) or `normal_` at mean 0 and
    std 1. A draw at another scale is not the noise a scheduler adds: a run that drew an ancestral
    step's noise with `normal_(0, 0.5)` read as noise of scale 1 when every draw counted."""
    packet = getattr(func, "_overloadpacket", None)
    if packet is torch.ops.aten.randn:
        return True
    if packet is torch.ops.aten.normal_:
        mean = args[1] if len(args) > 1 else kwargs.get("mean", 0.0)
        std = args[2] if len(args) > 2 else kwargs.get("std", 1.0)
        return mean == 0.0 and std == 1.0
    return False


def expected_scheduler(config: Any, name: str, steps: int, strength: float | None) -> tuple[Any, list]:
    """A fresh diffusers scheduler of class `name` made `from_config(config)` (as every gold does
    with the pipeline's own), its timesteps set for `steps` and, for img2img, cut to `strength` as
    diffusers' img2img pipelines do (`get_timesteps`): (scheduler, the timesteps of one pipeline call)."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_config"):
        raise ValueError(f"no diffusers scheduler named {name!r}")
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(int(steps))
    timesteps = list(scheduler.timesteps)
    if strength is not None:
        init = min(int(steps * float(strength)), int(steps))
        start = max(int(steps) - init, 0)
        timesteps = timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
    return scheduler, timesteps


def output_as_latents(output: torch.Tensor, latents_shape: tuple, patch: int | None) -> torch.Tensor | None:
    """The denoiser's output in the latents' layout (rows, channels, height, width), its first
    `channels` channels (a learned-sigma model's other half is not the prediction): a UNet's
    `conv_out` already is; a transformer's `proj_out` is unpatchified as diffusers' DiT and PixArt
    models do. None where the output has not that many elements."""
    rows, channels, height, width = latents_shape
    if output.dim() == 4 and output.shape[0] == rows and tuple(output.shape[2:]) == (height, width) \
            and output.shape[1] >= channels:
        return output[:, :channels]
    if not patch or height % patch or width % patch:
        return None
    h, w = height // patch, width // patch
    per_row = output.numel() // max(1, rows)
    if output.numel() % max(1, rows) or per_row % (h * w * patch * patch):
        return None
    out_channels = per_row // (h * w * patch * patch)
    if out_channels < channels:
        return None
    grid = output.reshape(rows, h, w, patch, patch, out_channels)
    image = torch.einsum("nhwpqc->nchpwq", grid).reshape(rows, out_channels, height, width)
    return image[:, :channels]


def exit_output(layer: Any, name: str, operand: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
    """(the output of the exit module `layer` (the zoo's `conv_out` or `proj_out`, float32), named
    `name`, as its own function of `operand`, the activation a product booked to it multiplied:
    its weight and bias cast to the operand's dtype, its stride and padding; None and why where
    `operand` is no input it takes). Why not the product's value: a product is booked to the
    module by its weight, and one that carries more than the module's function (addmm's additive
    `self`, patches laid out apart for a strided convolution) carried a term the run solved for
    each call, so that the task's scheduler, teacher-forced, landed on the run's own latents (the
    trust review of session 37). Recomputed, that term is not the denoiser's output."""
    import torch.nn.functional as F

    if layer is None:
        return None, f"the replay's exit module {name} is not the model's"
    if not isinstance(operand, torch.Tensor) or not operand.dtype.is_floating_point or operand.numel() == 0:
        return None, f"the last product of {name} multiplied no activation"
    weight = layer.weight.detach().to(operand.dtype)
    bias = layer.bias.detach().to(operand.dtype) if layer.bias is not None else None
    if isinstance(layer, torch.nn.Conv2d):
        if operand.dim() != 4 or operand.shape[1] != layer.in_channels:
            return None, (f"the last product of {name} multiplied {tuple(operand.shape)}, not the "
                          f"{layer.in_channels} channels it takes")
        return F.conv2d(operand, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups), None
    if isinstance(layer, torch.nn.Linear):
        if operand.dim() < 2 or operand.shape[-1] != layer.in_features:
            return None, (f"the last product of {name} multiplied {tuple(operand.shape)}, not the "
                          f"{layer.in_features} features it takes")
        return F.linear(operand, weight, bias), None
    return None, f"the replay's exit module {name} is a {type(layer).__name__}"


def merge_draw(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int] | None:
    """(the index, the choices per tile) where an op is tomesd's draw of a merge's destinations
    (merge.py's `idx_buffer_view.scatter_(dim=2, index=rand_idx, ...)`: an int64 (h/sy, w/sx, sy*sx)
    buffer given one (h/sy, w/sx, 1) index), else None."""
    if func._overloadpacket not in _SCATTERS:
        return None
    buffer = args[0] if args else kwargs.get("self")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    index = args[2] if len(args) > 2 else kwargs.get("index")
    if not (isinstance(buffer, torch.Tensor) and isinstance(index, torch.Tensor) and dim in (2, -1)
            and buffer.dtype == index.dtype == torch.int64 and buffer.dim() == index.dim() == 3
            and tuple(index.shape) == (*buffer.shape[:2], 1)):
        return None
    return index, int(buffer.shape[2])


def exit_modules_of(pipe: Any) -> dict:
    """The exit modules (EXIT_MODULES) of `pipe`'s denoiser (its `unet` or `transformer`), by name."""
    found = {}
    for name in EXIT_MODULES:
        component, _, path = name.partition(".")
        try:
            found[name] = getattr(pipe, component).get_submodule(path)
        except AttributeError:
            continue
    return found


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def _step(scheduler: Any, eps: torch.Tensor, timestep, sample: torch.Tensor, seed: int) -> tuple[torch.Tensor, Any]:
    """One step of a copy of `scheduler` (its state left as it was): (the step's result, the copy)."""
    stepped = copy.deepcopy(scheduler)
    # a generator only where the step takes one, as diffusers' pipelines pass it (prepare_extra_step_kwargs)
    extra = {"generator": torch.Generator().manual_seed(seed)} if _takes_generator(stepped) else {}
    out = stepped.step(eps, timestep, sample, return_dict=False, **extra)[0]
    return out.double(), stepped


def _takes_generator(scheduler: Any) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


def _noise(shape: tuple, seed: int) -> torch.Tensor:
    # what diffusers' randn_tensor draws for a float64 CPU output from a generator seeded `seed`
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class StepCheck:
    """The steps of a replay's denoiser calls checked as they come (two calls held at a time):
    `enter(latents)` at each call's entry, `leave(output)` at its exit (the last one seen in the
    call counts), `figures()` at the end. `make_scheduler`: a fresh scheduler of the task's and its
    timesteps, per pipeline call; `cond_first`: the conditional half of a guided call is the first
    (DiT's class labels), else the unconditional (a negative prompt's); `patch`: a transformer's
    patch size (its output is unpatchified); `steps_model_input`: the pipeline hands the scheduler
    the denoiser's (scaled) input as the sample, as diffusers' DiT pipeline does, rather than the
    latents before scale_model_input."""

    def __init__(self, make_scheduler: Callable[[], tuple[Any, list]], guidance_scale: float,
                 cond_first: bool, patch: int | None, steps_model_input: bool = False,
                 scaling_factor: float | None = None, noise_times_sigma: bool = True,
                 image_to_image: bool = False, own_moments: torch.Tensor | None = None, vae: Any = None,
                 exit_modules: dict | None = None, keep_calls: bool = False):
        self.make_scheduler, self.guidance_scale = make_scheduler, float(guidance_scale)
        # the zoo's exit modules by name (EXIT_MODULES): a call's output is the module's own function
        # of the activation its last product multiplied (exit_output), not that product's value
        self.exit_modules = exit_modules
        self._exit_unread: str | None = None  # why the held call's exit output could not be read
        # each call's entry latents and output, and each pipeline call's samples (gold_calls.py)
        self.keep_calls, self._kept_calls, self._kept_elements = keep_calls, [], 0
        self._pipeline_samples: dict[int, tuple[int, int]] = {}
        self.cond_first, self.patch, self.steps_model_input = cond_first, patch, steps_model_input
        # the ends of each pipeline call's chain (read where the VAE's scaling factor is given, as the
        # replay gives it): the latents decoded
        # after its last call are that call's step, and its first call's latents are the seeds' noise
        # (times the scheduler's init_noise_sigma, which DiT's pipeline leaves out) or, img2img, the
        # init image's latents noised to the strength's first timestep
        self.scaling_factor = float(scaling_factor) if scaling_factor else None
        self.noise_times_sigma, self.image_to_image = noise_times_sigma, image_to_image
        self.vae = vae  # the zoo's VAE (float32): the run's images against the task's last steps
        # standard normal draws made since the last pipeline call's last call began (or the run did)
        # (draw, the sample whose seed its generator was seeded with, or None)
        self._start_draws: list[tuple[torch.Tensor, int | None]] = []
        self._encoded: list[torch.Tensor] = []  # the VAE encoder's outputs since then (img2img)
        self._decoded: list[torch.Tensor] = []  # what the decoder took after a pipeline call's last call
        # the harness's own encoding of the init images, one per sample (replay.init_moments): an
        # img2img start is read against it where the replay shows no encoding in the call
        self.own_moments = own_moments.double() if own_moments is not None else None
        self._samples = 0  # the samples the pipeline calls so far started
        self.starts = {"checked": 0, "unread": 0, "own_encoding": 0, "other_seeds": 0}
        self.first_other_seed: int | None = None
        self.worst_own_start: tuple[float, int | None] = (0.0, None)
        self.worst_encoding: tuple[float, int | None] = (0.0, None)  # read encodings against the harness's
        self.worst_start: tuple[float, int | None] = (0.0, None)
        self.worst_start_units: tuple[float, int | None] = (0.0, None)
        self.ends_checked = self.ends_unread = 0
        self.worst_end_units: tuple[float, int | None] = (0.0, None)  # the last steps' residuals (rounding units)
        self.final_latents: list[torch.Tensor] = []  # each pipeline call's, as the task's last step makes them
        self.final_pipelines: list[int] = []  # the pipeline call of each (its samples: _pipeline_samples)
        self.calls = 0
        self.checked = self.guided = 0
        self.problem: str | None = None
        self.worst_residual: tuple[float, int | None] = (0.0, None)
        self.worst_offset: tuple[float, int | None] = (0.0, None)
        self.worst_units: tuple[float, int | None] = (0.0, None)
        self.units_squared: list[float] = []
        self.least_apart: tuple[float, int] | None = None
        # the guidance offset pooled over guided steps, weighted by how far the scale moves each, and
        # its variance from each step's unexplained part (rounding, or a stochastic step's noise)
        self.pooled = {"along": 0.0, "weight": 0.0, "variance": 0.0}
        self.stochastic = 0
        self.ratios: list[float] = []
        self.noise = {"residual": 0.0, "expected": 0.0}  # stochastic steps: squared residuals, and their noise's
        self.scheduler, self.timesteps = make_scheduler()
        self.per_call = len(self.timesteps)
        self._held: list | None = None  # [latents, output, draws] of the call before
        self.noise_scales: list[float] = []  # stochastic steps with the run's noise read: its scale over the step's
        self.noise_fit = {"read": 0.0, "asked": 0.0}

    def _finite(self, tensor: torch.Tensor, what: str) -> bool:
        """Whether `tensor` holds finite values only; else the steps are unreadable (a problem): a NaN
        compares false with every bound, so one element of it would switch every figure off (the
        trust review of session 37)."""
        if isinstance(tensor, torch.Tensor) and tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            self.problem = self.problem or f"call {max(0, self.calls - 1)}: {what} hold values that are not finite"
            return False
        return True

    def enter(self, latents: torch.Tensor) -> None:
        self._finite(latents, "the latents entering the denoiser")
        if self._held is not None and self.problem is None:
            self._close_held(latents)
        if self.problem is None and self.scaling_factor is not None and self.per_call \
                and self.calls % self.per_call == 0:
            try:
                self._check_start(self.calls, latents)
            except Exception as exc:  # noqa: BLE001 - figures the scheduler refuses: unreadable
                self.problem = f"call {self.calls}: its latents could not be read as the task's start: {exc}"[:300]
        self._held = [latents.detach().clone(), None, [], []]
        self._exit_unread = None
        self._start_draws, self._encoded, self._decoded = [], [], []
        self.calls += 1

    def _close_held(self, next_latents: torch.Tensor | None) -> None:
        """The held call's step: into the next call's latents, or (a pipeline call's last call) into
        the latents the decoder took after it; `next_latents` None where no call follows."""
        held, self._held = self._held, None
        position = (self.calls - 1) % max(1, self.per_call)
        last = position == self.per_call - 1
        if self.keep_calls:
            self._keep(position, held)
        if not last and next_latents is None:
            return  # the run ended inside a pipeline call: figures() reports the count
        try:
            if last:
                self._check_end(self.calls - 1, position, held)
                self.scheduler, self.timesteps = self.make_scheduler()
            else:
                self._check(self.calls - 1, position, held[0], held[1], next_latents, held[2])
        except Exception as exc:  # noqa: BLE001 - a diffusers step refusing the figures: unreadable
            self.problem = f"call {self.calls - 1}: the task's scheduler could not take its step: {exc}"[:300]

    def _keep(self, position: int, held: list) -> None:
        size = held[0].numel() + (held[1].numel() if held[1] is not None else 0)
        if self._kept_elements + size > MAX_KEPT_ELEMENTS:
            self.problem = self.problem or f"the denoiser calls hold more than {MAX_KEPT_ELEMENTS} values to keep"
            return
        self._kept_elements += size
        self._kept_calls.append(((self.calls - 1) // max(1, self.per_call), position, held[0], held[1], held[3]))

    def merge_op(self, func: Any, args: tuple, kwargs: dict, outputs: list) -> None:
        """tomesd's merge as the replay computes it, kept for the held call (`keep_calls`; an op after
        its entry, until the next call's: one between calls counts as the held call's) for
        gold_calls.MergesOfTheRun. A draw of the merge's destinations (merge.py's
        `idx_buffer_view.scatter_(dim=2, index=rand_idx, ...)`: an int64 (h/sy, w/sx, sy*sx) buffer
        given one (h/sy, w/sx, 1) index) starts a merge, kept as [index, sy*sx, None, None]; the
        first floating-point `max` along a dimension after it gives its third item (each source
        token's most similar destination: `scores.max(dim=-1)`'s indices), the first floating-point
        descending sort its fourth (the order the sources merge in: `node_max.argsort(...)`). Any such
        ops count; ones that are not tomesd's give the gold merges the run's outputs do not match."""
        if self._held is None or not self.keep_calls:
            return
        merges, packet = self._held[3], func._overloadpacket
        if packet in _SCATTERS:
            drawn = merge_draw(func, args, kwargs)
            if drawn is not None:
                self._keep_merge(merges, drawn[0], [drawn[0].detach().clone(), drawn[1], None, None])
            return
        if not merges or packet not in (torch.ops.aten.max, torch.ops.aten.sort) or len(outputs) != 2:
            return
        source = args[0] if args else kwargs.get("self")
        indices = outputs[1]
        if not (isinstance(source, torch.Tensor) and source.dtype.is_floating_point
                and isinstance(indices, torch.Tensor) and indices.dtype == torch.int64):
            return
        merge = merges[-1]
        if packet is torch.ops.aten.max and merge[2] is None:
            self._keep_merge(merges, indices, indices.detach().clone(), 2)
        elif packet is torch.ops.aten.sort and merge[3] is None and _descending(args, kwargs):
            self._keep_merge(merges, indices, indices.detach().clone(), 3)

    def _keep_merge(self, merges: list, tensor: torch.Tensor, item: Any, slot: int | None = None) -> None:
        if (slot is None and len(merges) >= MAX_MERGE_DRAWS) or self._kept_elements + tensor.numel() > MAX_KEPT_ELEMENTS:
            self.problem = self.problem or f"call {self.calls - 1}: more of ToMe's merges than the check keeps"
            return
        self._kept_elements += tensor.numel()
        if slot is None:
            merges.append(item)
        else:
            merges[-1][slot] = item

    def kept_by_sample(self) -> dict:
        """{(sample, position in its pipeline call): (that call's entry latents, its output, the rows
        per half, held twice, the sample's row, its merges: merge_op)} from the kept calls (`keep_calls`); a sample held
        by several pipeline calls (a warm-up, a decoy) from the last one: the images are its."""
        found = {}
        for pipeline, position, latents, output, merges in self._kept_calls:
            samples = self._pipeline_samples.get(pipeline)
            if samples is None or latents.dim() != 4:
                continue
            rows, twice = _latent_count(latents)
            for j in range(min(samples[1], rows)):
                found[(samples[0] + j, position)] = (latents, output, rows, twice, j, merges)
        return found

    def leave(self, output: torch.Tensor, module: str | None = None, operand: torch.Tensor | None = None) -> None:
        """A product of the exit module `module` in the held call (the last one counts): `output`, its
        value, or where the check has that module (`exit_modules`), the module's own function of
        `operand`, the activation the product multiplied (exit_output)."""
        if self._held is None:
            return
        if module is not None and self.exit_modules is not None:
            try:
                output, self._exit_unread = exit_output(self.exit_modules.get(module), module, operand)
            except Exception as exc:  # noqa: BLE001 - an operand the layer refuses: the call's output unread
                output, self._exit_unread = None, f"{module}'s input could not be taken: {type(exc).__name__}: {exc}"[:300]
            if output is None:
                self._held[1] = None
                return
        if self._finite(output, "the denoiser's outputs"):
            self._held[1] = output.detach().clone()

    @property
    def between_pipeline_calls(self) -> bool:
        """Before the first denoiser call, or after a pipeline call's last one has begun: a draw now
        may be the next pipeline call's initial noise (or, on the last call, its step's noise: both
        lists get it, and each check takes its own end of them)."""
        return self._held is None or (self.calls - 1) % max(1, self.per_call) == self.per_call - 1

    def draw(self, tensor: torch.Tensor, sample: int | None = None) -> None:
        """A standard normal draw of the replay (from the verdict's seeds; `standard_normal`): after a
        call's entry, a stochastic step's noise (`_drawn_noise`); from a pipeline call's last call
        on, also the next one's initial noise (`_take_draws`: the last rows drawn before it)."""
        # any rank: noise drawn flat and viewed as latents is the same noise (_drawn_noise reads it)
        if not (isinstance(tensor, torch.Tensor) and tensor.dtype.is_floating_point) \
                or tensor.numel() == 0:  # a draw of nothing is no noise (nor a way to fill the list)
            return
        lists = ([self._start_draws] if self.between_pipeline_calls else []) + \
            ([self._held[2]] if self._held is not None else [])
        for kept in lists:
            if len(kept) >= MAX_DRAWS:  # fail closed: a dropped draw could be the one the check needs
                self.problem = self.problem or f"more than {MAX_DRAWS} draws of the latents' rank between two denoiser calls"
                return
        copy_ = tensor.detach().clone()
        if self.between_pipeline_calls:
            self._start_draws.append((copy_, sample))
        if self._held is not None:
            self._held[2].append(copy_)

    def decode(self, latents: torch.Tensor | None) -> None:
        """The input of the VAE's decoder (`DECODER_ENTRY`): after a pipeline call's last denoiser
        call, the latents it decodes (several inputs where the VAE decodes in slices)."""
        if self._held is None or not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            return
        if (self.calls - 1) % max(1, self.per_call) == self.per_call - 1 and len(self._decoded) < MAX_DRAWS \
                and self._finite(latents, "the latents the decoder took"):
            self._decoded.append(latents.detach().clone())

    def encode(self, moments: torch.Tensor) -> None:
        """The output of the VAE's encoder (`ENCODER_EXIT`) between pipeline calls: an init image's
        latents' moments (mean and log variance), which a draw of the seeds samples."""
        if self.between_pipeline_calls and isinstance(moments, torch.Tensor) and moments.dim() == 4 \
                and len(self._encoded) < MAX_DRAWS and self._finite(moments, "the init images' encodings"):
            self._encoded.append(moments.detach().clone())

    def _check_start(self, index: int, latents: torch.Tensor) -> None:
        """The first call of a pipeline call: its latents (scale_model_input undone) must be what the
        seeds' draws make of them, text or class to image: the draws times init_noise_sigma (DiT's
        pipeline: the draws); image to image: the init image's latents (the VAE's moments sampled
        with the first draws, times its scaling factor) noised to the first timestep by the
        scheduler's add_noise with the next draws."""
        if latents.dim() != 4:
            self.problem = f"call {index}: latents of shape {tuple(latents.shape)}"
            return
        count, _ = _latent_count(latents)
        shape = tuple(latents.shape[1:])
        t = self.timesteps[0]
        start = latents[:count].double() / _input_scale(copy.deepcopy(self.scheduler), t)
        # the samples this call starts: from the seed its noise was drawn with (a run may make other
        # pipeline calls before, a warm-up or a decoy, whose samples repeat), else counted on
        peek = self._take_draws(count, shape)
        base = peek[1][0] if peek is not None and peek[1] and peek[1][0] is not None else None
        first = base if base is not None else self._samples
        self._samples = first + count
        self._pipeline_samples[index // max(1, self.per_call)] = (first, count)
        own = False
        if self.image_to_image:
            moments = torch.cat([m.double() for m in self._encoded]) if self._encoded else None
            if moments is None and self.own_moments is not None and first + count <= self.own_moments.shape[0]:
                # encoded ahead of the call (the init images are public): the harness's own encoding
                # of these samples' images, which a half-precision encoder follows to about 0.14 %
                moments, own = self.own_moments[first:first + count], True
            if moments is None or self.scaling_factor is None or moments.shape[1] != 2 * shape[0] \
                    or tuple(moments.shape[2:]) != shape[1:] or count % moments.shape[0]:
                self.starts["unread"] += 1
                return
            images = moments.shape[0]
            taken = self._take_draws(images + count, shape)
            drawn = taken[0] if taken is not None else None
            if drawn is None:
                self.problem = (f"call {index}: the draws before it are not {images} + {count} standard normal "
                                f"draws of the latents' shape (the init latents' sample, then their noise)")
                return
            init = self.scaling_factor * _sampled(moments, drawn[:images]).repeat(count // images, 1, 1, 1)
            if not own and self.own_moments is not None and images == count \
                    and first + count <= self.own_moments.shape[0] \
                    and self.own_moments[first:first + count].shape == moments.shape:
                # the encoding the replay read is the init images', not a decoy's made to fit the
                # start (a product of quant_conv's weight on a solved input): the init latents it
                # samples, against those the harness's own encoding samples with the same draws
                mine = self.scaling_factor * _sampled(self.own_moments[first:first + count], drawn[:images])
                offset = math.sqrt(_dot(init - mine, init - mine) / max(_dot(mine, mine), 1e-300))
                if offset >= self.worst_encoding[0]:
                    self.worst_encoding = (offset, index)
            noising = copy.deepcopy(self.scheduler)
            expected = noising.add_noise(init, drawn[images:], torch.stack([torch.as_tensor(t)] * count)).double()
        else:
            taken = peek  # the noise alone: the rows already taken to find the call's samples
            drawn = taken[0] if taken is not None else None
            if drawn is None:
                self.problem = (f"call {index}: the draws before it are not {count} standard normal draws of the "
                                f"latents' shape (the seeds' initial noise)")
                return
            sigma = float(self.scheduler.init_noise_sigma) if self.noise_times_sigma else 1.0
            expected = sigma * drawn
        # the init latents' sample (images) then their noise, or the noise alone: each row's sample in turn
        self._seeds_of(index, taken[1], first, count if self.image_to_image else max(1, len(taken[1])))
        rest = math.sqrt(_dot(start - expected, start - expected))
        size = math.sqrt(max(_dot(expected, expected), 1e-300))
        self.starts["checked"] += 1
        if own:  # judged by its own bound (stages.START_OWN_ENCODING_BOUND): another encoder's rounding
            self.starts["own_encoding"] += 1
            if rest / size >= self.worst_own_start[0]:
                self.worst_own_start = (rest / size, index)
            return
        if rest / size >= self.worst_start[0]:
            self.worst_start = (rest / size, index)
        if rest / (HALF_UNIT * size) >= self.worst_start_units[0]:
            self.worst_start_units = (rest / (HALF_UNIT * size), index)

    def _take_draws(self, rows: int, shape: tuple) -> tuple[torch.Tensor, list] | None:
        """The last `rows` rows of the latents' shape drawn before this pipeline call's first call
        (since the last one's last call began), in the order drawn, and the sample whose seed drew
        each row (None where unknown): diffusers' pipelines draw the initial noise (img2img: the
        init latents' sample, then their noise) just before their loop, after whatever the previous
        call's last step drew (Euler Ancestral draws on its last step too). None where fewer were
        drawn."""
        fitting = [(d, sample) for d, sample in self._start_draws if tuple(d.shape[1:]) == shape]
        taken, samples, have = [], [], 0
        while have < rows and fitting:
            draw, sample = fitting.pop()
            if have + draw.shape[0] > rows:
                draw = draw[draw.shape[0] - (rows - have):]
            taken.insert(0, draw.double())
            samples[:0] = [sample] * draw.shape[0]
            have += draw.shape[0]
        return (torch.cat(taken), samples) if have == rows else None

    def _seeds_of(self, index: int, samples: list, first: int, count: int) -> None:
        """Each sample's initial draws come from a generator seeded with that sample's seed (the
        contract: one generator per sample, one image with it): a row drawn with another sample's
        seed, or by a generator the replay did not see seeded, is counted (`start_other_seeds`)."""
        other = sum(1 for j, sample in enumerate(samples) if sample != first + j % count)
        if other:
            self.starts["other_seeds"] += other
            if self.first_other_seed is None:
                self.first_other_seed = index

    def _check_end(self, index: int, k: int, held: list) -> None:
        """A pipeline call's last call: the latents its step makes under the task's scheduler are
        kept (`final_latents`: the harness decodes them and compares the run's images,
        end_image_figures). Where the decoder's input shows as those latents once each (times the
        VAE's scaling factor), the step is also judged as the others are; where it does not
        (decoded in tiles, in one batch after several calls, a decoder's first layers fused), the
        images alone judge it: a read of the decoder's input by its booking is a figure a run can
        route around (the trust review of session 37), the images are what is judged."""
        if self.scaling_factor is None:
            return
        count, _ = _latent_count(held[0]) if held[0].dim() == 4 else (0, False)
        shapes = {tuple(d.shape[1:]) for d in self._decoded}
        decoded = (torch.cat([d.double() for d in self._decoded])
                   if self._decoded and shapes == {tuple(held[0].shape[1:])} else None)
        if decoded is not None and decoded.shape[0] == count:
            self._check(index, k, held[0], held[1], decoded * self.scaling_factor, held[2], final=True)
            self.ends_checked += 1
        else:
            self._check(index, k, held[0], held[1], None, held[2], final=True)
            self.ends_unread += 1

    def _check(self, index: int, k: int, latents, output, next_latents, draws: list | None = None,
               final: bool = False) -> None:
        """The step from call `index` (the `k`-th of its pipeline call) into `next_latents`: the next
        call's latents, or (`final`) the latents decoded after it, which no scale_model_input scaled."""
        if output is None:
            self.problem = (f"call {index}: {self._exit_unread}" if self._exit_unread else
                            f"call {index}: the replay saw no output of the denoiser ({', '.join(sorted(EXIT_MODULES))})")
            return
        if latents.dim() != 4:
            self.problem = f"call {index}: latents of shape {tuple(latents.shape)}"
            return
        count, twice = _latent_count(latents)
        prediction = output_as_latents(output, tuple(latents.shape), self.patch)
        if prediction is None:
            self.problem = (f"call {index}: the denoiser's output {tuple(output.shape)} is not in the layout of "
                            f"its latents {tuple(latents.shape)}")
            return
        next_count, _ = _latent_count(next_latents) if next_latents is not None else (count, False)
        if next_latents is not None and (next_count != count or tuple(next_latents.shape[1:]) != tuple(latents.shape[1:])):
            self.problem = (f"call {index}: {count} latents of shape {tuple(latents.shape[1:])}, the next call "
                            f"{next_count} of {tuple(next_latents.shape[1:])}")
            return
        scheduler, t = self.scheduler, self.timesteps[k]
        # what the scheduler's scale_model_input did to the latents (Euler's 1/sqrt(sigma^2+1))
        sample = latents[:count].double() / (1.0 if self.steps_model_input else _input_scale(scheduler, t))
        prediction = prediction.double()
        direction = None
        if twice:
            first, second = prediction[:count], prediction[count:]
            cond, uncond = (first, second) if self.cond_first else (second, first)
            direction = cond - uncond
            eps = uncond + self.guidance_scale * direction
            self.guided += 1
            # how far apart guidance's halves are: equal halves (the caption as its own negative
            # prompt, DiT's class for its null class) are guidance switched off under any scale
            apart = math.sqrt(_dot(direction, direction) / max(_dot(uncond, uncond), 1e-300))
            if self.least_apart is None or apart < self.least_apart[0]:
                self.least_apart = (apart, index)
        else:  # one row per latent (T-GATE after its gate; guidance elsewhere is stage 1's entry rule)
            eps = prediction[:count]
        stepped_a, after = _step(scheduler, eps, t, sample, 1)
        stepped_b, _ = _step(scheduler, eps, t, sample, 2)
        noise_a, noise_b = _noise(tuple(eps.shape), 1), _noise(tuple(eps.shape), 2)
        difference = noise_a - noise_b
        # the step's noise scale (0 for a deterministic step: both draws give the same result)
        sigma = _dot(stepped_a - stepped_b, difference) / max(_dot(difference, difference), 1e-300)
        expected = stepped_a - sigma * noise_a  # the step without its noise
        along = None
        if direction is not None:  # how one more unit of guidance scale moves the step (the same noise)
            along = _step(scheduler, eps + direction, t, sample, 1)[0] - stepped_a
        self.scheduler = after
        elements = expected.numel()
        stochastic = abs(sigma) * math.sqrt(elements) > 1e-9 * (1.0 + math.sqrt(_dot(sample, sample)))
        # a last step's draws are followed by the next pipeline call's: its own are the first ones
        drawn = _drawn_noise(draws or [], count, tuple(latents.shape[1:]), first=final) if stochastic else None
        if final:
            # the latents the task's last step makes (with the run's noise at the task's scale): the
            # harness decodes them itself and holds the run's images to them (end_image_figures)
            if stochastic and drawn is None:
                self.problem = f"call {index}: the last step adds noise the replay did not read from its draws"
                return
            self.final_latents.append(expected + sigma * drawn if drawn is not None else expected)
            self.final_pipelines.append(index // max(1, self.per_call))
            if next_latents is None:
                return
        next_scale = 1.0 if final else _input_scale(after, self.timesteps[k + 1])
        residual = next_latents[:count].double() / next_scale - expected
        offset, weight = 0.0, 0.0
        if drawn is not None:
            # the run's own noise, drawn again by the replay from the verdict's seeds: its scale and the
            # guidance offset are fitted together, and the step is then judged as a deterministic one
            basis = [drawn] + ([along] if along is not None else [])
            gram = torch.tensor([[_dot(a, b) for b in basis] for a in basis], dtype=torch.float64)
            right = torch.tensor([_dot(a, residual) for a in basis], dtype=torch.float64)
            solved = torch.linalg.lstsq(gram, right.unsqueeze(1)).solution.reshape(-1).tolist()
            residual = residual - solved[0] * drawn
            self.noise_scales.append(solved[0] / sigma)
            # pooled by each step's noise energy: a late step's small noise is read through rounding
            self.noise_fit["read"] += solved[0] * sigma * elements
            self.noise_fit["asked"] += sigma * sigma * elements
            if along is not None:
                weight = _dot(along, along)
                offset = solved[1]
                residual = residual - offset * along
            stochastic = False
        elif along is not None:
            weight = _dot(along, along)
            offset = _dot(residual, along) / weight if weight > 0 else 0.0
            residual = residual - offset * along
        self.checked += 1
        rest = math.sqrt(_dot(residual, residual))
        if stochastic:
            # a stochastic step: the residual is the run's own noise, which must be of the step's scale
            self.stochastic += 1
            self.ratios.append(rest / (abs(sigma) * math.sqrt(elements)))
            self.noise["residual"] += rest * rest
            self.noise["expected"] += sigma * sigma * elements
            variance = sigma * sigma
        else:
            # over how far the denoiser's output moved the latents on this step (PNDM's second call
            # steps from the first call's latents: the distance from its own input says little)
            moved = stepped_a - _step(scheduler, torch.zeros_like(eps), t, sample, 1)[0]
            size = math.sqrt(max(_dot(moved, moved), 1e-300))
            # the same residual in units of half precision's rounding of the latents (2^-11 of each):
            # what a half-precision run's rounding explains (stages.STEP_RESIDUAL_BOUND)
            target = next_latents[:count].double()
            units = rest / max(HALF_UNIT * math.sqrt(_dot(target, target)) / next_scale, 1e-300)
            if final:
                # a last step can move the latents by little (Euler's to its smallest sigma: a gold's
                # float32 rounding read 0.23 % of it), so it is read in rounding units at any
                # precision; the images, decoded by the harness, are its close reading
                if units >= self.worst_end_units[0]:
                    self.worst_end_units = (units, index)
            else:
                if rest / size >= self.worst_residual[0]:
                    self.worst_residual = (rest / size, index)
                if units >= self.worst_units[0]:
                    self.worst_units = (units, index)
            self.units_squared.append(units * units)
            if along is not None and abs(offset) >= abs(self.worst_offset[0]):
                self.worst_offset = (offset, index)
            variance = rest * rest / elements
        if weight > 0:
            self.pooled["along"] += offset * weight
            self.pooled["weight"] += weight
            self.pooled["variance"] += variance * weight

    def all_figures(self, images: list[torch.Tensor]) -> dict:
        """figures(), with "end_images" (end_image_figures) for the run's `images` where a VAE and
        its scaling factor are given."""
        for image in images:
            self._finite(image, "the images")
        figures = self.figures()
        if self.vae is not None and self.scaling_factor is not None and figures["problem"] is None:
            try:
                figures["end_images"] = end_image_figures(self.final_latents_by_sample(), images, self.vae,
                                                          self.scaling_factor)
            except Exception as exc:  # noqa: BLE001 - latents the VAE cannot take: the run's, named
                figures["end_images"] = {"samples": len(images), "worst_rms_levels": [0.0, None],
                                         "problem": f"the latents the task's last steps make cannot be decoded: "
                                                    f"{type(exc).__name__}: {exc}"[:300]}
        return figures

    def final_latents_by_sample(self) -> list[torch.Tensor]:
        """The final latents (one row each) of samples 0, 1, ... in order, as far as every one has
        some: each from the last pipeline call that held it (its samples from the seeds its first
        latents were drawn with: _check_start), so that a run making its samples in another order
        than the batch's (last first, say) has its images held to their own latents."""
        by_sample: dict[int, torch.Tensor] = {}
        for latents, pipeline in zip(self.final_latents, self.final_pipelines):
            first, count = self._pipeline_samples.get(pipeline, (None, 0))
            if first is None or latents.dim() < 1 or latents.shape[0] < count:
                continue
            for j in range(count):
                by_sample[first + j] = latents[j:j + 1]
        ordered = []
        while len(ordered) in by_sample:
            ordered.append(by_sample[len(ordered)])
        return ordered

    def figures(self) -> dict:
        """{"calls", "per_pipeline_call", "checked", "guided", "worst_residual": [share, call] (of the
        deterministic steps: the part of the step the task's scheduler does not explain, over how
        far the denoiser's output moved the latents on it), "worst_residual_half_units": [units, call]
        (the same residual over half precision's rounding of the next latents, 2^-11 of their norm),
        "rms_residual_half_units" (its root mean square over the deterministic steps), "worst_guidance_offset": [offset, call] (deterministic steps: the guidance
        scale the step shows less the task's), "least_guidance_apart": [share, call] (the guided
        call whose halves' outputs are closest: their difference over the unconditional one's), "guidance_offset", "guidance_offset_std" (pooled over
        the guided steps), "stochastic_steps" (judged by their statistics: the run's noise not read), "noise_ratio"
        (their residual over their noise scale, pooled; "noise_ratio_range": each step's, for the
        record), "noise_read" (stochastic steps whose noise was read from the replay's draws, then
        judged as deterministic ones), "noise_scale" (their noise's scale over the task's
        scheduler's, pooled by each step's noise energy; "noise_scale_range": each step's),
        "starts_checked" (pipeline calls whose first latents were read against the seeds' draws),
        "starts_unread" (img2img pipeline calls whose start could not be read: no encoding in the
        call and none of the harness's), "starts_own_encoding" (those read against the harness's
        own encoding of the init images, the replay showing none; "worst_own_encoding_start" the
        worst share of them), "worst_encoding_offset" ([share, call]: the init latents sampled from
        the encoder output the replay read, against those sampled with the same draws from the
        harness's own encoding of the same init images), "worst_start": [share, call] (the part of a first call's latents the
        draws do not explain, over their size), "worst_start_half_units" (the same in half
        precision's rounding units), "ends_checked" (pipeline calls whose last step was checked
        against the latents decoded after it; their residual is "worst_end_residual_half_units", in
        half precision's rounding units at any precision),
        "ends_unread" (those whose decoder input did not show as its latents: judged by the images
        alone, end_image_figures),
        "problem": why the steps could not be read, or None}."""
        if self._held is not None and self.problem is None:
            self._close_held(None)  # the run's last call: its step goes to the decoder
        problem = self.problem
        if problem is None and (self.per_call == 0 or not self.calls or self.calls % self.per_call):
            problem = (f"{self.calls} denoiser calls are no whole number of pipeline calls of {self.per_call} "
                       f"steps of the task's scheduler")
        weight = self.pooled["weight"]
        return {"calls": self.calls, "per_pipeline_call": self.per_call, "checked": self.checked,
                "guided": self.guided,
                "worst_residual": [round(self.worst_residual[0], 9), self.worst_residual[1]],
                "worst_residual_half_units": [round(self.worst_units[0], 4), self.worst_units[1]],
                # over the deterministic steps, root mean square: rounding scatters, a changed rule does not
                "rms_residual_half_units": (round(math.sqrt(sum(self.units_squared) / len(self.units_squared)), 4)
                                            if self.units_squared else None),
                "worst_guidance_offset": ([round(self.worst_offset[0], 6), self.worst_offset[1]]
                                          if self.worst_offset[1] is not None else None),
                "least_guidance_apart": ([float(f"{self.least_apart[0]:.4g}"), self.least_apart[1]]
                                         if self.least_apart is not None else None),
                "guidance_offset": round(self.pooled["along"] / weight, 6) if weight > 0 else None,
                "guidance_offset_std": round(math.sqrt(self.pooled["variance"]) / weight, 6) if weight > 0 else None,
                "stochastic_steps": self.stochastic,
                "noise_ratio": (round(math.sqrt(self.noise["residual"] / self.noise["expected"]), 6)
                                if self.noise["expected"] > 0 else None),
                "noise_ratio_range": [round(min(self.ratios), 6), round(max(self.ratios), 6)] if self.ratios else None,
                "noise_read": len(self.noise_scales),
                "noise_scale": (round(self.noise_fit["read"] / self.noise_fit["asked"], 6)
                                if self.noise_fit["asked"] > 0 else None),
                "noise_scale_range": ([round(min(self.noise_scales), 6), round(max(self.noise_scales), 6)]
                                      if self.noise_scales else None),
                "starts_checked": self.starts["checked"],
                "starts_unread": self.starts["unread"],
                "starts_own_encoding": self.starts["own_encoding"],
                "start_other_seeds": [self.starts["other_seeds"], self.first_other_seed],
                "worst_own_encoding_start": [float(f"{self.worst_own_start[0]:.4g}"), self.worst_own_start[1]],
                "worst_encoding_offset": [float(f"{self.worst_encoding[0]:.4g}"), self.worst_encoding[1]],
                "worst_start": [float(f"{self.worst_start[0]:.4g}"), self.worst_start[1]],
                "worst_start_half_units": [round(self.worst_start_units[0], 4), self.worst_start_units[1]],
                "ends_checked": self.ends_checked, "ends_unread": self.ends_unread,
                "worst_end_residual_half_units": [round(self.worst_end_units[0], 4), self.worst_end_units[1]],
                "problem": problem}


def _sampled(moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A VAE posterior's sample (diffusers' DiagonalGaussianDistribution.sample): the moments' mean
    plus their standard deviation (log variance clamped to -30..20) times `noise`."""
    mean, logvar = moments.double().chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def _drawn_noise(draws: list, count: int, shape: tuple, first: bool = False) -> torch.Tensor | None:
    """The noise of a stochastic step from the draws after the call's entry, in the order drawn:
    those of the latents' shape (one per sample from a generator each, or one for all) where they
    are exactly `count` latents (`first`: the first draws that make `count`, others may follow);
    else all the draws together where they hold exactly `count` latents' values (noise drawn flat
    and viewed as latents is the same noise: the trust review of session 37 sent the steps to the
    statistical reading so). None where the draws are not that. (DiT's pipeline steps Euler
    Ancestral without the generator: its noise is no draw of the seeds, and no task asks for it.)"""
    fitting = [d for d in draws if tuple(d.shape[1:]) == shape]
    if first:
        have, kept = 0, []
        for d in fitting:
            if have >= count:
                break
            kept.append(d[:count - have])
            have += kept[-1].shape[0]
        fitting = kept
    if fitting and sum(d.shape[0] for d in fitting) == count:
        return torch.cat([d.double() for d in fitting])
    size = count * math.prod(shape)
    if not first and draws and sum(d.numel() for d in draws) == size:
        return torch.cat([d.double().reshape(-1) for d in draws]).reshape((count,) + tuple(shape))
    return None


def _descending(args: tuple, kwargs: dict) -> bool:
    """Whether a sort's arguments ask descending order (aten::sort(self, dim, descending) and
    aten::sort.stable(self, *, stable, dim, descending))."""
    if "descending" in kwargs:
        return bool(kwargs["descending"])
    return len(args) > 2 and isinstance(args[2], bool) and args[2]


def _latent_count(latents: torch.Tensor) -> tuple[int, bool]:
    """(latents, held twice): a guided call holds each latent twice, as two equal halves."""
    rows = latents.shape[0]
    twice = rows % 2 == 0 and rows > 0 and torch.equal(latents[:rows // 2], latents[rows // 2:])
    return (rows // 2 if twice else rows), twice


def _input_scale(scheduler: Any, timestep) -> float:
    return float(scheduler.scale_model_input(torch.ones(1, dtype=torch.float64), timestep).reshape(-1)[0])



def end_image_figures(final_latents: list[torch.Tensor], images: list[torch.Tensor], vae: Any,
                      scaling_factor: float) -> dict:
    """The run's images (the replay's, H x W x 3 values in [0, 1] before rounding to 8 bits:
    trace.image_values, in sample order) against the harness's own
    decoding (the zoo's VAE, float32) of the latents the task's last step makes of each pipeline
    call's last denoiser call (StepCheck.final_latents_by_sample: in sample order): {"samples",
    "worst_rms_levels": [root mean square difference in 8-bit levels, sample], "problem"}. Whatever
    the run did after its last denoiser call (another last step, a change of the latents, a decoder
    fed a decoy) shows here, as the images are what is judged."""
    if not final_latents:
        return {"samples": 0, "worst_rms_levels": [0.0, None], "problem": "no pipeline call ended"}
    latents = torch.cat(final_latents)
    if 0 < len(images) < latents.shape[0]:
        # samples past the images' (counted on where no seed explains a call's draws, which fails
        # the start's seeds anyway): no image of theirs
        latents = latents[:len(images)]
    if latents.shape[0] != len(images):
        return {"samples": int(latents.shape[0]), "worst_rms_levels": [0.0, None],
                "problem": f"{len(images)} images for the {latents.shape[0]} latents the pipeline calls ended with"}
    worst = (0.0, None)
    with torch.no_grad():
        for index, (latent, image) in enumerate(zip(latents, images)):
            decoded = vae.decode(latent.unsqueeze(0).float() / scaling_factor).sample[0]
            expected = (decoded.double() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
            if tuple(expected.shape) != tuple(image.shape):
                return {"samples": len(images), "worst_rms_levels": [0.0, None],
                        "problem": f"image {index} is {tuple(image.shape)}, its latents decode to {tuple(expected.shape)}"}
            rms = float((expected - image.double() * 255).pow(2).mean().sqrt())
            if rms >= worst[0]:
                worst = (rms, index)
    return {"samples": len(images), "worst_rms_levels": [round(worst[0], 4), worst[1]], "problem": None}
