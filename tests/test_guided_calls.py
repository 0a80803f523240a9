"""guided_calls.py's pieces on their own: the timestep read off a time embedding's input, the guided
units of a replay's calls, and stage 1's reading of the figures. End to end (a forged guided call
failing, honest ones passing): tests/test_replay.py."""

from __future__ import annotations

import pytest
import torch

from pytest_diffbench import stages
from pytest_diffbench.guided_calls import DIRECTION_BOUND, guided_units, read_timesteps


# the time projections of the six families' denoisers (diffusers' own module and settings)
@pytest.mark.parametrize("channels, flip, shift", [(32, True, 0), (320, True, 0),  # SD, SDXL's UNet
                                                   (256, True, 1)])  # DiT's and PixArt's timestep_embedder
def test_a_timestep_is_read_back_off_its_sinusoidal_embedding(channels, flip, shift):
    from diffusers.models.embeddings import Timesteps

    projection = Timesteps(channels, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    timesteps = torch.tensor([0.0, 1.0, 20.5, 333.25, 999.0])
    read = read_timesteps(projection(timesteps), projection)
    assert read is not None and torch.allclose(read, timesteps, atol=1e-3), read
    # half precision rounds the embedding: still its timestep, to within what the rounding allows
    read = read_timesteps(projection(timesteps).half(), projection)
    assert read is not None and torch.allclose(read, timesteps, atol=2.0), read


def test_rows_that_are_no_timesteps_embedding_read_as_none():
    from diffusers.models.embeddings import Timesteps

    projection = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
    rows = projection(torch.tensor([500.0, 400.0]))
    assert read_timesteps(rows * 1.1, projection) is None  # scaled: no embedding of any timestep
    mixed = rows.clone()
    mixed[1, :64] = rows[0, :64]  # two timesteps' frequencies in one row
    assert read_timesteps(mixed, projection) is None
    assert read_timesteps(rows[:, :128], projection) is None  # not the projection's width
    assert read_timesteps(torch.full_like(rows, float("nan")), projection) is None


def test_guided_units_are_calls_holding_each_latent_twice_and_pairs_of_calls():
    entries = [(4, True), (2, False), (2, False), (2, False), (4, True), (2, False)]
    # calls 1 and 2 one pair (Replayer.paired holds both); call 3 alone is not guided; 5 unpaired
    assert guided_units(entries, {1, 2}) == [(0,), (1, 2), (4,)]
    assert guided_units(entries, set()) == [(0,), (4,)]
    assert guided_units([(2, False), (2, False), (2, False), (2, False)], {0, 1, 2, 3}) == [(0, 1), (2, 3)]


def _entry(guided: dict) -> dict:
    return {"replay": {"denoiser_entry": {"calls": 10, "rows": 40, "rows_twice": 40, "guided": guided}}}


@pytest.mark.parametrize("guided, found", [
    ({"guided": 10, "timesteps_split": [3, 4], "unread": [0, None], "worst_direction": [0.0, None]},
     "each latent's two rows at one timestep"),
    ({"guided": 10, "timesteps_split": [0, None], "unread": [1, 2], "worst_direction": [0.0, None]},
     "readable"),
    ({"guided": 10, "timesteps_split": [0, None], "unread": [0, None], "worst_direction": [DIRECTION_BOUND * 2, 5]},
     "guidance's direction"),
    ({"guided": 10, "timesteps_split": [0, None], "unread": [0, None], "worst_direction": ["nan", 5]},
     "guidance's direction"),
    ({"guided": 10, "timesteps_split": [0, None], "unread": [0, None], "worst_direction": [0.1, 2],
      "exact": 10, "worst_half": [0.05, 3]}, "each half's output"),
    ({"problem": "the run's calls could not be computed again: ValueError"}, "could not be computed again"),
])
def test_stage_1_fails_a_guided_call_the_model_did_not_compute(guided, found):
    mismatches = stages.guided_mismatches(_entry(guided)["replay"]["denoiser_entry"]["guided"])
    assert len(mismatches) == 1 and found in str(mismatches[0]), mismatches


def test_stage_1_passes_guided_calls_the_model_computed():
    from pytest_diffbench.guided_calls import HALF_BOUND

    guided = {"guided": 10, "checked": 8, "cached": 2, "timesteps_split": [0, None], "unread": [0, None],
              "worst_direction": [DIRECTION_BOUND / 2, 3], "exact": 0, "worst_half": [0.0, None], "problem": None}
    assert stages.guided_mismatches(guided) == []  # every call merged tokens: the halves are not held
    guided.update(exact=4, worst_half=[HALF_BOUND / 2, 1])
    assert stages.guided_mismatches(guided) == []
    assert stages.guided_mismatches(None) == []  # not asked (L1-L3, a baseline, the GPU profiles)


@pytest.mark.parametrize("producer, module", [
    # T-GATE's caches: an attention's output, made by its output projection
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("transformer.transformer_blocks.3.attn1.to_out.0", "transformer_blocks.3.attn1.to_out.0"),
    # DeepCache's: an up block's resnet, attention or upsampler, whose output's producer is inside it
    ("unet.up_blocks.2.attentions.1.proj_out", "up_blocks.2.attentions.1"),
    ("unet.up_blocks.0.resnets.2.conv2", "up_blocks.0.resnets.2"),
    ("unet.up_blocks.1.upsamplers.0.conv", "up_blocks.1.upsamplers.0"),
    # no method caches these: a recomputation cannot put them in place
    ("unet.down_blocks.1.resnets.0.conv2", None),
    ("unet.up_blocks.1", None),
    ("transformer.proj_out", None),
])
def test_a_cache_stands_for_the_module_the_method_caches(producer, module):
    from pytest_diffbench.guided_calls import cached_module

    assert cached_module(producer) == module
