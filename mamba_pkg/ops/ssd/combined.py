"""Mamba-2 SSD public entry points: input checks, then the torch or Triton path.

``mamba_chunk_scan_combined``: the chunked SSD scan (formula and shapes in
reference.py). ``mamba_split_conv1d_scan_combined``: the whole Mamba-2 mixer
after in_proj (split -> causal conv1d + silu -> SSD -> gated RMSNorm -> out_proj).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    resolve_backend,
    seq_idx_from_cu_seqlens,
)
from mamba_pkg.ops.ssd.reference import mamba_chunk_scan_combined_ref

INT_DTYPES = (torch.int32, torch.int64)


def _check_dt_limit(dt_limit) -> tuple:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of floats (min, max), got {dt_limit!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi or lo < 0:
        raise ValueError(f"dt_limit must satisfy 0 <= min <= max, got {dt_limit!r}")
    return lo, hi


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _check_seq_idx(seq_idx, batch: int, L: int, device) -> None:
    check_tensor("seq_idx", seq_idx, shape=(batch, L), dtype=INT_DTYPES, device=device, optional=True)
    # A value check reads the tensor on the host: eager only, not while torch.compile traces.
    if (seq_idx is not None and L > 1 and not torch.compiler.is_compiling()
            and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any())):
        raise ValueError("seq_idx must be non-decreasing along L (one run of positions per sequence)")


def check_chunk_scan_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                            dt_limit, return_varlen_states):
    """Validate the arguments of ``mamba_chunk_scan_combined``; returns (dt_limit, num_seqs)."""
    check_tensor("x", x, ndim=4, dtype=FLOAT_DTYPES)
    batch, L, H, P = x.shape
    if L < 1 or H < 1 or P < 1:
        raise ValueError(f"x must have shape (B, L, H, P) with L, H, P >= 1, got {tuple(x.shape)}")
    device = check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                               initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    _check_chunk_size(chunk_size)
    check_tensor("dt", dt, shape=(batch, L, H), dtype=FLOAT_DTYPES)
    check_tensor("A", A, shape=(H,), dtype=FLOAT_DTYPES)
    check_tensor("B", B, ndim=4, dtype=FLOAT_DTYPES)
    if B.shape[:2] != (batch, L):
        raise ValueError(f"B must have shape (B, L, G, N) = ({batch}, {L}, G, N), got {tuple(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G < 1 or N < 1 or H % G != 0:
        raise ValueError(f"B has G={G} groups; the number of heads H={H} must be a multiple of G (and N >= 1)")
    check_tensor("C", C, shape=(batch, L, G, N), dtype=FLOAT_DTYPES)
    if D is not None:
        check_tensor("D", D, ndim=(1, 2), dtype=FLOAT_DTYPES)
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"D must have shape ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    check_tensor("z", z, shape=(batch, L, H, P), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("dt_bias", dt_bias, shape=(H,), dtype=FLOAT_DTYPES, optional=True)
    dt_limit = _check_dt_limit(dt_limit)

    num_seqs = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, L, batch)
        num_seqs = cu_seqlens.numel() - 1
        if seq_idx is not None:
            check_tensor("seq_idx", seq_idx, shape=(batch, L), dtype=INT_DTYPES)
            if not torch.compiler.is_compiling() and not torch.equal(
                    seq_idx.long(), seq_idx_from_cu_seqlens(cu_seqlens, L).long()):
                raise ValueError("seq_idx disagrees with cu_seqlens; pass one of them (cu_seqlens is enough)")
    else:
        _check_seq_idx(seq_idx, batch, L, device)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens (the packed sequence boundaries)")
    state_rows = batch if cu_seqlens is None else num_seqs
    want = "(B, H, P, N)" if cu_seqlens is None else "(num_seqs, H, P, N)"
    if initial_states is not None:
        check_tensor("initial_states", initial_states, ndim=4, dtype=FLOAT_DTYPES)
        if tuple(initial_states.shape) != (state_rows, H, P, N):
            raise ValueError(f"initial_states must have shape {want} = {(state_rows, H, P, N)}, "
                             f"got {tuple(initial_states.shape)}")
    return dt_limit, num_seqs


# ---------------------------------------------------------------------------
# The Triton path: three forward launches, six backward launches, small torch glue.
# ---------------------------------------------------------------------------


def _kernel_chunk_len(chunk_size: int) -> int:
    """The chunk length the kernels use: chunk_size rounded up to a power of two in [16, 256].

    The result does not depend on the chunk length beyond rounding, and the
    kernels need a power of two of at least 16 rows for their matrix products.
    """
    return min(256, max(16, 1 << (int(chunk_size) - 1).bit_length()))


# Training speed for memory: the forward keeps the states entering each chunk (B, C, H, P, N)
# for the backward (B * C * H * P * N bf16, half of x's bytes at P = 64, N = 128), which then
# runs only the reverse walk instead of rerunning the forward walk beside it. On by default: an
# H100 fwd+bwd at B=4 L=8192 H=32 went 1.558 -> 1.451 ms (graph) for 67 MB; mamba2-130m training
# (8 x 2048) keeps ~25 MB more per layer. mamba_split_conv1d_scan_combined(recompute=True) keeps
# nothing but the inputs, whatever this says.
SAVE_STATES = True


def _ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, options):
    """The Triton forward: out, the final state and the tensors the backward needs (with
    options' save_states, the states between chunks last)."""
    from mamba_pkg.ops.ssd.chunk_scan import _chunk_scan_fwd

    Q, dt_softplus, dt_limit, save_states = options
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    out, ypre, final, dt_c, cs_c, states = _chunk_scan_fwd(x, z, dt, A, B, C, D, dt_bias, seq_idx, initial_states,
                                                           dt_softplus, dt_limit[0], dt_limit[1], Q, save_states)
    # The processed dt and its cumsum (B, H, C, Q) fp32 are kept (small next to x): the
    # backward's state-gradient walk then needs nothing from its rerun of the forward walk.
    return out, final, (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, ypre if z is not None else None,
                        dt_c, cs_c) + ((states,) if save_states else ())


class SsdChunkScanFn(torch.autograd.Function):
    """Triton SSD: out (B, L, H, P) and final state (B, H, P, N), both differentiable.

    options = (Q, dt_softplus, dt_limit, save_states). The backward recomputes the states
    between chunks instead of keeping them from the forward pass, unless save_states. Every
    launch is a torch.ops.mamba_pkg custom op, so torch.compile sees them as opaque nodes.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, options):
        out, final, saved = _ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, options)
        ctx.save_for_backward(*saved)
        ctx.options = options
        # An unused final state gets no zero-filled gradient (the walk then starts from zero).
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        from mamba_pkg.ops.ssd.chunk_scan import _chunk_scan_bwd

        saved = ctx.saved_tensors  # read once: activation checkpointing (recompute=True) unpacks once
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, ypre, dt_c, cs_c = saved[:13]
        Q, dt_softplus, dt_limit, save_states = ctx.options
        dout = dout.contiguous() if dout is not None else torch.zeros_like(x)
        # One op: the walks (the reverse walk, and without saved states the forward walk's
        # rerun), then the tile kernels; the dt, dt_bias and A gradients (decay sums, clamp and
        # softplus backward) come out of the last kernel: no torch glue here.
        dx, dz, dB, dC, ddt, dA, ddt_bias, dD, dinit = _chunk_scan_bwd(
            x, dout, z, ypre, dt, A, B, C, D, dt_bias, seq_idx, dt_c, cs_c, saved[13] if save_states else None, None,
            dt_softplus, dt_limit[0], dt_limit[1], Q, initial_states=initial_states, dfinal=dfinal)
        dinit = dinit.to(initial_states.dtype) if initial_states is not None else None
        return (dx, ddt, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                ddt_bias if dt_bias is not None else None, dinit, None, None)


def _varlen_terms(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit, initial_states, cu_seqlens, want_states):
    """Torch glue for packed sequences: the output term of each sequence's initial state
    (B=1, L, H, P) fp32 or None, and the per-sequence final states (num_seqs, H, P, N) or None.

    Both are linear in the initial states and cheap next to the scan; autograd
    differentiates them.
    """
    from einops import repeat

    from mamba_pkg.ops.ssd.reference import process_dt

    _, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dt_p = process_dt(dt, dt_bias, dt_softplus, dt_limit)[0]  # (L, H)
    dA = dt_p * A.float()
    y_init = torch.zeros(L, H, P, device=x.device) if initial_states is not None else None
    states = []
    bounds = cu_seqlens.tolist()
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        init_k = initial_states[k].float() if initial_states is not None else None
        if end == start:
            states.append(init_k if init_k is not None else torch.zeros(H, P, N, device=x.device))
            continue
        cs = dA[start:end].cumsum(0)  # (l, H)
        if init_k is not None:
            C_k = repeat(C[0, start:end].float(), "l g n -> l (g r) n", r=H // G)
            y_k = torch.einsum("lhn,hpn->lhp", C_k, init_k) * cs.exp().unsqueeze(-1)
            y_init = y_init.index_add(0, torch.arange(start, end, device=x.device), y_k)
        if want_states:
            B_k = repeat(B[0, start:end].float(), "l g n -> l (g r) n", r=H // G)
            w = (cs[-1:] - cs).exp() * dt_p[start:end]  # (l, H)
            state = torch.einsum("lh,lhp,lhn->hpn", w, x[0, start:end].float(), B_k)
            if init_k is not None:
                state = state + cs[-1].exp().view(H, 1, 1) * init_k
            states.append(state)
    return (None if y_init is None else y_init.unsqueeze(0)), (torch.stack(states) if want_states else None)


# The varlen terms read cu_seqlens on the host (one loop step per sequence). As a custom op
# they are one opaque node for torch.compile, so packed training traces as one graph; the
# backward op recomputes the terms under autograd inside its own (opaque) body.

_VARLEN_INPUTS = ("x", "dt", "A", "B", "C", "dt_bias", "initial_states")


def _varlen_outputs(x, B, initial_states, cu_seqlens, want_states):
    """(y_init (1, L, H, P) fp32, states (num_seqs, H, P, N) fp32), empty where not asked for."""
    _, L, H, P = x.shape
    y_init = x.new_empty(1, L, H, P, dtype=torch.float32) if initial_states is not None else absent(x)
    states = (x.new_empty(cu_seqlens.shape[0] - 1, H, P, B.shape[3], dtype=torch.float32) if want_states
              else absent(x))
    return y_init, states


def _varlen_terms_or_absent(x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max,
                            want_states):
    """_varlen_terms with the ops' argument order, absent(x) in place of a term not asked for."""
    y_init, states = _varlen_terms(x, dt, A, B, C, dt_bias, dt_softplus, (dt_min, dt_max), initial_states,
                                   cu_seqlens, want_states)
    return (y_init if y_init is not None else absent(x)), (states if states is not None else absent(x))


@launcher_op("ssd_varlen_terms")
def _varlen_terms_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, dt_bias: Tensor | None,
                     initial_states: Tensor | None, cu_seqlens: Tensor, dt_softplus: bool, dt_min: float,
                     dt_max: float, want_states: bool) -> tuple[Tensor, Tensor]:
    """_varlen_terms as a custom op: (y_init, states), each empty when not asked for."""
    return _varlen_terms_or_absent(x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max,
                                   want_states)


