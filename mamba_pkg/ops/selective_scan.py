"""Mamba-1 selective scan.

Per channel d, with a diagonal state h (N,) and input-dependent B_t, C_t (N,):

    dt_t  = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        A (D, N), real
    y_t   = C_t . h_t + D * u_t
    out_t = y_t * silu(z_t)                            (only if z is given)

Shapes: u, delta, z (B, D, L); A (D, N); B, C (D, N) fixed, or (B, N, L), or
(B, G, N, L) with channel d reading group d // (D / G); D, delta_bias (D,);
states (B, D, N) fp32. Packed sequences: batch 1 and ``cu_seqlens``
(num_seqs + 1,); every sequence starts from zero (or its own initial state) and
``last_state`` is (num_seqs, D, N). Math in fp32, out in u.dtype.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from mamba_pkg.ops._launch import launch
from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    next_pow2,
    ptx_exp2,
    ptx_log2,
    ptx_math,
    ptx_sigmoid,
    resolve_backend,
    seq_idx_from_cu_seqlens,
    sm_count,
    tl,
    triton,
)

MAX_DSTATE = 256
# With full tiles (EVEN), N <= 16 and few programs per SM (_few_programs), the forward kernels prefetch
# their next tiles' lines into L1 (PTX; see _prefetch_tile; masked tiles and N = 64's forward already
# spill, and the prefetch's addresses add to the spill: offline SASS, N = 64 24 -> 56 bytes of stack).
# H100, same run, session 6: fwd B=1 D=4096 L=8192 0.503 -> 0.479 ms; in the backward it cost 1% (fwd+bwd
# 0.798 -> 0.808 ms at B=4 D=2048 L=2048), so not there. Session 8, with the B/C words (same run): it
# costs where the L1 pipe is busy, fwd B=4 D=2048 L=2048 0.162 with against 0.153 without, B=8 D=1536
# L=8192 0.952 / 0.790, fwd+bwd B=4 D=2048 L=2048 0.709 / 0.662, and still pays at 3.9 programs per SM:
# B=1 D=4096 L=8192 0.432 / 0.469, N=4 B=4 D=2048 L=4096 0.207 / 0.240.
# A switch for benchmarks/bench_selective_scan.py --variants.
L1_PREFETCH = True
# Sums across lanes by a layout change and adds instead of shuffles (see _sum_last); a switch for
# benchmarks/bench_selective_scan.py --variants.
SPLIT_SUMS = True
# Input-dependent bf16 B and C taken to the scan layout as bf16 (32-bit words of two steps) and unpacked
# there, instead of converted to fp32 first (see _bc_f32): half the shared-memory bytes of their layout
# change, at one shift or mask per value; with four or more lanes per channel (N > 8). Offline sm_90
# SASS, Triton 3.6, N = 16, loop per tile: fwd 614 -> 670 instructions (LDS.128 40 -> 24, and 168
# instead of 254 registers: 12 programs per SM, B=8 D=1536 in one wave), ckpt fwd 654 -> 709, bwd
# 849 -> 878 (LDS.128 24 -> 16); ncu, fwd B=4 D=2048 L=2048: shared wavefronts 21.1M -> 15.6M, L1 pipe
# 81% -> 69%. H100, same run (session 8): fwd+bwd B=4 D=2048 L=8192 2.709 -> 2.619 ms, B=8 D=1536 L=2048
# 1.189 -> 1.058, B=1 D=4096 L=8192 1.805 -> 1.644; with two lanes (N = 4) slower: fwd+bwd 0.841 -> 0.960.
# Switches per kernel for benchmarks/bench_selective_scan.py --variants.
BC_WORDS_FWD = True
BC_WORDS_BWD = True
# Steps per chunk of the reference: the scan inside a chunk is vectorised, the
# state is carried across chunks in a Python loop of L / REF_CHUNK iterations.
REF_CHUNK = 64


# ---------------------------------------------------------------------------
# Input checks (shared by the reference and the kernels)
# ---------------------------------------------------------------------------


def _check_bc(name: str, t, batch: int, dim: int, dstate: int, seqlen: int) -> None:
    check_tensor(name, t, ndim=(2, 3, 4), dtype=FLOAT_DTYPES)
    if t.dim() == 2:
        check_tensor(name, t, shape=(dim, dstate))
    elif t.dim() == 3:
        check_tensor(name, t, shape=(batch, dstate, seqlen))
    else:
        check_tensor(name, t, shape=(batch, None, dstate, seqlen))
        groups = t.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"{name} (B, G, N, L) has G={groups} groups, which must divide D={dim}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens) -> int:
    """Validate every argument; returns the number of sequences (batch, or packed sequences)."""
    check_tensor("u", u, ndim=3, dtype=FLOAT_DTYPES)
    batch, dim, seqlen = u.shape
    check_tensor("delta", delta, shape=(batch, dim, seqlen), dtype=u.dtype)
    check_tensor("A", A, ndim=2, dtype=torch.float32)
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) = ({dim}, N), got {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"A has state size N={dstate}; supported: 1 <= N <= {MAX_DSTATE}")
    _check_bc("B", B, batch, dim, dstate, seqlen)
    _check_bc("C", C, batch, dim, dstate, seqlen)
    check_tensor("D", D, shape=(dim,), dtype=torch.float32, optional=True)
    check_tensor("z", z, shape=(batch, dim, seqlen), dtype=u.dtype, optional=True)
    check_tensor("delta_bias", delta_bias, shape=(dim,), dtype=torch.float32, optional=True)
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, seqlen, batch)
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    check_tensor("initial_state", initial_state, shape=(num_seqs, dim, dstate), dtype=torch.float32, optional=True)
    return num_seqs


def _bc_ok(t, batch: int, dim: int, dstate: int, seqlen: int) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES
            and (t.shape == (batch, dstate, seqlen) or t.shape == (dim, dstate)))


def _inputs_ok(u, delta, A, B, C, D, z, delta_bias) -> bool:
    """The common case (B and C (B, N, L) or (D, N), no initial state, no cu_seqlens) in a
    few comparisons, since a call's host time matters at short L; anything else goes
    through _check_inputs, which names the offending argument."""
    if not (isinstance(u, torch.Tensor) and isinstance(delta, torch.Tensor) and isinstance(A, torch.Tensor)):
        return False
    shape, dtype, device = u.shape, u.dtype, u.device
    if len(shape) != 3 or dtype not in FLOAT_DTYPES or delta.shape != shape or delta.dtype != dtype:
        return False
    batch, dim, seqlen = shape
    if A.dtype != torch.float32 or A.dim() != 2 or A.shape[0] != dim or not 1 <= A.shape[1] <= MAX_DSTATE:
        return False
    dstate = A.shape[1]
    if not (_bc_ok(B, batch, dim, dstate, seqlen) and _bc_ok(C, batch, dim, dstate, seqlen)):
        return False
    for t in (D, delta_bias):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (dim,)):
            return False
    if z is not None and not (isinstance(z, torch.Tensor) and z.shape == shape and z.dtype == dtype):
        return False
    for t in (delta, A, B, C, D, z, delta_bias):
        if t is not None and t.device != device:
            return False
    return True


def _expand_bc(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (B, D, N, L) (input-dependent) or (D, N) (fixed), fp32."""
    t = t.float()
    if t.dim() == 3:
        return t.unsqueeze(1)  # (B, 1, N, L) broadcasts over D
    if t.dim() == 4:
        return t.repeat_interleave(dim // t.shape[1], dim=1)  # (B, D, N, L)
    return t


# ---------------------------------------------------------------------------
# Reference (the spec; torch, fp32, differentiable by autograd)
# ---------------------------------------------------------------------------


def _scan_chunk(decay: torch.Tensor, inp: torch.Tensor):
    """Inclusive scan h_t = decay_t * h_{t-1} + inp_t from h_{-1} = 0 along dim 2.

    decay, inp: (B, D, T, N). Returns (prod, h): prod_t = decay_1 ... decay_t and the
    zero-start states, by log2(T) doubling steps (Hillis-Steele) of tensor ops.
    Products of decays stay bounded where cumulative sums of logs would overflow
    when subtracted.
    """
    T = decay.shape[2]
    step = 1
    while step < T:
        h_prev = F.pad(inp[:, :, :-step], (0, 0, step, 0))
        d_prev = F.pad(decay[:, :, :-step], (0, 0, step, 0), value=1.0)
        inp = inp + decay * h_prev
        decay = decay * d_prev
        step *= 2
    return decay, inp


def _reset_at_starts(decay, inp, local, initial_state):
    """Packed sequences (batch 1): at each local start position p of sequence i,
    h_p = decay_p * h0_i + inp_p instead of continuing the previous sequence."""
    pos = torch.tensor([p for _, p in local], device=decay.device)
    if initial_state is not None:
        idx = torch.tensor([i for i, _ in local], device=decay.device)
        carried = decay[:, :, pos] * rearrange(initial_state.float()[idx], "s d n -> 1 d s n")
        inp = inp.index_add(2, pos, carried)
    keep = torch.ones(decay.shape[2], device=decay.device, dtype=decay.dtype).index_fill(0, pos, 0.0)
    return decay * keep[:, None], inp


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None, cu_seqlens=None):
    """Torch reference of :func:`selective_scan_fn` (same arguments, fp32 math)."""
    num_seqs = _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    dtype_in = u.dtype
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u_f, delta_f = u.float(), delta.float()
    if delta_bias is not None:
        delta_f = delta_f + delta_bias.float()[:, None]
    if delta_softplus:
        delta_f = F.softplus(delta_f)
    B_f, C_f = _expand_bc(B, dim), _expand_bc(C, dim)

    # Packed sequences: a sequence start resets the state (decay 0) and injects
    # that sequence's initial state through its first step's input.
    starts: List[Tuple[int, int]] = []  # (sequence, first position)
    ends: List[Tuple[int, int]] = []  # (sequence, last position)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        for i in range(num_seqs):
            if bounds[i + 1] > bounds[i]:
                starts.append((i, bounds[i]))
                ends.append((i, bounds[i + 1] - 1))
    h = torch.zeros(batch, dim, dstate, device=u.device, dtype=torch.float32)
    if initial_state is not None and cu_seqlens is None:
        h = initial_state.float()
    A_f = A.float()
    last_states: list = [None] * num_seqs
    ys = []
    for c0 in range(0, seqlen, REF_CHUNK):
        c1 = min(c0 + REF_CHUNK, seqlen)
        dt = delta_f[:, :, c0:c1]  # (B, D, T)
        decay = torch.exp(dt.unsqueeze(-1) * A_f[:, None, :])  # (B, D, T, N)
        B_c = rearrange(B_f[..., c0:c1], "b d n t -> b d t n") if B_f.dim() == 4 else B_f[None, :, None]
        C_c = rearrange(C_f[..., c0:c1], "b d n t -> b d t n") if C_f.dim() == 4 else C_f[None, :, None]
        inp = (dt * u_f[:, :, c0:c1]).unsqueeze(-1) * B_c  # (B, D, T, N)
        local = [(i, s - c0) for i, s in starts if c0 <= s < c1]
        if local:
            decay, inp = _reset_at_starts(decay, inp, local, initial_state)
        prod, hs = _scan_chunk(decay, inp)
        hs = hs + prod * h.unsqueeze(2)  # (B, D, T, N)
        h = hs[:, :, -1]
        for i, e in ends:
            if c0 <= e < c1:
                last_states[i] = hs[0, :, e - c0]
        ys.append((hs * C_c).sum(-1))  # (B, D, T)
    y = torch.cat(ys, dim=2) if ys else u_f.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.float()[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    if not return_last_state:
        return out
    if cu_seqlens is None:
        last = h
    else:
        zero = torch.zeros(dim, dstate, device=u.device, dtype=torch.float32)
        last = torch.stack([
            s if s is not None else (initial_state[i].float() if initial_state is not None else zero)
            for i, s in enumerate(last_states)
        ])
    return out, last


# ---------------------------------------------------------------------------
# Triton kernels
#
# One program per (block of BLOCK_D channels, batch row). It walks L in tiles of
# BLOCK_L steps and carries the (BLOCK_D, N) state from tile to tile in registers.
# Inside a tile the decays and inputs form a 4-D block (N_IN, BLOCK_L, BLOCK_D,
# N_LANES), state index n = lane * N_IN + n_in. The axis order is chosen for
# Triton's default layout: threads fill the last axes first (N_LANES, then
# BLOCK_D) and the warps go along BLOCK_D, so BLOCK_L and N_IN stay inside a
# thread, and sums over N are mostly in-thread. This needs
# BLOCK_D * N_LANES >= 32 * num_warps (the launcher picks it so).
#
# The scan along L is written out step by step (_scan_tile): the tile is split
# into its BLOCK_L steps (tl.split, free in registers because L is in-thread), the
# recurrence runs one fused multiply-add per state and step, and the steps are
# joined back. Compared with tl.associative_scan this carries the state in and
# out of a tile directly, and the backward reads decay_{t+1} from the step after
# instead of recomputing it from a shifted copy of delta (one exp per element
# less).
#
# Packed sequences: position l belongs to sequence seq_idx[l]; at a sequence
# start the decay is zeroed and the sequence's initial state enters through that
# step's input, and at a sequence end the state is stored as its last state.
# ---------------------------------------------------------------------------


@triton.jit
def _halves(x, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, LEN: tl.constexpr):
    """(S0, S1, S2, LEN) -> steps [0, LEN/2) and [LEN/2, LEN), each (S0, S1, S2, LEN/2)."""
    return tl.split(tl.permute(tl.reshape(x, (S0, S1, S2, 2, LEN // 2)), (0, 1, 2, 4, 3)))


@triton.jit
def _unhalve(lo, hi, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, LEN: tl.constexpr):
    """Inverse of _halves."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 2, 4, 3)), (S0, S1, S2, LEN))


@triton.jit
def _scan4(decay, x, carry, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, REVERSE: tl.constexpr):
    """Four steps, (S0, S1, S2, 4) blocks, of h_t = d_t * h_{t-1} + x_t from
    h_{-1} = carry; returns the h_t and h_3. REVERSE: g_t = x_t + d_{t+1} * g_{t+1},
    the last step adding carry (the next block's d_0 * g_0); returns the g_t and
    d_0 * g_0."""
    d_even, d_odd = tl.split(tl.reshape(decay, (S0, S1, S2, 2, 2)))
    x_even, x_odd = tl.split(tl.reshape(x, (S0, S1, S2, 2, 2)))
    d0, d2 = tl.split(d_even)
    d1, d3 = tl.split(d_odd)
    x0, x2 = tl.split(x_even)
    x1, x3 = tl.split(x_odd)
    if REVERSE:
        h3 = x3 + carry
        h2 = x2 + d3 * h3
        h1 = x1 + d2 * h2
        h0 = x0 + d1 * h1
        carry = d0 * h0
    else:
        h0 = d0 * carry + x0
        h1 = d1 * h0 + x1
        h2 = d2 * h1 + x2
        h3 = d3 * h2 + x3
        carry = h3
    return tl.reshape(tl.join(tl.join(h0, h2), tl.join(h1, h3)), (S0, S1, S2, 4)), carry


@triton.jit
def _scan_steps(decay, x, carry, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, LEN: tl.constexpr,
                REVERSE: tl.constexpr):
    """_scan4 over (S0, S1, S2, LEN) blocks, LEN in {4, 8, 16}: longer blocks as one half
    after the other (the first half first; the second first when REVERSE)."""
    if LEN == 4:
        h, carry = _scan4(decay, x, carry, S0, S1, S2, REVERSE)
    else:
        tl.static_assert((LEN == 8) or (LEN == 16), "BLOCK_L must be 4, 8 or 16")
        d_lo, d_hi = _halves(decay, S0, S1, S2, LEN)
        x_lo, x_hi = _halves(x, S0, S1, S2, LEN)
        if REVERSE:
            h_hi, carry = _scan_steps(d_hi, x_hi, carry, S0, S1, S2, LEN // 2, REVERSE)
            h_lo, carry = _scan_steps(d_lo, x_lo, carry, S0, S1, S2, LEN // 2, REVERSE)
        else:
            h_lo, carry = _scan_steps(d_lo, x_lo, carry, S0, S1, S2, LEN // 2, REVERSE)
            h_hi, carry = _scan_steps(d_hi, x_hi, carry, S0, S1, S2, LEN // 2, REVERSE)
        h = _unhalve(h_lo, h_hi, S0, S1, S2, LEN)
    return h, carry


@triton.jit
def _scan_tile(decay, x, carry, N_IN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
               N_LANES: tl.constexpr, REVERSE: tl.constexpr):
    """Scan (N_IN, BLOCK_L, BLOCK_D, N_LANES) blocks along L from the carried
    (N_IN, BLOCK_D, N_LANES) state.

    Forward: h_t = decay_t * h_{t-1} + x_t, h_{-1} = carry; returns all h_t and h_last.
    Reverse: g_t = x_t + decay_{t+1} * g_{t+1}, the last step adding carry (the
    next tile's decay_0 * g_0); returns all g_t and decay_0 * g_0.
    """
    decay = tl.permute(decay, (0, 2, 3, 1))  # (N_IN, BLOCK_D, N_LANES, BLOCK_L)
    x = tl.permute(x, (0, 2, 3, 1))
    h, carry = _scan_steps(decay, x, carry, N_IN, BLOCK_D, N_LANES, BLOCK_L, REVERSE)
    return tl.permute(h, (0, 3, 1, 2)), carry


@triton.jit
def _softplus(x, FAST_MATH: tl.constexpr):
    """log(1 + exp(x)), through base-2 instructions."""
    e = ptx_exp2(tl.minimum(x, 20.0) * 1.4426950408889634, FAST_MATH)
    return tl.where(x > 20.0, x, ptx_log2(1.0 + e, FAST_MATH) * 0.6931471805599453)


@triton.jit
def _anchor(x, AXIS: tl.constexpr, ONE_WARP: tl.constexpr):
    """x unchanged (AXIS: its number of dimensions). ONE_WARP: as the max over the pair (x, x), a
    reduction, which Triton's layout pass does not recompute in the consumers' layout (and which
    LLVM folds away: no instruction, where a sum over (x, 0) left an add per value): Triton 3.6
    otherwise moves the layout change up to the loads and redoes the per-(l, d) work (softplus,
    bf16 unpacking) on the copies that the scan layout replicates over the N_LANES lanes. Not
    with several warps (there it made the N = 64 backward spill more)."""
    if ONE_WARP:
        x = tl.max(tl.join(x, x), axis=AXIS)
    return x


@triton.jit
def _bc_f32(x, N_IN: tl.constexpr, BLOCK_L: tl.constexpr, N_LANES: tl.constexpr, ONE_WARP: tl.constexpr,
            WORDS: tl.constexpr):
    """A loaded B or C tile (N_IN, BLOCK_L, N_LANES) in fp32, as (N_IN, BLOCK_L, 1, N_LANES),
    converted in the load layout (_anchor) up to 64 values per thread; larger tiles keep the
    bf16 pairs until the scan layout (fp32 there spills registers: N = 64). WORDS: x is the tile
    as (N_IN, BLOCK_L / 2, N_LANES) 32-bit words of two bf16 steps (_load_bc_tile), moved to the
    scan layout as words and unpacked there by one shift or mask per value."""
    if WORDS:
        w = x[:, :, None, :]
        lo = (w << 16).to(tl.float32, bitcast=True)  # the earlier step: the word's low half
        hi = (w & -65536).to(tl.float32, bitcast=True)
        b = tl.permute(tl.join(lo, hi), (0, 1, 4, 2, 3))  # (N_IN, BLOCK_L / 2, 2, 1, N_LANES)
        b = tl.reshape(b, (N_IN, BLOCK_L, 1, N_LANES))
    else:
        b = _anchor(x.to(tl.float32), 3, ONE_WARP and N_IN * BLOCK_L <= 64)[:, :, None, :]
    return b


@triton.jit
def _sum_last(t, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, K: tl.constexpr):
    """(S0, S1, S2, K) -> (S0, S1, S2), the sum over the last axis (K a power of two) as a tree of
    tl.split halves. A split needs its pair inside a thread, so where the summed axis lies across
    lanes Triton first moves the values once into a layout that has it in registers (through
    shared memory), and the sums are then plain adds in that layout, which is also the one of
    what consumes them (the (l, d) work and the stores, or the dB / dC stores)."""
    if K > 1:
        a, b = tl.split(tl.permute(tl.reshape(t, (S0, S1, S2, 2, K // 2)), (0, 1, 2, 4, 3)))
        t = _sum_last(a + b, S0, S1, S2, K // 2)
    else:
        t = tl.reshape(t, (S0, S1, S2))
    return t


@triton.jit
def _sum_n(x, N_IN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, N_LANES: tl.constexpr,
           SPLIT: tl.constexpr):
    """(N_IN, BLOCK_L, BLOCK_D, N_LANES) -> (BLOCK_L, BLOCK_D); the in-thread axis first. Then
    across the N_LANES lanes: SPLIT, by _sum_last (one layout change of 1 / N_IN of the values
    through shared memory instead of a butterfly of shuffles that leaves every lane with every
    sum, and which the (l, d) work would then convert anyway; offline SASS, Triton 3.6, N = 16:
    per tile forward 666 -> 614 instructions, backward 1220 -> 1037), else tl.sum. Only with four
    lanes of up to 8 states each: with two lanes (N <= 8) the forward took 16 more instructions,
    with 16 states a lane (N = 64) it spilled 16 bytes more."""
    t = tl.sum(x, axis=0)  # (BLOCK_L, BLOCK_D, N_LANES)
    if SPLIT and N_LANES == 4 and N_IN <= 8:
        t = _sum_last(t[None, :, :, :], 1, BLOCK_L, BLOCK_D, N_LANES)
        return tl.reshape(t, (BLOCK_L, BLOCK_D))
    else:
        return tl.sum(t, axis=2)


@triton.jit
def _sum_d_halving(t, R: tl.constexpr, Q: tl.constexpr, NL: tl.constexpr, M: tl.constexpr):
    """Reduce-scatter of a sum over lanes. t (R, Q, NL, M): R channels still to add up, on lanes
    (lowest bit first), Q lanes already paired up, M values in a thread. Each level pairs the lanes
    of the channels' lowest bit: a lane keeps one half of its M values (by the lowest bit of m),
    sends the other half (a gather along the lane axis: one shuffle per value) and adds what it
    receives. Returns (1, Q * R, NL, M / R): the sums, the R new lane positions holding the low
    bits of m."""
    if R > 1:
        x0, x1 = tl.split(tl.reshape(t, (R // 2, 2, Q, NL, M // 2, 2)))  # (R / 2, 2, Q, NL, M / 2)
        o_bit = tl.arange(0, 2)[None, :, None, None, None]
        m_hi = o_bit == 1
        b_recv = tl.gather(tl.where(m_hi, x0, x1), tl.broadcast_to(1 - o_bit, x0.shape), axis=1)
        t = tl.reshape(tl.where(m_hi, x1, x0) + b_recv, (R // 2, 2 * Q, NL, M // 2))
        t = _sum_d_halving(t, R // 2, 2 * Q, NL, M // 2)
    return t


@triton.jit
def _sum_d(x, N_IN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, N_LANES: tl.constexpr,
           ONE_WARP: tl.constexpr, SPLIT: tl.constexpr):
    """(N_IN, BLOCK_L, BLOCK_D, N_LANES) -> sum over the channels, (N_IN, BLOCK_L, N_LANES).
    SPLIT: by _sum_last, one layout change through shared memory and adds (offline SASS, Triton
    3.6, N = 16: backward 1037 -> 849 instructions per tile; N = 4 1023 -> 803). Else, in one-warp
    programs (channels on lanes) by halving (_sum_d_halving): (BLOCK_D - 1) / BLOCK_D
    shuffles per value instead of tl.sum's log2(BLOCK_D), e.g. 28 instead of 96 for 32 values
    and 8 channels (and 2 selects each), through tl.gather, so that Triton places the lanes
    (lane-level inline PTX would depend on its layouts: wrong results with Triton 3.6). Only with
    four lanes per channel (N = 9..16): for N = 8 Triton 3.6 gives the gathers layouts that need
    conversions (SASS: more shuffles than tl.sum, and a spill); N = 4 gained 2%."""
    if SPLIT:
        return _sum_last(tl.permute(x, (0, 1, 3, 2)), N_IN, BLOCK_L, N_LANES, BLOCK_D)
    elif ONE_WARP and N_LANES == 4 and N_IN * BLOCK_L >= BLOCK_D:
        x = _anchor(x, 4, True)
        t = tl.reshape(tl.permute(x, (2, 3, 0, 1)), (BLOCK_D, 1, N_LANES, N_IN * BLOCK_L))
        t = _sum_d_halving(t, BLOCK_D, 1, N_LANES, N_IN * BLOCK_L)  # (1, BLOCK_D, N_LANES, M / BLOCK_D)
        t = tl.permute(tl.reshape(t, (BLOCK_D, N_LANES, N_IN * BLOCK_L // BLOCK_D)), (2, 0, 1))
        return tl.reshape(t, (N_IN, BLOCK_L, N_LANES))
    else:
        return tl.sum(x, axis=2)


@triton.jit
def _load_ld(ptr, o_row, o_l, m_d, seqlen, EVEN: tl.constexpr):
    """A (BLOCK_L, BLOCK_D) tile of a (B, D, L) tensor, in its own dtype; zero past L.
    EVEN: the tile is known to be in bounds (no mask)."""
    m_ld = (((o_l >= 0) & (o_l < seqlen)) | EVEN)[:, None] & m_d[None, :]
    return tl.load(ptr + o_row[None, :] + o_l[:, None], mask=m_ld, other=0.0)


@triton.jit
def _load_bc_tile(ptr, o_bc_row, o_n3, l_start, o_t, m_n3, seqlen, EVEN: tl.constexpr, WORDS: tl.constexpr):
    """An input-dependent B or C tile of steps l_start + o_t (BLOCK_L,) as (N_IN, BLOCK_L, N_LANES),
    in its own dtype. Loaded 3-D and expanded by the caller: a 4-D load would impose its
    memory-coalesced layout (threads along L) on the whole scan. WORDS (bf16, full tiles, 4-byte
    aligned rows): as (N_IN, BLOCK_L / 2, N_LANES) int32 words of two steps each (see _bc_f32)."""
    if WORDS:
        p = (ptr + o_bc_row + o_n3.to(tl.int64) * seqlen).to(tl.pointer_type(tl.int32))
        b = tl.load(p + (l_start // 2 + tl.arange(0, o_t.shape[0] // 2))[None, :, None])
    else:
        o_l = l_start + o_t
        m_l = ((o_l >= 0) & (o_l < seqlen)) | EVEN
        p = ptr + o_bc_row + o_n3.to(tl.int64) * seqlen + o_l[None, :, None]
        b = tl.load(p, mask=m_n3 & m_l[None, :, None], other=0.0)
    return b


@triton.jit
def _prefetch(p, mask):
    """Ask for the lines at the addresses p (any shape) where mask holds to be brought into L1 (PTX;
    no register result, so no scoreboard)."""
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\t@p prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;\n\t}",
        "=r,l,r", [p, tl.broadcast_to(mask, p.shape).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, o_row_u, o_row_delta, o_row_z, o_b_row, o_c_row, m_d,
                   l_pf, seqlen, dstate, HAS_Z: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """L1 prefetch of the lines holding step l_pf of this program's rows of u, delta, z and of the
    input-dependent B, C: one instruction per tensor and thread. Why: ptxas (Triton 3.6) gives the
    loads of the next tile (the register prefetches) scoreboards that it also waits on for
    shared-memory or MUFU results in the same iteration; such a wait then lasts until the load
    is back, a global load's latency unless the line is already in L1 (ncu, B=4 D=2048 L=2048: 9% of
    the forward's and 14% of the checkpointing forward's stall samples at one such instruction)."""
    _prefetch(u_ptr + o_row_u + l_pf, m_d)
    _prefetch(delta_ptr + o_row_delta + l_pf, m_d)
    if HAS_Z:
        _prefetch(z_ptr + o_row_z + l_pf, m_d)
    # B and C: a 1-D block of rows (few per thread), not the replicated state layout of the loads.
    o_n = tl.arange(0, BLOCK_N)
    if B_VAR:
        _prefetch(B_ptr + o_b_row + o_n.to(tl.int64) * seqlen + l_pf, o_n < dstate)
    if C_VAR:
        _prefetch(C_ptr + o_c_row + o_n.to(tl.int64) * seqlen + l_pf, o_n < dstate)


@triton.jit
def _row_start(i_b, o_d, stride_batch, stride_dim):
    """(BLOCK_D,) int64 offset of each (b, d) row of a (B, D, L) tensor whose L is contiguous."""
    return i_b.to(tl.int64) * stride_batch + o_d.to(tl.int64) * stride_dim


@triton.jit
def _group_row_start(i_b, i_d, BLOCK_D: tl.constexpr, group_size, stride_batch, stride_group):
    """Offset of the (N, L) slab of an input-dependent (B, G, N, L) B or C that this program's
    channels read (the launcher keeps a block of channels inside one group)."""
    return i_b.to(tl.int64) * stride_batch + ((i_d * BLOCK_D) // group_size).to(tl.int64) * stride_group


@triton.jit
def _delta_tile(b_delta, b_delta_bias, m_ld, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
                FAST_MATH: tl.constexpr):
    """dt = softplus(delta + delta_bias), fp32, zero outside m_ld (decay 1, input 0
    there, so padding steps leave the state unchanged). Also returns the softplus
    input for the backward."""
    b_raw = b_delta.to(tl.float32)
    if HAS_DELTA_BIAS:
        b_raw += b_delta_bias[None, :]
    b_dt = b_raw
    if DELTA_SOFTPLUS:
        b_dt = _softplus(b_raw, FAST_MATH)
    return tl.where(m_ld, b_dt, 0.0), b_raw


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr, seq_idx_ptr,
    out_ptr, last_ptr, ckpt_ptr, sync_ptr,
    seqlen, dim, dstate, b_group_size, c_group_size, stride_b_batch, stride_b_group, stride_c_batch,
    stride_c_group, stride_u_batch, stride_u_dim, stride_delta_batch, stride_delta_dim, stride_z_batch, stride_z_dim,
    n_full, n_split,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_CKPT: tl.constexpr, EVEN: tl.constexpr, FAST_MATH: tl.constexpr,
    BLOCK_D: tl.constexpr, N_IN: tl.constexpr, N_LANES: tl.constexpr, BLOCK_L: tl.constexpr,
    CKPT_L: tl.constexpr, L1_PREFETCH: tl.constexpr, ONE_WARP: tl.constexpr, SPLIT_SUMS: tl.constexpr,
    SPLIT_TAIL: tl.constexpr, BC_WORDS: tl.constexpr,
):
    """STORE_CKPT: also store the state before every CKPT_L steps (the backward's tiles; CKPT_L
    divides BLOCK_L), (B, L / CKPT_L, D, N), for the backward. L1_PREFETCH: see _prefetch_tile.
    SPLIT_TAIL: a 1-D grid of n_full + 2 * n_split programs taken in the order of a ticket
    (sync_ptr[0], zeroed): the first halves (along L) of the last n_split blocks of channels, the
    n_full first blocks whole, then the second halves, each waiting for its first half's flag
    (sync_ptr[1 + block], set after it stored its state as the last state); see _tail_split."""
    t_begin = 0
    n_tiles = tl.cdiv(seqlen, BLOCK_L)
    t_end = n_tiles
    if SPLIT_TAIL:
        # Tickets, not program ids: a program only waits for a lower ticket, which has started.
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        n_dblocks = tl.cdiv(dim, BLOCK_D)
        part = (ticket >= n_split).to(tl.int32) + (ticket >= n_split + n_full).to(tl.int32)  # 0 first half, 1 whole, 2 second half
        block = tl.where(part == 0, n_full + ticket, ticket - n_split)
        i_d, i_b = block % n_dblocks, block // n_dblocks
        t_mid = n_tiles // 2
        t_begin = tl.where(part == 2, t_mid, 0)
        t_end = tl.where(part == 0, t_mid, n_tiles)
    else:
        part = 1
        i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_t = tl.arange(0, BLOCK_L)
    m_d = (o_d < dim) | EVEN
    # State index n = lane * N_IN + n_in: (N_IN, 1, N_LANES) for (N_IN, BLOCK_D,
    # N_LANES) states, and with a BLOCK_L axis inserted for 4-D blocks. A thread's
    # N_IN states are contiguous in (D, N) tensors, so that their vectorised loads
    # keep N_IN inside a thread (Triton takes the compute layout from the loads).
    o_n3 = tl.arange(0, N_IN)[:, None, None] + tl.arange(0, N_LANES)[None, None, :] * N_IN
    o_dn3 = o_d[None, :, None] * dstate + o_n3  # into (D, N)
    o_dn4 = o_dn3[:, None, :, :]
    m_n3 = (o_n3 < dstate) | EVEN
    m_dn3 = m_d[None, :, None] & m_n3
    m_dn4 = m_dn3[:, None, :, :]
    # (BLOCK_D,) start of each (b, d) row: outputs are contiguous, inputs only along L.
    o_row = i_b.to(tl.int64) * dim * seqlen + o_d.to(tl.int64) * seqlen
    o_row_u = _row_start(i_b, o_d, stride_u_batch, stride_u_dim)
    o_row_delta = _row_start(i_b, o_d, stride_delta_batch, stride_delta_dim)
    o_row_z = _row_start(i_b, o_d, stride_z_batch, stride_z_dim)
    o_b_row = _group_row_start(i_b, i_d, BLOCK_D, b_group_size, stride_b_batch, stride_b_group)
    o_c_row = _group_row_start(i_b, i_d, BLOCK_D, c_group_size, stride_c_batch, stride_c_group)
    o_state = i_b.to(tl.int64) * dim * dstate + o_dn3
    # exp(dt * A) = exp2(dt * A * log2(e)): exp2 is the native instruction.
    b_A2 = tl.load(A_ptr + o_dn4, mask=m_dn4, other=0.0) * 1.4426950408889634
    b_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0) if HAS_D else None
    b_delta_bias = tl.load(delta_bias_ptr + o_d, mask=m_d, other=0.0) if HAS_DELTA_BIAS else None
    if not B_VAR:
        b_B = tl.load(B_ptr + o_dn4, mask=m_dn4, other=0.0).to(tl.float32)  # (N_IN, 1, BLOCK_D, N_LANES)
    if not C_VAR:
        b_C = tl.load(C_ptr + o_dn4, mask=m_dn4, other=0.0).to(tl.float32)
    b_h = tl.zeros([N_IN, BLOCK_D, N_LANES], dtype=tl.float32)
    if HAS_H0 and not IS_VARLEN:
        b_h = tl.load(h0_ptr + o_state, mask=m_dn3, other=0.0)
    if SPLIT_TAIL:
        if part == 2:
            # The first half's state, stored as the last state once its flag is set.
            p_flag = sync_ptr + 1 + i_b * tl.cdiv(dim, BLOCK_D) + i_d
            while tl.atomic_add(p_flag, 0, sem="acquire") == 0:
                pass
            tl.debug_barrier()
            b_h = tl.load(last_ptr + o_state, mask=m_dn3, other=0.0, cache_modifier=".cg")
    # Tiles are loaded one iteration ahead so that their memory latency overlaps
    # the current tile's arithmetic (each program walks L serially).
    l_first = t_begin * BLOCK_L
    o_first = l_first + o_t
    b_u_next = _load_ld(u_ptr, o_row_u, o_first, m_d, seqlen, EVEN)
    b_delta_next = _load_ld(delta_ptr, o_row_delta, o_first, m_d, seqlen, EVEN)
    if HAS_Z:
        b_z_next = _load_ld(z_ptr, o_row_z, o_first, m_d, seqlen, EVEN)
    if B_VAR:
        b_B_next = _load_bc_tile(B_ptr, o_b_row, o_n3, l_first, o_t, m_n3, seqlen, EVEN, BC_WORDS)
    if C_VAR:
        b_C_next = _load_bc_tile(C_ptr, o_c_row, o_n3, l_first, o_t, m_n3, seqlen, EVEN, BC_WORDS)
    n_ckpt = tl.cdiv(seqlen, CKPT_L)
    if STORE_CKPT and part != 2:
        tl.store(ckpt_ptr + i_b.to(tl.int64) * n_ckpt * dim * dstate + o_dn3, b_h, mask=m_dn3)
    for i_t in range(t_begin, t_end):
        o_l = i_t * BLOCK_L + o_t
        m_l = (o_l < seqlen) | EVEN
        m_ld = m_l[:, None] & m_d[None, :]
        o_ld = o_row[None, :] + o_l[:, None]  # (BLOCK_L, BLOCK_D)
        # The last iteration reloads its own tile (unused) instead of reading past L.
        l_next = tl.minimum(i_t + 1, n_tiles - 1) * BLOCK_L
        o_next = l_next + o_t
        b_u = b_u_next.to(tl.float32)
        b_delta = b_delta_next
        b_u_next = _load_ld(u_ptr, o_row_u, o_next, m_d, seqlen, EVEN)
        b_delta_next = _load_ld(delta_ptr, o_row_delta, o_next, m_d, seqlen, EVEN)
        if HAS_Z:
            b_z = b_z_next.to(tl.float32)
            b_z_next = _load_ld(z_ptr, o_row_z, o_next, m_d, seqlen, EVEN)
        if B_VAR:
            b_B = _bc_f32(b_B_next, N_IN, BLOCK_L, N_LANES, ONE_WARP, BC_WORDS)  # (N_IN, BLOCK_L, 1, N_LANES)
            b_B_next = _load_bc_tile(B_ptr, o_b_row, o_n3, l_next, o_t, m_n3, seqlen, EVEN, BC_WORDS)
        if C_VAR:
            b_C = _bc_f32(b_C_next, N_IN, BLOCK_L, N_LANES, ONE_WARP, BC_WORDS)
            b_C_next = _load_bc_tile(C_ptr, o_c_row, o_n3, l_next, o_t, m_n3, seqlen, EVEN, BC_WORDS)
        # Two tiles ahead of the register prefetch (clamped to the last step: in bounds).
        l_pf = tl.minimum(i_t * BLOCK_L + 3 * BLOCK_L, seqlen - 1)
        if L1_PREFETCH:
            _prefetch_tile(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, o_row_u, o_row_delta, o_row_z, o_b_row, o_c_row, m_d,
                           l_pf, seqlen, dstate, HAS_Z, B_VAR, C_VAR, N_IN * N_LANES)
        b_dt, _ = _delta_tile(b_delta, b_delta_bias, m_ld, HAS_DELTA_BIAS, DELTA_SOFTPLUS, FAST_MATH)
        b_dt = _anchor(b_dt, 2, ONE_WARP)
        b_decay = tl.exp2(b_dt[None, :, :, None] * b_A2)  # (N_IN, BLOCK_L, BLOCK_D, N_LANES)
        b_inp = (b_dt * b_u)[None, :, :, None] * b_B
        if IS_VARLEN:
            b_seq = tl.load(seq_idx_ptr + o_l, mask=m_l, other=0)
            b_seq_prev = tl.load(seq_idx_ptr + o_l - 1, mask=m_l & (o_l > 0), other=-1)
            b_seq_next = tl.load(seq_idx_ptr + o_l + 1, mask=o_l + 1 < seqlen, other=-1)
            m_start4 = ((b_seq != b_seq_prev) & m_l)[None, :, None, None]
            m_end4 = ((b_seq != b_seq_next) & m_l)[None, :, None, None]
            o_seq4 = (b_seq.to(tl.int64) * dim * dstate)[None, :, None, None]
            if HAS_H0:
                b_h0 = tl.load(h0_ptr + o_seq4 + o_dn4, mask=m_dn4 & m_start4, other=0.0)
                b_inp += b_decay * b_h0
            b_decay = tl.where(m_start4, 0.0, b_decay)
        b_hs, b_h_last = _scan_tile(b_decay, b_inp, b_h, N_IN, BLOCK_L, BLOCK_D, N_LANES, False)
        b_y = _sum_n(b_hs * b_C, N_IN, BLOCK_L, BLOCK_D, N_LANES, SPLIT_SUMS)  # (BLOCK_L, BLOCK_D)
        if HAS_D:
            b_y += b_D[None, :] * b_u
        if HAS_Z:
            b_y *= b_z * ptx_sigmoid(b_z, FAST_MATH)
        tl.store(out_ptr + o_ld, b_y.to(out_ptr.dtype.element_ty), mask=m_ld)
        if IS_VARLEN:
            tl.store(last_ptr + o_seq4 + o_dn4, b_hs, mask=m_dn4 & m_end4)
        if STORE_CKPT:
            # The start states of the backward's next tiles, taken from the last steps of the
            # backward's tiles in the 4-D states (an in-thread pick: L is inside a thread) rather
            # than from the carried (N_IN, BLOCK_D, N_LANES) state: for that store Triton 3.6
            # carries a second copy of the state and computes the whole tile twice (SASS).
            for j in tl.static_range(BLOCK_L // CKPT_L):
                m_step4 = (o_t == j * CKPT_L + CKPT_L - 1)[None, :, None, None]
                b_ckpt = tl.sum(tl.where(m_step4, b_hs, 0.0), axis=1)  # (N_IN, BLOCK_D, N_LANES)
                i_slot = i_t * (BLOCK_L // CKPT_L) + j + 1
                # (The slot test as a tensor: the Triton 3.9 interpreter rejects a mask made of a
                # tensor & a scalar comparison.)
                m_slot = (o_n3 * 0 + i_slot) < n_ckpt
                tl.store(ckpt_ptr + (i_b.to(tl.int64) * n_ckpt + i_slot) * dim * dstate + o_dn3, b_ckpt,
                         mask=m_dn3 & m_slot)
        b_h = b_h_last
    if not IS_VARLEN:
        tl.store(last_ptr + o_state, b_h, mask=m_dn3)
    if SPLIT_TAIL:
        if part == 0:
            tl.debug_barrier()
            tl.atomic_xchg(sync_ptr + 1 + i_b * tl.cdiv(dim, BLOCK_D) + i_d, 1, sem="release")


@triton.jit
def _store_bc_grad(ptr, b_grad, o_part, o_bc_row, o_n3, o_l, mask, seqlen, ATOMIC: tl.constexpr):
    """A tile (N_IN, BLOCK_L, N_LANES) of this program's input-dependent dB or dC: into its
    partial slab (row o_part of a (B, D / BLOCK_D, N, L) tensor), or ATOMIC: added into the
    (B, G, N, L) result at the group's row o_bc_row."""
    if ATOMIC:
        p = ptr + o_bc_row + o_n3.to(tl.int64) * seqlen + o_l[None, :, None]
        tl.atomic_add(p, b_grad, mask=mask, sem="relaxed")
    else:
        tl.store(ptr + (o_part + o_n3) * seqlen + o_l[None, :, None], b_grad, mask=mask)


@triton.jit
def _store_param_grad(p, b_grad, mask, ATOMIC: tl.constexpr):
    """A program's sum over L of a parameter gradient: stored, or ATOMIC: added."""
    if ATOMIC:
        tl.atomic_add(p, b_grad, mask=mask, sem="relaxed")
    else:
        tl.store(p, b_grad, mask=mask)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr, seq_idx_ptr, ckpt_ptr,
    dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dparam_ptr, dbc_ptr, dh0_ptr,
    seqlen, dim, dstate, b_group_size, c_group_size, stride_b_batch, stride_b_group, stride_c_batch,
    stride_c_group, stride_u_batch, stride_u_dim, stride_delta_batch, stride_delta_dim, stride_z_batch, stride_z_dim,
    stride_dout_batch, stride_dout_dim, stride_part_batch, o_dB, o_dC, o_dD, o_ddb, o_dB_var, o_dC_var,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DLAST: tl.constexpr, EVEN: tl.constexpr, FAST_MATH: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_D: tl.constexpr, N_IN: tl.constexpr, N_LANES: tl.constexpr, BLOCK_L: tl.constexpr,
    ONE_WARP: tl.constexpr, SPLIT_SUMS: tl.constexpr, BC_WORDS: tl.constexpr, DZ_LIKE_Z: tl.constexpr = False,
):
    """Walks the tiles last to first. Per tile: recompute the forward scan from the
    checkpointed state, then scan the state gradient backwards,
        dh_t = C_t dy_t + exp(dt_{t+1} A) dh_{t+1},
    carrying g = d loss / d(state before the tile) to the previous tile.
    Sums over L (dA, dD, d delta_bias, fixed dB / dC: at o_dB, o_dC, o_dD, o_ddb of
    dparam_ptr's rows, see _param_grad_layout) go to one row per batch row (stride_part_batch
    apart), sums over the channels of a block (input-dependent dB / dC, at o_dB_var and
    o_dC_var of dbc_ptr) to one slab per program; the launcher adds them up in torch:
    deterministic, no atomics. ATOMIC: all of them are instead added atomically into their
    zeroed fp32 results (order-dependent rounding; stride_part_batch 0)."""
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    n_dblocks = tl.num_programs(0)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_t = tl.arange(0, BLOCK_L)
    m_d = (o_d < dim) | EVEN
    o_n3 = tl.arange(0, N_IN)[:, None, None] + tl.arange(0, N_LANES)[None, None, :] * N_IN  # see the forward
    o_dn3 = o_d[None, :, None] * dstate + o_n3
    o_dn4 = o_dn3[:, None, :, :]
    m_n3 = (o_n3 < dstate) | EVEN
    m_dn3 = m_d[None, :, None] & m_n3
    m_dn4 = m_dn3[:, None, :, :]
    o_row = i_b.to(tl.int64) * dim * seqlen + o_d.to(tl.int64) * seqlen  # see the forward
    o_row_u = _row_start(i_b, o_d, stride_u_batch, stride_u_dim)
    o_row_delta = _row_start(i_b, o_d, stride_delta_batch, stride_delta_dim)
    o_row_z = _row_start(i_b, o_d, stride_z_batch, stride_z_dim)
    o_row_dout = _row_start(i_b, o_d, stride_dout_batch, stride_dout_dim)
    o_b_row = _group_row_start(i_b, i_d, BLOCK_D, b_group_size, stride_b_batch, stride_b_group)
    o_c_row = _group_row_start(i_b, i_d, BLOCK_D, c_group_size, stride_c_batch, stride_c_group)
    o_state = i_b.to(tl.int64) * dim * dstate + o_dn3  # this program's block of a (B, D, N) tensor
    b_A = tl.load(A_ptr + o_dn4, mask=m_dn4, other=0.0)
    b_A2 = b_A * 1.4426950408889634
    b_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0) if HAS_D else None
    b_delta_bias = tl.load(delta_bias_ptr + o_d, mask=m_d, other=0.0) if HAS_DELTA_BIAS else None
    if not B_VAR:
        b_B = tl.load(B_ptr + o_dn4, mask=m_dn4, other=0.0).to(tl.float32)
    if not C_VAR:
        b_C = tl.load(C_ptr + o_dn4, mask=m_dn4, other=0.0).to(tl.float32)
    b_g = tl.zeros([N_IN, BLOCK_D, N_LANES], dtype=tl.float32)
    if HAS_DLAST and not IS_VARLEN:
        b_g = tl.load(dlast_ptr + o_state, mask=m_dn3, other=0.0)
    b_dA_acc = tl.zeros([N_IN, BLOCK_D, N_LANES], dtype=tl.float32)
    b_dB_acc = tl.zeros([N_IN, BLOCK_D, N_LANES], dtype=tl.float32)
    b_dC_acc = tl.zeros([N_IN, BLOCK_D, N_LANES], dtype=tl.float32)
    b_dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_ddb_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    o_part = (i_b.to(tl.int64) * n_dblocks + i_d) * dstate  # row of this program's dB / dC partials
    n_tiles = tl.cdiv(seqlen, BLOCK_L)
    # Tiles are loaded one iteration ahead (see the forward kernel).
    l_last = (n_tiles - 1) * BLOCK_L
    o_l = l_last + o_t
    b_u_next = _load_ld(u_ptr, o_row_u, o_l, m_d, seqlen, EVEN)
    b_delta_next = _load_ld(delta_ptr, o_row_delta, o_l, m_d, seqlen, EVEN)
    b_dout_next = _load_ld(dout_ptr, o_row_dout, o_l, m_d, seqlen, EVEN)
    if HAS_Z:
        b_z_next = _load_ld(z_ptr, o_row_z, o_l, m_d, seqlen, EVEN)
    if B_VAR:
        b_B_next = _load_bc_tile(B_ptr, o_b_row, o_n3, l_last, o_t, m_n3, seqlen, EVEN, BC_WORDS)
    if C_VAR:
        b_C_next = _load_bc_tile(C_ptr, o_c_row, o_n3, l_last, o_t, m_n3, seqlen, EVEN, BC_WORDS)
    b_h_next = tl.load(ckpt_ptr + (i_b.to(tl.int64) * n_tiles + n_tiles - 1) * dim * dstate + o_dn3,
                       mask=m_dn3, other=0.0)
    for i_rev in range(0, n_tiles):
        i_t = n_tiles - 1 - i_rev
        o_l = i_t * BLOCK_L + o_t
        m_l = (o_l < seqlen) | EVEN
        m_ld = m_l[:, None] & m_d[None, :]
        o_ld = o_row[None, :] + o_l[:, None]
        # The first tile reloads itself (unused) instead of reading before 0.
        l_prev = tl.maximum(i_t - 1, 0) * BLOCK_L
        o_prev = l_prev + o_t
        b_u = b_u_next.to(tl.float32)
        b_delta = b_delta_next
        b_dout = b_dout_next.to(tl.float32)
        b_h = b_h_next  # state before this tile
        b_u_next = _load_ld(u_ptr, o_row_u, o_prev, m_d, seqlen, EVEN)
        b_delta_next = _load_ld(delta_ptr, o_row_delta, o_prev, m_d, seqlen, EVEN)
        b_dout_next = _load_ld(dout_ptr, o_row_dout, o_prev, m_d, seqlen, EVEN)
        i_prev = tl.maximum(i_t - 1, 0)  # at the first tile this reloads it, unused
        b_h_next = tl.load(ckpt_ptr + (i_b.to(tl.int64) * n_tiles + i_prev) * dim * dstate + o_dn3,
                           mask=m_dn3, other=0.0)
        if HAS_Z:
            b_z = b_z_next.to(tl.float32)
            b_z_next = _load_ld(z_ptr, o_row_z, o_prev, m_d, seqlen, EVEN)
        if B_VAR:
            b_B = _bc_f32(b_B_next, N_IN, BLOCK_L, N_LANES, ONE_WARP, BC_WORDS)
            b_B_next = _load_bc_tile(B_ptr, o_b_row, o_n3, l_prev, o_t, m_n3, seqlen, EVEN, BC_WORDS)
        if C_VAR:
            b_C = _bc_f32(b_C_next, N_IN, BLOCK_L, N_LANES, ONE_WARP, BC_WORDS)
            b_C_next = _load_bc_tile(C_ptr, o_c_row, o_n3, l_prev, o_t, m_n3, seqlen, EVEN, BC_WORDS)
        b_dt, b_dt_raw = _delta_tile(b_delta, b_delta_bias, m_ld, HAS_DELTA_BIAS, DELTA_SOFTPLUS, FAST_MATH)
        b_dt = _anchor(b_dt, 2, ONE_WARP)
        # Forward again, from the state checkpointed at the tile start.
        b_decay = tl.exp2(b_dt[None, :, :, None] * b_A2)
        b_dtu = _anchor(b_dt * b_u, 2, ONE_WARP)
        b_inp = b_dtu[None, :, :, None] * b_B
        b_inp_scan = b_inp
        b_decay_scan = b_decay
        if IS_VARLEN:
            b_seq = tl.load(seq_idx_ptr + o_l, mask=m_l, other=0)
            b_seq_prev = tl.load(seq_idx_ptr + o_l - 1, mask=m_l & (o_l > 0), other=-1)
            b_seq_next = tl.load(seq_idx_ptr + o_l + 1, mask=o_l + 1 < seqlen, other=-1)
            m_start4 = ((b_seq != b_seq_prev) & m_l)[None, :, None, None]
            m_end = (b_seq != b_seq_next) & m_l
            m_end4 = m_end[None, :, None, None]
            o_seq4 = (b_seq.to(tl.int64) * dim * dstate)[None, :, None, None]
            if HAS_H0:
                b_h0 = tl.load(h0_ptr + o_seq4 + o_dn4, mask=m_dn4 & m_start4, other=0.0)
                b_inp_scan += b_decay * b_h0
            # The zeroed decay at a sequence start also stops the gradient flowing
            # into the previous sequence in the reverse scan.
            b_decay_scan = tl.where(m_start4, 0.0, b_decay)
        b_hs, _ = _scan_tile(b_decay_scan, b_inp_scan, b_h, N_IN, BLOCK_L, BLOCK_D, N_LANES, False)
        if HAS_Z:
            b_y = _sum_n(b_hs * b_C, N_IN, BLOCK_L, BLOCK_D, N_LANES, SPLIT_SUMS)
            if HAS_D:
                b_y += b_D[None, :] * b_u
            b_sig = ptx_sigmoid(b_z, FAST_MATH)
            b_dz = b_dout * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))
            if DZ_LIKE_Z:  # dz with z's (batch, channel) strides (_dz_buffer)
                tl.store(dz_ptr + o_row_z[None, :] + o_l[:, None], b_dz.to(dz_ptr.dtype.element_ty), mask=m_ld)
            else:
                tl.store(dz_ptr + o_ld, b_dz.to(dz_ptr.dtype.element_ty), mask=m_ld)
            b_dy = b_dout * b_z * b_sig
        else:
            b_dy = b_dout
        b_du = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        if HAS_D:
            b_dD_acc += tl.sum(b_dy * b_u, axis=0)
            b_du = b_dy * b_D[None, :]
        # Backward scan of the state gradient.
        b_x = b_C * b_dy[None, :, :, None]
        if IS_VARLEN and HAS_DLAST:
            b_x += tl.load(dlast_ptr + o_seq4 + o_dn4, mask=m_dn4 & m_end4, other=0.0)
        # The gradient carried from the next tile (its decay_0 * dh_0) enters
        # through the last step; the new carry is this tile's decay_0 * dh_0.
        b_dh, b_g = _scan_tile(b_decay_scan, b_x, b_g, N_IN, BLOCK_L, BLOCK_D, N_LANES, True)
        if IS_VARLEN and HAS_H0:
            tl.store(dh0_ptr + o_seq4 + o_dn4, b_decay * b_dh, mask=m_dn4 & m_start4)
        # Gradients of the step input dt * u * B and of the log-decay dt * A;
        # decay_t * h_{t-1} = h_t - input_t avoids shifting h by one step.
        b_dh_B = _sum_n(b_dh * b_B, N_IN, BLOCK_L, BLOCK_D, N_LANES, SPLIT_SUMS)  # (BLOCK_L, BLOCK_D)
        b_du += b_dt * b_dh_B
        b_dlogdecay = b_dh * (b_hs - b_inp)
        b_ddt = b_u * b_dh_B + _sum_n(b_dlogdecay * b_A, N_IN, BLOCK_L, BLOCK_D, N_LANES, SPLIT_SUMS)
        b_dA_acc += tl.sum(b_dlogdecay * b_dt[None, :, :, None], axis=1)
        if B_VAR:
            b_dB = _sum_d(b_dh * b_dtu[None, :, :, None], N_IN, BLOCK_L, BLOCK_D, N_LANES,
                          ONE_WARP, SPLIT_SUMS)  # (N_IN, BLOCK_L, N_LANES)
            _store_bc_grad(dbc_ptr + o_dB_var, b_dB, o_part, o_b_row, o_n3, o_l, m_n3 & m_l[None, :, None], seqlen,
                           ATOMIC)
        else:
            b_dB_acc += tl.sum(b_dh * b_dtu[None, :, :, None], axis=1)
        if C_VAR:
            b_dC = _sum_d(b_hs * b_dy[None, :, :, None], N_IN, BLOCK_L, BLOCK_D, N_LANES, ONE_WARP, SPLIT_SUMS)
            _store_bc_grad(dbc_ptr + o_dC_var, b_dC, o_part, o_c_row, o_n3, o_l, m_n3 & m_l[None, :, None], seqlen,
                           ATOMIC)
        else:
            b_dC_acc += tl.sum(b_hs * b_dy[None, :, :, None], axis=1)
        if DELTA_SOFTPLUS:
            b_ddt = b_ddt * ptx_sigmoid(b_dt_raw, FAST_MATH)
        b_ddt = tl.where(m_ld, b_ddt, 0.0)
        b_ddb_acc += tl.sum(b_ddt, axis=0)
        tl.store(du_ptr + o_ld, b_du.to(du_ptr.dtype.element_ty), mask=m_ld)
        tl.store(ddelta_ptr + o_ld, b_ddt.to(ddelta_ptr.dtype.element_ty), mask=m_ld)
    if HAS_H0 and not IS_VARLEN:
        tl.store(dh0_ptr + o_state, b_g, mask=m_dn3)
    p_param = dparam_ptr + i_b.to(tl.int64) * stride_part_batch
    _store_param_grad(p_param + o_dn3, b_dA_acc, m_dn3, ATOMIC)
    if not B_VAR:
        _store_param_grad(p_param + o_dB + o_dn3, b_dB_acc, m_dn3, ATOMIC)
    if not C_VAR:
        _store_param_grad(p_param + o_dC + o_dn3, b_dC_acc, m_dn3, ATOMIC)
    if HAS_D:
        _store_param_grad(p_param + o_dD + o_d, b_dD_acc, m_d, ATOMIC)
    if HAS_DELTA_BIAS:
        _store_param_grad(p_param + o_ddb + o_d, b_ddb_acc, m_d, ATOMIC)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _block_sizes(dstate: int, group_size: int, grouped: bool, pass_: str):
    """(BLOCK_D, N_IN, N_LANES, BLOCK_L, num_warps, max_registers) of the kernels' 4-D blocks
    for pass_ "fwd" (no gradient), "ckpt" (the forward that saves the backward's
    checkpoints, one per backward tile; up to N = 16 its tiles span two backward tiles) or "bwd".

    N_LANES threads share a channel's state (N_IN entries each); BLOCK_D is chosen
    so that threads and warps cover BLOCK_D * N_LANES exactly, keeping BLOCK_L in
    registers. A block of channels must not straddle two groups of B/C, so with
    groups BLOCK_D also divides D / G (a smaller block stays correct, only slower).
    max_registers (None: the compiler's choice) caps registers per thread.

    The shapes are the fastest of the sweeps in benchmarks/bench_selective_scan.py on an
    H100 (B=4, D=2048, bf16; benchmarks/notes_selective_scan.md): one warp per program
    (no barriers between warps in the per-tile layout changes and reductions) wherever
    that measured faster, 16 steps per forward tile and 8 per backward tile up to N = 16.
    N = 64's backward stays on four warps (one-warp shapes spill registers).
    """
    block_n = max(2, next_pow2(dstate))
    if block_n <= 16:
        n_lanes = 2 if block_n <= 8 else 4
        num_warps, block_l = 1, (8 if pass_ == "bwd" else 16)
    elif block_n <= 64 and pass_ != "bwd":
        n_lanes, num_warps, block_l = 4, 1, 8
    else:
        n_lanes = 8 if block_n <= 64 else 32
        num_warps, block_l = 4, (8 if block_n // n_lanes <= 4 else 4)
    if pass_ == "ckpt" and block_n > 16:
        # Larger tiles with two checkpoints each spill registers here (N = 64 with Triton 3.6).
        block_l = _block_sizes(dstate, group_size, grouped, "bwd")[3]
    n_in = block_n // n_lanes
    block_d = max(1, 32 * num_warps // n_lanes)
    if grouped:
        block_d = min(block_d, group_size & -group_size)  # largest power of two dividing group_size
    return block_d, n_in, n_lanes, block_l, num_warps, None


def _one_warp(block_d: int, n_lanes: int, num_warps: int) -> bool:
    """Whether a program is one warp whose lanes hold distinct (channel, lane) pairs (the kernels'
    _anchor and _sum_d halving apply); one or more channels per thread."""
    return num_warps == 1 and block_d * n_lanes >= 32


def _split_sums(block_d: int, n_lanes: int, num_warps: int) -> bool:
    """Whether the kernels sum across lanes by _sum_last (SPLIT_SUMS): one-warp programs of one
    channel per thread. With two channels per thread the layout change costs more shuffles than
    it saves (offline SASS)."""
    return SPLIT_SUMS and num_warps == 1 and block_d * n_lanes == 32


# Below this many programs per multiprocessor (about one warp per scheduler) the forward kernels wait on
# latency more than on their pipes: there the forward without checkpoints keeps the shuffle sums (the
# layout change of the split sums adds a shared-memory round trip per tile; H100, same run, session 7:
# B=1 D=4096 L=8192, 3.9 programs per SM, 0.452 ms split against 0.435 shuffles; B=4 D=2048, 7.8 per
# SM, 0.165 against 0.173), and only there the forward kernels prefetch into L1 (see L1_PREFETCH).
FEW_PROGRAMS_PER_SM = 6


def _few_programs(device: torch.device, n_programs: int) -> bool:
    """Whether a launch of n_programs has fewer than FEW_PROGRAMS_PER_SM per multiprocessor; False off
    CUDA (the interpreter)."""
    if device.type != "cuda":
        return False
    n_sms = sm_count(device)
    return n_programs < FEW_PROGRAMS_PER_SM * n_sms


# The forward without checkpoints in about 1.5 waves at 1 to 1.5 waves of programs (see _tail_split).
# H100, same run, session 7 (bench --variants "split tail"): B=8 D=1536 fwd L=2048 0.293 vs 0.310 ms,
# L=8192 1.123 vs 1.181. Off until a run with it on by default (and its GPU test) confirms it.
SPLIT_TAIL = False
# Resident one-warp programs per multiprocessor at the N <= 16 shapes' 242-255 registers (with fp32
# B / C; the B / C words kernel has 168 and runs B=8 D=1536 in one wave: no split then).
_PROGRAMS_PER_SM = 8


def _tail_split(device: torch.device, n_blocks: int, n_tiles: int, num_warps: int, max_registers):
    """(n_full, n_split) for a forward launch of n_blocks one-warp programs that takes more than one
    wave but less than 1.5 (e.g. B=8 D=1536: 1536 programs on 132 x 8 slots): the last n_split =
    n_blocks - slots blocks of channels run as two half-length programs each, so that the launch
    takes about 1.5 waves of full occupancy instead of a full wave plus a wave of 3.6 programs per
    SM (session 6: 74% of a full wave's time for 45% of its work). None: no split."""
    if not SPLIT_TAIL or device.type != "cuda" or num_warps != 1 or max_registers is not None or n_tiles < 2:
        return None
    n_sms = sm_count(device)
    slots = _PROGRAMS_PER_SM * n_sms
    n_split = n_blocks - slots
    if n_split <= 0 or 2 * n_split > slots:
        return None
    return n_blocks - n_split, n_split


def _is_even(p, block_d: int, block_n: int, block_l: int) -> bool:
    """Whether every tile is in bounds, so that the kernels can drop their masks."""
    return p.dim % block_d == 0 and p.dstate == block_n and p.seqlen % block_l == 0


def _bc_words(p, even: bool, n_lanes: int) -> bool:
    """Whether the kernels read the input-dependent B and C as 32-bit words of two bf16 steps
    (BC_WORDS): four or more lanes per channel (see BC_WORDS_FWD), full tiles (even L) and bf16 rows
    starting on 4-byte boundaries."""
    return n_lanes >= 4 and even and all(t.dtype == torch.bfloat16 and t.data_ptr() % 4 == 0
                                         for t, var in ((p.B, p.B_var), (p.C, p.C_var)) if var)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, D, L) as the kernels read it: any batch and channel strides, L contiguous
    (a copy only when it is not, e.g. a channel-last tensor)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Prepared:
    """Geometry of a launch from kernel-ready inputs: u, delta, z with L contiguous
    (_rows), B and C as (B, G, N, L) or (D, N) contiguous (_bc_form), seq_idx (L,) int32."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, num_seqs):
        self.batch, self.dim, self.seqlen = u.shape
        self.dstate = A.shape[1]
        self.u, self.delta, self.z = u, delta, z
        self.A, self.B, self.C, self.D, self.delta_bias = A, B, C, D, delta_bias
        self.initial_state, self.seq_idx, self.num_seqs = initial_state, seq_idx, num_seqs
        self.B_var, self.C_var = B.dim() == 4, C.dim() == 4
        self.b_group_size, self.c_group_size, self.group_size, self.grouped = _groups(self.dim, B, C)

    def row_strides(self):
        """(batch, channel) strides of u, delta and z (their L stride is 1)."""
        z = self.z if self.z is not None else self.u
        return (*self.u.stride()[:2], *self.delta.stride()[:2], *z.stride()[:2])

    def bc_strides(self):
        sb = (self.B.stride(0), self.B.stride(1)) if self.B_var else (0, 0)
        sc = (self.C.stride(0), self.C.stride(1)) if self.C_var else (0, 0)
        return (*sb, *sc)


def _bc_form(t: torch.Tensor) -> torch.Tensor:
    """B or C as the kernels read it: (D, N) fixed or (B, G, N, L) input-dependent, contiguous."""
    return (t.unsqueeze(1) if t.dim() == 3 else t).contiguous()


def _groups(dim: int, B: torch.Tensor, C: torch.Tensor):
    """Channels per group of B and of C (D when shared by all channels), their gcd, and
    whether there is more than one group."""
    b_group_size = dim // (B.shape[1] if B.dim() == 4 else 1)
    c_group_size = dim // (C.shape[1] if C.dim() == 4 else 1)
    group_size = math.gcd(b_group_size, c_group_size)
    return b_group_size, c_group_size, group_size, group_size < dim


# The launchers are torch.library custom ops (mamba_pkg/ops/_library.py): torch.compile
# sees each launch as one node with a fake implementation (shapes only) and does not
# trace into Triton. Their allocation helpers are shared by the real and the fake op.
def _fwd_outputs(u, A, B, C, num_seqs: int, store_ckpt: bool):
    """out (B, D, L) in u.dtype, last_state (num_seqs, D, N) fp32 and the per-tile
    start states (B, L / BLOCK_L, D, N) fp32 (empty unless store_ckpt); uninitialised."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    out = u.new_empty(batch, dim, seqlen)
    last = u.new_empty(num_seqs, dim, dstate, dtype=torch.float32)
    if not store_ckpt:
        return out, last, absent(u)
    _, _, group_size, grouped = _groups(dim, B, C)
    block_l = _block_sizes(dstate, group_size, grouped, "bwd")[3]
    return out, last, u.new_empty(batch, cdiv(seqlen, block_l), dim, dstate, dtype=torch.float32)


def _selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None, num_seqs: int,
    delta_softplus: bool, store_ckpt: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel-ready inputs (see _Prepared) -> out (B, D, L), last_state (num_seqs, D, N)
    fp32, and the per-tile start states for the backward (empty unless store_ckpt)."""
    p = _Prepared(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, num_seqs)
    block_d, n_in, n_lanes, block_l, num_warps, max_registers = _block_sizes(
        p.dstate, p.group_size, p.grouped, "ckpt" if store_ckpt else "fwd")
    out, last, ckpt = _fwd_outputs(u, A, B, C, num_seqs, store_ckpt)
    ckpt_l = _block_sizes(p.dstate, p.group_size, p.grouped, "bwd")[3] if store_ckpt else block_l
    varlen = seq_idx is not None
    if varlen and initial_state is not None:
        # Empty sequences are never visited by the kernel: their last state is their initial state.
        last.copy_(initial_state)
    elif varlen:
        last.zero_()
    grid = (cdiv(p.dim, block_d), p.batch)
    even = _is_even(p, block_d, n_in * n_lanes, block_l)
    bc_words = BC_WORDS_FWD and _bc_words(p, even, n_lanes)
    few = _few_programs(u.device, grid[0] * grid[1])
    # Only the forward without checkpoints: with the checkpointing forward and the backward split the same
    # way, fwd+bwd measured slower (H100, session 7: B=8 D=1536 L=2048 1.299 vs 1.194 ms).
    tail = None if varlen or store_ckpt or bc_words else _tail_split(
        u.device, grid[0] * grid[1], cdiv(p.seqlen, block_l), num_warps, max_registers)
    sync, n_full, n_split = None, 0, 0
    if tail is not None:
        n_full, n_split = tail
        sync = torch.zeros(1 + grid[0] * grid[1], dtype=torch.int32, device=u.device)
        grid = (n_full + 2 * n_split, 1)
    launch(
        _selective_scan_fwd_kernel, grid,
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, out, last, ckpt if store_ckpt else None, sync,
        p.seqlen, p.dim, p.dstate, p.b_group_size, p.c_group_size, *p.bc_strides(), *p.row_strides(),
        n_full, n_split,
        num_warps=num_warps, maxnreg=max_registers,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, B_VAR=p.B_var, C_VAR=p.C_var, HAS_H0=initial_state is not None,
        IS_VARLEN=varlen, STORE_CKPT=store_ckpt, EVEN=even,
        FAST_MATH=ptx_math(_selective_scan_fwd_kernel),
        BLOCK_D=block_d, N_IN=n_in, N_LANES=n_lanes, BLOCK_L=block_l, CKPT_L=ckpt_l,
        ONE_WARP=_one_warp(block_d, n_lanes, num_warps),
        SPLIT_SUMS=_split_sums(block_d, n_lanes, num_warps) and (store_ckpt or not few),
        L1_PREFETCH=L1_PREFETCH and few and even and n_in * n_lanes <= 16 and ptx_math(_selective_scan_fwd_kernel),
        SPLIT_TAIL=tail is not None, BC_WORDS=bc_words,
    )
    return out, last, ckpt


_selective_scan_fwd_op = launcher_op("selective_scan_fwd")(_selective_scan_fwd)


@_selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, num_seqs, delta_softplus, store_ckpt):
    return _fwd_outputs(u, A, B, C, num_seqs, store_ckpt)


def _param_grad_layout(dim: int, dstate: int, B_var: bool, C_var: bool, has_D: bool, has_delta_bias: bool):
    """Offsets of the parameter gradients in one flat fp32 vector: dA (D*N), dB and dC when
    fixed (D*N each), dD and d delta_bias (D each); None for an absent one. Returns the
    offsets (dA, dB, dC, dD, d delta_bias) and the length. The kernel writes one such row
    per batch row and a single sum over the rows gives all of them (one launch, not five)."""
    sizes = (dim * dstate, None if B_var else dim * dstate, None if C_var else dim * dstate,
             dim if has_D else None, dim if has_delta_bias else None)
    offsets, total = [], 0
    for size in sizes:
        offsets.append(None if size is None else total)
        total += size or 0
    return tuple(offsets), total


def _bc_grad_sizes(B, C):
    """Sizes of the input-dependent dB and dC, (B, G, N, L) each, in the flat dgrads vector (0 if fixed)."""
    return (B.numel() if B.dim() == 4 else 0), (C.numel() if C.dim() == 4 else 0)


def _dz_buffer(z, dz_pair: bool):
    """With dz_pair, for z the second half of the channels of a (B, 2D, L) tensor laid out as
    (B, 2D, L) or (2D, B, L) (Mamba's xz): a fresh (B, 2D, L) buffer of that layout, whose second
    half (z's strides) takes dz (_selective_scan_bwd); else None."""
    if not dz_pair or z is None:
        return None
    batch, dim, seqlen = z.shape
    if z.stride() == (2 * dim * seqlen, seqlen, 1):
        return z.new_empty(batch, 2 * dim, seqlen)
    if z.stride() == (seqlen, batch * seqlen, 1):
        return z.new_empty(2 * dim, batch, seqlen).permute(1, 0, 2)
    return None


def _bwd_outputs(u, delta, A, B, C, D, z, delta_bias, initial_state, dz_pair=False):
    """(du, ddelta, dz, dinitial_state, dgrads), uninitialised: dgrads one flat fp32 vector, the
    parameter gradients (_param_grad_layout) then the input-dependent dB and dC in the kernel
    form of B and C (B, G, N, L) (one tensor, so one allocation and one fill); absent(u) for
    what is not produced. dz_pair: dz as _dz_buffer's (B, 2D, L) buffer where it applies."""
    _, n_params = _param_grad_layout(u.shape[1], A.shape[1], B.dim() == 4, C.dim() == 4, D is not None,
                                     delta_bias is not None)
    pair = _dz_buffer(z, dz_pair)
    return (
        u.new_empty(u.shape), delta.new_empty(u.shape),
        pair if pair is not None else z.new_empty(u.shape) if z is not None else absent(u),
        A.new_empty(initial_state.shape) if initial_state is not None else absent(u),
        A.new_empty(n_params + sum(_bc_grad_sizes(B, C))),
    )


def _selective_scan_bwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None, num_seqs: int,
    delta_softplus: bool, ckpt: Tensor, dout: Tensor, dlast: Tensor | None, dz_pair: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dz, dinitial_state, dgrads) from the forward's checkpoints; see
    _bwd_outputs for their forms and _param_grads for the split. dz_pair (mamba_inner): where z is
    the second half of a (B, 2D, L) xz (_dz_buffer), dz comes back as the second half of a fresh
    buffer in xz's layout, the whole (B, 2D, L) buffer in its place, so that it can become xz's
    gradient without a copy of dz."""
    p = _Prepared(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, num_seqs)
    block_d, n_in, n_lanes, block_l, num_warps, max_registers = _block_sizes(
        p.dstate, p.group_size, p.grouped, "bwd")
    n_dblocks = cdiv(p.dim, block_d)
    dout = _rows(dout)
    varlen = seq_idx is not None
    has_h0 = initial_state is not None
    du, ddelta, dz, dh0, dgrads = _bwd_outputs(u, delta, A, B, C, D, z, delta_bias, initial_state, dz_pair)
    dz_like_z = z is not None and dz.shape[1] == 2 * p.dim
    dz_arg = dz[:, p.dim:] if dz_like_z else dz
    (_, o_dB, o_dC, o_dD, o_ddb), n_params = _param_grad_layout(
        p.dim, p.dstate, p.B_var, p.C_var, D is not None, delta_bias is not None)
    n_b, _ = _bc_grad_sizes(B, C)
    # Unless torch's deterministic mode is on, the kernel adds every sum over programs
    # atomically into the zeroed dgrads: no per-program partials (for the input-dependent
    # dB / dC 2 x B * D / BLOCK_D * N * L fp32 values) written and summed again.
    atomic = not torch.are_deterministic_algorithms_enabled()
    if atomic:
        params_part, stride_part = dgrads.zero_(), 0
        bc_part, o_dB_var = dgrads, n_params
    else:
        # Per-program partials, added up below. Parameter gradients: one row per batch row
        # (with batch 1 the kernel writes the result itself). Input-dependent dB / dC: one
        # (N, L) slab per block of channels, B's then C's.
        params_part = dgrads if p.batch == 1 else dgrads.new_empty(p.batch, n_params)
        stride_part = n_params
        n_bc_part = p.batch * n_dblocks * p.dstate * p.seqlen
        bc_part = dgrads.new_empty((p.B_var + p.C_var) * n_bc_part) if p.B_var or p.C_var else dgrads
        o_dB_var, n_b = 0, n_bc_part * p.B_var
    if has_h0 and varlen and dlast is not None:
        # Empty packed sequences are never visited: their initial state's gradient is dlast.
        dh0.copy_(dlast)
    elif has_h0 and varlen:
        dh0.zero_()
    dlast = dlast.contiguous() if dlast is not None else None
    grid = (n_dblocks, p.batch)
    even = _is_even(p, block_d, n_in * n_lanes, block_l)
    launch(
        _selective_scan_bwd_kernel, grid,
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, ckpt, dout, dlast,
        du, ddelta, dz_arg if z is not None else None, params_part, bc_part, dh0 if has_h0 else None,
        p.seqlen, p.dim, p.dstate, p.b_group_size, p.c_group_size, *p.bc_strides(), *p.row_strides(),
        *dout.stride()[:2], stride_part, o_dB or 0, o_dC or 0, o_dD or 0, o_ddb or 0, o_dB_var, o_dB_var + n_b,
        num_warps=num_warps, maxnreg=max_registers,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, B_VAR=p.B_var, C_VAR=p.C_var, HAS_H0=has_h0,
        IS_VARLEN=varlen, HAS_DLAST=dlast is not None, EVEN=even,
        FAST_MATH=ptx_math(_selective_scan_bwd_kernel), ATOMIC=atomic,
        BLOCK_D=block_d, N_IN=n_in, N_LANES=n_lanes, BLOCK_L=block_l,
        ONE_WARP=_one_warp(block_d, n_lanes, num_warps), SPLIT_SUMS=_split_sums(block_d, n_lanes, num_warps),
        BC_WORDS=BC_WORDS_BWD and _bc_words(p, even, n_lanes), DZ_LIKE_Z=dz_like_z,
    )
    if not atomic and p.batch > 1:
        torch.sum(params_part, 0, out=dgrads[:n_params])
    if not atomic and (p.B_var or p.C_var):
        _reduce_bc_grads(bc_part, dgrads[n_params:], p.batch, n_dblocks, p.dstate, p.seqlen,
                         B if p.B_var else None, C if p.C_var else None)
    return du, ddelta, dz, dh0, dgrads


_selective_scan_bwd_op = launcher_op("selective_scan_bwd")(_selective_scan_bwd)


@_selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, num_seqs, delta_softplus, ckpt, dout, dlast,
      dz_pair=False):
    return _bwd_outputs(u, delta, A, B, C, D, z, delta_bias, initial_state, dz_pair)


def _reduce_bc_grads(partial, out, batch: int, n_dblocks: int, dstate: int, seqlen: int, B, C):
    """Per-block partials (B, D / BLOCK_D, N, L) of the input-dependent dB then dC -> their sums
    over each group's blocks, (B, G, N, L) each, into the flat out; one launch when B and C have
    the same groups."""
    forms = [t for t in (B, C) if t is not None]
    if len(forms) == 2 and B.shape[1] == C.shape[1]:
        groups = B.shape[1]
        torch.sum(partial.view(2, batch, groups, n_dblocks // groups, dstate, seqlen), 3,
                  out=out.view(2, batch, groups, dstate, seqlen))
        return
    o_in = o_out = 0
    for t in forms:
        groups, n_in = t.shape[1], batch * n_dblocks * dstate * seqlen
        torch.sum(partial[o_in:o_in + n_in].view(batch, groups, n_dblocks // groups, dstate, seqlen), 2,
                  out=out[o_out:o_out + t.numel()].view(batch, groups, dstate, seqlen))
        o_in, o_out = o_in + n_in, o_out + t.numel()


def _param_grads(dgrads, dim: int, dstate: int, B_form, C_form, has_D: bool, has_delta_bias: bool):
    """Split the backward launcher's flat dgrads into (dA, dB, dC, dD, d delta_bias) as views,
    dB and dC in the shapes and dtypes of B and C (B_form / C_form: (shape, dtype, kernel form
    is input-dependent)); one cast for both when they share a dtype. Two splits instead of a
    slice per gradient: each torch call costs host time (the L=2048 fwd+bwd was host-bound)."""
    _, n_params = _param_grad_layout(dim, dstate, B_form[2], C_form[2], has_D, has_delta_bias)
    sizes = [math.prod(shape) for shape, _, _ in (B_form, C_form)]
    fixed = [0 if var else size for (_, _, var), size in zip((B_form, C_form), sizes)]
    dA, dB, dC, dD, ddelta_bias, dbc = dgrads.split_with_sizes(
        [dim * dstate, *fixed, dim * has_D, dim * has_delta_bias, dgrads.numel() - n_params])
    if B_form[2] or C_form[2]:
        if B_form[2] and C_form[2] and B_form[1] == C_form[1]:
            dbc = dbc.to(B_form[1])
        dB_var, dC_var = dbc.split_with_sizes([sizes[0] * B_form[2], sizes[1] * C_form[2]])
        dB, dC = (dB_var if B_form[2] else dB), (dC_var if C_form[2] else dC)
    grads = [g.view(shape) if g.dtype == dtype else g.view(shape).to(dtype)
             for g, (shape, dtype, _) in ((dB, B_form), (dC, C_form))]
    return dA.view(dim, dstate), grads[0], grads[1], dD if has_D else None, ddelta_bias if has_delta_bias else None


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens):
    """The launchers' inputs (see _Prepared) and the number of sequences."""
    seq_idx = None if cu_seqlens is None else seq_idx_from_cu_seqlens(cu_seqlens, u.shape[2])[0]
    num_seqs = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    inputs = (_rows(u), _rows(delta), A.contiguous(), _bc_form(B), _bc_form(C),
              D.contiguous() if D is not None else None, _rows(z) if z is not None else None,
              delta_bias.contiguous() if delta_bias is not None else None,
              initial_state.contiguous() if initial_state is not None else None, seq_idx)
    return inputs, num_seqs


class SelectiveScanFn(torch.autograd.Function):
    """Triton forward and backward through the custom-op launchers. Options
    (delta_softplus,) ride in a tuple."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, options):
        (delta_softplus,) = options
        inputs, num_seqs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
        needs_grad = any(ctx.needs_input_grad[:9])
        out, last, ckpt = _selective_scan_fwd_op(*inputs, num_seqs, delta_softplus, needs_grad)
        if needs_grad:
            ctx.save_for_backward(*inputs, ckpt)
            ctx.options = (num_seqs, delta_softplus, (B.shape, B.dtype, B.dim() > 2),
                           (C.shape, C.dtype, C.dim() > 2))
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        *inputs, ckpt = ctx.saved_tensors
        num_seqs, delta_softplus, B_form, C_form = ctx.options
        u, _, A, _, _, D, z, delta_bias, initial_state, _ = inputs
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dz, dh0, dgrads = _selective_scan_bwd_op(*inputs, num_seqs, delta_softplus, ckpt, dout, dlast)
        dA, dB, dC, dD, ddelta_bias = _param_grads(dgrads, *A.shape, B_form, C_form, D is not None,
                                                   delta_bias is not None)
        return (du, ddelta, dA, dB, dC, dD, dz if z is not None else None, ddelta_bias,
                dh0 if initial_state is not None else None, None, None)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, cu_seqlens=None, backend=None):
    """Mamba-1 selective scan (see the module header for the recurrence).

    Args:
        u: (B, D, L) fp32 / fp16 / bf16 input.
        delta: (B, D, L) step sizes, same dtype as u.
        A: (D, N) fp32, real; N <= 256.
        B, C: (D, N) fixed, (B, N, L), or (B, G, N, L) with G dividing D (channel d uses
            group d // (D / G)); any float dtype.
        D: optional (D,) fp32 skip weight.
        z: optional (B, D, L) gate, same dtype as u: out = (y + D * u) * silu(z).
        delta_bias: optional (D,) fp32 added to delta before the softplus.
        delta_softplus: apply softplus to delta (+ delta_bias).
        return_last_state: also return the final state.
        initial_state: optional (B, D, N) fp32 state before the first step
            ((num_seqs, D, N) with cu_seqlens); differentiable.
        cu_seqlens: optional (num_seqs + 1,) int32/int64 boundaries of packed sequences
            (batch must be 1); each sequence starts from zero or its own initial state.
        backend: "torch" | "triton" | None (see mamba_pkg.ops.backend). The Triton
            kernels read u, delta and z in place when their L axis is contiguous (any
            batch and channel strides, e.g. the halves of a (B, 2*D, L) tensor), else
            from a contiguous copy; B and C are read from contiguous copies.

    Returns:
        out (B, D, L) in u.dtype, and with return_last_state=True also
        last_state (B, D, N) fp32 ((num_seqs, D, N) with cu_seqlens), differentiable.
    """
    which = resolve_backend(backend, u, delta, A, B, C, D, z, delta_bias, initial_state)
    if which == "torch":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state, cu_seqlens=cu_seqlens)
    if initial_state is not None or cu_seqlens is not None or not _inputs_ok(u, delta, A, B, C, D, z, delta_bias):
        _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if u.numel() == 0:
        # Nothing to launch: the reference gives the empty output, and the initial
        # (or zero) state as the last state.
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state, cu_seqlens=cu_seqlens)
    if torch.is_grad_enabled():
        out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                                          (delta_softplus,))
    else:
        # Without autograd the Function's bookkeeping is only host time.
        inputs, num_seqs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
        out, last, _ = _selective_scan_fwd_op(*inputs, num_seqs, delta_softplus, False)
    return (out, last) if return_last_state else out
