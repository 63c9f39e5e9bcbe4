"""Block: add -> norm -> mixer (-> add -> norm2 -> mlp), fused and unfused add+norm, cached steps."""

from functools import partial

import pytest
import torch
import torch.nn as nn

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.models.attention import MHA
from mamba_pkg.models import _cache_utils
from mamba_pkg.models import block as block_module
from mamba_pkg.models.block import Block
from mamba_pkg.models.mamba import Mamba
from mamba_pkg.models.mamba2 import Mamba2
from mamba_pkg.models.mlp import GatedMLP
from mamba_pkg.models.norm import RMSNorm

MIXERS = {
    "mamba2": partial(Mamba2, d_state=8, headdim=8, chunk_size=8, layer_idx=0),
    "mha": partial(MHA, num_heads=4, num_heads_kv=2, rotary_emb_dim=4, d_conv=3, layer_idx=0),
}


def _block(mixer, *, mlp=True, rms=True, fused=True, residual_in_fp32=True):
    norm_cls = partial(RMSNorm if rms else nn.LayerNorm, eps=1e-5)
    mlp_cls = partial(GatedMLP, hidden_features=40, multiple_of=8) if mlp else nn.Identity
    return Block(32, MIXERS[mixer], mlp_cls, norm_cls=norm_cls, fused_add_norm=fused, residual_in_fp32=residual_in_fp32)


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("rms", [True, False])
def test_fused_equals_unfused_equals_formula(mixer, rms):
    block = _block(mixer, rms=rms)
    with torch.no_grad():
        block.norm.weight.add_(torch.randn(32) * 0.1)
        block.norm2.weight.add_(torch.randn(32) * 0.1)
    x, res = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    hidden, residual = block(x, res)
    block.fused_add_norm = False
    hidden2, residual2 = block(x, res)
    assert torch.allclose(hidden, hidden2, atol=1e-5) and torch.allclose(residual, residual2, atol=1e-6)
    # the formula, written out
    r1 = x + res
    h1 = block.mixer(block.norm(r1))
    r2 = h1 + r1
    assert torch.allclose(residual, r2, atol=1e-5)
    assert torch.allclose(hidden, block.mlp(block.norm2(r2)), atol=1e-5)


def test_first_block_and_residual_dtype():
    block = _block("mha", mlp=False).to(torch.bfloat16)
    x = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    hidden, residual = block(x)  # no residual: the first block
    assert block.mlp is None and not hasattr(block, "norm2")
    assert hidden.dtype == torch.bfloat16 and residual.dtype == torch.float32
    assert torch.equal(residual, x.float())


@pytest.mark.parametrize("mixer", list(MIXERS))
@torch.no_grad()
def test_cached_steps_equal_forward(mixer):
    block = _block(mixer)
    x, res = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    hidden, residual = block(x, res)
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    outs = [block(x[:, :4], res[:, :4], inference_params=params)]
    for t in range(4, 9):
        params.seqlen_offset = t
        outs.append(block(x[:, t : t + 1], res[:, t : t + 1], inference_params=params))
    assert torch.allclose(torch.cat([o[0] for o in outs], dim=1), hidden, atol=1e-5)
    assert torch.allclose(torch.cat([o[1] for o in outs], dim=1), residual, atol=1e-5)
    cache = block.allocate_inference_cache(3, 10)
    assert cache[0].shape[:2] == (3, 10) if mixer == "mha" else cache[1].shape[0] == 3


def _steps_equal_forward(block, x, res, prefill):
    """As the first block (no residual) and a later one: a prefill of ``prefill`` tokens then one-token
    steps equal the full forward (hidden states and fp32 residuals); returns the last cache."""
    batch, seqlen, _ = x.shape
    for residual in (None, res):
        hidden, residual_out = block(x, residual)
        params = InferenceParams(max_seqlen=seqlen, max_batch_size=batch)
        outs = [block(x[:, :prefill], None if residual is None else residual[:, :prefill], inference_params=params)]
        for t in range(prefill, seqlen):
            params.seqlen_offset = t
            outs.append(block(x[:, t : t + 1], None if residual is None else residual[:, t : t + 1],
                              inference_params=params))
        assert torch.allclose(torch.cat([o[0] for o in outs], dim=1), hidden, atol=1e-5)
        assert torch.allclose(torch.cat([o[1] for o in outs], dim=1), residual_out, atol=1e-6)
        assert outs[-1][1].dtype == torch.float32  # residual_in_fp32
    return params


