"""Causal depthwise conv1d, for sequences and for decode steps.

    out[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * xpad[b, d, t + k])

x (B, D, L), weight (D, W) with W in 2..8, bias (D,), act = identity or silu, and
xpad (B, D, W-1+L) = [initial_states (B, D, W-1) or zeros ; x]. The final state is the
last W-1 columns of xpad (the inputs a continuation needs).

Packed sequences (``seq_idx`` (B, L) or ``cu_seqlens`` (num_seqs+1,)) never mix: an
input only reaches outputs of its own sequence. With ``cu_seqlens`` every sequence has
its own initial / final state (num_seqs, D, W-1). With ``seq_idx`` the one state per
row belongs to the row's first (initial) and last (final) sequence.

``causal_conv1d_update`` runs T new tokens against a rolling ``conv_state``
(B_state, D, S), S >= W-1, holding the last S inputs oldest first (or, with
``cache_seqlens``, a circular buffer), and updates it in place.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_pkg.ops._launch import Plan, PlanCache, settings_cache
from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    next_pow2,
    ptx_math,
    ptx_sigmoid,
    resolve_backend,
    seq_idx_from_cu_seqlens,
    sm_count,
    state_row,
    tl,
    triton,
)

ACTIVATIONS = (None, "silu", "swish")
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_activation(activation) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _run_starts(seq_idx):
    """(B, L) int32: index of the first position of the run of equal seq_idx each position is in."""
    length = seq_idx.shape[1]
    pos = torch.arange(length, device=seq_idx.device)
    first = torch.ones_like(seq_idx, dtype=torch.bool)
    first[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return torch.where(first, pos, 0).cummax(dim=1).values.to(torch.int32)


def _packed_starts(cu_seqlens, length):
    """The launchers' starts (1, L) int32, each position's first position of its packed sequence,
    and rows (L,) int32, its initial-state row (its sequence index)."""
    seq = seq_idx_from_cu_seqlens(cu_seqlens, length)  # (1, L)
    return cu_seqlens.to(torch.int32)[seq.long()], seq[0].contiguous()


def _conv_dense_ref(x, weight, bias, initial_states, starts, apply_silu):
    """One state per row. ``starts`` (B, L) or None: an input q reaches output t only if
    q >= starts[t]; the initial state only reaches the row's first run. Returns fp32 out."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    xf = x.float()
    if initial_states is None:
        initial = xf.new_zeros(batch, dim, width - 1)
    else:
        initial = initial_states.float()
    xpad = torch.cat([initial, xf], dim=-1)  # (B, D, W-1+L)
    out = xf.new_zeros(batch, dim, length)
    wf = weight.float()
    pos = torch.arange(length, device=x.device)
    for k in range(width):
        tap = xpad[..., k : k + length]
        if starts is not None:
            q = pos - (width - 1) + k  # input position of this tap; < 0 is the initial state
            keep = (q >= starts) | ((q < 0) & (starts == 0))
            tap = tap * keep.unsqueeze(1)
        out = out + wf[:, k, None] * tap
    if bias is not None:
        out = out + bias.float()[:, None]
    if apply_silu:
        out = F.silu(out)
    return out


def _final_states(x, initial_states, width, starts=None, cu_seqlens=None):
    """Last W-1 inputs of each row (or of each packed sequence), differentiable, dtype of x."""
    batch, dim, length = x.shape
    if cu_seqlens is None:
        if length >= width - 1:
            tail = x[..., length - (width - 1) :]
        else:
            init = initial_states if initial_states is not None else x.new_zeros(batch, dim, width - 1)
            tail = torch.cat([init[..., length:].to(x.dtype), x], dim=-1)
        if starts is not None and length > 0:
            # Only the row's last run continues; inputs before its start are not its history.
            q = torch.arange(length - (width - 1), length, device=x.device)
            last = starts[:, -1:].long()
            keep = (q >= last) | ((q < 0) & (last == 0))
            tail = tail * keep.unsqueeze(1).to(tail.dtype)
        return tail.to(x.dtype)
    begin, end = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    q = end[:, None] + torch.arange(-(width - 1), 0, device=x.device)  # (R, W-1)
    from_x = x[0][:, q.clamp(0, max(length - 1, 0))].transpose(0, 1) if length > 0 else None  # (R, D, W-1)
    in_seq = (q >= begin[:, None]).unsqueeze(1)
    if initial_states is not None:
        slot = (q - begin[:, None] + (width - 1)).clamp(0, width - 2)
        from_init = torch.gather(initial_states, 2, slot.unsqueeze(1).expand(-1, dim, -1)).to(x.dtype)
    else:
        from_init = x.new_zeros(q.shape[0], dim, width - 1)
    if from_x is None:
        return from_init
    return torch.where(in_seq, from_x, from_init)


def causal_conv1d_ref(
    x,
    weight,
    bias=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
    *,
    seq_idx=None,
    cu_seqlens=None,
):
    """Torch reference of :func:`causal_conv1d_fn` (fp32 math, differentiable)."""
    apply_silu = _check_activation(activation)
    width = weight.shape[1]
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs = []
        for s in range(len(bounds) - 1):
            x_s = x[:, :, bounds[s] : bounds[s + 1]]
            init_s = None if initial_states is None else initial_states[s : s + 1]
            outs.append(_conv_dense_ref(x_s, weight, bias, init_s, None, apply_silu))
        out = torch.cat(outs, dim=-1).to(x.dtype)
        starts = None
    else:
        starts = None if seq_idx is None else _run_starts(seq_idx)
        out = _conv_dense_ref(x, weight, bias, initial_states, starts, apply_silu).to(x.dtype)
    if not return_final_states:
        return out
    final = _final_states(x, initial_states, width, starts, cu_seqlens)
    return out, _into_final_states_out(final, final_states_out)


def _into_final_states_out(final, final_states_out):
    if final_states_out is None:
        return final
    with torch.no_grad():
        final_states_out.copy_(final)
    # A tensor that needs gradients stays in the graph; the buffer holds the same values.
    return final if final.requires_grad else final_states_out


# ---------------------------------------------------------------------------
# Triton kernels. Three paths: "chunked" ((B, D, L)-contiguous x without packing), "rows"
# (channel-last x without packing, W <= 5) and the general kernels below (packed inputs,
# W > 5 channel-last). The channel-last kernels also take their output (forward) or output
# gradient (backward) as up to three tensors along D: Mamba-2's x, B and C in one launch.
# General kernels: a tile is (BLOCK_D channels, BLOCK_L positions) of one row; every
# stride is passed, so one kernel serves (B, D, L)-contiguous and channel-last x
# (Triton specialises a stride of 1 and vectorises along that axis). The W taps are
# W shifted loads of the same tile: the overlap hits L1, HBM sees x once. Tiles away
# from the edges (and without packing) take an unmasked path: there, masks and their
# address arithmetic would cost more issue slots than the loads themselves.
# ---------------------------------------------------------------------------


@triton.jit
def _load_tap(p_x, p_init, o_d, o_l, m_d, m_l, b_start, b_row, i_b, q_shift,
              stride_x_l, stride_i_b, stride_i_d, stride_i_w,
              W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, INIT_PER_SEQ: tl.constexpr,
              MASKED: tl.constexpr, ALIGN: tl.constexpr):
    """fp32 (BLOCK_D, BLOCK_L) tile of the inputs at positions o_l + q_shift (q_shift <= 0),
    zero where the input is outside the output position's sequence. ALIGN: stride_x_l is a
    multiple of it (see _row_align)."""
    q = o_l + q_shift
    row = tl.multiple_of(q.to(tl.int64)[None, :] * stride_x_l, [ALIGN, ALIGN])
    if MASKED:
        m_q = m_l & (q >= b_start)
        b_x = tl.load(p_x + row, mask=m_d[:, None] & m_q[None, :], other=0.0)
    else:
        b_x = tl.load(p_x + row)
    b_x = b_x.to(tl.float32)
    # Unmasked tiles start at or after position W-1: they never read an initial state.
    if HAS_INIT:
        if MASKED:
            # Before its start, a sequence reads its initial state: slot W-1 + q - start.
            slot = q - b_start + (W - 1)
            m_i = m_l & (q < b_start)
            if INIT_PER_SEQ:
                row = b_row.to(tl.int64)
            else:
                row = i_b.to(tl.int64) + tl.zeros_like(b_start).to(tl.int64)
                if HAS_SEQ:
                    m_i = m_i & (b_start == 0)
            p_i = (p_init + row[None, :] * stride_i_b + o_d.to(tl.int64)[:, None] * stride_i_d
                   + slot[None, :] * stride_i_w)
            b_x += tl.load(p_i, mask=m_d[:, None] & m_i[None, :], other=0.0).to(tl.float32)
    return b_x


@triton.jit
def _conv_pre(p_x, w_ptr, bias_ptr, p_init, start_ptr, row_ptr, i_b, o_d, o_l, m_d, L,
              stride_x_l, stride_i_b, stride_i_d, stride_i_w,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
              INIT_PER_SEQ: tl.constexpr, MASKED: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr = 1):
    """Pre-activation sum_k w[k] * in[t - (W-1) + k] (+ bias) at positions o_l, fp32."""
    m_l = o_l < L
    if HAS_SEQ:
        b_start = tl.load(start_ptr + i_b.to(tl.int64) * L + o_l, mask=m_l, other=0)
    else:
        b_start = tl.zeros_like(o_l)
    if INIT_PER_SEQ:
        b_row = tl.load(row_ptr + o_l, mask=m_l, other=0)
    else:
        b_row = b_start
    pre = tl.zeros([BLOCK_D, o_l.shape[0]], dtype=tl.float32)
    for k in tl.static_range(W):
        b_x = _load_tap(p_x, p_init, o_d, o_l, m_d, m_l, b_start, b_row, i_b, k - (W - 1),
                        stride_x_l, stride_i_b, stride_i_d, stride_i_w, W, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, MASKED,
                        ALIGN)
        if MASKED:
            b_w = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
        else:
            b_w = tl.load(w_ptr + o_d * W + k).to(tl.float32)
        pre += b_w[:, None] * b_x
    if HAS_BIAS:
        pre += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return pre