@_varlen_terms_op.register_fake
def _(x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max, want_states):
    return _varlen_outputs(x, B, initial_states, cu_seqlens, want_states)


@launcher_op("ssd_varlen_terms_bwd")
def _varlen_terms_bwd(dy_init: Tensor | None, dstates: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                      C: Tensor, dt_bias: Tensor | None, initial_states: Tensor | None, cu_seqlens: Tensor,
                      dt_softplus: bool, dt_min: float, dt_max: float,
                      want_states: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the varlen terms wrt x, dt, A, B, C, dt_bias, initial_states (empty for a
    missing input), by recomputing the terms under autograd."""
    given = [t for t in (x, dt, A, B, C, dt_bias, initial_states) if t is not None]
    has_bias, has_init = dt_bias is not None, initial_states is not None

    def terms(*tensors):
        it = iter(tensors)
        args = [next(it) for _ in range(5)]
        bias = next(it) if has_bias else None
        init = next(it) if has_init else None
        return _varlen_terms_or_absent(*args, bias, init, cu_seqlens, dt_softplus, dt_min, dt_max, want_states)

    # torch.func.vjp, not torch.autograd: a custom op's body runs below the autograd
    # dispatch key (under torch.compile), where autograd records nothing.
    outs, vjp = torch.func.vjp(terms, *given)
    cotangents = tuple(g if g is not None and o.numel() else torch.zeros_like(o) for o, g in zip(outs, (dy_init, dstates)))
    grads = iter(vjp(cotangents))
    return tuple(next(grads) if t is not None else absent(x) for t in (x, dt, A, B, C, dt_bias, initial_states))


@_varlen_terms_bwd.register_fake
def _(dy_init, dstates, x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max,
      want_states):
    return tuple(torch.empty_like(t) if t is not None else absent(x) for t in (x, dt, A, B, C, dt_bias, initial_states))


def _varlen_setup(ctx, inputs, output):
    x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_min, dt_max, want_states = inputs
    ctx.save_for_backward(x, dt, A, B, C, dt_bias, initial_states, cu_seqlens)
    ctx.options = (dt_softplus, dt_min, dt_max, want_states)


def _varlen_backward(ctx, dy_init, dstates):
    x, dt, A, B, C, dt_bias, initial_states, cu_seqlens = ctx.saved_tensors
    grads = _varlen_terms_bwd(dy_init, dstates, x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, *ctx.options)
    given = (x, dt, A, B, C, dt_bias, initial_states)
    return (*(g if t is not None else None for g, t in zip(grads, given)), None, None, None, None, None)


_varlen_terms_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def _chunk_scan_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
                       dt_limit, return_final_states, return_varlen_states):
    Q = _kernel_chunk_len(chunk_size)
    if cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    varlen_init = cu_seqlens is not None and initial_states is not None
    # With per-sequence initial states the gate must see their output term too.
    gate_in_kernel = z is not None and not varlen_init
    args = (x, dt, A, B, C, D, z if gate_in_kernel else None, dt_bias, None if cu_seqlens is not None else initial_states,
            seq_idx)
    options = (Q, bool(dt_softplus), tuple(dt_limit))
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        out, final = SsdChunkScanFn.apply(*args, options + (SAVE_STATES,))
    else:
        # Nothing to record for autograd (eager inference): the forward alone, without the
        # autograd.Function's host time.
        out, final = _ssd_forward(*args, options + (False,))[:2]
    varlen_states = None
    want_states = return_final_states or return_varlen_states
    if cu_seqlens is not None and (initial_states is not None or want_states):
        y_init, varlen_states = _varlen_terms_op(x, dt, A, B, C, dt_bias, initial_states, cu_seqlens,
                                                 bool(dt_softplus), dt_limit[0], dt_limit[1], want_states)
        if initial_states is not None:
            y = out.float() + y_init
            if z is not None:
                y = y * torch.nn.functional.silu(z.float())
            out = y.to(x.dtype)
        if want_states:
            final = varlen_states[-1:]
    result = (out,)
    if return_final_states:
        result += (final,)
    if return_varlen_states:
        result += (varlen_states,)
    return result[0] if len(result) == 1 else result


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    return_varlen_states=False,
    *,
    backend: Optional[str] = None,
):
    """Mamba-2 SSD scan over a whole sequence, chunked (mamba_ssm semantics).

    Args:
        x: (B, L, H, P) input.
        dt: (B, L, H) step sizes before dt_bias / softplus / dt_limit.
        A: (H,) decay rates (negative), fp32 recommended.
        B, C: (B, L, G, N); head h uses group h // (H / G).
        chunk_size: chunk length Q (L need not be a multiple of it). The Triton path
            rounds it up to a power of two in [16, 256]; the result depends on the
            chunk length only through rounding.
        D: (H,) or (H, P) skip connection, out = y + D * x.
        z: (B, L, H, P) gate, out = (y + D * x) * silu(z).
        dt_bias: (H,) added to dt before softplus.
        initial_states: (B, H, P, N) (or (num_seqs, H, P, N) with cu_seqlens).
        seq_idx: (B, L) int32, non-decreasing; no state crosses a change of value,
            and initial_states feeds the first run of each row.
        cu_seqlens: (num_seqs + 1,) int32 boundaries of packed sequences (B == 1).
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (min, max) clamp of the processed dt.
        return_final_states: also return the (B, H, P, N) fp32 state after the last step.
        return_varlen_states: also return (num_seqs, H, P, N) fp32 final states of
            each packed sequence (needs cu_seqlens).
        backend: "torch" | "triton" | None (see mamba_pkg.ops.backend).

    Returns:
        out (B, L, H, P) in x.dtype; with return_final_states (out, final_states);
        with return_varlen_states the varlen states come last.

    Every output is differentiable with respect to every tensor input. The Triton
    backward is deterministic (fixed-order reductions, no atomics).
    """
    dt_limit, _ = check_chunk_scan_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                          cu_seqlens, dt_limit, return_varlen_states)
    which = resolve_backend(backend, x, dt, A, B, C)
    if which == "triton":
        return _chunk_scan_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                                  dt_softplus, dt_limit, return_final_states, return_varlen_states)
    return mamba_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                         initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                         dt_softplus=dt_softplus, dt_limit=dt_limit,
                                         return_final_states=return_final_states,
                                         return_varlen_states=return_varlen_states)


# ---------------------------------------------------------------------------
# The Mamba-2 mixer after in_proj: split -> conv1d -> SSD -> gated RMSNorm -> out_proj.
# ---------------------------------------------------------------------------


def _split_sizes(zxbcdt, conv1d_weight, A, D, headdim, ngroups):
    """(D_inner, G * N, H, P, N) from the shapes, with errors naming the argument."""
    check_tensor("A", A, ndim=1, dtype=FLOAT_DTYPES)
    H = A.shape[0]
    if D is not None:
        check_tensor("D", D, ndim=(1, 2), dtype=FLOAT_DTYPES)
        if D.shape[0] != H:
            raise ValueError(f"D must have shape (H={H},) or (H={H}, P), got {tuple(D.shape)}")
        if D.dim() == 2:
            if headdim is not None and headdim != D.shape[1]:
                raise ValueError(f"headdim={headdim} disagrees with D of shape {tuple(D.shape)}")
            headdim = D.shape[1]
    if isinstance(headdim, bool) or not isinstance(headdim, int) or headdim < 1:
        raise ValueError(f"headdim must be a positive int when D is (H,) or None, got {headdim!r}")
    if isinstance(ngroups, bool) or not isinstance(ngroups, int) or ngroups < 1 or H % ngroups:
        raise ValueError(f"ngroups must be a positive int dividing the number of heads H={H}, got {ngroups!r}")
    d_inner = H * headdim
    check_tensor("conv1d_weight", conv1d_weight, ndim=2, dtype=FLOAT_DTYPES)
    conv_dim = conv1d_weight.shape[0]
    gn2 = conv_dim - d_inner
    if gn2 <= 0 or gn2 % (2 * ngroups):
        raise ValueError(f"conv1d_weight must have shape (D_inner + 2*G*N, W) with D_inner={d_inner} and G={ngroups}, "
                         f"got {tuple(conv1d_weight.shape)}")
    N = gn2 // (2 * ngroups)
    check_tensor("zxbcdt", zxbcdt, ndim=3, dtype=FLOAT_DTYPES)
    want = 2 * d_inner + 2 * ngroups * N + H
    if zxbcdt.shape[-1] != want:
        raise ValueError(f"zxbcdt must have shape (B, L, 2*D_inner + 2*G*N + H) = (B, L, {want}), "
                         f"got {tuple(zxbcdt.shape)}")
    return d_inner, H, headdim, N


def _split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx,
                       dt_limit, return_final_states, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight,
                       outproj_bias, headdim, ngroups, norm_before_gate, cu_seqlens, backend, split_op=False):
    """The composition itself; ``backend=None`` means the torch references. split_op (Triton):
    the split + conv as ops/split_conv1d.py's op (dense x, B, C; one dense zxbcdt gradient)."""
    batch, L, _ = zxbcdt.shape
    H = A.shape[0]
    d_inner = H * headdim
    G = ngroups
    N = (conv1d_weight.shape[0] - d_inner) // (2 * G)
    if split_op:
        from mamba_pkg.ops.split_conv1d import _split_conv1d

        # z's gradient comes back in zxbcdt's layout from the gated norm, its only consumer, and
        # becomes zxbcdt's gradient (norm.RMSNormGatedFn); compiled graphs keep the copy.
        adopt = rmsnorm_weight is not None and not torch.compiler.is_compiling()
        z, x, B, C, dt = _split_conv1d(zxbcdt, conv1d_weight, conv1d_bias, d_inner, G * N, activation is not None,
                                       seq_idx=seq_idx, cu_seqlens=cu_seqlens, adopt_dz=adopt)
        return _scan_norm_out_proj(x, dt, A, B, C, z, D, dt_bias, chunk_size, initial_states, seq_idx, dt_limit,
                                   return_final_states, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias,
                                   headdim, ngroups, norm_before_gate, cu_seqlens, backend, grad_z_rows=adopt)
    z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * G * N, H], dim=-1)
    conv_in = xBC.transpose(1, 2)  # (B, conv_dim, L), channel-last memory
    if backend is None:
        from mamba_pkg.ops.causal_conv1d import causal_conv1d_ref as conv

        conv_kw = {}
    else:
        from mamba_pkg.ops.causal_conv1d import causal_conv1d_fn as conv

        conv_kw = {"backend": backend}
    if cu_seqlens is not None:
        conv_out = conv(conv_in, conv1d_weight, conv1d_bias, activation=activation, cu_seqlens=cu_seqlens, **conv_kw)
    else:
        conv_out = conv(conv_in, conv1d_weight, conv1d_bias, activation=activation, seq_idx=seq_idx, **conv_kw)
    xBC = conv_out.transpose(1, 2)  # (B, L, conv_dim)
    x, B, C = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
    return _scan_norm_out_proj(x, dt, A, B, C, z, D, dt_bias, chunk_size, initial_states, seq_idx, dt_limit,
                               return_final_states, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias,
                               headdim, ngroups, norm_before_gate, cu_seqlens, backend)


