"""The sample probe's rules (pytest_diffbench.sample_probe) on digests made by hand, and stage 1's
reading of its figures (stages.sample_mismatches). The probe on real replays: tests/test_replay.py
(a gold reads clean, red team rounds 22-23's candidates fail)."""

from __future__ import annotations

import torch

from pytest_diffbench import stages
from pytest_diffbench.sample_probe import SampleProbe, other_seed, tensor_bytes


def _replay(probe: SampleProbe, recording: bool, entries: dict, work: dict) -> None:
    """One replay's digests: `entries` {call: latents}, `work` {call: [outputs]}."""
    digests = probe.begin(recording)
    for call, latents in entries.items():
        digests.entry(call, latents)
    for call, outputs in work.items():
        position = 1000 + call  # one product per call, at a position of its own
        if recording:
            probe.work[position] = call
        digests.product(position, outputs)


def _latents(*rows: float) -> torch.Tensor:
    return torch.stack([torch.full((4, 2, 2), float(value)) for value in rows])


def test_a_guided_pair_whose_rows_and_work_follow_their_own_samples_reads_clean():
    probe = SampleProbe()
    # call 0: samples A and B, each twice; call 1: A alone, twice
    _replay(probe, True, {0: _latents(1, 2, 1, 2), 1: _latents(3, 3)}, {0: [torch.ones(3)], 1: [torch.ones(2)]})
    _replay(probe, False, {0: _latents(9, 2, 9, 2), 1: _latents(7, 7)}, {0: [torch.zeros(3)], 1: [torch.zeros(2)]})
    _replay(probe, False, {0: _latents(1, 8, 1, 8), 1: _latents(3, 3)}, {0: [torch.full((3,), 5.0)], 1: [torch.ones(2)]})
    assert probe.figures() == {"samples": 2, "calls": 2, "mixed_rows": [0, []], "hidden": [0, []]}


def test_work_that_follows_a_sample_whose_latents_did_not_enter_the_call_is_a_hidden_entry():
    """Round 22's shape: the entry holds A's latent twice; B's seed still changes the call's work."""
    probe = SampleProbe()
    _replay(probe, True, {0: _latents(1, 1), 1: _latents(2, 2)}, {-1: [torch.ones(1)], 0: [torch.ones(3)],
                                                                   1: [torch.ones(3)]})
    _replay(probe, False, {0: _latents(5, 5), 1: _latents(6, 6)}, {-1: [torch.ones(1)], 0: [torch.zeros(3)],
                                                                    1: [torch.zeros(3)]})  # A's: entered
    _replay(probe, False, {0: _latents(1, 1), 1: _latents(2, 2)}, {-1: [torch.ones(1)], 0: [torch.ones(3)],
                                                                    1: [torch.zeros(3)]})  # B's: call 1
    assert probe.figures()["hidden"] == [1, [[1, 1]]]
    # work before the first entry (-1) that follows a sample is hidden too: no latents entered yet
    probe = SampleProbe()
    _replay(probe, True, {0: _latents(1, 1)}, {-1: [torch.ones(1)], 0: [torch.ones(1)]})
    _replay(probe, False, {0: _latents(2, 2)}, {-1: [torch.zeros(1)], 0: [torch.zeros(1)]})
    assert probe.figures()["hidden"] == [1, [[-1, 0]]]


def test_an_entry_row_that_follows_two_samples_is_mixed():
    """An entry row holding A's latents plus a trace of B's (so that B would count as entered)."""
    probe = SampleProbe()
    _replay(probe, True, {0: _latents(1, 1)}, {0: [torch.ones(1)]})
    _replay(probe, False, {0: _latents(2, 2)}, {0: [torch.zeros(1)]})
    _replay(probe, False, {0: torch.cat([_latents(1), _latents(1) + 1e-3])}, {0: [torch.zeros(1)]})
    figures = probe.figures()
    assert figures["mixed_rows"] == [1, [[0, 1]]] and figures["hidden"] == [0, []], figures


def test_a_changed_replay_that_starts_late_reads_the_calls_before_it_as_the_judged_ones():
    """A changed replay starts at its sample's first draw (sample_probe.Resume): the calls before it
    are not digested, and computed as in the judged replay."""
    probe = SampleProbe()
    _replay(probe, True, {0: _latents(1, 1), 1: _latents(2, 2)}, {0: [torch.ones(1)], 1: [torch.ones(1)]})
    _replay(probe, False, {0: _latents(5, 5), 1: _latents(2, 2)}, {0: [torch.zeros(1)], 1: [torch.ones(1)]})
    _replay(probe, False, {1: _latents(6, 6)}, {1: [torch.zeros(1)]})  # sample 1: from call 1 on
    assert probe.figures() == {"samples": 2, "calls": 2, "mixed_rows": [0, []], "hidden": [0, []]}
    probe.changed[1].rows.pop(1)  # ... and its work there without its latents: hidden
    assert probe.figures()["hidden"] == [1, [[1, 1]]]