@triton.jit
def _conv_fwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, out_ptr, i_b, l0, d0, L, D,
                   stride_x_b, stride_x_d, stride_x_l, stride_o_b, stride_o_d, stride_o_l,
                   stride_i_b, stride_i_d, stride_i_w,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                   INIT_PER_SEQ: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, ALIGN: tl.constexpr):
    o_d = d0 + tl.arange(0, BLOCK_D)
    o_l = l0 + tl.arange(0, BLOCK_L)
    m_d = o_d < D
    p_x = x_ptr + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64)[:, None] * stride_x_d
    acc = _conv_pre(p_x, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, i_b, o_d, o_l, m_d, L,
                    stride_x_l, stride_i_b, stride_i_d, stride_i_w,
                    W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, MASKED, BLOCK_D, ALIGN)
    if SILU:
        acc = acc * ptx_sigmoid(acc, FAST)
    p_o = (out_ptr + i_b.to(tl.int64) * stride_o_b + o_d.to(tl.int64)[:, None] * stride_o_d
           + tl.multiple_of(o_l.to(tl.int64)[None, :] * stride_o_l, [ALIGN, ALIGN]))
    if MASKED:
        tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_d[:, None] & (o_l < L)[None, :])
    else:
        tl.store(p_o, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _part(i_d, ptr0, ptr1, ptr2, stride0_b, stride0_l, stride1_b, stride1_l, stride2_b, stride2_l,
          D, D1, D2, T1, T2, BLOCK_D: tl.constexpr, PARTS: tl.constexpr):
    """Channel tile i_d of a tensor given as PARTS = 3 channel-last parts along D (channels [0, D1),
    [D1, D2), [D2, D); tiles [0, T1), [T1, T2), [T2, ...), none straddling two parts) or as one
    (PARTS = 1: ptr0) -> the tile's first channel, its part's end, and the part's pointer
    (shifted so that a global channel index addresses it) and (B, L) strides. Selects of
    scalars: no branch, and Triton keeps the pointers' and strides' 16-byte divisibility."""
    if PARTS == 3:
        in1, in2 = i_d >= T1, i_d >= T2
        d0 = tl.where(in2, D2 + (i_d - T2) * BLOCK_D, tl.where(in1, D1 + (i_d - T1) * BLOCK_D, i_d * BLOCK_D))
        d_end = tl.where(in2, D, tl.where(in1, D2, D1))
        ptr = tl.where(in2, ptr2 - D2, tl.where(in1, ptr1 - D1, ptr0))
        stride_b = tl.where(in2, stride2_b, tl.where(in1, stride1_b, stride0_b))
        stride_l = tl.where(in2, stride2_l, tl.where(in1, stride1_l, stride0_l))
    else:
        d0, d_end, ptr, stride_b, stride_l = i_d * BLOCK_D, D, ptr0, stride0_b, stride0_l
    return d0, d_end, ptr, stride_b, stride_l


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, out_ptr, out1_ptr, out2_ptr,
    L, D, D1, D2, T1, T2,
    stride_x_b, stride_x_d, stride_x_l,
    stride_o_b, stride_o_d, stride_o_l,
    stride_o1_b, stride_o1_l, stride_o2_b, stride_o2_l,
    stride_i_b, stride_i_d, stride_i_w,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    INIT_PER_SEQ: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    ALIGN: tl.constexpr, PARTS: tl.constexpr,
):
    """PARTS = 3: out is three channel-last tensors along D (see _part; stride_o_d == 1), one launch
    for Mamba-2's x, B and C."""
    i_l, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    l0 = i_l * BLOCK_L
    d0, d_end, out_ptr, stride_o_b, stride_o_l = _part(
        i_d, out_ptr, out1_ptr, out2_ptr, stride_o_b, stride_o_l, stride_o1_b, stride_o1_l,
        stride_o2_b, stride_o2_l, D, D1, D2, T1, T2, BLOCK_D, PARTS)
    if HAS_SEQ:
        _conv_fwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, out_ptr, i_b, l0, d0, L, d_end,
                       stride_x_b, stride_x_d, stride_x_l, stride_o_b, stride_o_d, stride_o_l,
                       stride_i_b, stride_i_d, stride_i_w,
                       W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, True, BLOCK_D, BLOCK_L, ALIGN)
    else:
        if (l0 >= W - 1) & (l0 + BLOCK_L <= L) & (d0 + BLOCK_D <= d_end):
            _conv_fwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, out_ptr, i_b, l0, d0, L, d_end,
                           stride_x_b, stride_x_d, stride_x_l, stride_o_b, stride_o_d, stride_o_l,
                           stride_i_b, stride_i_d, stride_i_w,
                           W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, False, BLOCK_D, BLOCK_L, ALIGN)
        else:
            _conv_fwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, out_ptr, i_b, l0, d0, L, d_end,
                           stride_x_b, stride_x_d, stride_x_l, stride_o_b, stride_o_d, stride_o_l,
                           stride_i_b, stride_i_d, stride_i_w,
                           W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, True, BLOCK_D, BLOCK_L, ALIGN)


# ---------------------------------------------------------------------------
# The chunked path: (B, D, L)-contiguous x without packing (Mamba-1's layout). A tile is
# (BLOCK_D, NC, CHUNK): CHUNK = 8 consecutive positions per thread, one 16-byte load in
# bf16. A tap needs the inputs up to W-1 positions back, so each thread also loads the
# chunk before its own (a neighbour's, an L1/L2 hit) and shifts in registers: split/join
# on the chunk axis compile to register renames (no shuffles, no shared memory), where
# the general path issues W-1 unaligned 2-byte loads per position.
# ---------------------------------------------------------------------------

CHUNK = 8


@triton.jit
def _unzip(v, BLOCK_D: tl.constexpr, NC: tl.constexpr, K: tl.constexpr):
    """(BLOCK_D, NC, 2K) -> its even and odd positions, (BLOCK_D, NC, K) each."""
    return tl.split(tl.reshape(v, (BLOCK_D, NC, K, 2)))


@triton.jit
def _zip(even, odd, BLOCK_D: tl.constexpr, NC: tl.constexpr, K: tl.constexpr):
    return tl.reshape(tl.join(even, odd), (BLOCK_D, NC, 2 * K))


# Shifting a chunk of K positions by one, to the right (out[c] = v[c-1], out[0] = edge[K-1]:
# the chunk before supplies the edge) or to the left (out[c] = v[c+1], out[K-1] = edge[0]: the
# chunk after). Split into even and odd positions, one of the halves is a shift of a chunk of
# K/2 and the other moves over unchanged; each level is its own function because the
# recursion must end at compile time.


@triton.jit
def _shift2(v, edge, LEFT: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr):
    even, odd = _unzip(v, BLOCK_D, NC, 1)
    e_even, e_odd = _unzip(edge, BLOCK_D, NC, 1)
    if LEFT:
        out = _zip(odd, e_even, BLOCK_D, NC, 1)
    else:
        out = _zip(e_odd, even, BLOCK_D, NC, 1)
    return out


@triton.jit
def _shift4(v, edge, LEFT: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr):
    even, odd = _unzip(v, BLOCK_D, NC, 2)
    e_even, e_odd = _unzip(edge, BLOCK_D, NC, 2)
    if LEFT:
        out = _zip(odd, _shift2(even, e_even, True, BLOCK_D, NC), BLOCK_D, NC, 2)
    else:
        out = _zip(_shift2(odd, e_odd, False, BLOCK_D, NC), even, BLOCK_D, NC, 2)
    return out


@triton.jit
def _shift8(v, edge, LEFT: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr):
    even, odd = _unzip(v, BLOCK_D, NC, 4)
    e_even, e_odd = _unzip(edge, BLOCK_D, NC, 4)
    if LEFT:
        out = _zip(odd, _shift4(even, e_even, True, BLOCK_D, NC), BLOCK_D, NC, 4)
    else:
        out = _zip(_shift4(odd, e_odd, False, BLOCK_D, NC), even, BLOCK_D, NC, 4)
    return out


@triton.jit
def _chunk_raw(ptr, i_b, o_d, m_d, o_q, L, stride_b, stride_d, ok):
    """(BLOCK_D, NC, CHUNK) of a (B, D, L)-contiguous tensor at positions o_q (NC, CHUNK), in
    its dtype: zero outside [0, L) or where the scalar ok is false."""
    p = ptr + i_b.to(tl.int64) * stride_b + o_d.to(tl.int64)[:, None, None] * stride_d + o_q[None, :, :]
    return tl.load(p, mask=m_d[:, None, None] & ((o_q >= 0) & (o_q < L))[None, :, :] & ok, other=0.0)


@triton.jit
def _chunk_init(init_ptr, i_b, o_d, m_d, o_q, stride_i_b, stride_i_d, stride_i_w, W: tl.constexpr):
    """fp32 initial-state values at the positions o_q < 0 (slot W-1 + o_q), zero elsewhere."""
    slot = o_q + (W - 1)
    p_i = (init_ptr + i_b.to(tl.int64) * stride_i_b + o_d.to(tl.int64)[:, None, None] * stride_i_d
           + slot[None, :, :] * stride_i_w)
    m_i = m_d[:, None, None] & ((o_q < 0) & (slot >= 0))[None, :, :]
    return tl.load(p_i, mask=m_i, other=0.0).to(tl.float32)


@triton.jit
def _chunk_load(ptr, init_ptr, i_b, o_d, m_d, o_q, L, stride_b, stride_d, stride_i_b, stride_i_d, stride_i_w,
                W: tl.constexpr, HAS_INIT: tl.constexpr):
    """fp32 (BLOCK_D, NC, CHUNK) of a (B, D, L)-contiguous tensor at positions o_q (NC, CHUNK):
    zero past L and, before 0, the initial state (HAS_INIT) or zero."""
    b = _chunk_raw(ptr, i_b, o_d, m_d, o_q, L, stride_b, stride_d, True).to(tl.float32)
    if HAS_INIT:
        b += _chunk_init(init_ptr, i_b, o_d, m_d, o_q, stride_i_b, stride_i_d, stride_i_w, W)
    return b


@triton.jit
def _chunk_pre(cur, prev, p_w, stride_w_k, bias_ptr, o_d, m_d, W: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_D: tl.constexpr, NC: tl.constexpr, CHUNK: tl.constexpr = 8):
    """Pre-activation at the positions of cur, given the chunks before them (prev), fp32; p_w
    points at tap 0 of each channel's weights. Chunks of 8 (or 4: the channel-last rows kernel)."""
    pre = tl.load(p_w + (W - 1) * stride_w_k, mask=m_d, other=0.0).to(tl.float32)[:, None, None] * cur
    if HAS_BIAS:
        pre += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None, None]
    for j in tl.static_range(1, W):
        if CHUNK == 8:
            cur = _shift8(cur, prev, False, BLOCK_D, NC)
            prev = _shift8(prev, prev, False, BLOCK_D, NC)  # only its last W-1-j positions are read
        else:
            cur = _shift4(cur, prev, False, BLOCK_D, NC)
            prev = _shift4(prev, prev, False, BLOCK_D, NC)
        pre += tl.load(p_w + (W - 1 - j) * stride_w_k, mask=m_d, other=0.0).to(tl.float32)[:, None, None] * cur
    return pre


@triton.jit
def _causal_conv1d_fwd_chunk_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, out_ptr,
    L, D,
    stride_x_b, stride_x_d, stride_o_b, stride_o_d,
    stride_i_b, stride_i_d, stride_i_w,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr,
    BLOCK_D: tl.constexpr, NC: tl.constexpr, CHUNK: tl.constexpr,
):
    tl.static_assert(CHUNK == 8)  # the shift helpers are written for chunks of 8
    i_l, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_l = i_l * (NC * CHUNK) + tl.arange(0, NC)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # (NC, CHUNK)
    cur = _chunk_load(x_ptr, init_ptr, i_b, o_d, m_d, o_l, L, stride_x_b, stride_x_d,
                      stride_i_b, stride_i_d, stride_i_w, W, HAS_INIT)
    prev = _chunk_load(x_ptr, init_ptr, i_b, o_d, m_d, o_l - CHUNK, L, stride_x_b, stride_x_d,
                       stride_i_b, stride_i_d, stride_i_w, W, HAS_INIT)
    acc = _chunk_pre(cur, prev, w_ptr + o_d * W, 1, bias_ptr, o_d, m_d, W, HAS_BIAS, BLOCK_D, NC)
    if SILU:
        acc = acc * ptx_sigmoid(acc, FAST)
    p_o = out_ptr + i_b.to(tl.int64) * stride_o_b + o_d.to(tl.int64)[:, None, None] * stride_o_d + o_l[None, :, :]
    tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_d[:, None, None] & (o_l < L)[None, :, :])


# Tile shapes, chosen by measurement on an H100 (benchmarks/bench_conv.py --tune). The
# chunked path's are (BLOCK_D, NC chunks of CHUNK positions, num_warps); the general
# kernel's (BLOCK_D, BLOCK_L, num_warps), the layout deciding which axis is contiguous.
# The rows kernels' are (BLOCK_D = 32 * num_warps * channels per thread (see *_LOAD_BYTES),
# STEPS, num_warps).
# A backward config may end with a register cap per thread (Triton's maxnreg).
FWD_CONFIG = {"chunked": (2, 128, 8), "contiguous": (8, 256, 4), "channel_last": (128, 32, 4),
              "rows": (128, 16, 1)}
