import pytest
import torch

from mamba_pkg.ops.causal_conv1d import causal_conv1d_update_ref
from mamba_pkg.ops.conv_xproj_step import BLOCK_D, conv_xproj_step, conv_xproj_step_ref
from mamba_pkg.ops.ssm_decode_step import ssm_decode_step, ssm_decode_step_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(batch, dim, width, state_len, n_out, dtype=torch.float32, device=DEVICE):
    xz = torch.randn(batch, 2 * dim, device=device, dtype=dtype)
    return dict(
        x=xz[:, :dim],  # a strided view, as Mamba.step passes it
        conv_state=torch.randn(batch, dim, state_len, device=device, dtype=dtype),
        weight=torch.randn(dim, width, device=device, dtype=dtype),
        bias=torch.randn(dim, device=device, dtype=dtype),
        x_proj_weight=torch.randn(n_out, dim, device=device, dtype=dtype),
    )


def test_ref_is_conv_update_then_split_x_proj():
    kw = inputs(2, BLOCK_D + 5, 4, 5, 7, device="cpu")
    state = kw["conv_state"].clone()
    xc, parts = conv_xproj_step_ref(**kw, activation="silu")
    exp_xc = causal_conv1d_update_ref(kw["x"], state, kw["weight"], kw["bias"], "silu")
    torch.testing.assert_close(xc, exp_xc)
    torch.testing.assert_close(kw["conv_state"], state)
    assert parts.shape == (2, 2, 7) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(0), xc @ kw["x_proj_weight"].t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[1], xc[:, BLOCK_D:] @ kw["x_proj_weight"][:, BLOCK_D:].t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,width,state_len,silu", [(torch.float32, 4, 4, True), (torch.bfloat16, 3, 5, False)])
def test_triton_matches_ref(dtype, width, state_len, silu):
    kw = inputs(3, BLOCK_D + 3, width, state_len, 300, dtype)  # 300 outputs: two unrolled output blocks
    state_ref = kw["conv_state"].clone()
    act = "silu" if silu else None
    xc, parts = conv_xproj_step(**kw, activation=act, backend="triton")
    exp_xc, exp_parts = conv_xproj_step_ref(**dict(kw, conv_state=state_ref), activation=act)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kw["conv_state"], state_ref)  # a shift and a copy: exact
    torch.testing.assert_close(xc.float(), exp_xc.float(), rtol=tol, atol=tol)
    # parts come from the kernel's own (rounded) xc: compare them against that.
    torch.testing.assert_close(parts.sum(0), xc.float() @ kw["x_proj_weight"].float().t(), rtol=1e-4, atol=1e-3)
    if dtype == torch.float32:
        torch.testing.assert_close(parts, exp_parts, rtol=1e-4, atol=1e-4)


def test_feeds_ssm_decode_step_with_split_sum():
    """The Mamba-1 step chain: conv_xproj_step -> ssm_decode_step(split_sum=True) equals the
    reference chain with the x_proj summed first."""
    batch, dim, n, rank = 2, BLOCK_D + 2, 4, 3
    kw = inputs(batch, dim, 4, 4, rank + 2 * n)
    xc, parts = conv_xproj_step(**kw, activation="silu", backend="triton")
    dt, B, C = torch.split(parts, [rank, n, n], dim=-1)
    ssm = dict(A_log=torch.randn(dim, n, device=DEVICE), D=torch.randn(dim, device=DEVICE),
               z=torch.randn(batch, dim, device=DEVICE), dt_bias=torch.randn(dim, device=DEVICE),
               dt_proj_weight=torch.randn(dim, rank, device=DEVICE))
    state = torch.randn(batch, dim, n, device=DEVICE)
    state_ref = state.clone()
    out = ssm_decode_step(state, xc, dt, B=B, C=C, split_sum=True, backend="triton", **ssm)
    x_dbl = parts.sum(0)
    exp = ssm_decode_step_ref(state_ref, xc, x_dbl[:, :rank], B=x_dbl[:, rank:rank + n], C=x_dbl[:, rank + n:], **ssm)
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, state_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="split axis first"):
        ssm_decode_step(state, xc, dt[:1], B=B, C=C, split_sum=True, **ssm)


def test_errors():
    kw = inputs(2, 6, 4, 4, 5, device="cpu")
    with pytest.raises(ValueError, match="activation"):
        conv_xproj_step(**kw, activation="relu")
    with pytest.raises(ValueError, match="conv_state must have shape"):
        conv_xproj_step(**dict(kw, conv_state=torch.zeros(2, 5, 4)))
    with pytest.raises(ValueError, match="S >= W-1"):
        conv_xproj_step(**dict(kw, conv_state=torch.zeros(2, 6, 2)))
    with pytest.raises(ValueError, match="W in 2..8"):
        conv_xproj_step(**dict(kw, weight=torch.zeros(6, 9), conv_state=torch.zeros(2, 6, 9)))
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):
        conv_xproj_step(**dict(kw, x_proj_weight=torch.zeros(5, 7)))
    with pytest.raises(ValueError, match="bias must have shape"):
        conv_xproj_step(**dict(kw, bias=torch.zeros(5)))
    with pytest.raises(TypeError, match="x must have dtype"):
        conv_xproj_step(**dict(kw, x=torch.zeros(2, 6, dtype=torch.int32)))
    with pytest.raises(ValueError, match="x_proj_weight is on meta"):
        conv_xproj_step(**dict(kw, x_proj_weight=kw["x_proj_weight"].to("meta")))


def test_custom_ops_opcheck():
    """The launchers are torch.ops.mamba_pkg custom ops whose fake impls match the real ones."""
    kw = inputs(2, 6, 4, 4, 5)
    torch.library.opcheck(torch.ops.mamba_pkg.conv_xproj_step,
                          (kw["x"], kw["conv_state"], kw["weight"], kw["bias"], kw["x_proj_weight"], True))
    state = torch.randn(2, 6, 3, device=DEVICE)
    args = (state, torch.randn(2, 6, device=DEVICE), torch.randn(2, 2, device=DEVICE), torch.randn(6, 3, device=DEVICE),
            torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE), None, None, None,
            torch.randn(6, 2, device=DEVICE), [0.0, float("inf")], False)
    torch.library.opcheck(torch.ops.mamba_pkg.ssm_decode_step, args)


@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_full_size(batch):
    kw = inputs(batch, 4096, 4, 4, 160, torch.bfloat16)
    state_ref = kw["conv_state"].clone()
    xc, parts = conv_xproj_step(**kw, activation="silu")
    exp_xc, _ = conv_xproj_step_ref(**dict(kw, conv_state=state_ref), activation="silu")
    torch.testing.assert_close(kw["conv_state"], state_ref)
    torch.testing.assert_close(xc.float(), exp_xc.float(), rtol=2e-2, atol=2e-2)
    exp = xc.float() @ kw["x_proj_weight"].float().t()
    torch.testing.assert_close(parts.sum(0), exp, rtol=1e-3, atol=1e-2 * exp.abs().max().item())
