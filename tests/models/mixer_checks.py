"""Checks every sequence mixer (Mamba, Mamba2, MHA) must pass; the test files call them with their
own mixers. Imported as a plain module (tests/ is not a package)."""

import torch

from mamba_pkg.generation.cache import InferenceParams


def run_cached(mixer, x, splits):
    """Run x (B, L, d) through an inference cache in pieces of the given lengths (1 = a decode
    step); returns the outputs concatenated over L and the cache."""
    params = InferenceParams(max_seqlen=x.shape[1], max_batch_size=x.shape[0])
    outs, start = [], 0
    for n in splits:
        outs.append(mixer(x[:, start : start + n], inference_params=params))
        start += n
        params.seqlen_offset = start
    return torch.cat(outs, dim=1), params


def assert_packed_equals_per_sequence(mixer, lengths, dim, atol=1e-5):
    """Sequences of the given lengths packed in one row (cu_seqlens) give what each gives alone."""
    x = torch.randn(1, sum(lengths), dim)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = mixer(x, cu_seqlens=cu)
    for s in range(len(lengths)):
        a, b = cu[s].item(), cu[s + 1].item()
        assert torch.allclose(packed[:, a:b], mixer(x[:, a:b]), atol=atol), f"sequence {s} of lengths {lengths}"


@torch.no_grad()
def assert_packed_prefill_fills_cache_rows(mixer, lengths, dim, per_sample_lengths=False, atol=1e-5):
    """A packed prefill writes sequence s into cache row s: the next decode step of each row
    equals the last output of that sequence run alone with the new token appended.
    per_sample_lengths: the mixer reads its position from params.lengths_per_sample (attention)."""
    seqs = [torch.randn(1, n, dim) for n in lengths]
    nxt = torch.randn(len(lengths), 1, dim)
    params = InferenceParams(max_seqlen=max(lengths) + 3, max_batch_size=len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mixer(torch.cat(seqs, dim=1), inference_params=params, cu_seqlens=cu)
    params.seqlen_offset = 1
    if per_sample_lengths:
        params.lengths_per_sample = torch.tensor(lengths, dtype=torch.int32)
    out = mixer(nxt, inference_params=params)
    for b, seq in enumerate(seqs):
        alone = mixer(torch.cat([seq, nxt[b : b + 1]], dim=1))[0, -1]
        assert torch.allclose(out[b, 0], alone, atol=atol), f"cache row {b} of lengths {lengths}"
