"""Mamba-1 block's inner path, fused for training memory.

    x, z  = xz.chunk(2)                              xz (B, 2*D, L): in_proj output
    xc    = silu(causal_conv1d(x, conv1d_weight) + conv1d_bias)
    x_dbl = x_proj_weight @ xc                        (B, R + 2*N, L): rows [dt; B; C]
    delta = delta_proj_weight @ x_dbl[:, :R]          (B, D, L)
    y     = selective_scan(xc, delta, A, B, C, D, z, delta_bias, softplus)
    out   = y^T @ out_proj_weight^T (+ out_proj_bias) (B, L, d_model)

The autograd Function saves only its inputs and recomputes conv1d, the projections
and the scan forward in the backward (the scan's kernels and launchers live in
selective_scan.py). Under torch.compile the same recompute is expressed as
selective activation checkpointing, which dynamo traces into one graph.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mamba_pkg.ops._launch import launch
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_cu_seqlens,
    check_tensor,
    resolve_backend,
    tl,
    triton,
)
from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.causal_conv1d import _launch_bwd as _launch_conv_bwd
from mamba_pkg.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref
from mamba_pkg.ops.selective_scan import (
    _kernel_inputs,
    _param_grads,
    _selective_scan_bwd_op,
    _selective_scan_fwd_op,
    selective_scan_fn,
    selective_scan_ref,
)


def _check_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                 out_proj_bias, A, B, C, cu_seqlens):
    check_tensor("xz", xz, ndim=3, dtype=FLOAT_DTYPES)
    check_cu_seqlens(cu_seqlens, xz.shape[2], xz.shape[0])
    if xz.shape[1] % 2:
        raise ValueError(f"xz must have shape (B, 2*D, L) (x and z halves), got {tuple(xz.shape)}")
    dim = xz.shape[1] // 2
    check_tensor("conv1d_weight", conv1d_weight, ndim=(2, 3), dtype=FLOAT_DTYPES)
    if conv1d_weight.dim() == 3 and conv1d_weight.shape[1] != 1:
        raise ValueError(f"conv1d_weight must have shape (D, W) or (D, 1, W), got {tuple(conv1d_weight.shape)}")
    check_tensor("conv1d_weight", conv1d_weight.reshape(conv1d_weight.shape[0], -1), shape=(dim, None))
    check_tensor("conv1d_bias", conv1d_bias, shape=(dim,), optional=True)
    check_tensor("A", A, shape=(dim, None), dtype=torch.float32)
    check_tensor("delta_proj_weight", delta_proj_weight, shape=(dim, None), dtype=FLOAT_DTYPES)
    rank, dstate = delta_proj_weight.shape[1], A.shape[1]
    rows = rank + 2 * dstate if (B is None or C is None) else None
    check_tensor("x_proj_weight", x_proj_weight, shape=(rows, dim), dtype=FLOAT_DTYPES)
    check_tensor("out_proj_weight", out_proj_weight, shape=(None, dim), dtype=FLOAT_DTYPES)
    check_tensor("out_proj_bias", out_proj_bias, shape=(out_proj_weight.shape[0],), optional=True)


def _inner_ok(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
              out_proj_bias, A, B, C) -> bool:
    """The common case of mamba_inner_fn (B and C from x_proj, no cu_seqlens) in a few
    comparisons; anything else goes through _check_inner, which names the bad argument."""
    weights = (conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight)
    if B is not None or C is not None or not (isinstance(xz, torch.Tensor) and isinstance(A, torch.Tensor)):
        return False
    if not all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES for t in weights):
        return False
    if xz.dtype not in FLOAT_DTYPES or xz.dim() != 3 or xz.shape[1] % 2 or A.dtype != torch.float32:
        return False
    dim, width = xz.shape[1] // 2, conv1d_weight.shape[-1]
    if conv1d_weight.shape != (dim, width) and conv1d_weight.shape != (dim, 1, width):
        return False
    if delta_proj_weight.dim() != 2 or A.dim() != 2 or out_proj_weight.dim() != 2:
        return False
    rank, dstate, d_model = delta_proj_weight.shape[1], A.shape[1], out_proj_weight.shape[0]
    return (delta_proj_weight.shape[0] == dim and A.shape[0] == dim
            and x_proj_weight.shape == (rank + 2 * dstate, dim) and out_proj_weight.shape[1] == dim
            and (conv1d_bias is None or (isinstance(conv1d_bias, torch.Tensor) and conv1d_bias.shape == (dim,)))
            and (out_proj_bias is None
                 or (isinstance(out_proj_bias, torch.Tensor) and out_proj_bias.shape == (d_model,))))


def _left_matmul(weight, x):
    """weight (E, D) @ x (B, D, L) -> (B, E, L) contiguous, as a bmm over an expanded
    weight (torch.matmul would fold it as x^T @ weight^T and copy x into (B*L, D))."""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, dim, seqlen, stride_src_b, stride_src_d, stride_dst_b, stride_dst_d,
                      ROWS: tl.constexpr, BLOCK_L: tl.constexpr, EVEN: tl.constexpr, VEC: tl.constexpr):
    """dst[b, d, :] = src[b, d, :] for a (ROWS, BLOCK_L) tile; both have unit stride along L.
    The strides arrive divided by VEC (a constexpr): Triton only knows the 16-byte alignment of
    rows whose stride argument is divisible by 16 (Mamba-2's zxbcdt rows are 3352 elements at
    130m), and otherwise stores 2 bytes at a time (tl.multiple_of on the argument did not help)."""
    stride_src_b *= VEC
    stride_src_d *= VEC
    stride_dst_b *= VEC
    stride_dst_d *= VEC
    i_b = tl.program_id(2)
    o_d = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    o_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d64 = o_d.to(tl.int64)[:, None]
    src = src_ptr + i_b.to(tl.int64) * stride_src_b + o_d64 * stride_src_d + o_l[None, :]
    dst = dst_ptr + i_b.to(tl.int64) * stride_dst_b + o_d64 * stride_dst_d + o_l[None, :]
    if EVEN:
        tl.store(dst, tl.load(src))
    else:
        mask = (o_d[:, None] < dim) & (o_l[None, :] < seqlen)
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


def _copy_rows(dst, src) -> None:
    """dst.copy_(src) for (B, D, L) tensors of one dtype with unit stride along L, as 16-byte
    rows. torch's copy into a permuted layout (Mamba's dxz is a (B, 2D, L) view of a (2D, B * L)
    buffer) takes its unvectorised path: 2 x 69.8 us per mamba-130m layer on an H100 (1.4 TB/s)."""
    if dst.stride(2) != 1 or src.stride(2) != 1:
        dst.copy_(src)
        return
    batch, dim, seqlen = src.shape
    # 16 KB tiles (bf16) of 8 warps: with 4 KB tiles (4 rows, 4 warps) the copy moved 50 MB in
    # 32-36 us per mamba-130m / mamba2-130m layer on an H100 (~1.4 TB/s).
    rows, warps = (8, 8) if dim >= 64 else (4, 4)
    # The widest tile along L that divides it (no masked tail), at most 1024.
    block_l = next((b for b in (1024, 512, 256) if seqlen % b == 0), 1024)
    vec = 16 // src.element_size()
    # The pointers' own alignment Triton specialises on; only the strides need telling.
    aligned = all(t.stride(1) % vec == 0 and t.stride(0) % vec == 0 for t in (src, dst))
    vec = vec if aligned else 1
    launch(_copy_rows_kernel, (cdiv(seqlen, block_l), cdiv(dim, rows), batch), src, dst, dim, seqlen,
           src.stride(0) // vec, src.stride(1) // vec, dst.stride(0) // vec, dst.stride(1) // vec,
           ROWS=rows, BLOCK_L=block_l, EVEN=dim % rows == 0 and seqlen % block_l == 0, VEC=vec, num_warps=warps)


def _wgrad_outputs(xz, weight, bias):
    """(dweight (D, W), dbias (D,) or absent), uninitialised; shared with the fakes."""
    dw = torch.empty(weight.shape, device=xz.device, dtype=weight.dtype)
    db = torch.empty(weight.shape[0], device=xz.device, dtype=bias.dtype) if bias is not None else absent(xz)
    return dw, db


def _dxz_outputs(xz, weight, bias, dz):
    """(dxz in xz's layout, dweight (D, W), dbias (D,) or absent), uninitialised; shared with the fake."""
    return (torch.empty_like(xz, dtype=dz.dtype), *_wgrad_outputs(xz, weight, bias))  # keeps a dense xz's strides


def _conv_bwd_dxz_launcher(xz: Tensor, weight: Tensor, bias: Optional[Tensor], dxc: Tensor,
                           dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of xc = silu(conv1d(x) + bias) for x = xz[:, :D], written into the x half of
    dxz (B, 2D, L), and dz (B, D, L) copied into its z half -> (dxz, dweight (D, W), dbias (D,) or
    empty). dxz takes xz's layout, so that Mamba's (2D, B * L) product gets its gradient without
    another copy; the conv writes dx there itself (no (B, D, L) dx, no copy of it)."""
    dim = dz.shape[1]
    dxz, dw, db = _dxz_outputs(xz, weight, bias, dz)
    _launch_conv_bwd(dxz[:, :dim], dw, db, xz[:, :dim], weight, bias, None, None, None, True, dxc)
    _copy_rows(dxz[:, dim:], dz)
    return dxz, dw, db


_conv_bwd_dxz = launcher_op("mamba_inner_conv_bwd_dxz")(_conv_bwd_dxz_launcher)


@_conv_bwd_dxz.register_fake
def _(xz, weight, bias, dxc, dz):
    return _dxz_outputs(xz, weight, bias, dz)


@launcher_op("mamba_inner_conv_bwd_into_dxz", mutates_args=("dxz",))
def _conv_bwd_into_dxz(dxz: Tensor, xz: Tensor, weight: Tensor, bias: Optional[Tensor],
                       dxc: Tensor) -> tuple[Tensor, Tensor]:
    """_conv_bwd_dxz when the scan's backward has written dz into dxz's z half already (its dz_pair
    buffer, in xz's layout): the conv's input gradient into the x half -> (dweight, dbias or empty)."""
    dw, db = _wgrad_outputs(xz, weight, bias)
    dim = dxc.shape[1]
    _launch_conv_bwd(dxz[:, :dim], dw, db, xz[:, :dim], weight, bias, None, None, None, True, dxc)
    return dw, db


@_conv_bwd_into_dxz.register_fake
def _(dxz, xz, weight, bias, dxc):
    return _wgrad_outputs(xz, weight, bias)


def _conv_weight(conv1d_weight):
    """(D, W) from a (D, W) or (D, 1, W) conv1d weight."""
    return rearrange(conv1d_weight, "d 1 w -> d w") if conv1d_weight.dim() == 3 else conv1d_weight


def _conv(x, conv1d_weight, conv1d_bias, cu_seqlens, backend):
    """silu(causal_conv1d(x) + bias) (B, D, L) on the chosen backend."""
    weight = _conv_weight(conv1d_weight)
    if backend == "torch":
        return causal_conv1d_ref(x, weight, conv1d_bias, activation="silu", cu_seqlens=cu_seqlens)
    return causal_conv1d_fn(x, weight, conv1d_bias, activation="silu", cu_seqlens=cu_seqlens, backend=backend)


def _projections(xc, x_proj_weight, delta_proj_weight, dstate, B, C, B_proj_bias, C_proj_bias):
    """x_dbl (B, R + 2N, L), delta (B, D, L) in xc.dtype, and B, C ((B, N, L) slices of x_dbl
    plus their biases where they are not given)."""
    rank = delta_proj_weight.shape[1]
    # Batched products on the (B, D, L) layout: x_dbl and delta come out contiguous, with no
    # transposed copy of xc. (A (D, B, L)-strided delta would also trip a torch CPU stride bug
    # in softplus_backward under torch.compile's aot_eager.)
    x_dbl = _left_matmul(x_proj_weight, xc)
    delta = _left_matmul(delta_proj_weight, x_dbl[:, :rank]).to(xc.dtype)
    if B is None:
        B = x_dbl[:, rank:rank + dstate]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)[:, None]
    if C is None:
        C = x_dbl[:, rank + dstate:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)[:, None]
    return x_dbl, delta, B, C


def _inner_scan(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                B_proj_bias, C_proj_bias, delta_softplus, cu_seqlens, backend):
    """Everything before out_proj; returns the gated scan output y (B, D, L)."""
    x, z = xz.chunk(2, dim=1)
    xc = _conv(x, conv1d_weight, conv1d_bias, cu_seqlens, backend)
    _, delta, B, C = _projections(xc, x_proj_weight, delta_proj_weight, A.shape[1], B, C, B_proj_bias, C_proj_bias)
    scan = selective_scan_ref if backend == "torch" else functools.partial(selective_scan_fn, backend=backend)
    return scan(xc, delta, A, B, C, D, z, delta_bias, delta_softplus, cu_seqlens=cu_seqlens)


def _scan_saving_states(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias,
                        B_proj_bias, C_proj_bias, delta_softplus, cu_seqlens, backend):
    """The Triton forward of _inner_scan (B and C from x_proj) through the scan kernel that
    also stores the backward's state checkpoints: (y (B, D, L), checkpoints)."""
    x, z = xz.chunk(2, dim=1)
    xc = _conv(x, conv1d_weight, conv1d_bias, cu_seqlens, backend)
    _, delta, B, C = _projections(xc, x_proj_weight, delta_proj_weight, A.shape[1], None, None, B_proj_bias,
                                  C_proj_bias)
    scan_inputs, num_seqs = _kernel_inputs(xc, delta, A, B, C, D, z, delta_bias, None, cu_seqlens)
    y, _, ckpt = _selective_scan_fwd_op(*scan_inputs, num_seqs, delta_softplus, True)
    return y, ckpt


def _out_proj(y, weight, bias):
    """out_proj of the scan output y (B, D, L) -> (B, L, d_model) as one batched product
    that reads y transposed in place (F.linear on the (B, L, D) view would copy y)."""
    weight_t = weight.t().expand(y.shape[0], -1, -1)  # (B, D, d_model)
    if bias is None:
        return torch.bmm(y.transpose(1, 2), weight_t)
    return torch.baddbmm(bias.expand(y.shape[0], y.shape[2], -1), y.transpose(1, 2), weight_t)


def _inner_and_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                        out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                        cu_seqlens, backend):
    y = _inner_scan(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                    B_proj_bias, C_proj_bias, delta_softplus, cu_seqlens, backend)
    return _out_proj(y, out_proj_weight, out_proj_bias)


class MambaInnerFn(torch.autograd.Function):
    """By default saves only the inputs; the backward recomputes conv1d, the projections and
    the scan forward (which, unlike mamba_ssm, also avoids keeping the scan output for
    out_proj's weight gradient). With save_states (B and C from x_proj, Triton) it also saves
    the scan output and the scan's state checkpoints, and the backward skips the scan forward."""

    @staticmethod
    def forward(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, options):
        delta_softplus, cu_seqlens, backend, save_states = options
        inputs = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                  B_proj_bias, C_proj_bias)
        if save_states:
            y, ckpt = _scan_saving_states(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D,
                                          delta_bias, B_proj_bias, C_proj_bias, delta_softplus, cu_seqlens, backend)
            ctx.save_for_backward(*inputs, out_proj_weight, out_proj_bias, y, ckpt)
        else:
            y = _inner_scan(*inputs, delta_softplus, cu_seqlens, backend)
            ctx.save_for_backward(*inputs, out_proj_weight, out_proj_bias)
        ctx.options = options
        ctx.autocast = (torch.is_autocast_enabled(xz.device.type), torch.get_autocast_dtype(xz.device.type))
        return _out_proj(y, out_proj_weight, out_proj_bias)

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        inputs, (out_proj_weight, out_proj_bias), states = saved[:12], saved[12:14], saved[14:]
        enabled, dtype = ctx.autocast
        with torch.autocast(inputs[0].device.type, dtype=dtype, enabled=enabled):
            if inputs[6] is None and inputs[7] is None:
                return _inner_backward(ctx, dout, inputs, out_proj_weight, out_proj_bias, states)
            return _inner_backward_autograd(ctx, dout, inputs, out_proj_weight, out_proj_bias)


def _out_proj_backward(dout, y, out_proj_weight, out_proj_bias):
    """dy (B, D, L) and the out_proj gradients, from batched products that read y and dout
    transposed in place (no (B, D, L) copies)."""
    dout = dout.to(y.dtype)
    dy = torch.bmm(out_proj_weight.to(dout.dtype).t().expand(dout.shape[0], -1, -1), dout.transpose(1, 2))
    d_out_proj_weight = torch.bmm(dout.transpose(1, 2), y.transpose(1, 2)).sum(0, dtype=torch.float32)
    d_out_proj_bias = dout.sum(dim=(0, 1)).to(out_proj_bias.dtype) if out_proj_bias is not None else None
    return dy, d_out_proj_weight.to(out_proj_weight.dtype), d_out_proj_bias


def _inner_backward_autograd(ctx, dout, inputs, out_proj_weight, out_proj_bias):
    """Backward with B or C given: recompute the forward with a graph and differentiate it."""
    delta_softplus, cu_seqlens, backend, _ = ctx.options
    leaves = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip(inputs, ctx.needs_input_grad[:5] + ctx.needs_input_grad[7:14])]
    with torch.enable_grad():
        y = _inner_scan(*leaves, delta_softplus, cu_seqlens, backend)
    dy, d_out_proj_weight, d_out_proj_bias = _out_proj_backward(dout, y.detach(), out_proj_weight, out_proj_bias)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else [])
    dinputs = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    return (*dinputs[:5], d_out_proj_weight, d_out_proj_bias, *dinputs[5:], None)