BWD_CONFIG = {"chunked": (2, 64, 4), "contiguous": (8, 256, 4), "channel_last": (64, 64, 4), "rows": (128, 32, 1)}
# Channel-last backward: "rows" runs the rows kernel (unpacked x, W <= 5; else the general
# kernel's "scratch"). General backward kernel: programs per SM (a persistent grid: each
# program reuses one scratch tile), and how it gets dy at the W-1 positions after each
# position: "scratch" stores the tile's dy once to a per-program scratch tile (L1/L2-resident)
# and reads it back shifted; "recompute" rebuilds it from x (W times the taps and sigmoids).
BWD_PROGRAMS_PER_SM = 8
# Chunked backward: consecutive L tiles per program (its dweight partial is reduced across
# threads once, not per tile).
BWD_TILES_PER_PROGRAM = 16
# Chunked backward: load the next tile while computing this one (more registers).
BWD_PREFETCH = False
BWD_DY_SHIFT = {"contiguous": "scratch", "channel_last": "rows"}
# Rows kernels: bytes per load and store along D (16 or 8). Triton vectorises as wide as the
# known alignment allows and gives each thread that many channels, so a smaller alignment hint
# means fewer channels per thread: in the backward 4 bf16 channels hold half the registers of 8
# (128 vs 255 on sm_90), twice the resident warps to hide the loads' latency (H100, session 9:
# Mamba-2's split backward 95.5 -> 92.3 us, B=4 D=2048 L=8192 0.199 -> 0.183 ms).
FWD_ROWS_LOAD_BYTES = 8
BWD_ROWS_LOAD_BYTES = 8
# Channel-last forward without packing, W <= 5: "rows" (the rows kernel, x loaded once) or
# "general" (W shifted tile loads). Rows kernel: STEPS is halved (down to 1) until the grid
# has this many programs per SM.
FWD_CHANNEL_LAST = "rows"
FWD_ROWS_MIN_PROGRAMS_PER_SM = 4


def _layout(x):
    return "contiguous" if x.stride(2) == 1 else "channel_last"


def _empty_in_layout(x):
    """A dense (B, D, L) tensor in x's layout, also when x is a strided slice (Mamba-2's xBC
    is a channel slice of zxbcdt): writes then run along the same fast axis as the reads."""
    batch, dim, length = x.shape
    if _layout(x) == "contiguous":
        return torch.empty(batch, dim, length, device=x.device, dtype=x.dtype)
    # One allocation with the strides, not an empty() and a transpose() view of it (host time per call).
    return torch.empty_strided((batch, dim, length), (length * dim, 1, dim), device=x.device, dtype=x.dtype)


def _path(x, starts):
    """Which kernel runs: "chunked" ((B, D, L)-contiguous, no packing) or the general
    kernel, keyed by layout."""
    if starts is None and x.stride(2) == 1:
        return "chunked"
    return _layout(x)


def _row_align(*tensors) -> int:
    """The multiple (in elements; 16 bytes) that the L strides of channel-last tensors share, else 1.
    Triton knows a stride argument's 16-byte multiple only when it is divisible by 16 elements;
    Mamba-2's xBC rows are slices of zxbcdt rows of 3352 values at 130m (8 * 419), and its loads
    and stores then ran 2 bytes at a time (offline sm_90 SASS: 266 LDG.E.U16 per forward tile)."""
    vec = 16 // tensors[0].element_size()
    ok = all(t.stride(1) == 1 and t.stride(2) % vec == 0 for t in tensors)
    return vec if ok else 1


def _parts_layout(parts, dim, block_d):
    """(D1, D2, T1, T2, number of channel tiles) of up to three channel parts (see _part), or
    None when they cannot share one launch (more than three, or one not channel-last)."""
    widths = [p.shape[1] for p in parts]
    if len(parts) > 3 or sum(widths) != dim or any(p.stride(1) != 1 for p in parts):
        return None
    widths += [0] * (3 - len(widths))
    tiles = [cdiv(w, block_d) for w in widths]
    return widths[0], widths[0] + widths[1], tiles[0], tiles[0] + tiles[1], sum(tiles)


def _part_slices(parts):
    """(channel slice, part) of each of a tuple of (B, D_k, L) parts along D: what a launch that
    cannot take them together runs per part."""
    first = 0
    for part in parts:
        yield slice(first, first + part.shape[1]), part
        first += part.shape[1]


def _pad3(parts):
    """Up to three parts as three (missing parts repeat the last)."""
    return (parts[0], parts[1 if len(parts) > 1 else -1], parts[2 if len(parts) > 2 else -1])


def _part_args(parts):
    """The three parts' pointers and (B, L) strides for the kernels (missing parts repeat the last)."""
    parts = _pad3(parts)
    return parts, [s for p in parts[1:] for s in (p.stride(0), p.stride(2))]


# Launch runners: the Python that maps a call's tensors to its launches (the path, tiles, grid, strides
# and flags, as Plans with everything but the pointers fixed) runs once per launch signature (shapes,
# strides, dtype, device, flags, overrides); a call then runs the runner: its allocations and launches.
# Eager training steps are host-bound (session 12, H100 host: an eager fwd+bwd call issued its launches
# for 0.39 ms (contiguous) / 0.78 ms (channel-last) against 0.24 / 0.28 ms of kernels). The runners are
# built from this module's tuning settings: setting one drops them (_launch.settings_cache); code that
# changes one of the dicts in place (FWD_CONFIG["rows"] = ...) calls _launch.clear_plans().
_RUNNERS = settings_cache(__name__)


def _runner(key, build):
    """The cached runner for ``key``, built by ``build()`` on first use (or after a settings change)."""
    run = _RUNNERS.get(key)
    if run is None:
        run = _RUNNERS[key] = build()
    return run


def _sig(t):
    """A tensor's or a tuple of tensors' part of a runner key."""
    if isinstance(t, (tuple, list)):
        return tuple((p.shape, p.stride()) for p in t)
    return t.stride()


def _launch_fwd(out, x, weight, bias, initial_states, starts, rows, silu, config=None, variant=None):
    """Write the forward into out; config and variant ("rows" or "general", for channel-last x)
    override the tuned settings (benchmarks). out may be a tuple of (B, D_k, L) tensors whose
    D_k add up to D, each taking its channels of the output (Mamba-2's x, B and C):
    channel-last ones share one launch."""
    key = ("fwd", x.shape, x.stride(), x.dtype, x.device, _sig(out), weight.shape, bias is None,
           None if initial_states is None else initial_states.stride(), starts is None, rows is None, silu, config,
           variant)
    _runner(key, lambda: _fwd_runner(out, x, weight, bias, initial_states, starts, rows, silu, config, variant))(
        out, x, weight, bias, initial_states, starts, rows)


def _fwd_runner(out, x, weight, bias, initial_states, starts, rows, silu, config, variant):
    """run(out, x, weight, bias, initial_states, starts, rows) for _launch_fwd's signature."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    path = _path(x, starts)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if (path == "channel_last" and (variant or FWD_CHANNEL_LAST) == "rows" and starts is None
            and width <= ROWS + 1 and x.stride(1) == 1 and all(o.stride(1) == 1 for o in outs)):
        path = "rows"
    block_d, block, warps = config or FWD_CONFIG[path]
    parts = None
    if isinstance(out, (tuple, list)):
        parts = _parts_layout(out, dim, block_d) if path != "chunked" else None
        if parts is None:
            def run_parts(out, x, weight, bias, initial_states, starts, rows):
                for d, part in _part_slices(out):
                    _launch_fwd(part, x[:, d], weight[d], None if bias is None else bias[d],
                                None if initial_states is None else initial_states[:, d], starts, rows, silu, config,
                                variant)
            return run_parts
        out, extra_strides = _part_args(out)
        out = out[0]
    init_strides = initial_states.stride() if initial_states is not None else (0, 0, 0)
    flags = {"W": width, "HAS_BIAS": bias is not None, "HAS_INIT": initial_states is not None, "SILU": silu,
             "FAST": ptx_math(_causal_conv1d_fwd_kernel), "BLOCK_D": block_d, "num_warps": warps}
    if path == "chunked":
        grid = (cdiv(length, block * CHUNK), cdiv(dim, block_d), batch)
        plan = Plan(_causal_conv1d_fwd_chunk_kernel, grid, length, dim,
                    x.stride(0), x.stride(1), out.stride(0), out.stride(1), *init_strides,
                    NC=block, CHUNK=CHUNK, **flags)
        return lambda out, x, weight, bias, initial_states, starts, rows: plan(x, weight, bias, initial_states, out)
    if parts is None:
        d1 = d2 = dim
        n_tiles = t1 = t2 = cdiv(dim, block_d)
        extra_strides = (0, 0, 0, 0)
        out_parts = lambda out: (out, out, out)  # noqa: E731
    else:
        d1, d2, t1, t2, n_tiles = parts
        out_parts = _pad3
    align = _row_align(x, *out_parts(outs if parts is not None else out))
    flags["PARTS"] = 1 if parts is None else 3
    if path == "rows":
        steps = min(block, cdiv(length, ROWS))
        min_programs = _n_sms(x.device) * FWD_ROWS_MIN_PROGRAMS_PER_SM
        while steps > 1 and cdiv(length, steps * ROWS) * n_tiles * batch < min_programs:
            steps = cdiv(steps, 2)
        plan = Plan(_causal_conv1d_fwd_rows_kernel, (cdiv(length, steps * ROWS), n_tiles, batch),
                    length, dim, d1, d2, t1, t2,
                    x.stride(0), x.stride(2), out.stride(0), out.stride(2), *extra_strides, *init_strides,
                    W_POW2=next_pow2(width), ROWS=ROWS, STEPS=steps,
                    ALIGN=min(align, FWD_ROWS_LOAD_BYTES // x.element_size()), **flags)
        return lambda out, x, weight, bias, initial_states, starts, rows: plan(
            x, weight, bias, initial_states, *out_parts(out))
    plan = Plan(_causal_conv1d_fwd_kernel, (cdiv(length, block), n_tiles, batch),
                length, dim, d1, d2, t1, t2, *x.stride(), *out.stride(), *extra_strides, *init_strides,
                HAS_SEQ=starts is not None, INIT_PER_SEQ=rows is not None, BLOCK_L=block, ALIGN=align, **flags)
    return lambda out, x, weight, bias, initial_states, starts, rows: plan(
        x, weight, bias, initial_states, starts, rows, *out_parts(out))


def _causal_conv1d_fwd_launcher(x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor | None,
                       starts: Tensor | None, rows: Tensor | None, silu: bool) -> Tensor:
    """x (B, D, L), weight (D, W) contiguous, bias (D,), initial_states (B or num_seqs, D, W-1),
    starts (B, L) int32 first position of each position's sequence, rows (L,) int32 its
    initial-state row (cu_seqlens) -> out (B, D, L) in x's layout."""
    out = _empty_in_layout(x)
    _launch_fwd(out, x, weight, bias, initial_states, starts, rows, silu)
    return out


_causal_conv1d_fwd = launcher_op("causal_conv1d_fwd")(_causal_conv1d_fwd_launcher)


@_causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_states, starts, rows, silu):
    return _empty_in_layout(x)


