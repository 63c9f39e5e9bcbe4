"""Fused residual-add + LayerNorm / RMSNorm, and gated RMSNorm.

Add + norm, x and residual (..., D):
    s   = x + residual                      (in fp32 if residual_in_fp32)
    out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (LayerNorm)
    out = s / sqrt(mean(s^2) + eps) * weight + bias               (RMSNorm)
returns out, or (out, s) with prenorm (s is the residual stream for the next block).

Gated RMSNorm, x and z (..., D), normalised over groups of group_size channels:
    norm_before_gate:      out = rmsnorm(x) * weight (+ bias) * silu(z)
    not norm_before_gate:  out = rmsnorm(x * silu(z)) * weight (+ bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_pkg.ops._launch import launch
from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_same_device,
    check_tensor,
    next_pow2,
    resolve_backend,
    sm_count,
    tl,
    triton,
)


def _residual_dtype(x, residual, residual_in_fp32):
    if residual_in_fp32:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def layer_norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                   is_rms_norm=False):
    """Torch reference of :func:`layer_norm_fn` (fp32 math, differentiable)."""
    s = x.float() if residual is None else x.float() + residual.float()
    res_out = s.to(_residual_dtype(x, residual, residual_in_fp32))
    # The norm sees the fp32 sum, before it is rounded to the residual dtype.
    sf = s
    if is_rms_norm:
        y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    else:
        mean = sf.mean(-1, keepdim=True)
        y = (sf - mean) * torch.rsqrt((sf - mean).square().mean(-1, keepdim=True) + eps)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    out = y.to(x.dtype)
    return (out, res_out) if prenorm else out


# ---------------------------------------------------------------------------
# Triton kernels for add + norm. Rows are (M, D) with unit stride along D; a program
# normalises BLOCK_M rows held whole in registers (D <= MAX_FUSED_D).
# ---------------------------------------------------------------------------

MAX_FUSED_D = 65536


@triton.jit
def _add_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
    M, D, stride_x, stride_res, stride_out, stride_res_out, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < M, o_d < D
    m = m_m[:, None] & m_d[None, :]
    o_m64 = o_m.to(tl.int64)[:, None]
    s = tl.load(x_ptr + o_m64 * stride_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + o_m64 * stride_res + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if STORE_RES:
        tl.store(res_out_ptr + o_m64 * stride_res_out + o_d[None, :], s.to(res_out_ptr.dtype.element_ty), mask=m)
    if IS_RMS:
        s_c = s
    else:
        mean = tl.sum(s, axis=1) / D
        tl.store(mean_ptr + o_m, mean, mask=m_m)
        s_c = tl.where(m, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(s_c * s_c, axis=1) / D + eps)
    tl.store(rstd_ptr + o_m, rstd, mask=m_m)
    y = s_c * rstd[:, None] * tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + o_m64 * stride_out + o_d[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


def _rows(t):
    """(M, D) view with unit stride along D (a copy only if the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _row_blocks(dim):
    block_d = next_pow2(dim)
    block_m = max(1, min(16, 2048 // block_d))
    warps = min(16, max(4, block_d * block_m // 512))
    return block_m, block_d, warps


def _add_norm_fwd_outputs(x2, is_rms, res_dtype, store_res):
    """(out, res_out, mean, rstd) of the forward launch, uninitialised; shared with the fake op."""
    rows, dim = x2.shape
    out = torch.empty(rows, dim, device=x2.device, dtype=x2.dtype)
    res_out = torch.empty(rows, dim, device=x2.device, dtype=res_dtype) if store_res else absent(x2)
    mean = absent(x2) if is_rms else torch.empty(rows, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x2.device, dtype=torch.float32)
    return out, res_out, mean, rstd


@launcher_op("add_norm_fwd")
def _add_norm_fwd(
    x2: Tensor, res2: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, is_rms: bool,
    res_dtype: torch.dtype, store_res: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x2, res2 (M, D) -> out (M, D), res_out (M, D) [empty unless store_res], mean (M,) fp32 [empty
    for RMSNorm], rstd (M,) fp32."""
    x2 = _rows(x2)
    res2 = None if res2 is None else _rows(res2)
    out, res_out, mean, rstd = _add_norm_fwd_outputs(x2, is_rms, res_dtype, store_res)
    rows, dim = x2.shape
    block_m, block_d, warps = _row_blocks(dim)
    launch(_add_norm_fwd_kernel, (cdiv(rows, block_m),),
        x2, res2, weight, bias, out, res_out, mean, rstd, rows, dim,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0),
        res_out.stride(0) if store_res else 0, eps,
        IS_RMS=is_rms, HAS_RES=res2 is not None, STORE_RES=store_res, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return out, res_out, mean, rstd


@_add_norm_fwd.register_fake
def _(x2, res2, weight, bias, eps, is_rms, res_dtype, store_res):
    return _add_norm_fwd_outputs(x2, is_rms, res_dtype, store_res)


@triton.jit
def _bwd_row(a_ptr, b_ptr, c_ptr, r, row_end, o, m_o, stride_a, stride_b, stride_c, HAS_C: tl.constexpr):
    """The backward kernels' row r of two or three inputs, as loaded (zeros past row_end; without
    c, the third value repeats a)."""
    r64 = tl.cast(r, tl.int64)
    m = m_o & (o * 0 + r < row_end)  # a vector compare: the interpreter refuses a scalar-bool mask
    a = tl.load(a_ptr + r64 * stride_a + o, mask=m, other=0.0)
    b = tl.load(b_ptr + r64 * stride_b + o, mask=m, other=0.0)
    c = a
    if HAS_C:
        c = tl.load(c_ptr + r64 * stride_c + o, mask=m, other=0.0)
    return a, b, c


@triton.jit
def _add_norm_bwd_kernel(
    s_ptr, w_ptr, b_ptr, dy_ptr, ds_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr, mean_ptr, rstd_ptr,
    M, D, rows_per_program, stride_s, stride_dy, stride_ds, stride_dx, stride_dres,
    IS_RMS: tl.constexpr, HAS_DS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr,
):
    """ds = rstd * (w*dy - s_hat * mean(w*dy * s_hat) [- mean(w*dy)]) + d(prenorm s); a program
    walks rows_per_program rows and leaves one row of dw / dbias partial sums. PREFETCH: the next
    row's loads go out before this row's arithmetic."""
    i_prog = tl.program_id(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = i_prog * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if PREFETCH:
        n_s, n_dy, n_ds = _bwd_row(s_ptr, dy_ptr, ds_ptr, row_start, row_end, o_d, m_d, stride_s,
                                   stride_dy, stride_ds, HAS_DS)
    for r in range(row_start, row_end):
        r64 = tl.cast(r, tl.int64)
        if PREFETCH:
            s_r, dy_r, ds_r = n_s, n_dy, n_ds
            n_s, n_dy, n_ds = _bwd_row(s_ptr, dy_ptr, ds_ptr, r + 1, row_end, o_d, m_d, stride_s,
                                       stride_dy, stride_ds, HAS_DS)
        else:
            s_r, dy_r, ds_r = _bwd_row(s_ptr, dy_ptr, ds_ptr, r, row_end, o_d, m_d, stride_s, stride_dy,
                                       stride_ds, HAS_DS)
        s = s_r.to(tl.float32)
        dy = dy_r.to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        if IS_RMS:
            s_hat = s * rstd
        else:
            s_hat = tl.where(m_d, (s - tl.load(mean_ptr + r)) * rstd, 0.0)
        wdy = b_w * dy
        ds = wdy - s_hat * (tl.sum(wdy * s_hat, axis=0) / D)
        if not IS_RMS:
            ds -= tl.sum(wdy, axis=0) / D
        ds *= rstd
        if HAS_DS:
            ds += ds_r.to(tl.float32)
        tl.store(dx_ptr + r64 * stride_dx + o_d, ds.to(dx_ptr.dtype.element_ty), mask=m_d)
        if HAS_DRES:
            tl.store(dres_ptr + r64 * stride_dres + o_d, ds.to(dres_ptr.dtype.element_ty), mask=m_d)
        acc_dw += dy * s_hat
        acc_db += dy
    tl.store(dw_ptr + i_prog * D + o_d, acc_dw, mask=m_d)
    if HAS_BIAS:
        tl.store(db_ptr + i_prog * D + o_d, acc_db, mask=m_d)


# The norm backward kernels load the next row before this row's arithmetic (A/B switch).
BWD_PREFETCH = True


def _n_programs(device, rows):
    sms = sm_count(device) if device.type == "cuda" else 2
    return max(1, min(rows, 8 * sms))


def _add_norm_bwd_outputs(s2, weight, bias, x_dtype, res_dtype):
    """(dx, dres, dweight, dbias) of the backward launch; shared with the fake op."""
    rows, dim = s2.shape
    dx = torch.empty(rows, dim, device=s2.device, dtype=x_dtype)
    dres = torch.empty(rows, dim, device=s2.device, dtype=res_dtype) if res_dtype is not None else absent(s2)
    db = torch.empty(dim, device=s2.device, dtype=bias.dtype) if bias is not None else absent(s2)
    return dx, dres, torch.empty(dim, device=s2.device, dtype=weight.dtype), db


@launcher_op("add_norm_bwd")
def _add_norm_bwd(
    s2: Tensor, weight: Tensor, bias: Tensor | None, dy2: Tensor, ds2: Tensor | None, mean: Tensor,
    rstd: Tensor, is_rms: bool, x_dtype: torch.dtype, res_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients dx (M, D), dres (M, D) [empty when res_dtype is None], dweight (D,), dbias (D,)
    [empty without bias]."""
    dy2 = _rows(dy2)
    ds2 = None if ds2 is None else _rows(ds2)
    dx, dres, _, _ = _add_norm_bwd_outputs(s2, weight, bias, x_dtype, res_dtype)
    rows, dim = s2.shape
    n_prog = _n_programs(s2.device, rows)
    # Per-program partial sums of dweight / dbias, reduced below.
    dw = torch.empty(n_prog, dim, device=s2.device, dtype=torch.float32)
    db = torch.empty(n_prog, dim, device=s2.device, dtype=torch.float32) if bias is not None else None
    has_dres = res_dtype is not None
    block_d = next_pow2(dim)
    launch(_add_norm_bwd_kernel, (n_prog,),
        s2, weight, bias, dy2, ds2, dx, dres, dw, db, mean, rstd,
        rows, dim, cdiv(rows, n_prog), s2.stride(0), dy2.stride(0),
        ds2.stride(0) if ds2 is not None else 0, dx.stride(0), dres.stride(0) if has_dres else 0,
        IS_RMS=is_rms, HAS_DS=ds2 is not None, HAS_DRES=has_dres, HAS_BIAS=bias is not None,
        BLOCK_D=block_d, PREFETCH=BWD_PREFETCH, num_warps=min(16, max(4, block_d // 256)),
    )
    return dx, dres, dw.sum(0).to(weight.dtype), absent(s2) if bias is None else db.sum(0).to(bias.dtype)


@_add_norm_bwd.register_fake
def _(s2, weight, bias, dy2, ds2, mean, rstd, is_rms, x_dtype, res_dtype):
    return _add_norm_bwd_outputs(s2, weight, bias, x_dtype, res_dtype)


class AddNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms):
        res_dtype = _residual_dtype(x, residual, residual_in_fp32)
        x2 = _rows(x)
        res2 = _rows(residual) if residual is not None else None
        # The sum is stored when it is not x itself (it is the prenorm output and what
        # the backward pass normalises again).
        store_res = residual is not None or res_dtype != x.dtype
        out, res_out, mean, rstd = _add_norm_fwd(x2, res2, weight, bias, eps, is_rms, res_dtype, store_res)
        s2 = res_out if store_res else x2
        ctx.save_for_backward(s2, weight, bias, mean, rstd)
        ctx.opts = (is_rms, x.dtype, residual.dtype if residual is not None else None, x.shape)
        out = out.view(x.shape)
        if not prenorm:
            return out
        return out, s2.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        s2, weight, bias, mean, rstd = ctx.saved_tensors
        is_rms, x_dtype, res_in_dtype, shape = ctx.opts
        dx, dres, dw, db = _add_norm_bwd(s2, weight, bias, _rows(dy), None if ds is None else _rows(ds), mean,
                                         rstd, is_rms, x_dtype, res_in_dtype)
        dres = None if res_in_dtype is None else dres.view(shape)
        return dx.view(shape), dw, None if bias is None else db, dres, None, None, None, None


def _validate_add_norm(x, weight, bias, residual, eps):
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    check_tensor("weight", weight, shape=(dim,), dtype=FLOAT_DTYPES)
    check_tensor("bias", bias, shape=(dim,), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("residual", residual, shape=tuple(x.shape), dtype=FLOAT_DTYPES, optional=True)
    if x.shape[-1] > MAX_FUSED_D:
        raise ValueError(f"x must have D <= {MAX_FUSED_D} (a row is normalised in registers), got D={x.shape[-1]}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)


def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                  is_rms_norm=False, *, backend=None):
    """Fused residual add + LayerNorm (or RMSNorm with ``is_rms_norm``).

    Args:
        x: (..., D).  residual: (..., D) or None.  weight: (D,).  bias: (D,) or None.
        eps: added to the variance.
        prenorm: also return the sum s = x + residual.
        residual_in_fp32: keep s in fp32 (else in the dtype of residual, or of x without one).
        backend: "torch", "triton" or None (auto).

    Returns:
        out (..., D) in the dtype of x, or (out, s) with prenorm.
    """
    _validate_add_norm(x, weight, bias, residual, eps)
    if resolve_backend(backend, x, weight) == "torch" or x.numel() == 0:
        return layer_norm_ref(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm)
    return AddNormFn.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(), residual, float(eps),
                           prenorm, residual_in_fp32, is_rms_norm)


def rms_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, *,
                backend=None):
    """Fused residual add + RMSNorm; :func:`layer_norm_fn` with ``is_rms_norm=True``."""
    return layer_norm_fn(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True, backend=backend)


# ---------------------------------------------------------------------------
# Gated RMSNorm (Mamba-2 output norm).
# ---------------------------------------------------------------------------


def rms_norm_gated_ref(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Torch reference of :func:`rms_norm_gated_fn` (fp32 math, differentiable)."""
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    xg = xf.reshape(*x.shape[:-1], dim // group_size, group_size)
    y = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if z is not None and norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------
# Triton kernels for gated RMSNorm: program (row block, group) normalises group_size
# channels of BLOCK_M rows.
# ---------------------------------------------------------------------------


@triton.jit
def _gated_fwd_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, out_ptr, rstd_ptr,
    M, D, GS, stride_x, stride_z, stride_out, eps,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, Z_VEC: tl.constexpr,
):
    stride_z *= Z_VEC  # passed divided by Z_VEC: see _z_stride
    i_m, i_g = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = i_g * GS + tl.arange(0, BLOCK_G)
    m_m, m_c = o_m < M, tl.arange(0, BLOCK_G) < GS
    m = m_m[:, None] & m_c[None, :]
    o_m64 = o_m.to(tl.int64)[:, None]
    b_x = tl.load(x_ptr + o_m64 * stride_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z_ptr + o_m64 * stride_z + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        gate = b_z / (1.0 + tl.exp(-b_z))
        if not NORM_BEFORE_GATE:
            b_x *= gate
    rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / GS + eps)
    tl.store(rstd_ptr + o_m * (D // GS) + i_g, rstd, mask=m_m)
    y = b_x * rstd[:, None] * tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        y *= gate
    tl.store(out_ptr + o_m64 * stride_out + o_c[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dz_ptr, dw_ptr, db_ptr, rstd_ptr,
    M, D, GS, rows_per_program, stride_x, stride_z, stride_dy, stride_dx, stride_dz,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_G: tl.constexpr,
    Z_VEC: tl.constexpr, DZ_VEC: tl.constexpr, PREFETCH: tl.constexpr,
):
    stride_z *= Z_VEC  # passed divided by Z_VEC: see _z_stride
    stride_dz *= DZ_VEC
    i_prog, i_g = tl.program_id(0), tl.program_id(1)
    o_c = i_g * GS + tl.arange(0, BLOCK_G)
    m_c = tl.arange(0, BLOCK_G) < GS
    b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_G], dtype=tl.float32)
    row_start = i_prog * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if PREFETCH:
        n_x, n_dy, n_z = _bwd_row(x_ptr, dy_ptr, z_ptr, row_start, row_end, o_c, m_c, stride_x, stride_dy,
                                  stride_z, HAS_Z)
    for r in range(row_start, row_end):
        r64 = tl.cast(r, tl.int64)
        if PREFETCH:
            x_r, dy_r, z_r = n_x, n_dy, n_z
            n_x, n_dy, n_z = _bwd_row(x_ptr, dy_ptr, z_ptr, r + 1, row_end, o_c, m_c, stride_x, stride_dy,
                                      stride_z, HAS_Z)
        else:
            x_r, dy_r, z_r = _bwd_row(x_ptr, dy_ptr, z_ptr, r, row_end, o_c, m_c, stride_x, stride_dy,
                                      stride_z, HAS_Z)
        b_x = x_r.to(tl.float32)
        dy = dy_r.to(tl.float32)
        rstd = tl.load(rstd_ptr + r64 * (D // GS) + i_g)
        if HAS_Z:
            b_z = z_r.to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-b_z))
            gate = b_z * sig
            dgate = sig * (1.0 + b_z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                x_in = b_x
                b_x *= gate
        x_hat = b_x * rstd
        if HAS_Z and NORM_BEFORE_GATE:
            y0 = x_hat * b_w
            if HAS_BIAS:
                y0 += b_b
            dz = dy * y0 * dgate
            dy *= gate
        wdy = b_w * dy
        dx = (wdy - x_hat * (tl.sum(wdy * x_hat, axis=0) / GS)) * rstd
        if HAS_Z and not NORM_BEFORE_GATE:
            dz = dx * x_in * dgate
            dx *= gate
        tl.store(dx_ptr + r64 * stride_dx + o_c, dx.to(dx_ptr.dtype.element_ty), mask=m_c)
        if HAS_Z:
            tl.store(dz_ptr + r64 * stride_dz + o_c, dz.to(dz_ptr.dtype.element_ty), mask=m_c)
        acc_dw += dy * x_hat
        acc_db += dy
    tl.store(dw_ptr + i_prog * D + o_c, acc_dw, mask=m_c)
    if HAS_BIAS:
        tl.store(db_ptr + i_prog * D + o_c, acc_db, mask=m_c)


def _z_stride(z2) -> tuple[int, int]:
    """(stride argument, Z_VEC) of z's rows: the row stride divided by its 16-byte multiple
    Z_VEC (1 when it has none; (0, 1) without z). Mamba-2's z is a slice of zxbcdt rows (3352
    values at 130m, not divisible by 16): Triton knows the alignment only of stride arguments
    divisible by 16, and loaded z 2 bytes at a time; a stride passed divided by a constexpr that
    the kernel multiplies back carries the alignment."""
    if z2 is None:
        return 0, 1
    vec = 16 // z2.element_size()
    vec = vec if z2.stride(0) % vec == 0 else 1
    return z2.stride(0) // vec, vec


def _gated_fwd_outputs(x2, group_size):
    """(out (M, D), rstd (M, D // group_size) fp32) of the forward launch; shared with the fake op."""
    rows, dim = x2.shape
    out = torch.empty(rows, dim, device=x2.device, dtype=x2.dtype)
    return out, torch.empty(rows, dim // group_size, device=x2.device, dtype=torch.float32)


@launcher_op("rms_norm_gated_fwd")
def _rms_norm_gated_fwd(
    x2: Tensor, z2: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, group_size: int,
    norm_before_gate: bool,
) -> tuple[Tensor, Tensor]:
    """x2, z2 (M, D) with unit stride along D -> out (M, D), rstd (M, D // group_size) fp32."""
    out, rstd = _gated_fwd_outputs(x2, group_size)
    rows, dim = x2.shape
    block_g = next_pow2(group_size)
    block_m = max(1, min(16, 2048 // block_g))
    stride_z, z_vec = _z_stride(z2)
    launch(_gated_fwd_kernel, (cdiv(rows, block_m), dim // group_size),
        x2, z2, weight, bias, out, rstd, rows, dim, group_size, x2.stride(0), stride_z, out.stride(0), eps,
        HAS_Z=z2 is not None, HAS_BIAS=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_M=block_m, BLOCK_G=block_g, Z_VEC=z_vec, num_warps=min(16, max(4, block_g * block_m // 512)),
    )
    return out, rstd


@_rms_norm_gated_fwd.register_fake
def _(x2, z2, weight, bias, eps, group_size, norm_before_gate):
    return _gated_fwd_outputs(x2, group_size)


def _gated_bwd_outputs(x2, z2, weight, bias, dz_rows=0):
    """(dx, dz [empty without z], dweight, dbias [empty without bias]); shared with the fake op.
    dz_rows > 0: dz (M, dz_rows), whose first D columns are the gradient (see RMSNormGatedFn)."""
    rows, dim = x2.shape
    dx = torch.empty(rows, dim, device=x2.device, dtype=x2.dtype)
    dz = torch.empty(rows, dz_rows or dim, device=x2.device, dtype=z2.dtype) if z2 is not None else absent(x2)
    dw = torch.empty(dim, device=x2.device, dtype=weight.dtype)
    db = torch.empty(dim, device=x2.device, dtype=bias.dtype) if bias is not None else absent(x2)
    return dx, dz, dw, db


@launcher_op("rms_norm_gated_bwd")
def _rms_norm_gated_bwd(
    x2: Tensor, z2: Tensor | None, weight: Tensor, bias: Tensor | None, dy2: Tensor, rstd: Tensor,
    group_size: int, norm_before_gate: bool, dz_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients dx (M, D), dz (M, D) [empty without z; (M, dz_rows) with the gradient in its first D
    columns when dz_rows > 0], dweight (D,), dbias (D,) [empty without bias]."""
    dy2 = _rows(dy2)
    dx, dz, _, _ = _gated_bwd_outputs(x2, z2, weight, bias, dz_rows)
    rows, dim = x2.shape
    n_prog = _n_programs(x2.device, rows)
    # Per-program partial sums of dweight / dbias, reduced below.
    dw = torch.empty(n_prog, dim, device=x2.device, dtype=torch.float32)
    db = torch.empty(n_prog, dim, device=x2.device, dtype=torch.float32) if bias is not None else None
    block_g = next_pow2(group_size)
    stride_z, z_vec = _z_stride(z2)
    stride_dz, dz_vec = _z_stride(dz if z2 is not None else None)
    launch(_gated_bwd_kernel, (n_prog, dim // group_size),
        x2, z2, weight, bias, dy2, dx, dz, dw, db, rstd,
        rows, dim, group_size, cdiv(rows, n_prog), x2.stride(0),
        stride_z, dy2.stride(0), dx.stride(0), stride_dz,
        HAS_Z=z2 is not None, HAS_BIAS=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_G=block_g, Z_VEC=z_vec, DZ_VEC=dz_vec, PREFETCH=BWD_PREFETCH, num_warps=min(16, max(4, block_g // 256)),
    )
    return dx, dz, dw.sum(0).to(weight.dtype), absent(x2) if bias is None else db.sum(0).to(bias.dtype)


@_rms_norm_gated_bwd.register_fake
def _(x2, z2, weight, bias, dy2, rstd, group_size, norm_before_gate, dz_rows=0):
    return _gated_bwd_outputs(x2, z2, weight, bias, dz_rows)


class RMSNormGatedFn(torch.autograd.Function):
    """grad_z_rows (z's rows as wide as its row stride, z starting a row): dz comes back as the first
    D columns of a fresh (..., z.stride(-2)) buffer, i.e. in z's layout. Mamba-2's z is the first
    D_inner columns of zxbcdt, and split_conv1d's backward adopts that buffer as zxbcdt's gradient
    instead of copying dz into it (0.87 ms of a 54 ms mamba2-130m training step on an H100)."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, eps, group_size, norm_before_gate, grad_z_rows=False):
        x2 = _rows(x)
        z2 = _rows(z) if z is not None else None
        out, rstd = _rms_norm_gated_fwd(x2, z2, weight, bias, eps, group_size, norm_before_gate)
        ctx.save_for_backward(x2, z2, weight, bias, rstd)
        dz_rows = z2.stride(0) if grad_z_rows and z2 is not None and z2.stride(0) > z2.shape[1] else 0
        ctx.opts = (group_size, norm_before_gate, x.shape, dz_rows)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, bias, rstd = ctx.saved_tensors
        group_size, norm_before_gate, shape, dz_rows = ctx.opts
        dx, dz, dw, db = _rms_norm_gated_bwd(x2, z2, weight, bias, _rows(dy), rstd, group_size, norm_before_gate,
                                             dz_rows)
        if dz_rows:
            dz = dz[:, : shape[-1]]
        return (dx.view(shape), dw, None if bias is None else db, None if z2 is None else dz.view(shape),
                None, None, None, None)


def rms_norm_gated_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True, *,
                      backend=None):
    """RMSNorm over groups of channels with a silu(z) gate.

    Args:
        x: (..., D).  z: (..., D) or None (no gate).  weight: (D,).  bias: (D,) or None.
        group_size: channels per normalisation group; must divide D (None = D).
        norm_before_gate: True: rmsnorm(x) * w * silu(z); False: rmsnorm(x * silu(z)) * w.
        backend: "torch", "triton" or None (auto).

    Returns:
        out (..., D) in the dtype of x.
    """
    _validate_add_norm(x, weight, bias, None, eps)
    dim = x.shape[-1]
    check_tensor("z", z, shape=tuple(x.shape), dtype=FLOAT_DTYPES, optional=True)
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or dim % group_size):
        raise ValueError(f"group_size must be a positive int dividing D={dim}, got {group_size!r}")
    check_same_device(x=x, z=z)
    if resolve_backend(backend, x, weight) == "torch" or x.numel() == 0:
        return rms_norm_gated_ref(x, weight, bias, z, eps, group_size, norm_before_gate)
    return RMSNormGatedFn.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(), z, float(eps),
                                dim if group_size is None else group_size, norm_before_gate)