def _weight_grad(dout, x, weight):
    """Gradient of weight (E, K) in weight @ x for dout (B, E, L), x (B, K, L), summed over the batch in fp32."""
    return torch.bmm(dout, x.transpose(1, 2)).sum(0, dtype=torch.float32).to(weight.dtype)


def _inner_backward(ctx, dout, inputs, out_proj_weight, out_proj_bias, states):
    """Backward with B and C from x_proj, written out instead of a second autograd pass over
    the recomputed forward (about half the host time of a training step's Mamba block): only
    the conv is recomputed with a graph; x_proj, dt_proj and (unless ``states`` holds the
    forward's scan output and checkpoints) the scan forward are recomputed plainly, and their
    gradients are batched products and the scan's backward launcher."""
    (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, _, _, D, delta_bias, B_proj_bias,
     C_proj_bias) = inputs
    delta_softplus, cu_seqlens, backend, _ = ctx.options
    needs = ctx.needs_input_grad
    rank = delta_proj_weight.shape[1]
    xz = xz.detach()
    x, z = xz.chunk(2, dim=1)
    # Without packed sequences the conv's backward launcher writes its input gradient straight
    # into dxz; packed sequences take the conv's autograd (its sequence-start handling).
    direct = cu_seqlens is None
    if direct:
        conv_weight = _conv_weight(conv1d_weight).contiguous()
        xc = _conv(x, conv_weight, conv1d_bias, None, backend)
    else:
        conv_leaves = [x.requires_grad_(needs[0]), conv1d_weight.detach().requires_grad_(needs[1]),
                       conv1d_bias.detach().requires_grad_(needs[2]) if conv1d_bias is not None else None]
        with torch.enable_grad():
            xc = _conv(x, conv_leaves[1], conv_leaves[2], cu_seqlens, backend)
    xc_plain = xc.detach()
    x_dbl, delta, B, C = _projections(xc_plain, x_proj_weight, delta_proj_weight, A.shape[1], None, None,
                                      B_proj_bias, C_proj_bias)
    scan_inputs, num_seqs = _kernel_inputs(xc_plain, delta, A, B, C, D, z, delta_bias, None, cu_seqlens)
    if states:
        y, ckpt = states
    else:
        y, _, ckpt = _selective_scan_fwd_op(*scan_inputs, num_seqs, delta_softplus, True)
    dy, d_out_proj_weight, d_out_proj_bias = _out_proj_backward(dout, y, out_proj_weight, out_proj_bias)
    # Without packed sequences dz comes back as the z half of a buffer in xz's layout (dz_pair), which
    # becomes dxz: the conv's backward writes the x half (no copy of dz).
    dxc, ddelta, dz, _, dgrads = _selective_scan_bwd_op(*scan_inputs, num_seqs, delta_softplus, ckpt, dy, None,
                                                        direct)
    form = (B.shape, B.dtype, True)
    dA, dB, dC, dD, ddelta_bias = _param_grads(dgrads, *A.shape, form, (C.shape, C.dtype, True),
                                               D is not None, delta_bias is not None)
    # d x_dbl (B, R + 2N, L): dt_proj's input gradient, then dB and dC.
    ddelta = ddelta.to(x_dbl.dtype)
    dx_dbl = torch.cat([_left_matmul(delta_proj_weight.t(), ddelta).to(x_dbl.dtype), dB.to(x_dbl.dtype),
                        dC.to(x_dbl.dtype)], dim=1)
    d_delta_proj_weight = _weight_grad(ddelta, x_dbl[:, :rank], delta_proj_weight)
    d_x_proj_weight = _weight_grad(dx_dbl, xc_plain.to(dx_dbl.dtype), x_proj_weight)
    if dxc.dtype == dx_dbl.dtype:
        # The add in the product's epilogue, in place: one pass less over (B, D, L), and no copy
        # of dxc into a new result first (out-of-place baddbmm's memcpy, 30 us per mamba-130m layer).
        dxc = dxc.baddbmm_(x_proj_weight.t().expand(dxc.shape[0], -1, -1), dx_dbl)
    else:
        dxc = dxc + _left_matmul(x_proj_weight.t(), dx_dbl).to(dxc.dtype)
    d_B_proj_bias = dB.sum(dim=(0, 2)).to(B_proj_bias.dtype) if B_proj_bias is not None else None
    d_C_proj_bias = dC.sum(dim=(0, 2)).to(C_proj_bias.dtype) if C_proj_bias is not None else None
    if direct:
        dim = dxc.shape[1]
        if dz.shape[1] == 2 * dim:  # the scan's buffer: xz's dtype and strides (z is a view of xz)
            dxz = dz
            d_conv1d_weight, d_conv1d_bias = _conv_bwd_into_dxz(dxz, xz, conv_weight, conv1d_bias, dxc)
        else:
            dxz, d_conv1d_weight, d_conv1d_bias = _conv_bwd_dxz(xz, conv_weight, conv1d_bias, dxc, dz.to(xz.dtype))
        dxz = dxz if needs[0] else None
        d_conv1d_weight = d_conv1d_weight.view(conv1d_weight.shape) if needs[1] else None
        d_conv1d_bias = d_conv1d_bias if needs[2] and conv1d_bias is not None else None
    else:
        wanted = [t for t in conv_leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(xc, wanted, dxc) if wanted else [])
        dx, d_conv1d_weight, d_conv1d_bias = [next(grads) if t is not None and t.requires_grad else None
                                              for t in conv_leaves]
        dxz = None
        if dx is not None:
            # In xz's layout (empty_like keeps a dense tensor's strides), as _conv_bwd_dxz's.
            dxz = torch.empty_like(xz, dtype=dx.dtype)
            dim = dx.shape[1]
            dxz[:, :dim].copy_(dx)
            dxz[:, dim:].copy_(dz)
    return (dxz, d_conv1d_weight, d_conv1d_bias, d_x_proj_weight, d_delta_proj_weight, d_out_proj_weight,
            d_out_proj_bias, dA, None, None, dD, ddelta_bias, d_B_proj_bias, d_C_proj_bias, None)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                    out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                    C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1, *, cu_seqlens=None):
    """Torch reference of :func:`mamba_inner_fn` (plain autograd; checkpoint_lvl has
    no effect on the result)."""
    _check_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                 out_proj_bias, A, B, C, cu_seqlens)
    y = _inner_scan(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                    B_proj_bias, C_proj_bias, delta_softplus, cu_seqlens, "torch")
    return F.linear(rearrange(y, "b d l -> b l d"), out_proj_weight, out_proj_bias)