def _scan_norm_out_proj(x, dt, A, B, C, z, D, dt_bias, chunk_size, initial_states, seq_idx, dt_limit, return_final_states,
                        rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                        norm_before_gate, cu_seqlens, backend, grad_z_rows=False):
    """The mixer after the conv: x (B, L, D_inner), B / C (B, L, G*N), z (B, L, D_inner), dt (B, L, H).
    grad_z_rows: the gated norm returns z's gradient in z's row layout (norm.RMSNormGatedFn)."""
    batch, L, d_inner = x.shape
    H, G = A.shape[0], ngroups
    N = B.shape[-1] // G
    x = x.reshape(batch, L, H, headdim)
    B = B.reshape(batch, L, G, N)
    C = C.reshape(batch, L, G, N)
    scan_kw = dict(D=D, z=None if rmsnorm_weight is not None else z.reshape(batch, L, H, headdim), dt_bias=dt_bias,
                   initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=True,
                   dt_limit=dt_limit, return_final_states=return_final_states and cu_seqlens is None,
                   return_varlen_states=return_final_states and cu_seqlens is not None)
    if backend is None:
        scanned = mamba_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, **scan_kw)
    else:
        scanned = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **scan_kw, backend=backend)
    y, final_states = (scanned, None) if not return_final_states else scanned
    y = y.reshape(batch, L, d_inner)
    if rmsnorm_weight is not None:
        from mamba_pkg.ops.norm import RMSNormGatedFn, rms_norm_gated_fn, rms_norm_gated_ref

        if grad_z_rows:
            y = RMSNormGatedFn.apply(y, rmsnorm_weight.contiguous(), None, z, float(rmsnorm_eps), d_inner // G,
                                     norm_before_gate, True)
        elif backend is None:
            y = rms_norm_gated_ref(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=d_inner // G,
                                   norm_before_gate=norm_before_gate)
        else:
            y = rms_norm_gated_fn(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=d_inner // G,
                                  norm_before_gate=norm_before_gate, backend=backend)
    if outproj_weight is not None:
        y = torch.nn.functional.linear(y, outproj_weight.to(y.dtype),
                                       None if outproj_bias is None else outproj_bias.to(y.dtype))
    return y if not return_final_states else (y, final_states)


