"""Mamba-2's in_proj split and depthwise conv, with one gradient in zxbcdt's layout.

    [z, xBC, dt] = zxbcdt                       zxbcdt (B, L, 2*D_inner + 2*G*N + H)
    [x, B, C]    = act(causal_conv1d(xBC) + b)  x (B, L, D_inner); B, C (B, L, G*N), each dense
    returns (z, x, B, C, dt)                     z (B, L, D_inner), dt (B, L, H): views of zxbcdt

Why an op: composed from torch.split, a conv and reshapes, the Mamba-2 mixer's training step
pays for layout glue, not math. The conv's output (B, L, D_inner + 2*G*N) has x, B and C as
strided slices, which the SSD kernels copy to dense tensors; and the backward of the two
splits concatenates the gradients of z / xBC / dt and of x / B / C (two cats per layer). Here
the conv writes x, B and C as three dense tensors (one launch over zxbcdt's xBC slice, each
channel tile stored to its part), and the backward writes the conv's input gradient straight
into dzxbcdt's xBC slice, ddt copied into its slice and dz adopted from the gated norm (see
SplitConv1dFn): one (B, L, d_in_proj) gradient, no cat.
On an H100 the glue was 6.6 ms of a 68 ms mamba2-130m training step (8 x 2048, CUDA graph).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.causal_conv1d import _launch_bwd as _launch_conv_bwd
from mamba_pkg.ops.causal_conv1d import _launch_fwd as _launch_conv_fwd
from mamba_pkg.ops.causal_conv1d import INDEX_DTYPES, _packed_starts, _run_starts
from mamba_pkg.ops.backend import FLOAT_DTYPES, check_cu_seqlens, check_same_device, check_tensor
from mamba_pkg.ops.backend import resolve_backend
from mamba_pkg.ops.mamba_inner import _copy_rows


def _fwd_outputs(zxbcdt: Tensor, d_inner: int, gn: int):
    """x (B, L, D_inner), B, C (B, L, G*N), dense."""
    batch, length, _ = zxbcdt.shape
    return tuple(zxbcdt.new_empty(batch, length, width) for width in (d_inner, gn, gn))


def _split_conv1d_fwd_launcher(zxbcdt: Tensor, weight: Tensor, bias: Optional[Tensor], starts: Optional[Tensor],
                               d_inner: int, gn: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """zxbcdt (B, L, d_in_proj), weight (D_inner + 2*G*N, W) contiguous, bias (D_inner + 2*G*N,),
    starts (B, L) int32 first position of each position's sequence (causal_conv1d's launcher)
    -> x (B, L, D_inner), B, C (B, L, G*N), dense."""
    outs = _fwd_outputs(zxbcdt, d_inner, gn)
    # One launch over the xBC slice, each channel tile written to its part (causal_conv1d's tuple out).
    xbc = zxbcdt[..., d_inner: 2 * (d_inner + gn)].transpose(1, 2)  # (B, D_inner + 2*G*N, L)
    _launch_conv_fwd(tuple(out.transpose(1, 2) for out in outs), xbc, weight, bias, None, starts, None, silu)
    return outs


_split_conv1d_fwd = launcher_op("split_conv1d_fwd")(_split_conv1d_fwd_launcher)


@_split_conv1d_fwd.register_fake
def _(zxbcdt, weight, bias, starts, d_inner, gn, silu):
    return _fwd_outputs(zxbcdt, d_inner, gn)


def _wgrad_outputs(weight: Tensor, bias: Optional[Tensor]):
    return torch.empty_like(weight), torch.empty_like(bias) if bias is not None else weight.new_empty(0)


def _bwd_outputs(zxbcdt: Tensor, weight: Tensor, bias: Optional[Tensor]):
    return (torch.empty(zxbcdt.shape, device=zxbcdt.device, dtype=zxbcdt.dtype), *_wgrad_outputs(weight, bias))


def _conv_grads_into(dzxbcdt: Tensor, dw: Tensor, db: Tensor, zxbcdt: Tensor, weight: Tensor, bias: Optional[Tensor],
                     starts: Optional[Tensor], dx: Tensor, dB: Tensor, dC: Tensor, ddt: Tensor, d_inner: int,
                     gn: int, silu: bool) -> None:
    """The conv's backward (one launch, dout as the tuple of x / B / C parts) writes the input
    gradient into dzxbcdt's xBC slice; ddt goes into its dt slice (dz is the caller's)."""
    lo, hi = d_inner, 2 * (d_inner + gn)
    _launch_conv_bwd(dzxbcdt[..., lo:hi].transpose(1, 2), dw, db if bias is not None else None,
                     zxbcdt[..., lo:hi].transpose(1, 2), weight, bias, None, starts, None, silu,
                     tuple(d.transpose(1, 2) for d in (dx, dB, dC)))
    dzxbcdt[..., hi:].copy_(ddt)


def _split_conv1d_bwd_launcher(zxbcdt: Tensor, weight: Tensor, bias: Optional[Tensor], starts: Optional[Tensor],
                               dz: Tensor, dx: Tensor, dB: Tensor, dC: Tensor,
                               ddt: Tensor, d_inner: int, gn: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of (z, x, B, C, dt) -> (dzxbcdt (B, L, d_in_proj) dense, dweight, dbias or empty)."""
    dzxbcdt, dw, db = _bwd_outputs(zxbcdt, weight, bias)
    _conv_grads_into(dzxbcdt, dw, db, zxbcdt, weight, bias, starts, dx, dB, dC, ddt, d_inner, gn, silu)
    # (B, L, width) rows of dense gradients into dzxbcdt's strided slices: 16-byte row copies.
    _copy_rows(dzxbcdt[..., :d_inner], dz)
    return dzxbcdt, dw, db


