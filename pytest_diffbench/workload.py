"""A task's workload -> the batch handed to `generate` (see docs/architecture.md).

The data itself (COCO captions, ImageNet class names, init images) lives in the repository's
`fixtures/data`; the harness reads it through a `DataSource` so that this module stays plain.

Seeds (`sample_seeds`). Prompts, class ids and init images are public (a task's workload offsets
into public data), so the images a candidate must produce are unpredictable only through the
initial noise. `secret` seeds (the default, `--diffbench-seeds=secret`) are derived from the
harness's per-user key (`keys.derive_seed`, the key no child can read) and a *scope*:
`VERDICT_SCOPE` for the final verdict, `AGENT_SCOPE` for every run whose output a generator (an
LLM) reads (DiffAgent's smoke runs and its GA rounds), so that a candidate that prints its seeds
into a log the LLM reads learns nothing about the verdict's. `public` seeds are `task.seed + i`:
the same for every user (reproducible published figures, the L4/L5 calibration), and predictable
by anyone who reads the repository, so a candidate can precompute its images outside the judged
call. Seeds are keyed by the workload (`seed_stream`), not the task id, so tasks that share a
workload share their reference run exactly as with public seeds; under `secret` the final
verdict's seeds are also keyed by the candidate's code (`candidate_digest`: each candidate its
own, the gold the workload's), and `shared` (named explicitly) leaves them one per workload for
every candidate, as before session 17. `HELD_OUT_SCOPE`: a second verdict set, fixed per workload
and key, that stage 3 also judges where the call is proved by replay, and whose images never
leave the harness (evaluate.Evaluator.held_out_check; docs/integrity.md).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .atomic import write_atomic

# The tiny zoo's models are built at 1/8 of the real default size (SD1.5 512 -> 64 px, SDXL
# 1024 -> 128 px, DiT-256 -> 32 px: DiTPipeline has no size argument, so this must match the zoo).
TINY_RESOLUTION_DIVISOR = 8

SECRET_SEEDS, SHARED_SEEDS, PUBLIC_SEEDS = "secret", "shared", "public"
SEED_MODES = (SECRET_SEEDS, SHARED_SEEDS, PUBLIC_SEEDS)
#: the modes whose seeds are derived from the harness key
KEYED_SEED_MODES = (SECRET_SEEDS, SHARED_SEEDS)
#: the final verdict's seeds / those of runs a generator sees the output of
VERDICT_SCOPE, AGENT_SCOPE = "verdict", "agent"
SEED_SCOPES = (VERDICT_SCOPE, AGENT_SCOPE)
#: the verdict's held-out seeds: the same for every candidate of a workload under one key, so that
#: a candidate submitted again in another form draws no new luck there; nothing computed from them
#: is shown, and no candidate process has them (only the harness's replay), so no image for them
#: can be learnt and carried (not a `--diffbench-seed-scope` choice)
HELD_OUT_SCOPE = "held_out"


@dataclass(frozen=True)
class DataSource:
    captions: Callable[[int, int], list[str]]  # (count, offset) -> captions
    class_names: Callable[[], list[str]]  # ImageNet names in index order
    init_images: Callable[[], list[Path]]  # sorted init image files


def run_size(resolution: Sequence[int], zoo: str) -> tuple[int, int]:
    """(height, width) actually generated: the task's resolution, scaled down on the tiny zoo."""
    height, width = int(resolution[0]), int(resolution[1])
    if zoo != "tiny":
        return height, width

    def scale(side: int) -> int:
        return max(8, (side // TINY_RESOLUTION_DIVISOR) // 8 * 8)

    return scale(height), scale(width)


def seed_stream(task, candidate: str | None = None) -> str:
    """What a workload's secret seeds are keyed by: the task's seed and the public inputs it draws
    (source and offset; not the count, so that a smaller `--diffbench-samples` takes a prefix),
    and for a verdict under `secret` seeds the candidate (`candidate_digest`)."""
    wl = task.workload
    parts = [int(task.seed), wl.source, int(wl.offset)] + ([f"candidate:{candidate}"] if candidate else [])
    return json.dumps(parts, separators=(",", ":"))


def candidate_digest(code: str | None, gold: str | None) -> str | None:
    """What makes a candidate's verdict seeds its own: the SHA-256 of its code, or None for the
    task's gold solution `gold` (and no code), which keeps the workload's seeds so that a reference sweep
    shares its baselines as before.

    Why per candidate: a trace's images are computed from the verdict's noise and shown to whoever
    reads the run, so a candidate can write that noise into them (its lowest bits, or L itself);
    with seeds shared by every candidate of a workload, the next submission carried the
    reference's images for that noise and passed L4 tasks at L 0.0, U 16.8 (red team, session 17),
    and one leak served every task of the workload's stream. A candidate's own seeds depend on its
    own code through the harness key: no leak from one submission tells another anything."""
    if code is None or (gold and code.strip() == gold.strip()):
        return None
    return hashlib.sha256(code_form(code).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def code_form(code: str) -> str:
    """What of a candidate's code its verdict seeds follow: the parsed program without comments,
    layout or string statements (docstrings), so that the same program submitted again with a
    comment changed gets the same seeds (red team round 8, R1: five re-rolls of a candidate just
    over the quality bound, by a trailing comment, all passed). A renamed variable is another
    program and still draws other seeds (docs/integrity.md). Code that does not parse: as written."""
    import ast

    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code

    class DropStringStatements(ast.NodeTransformer):
        def generic_visit(self, node):
            super().generic_visit(node)
            for field in ("body", "orelse", "finalbody"):
                body = getattr(node, field, None)
                if isinstance(body, list) and body and all(isinstance(s, ast.stmt) for s in body):
                    kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                    and isinstance(s.value.value, str))]
                    setattr(node, field, kept or ([] if isinstance(node, ast.Module) else [ast.Pass()]))
            return node

    try:
        return ast.dump(DropStringStatements().visit(tree), annotate_fields=False)
    except RecursionError:
        return code


def sample_seeds(task, count: int, mode: str = SECRET_SEEDS, scope: str = VERDICT_SCOPE,
                 key: bytes | None = None, candidate: str | None = None) -> list[int]:
    """The `count` seeds of `task`'s samples: `public` = task.seed + i; `shared` = derived from the
    harness key `key` (required) and `scope` (see the module docstring); `secret` = the same, and
    in the verdict's scope also from `candidate` (`candidate_digest`; None: the workload's own)."""
    if mode == PUBLIC_SEEDS:
        return [int(task.seed) + i for i in range(count)]
    if mode not in KEYED_SEED_MODES:
        raise ValueError(f"unknown seed mode {mode!r}; expected one of {', '.join(SEED_MODES)}")
    if scope not in (*SEED_SCOPES, HELD_OUT_SCOPE):
        raise ValueError(f"unknown seed scope {scope!r}; expected one of {', '.join(SEED_SCOPES)}")
    if key is None:
        raise ValueError("secret seeds need the harness key (keys.secret_key(cache_dir)); ask for public "
                         "seeds (mode / seed_mode 'public') for the predictable task.seed + i")
    from .keys import derive_seed

    own = candidate if mode == SECRET_SEEDS and scope == VERDICT_SCOPE else None
    stream = seed_stream(task, own)
    return [derive_seed(key, scope, stream, i) for i in range(count)]


def build_batch(task, zoo: str, data: DataSource, inputs_dir: Path, samples: int | None = None, *,
                seed_mode: str = SECRET_SEEDS, seed_scope: str = VERDICT_SCOPE,
                key: bytes | None = None, candidate: str | None = None) -> tuple[dict, list[str]]:
    """The job's batch dict (init images as resized PNG paths under `inputs_dir`) and the texts
    CLIP compares each image with. Seeds by `sample_seeds(task, count, seed_mode, seed_scope, key)`:
    secret by default, so a caller that passes no key gets an error, never predictable seeds."""
    wl = task.workload
    count = samples or wl.count
    height, width = run_size(task.resolution, zoo)
    seeds = sample_seeds(task, count, seed_mode, seed_scope, key, candidate)
    batch = {"kind": task.pipeline, "prompts": None, "class_ids": None, "images": None, "strength": None,
             "seeds": seeds, "height": height, "width": width, "guidance_scale": float(task.guidance_scale),
             "num_inference_steps": task.steps}
    if task.pipeline == "class2img":
        names = data.class_names()
        class_ids = [(wl.offset + i * 97) % len(names) for i in range(count)]  # spread over the classes
        batch["class_ids"] = class_ids
        texts = [f"a photo of a {names[c]}" for c in class_ids]
    else:
        batch["prompts"] = texts = data.captions(count, wl.offset)
    if task.pipeline == "img2img":
        batch["strength"] = float(task.strength)
        batch["images"] = [str(p) for p in _resized_init_images(data.init_images(), count, wl.offset, (height, width), inputs_dir)]
    return batch, texts


def _resized_init_images(files: list[Path], count: int, offset: int, size: tuple[int, int], inputs_dir: Path) -> list[Path]:
    from PIL import Image

    inputs_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = files[(offset + i) % len(files)]
        dst = inputs_dir / f"{src.stem}_{size[1]}x{size[0]}.png"
        if not dst.exists():
            with Image.open(src) as img:
                resized = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
            png = io.BytesIO()
            resized.save(png, format="PNG")
            write_atomic(dst, png.getvalue())  # xdist workers may write the same input at once
        out.append(dst)
    return out


def batch_digest(batch: dict) -> str:
    """Content hash of a batch, init image bytes included (paths alone would not do)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in batch.items() if k != "images"}, sort_keys=True).encode())
    for path in batch.get("images") or []:
        h.update(Path(path).read_bytes())
    return h.hexdigest()
