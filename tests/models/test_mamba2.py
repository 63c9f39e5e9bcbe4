"""Mamba2 mixer: step loop, cached and chunked prefill equal the parallel forward; packing; variants."""

import pytest
import torch

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.models.mamba2 import Mamba2
from mixer_checks import assert_packed_equals_per_sequence, assert_packed_prefill_fills_cache_rows, run_cached

VARIANTS = [
    dict(),
    dict(ngroups=2, D_has_hdim=True, norm_before_gate=True),
    dict(rmsnorm=False, bias=True, d_conv=3),
    dict(d_ssm=32, dt_limit=(0.01, 0.05), ngroups=2),
]


def _mamba2(**kw):
    kw.setdefault("d_state", 8)
    kw.setdefault("headdim", 8)
    kw.setdefault("chunk_size", 4)
    mixer = Mamba2(24, layer_idx=0, **kw)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in ("in_proj.bias", "out_proj.bias", "conv1d.bias", "norm.weight", "D"):
                p.add_(torch.randn_like(p) * 0.1)
    return mixer


@pytest.mark.parametrize("kw", VARIANTS)
@torch.no_grad()
def test_step_loop_and_chunked_prefill_equal_forward(kw):
    mixer = _mamba2(**kw)
    x = torch.randn(2, 11, 24)
    full = mixer(x)
    mixer.use_mem_eff_path = False
    assert torch.allclose(mixer(x), full, atol=1e-5)
    steps, params = run_cached(mixer, x, [1] * 11)
    assert torch.allclose(steps, full, atol=1e-5)
    chunked, _ = run_cached(mixer, x, [6, 1, 3, 1])
    assert torch.allclose(chunked, full, atol=1e-5)
    ssm_state = params.key_value_memory_dict[0][1]
    assert ssm_state.shape == (2, mixer.nheads, 8, 8) and ssm_state.dtype == torch.float32


@pytest.mark.parametrize("use_mem_eff_path", [True, False])
def test_packed_equals_per_sequence(use_mem_eff_path):
    assert_packed_equals_per_sequence(_mamba2(use_mem_eff_path=use_mem_eff_path), [6, 1, 5], 24)


def test_packed_prefill_fills_cache_rows():
    assert_packed_prefill_fills_cache_rows(_mamba2(), [5, 2], 24)


def test_grads_flow_to_every_parameter():
    mixer = _mamba2(ngroups=2)
    x = torch.randn(2, 9, 24, requires_grad=True)
    mixer(x).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_parameter_names_and_shapes():
    mixer = Mamba2(64, d_state=16, headdim=32, ngroups=2, d_conv=4)  # d_inner 128, 4 heads
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {
        "dt_bias": (4,),
        "A_log": (4,),
        "D": (4,),
        "in_proj.weight": (2 * 128 + 2 * 2 * 16 + 4, 64),
        "conv1d.weight": (128 + 64, 1, 4),
        "conv1d.bias": (128 + 64,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    assert mixer.norm.group_size == 64 and not mixer.norm.norm_before_gate
    A = mixer.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by headdim"):
        Mamba2(24, headdim=10)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(24, headdim=8, ngroups=4)  # 6 heads
    with pytest.raises(ValueError, match="u must have shape"):
        _mamba2()(torch.randn(5, 24))


@pytest.mark.parametrize("use_mem_eff_path", [True, False])
def test_seq_idx_rows_equal_per_sequence(use_mem_eff_path):
    """mamba_ssm's seq_idx: two rows, each holding differently split sequences."""
    mixer = _mamba2(use_mem_eff_path=use_mem_eff_path)
    x = torch.randn(2, 9, 24)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.int32)
    out = mixer(x, seq_idx=seq_idx)
    for row, split in ((0, 3), (1, 7)):
        assert torch.allclose(out[row : row + 1, :split], mixer(x[row : row + 1, :split]), atol=1e-5)
        assert torch.allclose(out[row : row + 1, split:], mixer(x[row : row + 1, split:]), atol=1e-5)
    with pytest.raises(ValueError, match="seq_idx cannot be combined"):
        mixer(x, InferenceParams(max_seqlen=9, max_batch_size=2), seq_idx=seq_idx)
