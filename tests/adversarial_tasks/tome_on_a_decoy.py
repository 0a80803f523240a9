"""Shows stage 1 a method that does not make the images: the pipeline really has ToMe applied (the
installed tomesd, so every behaviour hook sees tokens merged), but generate runs it only on a decoy
(the first sample, once), then takes the patch off, makes every image as the gold does but without
ToMe (the same pipeline object, so the same denoiser calls per pipeline call; on an L2 ToMe task
that is the reference's images, on an L3 task the other parts are kept) and puts the patch back for
the harness to inspect. The decoy costs one sample of N, so the speed stays within 2x of the gold's.
Only the images tell: they are the gold's without ToMe (stages.spec_evidence_problem; on L3 against
the ablation baseline of ablation.py).

This module is appended to the task's gold code (ToMe in load_pipeline, the images in generate).

expect: key_attribute
"""
import tomesd

_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold's, above
_gold_generate = generate  # noqa: F821
TOME_ARGS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")


def generate(pipe, batch):
    decoy = dict(batch, seeds=batch["seeds"][:1], **{k: batch[k][:1] for k in ("prompts", "class_ids", "images")
                                                     if batch.get(k)})
    _gold_generate(pipe, decoy)  # the hooks see ToMe at work
    args = pipe.unet._tome_info["args"]
    tomesd.remove_patch(pipe)
    try:
        return _gold_generate(pipe, batch)  # the gold's images without ToMe
    finally:
        tomesd.apply_patch(pipe, **{k: args[k] for k in TOME_ARGS if k in args})