def test_tensor_bytes_are_the_logical_order_and_tell_one_bit_apart():
    a = torch.zeros(2, 3)
    assert bytes(tensor_bytes(a)) == bytes(tensor_bytes(a.clone()))
    b = a.clone()
    b.view(torch.int32)[1, 2] = 1  # the smallest denormal: one bit
    assert bytes(tensor_bytes(a)) != bytes(tensor_bytes(b))
    # a view's logical order, not its storage's
    c = torch.arange(6.0).reshape(2, 3)
    assert bytes(tensor_bytes(c.t())) == bytes(tensor_bytes(c.t().contiguous()))
    assert bytes(tensor_bytes(c.t())) != bytes(tensor_bytes(c))
    # a dtype numpy has not, by its bytes; a 0-dim tensor
    h = torch.ones(3, dtype=torch.bfloat16)
    assert bytes(tensor_bytes(h)) == bytes(h.view(torch.int16).numpy())
    assert bytes(tensor_bytes(torch.tensor(2.5))) == bytes(torch.tensor([2.5]).numpy())


def test_the_digests_are_keyed_per_probe():
    """A trace cannot be built to cancel a change in the digest: its key is drawn per probe."""
    first, second = SampleProbe(), SampleProbe()
    assert first.key != second.key
    rows = _latents(1, 2)
    assert first.begin(True) is not None and second.begin(True) is not None
    first.base.entry(0, rows)
    second.base.entry(0, rows)
    assert first.base.rows[0] != second.base.rows[0]


def test_other_seed_is_none_of_the_batch_seeds():
    seeds = [5, 7, 11]
    changed = [other_seed(seeds, i) for i in range(3)]
    assert all(0 < s < 2**31 and s not in seeds for s in changed), changed
    assert changed == [other_seed(seeds, i) for i in range(3)]  # the same for the same seeds


def test_a_changed_replay_before_the_judged_one_is_refused():
    probe = SampleProbe()
    try:
        probe.begin(recording=False)
    except ValueError as exc:
        assert "judged one" in str(exc)
    else:
        raise AssertionError("a changed replay without positions was accepted")


def test_stage_one_reads_mixed_rows_and_hidden_entries():
    assert stages.sample_mismatches(None, 12) == []
    assert stages.sample_mismatches({"samples": 2, "calls": 12, "mixed_rows": [0, []], "hidden": [0, []]}, 12) == []
    found = stages.sample_mismatches({"samples": 2, "calls": 12, "mixed_rows": [3, [[4, 1]]],
                                      "hidden": [8, [[4, 1], [5, 1]]]}, 12)
    assert len(found) == 2
    assert "one sample per row" in found[0].expected and "[[4, 1]]" in str(found[0].found)
    assert "hidden entry" in str(found[1].found) and "8 (call, sample) pairs of 12 calls" in str(found[1].found)


def test_a_changed_state_is_the_judged_one_only_bit_for_bit_and_storage_by_storage():
    """sample_probe.same_state, where a changed replay stops: every live value's whole storage (a
    later as_strided on a live view reaches the rest of it), bit for bit, and the generators a later
    draw continues."""
    from pytest_diffbench.sample_probe import Resume, same_state, snapshot_env

    base = torch.arange(8.0)
    env = {1: base[:4], 2: 3}
    resume = Resume(10, snapshot_env(env, set()), {0: torch.Generator().manual_seed(1)}, {})
    mine = {0: torch.Generator().manual_seed(1)}
    assert same_state(env, mine, resume, read={0})
    assert not same_state(env, {0: torch.Generator().manual_seed(2)}, resume, read={0})
    assert same_state(env, {0: torch.Generator().manual_seed(2)}, resume, read=set())  # reseeded later
    hidden = base.clone()
    hidden[6] = 99.0  # outside the live view
    assert not same_state({1: hidden[:4], 2: 3}, mine, resume, read={0})
    signed = base.clone()
    signed[0] = -0.0  # equal in value, not in bits
    assert not same_state({1: signed[:4], 2: 3}, mine, resume, read={0})
    assert not same_state({1: base[:4]}, mine, resume, read={0})  # another set of live values
    # the snapshot keeps aliasing: two views of one storage stay views of one copy
    shared = torch.zeros(4)
    copy = snapshot_env({1: shared[:2], 2: shared[1:]}, set())
    copy[1][1] = 5.0
    assert float(copy[2][0]) == 5.0 and float(shared[1]) == 0.0
