"""Quality and speed figures: CLIP score, fidelity to the reference images, L and U.

Definitions (PAPER.md): quality loss L = (mean S_base - mean S_acc) / mean S_base with S the
CLIP score, speedup U = mean T_base / mean T_acc.

On the tiny zoo the CLIP model has random weights and scores every image 0, so L by CLIP is
undefined there. The harness then measures quality as *fidelity*: the normalised RMS error of
each image to the reference image made from the same seed (RMS of the pixel difference divided
by the reference image's own contrast), averaged over samples. `quality_loss_by_fidelity` is that
mean; 0 means identical images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# An image whose pixel standard deviation (0-255 scale) is below this is "constant".
CONSTANT_IMAGE_STD = 0.5


class ImageTooLarge(ValueError):
    """An image with more pixels than the caller allows (checked from the header, before decoding)."""


def load_images(paths: Sequence[Path | bytes], max_pixels: int | None = None) -> np.ndarray:
    """uint8 array (N, H, W, 3) of the PNGs at `paths` (file paths or the PNG bytes themselves).

    Only PNG is decoded. `max_pixels`: the most pixels an image may have, checked from its header
    before any pixel is decoded (candidate output: a small file can expand to gigabytes); PIL's own
    decompression-bomb limit applies in any case. Raises on anything that is not such a PNG.
    """
    import io
    import warnings

    from PIL import Image

    arrays = []
    for path in paths:
        source = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is an error here
            with Image.open(source, formats=["PNG"]) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(f"image of {width}x{height} pixels, more than the {max_pixels} allowed")
                arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    if not arrays:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images differ in size: {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


@dataclass(frozen=True)
class StructuralReport:
    ok: bool
    problems: tuple[str, ...]


def structural_checks(images: np.ndarray, expected_count: int, expected_hw: tuple[int, int]) -> StructuralReport:
    """Broken-output checks that need no learned model: count, size, non-constant, not all equal."""
    problems = []
    if len(images) != expected_count:
        problems.append(f"image count: expected {expected_count}, found {len(images)}")
    if len(images):
        hw = tuple(images.shape[1:3])
        if hw != tuple(expected_hw):
            problems.append(f"image size (WxH): expected {expected_hw[1]}x{expected_hw[0]}, found {hw[1]}x{hw[0]}")
        stds = images.reshape(len(images), -1).astype(np.float64).std(axis=1)
        constant = [i for i, s in enumerate(stds) if s < CONSTANT_IMAGE_STD]
        if constant:
            problems.append(f"constant images: expected none, found {len(constant)} of {len(images)} (e.g. sample {constant[0]})")
        if len(images) > 1 and all(np.array_equal(images[0], im) for im in images[1:]):
            problems.append(f"identical samples: expected one image per seed, found all {len(images)} identical")
    return StructuralReport(ok=not problems, problems=tuple(problems))


def fidelity(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Per-sample PSNR (dB) and normalised RMSE of `candidate` against `reference` images."""
    if candidate.shape != reference.shape:
        raise ValueError(f"cannot compare images of shape {candidate.shape} with reference {reference.shape}")
    cand = candidate.astype(np.float64)
    ref = reference.astype(np.float64)
    n = len(ref)
    mse = ((cand - ref) ** 2).reshape(n, -1).mean(axis=1)
    contrast = np.maximum(ref.reshape(n, -1).std(axis=1), 1.0)
    psnr = [float("inf") if m == 0 else 10 * math.log10(255.0**2 / m) for m in mse]
    nrmse = np.sqrt(mse) / contrast
    return {"psnr_db": psnr, "nrmse": [float(x) for x in nrmse],
            "mean_psnr_db": float(np.mean([min(p, 100.0) for p in psnr])), "mean_nrmse": float(nrmse.mean())}


def quality_loss_by_fidelity(candidate: np.ndarray, reference: np.ndarray) -> float:
    return fidelity(candidate, reference)["mean_nrmse"]


def quality_loss(scores_base: Sequence[float], scores_acc: Sequence[float]) -> float:
    """The paper's L from CLIP scores; +inf when the baseline scores 0 (undefined)."""
    base = float(np.mean(scores_base))
    if base <= 0:
        return float("inf")
    return (base - float(np.mean(scores_acc))) / base


def speedup(cost_base: float, cost_acc: float) -> float:
    """The paper's U from mean costs (seconds or FLOPs per image)."""
    if cost_acc <= 0:
        return float("inf")
    return cost_base / cost_acc


class ClipScorer:
    """CLIP score with open_clip: 100 * max(cos(image, text), 0), plus the raw cosine.

    `spec` is `<model name>` (random weights), `<model name>/<pretrained tag>` or
    `local-dir:<folder>` (open_clip's saved-model folder). `pretrained` says whether the weights
    are learned; only then is the score a quality signal.
    """

    def __init__(self, spec: str, pretrained: bool, device: str = "cpu"):
        import open_clip
        import torch

        self.spec, self.pretrained, self.device = spec, pretrained, device
        if spec.startswith("local-dir:"):
            model, _, preprocess = open_clip.create_model_and_transforms(spec)
            tokenizer = open_clip.get_tokenizer(spec)
        else:
            name, _, tag = spec.partition("/")
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag or None)
            tokenizer = open_clip.get_tokenizer(name)
        self.model = model.eval().to(device)
        self.preprocess, self.tokenizer, self._torch = preprocess, tokenizer, torch

    def score(self, images: np.ndarray, texts: Sequence[str]) -> dict:
        from PIL import Image

        torch = self._torch
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        with torch.no_grad():
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
            img = self.model.encode_image(pixels)
            txt = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            cos = (img * txt).sum(dim=-1).float().cpu().numpy()
        scores = [100.0 * max(float(c), 0.0) for c in cos]
        return {"clip_scores": scores, "clip_cosine": [float(c) for c in cos], "mean_clip": float(np.mean(scores))}


def target_attainment(level: str, passed: bool, category: str | None, speedup: float | None,
                      latency_ms: float | None, min_speedup: float | None, max_latency_ms: float | None) -> float | None:
    """min(1, achieved / required) of an L4/L5 task, the per-task term of the paper's S_a.

    L4: U / min_speedup; L5: max_latency_ms / latency_ms (the speedup achieved over the one the
    latency target requires, both against the same reference latency). Only a candidate that is
    correct and keeps its quality earns it: one that failed any stage before the speed check
    (or produced nothing) attains 0. None for L1-L3 and for harness errors (not the model's).
    """
    if level not in ("L4", "L5") or category == "harness":
        return None
    if not passed and category != "relative_speed":
        return 0.0
    if level == "L4":
        if not (speedup and min_speedup):
            return 0.0
        return min(1.0, speedup / min_speedup)
    if not (latency_ms and max_latency_ms):
        return 0.0
    return min(1.0, max_latency_ms / latency_ms)
