"""captions.expected_rows against what diffusers' pipelines really look up, on the tiny zoo.

The replay records the rows of ids an `aten.embedding` of a token (class) table looked up; here the
same rows are taken with a forward hook on those tables of a pipeline run in this process, so the
tokenization the harness expects is checked against each family's own `encode_prompt`."""
from __future__ import annotations

import pytest
import torch

from pytest_diffbench import captions, stages

PROMPTS = ["A man riding a horse on a sandy beach next to the ocean.", "two cats asleep on a red couch"]


def _looked_up(tiny_zoo, model: str, prompts=None, class_ids=None, **call) -> tuple[dict, dict]:
    """(expected_rows for the task's prompts/classes, the rows the pipeline's tables looked up when
    given `call`'s prompts/classes: the task's unless `call` says otherwise)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(model, cache_dir=str(tiny_zoo.hub_cache), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, list] = {}
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for sub_name, sub in module.named_modules():
            table = captions.table_family(f"{name}.{sub_name}.weight" if sub_name else f"{name}.weight")
            if table is not None and isinstance(sub, torch.nn.Embedding):
                sub.register_forward_pre_hook(
                    lambda m, args, table=table: seen.setdefault(table, []).extend(captions.rows_of(args[0])))
    generator = torch.Generator().manual_seed(0)
    if class_ids is not None:
        pipe(class_labels=call.pop("class_labels", class_ids), num_inference_steps=2, generator=generator)
    else:
        extra = {"use_resolution_binning": False} if "PixArt" in model else {}
        pipe(prompt=call.pop("prompt", prompts), num_inference_steps=2, height=64, width=64, generator=generator,
             **extra, **call)
    return captions.expected_rows(pipe, prompts, class_ids), seen


@pytest.mark.parametrize("model", [
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0",  # two encoders; the empty negative prompt is zeros, not encoded
    "PixArt-alpha/PixArt-XL-2-512x512",  # T5 after the caption cleaning, 120 tokens
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",  # 300 tokens
])
def test_the_rows_expected_are_the_ones_the_pipeline_looks_up(tiny_zoo, model):
    expected, seen = _looked_up(tiny_zoo, model, PROMPTS)
    assert expected and set(seen) == set(expected), (expected.keys(), seen.keys())
    figures = captions.caption_figures(expected, seen)
    assert all(f["missing"] == [] and f["other_rows"] == 0 for f in figures.values()), figures
    assert stages.caption_mismatches({"replay": {"captions": figures}}) == []


def test_a_cut_caption_is_missing_and_its_rows_are_other_rows(tiny_zoo):
    cut = [" ".join(p.split()[:-2]) for p in PROMPTS]
    expected, seen = _looked_up(tiny_zoo, "stable-diffusion-v1-5/stable-diffusion-v1-5", PROMPTS, prompt=cut)
    figures = captions.caption_figures(expected, seen)
    assert figures["text_encoder"]["missing"] == [0, 1] and figures["text_encoder"]["other_rows"] == 2, figures
    found = stages.caption_mismatches({"replay": {"captions": figures}})
    assert [m.expected for m in found] == ["each sample's row", "only the task's rows and the negative prompt's"]
    # and a table read by any op but a lookup (the replay counts them: test_replay's decoy lookup)
    figures = captions.caption_figures(expected, {"text_encoder": [tuple(r) for r in expected["text_encoder"]["asked"]]},
                                       {"text_encoder": 1})
    assert [m.expected for m in stages.caption_mismatches({"replay": {"captions": figures}})] == ["lookups of rows alone"]


def test_dits_classes_and_its_null_class_are_the_rows_of_its_class_tables(tiny_zoo):
    expected, seen = _looked_up(tiny_zoo, "facebook/DiT-XL-2-256", class_ids=[207, 360])
    figures = captions.caption_figures(expected, seen)
    assert figures["class_embedder"]["missing"] == [] and figures["class_embedder"]["other_rows"] == 0, figures
    assert figures["class_embedder"]["rows"] > 0
    expected, seen = _looked_up(tiny_zoo, "facebook/DiT-XL-2-256", class_ids=[207, 360], class_labels=[208, 361])
    figures = captions.caption_figures(expected, seen)
    assert figures["class_embedder"]["missing"] == [0, 1], figures