@triton.jit
def _conv_dy(p_x, p_do, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, i_b, o_d, o_l, m_d, L,
             stride_x_l, stride_do_l, stride_i_b, stride_i_d, stride_i_w,
             W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
             INIT_PER_SEQ: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """dy = dout * act'(pre) at positions o_l (zero past L), fp32."""
    p = p_do + o_l.to(tl.int64)[None, :] * stride_do_l
    if MASKED:
        dy = tl.load(p, mask=m_d[:, None] & (o_l < L)[None, :], other=0.0).to(tl.float32)
    else:
        dy = tl.load(p).to(tl.float32)
    if SILU:
        pre = _conv_pre(p_x, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, i_b, o_d, o_l, m_d, L,
                        stride_x_l, stride_i_b, stride_i_d, stride_i_w,
                        W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, MASKED, BLOCK_D)
        sig = ptx_sigmoid(pre, FAST)
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    return dy


@triton.jit
def _conv_bwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
                   p_scratch, i_b, i_l, d0, L, D, n_l_tiles,
                   stride_x_b, stride_x_d, stride_x_l, stride_do_b, stride_do_d, stride_do_l,
                   stride_dx_b, stride_dx_d, stride_dx_l, stride_i_b, stride_i_d, stride_i_w,
                   stride_sc_d, stride_sc_l,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                   INIT_PER_SEQ: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr, SCRATCH: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALO: tl.constexpr):
    """dx[p] = sum_s w[W-1-s] dy[p+s] and dw[W-1-s] += sum_p x[p] dy[p+s] over the tile's p,
    counting dy[p+s] only if p is in the sequence of p+s. dbias += sum_p dy[p]."""
    o_t = tl.arange(0, BLOCK_L)
    o_l = i_l * BLOCK_L + o_t
    o_d = d0 + tl.arange(0, BLOCK_D)
    m_d, m_l = o_d < D, o_l < L
    p_x = x_ptr + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64)[:, None] * stride_x_d
    p_do = dout_ptr + i_b.to(tl.int64) * stride_do_b + o_d.to(tl.int64)[:, None] * stride_do_d
    dy0 = _conv_dy(p_x, p_do, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, i_b, o_d, o_l, m_d, L,
                   stride_x_l, stride_do_l, stride_i_b, stride_i_d, stride_i_w,
                   W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, MASKED, BLOCK_D)
    if SCRATCH:
        # dy at the HALO positions after the tile, then the whole (BLOCK_D, BLOCK_L + HALO)
        # strip goes to this program's scratch tile, to be read back shifted.
        o_h = i_l * BLOCK_L + BLOCK_L + tl.arange(0, HALO)
        dy_h = _conv_dy(p_x, p_do, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, i_b, o_d, o_h, m_d, L,
                        stride_x_l, stride_do_l, stride_i_b, stride_i_d, stride_i_w,
                   W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, MASKED, BLOCK_D)
        p_sc = p_scratch + tl.arange(0, BLOCK_D)[:, None] * stride_sc_d
        tl.store(p_sc + o_t[None, :] * stride_sc_l, dy0)
        tl.store(p_sc + (BLOCK_L + tl.arange(0, HALO))[None, :] * stride_sc_l, dy_h)
        tl.debug_barrier()
    if MASKED:
        x_own = tl.load(p_x + o_l.to(tl.int64)[None, :] * stride_x_l, mask=m_d[:, None] & m_l[None, :],
                        other=0.0).to(tl.float32)
    else:
        x_own = tl.load(p_x + o_l.to(tl.int64)[None, :] * stride_x_l).to(tl.float32)
    dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    p_part = (i_b.to(tl.int64) * n_l_tiles + i_l) * D + o_d
    for s in tl.static_range(W):
        if s == 0:
            dy_s = dy0
        elif SCRATCH:
            dy_s = tl.load(p_sc + (o_t + s)[None, :] * stride_sc_l)
        else:
            dy_s = _conv_dy(p_x, p_do, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, i_b, o_d, o_l + s, m_d, L,
                            stride_x_l, stride_do_l, stride_i_b, stride_i_d, stride_i_w,
                   W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, MASKED, BLOCK_D)
        if HAS_SEQ:
            t = o_l + s
            start_t = tl.load(start_ptr + i_b.to(tl.int64) * L + t, mask=t < L, other=0)
            dy_s = tl.where((o_l >= start_t)[None, :], dy_s, 0.0)
        if MASKED:
            b_w = tl.load(w_ptr + o_d * W + (W - 1 - s), mask=m_d, other=0.0).to(tl.float32)
        else:
            b_w = tl.load(w_ptr + o_d * W + (W - 1 - s)).to(tl.float32)
        dx += b_w[:, None] * dy_s
        tl.store(dw_ptr + p_part * W + (W - 1 - s), tl.sum(x_own * dy_s, axis=1), mask=m_d)
    if HAS_BIAS:
        tl.store(db_ptr + p_part, tl.sum(dy0, axis=1), mask=m_d)
    p_dx = (dx_ptr + i_b.to(tl.int64) * stride_dx_b + o_d.to(tl.int64)[:, None] * stride_dx_d
            + o_l.to(tl.int64)[None, :] * stride_dx_l)
    if MASKED:
        tl.store(p_dx, dx.to(dx_ptr.dtype.element_ty), mask=m_d[:, None] & m_l[None, :])
    else:
        tl.store(p_dx, dx.to(dx_ptr.dtype.element_ty))
    if SCRATCH:
        tl.debug_barrier()  # the next tile overwrites the scratch tile


@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, scratch_ptr,
    L, D, n_l_tiles, n_d_tiles, n_tiles,
    stride_x_b, stride_x_d, stride_x_l,
    stride_do_b, stride_do_d, stride_do_l,
    stride_dx_b, stride_dx_d, stride_dx_l,
    stride_i_b, stride_i_d, stride_i_w,
    stride_sc_p, stride_sc_d, stride_sc_l,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    INIT_PER_SEQ: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr, SCRATCH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HALO: tl.constexpr,
):
    """Persistent: program i handles tiles i, i + n_programs, ... (scratch tile i)."""
    i_prog = tl.program_id(0)
    if SCRATCH:
        p_scratch = scratch_ptr + i_prog.to(tl.int64) * stride_sc_p
    else:
        p_scratch = scratch_ptr
    for tile in range(i_prog, n_tiles, tl.num_programs(0)):
        i_l = tile % n_l_tiles
        i_d = (tile // n_l_tiles) % n_d_tiles
        i_b = tile // (n_l_tiles * n_d_tiles)
        l0, d0 = i_l * BLOCK_L, i_d * BLOCK_D
        if HAS_SEQ:
            _conv_bwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
                           p_scratch, i_b, i_l, d0, L, D, n_l_tiles,
                           stride_x_b, stride_x_d, stride_x_l, stride_do_b, stride_do_d, stride_do_l,
                           stride_dx_b, stride_dx_d, stride_dx_l, stride_i_b, stride_i_d, stride_i_w,
                           stride_sc_d, stride_sc_l,
                           W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, SCRATCH, True,
                           BLOCK_D, BLOCK_L, HALO)
        else:
            if (l0 >= W - 1) & (l0 + BLOCK_L + HALO <= L) & (d0 + BLOCK_D <= D):
                _conv_bwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
                               p_scratch, i_b, i_l, d0, L, D, n_l_tiles,
                               stride_x_b, stride_x_d, stride_x_l, stride_do_b, stride_do_d, stride_do_l,
                               stride_dx_b, stride_dx_d, stride_dx_l, stride_i_b, stride_i_d, stride_i_w,
                               stride_sc_d, stride_sc_l,
                               W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, SCRATCH, False,
                               BLOCK_D, BLOCK_L, HALO)
            else:
                _conv_bwd_tile(x_ptr, w_ptr, bias_ptr, init_ptr, start_ptr, row_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
                               p_scratch, i_b, i_l, d0, L, D, n_l_tiles,
                               stride_x_b, stride_x_d, stride_x_l, stride_do_b, stride_do_d, stride_do_l,
                               stride_dx_b, stride_dx_d, stride_dx_l, stride_i_b, stride_i_d, stride_i_w,
                               stride_sc_d, stride_sc_l,
                               W, HAS_BIAS, HAS_INIT, HAS_SEQ, INIT_PER_SEQ, SILU, FAST, SCRATCH, True,
                               BLOCK_D, BLOCK_L, HALO)


@triton.jit
def _conv_dact(dout, pre, SILU: tl.constexpr, FAST: tl.constexpr):
    """dout * act'(pre), fp32."""
    if SILU:
        sig = ptx_sigmoid(pre, FAST)
        dout = dout * sig * (1.0 + pre * (1.0 - sig))
    return dout


@triton.jit
def _tap_grads(dy, dy_next, x_cur, dx, dw, w_ptr, o_d, m_d, s: tl.constexpr, W: tl.constexpr,
               BLOCK_D: tl.constexpr, NC: tl.constexpr):
    """Tap W-1-s: move dy to p+s, add its dx term and its dw products (elementwise)."""
    if s > 0:
        dy = _shift8(dy, dy_next, True, BLOCK_D, NC)
        dy_next = _shift8(dy_next, dy_next, True, BLOCK_D, NC)  # only its first W-1-s positions are read
    dx += tl.load(w_ptr + o_d * W + (W - 1 - s), mask=m_d, other=0.0).to(tl.float32)[:, None, None] * dy
    # The chunk axis is inside a thread: summing it here is a chain of FMAs into one register
    # per tap, where an elementwise accumulator held CHUNK registers per tap.
    dw += tl.sum(x_cur * dy, axis=2)
    return dy, dy_next, dx, dw


@triton.jit
def _store_wgrad(p_dw, dw, k: tl.constexpr, m_d):
    tl.store(p_dw + k, tl.sum(dw, axis=1), mask=m_d)


@triton.jit
def _bwd_chunk_raw(x_ptr, dout_ptr, i_b, o_d, m_d, o_l, L, stride_x_b, stride_x_d, stride_do_b, stride_do_d, ok,
                   CHUNK: tl.constexpr):
    """A tile's inputs as loaded: x at the chunks before/at/after, dout at/after."""
    x_cur = _chunk_raw(x_ptr, i_b, o_d, m_d, o_l, L, stride_x_b, stride_x_d, ok)
    x_prev = _chunk_raw(x_ptr, i_b, o_d, m_d, o_l - CHUNK, L, stride_x_b, stride_x_d, ok)
    x_next = _chunk_raw(x_ptr, i_b, o_d, m_d, o_l + CHUNK, L, stride_x_b, stride_x_d, ok)
    dout = _chunk_raw(dout_ptr, i_b, o_d, m_d, o_l, L, stride_do_b, stride_do_d, ok)
    dout_next = _chunk_raw(dout_ptr, i_b, o_d, m_d, o_l + CHUNK, L, stride_do_b, stride_do_d, ok)
    return x_cur, x_prev, x_next, dout, dout_next


