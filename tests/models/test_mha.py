"""MHA: step loop and cached prefill equal the parallel forward; GQA, rotary, conv, mlp_dim, packing."""

import pytest
import torch

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.models.attention import MHA, apply_rotary, rotary_cos_sin
from mamba_pkg.ops.attention import attention_ref
from mixer_checks import assert_packed_equals_per_sequence, assert_packed_prefill_fills_cache_rows

CONFIGS = [
    dict(num_heads=4),
    dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=8),
    dict(num_heads=4, num_heads_kv=1, rotary_emb_dim=6, rotary_emb_interleaved=True, d_conv=4),
    dict(num_heads=2, head_dim=12, mlp_dim=40, d_conv=3, qkv_proj_bias=False, out_proj_bias=False),
]


def _mha(cfg, dim=32):
    mha = MHA(dim, layer_idx=0, **cfg)
    with torch.no_grad():  # non-zero biases so that they are exercised
        for name, p in mha.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return mha


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_loop_equals_forward(cfg):
    mha = _mha(cfg)
    x = torch.randn(2, 11, 32)
    full = mha(x)
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    outs = [mha(x[:, :4], inference_params=params)]
    params.seqlen_offset = 4
    for t in range(4, 11):
        outs.append(mha(x[:, t : t + 1], inference_params=params))
        params.seqlen_offset += 1
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS[1:3])
def test_chunked_prefill_and_step_method(cfg):
    """Prefill in two chunks (offset > 0 with L > 1), then decode through MHA.step."""
    mha = _mha(cfg)
    x = torch.randn(2, 12, 32)
    full = mha(x)
    params = InferenceParams(max_seqlen=12, max_batch_size=2)
    first = mha(x[:, :3], inference_params=params)
    params.seqlen_offset = 3
    second = mha(x[:, 3:9], inference_params=params)
    kv_cache, conv_state = params.key_value_memory_dict[0]
    steps = []
    for t in range(9, 12):
        out, kv_cache, conv_state = mha.step(x[:, t : t + 1], kv_cache, conv_state, t)
        steps.append(out)
    assert torch.allclose(torch.cat([first, second] + steps, dim=1), full, atol=1e-5)


def test_lengths_per_sample():
    """Rows at different positions (lengths_per_sample) each decode exactly as alone."""
    mha = _mha(CONFIGS[1])
    x = torch.randn(2, 9, 32)
    lengths = [5, 8]
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    params.key_value_memory_dict[0] = mha.allocate_inference_cache(2, 10)
    for b, n in enumerate(lengths):
        alone = InferenceParams(max_seqlen=10, max_batch_size=1)
        alone.key_value_memory_dict[0] = tuple(None if t is None else t[b : b + 1] for t in params.key_value_memory_dict[0])
        mha(x[b : b + 1, :n], inference_params=alone)
    params.seqlen_offset = 1
    params.lengths_per_sample = torch.tensor(lengths, dtype=torch.int32)
    new = torch.stack([x[b, n] for b, n in enumerate(lengths)])[:, None]
    out = mha(new, inference_params=params)
    for b, n in enumerate(lengths):
        assert torch.allclose(out[b, 0], mha(x[b : b + 1, : n + 1])[0, -1], atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_packed_equals_per_sequence(cfg):
    assert_packed_equals_per_sequence(_mha(cfg), [5, 1, 8], 32)


def test_packed_prefill_fills_cache_rows():
    assert_packed_prefill_fills_cache_rows(_mha(CONFIGS[2]), [4, 7], 32, per_sample_lengths=True)


def test_matches_explicit_attention():
    """GQA + rotary forward equals in_proj -> rotate -> reference attention -> out_proj written out."""
    mha = _mha(dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=8))
    x = torch.randn(2, 6, 32)
    qkv = mha.in_proj(x)
    q, k, v = qkv.split([32, 16, 16], dim=-1)
    q, k, v = q.view(2, 6, 4, 8), k.view(2, 6, 2, 8), v.view(2, 6, 2, 8)
    cos, sin = rotary_cos_sin(torch.arange(6), mha.rotary_emb.inv_freq)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    ref = mha.out_proj(attention_ref(q, k, v).reshape(2, 6, 32))
    assert torch.allclose(mha(x), ref, atol=1e-5)


def test_rotary_is_a_rotation():
    """Rotary keeps norms and makes q.k depend only on the position difference."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    for interleaved in (False, True):
        def rot(x, pos, interleaved=interleaved):
            cos, sin = rotary_cos_sin(torch.tensor([pos]), inv_freq)
            return apply_rotary(x, cos, sin, interleaved)

        assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)
        d1 = (rot(q, 7) * rot(k, 3)).sum()
        d2 = (rot(q, 12) * rot(k, 8)).sum()
        assert torch.allclose(d1, d2, atol=1e-4)


def test_parameter_names_and_shapes():
    mha = MHA(64, num_heads=8, num_heads_kv=2, d_conv=4, mlp_dim=100, rotary_emb_dim=8)
    shapes = {k: tuple(v.shape) for k, v in mha.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (8 * 8 + 2 * 2 * 8 + 256, 64),
        "in_proj.bias": (8 * 8 + 2 * 2 * 8 + 256,),
        "conv1d.weight": (96, 1, 4),
        "conv1d.bias": (96,),
        "out_proj.weight": (64, 64 + 128),
        "out_proj.bias": (64,),
    }


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MHA(30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_heads_kv"):
        MHA(32, num_heads=4, num_heads_kv=3)
    with pytest.raises(ValueError, match="rotary_emb_dim must be even"):
        MHA(32, num_heads=4, rotary_emb_dim=3)
    mha = MHA(32, num_heads=4)
    with pytest.raises(ValueError, match="layer_idx"):
        mha(torch.randn(1, 3, 32), inference_params=InferenceParams(max_seqlen=4, max_batch_size=1))