@pytest.mark.parametrize("mixer", [partial(Mamba, d_state=4, layer_idx=0), MIXERS["mamba2"]])
@torch.no_grad()
def test_fused_norm_in_proj_step_equals_forward(mixer, monkeypatch):
    """A decode step of batch <= STEP_LINEAR_MAX_ROWS runs add + RMSNorm + in_proj as one op
    (counted), first block (no residual) and later ones; steps equal the full forward."""
    torch.manual_seed(0)
    block = Block(32, mixer, nn.Identity, norm_cls=partial(RMSNorm, eps=1e-5), fused_add_norm=True,
                  residual_in_fp32=True)
    block.norm.weight.add_(torch.randn(32) * 0.1)
    calls = []
    fused = block_module.add_rms_norm_linear
    monkeypatch.setattr(block_module, "add_rms_norm_linear", lambda *a: calls.append(1) or fused(*a))
    x, res = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    params = _steps_equal_forward(block, x, res, prefill=3)
    assert len(calls) == 6
    monkeypatch.setattr(_cache_utils, "STEP_LINEAR_MAX_ROWS", 1)
    params.seqlen_offset = 6
    block(x[:, :1], res[:, :1], inference_params=params)
    assert len(calls) == 6  # batch 2 > 1 row: the unfused path


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_step_norm_rows_equals_forward(backend, monkeypatch):
    """A decode step of more than STEP_LINEAR_MAX_ROWS rows runs the add + RMSNorm as
    decode_linear.add_rms_norm_rows (counted; the Triton row kernel through the interpreter on CPU),
    first block and later ones; steps equal the full forward, and the add_norm path (switch off)."""
    monkeypatch.setenv("MAMBA_PKG_BACKEND", backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    block = Block(32, partial(Mamba, d_state=4, layer_idx=0), nn.Identity, norm_cls=partial(RMSNorm, eps=1e-5),
                  fused_add_norm=True, residual_in_fp32=True).to(device)
    block.norm.weight.add_(torch.randn(32, device=device) * 0.1)
    calls = []
    rows = block_module.add_rms_norm_rows
    monkeypatch.setattr(block_module, "add_rms_norm_rows", lambda *a: calls.append(1) or rows(*a))
    x, res = torch.randn(4, 5, 32, device=device), torch.randn(4, 5, 32, device=device)
    params = _steps_equal_forward(block, x, res, prefill=3)
    assert len(calls) == 4
    saved = [t.clone() for t in params.key_value_memory_dict[0]]  # the step updates the caches in place
    step = block(x[:, 4:5], res[:, 4:5], inference_params=params)
    for t, s in zip(params.key_value_memory_dict[0], saved):
        t.copy_(s)
    monkeypatch.setattr(_cache_utils, "STEP_NORM_ROWS", False)
    unfused = block(x[:, 4:5], res[:, 4:5], inference_params=params)
    assert len(calls) == 5
    assert torch.allclose(step[0], unfused[0], atol=1e-5) and torch.equal(step[1], unfused[1])


def test_packed_goes_to_mixer():
    block = _block("mha")
    x = torch.randn(1, 8, 32)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    hidden, _ = block(x, cu_seqlens=cu)
    assert torch.allclose(hidden[:, 3:], block(x[:, 3:])[0], atol=1e-5)


def test_fused_needs_a_known_norm():
    with pytest.raises(TypeError, match="fused_add_norm"):
        Block(32, MIXERS["mha"], nn.Identity, norm_cls=nn.Identity, fused_add_norm=True)