_split_conv1d_bwd = launcher_op("split_conv1d_bwd")(_split_conv1d_bwd_launcher)


@_split_conv1d_bwd.register_fake
def _(zxbcdt, weight, bias, starts, dz, dx, dB, dC, ddt, d_inner, gn, silu):
    return _bwd_outputs(zxbcdt, weight, bias)


@launcher_op("split_conv1d_bwd_into", mutates_args=("dzxbcdt",))
def _split_conv1d_bwd_into(dzxbcdt: Tensor, zxbcdt: Tensor, weight: Tensor, bias: Optional[Tensor],
                           starts: Optional[Tensor], dx: Tensor, dB: Tensor, dC: Tensor, ddt: Tensor, d_inner: int,
                           gn: int, silu: bool) -> tuple[Tensor, Tensor]:
    """_split_conv1d_bwd when dz already fills dzxbcdt's first D_inner columns (dense (B, L,
    d_in_proj)): writes the rest of dzxbcdt -> (dweight, dbias or empty)."""
    dw, db = _wgrad_outputs(weight, bias)
    _conv_grads_into(dzxbcdt, dw, db, zxbcdt, weight, bias, starts, dx, dB, dC, ddt, d_inner, gn, silu)
    return dw, db


@_split_conv1d_bwd_into.register_fake
def _(dzxbcdt, zxbcdt, weight, bias, starts, dx, dB, dC, ddt, d_inner, gn, silu):
    return _wgrad_outputs(weight, bias)


def _fills_z_columns(dz: Tensor, zxbcdt: Tensor) -> bool:
    """Whether dz is the first D_inner columns of a fresh dense buffer shaped like zxbcdt (what
    norm.RMSNormGatedFn(grad_z_rows=True) returns), so the buffer can be zxbcdt's gradient."""
    base = dz._base
    return (base is not None and base.is_contiguous() and base.numel() == zxbcdt.numel()
            and base.dtype == zxbcdt.dtype and dz.data_ptr() == base.data_ptr()
            and dz.stride() == (zxbcdt.shape[1] * zxbcdt.shape[2], zxbcdt.shape[2], 1))