def _check_split_inputs(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx,
                        dt_limit, activation, rmsnorm_weight, outproj_weight, outproj_bias, headdim, ngroups,
                        cu_seqlens):
    d_inner, H, headdim, N = _split_sizes(zxbcdt, conv1d_weight, A, D, headdim, ngroups)
    batch, L, _ = zxbcdt.shape
    device = check_same_device(zxbcdt=zxbcdt, conv1d_weight=conv1d_weight, conv1d_bias=conv1d_bias, dt_bias=dt_bias,
                               A=A, D=D, initial_states=initial_states, seq_idx=seq_idx,
                               rmsnorm_weight=rmsnorm_weight, outproj_weight=outproj_weight,
                               outproj_bias=outproj_bias, cu_seqlens=cu_seqlens)
    if L < 1:
        raise ValueError(f"zxbcdt must have L >= 1, got shape {tuple(zxbcdt.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    check_tensor("conv1d_bias", conv1d_bias, shape=(conv1d_weight.shape[0],), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("dt_bias", dt_bias, shape=(H,), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("rmsnorm_weight", rmsnorm_weight, shape=(d_inner,), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("outproj_weight", outproj_weight, ndim=2, dtype=FLOAT_DTYPES, optional=True)
    if outproj_weight is not None and outproj_weight.shape[1] != d_inner:
        raise ValueError(f"outproj_weight must have shape (d_model, D_inner={d_inner}), got {tuple(outproj_weight.shape)}")
    if outproj_bias is not None:
        if outproj_weight is None:
            raise ValueError("outproj_bias is given without outproj_weight")
        check_tensor("outproj_bias", outproj_bias, shape=(outproj_weight.shape[0],), dtype=FLOAT_DTYPES)
    _check_chunk_size(chunk_size)
    dt_limit = _check_dt_limit(dt_limit)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, L, batch)
        if seq_idx is not None:
            raise ValueError("give seq_idx or cu_seqlens, not both")
    else:
        _check_seq_idx(seq_idx, batch, L, device)
    rows, who = (batch, "B") if cu_seqlens is None else (cu_seqlens.numel() - 1, "num_seqs")
    if initial_states is not None:
        check_tensor("initial_states", initial_states, dtype=FLOAT_DTYPES)
        if tuple(initial_states.shape) != (rows, H, headdim, N):
            raise ValueError(f"initial_states must have shape ({who}, H, P, N) = {(rows, H, headdim, N)}, "
                             f"got {tuple(initial_states.shape)}")
    return headdim, dt_limit


