"""Sampling filters: semantics, batch safety (each row its own filter), errors."""

import pytest
import torch

from mamba_pkg.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)


def _kept(x):
    return torch.isfinite(x)


def test_top_k_keeps_k_largest():
    logits = torch.randn(5, 37)
    out = top_k_filter(logits, 4)
    assert (_kept(out).sum(-1) == 4).all()
    top = logits.topk(4, dim=-1).indices
    assert _kept(out).gather(1, top).all()
    assert torch.equal(out[_kept(out)], logits[_kept(out)])


def test_top_k_zero_and_large_keep_all():
    logits = torch.randn(3, 11)
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)


def test_top_p_semantics():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # mass before token i: 0, .5, .8, .95 -> top_p=0.75 keeps the first two, 0.85 the first three
    assert _kept(top_p_filter(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert _kept(top_p_filter(logits, 0.85)).tolist() == [[True, True, True, False]]
    assert _kept(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 0.0), logits)  # disabled
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_min_p_semantics():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log() + 3.0  # shift: only ratios matter
    assert _kept(min_p_filter(logits, 0.5)).tolist() == [[True, True, False, False]]
    assert _kept(min_p_filter(logits, 0.2)).tolist() == [[True, True, True, False]]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_temperature_scales_and_zero_is_identity():
    logits = torch.randn(2, 9)
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    assert torch.equal(apply_temperature(logits, 0.0), logits)


def test_repetition_penalty_ctrl_rule_and_mask():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    prev = torch.tensor([[0, 1, 1], [0, 1, 2]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)  # row 1: token 0 is padding
    out = apply_repetition_penalty(logits, prev, 2.0, mask)
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5]
    assert out[1].tolist() == [2.0, -4.0, 0.5, 0.5]
    assert torch.equal(apply_repetition_penalty(logits, prev, 1.0), logits)


@pytest.mark.parametrize("name", ["top_k", "top_p", "min_p", "temperature"])
def test_filters_are_row_independent_and_per_row(name):
    """Row i of a batched call with per-row knobs equals a one-row call with row i's knob."""
    logits = torch.randn(4, 50)
    fn, values = {
        "top_k": (top_k_filter, [1, 3, 0, 7]),
        "top_p": (top_p_filter, [0.1, 0.5, 0.0, 0.9]),
        "min_p": (min_p_filter, [0.05, 0.3, 0.0, 0.9]),
        "temperature": (apply_temperature, [0.5, 1.0, 0.0, 2.0]),
    }[name]
    knob = torch.tensor(values)
    batched = fn(logits, knob)
    for i, v in enumerate(values):
        assert torch.equal(batched[i : i + 1], fn(logits[i : i + 1], v)), f"row {i}"


def test_sample_greedy_and_per_row_greedy():
    logits = torch.randn(6, 40)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, top_k=5, temperature=0.0), logits.argmax(-1))
    g = torch.Generator().manual_seed(1)
    out = sample(logits, top_k=torch.tensor([1, 0, 1, 0, 1, 0]), generator=g)
    assert torch.equal(out[0::2], logits.argmax(-1)[0::2])


def test_sample_respects_filters_and_generator():
    logits = torch.randn(3, 100)
    allowed = _kept(process_logits(logits, top_k=5, top_p=0.8, min_p=0.1, temperature=0.7))
    draws = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        ids = sample(logits, top_k=5, top_p=0.8, min_p=0.1, temperature=0.7, generator=g)
        assert allowed.gather(1, ids[:, None]).all()
        draws.append(ids)
    again = sample(logits, top_k=5, top_p=0.8, min_p=0.1, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, draws[3])


def test_sampling_distribution_matches_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([sample(logits.expand(2000, 4), top_k=0, generator=g) for _ in range(5)]).flatten()
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.02)


def test_bad_inputs():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="logits"):
        top_k_filter(torch.randn(10), 3)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, -1)
    with pytest.raises(ValueError, match="min_p"):
        min_p_filter(logits, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, -1.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(logits, torch.zeros(2, 1, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="prev_ids"):
        apply_repetition_penalty(logits, torch.full((2, 1), 10), 1.2)
    with pytest.raises(TypeError, match="top_p"):
        top_p_filter(logits, "0.5")