def _recompute_policy(save_states, ctx, op, *args, **kwargs):
    """Selective-checkpoint policy of mamba_inner_fn's compiled path: recompute everything,
    except the scan forward's outputs (output, last state, checkpoints) with save_states."""
    if save_states and op is torch.ops.mamba_pkg.selective_scan_fwd.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_RECOMPUTE


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                   C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1, *, cu_seqlens=None, backend=None,
                   save_scan_states=False):
    """The Mamba-1 block's inner path, fused for training memory.

    Args:
        xz: (B, 2*D, L) in_proj output, x and z halves.
        conv1d_weight: (D, W) or (D, 1, W); conv1d_bias: (D,) or None.
        x_proj_weight: (R + 2*N, D), rows [dt (R); B (N); C (N)].
        delta_proj_weight: (D, R).
        out_proj_weight: (d_model, D); out_proj_bias: (d_model,) or None.
        A: (D, N) fp32. B, C: None (taken from x_proj) or as in :func:`selective_scan_fn`.
        D, delta_bias: (D,) fp32 or None. B_proj_bias, C_proj_bias: (N,) or None.
        delta_softplus: softplus on dt (+ delta_bias).
        checkpoint_lvl: 0 keeps every intermediate for the backward (plain autograd);
            1 (default) keeps only the inputs and recomputes conv1d, x_proj, dt_proj and
            the scan forward in the backward.
        cu_seqlens: (num_seqs + 1,) packed-sequence boundaries (B must be 1); conv and
            scan both restart at every boundary.
        backend: "torch" | "triton" | None.
        save_scan_states: with checkpoint_lvl=1 on the Triton path and B, C from x_proj, also
            keep the scan output and the scan's fp32 state checkpoints (one (D, N) state per 8
            steps: 8 bytes per (b, d, l) at N = 16, plus 2 for a bf16 output) so the backward
            does not run the scan forward again: a faster training step (about 7 ms of 80 per
            mamba-130m step at 8 x 2048 on an H100) for about 3x the block's saved activation
            memory. No effect elsewhere (checkpoint_lvl=0 and the torch backend keep
            everything anyway; with B or C given the backward recomputes with a graph).

    Returns:
        (B, L, d_model) in the dtype of xz (or the autocast dtype).
    """
    if cu_seqlens is not None or not _inner_ok(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                               out_proj_weight, out_proj_bias, A, B, C):
        _check_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                     out_proj_bias, A, B, C, cu_seqlens)
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl}")
    if not isinstance(save_scan_states, bool):
        raise TypeError(f"save_scan_states must be a bool, got {type(save_scan_states).__name__}")
    which = resolve_backend(backend, xz, conv1d_weight, A)
    if which == "torch" or checkpoint_lvl == 0 or not torch.is_grad_enabled():
        y = _inner_scan(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                        B_proj_bias, C_proj_bias, delta_softplus, cu_seqlens, which)
        return F.linear(rearrange(y, "b d l -> b l d"), out_proj_weight, out_proj_bias) if which == "torch" \
            else _out_proj(y, out_proj_weight, out_proj_bias)
    save_states = save_scan_states and B is None and C is None
    if torch.compiler.is_compiling():
        # MambaInnerFn's backward re-runs the forward under torch.autograd.grad, which dynamo
        # cannot trace; the same recompute as non-reentrant activation checkpointing traces
        # into one graph. Every op in it is marked must-recompute (but the scan forward with
        # save_scan_states), so only the inputs are saved, as in eager: left to prefer, torch
        # 2.11's partitioner saved the scan's checkpoints and intermediates instead (compiled
        # mamba-1.4b, 4 x 2048: 32.5 GiB peak against 14.5 eager).
        return torch.utils.checkpoint.checkpoint(
            _inner_and_out_proj, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
            out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
            cu_seqlens, which, use_reentrant=False,
            context_fn=functools.partial(create_selective_checkpoint_contexts,
                                         functools.partial(_recompute_policy, save_states)))
    return MambaInnerFn.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                              out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                              (delta_softplus, cu_seqlens, which, save_states))