@triton.jit
def _causal_conv1d_bwd_chunk_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
    L, D,
    stride_x_b, stride_x_d, stride_do_b, stride_do_d, stride_dx_b, stride_dx_d,
    stride_i_b, stride_i_d, stride_i_w,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    FAST: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr, CHUNK: tl.constexpr, TILES: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One pass over TILES consecutive L tiles: dy = dout * act'(pre) with pre recomputed from
    x (never stored), dx[p] = sum_s w[W-1-s] dy[p+s]; the program's dw[W-1-s] = sum_p x[p]
    dy[p+s] and dbias = sum_p dy[p] go to its own fp32 partial row (summed by
    _conv_wgrad_reduce_kernel). They accumulate per thread (one FMA per tap and position,
    one register per tap: 64 registers, 8 programs of 4 warps per SM on an H100, where
    elementwise accumulators took 96) and are reduced across threads once, after the last tile."""
    tl.static_assert(CHUNK == 8)
    i_g, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    # Triton has no lists of tensors: one accumulator per tap s, written out (W <= 8).
    db = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw0 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw4 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw5 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw6 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    dw7 = tl.zeros([BLOCK_D, NC], dtype=tl.float32)
    o_t = tl.arange(0, NC)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # (NC, CHUNK)
    if PREFETCH:
        o_l = i_g * TILES * (NC * CHUNK) + o_t
        x_r, xp_r, xn_r, do_r, dn_r = _bwd_chunk_raw(x_ptr, dout_ptr, i_b, o_d, m_d, o_l, L, stride_x_b,
                                                     stride_x_d, stride_do_b, stride_do_d, True, CHUNK)
    for i_t in range(TILES):
        o_l = (i_g * TILES + i_t) * (NC * CHUNK) + o_t
        if PREFETCH:
            # The next tile's loads go out before this tile's arithmetic (the loop carries them).
            x_n, xp_n, xn_n, do_n, dn_n = _bwd_chunk_raw(x_ptr, dout_ptr, i_b, o_d, m_d, o_l + NC * CHUNK, L,
                                                         stride_x_b, stride_x_d, stride_do_b, stride_do_d,
                                                         i_t + 1 < TILES, CHUNK)
        else:
            x_r, xp_r, xn_r, do_r, dn_r = _bwd_chunk_raw(x_ptr, dout_ptr, i_b, o_d, m_d, o_l, L, stride_x_b,
                                                         stride_x_d, stride_do_b, stride_do_d, True, CHUNK)
        x_cur = x_r.to(tl.float32)
        # dy one chunk ahead too: dx at a chunk's last positions needs dy up to W-1 later.
        dy = do_r.to(tl.float32)
        dy_next = dn_r.to(tl.float32)
        if SILU:
            x_prev = xp_r.to(tl.float32)
            if HAS_INIT:
                x_prev += _chunk_init(init_ptr, i_b, o_d, m_d, o_l - CHUNK, stride_i_b, stride_i_d, stride_i_w, W)
            x_next = xn_r.to(tl.float32)
            dy = _conv_dact(dy, _chunk_pre(x_cur, x_prev, w_ptr + o_d * W, 1, bias_ptr, o_d, m_d, W, HAS_BIAS,
                                           BLOCK_D, NC), SILU, FAST)
            dy_next = _conv_dact(dy_next, _chunk_pre(x_next, x_cur, w_ptr + o_d * W, 1, bias_ptr, o_d, m_d, W,
                                                     HAS_BIAS, BLOCK_D, NC), SILU, FAST)
        if PREFETCH:
            x_r, xp_r, xn_r, do_r, dn_r = x_n, xp_n, xn_n, do_n, dn_n
        db += tl.sum(dy, axis=2)
        dx = tl.zeros([BLOCK_D, NC, CHUNK], dtype=tl.float32)
        dy, dy_next, dx, dw0 = _tap_grads(dy, dy_next, x_cur, dx, dw0, w_ptr, o_d, m_d, 0, W, BLOCK_D, NC)
        dy, dy_next, dx, dw1 = _tap_grads(dy, dy_next, x_cur, dx, dw1, w_ptr, o_d, m_d, 1, W, BLOCK_D, NC)
        if W > 2:
            dy, dy_next, dx, dw2 = _tap_grads(dy, dy_next, x_cur, dx, dw2, w_ptr, o_d, m_d, 2, W, BLOCK_D, NC)
        if W > 3:
            dy, dy_next, dx, dw3 = _tap_grads(dy, dy_next, x_cur, dx, dw3, w_ptr, o_d, m_d, 3, W, BLOCK_D, NC)
        if W > 4:
            dy, dy_next, dx, dw4 = _tap_grads(dy, dy_next, x_cur, dx, dw4, w_ptr, o_d, m_d, 4, W, BLOCK_D, NC)
        if W > 5:
            dy, dy_next, dx, dw5 = _tap_grads(dy, dy_next, x_cur, dx, dw5, w_ptr, o_d, m_d, 5, W, BLOCK_D, NC)
        if W > 6:
            dy, dy_next, dx, dw6 = _tap_grads(dy, dy_next, x_cur, dx, dw6, w_ptr, o_d, m_d, 6, W, BLOCK_D, NC)
        if W > 7:
            dy, dy_next, dx, dw7 = _tap_grads(dy, dy_next, x_cur, dx, dw7, w_ptr, o_d, m_d, 7, W, BLOCK_D, NC)
        p_dx = (dx_ptr + i_b.to(tl.int64) * stride_dx_b + o_d.to(tl.int64)[:, None, None] * stride_dx_d
                + o_l[None, :, :])
        tl.store(p_dx, dx.to(dx_ptr.dtype.element_ty), mask=m_d[:, None, None] & (o_l < L)[None, :, :])
    i_part = (i_b * tl.num_programs(0) + i_g).to(tl.int64)
    if HAS_BIAS:
        tl.store(db_ptr + i_part * D + o_d, tl.sum(db, axis=1), mask=m_d)
    p_dw = dw_ptr + (i_part * D + o_d) * W
    _store_wgrad(p_dw, dw0, W - 1, m_d)
    _store_wgrad(p_dw, dw1, W - 2, m_d)
    if W > 2:
        _store_wgrad(p_dw, dw2, W - 3, m_d)
    if W > 3:
        _store_wgrad(p_dw, dw3, W - 4, m_d)
    if W > 4:
        _store_wgrad(p_dw, dw4, W - 5, m_d)
    if W > 5:
        _store_wgrad(p_dw, dw5, W - 6, m_d)
    if W > 6:
        _store_wgrad(p_dw, dw6, W - 7, m_d)
    if W > 7:
        _store_wgrad(p_dw, dw7, W - 8, m_d)


# Channel-last x without packing: the rows kernels. Here the positions of a chunk are rows
# D elements apart, so a thread holds 4 or 8 channels (one 8- or 16-byte load per row) of
# ROWS = 4 consecutive rows; Triton then keeps the row axis inside the thread and the split/join
# shifts stay register renames (a tile with channels spread over fewer threads would move
# the rows through shared memory). A program walks STEPS chunks along L in order, carrying
# x and dy of the current chunk: each chunk of x and dout is loaded once, and pre and dy are
# computed once per position (no halo recompute). W <= ROWS + 1.
ROWS = 4


@triton.jit
def _rows_load(ptr, init_ptr, i_b, o_d, m_d, o_q, L, stride_b, stride_l, stride_i_b, stride_i_d, stride_i_w,
               W: tl.constexpr, HAS_INIT: tl.constexpr, ALIGN: tl.constexpr):
    """fp32 (BLOCK_D, 1, ROWS) of a channel-last tensor (stride 1 along D) at positions o_q
    (1, ROWS): zero past L and, before 0, the initial state (HAS_INIT) or zero."""
    p = (ptr + i_b.to(tl.int64) * stride_b + o_d[:, None, None]
         + tl.multiple_of(o_q.to(tl.int64)[None, :, :] * stride_l, [ALIGN, ALIGN, ALIGN]))
    b = tl.load(p, mask=m_d[:, None, None] & ((o_q >= 0) & (o_q < L))[None, :, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        slot = o_q + (W - 1)
        p_i = (init_ptr + i_b.to(tl.int64) * stride_i_b + o_d.to(tl.int64)[:, None, None] * stride_i_d
               + slot[None, :, :] * stride_i_w)
        m_i = m_d[:, None, None] & ((o_q < 0) & (slot >= 0))[None, :, :]
        b += tl.load(p_i, mask=m_i, other=0.0).to(tl.float32)
    return b


@triton.jit
def _rows_program(ptr0, ptr1, ptr2, stride0_b, stride0_l, stride1_b, stride1_l, stride2_b, stride2_l,
                  D, D1, D2, T1, T2, W: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                  PARTS: tl.constexpr):
    """A rows kernel's program (chunk group i_g along L, channel tile, row i_b) -> i_g, i_b, its
    channels and their mask, and the pointer and (B, L) strides of its part (see _part)."""
    tl.static_assert(ROWS == 4)
    tl.static_assert(W <= ROWS + 1)
    i_g, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d0, d_end, ptr, stride_b, stride_l = _part(i_d, ptr0, ptr1, ptr2, stride0_b, stride0_l, stride1_b, stride1_l,
                                               stride2_b, stride2_l, D, D1, D2, T1, T2, BLOCK_D, PARTS)
    o_d = d0 + tl.arange(0, BLOCK_D)
    return i_g, i_b, o_d, o_d < d_end, ptr, stride_b, stride_l


@triton.jit
def _tap(w_all, o_w, k: tl.constexpr):
    """Tap k of the weights held as (BLOCK_D, 1, W_POW2) per thread, as (BLOCK_D, 1, 1): o_w is
    known per register, so this is a register pick, no arithmetic."""
    return tl.sum(tl.where(o_w == k, w_all, 0.0), axis=2)[:, :, None]


@triton.jit
def _causal_conv1d_fwd_rows_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, out_ptr, out1_ptr, out2_ptr,
    L, D, D1, D2, T1, T2,
    stride_x_b, stride_x_l, stride_o_b, stride_o_l, stride_o1_b, stride_o1_l, stride_o2_b, stride_o2_l,
    stride_i_b, stride_i_d, stride_i_w,
    W: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    FAST: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr, ALIGN: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Channel-last forward over STEPS chunks of ROWS positions: each chunk of x is loaded once
    (16 or 8 bytes per row and thread) and the taps are register shifts of it and the chunk
    before, carried from the previous step (the general kernel loads W shifted tiles). The
    (D, W) weights are loaded once per program. PARTS = 3: out is three tensors (see _part)."""
    i_g, i_b, o_d, m_d, out_ptr, stride_o_b, stride_o_l = _rows_program(
        out_ptr, out1_ptr, out2_ptr, stride_o_b, stride_o_l, stride_o1_b, stride_o1_l, stride_o2_b, stride_o2_l,
        D, D1, D2, T1, T2, W, BLOCK_D, ROWS, PARTS)
    o_r = tl.arange(0, ROWS)[None, :]  # (1, ROWS)
    o_w = tl.arange(0, W_POW2)[None, None, :]
    w_all = tl.load(w_ptr + o_d[:, None, None] * W + o_w, mask=m_d[:, None, None] & (o_w < W),
                    other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None, None]
    l0 = i_g * (STEPS * ROWS)
    x_prev = _rows_load(x_ptr, init_ptr, i_b, o_d, m_d, l0 - ROWS + o_r, L, stride_x_b, stride_x_l,
                        stride_i_b, stride_i_d, stride_i_w, W, HAS_INIT, ALIGN)
    for i_s in range(STEPS):
        o_q = l0 + i_s * ROWS + o_r
        x_cur = _rows_load(x_ptr, init_ptr, i_b, o_d, m_d, o_q, L, stride_x_b, stride_x_l,
                           stride_i_b, stride_i_d, stride_i_w, W, False, ALIGN)
        cur, prev = x_cur, x_prev
        pre = _tap(w_all, o_w, W - 1) * cur
        if HAS_BIAS:
            pre += b_bias
        for j in tl.static_range(1, W):
            cur = _shift4(cur, prev, False, BLOCK_D, 1)
            prev = _shift4(prev, prev, False, BLOCK_D, 1)  # only its last W-1-j positions are read
            pre += _tap(w_all, o_w, W - 1 - j) * cur
        if SILU:
            pre = pre * ptx_sigmoid(pre, FAST)
        p_o = (out_ptr + i_b.to(tl.int64) * stride_o_b + o_d[:, None, None]
               + tl.multiple_of(o_q.to(tl.int64)[None, :, :] * stride_o_l, [ALIGN, ALIGN, ALIGN]))
        tl.store(p_o, pre.to(out_ptr.dtype.element_ty), mask=m_d[:, None, None] & (o_q < L)[None, :, :])
        x_prev = x_cur


