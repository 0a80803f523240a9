"""Red team round 20, F1-F3 and F9: the gold with the guidance scale cut to 0.6 of the task's
(`batch["guidance_scale"] * 0.6`); what its process reports is the gold's. The images moved by
less than L_gold's bound of 0.04 (0.038 on L1-sd15-t2i-0001), so it passed.

This module is appended to the task's gold code.

expect with replay: key_attribute (the guidance scale the replay's steps show, updates.StepCheck)
"""
_gold_generate = generate  # noqa: F821 - the gold code's, above


def generate(pipe, batch):
    return _gold_generate(pipe, dict(batch, guidance_scale=batch["guidance_scale"] * 0.6))
