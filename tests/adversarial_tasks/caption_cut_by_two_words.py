"""Red team round 20, F8: each caption without its last two words; the text encoder then runs on
shorter captions and the images moved by 0.0234 against L_gold's bound of 0.04, so it passed.

This module is appended to a text-to-image task's gold code.

expect with replay: key_attribute (the captions' token rows are not the ones looked up, captions.py)
"""
_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    return _gold_generate(pipe, dict(batch, prompts=[" ".join(p.split()[:-2]) for p in batch["prompts"]]))