@triton.jit
def _causal_conv1d_bwd_rows_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, dout_ptr, dout1_ptr, dout2_ptr, dx_ptr, dw_ptr, db_ptr,
    L, D, D1, D2, T1, T2,
    stride_x_b, stride_x_l, stride_do_b, stride_do_l, stride_do1_b, stride_do1_l, stride_do2_b, stride_do2_l,
    stride_dx_b, stride_dx_l,
    stride_i_b, stride_i_d, stride_i_w, stride_w_d, stride_w_k,
    W: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    FAST: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr, ALIGN: tl.constexpr,
    PARTS: tl.constexpr,
):
    """The chunked kernel's one-pass backward for channel-last x, over STEPS chunks of ROWS
    positions: chunk c+1's dy is computed once and carried to the next step as chunk c's.
    ALIGN: the L strides of x, dout and dx are multiples of it (see _row_align). PARTS = 3: dout
    is three channel-last tensors along D (see _part), one launch for Mamba-2's x, B and C."""
    i_g, i_b, o_d, m_d, dout_ptr, stride_do_b, stride_do_l = _rows_program(
        dout_ptr, dout1_ptr, dout2_ptr, stride_do_b, stride_do_l, stride_do1_b, stride_do1_l, stride_do2_b,
        stride_do2_l, D, D1, D2, T1, T2, W, BLOCK_D, ROWS, PARTS)
    o_r = tl.arange(0, ROWS)[None, :]  # (1, ROWS)
    o_w = tl.arange(0, W_POW2)
    l0 = i_g * (STEPS * ROWS)
    x_prev = _rows_load(x_ptr, init_ptr, i_b, o_d, m_d, l0 - ROWS + o_r, L, stride_x_b, stride_x_l,
                        stride_i_b, stride_i_d, stride_i_w, W, HAS_INIT, ALIGN)
    x_cur = _rows_load(x_ptr, init_ptr, i_b, o_d, m_d, l0 + o_r, L, stride_x_b, stride_x_l,
                       stride_i_b, stride_i_d, stride_i_w, W, False, ALIGN)
    dy = _rows_load(dout_ptr, dout_ptr, i_b, o_d, m_d, l0 + o_r, L, stride_do_b, stride_do_l, 0, 0, 0, W, False,
                    ALIGN)
    p_w = w_ptr + o_d * stride_w_d
    dy = _conv_dact(dy, _chunk_pre(x_cur, x_prev, p_w, stride_w_k, bias_ptr, o_d, m_d, W, HAS_BIAS, BLOCK_D, 1, ROWS),
                    SILU, FAST)
    dw = tl.zeros([BLOCK_D, 1, W_POW2], dtype=tl.float32)
    db = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    for i_s in range(STEPS):
        o_q = l0 + i_s * ROWS + o_r
        x_next = _rows_load(x_ptr, init_ptr, i_b, o_d, m_d, o_q + ROWS, L, stride_x_b, stride_x_l,
                            stride_i_b, stride_i_d, stride_i_w, W, False, ALIGN)
        dy_next = _rows_load(dout_ptr, dout_ptr, i_b, o_d, m_d, o_q + ROWS, L, stride_do_b, stride_do_l,
                             0, 0, 0, W, False, ALIGN)
        dy_next = _conv_dact(dy_next, _chunk_pre(x_next, x_cur, p_w, stride_w_k, bias_ptr, o_d, m_d, W, HAS_BIAS, BLOCK_D, 1,
                                                 ROWS), SILU, FAST)
        db += tl.sum(dy, axis=2)
        dx = tl.zeros([BLOCK_D, 1, ROWS], dtype=tl.float32)
        dy_s, dy_ns = dy, dy_next
        for s in tl.static_range(W):
            if s > 0:  # dy at p+s
                dy_s = _shift4(dy_s, dy_ns, True, BLOCK_D, 1)
                dy_ns = _shift4(dy_ns, dy_ns, True, BLOCK_D, 1)
            dx += tl.load(p_w + (W - 1 - s) * stride_w_k, mask=m_d, other=0.0).to(tl.float32)[:, None, None] * dy_s
            # o_w is known per register: this adds to one column, no select.
            dw = tl.where(o_w == W - 1 - s, dw + tl.sum(x_cur * dy_s, axis=2)[:, :, None], dw)
        p_dx = (dx_ptr + i_b.to(tl.int64) * stride_dx_b + o_d[:, None, None]
                + tl.multiple_of(o_q.to(tl.int64)[None, :, :] * stride_dx_l, [ALIGN, ALIGN, ALIGN]))
        tl.store(p_dx, dx.to(dx_ptr.dtype.element_ty), mask=m_d[:, None, None] & (o_q < L)[None, :, :])
        x_cur, dy = x_next, dy_next
    i_part = (i_b * tl.num_programs(0) + i_g).to(tl.int64)
    if HAS_BIAS:
        tl.store(db_ptr + i_part * D + o_d[:, None], db, mask=m_d[:, None])
    p_dw = dw_ptr + (i_part * D + o_d)[:, None, None] * W + o_w[None, None, :]
    tl.store(p_dw, dw, mask=m_d[:, None, None] & (o_w < W)[None, None, :])


