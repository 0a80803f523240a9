"""What the text encoders and the class embedder were given, read by behaviour from the replay.

The caption a task asks for reaches the model as token ids looked up in a text encoder's token
table (CLIP's `token_embedding`, T5's `shared`), and DiT's class as a row of its class embedder's
table. The replay (trace.Replayer) records every row of ids looked up in those tables with
`aten.embedding` on the model's own parameter; this module computes the rows the task's captions
make with the zoo pipeline's own tokenizers, as diffusers' pipelines tokenize them (`encode_prompt`:
padded to the tokenizer's length, truncated; PixArt's T5 after its caption cleaning, at the
pipeline's `max_sequence_length`), and the negative prompt's (the empty caption; DiT's null class).

Red team round 20 (F8) passed L1-sd15-t2i-0001 with each caption cut by two words: the images
moved by less than the bound allowed. Now each caption's row must be looked up, and no row other
than the captions' and the negative prompt's: a cut, an added or a changed word fails stage 1
(stages.caption_mismatches). A table read any other way (a view or copy of its weight, an
`index_select`, a one-hot product) is a failure of its own, whatever lookups stand beside it.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

#: the parameters whose lookups are the captions' tokens (text encoders) or the class (DiT)
TOKEN_TABLE = re.compile(r"^text_encoder(_2)?\..*(token_embedding|shared|embed_tokens)\.weight$"
                         r"|^transformer\..*class_embedder\.embedding_table\.weight$")

#: DiT's null class (classifier-free guidance's unconditional half)
DIT_NULL_CLASS = 1000


def _ids(tokenizer: Any, text: str, length: int, **extra) -> tuple:
    encoded = tokenizer(text, padding="max_length", max_length=length, truncation=True, **extra)
    return tuple(int(i) for i in encoded["input_ids"])


def expected_rows(pipe: Any, prompts: list[str] | None, class_ids: list[int] | None) -> dict[str, dict]:
    """{table family: {"asked": [the row of each caption or class, in sample order], "negative": row}}
    for the zoo pipeline `pipe`; the table family is "text_encoder", "text_encoder_2" or
    "class_embedder" (every class embedder table of a DiT: each block has one)."""
    out: dict[str, dict] = {}
    if class_ids:
        out["class_embedder"] = {"asked": [(int(c),) for c in class_ids], "negative": (DIT_NULL_CLASS,)}
        return out
    if not prompts:
        return out
    call = inspect.signature(type(pipe).__call__).parameters
    for component, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tokenizer = getattr(pipe, tokenizer_name, None)
        if tokenizer is None or getattr(pipe, component, None) is None:
            continue
        if "max_sequence_length" in call and hasattr(pipe, "_text_preprocessing"):  # PixArt's T5
            length = int(call["max_sequence_length"].default)

            def clean(text: str) -> str:
                return pipe._text_preprocessing(text, clean_caption=True)[0]

            rows = [_ids(tokenizer, clean(p), length, add_special_tokens=True) for p in prompts]
            negative = _ids(tokenizer, clean(""), length, add_special_tokens=True)
        else:  # CLIP (SD, SDXL): encode_prompt pads and truncates to the tokenizer's length
            length = int(tokenizer.model_max_length)
            rows = [_ids(tokenizer, p, length) for p in prompts]
            negative = _ids(tokenizer, "", length)
        out[component] = {"asked": rows, "negative": negative}
    return out


def table_family(name: str) -> str | None:
    """The table family (expected_rows' keys) of a TOKEN_TABLE parameter name, or None."""
    if not TOKEN_TABLE.match(name):
        return None
    if name.startswith("transformer."):
        return "class_embedder"
    return name.partition(".")[0]


def rows_of(indices: Any) -> list[tuple]:
    """The rows of ids an `aten.embedding` looked up: its indices' last dimension (a class embedder's
    are scalars per sample: rows of one)."""
    import torch

    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point:
        return []
    if indices.dim() <= 1:
        return [(int(i),) for i in indices.reshape(-1).tolist()]
    return [tuple(int(i) for i in row) for row in indices.reshape(-1, indices.shape[-1]).tolist()]


def caption_figures(expected: dict[str, dict], looked_up: dict[str, list[tuple]],
                    other_reads: dict[str, int] | None = None) -> dict:
    """{family: {"missing": [samples whose row was not looked up], "other_rows": how many rows
    looked up are neither a caption's nor the negative prompt's, "other_example": the first of
    them (its first 12 ids), "rows": how many rows were looked up, "other_reads": how many ops
    other than a lookup read the family's tables (`other_reads`; a decoy lookup of the asked rows
    beside an `index_select` of other ones: the trust review of session 36)}} for each expected family."""
    figures = {}
    for family, want in expected.items():
        seen = looked_up.get(family, [])
        seen_set = set(seen)
        allowed = set(map(tuple, want["asked"])) | {tuple(want["negative"])}
        missing = [i for i, row in enumerate(want["asked"]) if tuple(row) not in seen_set]
        other = [row for row in seen if row not in allowed]
        figures[family] = {"missing": missing, "other_rows": len(other),
                           "other_example": list(other[0][:12]) if other else None, "rows": len(seen),
                           "other_reads": int((other_reads or {}).get(family, 0))}
    return figures
