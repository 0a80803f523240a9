"""Half precision claimed, attention computed in float32 where the precision tally did not look
(session 23's trust review): every attention of the denoiser runs its two products in float32 as
baddbmm with beta 0 and, as the scaled `self` that beta 0 makes inert, a one-element slice of a VAE
parameter taken inside the call. A product was booked as "another component's" (kept out of the
judged tally) when some operand came from the VAE and none from the denoiser; attention's products
read no parameter, so both moved out, and the tally showed the linear layers' float16 alone. On the
tiny PixArt, attention over the 300 caption tokens is over half the denoiser's work.

This module is appended to the task's gold code (a PixArt fp16 task).

expect with replay: key_attribute (the share of float16 in the denoiser's tally)
"""
_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


class _Float32Attention:
    """diffusers' AttnProcessor with both products in float32 beside an inert VAE operand."""

    def __init__(self, vae_parameter):
        self.vae_parameter = vae_parameter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        import torch

        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t).float() for t in (query, key, value))
        inert = self.vae_parameter.float()[:1]  # inside the call: a copy and a view of the VAE's parameter
        scores = torch.baddbmm(inert, query, key.transpose(-1, -2), beta=0, alpha=attn.scale)
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)
        out = torch.baddbmm(inert, probs, value, beta=0)
        out = attn.batch_to_head_dim(out.to(hidden_states.dtype))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def load_pipeline(device, dtype):
    pipe = _gold_load_pipeline(device, dtype)
    pipe.transformer.set_attn_processor(_Float32Attention(pipe.vae.decoder.conv_in.bias))
    return pipe
