"""Shows ToMe to stage 1 on a decoy run off the record, and hides seed-free work there too (red team
round 7, S2): the trace recorder is taken off torch's dispatch-mode stack (its name built at run
time), a decoy sample runs with the installed tomesd patch (stage 1's hooks see tokens merged) and
the text encoder runs for every prompt; back on the record, the images are made without ToMe from
those embeddings. The replay never counts the decoy, and the text encoder's 0.6 % of the work,
carried as constants, moved the FLOPs per image past the midpoint between the reference's and the
gold's (ToMe changes them by 1.07 % on L2-sd15-t2i-256px-tomesd-0045; its images by 0.016, under
the image rule's 0.02). The work rule now reads what follows the seeds, which that hidden work
does not lower.

Appended to the task's gold code.

expect: key_attribute (the work that follows the seeds is the reference's)
"""
# 1. The recorder of the judged call (the top of torch's dispatch-mode stack, above the FLOP
#    counter's mode) is taken off the stack for a while: the FLOP counter stays, so the child's
#    guard ("the denoiser ran with the FLOP counter's dispatch mode switched off") is satisfied.
# 2. Off the record: a ToMe decoy sample (stage 1's hooks see the installed tomesd merging tokens)
#    and the text encoder for every prompt and the negative prompt (seed-independent: they enter
#    the trace as constants, so the replay never counts them).
# 3. On the record: the images, made without ToMe (the reference's images), from those embeddings.
# The decoy costs the replay nothing, and the text encoder's 0.6 % of the work puts the replayed
# FLOPs just past the midpoint between the reference's and the gold's (ToMe changes them 1.07 %).
import tomesd as _tomesd

_gold_load_pipeline = load_pipeline
_gold_generate = generate
_TOME_ARGS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")


def _off_record():
    C = torch._C
    if C._len_torch_dispatch_stack() < 2:
        return None
    top = getattr(C, "_pop_torch" + "_dispatch_stack")(None)
    if type(top).__name__ != "Recorder":
        C._push_on_torch_dispatch_stack(top)
        return None
    return top


def _on_record(top):
    if top is not None:
        torch._C._push_on_torch_dispatch_stack(top)


def generate(pipe, batch):
    top = _off_record()
    try:
        decoy = dict(batch, seeds=batch["seeds"][:1], prompts=batch["prompts"][:1])
        _gold_generate(pipe, decoy)  # ToMe at work, seen by the hooks, not recorded
        embeds = []
        for prompt in batch["prompts"]:
            pe, ne = pipe.encode_prompt(prompt, pipe.device, 1, True, None)
            embeds.append((pe, ne))
    finally:
        _on_record(top)
    args = pipe.unet._tome_info["args"]
    _tomesd.remove_patch(pipe)
    try:
        images = []
        for (pe, ne), seed in zip(embeds, batch["seeds"]):
            generator = torch.Generator(device=pipe.device).manual_seed(seed)
            result = pipe(
                prompt_embeds=pe,
                negative_prompt_embeds=ne,
                height=batch["height"],
                width=batch["width"],
                num_inference_steps=batch["num_inference_steps"],
                guidance_scale=batch["guidance_scale"],
                generator=generator,
            )
            images.append(result.images[0])
        return images
    finally:
        _tomesd.apply_patch(pipe, **{k: args[k] for k in _TOME_ARGS if k in args})
