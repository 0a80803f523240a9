"""A task's workload -> the batch handed to `generate` (see docs/architecture.md).

The data itself (COCO captions, ImageNet class names, init images) lives in the repository's
`fixtures/data`; the harness reads it through a `DataSource` so that this module stays plain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

# The tiny zoo's models are built at 1/8 of the real default size (SD1.5 512 -> 64 px, SDXL
# 1024 -> 128 px, DiT-256 -> 32 px: DiTPipeline has no size argument, so this must match the zoo).
TINY_RESOLUTION_DIVISOR = 8


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


def build_batch(task, zoo: str, data: DataSource, inputs_dir: Path, samples: int | None = None) -> tuple[dict, list[str]]:
    """The job's batch dict (init images as resized PNG paths under `inputs_dir`) and the texts
    CLIP compares each image with."""
    wl = task.workload
    count = samples or wl.count
    height, width = run_size(task.resolution, zoo)
    seeds = [int(task.seed) + i for i in range(count)]
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
            tmp = dst.with_suffix(f".{id(out)}.tmp.png")
            resized.save(tmp)
            tmp.replace(dst)
        out.append(dst)
    return out


def batch_digest(batch: dict) -> str:
    """Content hash of a batch, init image bytes included (paths alone would not do)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in batch.items() if k != "images"}, sort_keys=True).encode())
    for path in batch.get("images") or []:
        h.update(Path(path).read_bytes())
    return h.hexdigest()
