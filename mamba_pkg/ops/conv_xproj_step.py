"""One decode step of Mamba-1's causal conv fused with its x_proj: one launch instead of the
conv update, the x_proj GEMM and cuBLAS's split-K reduction (three launches per layer and
token at small batch, where a decode step is launch-bound; benchmarks/notes_decode.md).

    xc[b, d]        = act(bias[d] + sum_k weight[d, k] * window[b, d, k])    window = last W-1 inputs, then x
    parts[s, b, j]  = sum_{d in block s} x_proj_weight[j, d] * xc[b, d]      blocks of BLOCK_D channels

x (B, D) new inputs; conv_state (B, D, S_len) the last S_len inputs, oldest first (updated in
place, as causal_conv1d_update); weight (D, W); bias (D,); x_proj_weight (J, D).
Returns xc (B, D) in x's dtype and parts (S, B, J) fp32, S = ceil(D / BLOCK_D): the x_proj
output is parts.sum(0), a split-K sum left to the consumer (ssm_decode_step(split_sum=True)
adds the S partial rows while it loads them), so no program waits for another.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamba_pkg.ops._launch import Plan, settings_cache
from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_same_device,
    check_tensor,
    next_pow2,
    ptx_math,
    ptx_sigmoid,
    resolve_backend,
    tl,
    triton,
)
from mamba_pkg.ops.causal_conv1d import causal_conv1d_update_ref
from mamba_pkg.ops.decode_linear import layout_key, pdl_launch, use_pdl

# Channels per split: also the partition the reference uses. 64 gives 24 / 64 programs at
# mamba-130m / -1.4b; with the SSM kernel adding the partials it beat 128 and 256 on an H100
# (conv_xproj + ssm_decode_step at batch 1: 5.3 / 6.7 us vs 5.8 / 7.8 us; sweep_decode "pair").
BLOCK_D = 64
# x_proj outputs per step of the (unrolled) output loop: the weight tile is BLOCK_J x BLOCK_D.
MAX_TILE = 16384
# Launch plans of _conv_xproj_step (_launch.settings_cache: dropped when a switch above is set).
_PLANS = settings_cache(__name__)


def conv_xproj_step_ref(x, conv_state, weight, bias, x_proj_weight, activation=None):
    """Torch reference of :func:`conv_xproj_step` (fp32 math; updates ``conv_state`` in place)."""
    xc = causal_conv1d_update_ref(x, conv_state, weight, bias, activation)  # (B, D), rounded to x's dtype
    batch, dim = x.shape
    splits = -(-dim // BLOCK_D)
    pad = splits * BLOCK_D - dim
    xs = torch.nn.functional.pad(xc.float(), (0, pad)).view(batch, splits, BLOCK_D)
    ws = torch.nn.functional.pad(x_proj_weight.float(), (0, pad)).view(-1, splits, BLOCK_D)
    return xc, torch.einsum("bsd,jsd->sbj", xs, ws)


@triton.jit
def _conv_xproj_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, wx_ptr, out_ptr, parts_ptr,
    D, S_LEN, J,
    stride_x_b, stride_x_d,
    stride_s_b, stride_s_d, stride_s_s,
    stride_w_d, stride_w_k,
    stride_wx_j, stride_wx_d,
    stride_o_b, stride_o_d,
    stride_p_s, stride_p_b, stride_p_j,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, N_J: tl.constexpr,
    USE_PDL: tl.constexpr, PTX: tl.constexpr,
):
    i_s, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_s * BLOCK_D + tl.arange(0, BLOCK_D)
    o_s = tl.arange(0, BLOCK_S)
    m_d, m_s = o_d < D, o_s < S_LEN
    m_ds = m_d[:, None] & m_s[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()

    # Weights first: with PDL their loads are in flight while the previous kernel finishes.
    o_k = o_s - (S_LEN - (W - 1))
    m_k = m_ds & (o_k[None, :] >= 0)
    b_w = tl.load(w_ptr + o_d[:, None] * stride_w_d + o_k[None, :] * stride_w_k, mask=m_k, other=0.0).to(tl.float32)
    b_w_new = tl.load(w_ptr + o_d * stride_w_d + (W - 1) * stride_w_k, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    o_j0 = tl.arange(0, BLOCK_J)
    b_wx0 = tl.load(wx_ptr + o_j0[:, None] * stride_wx_j + o_d[None, :] * stride_wx_d,
                    mask=(o_j0 < J)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()

    # Conv: slot s of the state holds input (s - S_LEN) relative to the new one; the window
    # uses its last W-1 slots (tap k = s - (S_LEN - (W-1))) and the new input (tap W-1).
    p_state = state_ptr + i_b * stride_s_b + o_d[:, None] * stride_s_d + o_s[None, :] * stride_s_s
    b_state = tl.load(p_state, mask=m_ds, other=0.0).to(tl.float32)
    b_x = tl.load(x_ptr + i_b * stride_x_b + o_d * stride_x_d, mask=m_d, other=0.0)
    b_acc = tl.sum(b_state * b_w, axis=1) + b_w_new * b_x.to(tl.float32)
    if HAS_BIAS:
        b_acc += b_bias
    if SILU:
        b_acc = b_acc * ptx_sigmoid(b_acc, PTX)
    b_xc = b_acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i_b * stride_o_b + o_d * stride_o_d, b_xc, mask=m_d)

    # Shift the state by one input: slot s takes slot s + 1, the last slot the new input.
    # Only this program reads or writes these (row, channel) slots: no race.
    b_next = tl.load(p_state + stride_s_s, mask=m_ds & (o_s[None, :] + 1 < S_LEN), other=0.0)
    b_next = tl.where(o_s[None, :] == S_LEN - 1, b_x.to(b_next.dtype)[:, None], b_next)
    tl.store(p_state, b_next.to(state_ptr.dtype.element_ty), mask=m_ds)

    # x_proj over this block of channels, from the conv output as the consumer sees it (rounded).
    b_xc = b_xc.to(tl.float32)
    for i_j in tl.static_range(N_J):
        o_j = i_j * BLOCK_J + o_j0
        m_j = o_j < J
        if i_j == 0:
            b_wx = b_wx0
        else:
            b_wx = tl.load(wx_ptr + o_j[:, None] * stride_wx_j + o_d[None, :] * stride_wx_d,
                           mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_part = tl.sum(b_wx * b_xc[None, :], axis=1)
        tl.store(parts_ptr + i_s * stride_p_s + i_b * stride_p_b + o_j * stride_p_j, b_part, mask=m_j)


def _conv_xproj_outputs(x, x_proj_weight):
    batch, dim = x.shape
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    parts = torch.empty(-(-dim // BLOCK_D), batch, x_proj_weight.shape[0], device=x.device,
                        dtype=torch.float32)
    return out, parts


@launcher_op("conv_xproj_step", mutates_args=("conv_state",))
def _conv_xproj_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, x_proj_weight: Tensor,
                     silu: bool) -> tuple[Tensor, Tensor]:
    out, parts = _conv_xproj_outputs(x, x_proj_weight)
    key = (x.device, x.shape, x.stride(), x.dtype, *map(layout_key, (conv_state, weight, x_proj_weight)),
           None if bias is None else bias.dtype, silu)
    plan = _PLANS.get(key)
    if plan is None:
        batch, dim = x.shape
        state_len = conv_state.shape[2]
        n_out = x_proj_weight.shape[0]
        block_j = min(next_pow2(n_out), MAX_TILE // BLOCK_D)
        pdl = use_pdl(x)
        plan = _PLANS[key] = Plan(
            _conv_xproj_step_kernel, (parts.shape[0], batch),
            dim, state_len, n_out, *x.stride(), *conv_state.stride(), *weight.stride(), *x_proj_weight.stride(),
            *out.stride(), *parts.stride(),
            W=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=BLOCK_D, BLOCK_S=next_pow2(state_len),
            BLOCK_J=block_j, N_J=cdiv(n_out, block_j), USE_PDL=pdl, PTX=ptx_math(_conv_xproj_step_kernel),
            num_warps=8, **pdl_launch(pdl))
    plan(x, conv_state, weight, bias, x_proj_weight, out, parts)
    return out, parts


@_conv_xproj_step.register_fake
def _(x, conv_state, weight, bias, x_proj_weight, silu):
    return _conv_xproj_outputs(x, x_proj_weight)


def _validate(x, conv_state, weight, bias, x_proj_weight, activation):
    """What conv_xproj_step accepts, in one place: each check is a few comparisons, and only one that
    fails builds its error (naming the argument), so an accepted decode step pays the comparisons only."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype in FLOAT_DTYPES):
        check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    batch, dim = x.shape
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == dim
            and weight.dtype in FLOAT_DTYPES):
        check_tensor("weight", weight, shape=(dim, None), dtype=FLOAT_DTYPES)
    width = weight.shape[1]
    if not 2 <= width <= 8:
        raise ValueError(f"weight must have shape (D, W) with W in 2..8, got {tuple(weight.shape)}")
    if not (isinstance(conv_state, torch.Tensor) and conv_state.dim() == 3 and conv_state.shape[:2] == (batch, dim)
            and conv_state.dtype in FLOAT_DTYPES):
        check_tensor("conv_state", conv_state, shape=(batch, dim, None), dtype=FLOAT_DTYPES)
    if conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state must have shape (B, D, S) with S >= W-1 = {width - 1}, got {tuple(conv_state.shape)}")
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (dim,)
                                 and bias.dtype in FLOAT_DTYPES):
        check_tensor("bias", bias, shape=(dim,), dtype=FLOAT_DTYPES)
    if not (isinstance(x_proj_weight, torch.Tensor) and x_proj_weight.dim() == 2 and x_proj_weight.shape[1] == dim
            and x_proj_weight.dtype in FLOAT_DTYPES):
        check_tensor("x_proj_weight", x_proj_weight, shape=(None, dim), dtype=FLOAT_DTYPES)
    device = x.device
    if (conv_state.device != device or weight.device != device or x_proj_weight.device != device
            or (bias is not None and bias.device != device)):
        check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias, x_proj_weight=x_proj_weight)


def conv_xproj_step(x, conv_state, weight, bias, x_proj_weight, activation=None, *, backend=None):
    """Causal-conv update of one token fused with the x_proj partial products.

    Args:
        x: (B, D) the new inputs (may be a strided view, e.g. half of in_proj's output).
        conv_state: (B, D, S_len), S_len >= W-1, the last inputs oldest first; updated in place.
        weight: (D, W), W in 2..8.  bias: (D,) or None.  activation: None | "silu" | "swish".
        x_proj_weight: (J, D).
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (xc (B, D) in x's dtype, parts (S, B, J) fp32) with parts.sum(0) = xc @ x_proj_weight.T,
        S = ceil(D / 128).
    """
    _validate(x, conv_state, weight, bias, x_proj_weight, activation)
    if resolve_backend(backend, x, conv_state) == "torch":
        return conv_xproj_step_ref(x, conv_state, weight, bias, x_proj_weight, activation)
    return _conv_xproj_step(x, conv_state, weight, bias, x_proj_weight, activation is not None)
