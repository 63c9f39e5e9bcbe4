"""Mamba (v1) mixer: step loop, cached prefill and chunked prefill equal the parallel forward; packing."""

import pytest
import torch

from mamba_pkg.models.mamba import Mamba
from mixer_checks import assert_packed_equals_per_sequence, assert_packed_prefill_fills_cache_rows, run_cached


def _mamba(**kw):
    kw.setdefault("d_state", 8)
    mixer = Mamba(16, layer_idx=0, **kw)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in ("in_proj.bias", "out_proj.bias", "conv1d.bias"):
                p.normal_(0, 0.1)
    return mixer


@pytest.mark.parametrize("kw", [dict(use_fast_path=False), dict(use_fast_path=False, bias=True, d_conv=3, dt_rank=5)])
@torch.no_grad()
def test_step_loop_and_chunked_prefill_equal_forward(kw):
    mixer = _mamba(**kw)
    x = torch.randn(2, 13, 16)
    full = mixer(x)
    steps, _ = run_cached(mixer, x, [1] * 13)
    assert torch.allclose(steps, full, atol=1e-5)
    chunked, params = run_cached(mixer, x, [5, 2, 4, 1, 1])
    assert torch.allclose(chunked, full, atol=1e-5)
    conv_state, ssm_state = params.key_value_memory_dict[0]
    assert conv_state.shape == (2, 32, mixer.d_conv) and ssm_state.dtype == torch.float32


@torch.no_grad()
def test_step_method_directly():
    mixer = _mamba(use_fast_path=False)
    x = torch.randn(3, 6, 16)
    conv_state, ssm_state = mixer.allocate_inference_cache(3, 6)
    outs = []
    for t in range(6):
        out, conv_state, ssm_state = mixer.step(x[:, t : t + 1], conv_state, ssm_state)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, dim=1), mixer(x), atol=1e-5)


def test_fast_path_equals_unfused_path_with_grads():
    mixer = _mamba(use_fast_path=True)
    x = torch.randn(2, 10, 16, requires_grad=True)
    out_fast = mixer(x)
    grads_fast = torch.autograd.grad(out_fast.square().sum(), [x] + list(mixer.parameters()))
    mixer.use_fast_path = False
    out_slow = mixer(x)
    grads_slow = torch.autograd.grad(out_slow.square().sum(), [x] + list(mixer.parameters()))
    assert torch.allclose(out_fast, out_slow, atol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("use_fast_path", [False, True])
def test_packed_equals_per_sequence(use_fast_path):
    assert_packed_equals_per_sequence(_mamba(use_fast_path=use_fast_path), [4, 1, 9], 16)


def test_packed_prefill_fills_cache_rows():
    # 2 < d_conv: the conv state is zero-padded
    assert_packed_prefill_fills_cache_rows(_mamba(use_fast_path=False), [2, 7], 16)


def test_parameter_names_and_shapes():
    mixer = Mamba(32, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {
        "A_log": (64, 16),
        "D": (64,),
        "in_proj.weight": (128, 32),
        "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,),
        "x_proj.weight": (2 + 32, 64),
        "dt_proj.weight": (64, 2),
        "dt_proj.bias": (64,),
        "out_proj.weight": (32, 64),
    }
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert torch.allclose(mixer.A_log.exp()[0], torch.arange(1, 17, dtype=torch.float32))


def test_bad_input():
    mixer = _mamba()
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        mixer(torch.randn(4, 16))
    with pytest.raises(ValueError, match="step takes"):
        mixer.step(torch.randn(2, 3, 16), *mixer.allocate_inference_cache(2, 3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="bogus")