def mamba_split_conv1d_scan_combined_ref(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                         initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                         return_final_states=False, activation="silu", rmsnorm_weight=None,
                                         rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                         ngroups=1, norm_before_gate=True, *, cu_seqlens=None):
    """Torch reference of :func:`mamba_split_conv1d_scan_combined` (the torch references composed)."""
    if headdim is None and D is not None and D.dim() == 2:
        headdim = D.shape[1]
    return _split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states,
                              seq_idx, dt_limit, return_final_states, activation, rmsnorm_weight, rmsnorm_eps,
                              outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate, cu_seqlens, None)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True, *, cu_seqlens=None, backend=None,
                                     recompute=False):
    """The Mamba-2 mixer from the in_proj output on (mamba_ssm semantics).

    zxbcdt (B, L, 2*D_inner + 2*G*N + H) splits into z (D_inner), xBC
    (D_inner + 2*G*N) and dt (H). xBC goes through the causal depthwise conv
    (+ activation) and splits into x (B, L, H, P), B and C (B, L, G, N); the SSD
    scan runs with dt_softplus=True; then either out = y * silu(z) (no
    rmsnorm_weight) or the gated RMSNorm over groups of D_inner / G channels;
    then out_proj.

    Args:
        zxbcdt: (B, L, 2*D_inner + 2*G*N + H), D_inner = H * P.
        conv1d_weight: (D_inner + 2*G*N, W); conv1d_bias: (D_inner + 2*G*N,) or None.
        dt_bias: (H,) or None.  A: (H,).  D: (H,) or (H, P) (or None: then headdim is required).
        chunk_size: SSD chunk length.
        initial_states: SSD states (B, H, P, N) (with cu_seqlens: (num_seqs, H, P, N)).
        seq_idx: (B, L) int32 non-decreasing; neither conv nor scan crosses a change.
        dt_limit: (min, max) clamp of softplus(dt + dt_bias).
        return_final_states: also return fp32 final SSD states: (B, H, P, N), or with
            cu_seqlens one per packed sequence, (num_seqs, H, P, N).
        activation: None, "silu" or "swish" after the conv.
        rmsnorm_weight: (D_inner,) or None; rmsnorm_eps its epsilon; norm_before_gate
            as in rms_norm_gated_fn.
        outproj_weight: (d_model, D_inner) or None; outproj_bias: (d_model,) or None.
        headdim: P, needed when D is (H,) or None.
        ngroups: G.
        cu_seqlens: (num_seqs + 1,) int32 packed-sequence boundaries (B == 1).
        backend: "torch" | "triton" | None.
        recompute: (Triton, with gradients) keep only the inputs for the backward and
            recompute the conv, the scan and the norm there (activation checkpointing):
            less memory, a slower step. Default: the backward reuses the forward's conv
            outputs, scan output and normalised activations (about 3 * D_inner 16-bit values
            more per token and layer; mamba2-130m at 8 x 2048: ~3.8 GB over 24 layers).

    Returns:
        out (B, L, d_model) with outproj_weight, else (B, L, D_inner), dtype of
        zxbcdt; with return_final_states (out, final_states).
    """
    headdim, dt_limit = _check_split_inputs(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                            initial_states, seq_idx, dt_limit, activation, rmsnorm_weight,
                                            outproj_weight, outproj_bias, headdim, ngroups, cu_seqlens)
    which = resolve_backend(backend, zxbcdt, conv1d_weight, A)
    args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, dt_limit,
            return_final_states, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim,
            ngroups, norm_before_gate, cu_seqlens)
    if which == "torch":
        return _split_conv1d_scan(*args, None)
    if recompute and torch.is_grad_enabled():
        # Keep only the inputs; the conv output, the scan output and the normalised
        # activations are recomputed in the backward pass.
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_split_conv1d_scan, *args, which, use_reentrant=False)
    return _split_conv1d_scan(*args, which, split_op=True)
