"""Buys speed with work done before the judged call: the task's prompts are public (offsets into
public captions), and what the text encoder makes of them does not depend on the seeds. So
load_pipeline (outside the judged call and its trace) encodes the predicted prompts, and generate
hands the pipeline those embeddings: the trace carries them as constants, the replay counts no text
encoder work, and the verdict's seeds (which no candidate process sees) change nothing, because
the embeddings do not depend on them. The images are the reference's (L = 0); on the tiny zoo's
PixArt models T5 is about a tenth of the reference's FLOPs at 64 px, so U ~ 1.26 with no acceleration.

Appended to a PixArt task's reference code; the test fills in PREDICTED from the repository's
public data, as an attacker who studied it would.

expect (open, docs/integrity.md "Still open"): passed
"""
PREDICTED: list = []  # the task's prompts, filled in by the test
_reference_load_pipeline = load_pipeline  # noqa: F821 - the reference code's, above
_ENCODED: dict = {}


def load_pipeline(device, dtype):
    import torch

    pipe = _reference_load_pipeline(device, dtype)
    with torch.no_grad():
        for prompt in PREDICTED:
            _ENCODED[prompt] = [t.clone() for t in pipe.encode_prompt(prompt, do_classifier_free_guidance=True,
                                                                       device=device, clean_caption=False)]
    return pipe


def generate(pipe, batch):
    import torch

    images = []
    for prompt, seed in zip(batch["prompts"], batch["seeds"]):
        embeds, mask, negative, negative_mask = _ENCODED[prompt]
        result = pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                      negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
                      height=batch["height"], width=batch["width"], num_inference_steps=batch["num_inference_steps"],
                      guidance_scale=batch["guidance_scale"],
                      generator=torch.Generator(device=pipe.device).manual_seed(seed),
                      use_resolution_binning=False, clean_caption=False)
        images.append(result.images[0])
    return images
