"""SSD stage 1: dt processing, per-chunk decay cumsum and the states between chunks.

The dt processing and the decay cumsum inside each chunk come first (_dt_rows: programs of
the forward op's C B^T launch, or a small kernel of their own); then one program
walks the chunks of one (batch, head, P-block, N-block) in order and keeps the running
state in registers, so the chunk-state and state-passing stages of the usual five-kernel
pipeline are one pass over x and B:

    dt_t    = clamp(softplus(dt_t + dt_bias))                    (B, L, H) -> (B, H, C, Q)
    cs_t    = dt_1 A + ... + dt_t A   (cumulated inside the chunk)  (B, H, C, Q)
    S_c     = exp(cs_Q) S_{c-1} + sum_s exp(cs_Q - cs_s) dt_s x_s B_s^T
    states[c] = S_{c-1}, the state entering chunk c                (B, C, H, P, N)

(Until session 10 each walk program processed dt and cumulated it in every step of its
chain: a softplus and a cross-warp scan, 8 of the step's 12 CTA barriers at (64, 64) with
8 warps, offline sm_90, and dt loads strided by H.)

The backward stage here is the same walk in reverse for the state gradient:

    dS_{c-1} = exp(cs_Q) dS_c + sum_t exp(cs_t) dy_t C_t^T,   dstates[c] = dS_c

The backward runs it in one launch beside a rerun of the forward walk (the states are
recomputed, not kept): the two are independent (the reverse walk reads the forward
pass's cs), and each alone is a chain of dependent steps that leaves the SMs half idle.
The gradient wrt each chunk's total decay through the state it carries across,
<dS_c, S_{c-1}> exp(cs_Q), needs both walks' results; the dB/dC kernel (chunk_scan.py)
forms it, where both tiles are loaded anyway.

A change of seq_idx resets the state: a position only sees states of its own
sequence, and the state entering a row is its first run's initial state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import cdiv, ptx_exp2, ptx_log2, ptx_math, tl, triton, triton_interpret
from mamba_pkg.ops._launch import launch


def block_size(n: int) -> int:
    """The block covering n: the next power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << (n - 1).bit_length())