@triton.jit
def _conv_wgrad_reduce_kernel(dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, n_parts, DW, D,
                              HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dw = sum of the (n_parts, D*W) fp32 partial rows and dbias of the (n_parts, D) ones,
    in a fixed order (deterministic), cast to the output dtype."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_p = tl.arange(0, BLOCK_P)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        m_p = (p0 + o_p < n_parts)[:, None]
        row = (p0 + o_p).to(tl.int64)[:, None]
        acc_w += tl.sum(tl.load(dw_part_ptr + row * DW + o_n[None, :], mask=m_p & (o_n < DW)[None, :], other=0.0),
                        axis=0)
        if HAS_BIAS:
            acc_b += tl.sum(tl.load(db_part_ptr + row * D + o_n[None, :], mask=m_p & (o_n < D)[None, :], other=0.0),
                            axis=0)
    tl.store(dw_ptr + o_n, acc_w.to(dw_ptr.dtype.element_ty), mask=o_n < DW)
    if HAS_BIAS:
        tl.store(db_ptr + o_n, acc_b.to(db_ptr.dtype.element_ty), mask=o_n < D)


def _n_sms(device):
    return sm_count(device) if device.type == "cuda" else 1


# The weight-gradient reduction sums (BLOCK_P, BLOCK_N) tiles of WGRAD_TILE elements (32 per
# thread): BLOCK_P up to 128 partial rows at a time, so that its loop of dependent loads is
# short (with 16 rows per step and 256 partial rows it took ~20 us) and BLOCK_N small enough
# to give the D*W outputs a few hundred programs.
WGRAD_TILE, WGRAD_MAX_P = 4096, 128
# Rows kernel: halve STEPS (down to 4) until the grid has this many programs per SM (short
# sequences would otherwise leave SMs idle: L=2048 at STEPS=32 is 2 programs per SM).
BWD_ROWS_MIN_PROGRAMS_PER_SM = 8


def _wgrad_outputs(x, weight, bias, wgrad_fp32):
    """(dweight (D, W) fp32 or weight's dtype, dbias (D,) or absent), uninitialised."""
    dim, width = weight.shape
    dw = torch.empty(dim, width, device=x.device, dtype=torch.float32 if wgrad_fp32 else weight.dtype)
    db = torch.empty(dim, device=x.device, dtype=bias.dtype) if bias is not None else absent(x)
    return dw, db


def _bwd_outputs(x, weight, bias, wgrad_fp32):
    """(dx in x's layout, dweight, dbias) as _wgrad_outputs, uninitialised; shared with the fake op."""
    return _empty_in_layout(x), *_wgrad_outputs(x, weight, bias, wgrad_fp32)


def _launch_bwd(dx, dw, db, x, weight, bias, initial_states, starts, rows, silu, dout, config=None, variant=None,
                programs_per_sm=None, tiles_per_program=None, prefetch=None, wgrad_fp32=False):
    """Write the backward into dx, dw, db and return (dw, db); the keywords override the tuned
    settings (benchmarks). dw None: dweight and dbias (see _wgrad_outputs) are allocated after the
    main launch, off the host's path from the forward's launch to the backward's. dout may be a
    tuple of (B, D_k, L) tensors whose D_k add up to D, the gradients of the channels of
    _launch_fwd's tuple out: on the rows kernel's path they share one launch."""
    key = ("bwd", x.shape, x.stride(), x.dtype, x.device, dx.stride(), _sig(dout), weight.shape, bias is None,
           None if initial_states is None else initial_states.stride(), starts is None, rows is None, silu, config,
           variant, programs_per_sm, tiles_per_program, prefetch)
    return _runner(key, lambda: _bwd_runner(dx, x, weight, bias, initial_states, starts, rows, silu, dout, config,
                                            variant, programs_per_sm, tiles_per_program, prefetch))(
        dx, dw, db, x, weight, bias, initial_states, starts, rows, dout, wgrad_fp32)


# The rows backward's (W, D) copies of the weights (see _weight_taps_major): (id of the weight's base
# tensor, its address) -> (weak reference to the base, (version, shape, strides) of the weight, copy).
# An eager channel-last backward made its copy at every call: an aten copy, ~16 us of the H100 host's
# time (session 12) in a call that is host-bound. Capped like the plans (a PlanCache, not registered
# with the settings: the copies do not depend on them).
_WEIGHT_COPIES = PlanCache()


def _weight_taps_major(weight):
    """weight (D, W) as a contiguous (W, D) copy, kept from call to call while it is the same weight:
    the same base tensor (weight._base, or weight; compared by identity and held by weak reference, so
    a freed weight's address taken by another tensor never matches), the same address, shape and
    strides, and the same version counter value, so that any in-place write that autograd sees (an
    optimizer step, load_state_dict, a write through a view) makes the next call copy again. A write
    through ``.data``, which autograd does not see either, is not seen. While a CUDA graph is captured
    the copy is made in the graph: a replay after the weights changed must copy them again."""
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        return weight.t().contiguous()
    base = weight._base
    if base is None:
        base = weight
    key = (id(base), weight.data_ptr())  # slices of one base (Mamba-2's x, B, C parts) each have theirs
    state = (weight._version, weight.shape, weight.stride())
    entry = _WEIGHT_COPIES.get(key)
    if entry is not None and entry[0]() is base and entry[1] == state:
        return entry[2]
    copy = weight.t().contiguous()
    _WEIGHT_COPIES[key] = (weakref.ref(base), state, copy)
    return copy


def _bwd_runner(dx, x, weight, bias, initial_states, starts, rows, silu, dout, config, variant, programs_per_sm,
                tiles_per_program, prefetch):
    """run(dx, dw, db, x, weight, bias, initial_states, starts, rows, dout, wgrad_fp32) -> (dw, db) for
    _launch_bwd's signature."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    path = _path(x, starts)
    variant = variant or BWD_DY_SHIFT.get(path)
    if path == "channel_last":
        if variant == "rows" and (starts is not None or width > ROWS + 1 or x.stride(1) != 1):
            variant = "scratch"
        if variant == "rows":
            path = "rows"
    block_d, block, warps, *register_cap = config or BWD_CONFIG[path]
    douts_in = dout if isinstance(dout, (tuple, list)) else (dout,)
    parts = _parts_layout(douts_in, dim, block_d) if path == "rows" else None
    if len(douts_in) > 1 and parts is None:
        def run_parts(dx, dw, db, x, weight, bias, initial_states, starts, rows, dout, wgrad_fp32):
            if dw is None:
                dw, db = _wgrad_outputs(x, weight, bias, wgrad_fp32)
            for d, part in _part_slices(dout):
                _launch_bwd(dx[:, d], dw[d], None if db is None else db[d], x[:, d], weight[d],
                            None if bias is None else bias[d],
                            None if initial_states is None else initial_states[:, d], starts, rows, silu, part, config,
                            variant, programs_per_sm, tiles_per_program, prefetch)
            return dw, db
        return run_parts
    n_d_tiles = cdiv(dim, block_d) if parts is None else parts[4]
    if parts is None:
        parts = (dim, dim, n_d_tiles, n_d_tiles)
    init_strides = initial_states.stride() if initial_states is not None else (0, 0, 0)
    flags = {"W": width, "HAS_BIAS": bias is not None, "HAS_INIT": initial_states is not None, "SILU": silu,
             "FAST": ptx_math(_causal_conv1d_fwd_kernel), "BLOCK_D": block_d, "num_warps": warps}
    if register_cap:  # more resident warps to hide the loads' latency, at the cost of spills
        flags["maxnreg"] = register_cap[0]
    if path == "chunked":
        prefetch = BWD_PREFETCH if prefetch is None else prefetch
        tiles = min(tiles_per_program or BWD_TILES_PER_PROGRAM, cdiv(length, block * CHUNK))
        n_parts = cdiv(length, block * CHUNK * tiles)
    elif path == "rows":
        steps = min(block, cdiv(length, ROWS))
        min_programs = _n_sms(x.device) * (BWD_ROWS_MIN_PROGRAMS_PER_SM if programs_per_sm is None
                                           else programs_per_sm)
        while steps > 4 and cdiv(length, steps * ROWS) * n_d_tiles * batch < min_programs:
            steps = cdiv(steps, 2)
        n_parts = cdiv(length, steps * ROWS)
    else:
        n_parts = cdiv(length, block)
    # One fp32 partial row per (row, program along L), summed in a fixed order: dweight
    # is deterministic.
    part_shape, device = (batch * n_parts, dim), x.device
    has_bias = bias is not None
    block_p = min(WGRAD_MAX_P, next_pow2(batch * n_parts))
    block_n = WGRAD_TILE // block_p
    reduce = Plan(_conv_wgrad_reduce_kernel, (cdiv(dim * width, block_n),), batch * n_parts, dim * width, dim,
                  HAS_BIAS=has_bias, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)

    def partials():
        dw_part = torch.empty(*part_shape, width, device=device, dtype=torch.float32)
        return dw_part, torch.empty(part_shape, device=device, dtype=torch.float32) if has_bias else None

    def finish(dw_part, db_part, dw, db, x, weight, bias, wgrad_fp32):
        if dw is None:
            dw, db = _wgrad_outputs(x, weight, bias, wgrad_fp32)
        reduce(dw_part, db_part, dw, db)
        return dw, db

    if path == "chunked":
        copy_dout = douts_in[0].stride(2) != 1
        dout_strides = (dim * length, length) if copy_dout else douts_in[0].stride()[:2]
        plan = Plan(_causal_conv1d_bwd_chunk_kernel, (n_parts, cdiv(dim, block_d), batch), length, dim,
                    x.stride(0), x.stride(1), *dout_strides, dx.stride(0), dx.stride(1), *init_strides,
                    NC=block, CHUNK=CHUNK, TILES=tiles, PREFETCH=prefetch and tiles > 1, **flags)

        def run(dx, dw, db, x, weight, bias, initial_states, starts, rows, dout, wgrad_fp32):
            dw_part, db_part = partials()
            plan(x, weight, bias, initial_states, dout.contiguous() if copy_dout else dout, dx, dw_part, db_part)
            return finish(dw_part, db_part, dw, db, x, weight, bias, wgrad_fp32)
        return run
    if path == "rows":
        # Channel-last douts (a row-major copy of any that is not); strides as the copy has them.
        copies = [d.stride(1) != 1 for d in douts_in]
        douts_like = [d.transpose(1, 2).contiguous().transpose(1, 2) if c else d for d, c in zip(douts_in, copies)]
        douts_like, extra_strides = _part_args(douts_like)
        n_in, copy_any = len(douts_in), any(copies)
        # Weights as a (W, D) copy (strides (1, D)): a thread's channels of one tap are one vector load,
        # where the (D, W) rows took scalar loads of 8 cache lines per warp each, per tap and step.
        plan = Plan(_causal_conv1d_bwd_rows_kernel, (n_parts, n_d_tiles, batch), length, dim, *parts[:4],
                    x.stride(0), x.stride(2), douts_like[0].stride(0), douts_like[0].stride(2), *extra_strides,
                    dx.stride(0), dx.stride(2), *init_strides, 1, dim,
                    W_POW2=next_pow2(width), ROWS=ROWS, STEPS=steps,
                    ALIGN=min(_row_align(x, dx, *douts_like), BWD_ROWS_LOAD_BYTES // x.element_size()),
                    PARTS=3 if n_in > 1 else 1, **flags)

        def run(dx, dw, db, x, weight, bias, initial_states, starts, rows, dout, wgrad_fp32):
            douts = dout if n_in > 1 else (dout,)
            if copy_any:
                douts = [d.transpose(1, 2).contiguous().transpose(1, 2) if c else d for d, c in zip(douts, copies)]
            dw_part, db_part = partials()
            plan(x, _weight_taps_major(weight), bias, initial_states, *_pad3(douts), dx, dw_part, db_part)
            return finish(dw_part, db_part, dw, db, x, weight, bias, wgrad_fp32)
        return run
    n_l_tiles = n_parts
    scratch_mode = variant == "scratch"
    halo = next_pow2(width - 1)
    n_d_tiles = cdiv(dim, block_d)
    n_tiles = batch * n_l_tiles * n_d_tiles
    n_prog = max(1, min(n_tiles, _n_sms(x.device) * (programs_per_sm or BWD_PROGRAMS_PER_SM)))
    if scratch_mode:
        # Laid out like x's tiles, so that the shifted reads are along the fast axis too.
        channel_last = path == "channel_last"
        scratch_shape = (n_prog, block + halo, block_d) if channel_last else (n_prog, block_d, block + halo)
        sc_strides = ((block + halo) * block_d, 1, block_d) if channel_last else ((block + halo) * block_d,
                                                                                 block + halo, 1)
    else:
        sc_strides = (0, 0, 0)
    plan = Plan(_causal_conv1d_bwd_kernel, (n_prog,), length, dim, n_l_tiles, n_d_tiles, n_tiles,
                *x.stride(), *douts_in[0].stride(), *dx.stride(), *init_strides, *sc_strides,
                HAS_SEQ=starts is not None, INIT_PER_SEQ=rows is not None, SCRATCH=scratch_mode, BLOCK_L=block,
                HALO=halo, **flags)

    def run(dx, dw, db, x, weight, bias, initial_states, starts, rows, dout, wgrad_fp32):
        scratch = torch.empty(scratch_shape, device=device, dtype=torch.float32) if scratch_mode else None
        dw_part, db_part = partials()
        plan(x, weight, bias, initial_states, starts, rows, dout, dx, dw_part, db_part, scratch)
        return finish(dw_part, db_part, dw, db, x, weight, bias, wgrad_fp32)
    return run


def _causal_conv1d_bwd_launcher(x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor | None,
                       starts: Tensor | None, rows: Tensor | None, silu: bool, dout: Tensor,
                       wgrad_fp32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs as _causal_conv1d_fwd's, dout (B, D, L) -> dx (B, D, L) in x's layout, dweight
    (D, W) (fp32 if wgrad_fp32, else weight's dtype), dbias (D,) (empty if bias is None).
    dweight counts the taps on x only (the initial-state taps are _initial_states_grad's)."""
    dx = _empty_in_layout(x)
    dw, db = _launch_bwd(dx, None, None, x, weight, bias, initial_states, starts, rows, silu, dout,
                         wgrad_fp32=wgrad_fp32)
    return dx, dw, db


_causal_conv1d_bwd = launcher_op("causal_conv1d_bwd")(_causal_conv1d_bwd_launcher)


@_causal_conv1d_bwd.register_fake
def _(x, weight, bias, initial_states, starts, rows, silu, dout, wgrad_fp32):
    return _bwd_outputs(x, weight, bias, wgrad_fp32)


def _initial_states_grad(x, weight, bias, initial_states, starts, cu_seqlens, silu, dout):
    """Gradients through the initial states: d initial_states, and the part of d weight from
    taps that read a state (the kernel sums x taps only). Only the first W-1 outputs of each
    sequence read a state: a few positions, done with torch ops (no autograd inside a
    backward, so that torch.compile can trace it)."""
    width = weight.shape[1]
    n_states, length = initial_states.shape[0], x.shape[2]
    if length == 0:
        return torch.zeros_like(initial_states), torch.zeros_like(weight, dtype=torch.float32)
    if cu_seqlens is None:
        first = torch.arange(width - 1, device=x.device).expand(n_states, -1)  # (R, W-1)
        seq_row = torch.arange(n_states, device=x.device)
        valid = first < length
    else:
        first = cu_seqlens[:-1].long()[:, None] + torch.arange(width - 1, device=x.device)
        seq_row = torch.zeros(n_states, dtype=torch.long, device=x.device)
        valid = first < cu_seqlens[1:].long()[:, None]
    pos = first.clamp(0, length - 1)
    if starts is not None:
        valid = valid & (torch.gather(starts, 1, pos) == 0)  # the state only feeds the first run

    def head(t):  # (R, D, W-1): the first W-1 positions of each sequence, zero past its end
        return t[seq_row[:, None], :, pos].transpose(1, 2) * valid.unsqueeze(1)

    init = initial_states.float()
    wf = weight.float()
    pre = _conv_dense_ref(head(x), weight, bias, init, None, False)  # (R, D, W-1)
    dy = head(dout).float()
    if silu:
        sig = torch.sigmoid(pre)
        dy = dy * sig * (1 + pre * (1 - sig))
    # Output t reads state slot t + k through tap k (while t + k < W-1).
    grad_init = torch.zeros_like(init)
    grad_w = torch.zeros_like(wf)
    for k in range(width - 1):
        grad_init[..., k:] += wf[:, k, None] * dy[..., : width - 1 - k]
        grad_w[:, k] = (init[..., k:] * dy[..., : width - 1 - k]).sum((0, 2))
    return grad_init.to(initial_states.dtype), grad_w


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, starts, rows, cu_seqlens, silu):
        ctx.save_for_backward(x, weight, bias, initial_states, starts, rows, cu_seqlens)
        ctx.silu = silu
        return _causal_conv1d_fwd(x, weight, bias, initial_states, starts, rows, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, initial_states, starts, rows, cu_seqlens = ctx.saved_tensors
        dx, dw, db = _causal_conv1d_bwd(x, weight, bias, initial_states, starts, rows, ctx.silu, dout,
                                        initial_states is not None)
        db = db if bias is not None else None
        if initial_states is None:
            return dx, dw, db, None, None, None, None, None
        dinit, dw_state = _initial_states_grad(x, weight, bias, initial_states, starts if rows is None else None,
                                               cu_seqlens, ctx.silu, dout)
        return dx, (dw + dw_state).to(weight.dtype), db, dinit, None, None, None, None


def _check_weight_bias(weight, bias, dim: int) -> int:
    """weight (D, W) with W in 2..8 and bias None or (D,), float tensors; returns W. The comparisons
    first, check_tensor (its message naming the argument) only where they fail."""
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype in FLOAT_DTYPES):
        check_tensor("weight", weight, ndim=2, dtype=FLOAT_DTYPES)
    dim_w, width = weight.shape
    if dim_w != dim or not 2 <= width <= 8:
        raise ValueError(f"weight must have shape (D={dim}, W) with W in 2..8, got {tuple(weight.shape)}")
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (dim,)
                                 and bias.dtype in FLOAT_DTYPES):
        check_tensor("bias", bias, shape=(dim,), dtype=FLOAT_DTYPES)
    return width


