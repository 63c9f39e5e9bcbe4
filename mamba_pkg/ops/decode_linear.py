"""A linear layer for the few rows of a decode step, as one Triton kernel.

    out = x @ weight.T + bias        x (B, K), weight (N, K), bias (N,), out (B, N); B <= 8

At batch 1 a decode step reads every weight once, so in_proj / out_proj are weight-streaming
matrix-vector products. cuBLAS runs them as split-K GEMMs followed by a separate reduction
kernel (two launches per projection). Here each program owns BLOCK_N output features and
reads their full rows in one go (no loop-carried dependency), so every load of a program is
in flight at once and one launch does the whole product; math in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    resolve_backend,
    tl,
    triton,
)

MAX_ROWS = 8
BLOCK_N = 4
TILE_ELEMS = 8192  # BLOCK_B * BLOCK_N * BLOCK_K per product tile


def decode_linear_ref(x, weight, bias=None):
    """Torch reference of :func:`decode_linear` (fp32 math, output in x's dtype)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@triton.jit
def _decode_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    batch, N, K,
    stride_x_b, stride_x_k, stride_w_n, stride_w_k, stride_o_b, stride_o_n,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_b = tl.arange(0, BLOCK_B)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_b, m_n = o_b < batch, o_n < N
    b_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    # Unrolled over K: the chunks are independent loads, all issued before the first sum.
    for i_k in tl.static_range(K_BLOCKS):
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_w = tl.load(w_ptr + o_n[:, None].to(tl.int64) * stride_w_n + o_k[None, :] * stride_w_k,
                      mask=m_n[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        b_x = tl.load(x_ptr + o_b[:, None] * stride_x_b + o_k[None, :] * stride_x_k,
                      mask=m_b[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_K)
        b_acc += tl.sum(b_x[:, None, :] * b_w[None, :, :], axis=2)
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + o_b[:, None] * stride_o_b + o_n[None, :] * stride_o_n,
             b_acc.to(out_ptr.dtype.element_ty), mask=m_b[:, None] & m_n[None, :])


def _outputs(x, weight):
    return torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)


@launcher_op("decode_linear")
def _decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = _outputs(x, weight)
    batch, n_in = x.shape
    n_out = weight.shape[0]
    block_b = triton.next_power_of_2(batch)
    block_k = min(triton.next_power_of_2(n_in), TILE_ELEMS // (block_b * BLOCK_N))
    _decode_linear_kernel[(triton.cdiv(n_out, BLOCK_N),)](
        x, weight, bias, out, batch, n_out, n_in,
        *x.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        K_BLOCKS=triton.cdiv(n_in, block_k), num_warps=8,
    )
    return out


@_decode_linear.register_fake
def _(x, weight, bias):
    return _outputs(x, weight)


def _validate(x, weight, bias):
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must have shape (B, K) with 1 <= B <= {MAX_ROWS}, got {tuple(x.shape)}")
    check_tensor("weight", weight, shape=(None, x.shape[1]), dtype=FLOAT_DTYPES)
    check_tensor("bias", bias, shape=(weight.shape[0],), dtype=FLOAT_DTYPES, optional=True)
    check_same_device(x=x, weight=weight, bias=bias)


def decode_linear(x, weight, bias=None, *, backend=None):
    """``x @ weight.T + bias`` for a decode step's few rows.

    Args:
        x: (B, K) with 1 <= B <= 8 (any strides).  weight: (N, K).  bias: (N,) or None.
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (B, N) in x's dtype, accumulated in fp32.
    """
    ok = (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == 2 and weight.dim() == 2
          and 1 <= x.shape[0] <= MAX_ROWS and weight.shape[1] == x.shape[1] and x.device == weight.device
          and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES
          and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],)
                                and bias.device == x.device and bias.dtype in FLOAT_DTYPES)))
    if not ok:
        _validate(x, weight, bias)
    if resolve_backend(backend, x, weight) == "torch":
        return decode_linear_ref(x, weight, bias)
    return _decode_linear(x, weight, bias)
