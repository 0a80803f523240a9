"""The trust review of session 36 (3): the caption check read only `aten.embedding` lookups of the
token table, so a decoy lookup of the asked rows beside an `index_select` of other ones (here the
same ids: any other read of the table is refused, whatever it reads) passed it.

This module is appended to a Stable Diffusion task's gold code.

expect with replay: key_attribute (another op read the token table, captions.caption_figures' other_reads)
"""
_gold_load_pipeline = load_pipeline  # noqa: F821 - the gold code's, above


def load_pipeline(device, dtype):
    import torch

    pipe = _gold_load_pipeline(device, dtype)
    table = pipe.text_encoder.get_input_embeddings()

    def decoy_then_select(ids):
        torch.nn.functional.embedding(ids, table.weight)  # the decoy: the asked rows, looked up
        return table.weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, -1)

    table.forward = decoy_then_select
    return pipe