class SplitConv1dFn(torch.autograd.Function):
    """adopt_dz: z's only consumer returns its gradient in z's layout (see _fills_z_columns); the
    backward then writes the other gradients around it instead of copying it."""

    @staticmethod
    def forward(ctx, zxbcdt, weight, bias, starts, d_inner, gn, silu, adopt_dz=False):
        x, B, C = _split_conv1d_fwd(zxbcdt, weight, bias, starts, d_inner, gn, silu)
        ctx.save_for_backward(zxbcdt, weight, bias, starts)
        ctx.sizes = (d_inner, gn, silu, adopt_dz)
        return zxbcdt[..., :d_inner], x, B, C, zxbcdt[..., 2 * (d_inner + gn):]

    @staticmethod
    def backward(ctx, dz, dx, dB, dC, ddt):
        zxbcdt, weight, bias, starts = ctx.saved_tensors
        d_inner, gn, silu, adopt_dz = ctx.sizes
        dx, dB, dC = dx.contiguous(), dB.contiguous(), dC.contiguous()
        if adopt_dz and not torch.compiler.is_compiling() and _fills_z_columns(dz, zxbcdt):
            dzxbcdt = dz._base.view(zxbcdt.shape)
            dw, db = _split_conv1d_bwd_into(dzxbcdt, zxbcdt, weight, bias, starts, dx, dB, dC, ddt, d_inner, gn,
                                            silu)
        else:
            dzxbcdt, dw, db = _split_conv1d_bwd(zxbcdt, weight, bias, starts, dz, dx, dB, dC, ddt, d_inner, gn,
                                                silu)
        return dzxbcdt, dw, db if bias is not None else None, None, None, None, None, None


def _split_conv1d(zxbcdt, weight, bias, d_inner, gn, silu, seq_idx=None, cu_seqlens=None, adopt_dz=False):
    """split_conv1d without the input checks (mamba_split_conv1d_scan_combined has made them);
    adopt_dz: see SplitConv1dFn."""
    starts = None
    if cu_seqlens is not None:
        starts, _ = _packed_starts(cu_seqlens, zxbcdt.shape[1])
    elif seq_idx is not None:
        starts = _run_starts(seq_idx)
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    return SplitConv1dFn.apply(zxbcdt, weight.contiguous(), None if bias is None else bias.contiguous(), starts,
                               d_inner, gn, silu, adopt_dz)


def split_conv1d(zxbcdt: Tensor, weight: Tensor, bias: Optional[Tensor], d_inner: int, gn: int, silu: bool,
                 seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None):
    """Mamba-2's split of the in_proj output and its depthwise conv (the Triton path of
    ssd.combined.mamba_split_conv1d_scan_combined's training step).

    Args:
        zxbcdt: (B, L, 2*D_inner + 2*G*N + H), H >= 1.
        weight: (D_inner + 2*G*N, W), W in 2..8; bias: (D_inner + 2*G*N,) or None.
        d_inner: D_inner; gn: G*N; silu: silu after the conv.
        seq_idx: (B, L) int32 or None; cu_seqlens: (num_seqs + 1,) int32 or None (B == 1):
            the conv never reads across a sequence boundary.

    Returns:
        z (B, L, D_inner) and dt (B, L, H), views of zxbcdt; x (B, L, D_inner), B and C
        (B, L, G*N), dense. Gradients of all five go back as one dense (B, L, d_in_proj).
    """
    for name, value in (("d_inner", d_inner), ("gn", gn)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_tensor("zxbcdt", zxbcdt, ndim=3, dtype=FLOAT_DTYPES)
    batch, length, width = zxbcdt.shape
    if width <= 2 * (d_inner + gn):
        raise ValueError(f"zxbcdt must have shape (B, L, 2*d_inner + 2*gn + H) with H >= 1 = (B, L, > "
                         f"{2 * (d_inner + gn)}), got {tuple(zxbcdt.shape)}")
    check_tensor("weight", weight, ndim=2, dtype=FLOAT_DTYPES)
    if weight.shape[0] != d_inner + 2 * gn or not 2 <= weight.shape[1] <= 8:
        raise ValueError(f"weight must have shape (d_inner + 2*gn = {d_inner + 2 * gn}, W) with W in 2..8, "
                         f"got {tuple(weight.shape)}")
    check_tensor("bias", bias, shape=(d_inner + 2 * gn,), dtype=FLOAT_DTYPES, optional=True)
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError("give seq_idx or cu_seqlens, not both")
    check_tensor("seq_idx", seq_idx, shape=(batch, length), dtype=INDEX_DTYPES, optional=True)
    check_same_device(zxbcdt=zxbcdt, weight=weight, bias=bias, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, length, batch)
    resolve_backend("triton", zxbcdt, weight)  # an error where the kernels cannot run (CPU without the interpreter)
    return _split_conv1d(zxbcdt, weight, bias, d_inner, gn, silu, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