def _validate_conv(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, cu_seqlens):
    """What causal_conv1d_fn accepts, in one place. Each check is a few comparisons, and only one that
    fails builds its error (naming the argument; check_tensor's message where its check is the same):
    an accepted call pays the comparisons only (eager calls are host-bound)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.dtype in FLOAT_DTYPES):
        check_tensor("x", x, ndim=3, dtype=FLOAT_DTYPES)
    dim = x.shape[1]
    width = _check_weight_bias(weight, bias, dim)
    # Packed sequences or a final-state buffer: every check below runs (cu_seqlens is read on the host).
    rare = seq_idx is not None or cu_seqlens is not None or final_states_out is not None
    if seq_idx is not None or cu_seqlens is not None:
        if seq_idx is not None and cu_seqlens is not None:
            raise ValueError("give seq_idx or cu_seqlens, not both")
        check_tensor("seq_idx", seq_idx, shape=(x.shape[0], x.shape[2]), dtype=INDEX_DTYPES, optional=True)
    device = x.device
    if (rare or weight.device != device or (bias is not None and bias.device != device)
            or (initial_states is not None and getattr(initial_states, "device", None) != device)):
        check_same_device(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                          final_states_out=final_states_out, cu_seqlens=cu_seqlens)
    if initial_states is None and not rare:
        return
    batch, length = x.shape[0], x.shape[2]
    check_cu_seqlens(cu_seqlens, length, batch)
    n_states = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    who = "B" if cu_seqlens is None else "num_seqs"
    if initial_states is not None and not (
            isinstance(initial_states, torch.Tensor) and initial_states.dtype in FLOAT_DTYPES
            and initial_states.shape == (n_states, dim, width - 1)):
        check_tensor("initial_states", initial_states, dtype=FLOAT_DTYPES)
        raise ValueError(f"initial_states must have shape ({who}={n_states}, D={dim}, W-1={width - 1}), "
                         f"got {tuple(initial_states.shape)}")
    if final_states_out is not None:
        if not return_final_states:
            raise ValueError("final_states_out is given but return_final_states=False")
        check_tensor("final_states_out", final_states_out, dtype=FLOAT_DTYPES)
        if tuple(final_states_out.shape) != (n_states, dim, width - 1):
            raise ValueError(f"final_states_out must have shape ({who}={n_states}, D={dim}, W-1={width - 1}), "
                             f"got {tuple(final_states_out.shape)}")


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
    *,
    cu_seqlens=None,
    backend=None,
):
    """Causal depthwise conv1d over a sequence (see the module header for the formula).

    Args:
        x: (B, D, L), contiguous or channel-last (``x.transpose(1, 2)`` contiguous).
        weight: (D, W), W in 2..8.
        bias: (D,) or None.
        seq_idx: (B, L) int32, sequence index of each position (packed rows); inputs
            never reach outputs of another sequence.
        initial_states: (B, D, W-1) (with cu_seqlens: (num_seqs, D, W-1)), the W-1
            inputs before position 0; zeros if None. Gets gradients.
        return_final_states: also return the last W-1 inputs, (B, D, W-1)
            (with cu_seqlens: (num_seqs, D, W-1)), dtype of x.
        final_states_out: optional tensor of that shape to write the final states into.
        activation: None, "silu" or "swish" (= silu).
        cu_seqlens: (num_seqs + 1,) int32 packed-sequence boundaries; needs B == 1.
        backend: "torch", "triton" or None (auto).

    Returns:
        out (B, D, L) in the dtype and memory layout of x, or (out, final_states).
    """
    _check_activation(activation)
    _validate_conv(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, cu_seqlens)
    if resolve_backend(backend, x, weight) == "torch" or x.shape[2] == 0:
        return causal_conv1d_ref(x, weight, bias, initial_states, return_final_states, final_states_out,
                                 activation, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    length, width = x.shape[2], weight.shape[1]
    starts = rows = None
    if cu_seqlens is not None:
        starts, rows = _packed_starts(cu_seqlens, length)
    elif seq_idx is not None:
        starts = _run_starts(seq_idx)
    out = CausalConv1dFn.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                               initial_states, starts, rows, cu_seqlens, activation is not None)
    if not return_final_states:
        return out
    final = _final_states(x, initial_states, width, starts if cu_seqlens is None else None, cu_seqlens)
    return out, _into_final_states_out(final, final_states_out)


# ---------------------------------------------------------------------------
# Decode: T new tokens against a rolling conv_state.
# ---------------------------------------------------------------------------


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
    """Torch reference of :func:`causal_conv1d_update`; updates ``conv_state`` in place."""
    apply_silu = _check_activation(activation)
    single = x.dim() == 2
    xt = x.unsqueeze(-1) if single else x  # (B, D, T)
    batch, dim, n_tok = xt.shape
    state_len = conv_state.shape[-1]
    width = weight.shape[1]
    if conv_state_indices is None:
        rows = torch.arange(batch, device=x.device)
        valid = torch.ones(batch, dtype=torch.bool, device=x.device)
    else:
        rows = conv_state_indices.long()
        valid = rows >= 0
        rows = rows.clamp_min(0)
    state = conv_state[rows].float()  # (B, D, S)
    if cache_seqlens is None:
        hist = torch.cat([state, xt.float()], dim=-1)  # (B, D, S+T), oldest first
        new_state = hist[..., n_tok:]
        window = hist[..., state_len - (width - 1) :]  # (B, D, W-1+T)
    else:
        # Circular buffer: logical position j lives at slot j % S; the next token is at cache_seqlens.
        pos = cache_seqlens.long()[:, None] + torch.arange(-(width - 1), 0, device=x.device)  # (B, W-1)
        past = torch.gather(state, 2, (pos % state_len)[:, None, :].expand(batch, dim, width - 1))
        window = torch.cat([past, xt.float()], dim=-1)
        slots = (cache_seqlens.long()[:, None] + torch.arange(n_tok, device=x.device)) % state_len  # (B, T)
        new_state = state.clone()
        # Only the last S of the T tokens survive a wrap; write them in order.
        keep = max(0, n_tok - state_len)
        new_state.scatter_(2, slots[:, None, keep:].expand(batch, dim, n_tok - keep), xt.float()[..., keep:])
    wf = weight.float()
    out = xt.new_zeros(batch, dim, n_tok, dtype=torch.float32)
    for k in range(width):
        out = out + wf[:, k, None] * window[..., k : k + n_tok]
    if bias is not None:
        out = out + bias.float()[:, None]
    if apply_silu:
        out = F.silu(out)
    out = out * valid[:, None, None]
    with torch.no_grad():
        idx = rows[valid]
        conv_state[idx] = new_state[valid].to(conv_state.dtype)
    out = out.to(x.dtype)
    return out.squeeze(-1) if single else out


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, seqlens_ptr, idx_ptr, out_ptr,
    D, T, S, n_rows,
    stride_x_b, stride_x_d, stride_x_t,
    stride_s_b, stride_s_d, stride_s_s,
    stride_o_b, stride_o_d, stride_o_t,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, CIRCULAR: tl.constexpr, HAS_INDICES: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    row, valid = state_row(idx_ptr, i_b, n_rows, o_d, HAS_INDICES)
    m_state = m_d & valid
    p_x = x_ptr + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64) * stride_x_d
    p_s = state_ptr + row * stride_s_b + o_d.to(tl.int64) * stride_s_d
    p_o = out_ptr + i_b.to(tl.int64) * stride_o_b + o_d.to(tl.int64) * stride_o_d
    if CIRCULAR:
        pos0 = tl.load(seqlens_ptr + i_b).to(tl.int32)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)

    # Every read of the old state happens before the barrier, every write after it.
    for t in range(T):
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(W):
            q = t - (W - 1) + k  # relative to the first new token; < 0 is in the state
            if CIRCULAR:
                slot = ((pos0 + q) % S + S) % S
            else:
                slot = S + q
            q_d = tl.zeros([BLOCK_D], dtype=tl.int32) + q
            b_in = tl.load(p_x + q * stride_x_t, mask=m_d & (q_d >= 0), other=0.0).to(tl.float32)
            b_in += tl.load(p_s + slot * stride_s_s, mask=m_state & (q_d < 0), other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32) * b_in
        if HAS_BIAS:
            acc += b_bias
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        acc = tl.where(valid, acc, 0.0)
        tl.store(p_o + t * stride_o_t, acc.to(out_ptr.dtype.element_ty), mask=m_d)

    o_s = tl.arange(0, BLOCK_S)
    m_tile = m_state[:, None] & (o_s < S)[None, :]
    if CIRCULAR:
        # Slot j receives token t0 = (j - pos0) mod S, and again every S tokens; keep the last.
        t0 = ((o_s - pos0) % S + S) % S
        m_new = t0 < T
        t_last = t0 + S * ((T - 1 - t0) // S)
        src = tl.load(p_x[:, None] + t_last[None, :] * stride_x_t, mask=m_tile & m_new[None, :], other=0.0)
        tl.debug_barrier()
        tl.store(p_s[:, None] + o_s[None, :] * stride_s_s, src.to(state_ptr.dtype.element_ty),
                 mask=m_tile & m_new[None, :])
    else:
        # Shift left by T: slot j takes old slot j + T, or new token j + T - S.
        j = o_s + T
        src = tl.load(p_s[:, None] + j[None, :] * stride_s_s, mask=m_tile & (j < S)[None, :], other=0.0)
        src = src.to(tl.float32) + tl.load(p_x[:, None] + (j - S)[None, :] * stride_x_t,
                                           mask=m_tile & (j >= S)[None, :], other=0.0).to(tl.float32)
        tl.debug_barrier()
        tl.store(p_s[:, None] + o_s[None, :] * stride_s_s, src.to(state_ptr.dtype.element_ty), mask=m_tile)


UPDATE_BLOCK_D = 128


def _causal_conv1d_update_launcher(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                          cache_seqlens: Tensor | None, conv_state_indices: Tensor | None, silu: bool) -> Tensor:
    """x (B, D) or (B, D, T), conv_state (B_state, D, S) updated in place, weight (D, W)
    contiguous -> out shaped like x (dense)."""
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    # The update's plans live with the runners (a decode step is host-bound).
    key = ("update", x.shape, x.stride(), conv_state.shape, conv_state.stride(), weight.shape, bias is None,
           cache_seqlens is None, conv_state_indices is None, silu)
    plan = _RUNNERS.get(key)
    if plan is None:
        batch, dim = x.shape[:2]
        n_tok = x.shape[2] if x.dim() == 3 else 1
        state_len = conv_state.shape[2]
        # One token: a token axis of stride 0 instead of an unsqueeze()d view.
        x_st = x.stride() if x.dim() == 3 else x.stride() + (0,)
        out_st = out.stride() if x.dim() == 3 else out.stride() + (0,)
        block_d = min(UPDATE_BLOCK_D, next_pow2(dim))
        plan = _RUNNERS[key] = Plan(
            _causal_conv1d_update_kernel, (cdiv(dim, block_d), batch),
            dim, n_tok, state_len, conv_state.shape[0], *x_st, *conv_state.stride(), *out_st,
            W=weight.shape[1], HAS_BIAS=bias is not None, CIRCULAR=cache_seqlens is not None,
            HAS_INDICES=conv_state_indices is not None, SILU=silu, BLOCK_D=block_d,
            BLOCK_S=next_pow2(state_len), num_warps=4)
    plan(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out)
    return out


_causal_conv1d_update = launcher_op("causal_conv1d_update", mutates_args=("conv_state",))(
    _causal_conv1d_update_launcher)


@_causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, silu):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _validate_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices):
    """What causal_conv1d_update accepts, in one place; as _validate_conv, an accepted call pays a few
    comparisons (a decode step is host-bound) and only a failing check builds its error."""
    if not (isinstance(x, torch.Tensor) and x.dim() in (2, 3) and x.dtype in FLOAT_DTYPES):
        check_tensor("x", x, ndim=(2, 3), dtype=FLOAT_DTYPES)
    batch, dim = x.shape[:2]
    width = _check_weight_bias(weight, bias, dim)
    if not (isinstance(conv_state, torch.Tensor) and conv_state.dim() == 3 and conv_state.dtype in FLOAT_DTYPES):
        check_tensor("conv_state", conv_state, ndim=3, dtype=FLOAT_DTYPES)
    if conv_state.shape[1] != dim or conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state must have shape (B_state, D={dim}, S) with S >= W-1={width - 1}, "
                         f"got {tuple(conv_state.shape)}")
    for name, index in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if index is not None and not (isinstance(index, torch.Tensor) and index.shape == (batch,)
                                      and index.dtype in INDEX_DTYPES):
            check_tensor(name, index, shape=(batch,), dtype=INDEX_DTYPES)
    if conv_state_indices is None and conv_state.shape[0] != batch:
        raise ValueError(f"conv_state must have batch B={batch} when conv_state_indices is None, "
                         f"got shape {tuple(conv_state.shape)}")
    device = x.device
    if (conv_state.device != device or weight.device != device or (bias is not None and bias.device != device)
            or (cache_seqlens is not None and cache_seqlens.device != device)
            or (conv_state_indices is not None and conv_state_indices.device != device)):
        check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                          conv_state_indices=conv_state_indices)
    # The indices' range is checked on the host for CPU tensors only (a GPU decode step must not sync).
    if (conv_state_indices is not None and not conv_state_indices.is_cuda and conv_state_indices.numel() > 0
            and not torch.compiler.is_compiling()):
        top = int(conv_state_indices.max())
        if top >= conv_state.shape[0]:
            raise ValueError(f"conv_state_indices holds {top} but conv_state has only {conv_state.shape[0]} rows")


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, *, backend=None):
    """Causal conv1d over T new tokens, continuing from ``conv_state`` (updated in place).

    Args:
        x: (B, D) one token or (B, D, T) T tokens per sequence.
        conv_state: (B_state, D, S), S >= W-1: the last S inputs, oldest first; after the
            call it holds the last S inputs including the new tokens. With ``cache_seqlens``
            it is a circular buffer instead: input at position j is stored at slot j % S.
        weight: (D, W), W in 2..8.  bias: (D,) or None.  activation: None | "silu" | "swish".
        cache_seqlens: (B,) int32, number of tokens already in each sequence (circular mode).
            The caller advances it.
        conv_state_indices: (B,) int32, row of conv_state for each sequence; a negative
            index is a padding slot: no state is touched and its output is zero. Indices past
            the end of conv_state are an error on CPU; on the GPU (no host sync per step) the
            kernel treats them as padding.
        backend: "torch", "triton" or None (auto).

    Returns:
        out shaped like x.
    """
    _check_activation(activation)
    _validate_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    if resolve_backend(backend, x, conv_state) == "torch":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    if weight.stride() != (weight.shape[1], 1):
        weight = weight.contiguous()
    if bias is not None and bias.stride() != (1,):
        bias = bias.contiguous()
    return _causal_conv1d_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                                 activation is not None)