def dot_dtype_for(dtype: torch.dtype):
    """Operand dtype of the kernels' matrix products for inputs of `dtype` (fp32 accumulation).

    The interpreter computes low-precision tl.dot wrongly; there the fp32 path runs.
    """
    if dtype == torch.float32 or triton_interpret():
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def states_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the states between chunks (and their gradients): bf16 for bf16
    inputs on tensor cores (they are matrix operands there), else fp32."""
    return torch.bfloat16 if dot_dtype_for(dtype) == tl.bfloat16 else torch.float32


def _walk_configs():
    """Autotuning space of the two walks: the (P, N) block decides how many programs run,
    BLOCK_L the rows per step (a chunk is Q // BLOCK_L steps of the recurrence; the kernel
    takes shorter steps, but 64- and 32-row steps measured 15-30% slower on an H100). The
    walks are latency-bound (at the main shape (32, 128) blocks make 256 programs, 2 per
    SM, and won at 0.168 ms): the smaller (16, 128) and (32, 64) blocks double the programs
    (offline sm_90 compile with Triton 3.6: 92-151 registers, no spill). (64, 64) is first
    for the GPU tests' one-config fixture; the second, kept there too, fits in fp32. The
    backward's two walks in one launch take 146 registers at (32, 128) (3 programs per SM:
    512 programs at the main shape need two rounds); capped at 128 (32 bytes spilled) they
    fit 4 programs per SM, one round, by registers; but one 256-row step stages 82 KB of x and
    B tiles in shared memory, so only 2 programs per SM run (two rounds). 128-row steps capped
    at 128 registers take 41 KB (24 bytes spilled): 4 programs per SM, one round. (64, 128)
    blocks with 8 warps: one program per SM and per head (B read once per head, not twice), the
    step's product on warpgroup MMA (16 HGMMA per warp instead of 128 HMMA at BLOCK_P 32) and
    the next step's tiles loaded during this one (two stages: 160 KB at 256 rows, 80 KB at 128;
    174-183 registers); the backward's two walks at 128 rows capped at 128 registers (40 bytes
    spilled, 99 KB): 2 programs per SM, the 256 programs of the main shape in one round.
    (64, 64) blocks with 8 warps capped at 128 registers (no spill; 255 registers at 4 warps, the
    forward walk's pick in sessions 8-9): the same 2 programs per SM (98 KB each), twice the
    warps to hide each step's latency, half the elementwise work per thread (1088 instead of
    1680 instructions). Forward walk only (_prune_walk_configs)."""
    if triton_interpret():
        return [triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_L": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_L": bl}, num_warps=w, num_stages=st, maxnreg=r)
        for bp, bn, bl, w, st, r in ((64, 64, 256, 4, 2, None), (32, 64, 256, 4, 2, None),
                                     (32, 128, 256, 4, 2, None), (16, 128, 256, 4, 2, None),
                                     (32, 128, 256, 4, 2, 128), (32, 128, 128, 4, 2, 128),
                                     (64, 128, 256, 8, 2, None), (64, 128, 128, 8, 2, None),
                                     (64, 128, 128, 8, 2, 128), (64, 64, 256, 8, 2, 128))
    ]


def _prune_walk_configs(configs, named_args, **kwargs):
    """Steps no longer than the chunk. A walk that a forward scan runs beside (LAUNCH_DEPENDENTS)
    takes only the configs whose x and B tiles stage at most 40 KB of shared memory per step,
    so that the SMs hold scan programs beside two walk programs each. The reverse walk does not
    take (64, 64) blocks with 8 warps (added for the forward walk in session 10, with the W
    kernel meant to run beside the reverse walk, chunk_scan.BACKWARD_STREAMS); the H100 then
    picked (64, 64) blocks at 4 warps for it (0.130 ms at the main shape), which fill the SMs
    as well: whether the 8-warp blocks would beat that is not measured."""
    Q = kwargs["Q"]
    fits = [c for c in configs if c.kwargs["BLOCK_L"] <= Q
            and not (kwargs.get("REV") and c.num_warps == 8 and c.kwargs["BLOCK_N"] == 64)]
    if kwargs.get("LAUNCH_DEPENDENTS"):
        fits = [c for c in fits if c.kwargs["BLOCK_L"] * (c.kwargs["BLOCK_P"] + c.kwargs["BLOCK_N"]) * 2 <= 40 << 10]
    return fits or [triton.Config(dict(configs[0].kwargs, BLOCK_L=Q), num_warps=configs[0].num_warps)]


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b with fp32 accumulation; operands in DOT_DTYPE (exact fp32 when that is fp32)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


# The walks' products round the fp32 weighted rows (dt-and-decay-weighted x, or dy) to
# bf16 once, as any tensor-core chunk-state kernel does; the running state stays fp32.
# (Sessions 1-3 split that operand into a high and a low bf16 part: two products per
# step, twice the serial matrix work of the walk.)


@triton.jit
def _walk_program(i_bh, H, P, N, heads_per_group, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which (batch, head, group, P block, N block) this walk program carries:
    grid axis 0 = the (P, N) block; i_bh = batch * H + head."""
    i_pn = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    n_pblocks = tl.cdiv(P, BLOCK_P)
    o_p = (i_pn % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = (i_pn // n_pblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return i_pn, i_b, i_h, i_h // heads_per_group, o_p, o_n, o_p < P, o_n < N


@triton.jit
def _walk_start(ptr, i_b, i_h, H, P, N, o_p, o_n, m_p, m_n, HAS_START: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The walk's (P, N) block of a (B, H, P, N) fp32 starting value (zeros without one),
    its row offset, the block's offsets and mask."""
    pn_off = o_p[:, None] * N + o_n[None, :]
    m_pn = m_p[:, None] & m_n[None, :]
    state_bh = (i_b * H + i_h).to(tl.int64) * P * N
    if HAS_START:
        start = tl.load(ptr + state_bh + pn_off, mask=m_pn, other=0.0).to(tl.float32)
    else:
        start = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    return start, state_bh, pn_off, m_pn


@triton.jit
def _softplus(v, PTX: tl.constexpr):
    # log1p(exp(v)) without overflow and without losing small values to 1 + u rounding.
    # PTX: the single ex2/lg2 approximations (Triton 3.6 lowers tl.log to libdevice's
    # accurate logf, a long polynomial); 1 + u lies in [1, 2], where lg2.approx is exact
    # to ~2e-7 absolute.
    u = ptx_exp2(tl.abs(v) * -1.4426950408889634, PTX)
    log1p_u = tl.where(u < 1e-4, u - 0.5 * u * u, ptx_log2(1.0 + u, PTX) * 0.6931471805599453)
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p_u)


@triton.jit
def _cta_barrier(value, PTX: tl.constexpr):
    """value (int32), returned after every thread of the program reached this point."""
    if PTX:
        return tl.inline_asm_elementwise("bar.sync 0;\n mov.b32 $0, $1;", "=r,r", [value], dtype=tl.int32,
                                         is_pure=False, pack=1)
    tl.debug_barrier()
    return value


@triton.jit
def _dt_rows(
    i_prog, dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cs_out_ptr, L, H, nchunks, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, PTX: tl.constexpr,
    Q: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The processed dt and its cumsum dt * A inside the chunk, (B, H, C, Q) fp32 each (0 and
    flat past L), for one (batch, chunk, block of BLOCK_H heads) = i_prog: the walks then load
    them instead of each (P, N) block's program redoing the softplus and the cumsum (a
    cross-warp scan) in every step of its chain. dt rows of BLOCK_H heads are contiguous:
    coalesced loads. The forward op runs these programs in the C B^T launch (chunk_scan.py)."""
    n_hblocks = tl.cdiv(H, BLOCK_H)
    i_hb = i_prog % n_hblocks
    i_c = (i_prog // n_hblocks) % nchunks
    i_b = i_prog // (n_hblocks * nchunks)
    o_q = tl.arange(0, Q)
    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    o_l = i_c * Q + o_q
    m = (o_l < L)[:, None] & m_h[None, :]
    dt = tl.load(dt_ptr + i_b.to(tl.int64) * stride_dt_b + o_l.to(tl.int64)[:, None] * stride_dt_l
                 + o_h[None, :] * stride_dt_h, mask=m, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt = dt + tl.load(dt_bias_ptr + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if DT_SOFTPLUS:
        dt = _softplus(dt, PTX)
    if HAS_DT_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(m, dt, 0.0)
    cs = tl.cumsum(dt * tl.load(A_ptr + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :], axis=0)
    out_off = ((i_b * H + o_h[None, :]) * nchunks + i_c).to(tl.int64) * Q + o_q[:, None]
    tl.store(dt_out_ptr + out_off, dt, mask=m_h[None, :])
    tl.store(cs_out_ptr + out_off, cs, mask=m_h[None, :])


@triton.jit
def _dt_fwd_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cs_out_ptr, L, H, nchunks, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, PTX: tl.constexpr,
    Q: tl.constexpr, BLOCK_H: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:  # the walk after this launch may start (it waits before reading dt and cs)
        tl.extra.cuda.gdc_launch_dependents()
    _dt_rows(tl.program_id(0), dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cs_out_ptr, L, H, nchunks, dt_min, dt_max,
             stride_dt_b, stride_dt_l, stride_dt_h, HAS_DT_BIAS, DT_SOFTPLUS, HAS_DT_LIMIT, PTX, Q, BLOCK_H)


@triton.jit
def _forward_walk(
    x_ptr, B_ptr, seq_idx_ptr, init_ptr, states_ptr, final_ptr, dt_ptr, cs_ptr, ready_ptr,
    i_bh, L, H, P, N, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_seq_b, stride_seq_l,
    HAS_SEQ_IDX: tl.constexpr, HAS_INIT: tl.constexpr, STORE_STATES: tl.constexpr, WRITE_FINAL: tl.constexpr,
    SIGNAL: tl.constexpr, EVEN: tl.constexpr, PTX: tl.constexpr, Q: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The forward walk of one (batch * H + head) = i_bh and (P, N) block, from the processed dt
    and its cumsum (B, H, C, Q) (_dt_fwd_kernel). WRITE_FINAL: also the final state (the
    backward's rerun needs only the states). SIGNAL: after each chunk, add the number of state
    entries this program covers to ready[batch, head, chunk] (B, H, C) int32 (release), so that a
    forward scan running beside the walk can start a chunk once its state is written (P * N)."""
    i_pn, i_b, i_h, i_g, o_p, o_n, m_p, m_n = _walk_program(i_bh, H, P, N, heads_per_group, BLOCK_P, BLOCK_N)
    o_q = tl.arange(0, BLOCK_L)
    x_base = x_ptr + i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
    B_base = B_ptr + i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g
    seq_base = seq_idx_ptr + i_b.to(tl.int64) * stride_seq_b
    # (B, H, P, N) contiguous fp32 for init/final; (B, C, H, P, N) for states.
    state, state_bh, pn_off, m_pn = _walk_start(init_ptr, i_b, i_h, H, P, N, o_p, o_n, m_p, m_n, HAS_INIT,
                                                BLOCK_P, BLOCK_N)
    if HAS_SEQ_IDX:
        seq_prev = tl.load(seq_base)
    n_entries = tl.sum(m_p.to(tl.int32), axis=0) * tl.sum(m_n.to(tl.int32), axis=0)

    for c in range(nchunks):
        chunk_off = ((i_b * H + i_h) * nchunks + c).to(tl.int64) * Q
        if STORE_STATES:
            st_off = ((i_b * nchunks + c) * H + i_h).to(tl.int64) * P * N
            tl.store(states_ptr + st_off + pn_off, state.to(states_ptr.dtype.element_ty), mask=m_pn)
        # The chunk in row blocks of BLOCK_L, each a step of the same recurrence: a whole
        # chunk's (Q, BLOCK_P) and (Q, BLOCK_N) tiles at once spill registers.
        for j in range(Q // BLOCK_L):
            o_r = j * BLOCK_L + o_q
            o_l = c * Q + o_r
            m_l = o_l < L
            # dt is 0 past L, so those rows weigh nothing.
            dt = tl.load(dt_ptr + chunk_off + o_r)
            cs_end = tl.load(cs_ptr + chunk_off + j * BLOCK_L + BLOCK_L - 1)
            cs_start = tl.load(cs_ptr + chunk_off + tl.maximum(j * BLOCK_L - 1, 0))
            cs_start = tl.where(j == 0, 0.0, cs_start)
            weight = tl.exp(cs_end - tl.load(cs_ptr + chunk_off + o_r)) * dt
            decay = tl.exp(cs_end - cs_start)
            if HAS_SEQ_IDX:
                last = tl.minimum(c * Q + j * BLOCK_L + BLOCK_L, L) - 1
                seq_end = tl.load(seq_base + last.to(tl.int64) * stride_seq_l)
                seq = tl.load(seq_base + o_l.to(tl.int64) * stride_seq_l, mask=m_l, other=-1)
                weight = tl.where(seq == seq_end, weight, 0.0)
                decay = tl.where(seq_prev == seq_end, decay, 0.0)
                seq_prev = seq_end
            p_x = x_base + o_l.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
            # Matrix operand: kept in its storage dtype, _dot casts it.
            p_B = B_base + o_l.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n
            if EVEN:
                b_x = tl.load(p_x).to(tl.float32)
                b_B = tl.load(p_B)
            else:
                b_x = tl.load(p_x, mask=m_l[:, None] & m_p[None, :], other=0.0).to(tl.float32)
                b_B = tl.load(p_B, mask=m_l[:, None] & m_n[None, :], other=0.0)
            b_xw = b_x * weight[:, None]
            state = state * decay + _dot(tl.trans(b_xw), b_B, DOT_DTYPE)
        if SIGNAL:
            # Every thread's stores of this chunk's state precede the count: a CTA barrier, as
            # inline asm (tl.debug_barrier here costs the 256-row steps 110 registers and a
            # spill, offline sm_90), whose output is the count added.
            tl.atomic_add(ready_ptr + (i_b * H + i_h) * nchunks + c, _cta_barrier(n_entries, PTX), sem="release",
                          scope="gpu")

    if WRITE_FINAL:
        tl.store(final_ptr + state_bh + pn_off, state, mask=m_pn)


@triton.jit
def _reverse_walk(
    dout_ptr, z_ptr, C_ptr, seq_idx_ptr, cs_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
    i_bh, L, H, P, N, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_seq_b, stride_seq_l,
    HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, HAS_DFINAL: tl.constexpr, EVEN: tl.constexpr,
    Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """The state-gradient walk of one (batch * H + head) = i_bh and (P, N) block, last chunk first."""
    i_pn, i_b, i_h, i_g, o_p, o_n, m_p, m_n = _walk_program(i_bh, H, P, N, heads_per_group, BLOCK_P, BLOCK_N)
    o_q = tl.arange(0, BLOCK_L)
    # dout and z share x's strides (the launcher makes them so).
    dout_base = dout_ptr + i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
    z_base = z_ptr + i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
    C_base = C_ptr + i_b.to(tl.int64) * stride_C_b + i_g * stride_C_g
    seq_base = seq_idx_ptr + i_b.to(tl.int64) * stride_seq_b
    dstate, state_bh, pn_off, m_pn = _walk_start(dfinal_ptr, i_b, i_h, H, P, N, o_p, o_n, m_p, m_n,
                                                 HAS_DFINAL, BLOCK_P, BLOCK_N)

    for c_rev in range(nchunks):
        c = nchunks - 1 - c_rev
        st_off = ((i_b * nchunks + c) * H + i_h).to(tl.int64) * P * N
        tl.store(dstates_ptr + st_off + pn_off, dstate.to(dstates_ptr.dtype.element_ty), mask=m_pn)
        chunk_off = ((i_b * H + i_h) * nchunks + c).to(tl.int64) * Q
        # The chunk's row blocks in reverse, each a step of the recurrence (as in the
        # forward walk): dS_{start} = exp(cs_end - cs_start) dS_{end} + sum_t exp(cs_t - cs_start) dy_t C_t^T.
        for j_rev in range(Q // BLOCK_L):
            j = Q // BLOCK_L - 1 - j_rev
            o_r = j * BLOCK_L + o_q
            o_l = c * Q + o_r
            m_l = o_l < L
            cs = tl.load(cs_ptr + chunk_off + o_r)
            cs_start = tl.load(cs_ptr + chunk_off + tl.maximum(j * BLOCK_L - 1, 0))
            cs_start = tl.where(j == 0, 0.0, cs_start)
            cs_end = tl.load(cs_ptr + chunk_off + j * BLOCK_L + BLOCK_L - 1)
            weight = tl.where(m_l, tl.exp(cs - cs_start), 0.0)
            step_decay = tl.exp(cs_end - cs_start)
            if HAS_SEQ_IDX:
                # Clamped into the sequence: a step past its end passes the gradient through.
                seq_prev = tl.load(seq_base + tl.minimum(tl.maximum(c * Q + j * BLOCK_L - 1, 0), L - 1).to(tl.int64)
                                   * stride_seq_l)
                seq_end = tl.load(seq_base + (tl.minimum(c * Q + j * BLOCK_L + BLOCK_L, L) - 1).to(tl.int64)
                                  * stride_seq_l)
                seq = tl.load(seq_base + o_l.to(tl.int64) * stride_seq_l, mask=m_l, other=-1)
                weight = tl.where(seq == seq_prev, weight, 0.0)
                step_decay = tl.where(seq_prev == seq_end, step_decay, 0.0)
            m_lp = m_l[:, None] & m_p[None, :]
            x_off = o_l.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
            p_C = C_base + o_l.to(tl.int64)[:, None] * stride_C_l + o_n[None, :] * stride_C_n
            if EVEN:
                dy = tl.load(dout_base + x_off).to(tl.float32)
                if HAS_Z:
                    zz = tl.load(z_base + x_off).to(tl.float32)
                    dy = dy * zz * tl.sigmoid(zz)
                b_C = tl.load(p_C)
            else:
                dy = tl.load(dout_base + x_off, mask=m_lp, other=0.0).to(tl.float32)
                if HAS_Z:
                    zz = tl.load(z_base + x_off, mask=m_lp, other=0.0).to(tl.float32)
                    dy = dy * zz * tl.sigmoid(zz)
                b_C = tl.load(p_C, mask=m_l[:, None] & m_n[None, :], other=0.0)
            dstate = dstate * step_decay + _dot(tl.trans(dy * weight[:, None]), b_C, DOT_DTYPE)

    tl.store(dinit_ptr + state_bh + pn_off, dstate, mask=m_pn)


# Keyed like the tile kernels in chunk_scan.py (the tensors' dtypes are added), and on which walks run.
@triton.autotune(configs=_walk_configs(), key=["P", "N", "Q", "HAS_SEQ_IDX", "FWD", "REV", "LAUNCH_DEPENDENTS"],
                 prune_configs_by={"early_config_prune": _prune_walk_configs})
@triton.jit
def _chunk_state_walks_kernel(
    x_ptr, B_ptr, seq_idx_ptr, init_ptr, states_ptr, final_ptr, dt_ptr, cs_ptr,
    dout_ptr, z_ptr, C_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, ready_ptr,
    L, H, P, N, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_seq_b, stride_seq_l,
    HAS_SEQ_IDX: tl.constexpr, HAS_INIT: tl.constexpr, HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_STATES: tl.constexpr, FWD: tl.constexpr, REV: tl.constexpr, SIGNAL: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr, EVEN: tl.constexpr, PTX: tl.constexpr,
    Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PDL: tl.constexpr,
):
    """FWD only: the forward pass's walk (states, final). FWD and REV: the backward's two walks
    side by side in one launch (grid axis 1 = 2 * batch * H; the first half reruns the forward
    walk for the states, the second walks the state gradient back). Both read the processed dt
    and its cumsum cs (B, H, C, Q) of the forward pass. Each walk is a chain of dependent steps
    with the SMs half idle, so the two overlap. REV only: the state-gradient walk alone.
    LAUNCH_DEPENDENTS (a programmatic dependent launch follows): the next kernel may start once
    every program of this one has started; it must wait for the ready counts (SIGNAL) of what
    it reads. PDL (chunk_scan.FORWARD_PDL, the forward walk): a programmatic dependent launch in a
    chain: the next launch may start at once; this one waits for its predecessor (the dt processing)
    before it reads anything."""
    if LAUNCH_DEPENDENTS or PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    i_bh = tl.program_id(1)
    # Two call sites per walk: the forward pass's walk alone must not sit under the runtime
    # branch (offline sm_90 compile: 187 registers instead of 145 at (32, 128)).
    if FWD and REV:
        n_bh = tl.num_programs(1) // 2
        if i_bh < n_bh:
            _forward_walk(x_ptr, B_ptr, seq_idx_ptr, init_ptr, states_ptr, final_ptr, dt_ptr, cs_ptr, ready_ptr,
                          i_bh, L, H, P, N, heads_per_group, nchunks,
                          stride_x_b, stride_x_l, stride_x_h, stride_x_p,
                          stride_B_b, stride_B_l, stride_B_g, stride_B_n, stride_seq_b, stride_seq_l,
                          HAS_SEQ_IDX, HAS_INIT, STORE_STATES, False, False, EVEN, PTX,
                          Q, BLOCK_L, BLOCK_P, BLOCK_N, DOT_DTYPE)
        else:
            _reverse_walk(dout_ptr, z_ptr, C_ptr, seq_idx_ptr, cs_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
                          i_bh - n_bh, L, H, P, N, heads_per_group, nchunks,
                          stride_x_b, stride_x_l, stride_x_h, stride_x_p,
                          stride_B_b, stride_B_l, stride_B_g, stride_B_n, stride_seq_b, stride_seq_l,
                          HAS_Z, HAS_SEQ_IDX, HAS_DFINAL, EVEN, Q, BLOCK_L, BLOCK_P, BLOCK_N, DOT_DTYPE)
    elif FWD:
        _forward_walk(x_ptr, B_ptr, seq_idx_ptr, init_ptr, states_ptr, final_ptr, dt_ptr, cs_ptr, ready_ptr,
                      i_bh, L, H, P, N, heads_per_group, nchunks,
                      stride_x_b, stride_x_l, stride_x_h, stride_x_p,
                      stride_B_b, stride_B_l, stride_B_g, stride_B_n, stride_seq_b, stride_seq_l,
                      HAS_SEQ_IDX, HAS_INIT, STORE_STATES, True, SIGNAL, EVEN, PTX,
                      Q, BLOCK_L, BLOCK_P, BLOCK_N, DOT_DTYPE)
    else:
        _reverse_walk(dout_ptr, z_ptr, C_ptr, seq_idx_ptr, cs_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
                      i_bh, L, H, P, N, heads_per_group, nchunks,
                      stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
                      stride_seq_b, stride_seq_l, HAS_Z, HAS_SEQ_IDX, HAS_DFINAL, EVEN, Q, BLOCK_L, BLOCK_P, BLOCK_N,
                      DOT_DTYPE)


def _chunk_state_fwd_outputs(x, B, Q, store_states):
    """(states, final, dt, cs) of the forward walk, uninitialised; shared with the fake op."""
    batch, L, H, P = x.shape
    N = B.shape[3]
    nchunks = cdiv(L, Q)
    states = x.new_empty(batch, nchunks, H, P, N, dtype=states_dtype_for(x.dtype)) if store_states else absent(x)
    final = x.new_empty(batch, H, P, N, dtype=torch.float32)
    dt_out = x.new_empty(batch, H, nchunks, Q, dtype=torch.float32)
    return states, final, dt_out, torch.empty_like(dt_out)


def _even_tiles(L, P, N, Q) -> bool:
    """Whether every walk config's x / dout and B / C tiles lie inside the tensors, so that
    the walks load them without masks (the loads then go to shared memory as cp.async copies;
    offline sm_90, Triton 3.6: the (32, 128) forward step 2016 -> 1824 instructions): whole
    chunks, and P, N multiples of every config's BLOCK_P and BLOCK_N."""
    configs = _chunk_state_walks_kernel.configs
    return (L % Q == 0 and all(P % c.kwargs["BLOCK_P"] == 0 for c in configs)
            and all(N % c.kwargs["BLOCK_N"] == 0 for c in configs))


def dt_launch_args(dt, A, dt_bias, dt_softplus, dt_min, dt_max, Q, dt_out, cs_out):
    """(programs, pointers, scalars and strides, constexprs) of _dt_rows for dt (B, L, H) (any
    strides) into dt_out and cs_out (B, H, C, Q) fp32."""
    batch, L, H = dt.shape
    nchunks = cdiv(L, Q)
    BLOCK_H = 8  # a (Q, 8) fp32 tile: 16 values per thread at 4 warps
    flags = dict(HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
                 HAS_DT_LIMIT=(dt_min, dt_max) != (0.0, float("inf")), PTX=ptx_math(_dt_fwd_kernel), Q=Q,
                 BLOCK_H=BLOCK_H)
    return (batch * nchunks * cdiv(H, BLOCK_H), (dt, A, dt_bias if dt_bias is not None else A, dt_out, cs_out),
            (L, H, nchunks, float(dt_min), float(dt_max), *dt.stride()), flags)


def _walk_args(x, B, seq_idx, initial_states, Q, states, final, dt, cs):
    """The forward walk's part of the walk kernel's arguments: (pointers, scalars and strides,
    constexprs); dt and cs (B, H, C, Q) fp32 from _process_dt."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    seq_arg = seq_idx if seq_idx is not None else cs
    seq_strides = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    ptrs = (x, B, seq_arg, initial_states if initial_states is not None else final, states, final, dt, cs)
    scalars = (L, H, P, N, H // G, cdiv(L, Q), *x.stride(), *B.stride(), *seq_strides)
    flags = dict(HAS_SEQ_IDX=seq_idx is not None, HAS_INIT=initial_states is not None,
                 PTX=ptx_math(_chunk_state_walks_kernel.fn), Q=Q, DOT_DTYPE=dot_dtype_for(x.dtype),
                 EVEN=_even_tiles(L, P, N, Q))
    return ptrs, scalars, flags


def _walk_grid(batch, H, P, N, n_walks):
    return lambda meta: (cdiv(P, meta["BLOCK_P"]) * cdiv(N, meta["BLOCK_N"]), n_walks * batch * H)


def launch_forward_walk(x, dt, A, B, dt_bias, seq_idx, initial_states, dt_softplus, dt_min, dt_max, Q, store_states,
                 ready=None, launch_dependents=False, outputs=None, process_dt=None, pdl=False):
    """Launch the dt processing and the forward walk. ready: (B, H, C) int32 zeros, counted up as
    the chunks' states are written; launch_dependents: the next launch is a programmatic dependent
    launch. outputs: (states, final, dt, cs) from _chunk_state_fwd_outputs with dt and cs already
    filled (chunk_scan.py's forward op processes dt in its C B^T launch) unless process_dt; None:
    allocated here. process_dt (default: outputs is None): dt processed by a launch of its own.
    pdl (chunk_scan.FORWARD_PDL): the walk is a programmatic dependent launch after the launch
    before it (the dt processing here, or the caller's), and lets the next one start. Returns states
    (B, C, H, P, N) [empty unless store_states], final (B, H, P, N) fp32, dt (B, H, C, Q) fp32, cs
    (B, H, C, Q) fp32."""
    batch, L, H, P = x.shape
    N = B.shape[3]
    if process_dt is None:
        process_dt = outputs is None
    if outputs is None:
        outputs = _chunk_state_fwd_outputs(x, B, Q, store_states)
    if process_dt:
        n_dt, dt_ptrs, dt_scalars, dt_flags = dt_launch_args(dt, A, dt_bias, dt_softplus, dt_min, dt_max, Q,
                                                             *outputs[2:])
        launch(_dt_fwd_kernel, (n_dt,), *dt_ptrs, *dt_scalars, **dt_flags, LAUNCH_DEPENDENTS=pdl, num_warps=4)
    states, final, dt_out, cs_out = outputs
    ptrs, scalars, flags = _walk_args(x, B, seq_idx, initial_states, Q, states if store_states else final, final,
                                      dt_out, cs_out)
    # The reverse walk's pointers are not read.
    launch(_chunk_state_walks_kernel, _walk_grid(batch, H, P, N, 1), *ptrs, *([x] * 6),
           ready if ready is not None else x, *scalars, **flags, HAS_Z=False, HAS_DFINAL=False,
           STORE_STATES=store_states, FWD=True, REV=False, SIGNAL=ready is not None,
           LAUNCH_DEPENDENTS=launch_dependents, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    return states, final, dt_out, cs_out


# The backward's two walks run in one launch (see _chunk_state_walks_kernel); False launches
# them one after the other (the same kernel with FWD, then with REV), for comparisons.
FUSED_WALKS = True


def _state_walks_bwd_outputs(x, B, Q, rerun=True):
    """(states, dstates, dinit) of the backward's walks, uninitialised; shared with the fake op.
    Without the rerun of the forward walk, states is empty."""
    batch, L, H, P = x.shape
    N = B.shape[3]
    nchunks = cdiv(L, Q)
    dstates = x.new_empty(batch, nchunks, H, P, N, dtype=states_dtype_for(x.dtype))
    dinit = x.new_empty(batch, H, P, N, dtype=torch.float32)
    return torch.empty_like(dstates) if rerun else absent(x), dstates, dinit


@launcher_op("ssd_state_walks_bwd")
def _state_walks_bwd(x: Tensor, B: Tensor, seq_idx: Tensor | None, initial_states: Tensor | None, Q: int,
                     dout: Tensor, z: Tensor | None, C: Tensor, dt: Tensor, cs: Tensor,
                     dfinal: Tensor | None, rerun: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward's walks: the forward walk again for the states between chunks
    (recomputed, not kept from the forward pass; rerun=False: kept, and only the reverse walk
    runs), and the reverse walk for their gradients, both from the forward pass's processed dt
    and cs (B, H, C, Q) fp32. dout, z (B, L, H, P) with x's strides, C with B's. Returns states
    (B, C, H, P, N) (the state entering each chunk; empty without the rerun), dstates
    (B, C, H, P, N) (the gradient wrt the state leaving each chunk) and dinit (B, H, P, N) fp32
    (the gradient wrt the initial state)."""
    batch, L, H, P = x.shape
    N = B.shape[3]
    states, dstates, dinit = _state_walks_bwd_outputs(x, B, Q, rerun)
    rev_ptrs = (dout, z if z is not None else dout, C, dfinal if dfinal is not None else dinit, dstates, dinit, x)
    rev_flags = dict(HAS_Z=z is not None, HAS_DFINAL=dfinal is not None, STORE_STATES=True, SIGNAL=False,
                     LAUNCH_DEPENDENTS=False, PDL=False)
    # Without the rerun the forward walk's pointers are not read; with it, the rerun writes
    # only the states (its final state goes to dinit, which the reverse walk writes after it).
    ptrs, scalars, flags = _walk_args(x, B, seq_idx, initial_states, Q, dstates if not rerun else states, dinit,
                                      dt, cs)
    if not rerun:
        launch(_chunk_state_walks_kernel, _walk_grid(batch, H, P, N, 1), *ptrs, *rev_ptrs, *scalars, **flags,
               **rev_flags, FWD=False, REV=True)
        return states, dstates, dinit
    # One launch unless grid axis 1 (at most 65535 programs) cannot take both walks.
    fused = FUSED_WALKS and 2 * batch * H <= 65535
    grid = _walk_grid(batch, H, P, N, 2 if fused else 1)
    for fwd, rev in ((True, True),) if fused else ((True, False), (False, True)):
        launch(_chunk_state_walks_kernel, grid, *ptrs, *rev_ptrs, *scalars, **flags, **rev_flags, FWD=fwd, REV=rev)
    return states, dstates, dinit


@_state_walks_bwd.register_fake
def _(x, B, seq_idx, initial_states, Q, dout, z, C, dt, cs, dfinal, rerun=True):
    return _state_walks_bwd_outputs(x, B, Q, rerun)
