"""SSD stage 2: C B^T per chunk, the outputs inside each chunk, and the input gradients.

CB[b, c, g] = C_chunk B_chunk^T (Q, Q) is computed once per chunk and group
(the lower triangle only) and shared by the H / G heads of the group: with one
group it would otherwise be recomputed for every head. It is stored in bf16 for
the kernels that only use it as a matrix-product operand (bf16 inputs), and in
fp32 for the backward's decay-gradient pair sums.

Forward, for the rows t of one BLOCK_M block of chunk c and one head h (x (B, L, H, P),
B/C (B, L, G, N), states from chunk_state.py):

    y_t = exp(cs_t) C_t S_{c-1}^T + sum_{s <= t in chunk} CB_ts exp(cs_t - cs_s) dt_s x_s
    out_t = (y_t + D x_t) * silu(z_t)

D and the gate are applied before the single store. With a gate, the pre-gate
value is also stored: the z gradient needs it. Tiles of rows s before the block
(all s < t) split the decay at the block boundary c0, exp(cs_t - cs_s) =
exp(cs_t - c0) exp(c0 - cs_s): a row weight on x_s and a row scale of the sum, so
C B^T goes to the tensor cores as stored and the tile costs no exp per pair (the
loop body: 641 -> 293 sm_90 instructions per thread); the diagonal tile keeps the
exact decay per pair. The dx kernel splits its decays the same way (at its source
block's last row); the W kernel's blocks below the diagonal too, as an fp32 outer
product after the matrix product.
On sm_90+ with whole tiles the forward scan takes its x, C and C B^T tiles by bulk
copies (TMA, tensor descriptors of 2-D views; SCAN_TMA): fewer address instructions and
registers, 5 programs per SM instead of 4.

Backward (dy = dout * silu(z), dS_c the gradient wrt the state leaving chunk c):

    dC_t = exp(cs_t) dy_t S_{c-1} + sum_{s <= t} (dy_t . x_s) exp(cs_t - cs_s) dt_s B_s
    dx_s = dt_s [B_s dS_c^T exp(cs_Q - cs_s) + sum_{t >= s} CB_ts exp(cs_t - cs_s) dy_t] + D dy_s
    dB_s = dt_s [x_s dS_c exp(cs_Q - cs_s) + sum_{t >= s} (dy_t . x_s) exp(cs_t - cs_s) C_t]

B and C are shared by the heads of a group, so the pair terms inside a chunk are
first summed over the group's heads, W_ts = sum_h (dy_t . x_s) exp(cs_t - cs_s) dt_s,
and then dC = W B, dB = W^T C cost two matrix products per chunk and group instead
of per head. Every sum runs in a fixed order (deterministic, no atomics).

The decay gradient needs, per head, sums over the pair terms
M_ts = (dy_t . x_s) CB_ts exp(cs_t - cs_s) dt_s (s < t; other chunks through the
states): by row (rowsum_t) and by column (colsum_s). The dt kernel takes their
difference and cumulative sums inside each chunk, so the pairs inside a chunk
are formed from the fp32 products (CB, dy . x), and the diagonal, which cancels
exactly, is left out of both. It also runs the rest of the dt chain (clamp and
softplus backward, dA and ddt_bias partial sums), so the backward has no torch glue.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import cdiv, ptx_exp2, ptx_math, ptx_sigmoid, sm90, tl, triton, triton_interpret
from mamba_pkg.ops._launch import launch, signature, variant_needed
from mamba_pkg.ops.ssd.chunk_state import (_chunk_state_fwd_outputs, _dot, _dt_rows, _softplus, _state_walks_bwd,
                                            _state_walks_bwd_outputs, block_size, dot_dtype_for, dt_launch_args,
                                            launch_forward_walk)


def _tile_configs():
    """The dx kernel: 4 warps with register caps that let more programs share an SM (offline
    sm_90 compile with Triton 3.6: 212 registers uncapped = 2 programs; 168 = 3, no spill;
    128 = 4, 152 bytes spilled outside the loop), or 8 warps at 128 (2 programs). 8 warps
    uncapped was the slowest on every H100 run (0.92 vs 0.44 ms) and is not offered. The
    loop over later row blocks runs 1.5 times on average: also one stage at 168 (whole tiles:
    1760 instead of 1896 instructions, no spill)."""
    if triton_interpret():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w, num_stages=st, maxnreg=r)
            for w, st, r in ((4, 2, None), (8, 2, 128), (4, 2, 168), (4, 2, 128), (4, 1, 168))]


def _head_loop_configs(fewer_stages=False, capped=False):
    """The kernels whose main loop runs over the heads of a group (many iterations,
    independent loads): three pipeline stages (the pick of every H100 run so far). The
    128-register cap at 8 warps fits two programs per SM without spilling the W kernel.
    fewer_stages adds 2- and 1-stage configs: the dB/dC kernel buffers four (rows, N) or
    (P, N) tiles per stage, and at N=256 three stages need 247 KB of shared memory (H100
    limit 227 KB), so without them no config fits. capped adds 4 warps at 168 registers
    (the W kernel: 3 programs per SM instead of 2 at 216 registers; offline sm_90, Triton
    3.6: no spill, 2336 instead of 2144 instructions at 3 stages)."""
    if triton_interpret():
        return [triton.Config({}, num_warps=4)]
    configs = [(8, 3, None), (4, 3, None), (8, 3, 128)] + ([(8, 2, None), (8, 1, None)] if fewer_stages else []) \
        + ([(4, 3, 168), (4, 2, 168)] if capped else [])
    return [triton.Config({}, num_warps=w, num_stages=st, maxnreg=r) for w, st, r in configs]


def _fwd_block_m():
    """The forward scan's row block (its autotuning configs' BLOCK_M; a chunk shorter than it
    gets one block, _prune_fwd_configs); the tensor descriptors' blocks follow it."""
    return 16 if triton_interpret() else 64


def _fwd_configs():
    """64-row blocks, 4 warps, with register caps for more programs per SM (offline sm_90
    compile with Triton 3.6: 128 registers uncapped and at 128 = 4 programs; at 96 = 5, 56
    bytes spilled outside the loop), and one stage (the loop before the diagonal runs 1.5
    times on average: 1304 instead of 1480 instructions with whole tiles, 128 registers).
    128-row blocks lost on every H100 run: session 4 (4 warps, spilled), session 10 with 8 warps
    (autotuner, main shape: 0.270 ms at one stage capped at 128 registers, 0.375 uncapped (1
    program per SM), 0.287 at two stages, vs 0.229 for 64 rows at one stage); the kernel still
    takes any BLOCK_M. With bulk copies (SCAN_TMA) the tiles need fewer registers: one stage at 96
    registers does not spill (5 programs per SM; the H100's pick, 0.204 vs 0.226 ms uncapped); at 80
    (6 programs per SM, 88 bytes spilled) it was not picked."""
    if triton_interpret():
        return [triton.Config({"BLOCK_M": _fwd_block_m()}, num_warps=4)]
    return [triton.Config({"BLOCK_M": _fwd_block_m()}, num_warps=4, num_stages=st, maxnreg=r)
            for st, r in ((2, None), (2, 128), (2, 96), (1, None), (1, 96))]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Drop row blocks longer than the chunk."""
    Q = kwargs["Q"]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= Q] or [triton.Config({"BLOCK_M": Q}, num_warps=4)]


# Not keyed on H or L: one tuning per head shape serves every model width and length.
# Nor on DOT_DTYPE: the autotuner adds the tensors' dtypes to the key, and a tl.dtype
# in the key breaks TRITON_CACHE_AUTOTUNING (it is not JSON-serialisable).
_KEY = ["P", "N", "Q", "HAS_SEQ_IDX", "HAS_Z"]


@triton.jit
def _block_pair(G, nchunks, Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """(t block, s block, batch-chunk-group index, group, chunk, batch) of a program of a
    1-D grid over the block pairs of every chunk and group (grid axes 1 and 2 allow at most
    65535 programs); the pairs of one chunk are neighbours."""
    n_mblocks = Q // BLOCK_M
    i_t = tl.program_id(0) % n_mblocks
    i_s = (tl.program_id(0) // n_mblocks) % n_mblocks
    i_bcg = tl.program_id(0) // (n_mblocks * n_mblocks)
    return i_t, i_s, i_bcg, i_bcg % G, (i_bcg // G) % nchunks, i_bcg // (G * nchunks)


@triton.jit
def _cb_tile(
    B_ptr, C_ptr, cb_ptr, cb2_ptr, L, N, G, nchunks,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    TWO_COPIES: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    i_t, i_s, i_bcg, i_g, i_c, i_b = _block_pair(G, nchunks, Q, BLOCK_M)
    if i_s <= i_t:  # the upper triangle is never read
        o_t = i_t * BLOCK_M + tl.arange(0, BLOCK_M)
        o_s = i_s * BLOCK_M + tl.arange(0, BLOCK_M)
        o_lt = i_c * Q + o_t
        o_ls = i_c * Q + o_s
        o_n = tl.arange(0, BLOCK_N)
        m_n = o_n < N
        base = i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g
        b_C = tl.load(C_ptr + base + o_lt.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n,
                      mask=(o_lt < L)[:, None] & m_n[None, :], other=0.0)
        b_B = tl.load(B_ptr + base + o_ls.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n,
                      mask=(o_ls < L)[:, None] & m_n[None, :], other=0.0)
        cb = _dot(b_C, tl.trans(b_B), DOT_DTYPE)
        cb_off = i_bcg.to(tl.int64) * Q * Q + o_t[:, None] * Q + o_s[None, :]
        tl.store(cb_ptr + cb_off, cb.to(cb_ptr.dtype.element_ty))
        if TWO_COPIES:
            tl.store(cb2_ptr + cb_off, cb.to(cb2_ptr.dtype.element_ty))


@triton.jit
def _bmm_chunk_kernel(
    B_ptr, C_ptr, cb_ptr, cb2_ptr, dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cs_out_ptr,
    L, N, G, nchunks, n_cb_programs,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    H, dt_min, dt_max, stride_dt_b, stride_dt_l, stride_dt_h,
    TWO_COPIES: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, WITH_DT: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_DT_LIMIT: tl.constexpr, PTX: tl.constexpr, BLOCK_H: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
    JOIN: tl.constexpr,
):
    """C B^T tiles; WITH_DT: the programs after the first n_cb_programs process dt instead
    (chunk_state._dt_rows), one launch fewer before the walk. LAUNCH_DEPENDENTS (a programmatic
    dependent launch follows): the next launch may start once every program has started. JOIN (this
    launch is a programmatic dependent launch that reads nothing its predecessor writes, FORWARD_PDL 2):
    program 0 waits for the predecessor at its end, so that this launch completes after it (the
    launch after this one waits for this one only)."""
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    if WITH_DT:
        if tl.program_id(0) >= n_cb_programs:
            _dt_rows(tl.program_id(0) - n_cb_programs, dt_ptr, A_ptr, dt_bias_ptr, dt_out_ptr, cs_out_ptr, L, H,
                     nchunks, dt_min, dt_max, stride_dt_b, stride_dt_l, stride_dt_h, HAS_DT_BIAS, DT_SOFTPLUS,
                     HAS_DT_LIMIT, PTX, Q, BLOCK_H)
        else:
            _cb_tile(B_ptr, C_ptr, cb_ptr, cb2_ptr, L, N, G, nchunks, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
                     TWO_COPIES, Q, BLOCK_M, BLOCK_N, DOT_DTYPE)
    else:
        _cb_tile(B_ptr, C_ptr, cb_ptr, cb2_ptr, L, N, G, nchunks, stride_B_b, stride_B_l, stride_B_g, stride_B_n,
                 TWO_COPIES, Q, BLOCK_M, BLOCK_N, DOT_DTYPE)
    if JOIN:
        if tl.program_id(0) == 0:
            tl.extra.cuda.gdc_wait()


def _cb_operand_dtype(dot_dtype):
    """Storage dtype of C B^T where it only feeds a matrix product (forward scan, dx): bf16
    for bf16 inputs. Those kernels read each tile once per head of the group, most of their
    bytes, and round the scores to bf16 for the tensor cores anyway. The W kernel's
    decay-gradient pair sums read an fp32 copy."""
    return torch.bfloat16 if dot_dtype == tl.bfloat16 else torch.float32


def _bmm_chunk(B, C, Q, dot_dtype, dtypes=(torch.float32,), stream=None, dt_job=None, pdl=0):
    """CB (B, C, G, Q, Q), lower block triangle filled: one tensor per entry of `dtypes`
    (one or two dtypes; the same tensor twice when they are equal). Allocated on the current
    stream, launched on `stream` (None: the current one). dt_job: the arguments of
    chunk_state.dt_launch_args, whose dt processing then runs in the same launch. pdl (sm_90+):
    1 = the first launch of a programmatic dependent launch chain (lets the next one start),
    2 = a programmatic dependent launch beside its predecessor (FORWARD_PDL 2; see JOIN)."""
    batch, L, G, N = B.shape
    nchunks = cdiv(L, Q)
    cbs = [torch.empty(batch, nchunks, G, Q, Q, device=B.device, dtype=dt) for dt in dict.fromkeys(dtypes)]
    BLOCK_M = _pick_block_m(Q)
    n_cb = batch * nchunks * G * (Q // BLOCK_M) ** 2
    if dt_job is not None:
        n_dt, dt_ptrs, dt_scalars, dt_flags = dt_launch_args(*dt_job)
        dt_scalars = dt_scalars[1:2] + dt_scalars[3:]  # (H, dt_min, dt_max, strides): L and nchunks are here
    else:
        n_dt, dt_ptrs, dt_scalars = 0, (B,) * 5, (1, 0.0, 0.0, 0, 0, 0)
        dt_flags = dict(HAS_DT_BIAS=False, DT_SOFTPLUS=False, HAS_DT_LIMIT=False, PTX=False, BLOCK_H=16)
    with torch.cuda.stream(stream):
        launch(_bmm_chunk_kernel, (n_cb + n_dt,), B, C, cbs[0], cbs[-1], *dt_ptrs, L, N, G, nchunks, n_cb,
               *B.stride(), *dt_scalars, TWO_COPIES=len(cbs) == 2, Q=Q, BLOCK_M=BLOCK_M, BLOCK_N=block_size(N),
               DOT_DTYPE=dot_dtype, WITH_DT=dt_job is not None, **{k: v for k, v in dt_flags.items() if k != "Q"},
               LAUNCH_DEPENDENTS=pdl > 0, JOIN=pdl == 2, num_warps=4, **({"launch_pdl": True} if pdl == 2 else {}))
    return [cbs[0] if dt == dtypes[0] else cbs[-1] for dt in dtypes]


@triton.autotune(configs=_fwd_configs(), key=_KEY + ["TMA"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, z_ptr, C_ptr, cb_ptr, D_ptr, seq_idx_ptr, dt_ptr, cs_ptr, states_ptr, out_ptr, ypre_ptr, ready_ptr,
    x_desc, C_desc, cb_desc, out_desc, ypre_desc,
    L, H, P, N, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_seq_b, stride_seq_l,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PTX: tl.constexpr, WAIT_READY: tl.constexpr, USE_PDL: tl.constexpr,
    EVEN: tl.constexpr, TMA: tl.constexpr, PDL_WAIT: tl.constexpr,
):
    # TMA (whole tiles): the x, C and C B^T tiles that feed the matrix products arrive by bulk
    # copies (Hopper's TMA: straight to shared memory, no per-element addresses in registers) and
    # out / y_pre leave by them, through the *_desc tensor descriptors of 2-D views
    # (_scan_descriptors). Without TMA the *_desc arguments are unused (0).
    # Heads vary fastest so that the heads of one chunk run together and share
    # its C B^T tiles through L2. A 1-D grid: axes 1 and 2 allow at most 65535 programs.
    i_h = tl.program_id(0) % H
    i_m = (tl.program_id(0) // H) % (Q // BLOCK_M)
    i_bc = tl.program_id(0) // (H * (Q // BLOCK_M))
    if WAIT_READY:
        # Chunk before batch: the walk beside this kernel finishes the chunks in order.
        batch = tl.num_programs(0) // (H * (Q // BLOCK_M) * nchunks)
        i_b = i_bc % batch
        i_c = i_bc // batch
    else:
        i_b = i_bc // nchunks
        i_c = i_bc % nchunks
    G = H // heads_per_group
    if WAIT_READY:
        # The walk (launched just before, programmatic dependent launch) may still run: wait
        # until its programs have written this chunk's state, dt and cumsum (P * N entries
        # counted; more after the walk's autotuning runs). The walk's programs all started
        # before this kernel could, so they finish. After a bounded wait (a safety net), or
        # for the last chunk (so that this kernel's end implies the walk's, whose final state
        # later kernels read), wait for the whole walk.
        p_ready = ready_ptr + (i_b * H + i_h) * nchunks + i_c
        spins = 0
        while (tl.atomic_add(p_ready, 0, sem="acquire", scope="gpu") < P * N) & (spins < 1 << 20):
            spins += 1
        if USE_PDL:
            if (spins >= 1 << 20) | (i_c == nchunks - 1):
                tl.extra.cuda.gdc_wait()
        tl.debug_barrier()
    if PDL_WAIT:
        # A programmatic dependent launch (FORWARD_PDL): the walk and C B^T before it may still run.
        tl.extra.cuda.gdc_wait()
    i_g = i_h // heads_per_group
    o_p = tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p = (o_p < P) | EVEN  # EVEN: constant masks, unmasked loads
    m_n = (o_n < N) | EVEN
    o_t = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the chunk
    o_lt = i_c * Q + o_t
    m_t = (o_lt < L) | EVEN
    chunk_off = ((i_b * H + i_h) * nchunks + i_c).to(tl.int64) * Q
    CACHE: tl.constexpr = ".cg" if WAIT_READY else ""
    # Log-decays in log2 units (one exp2 instruction each).
    # Written by the walk while this kernel may run: read from L2 (.cg), not a stale L1 line.
    cs_t = tl.load(cs_ptr + chunk_off + o_t, cache_modifier=CACHE) * 1.4426950408889634
    # c0: the cumulative log-decay at the last row before this block. For a row t of the
    # block and a row s before it, exp(cs_t - cs_s) = exp2(cs_t - c0) exp2(c0 - cs_s), and
    # cs is monotone along the chunk (dt >= 0), so c0 lies between the two: each factor
    # lies between 1 and the product (no overflow or underflow the product has not).
    # The tiles before the diagonal then need one exp2 per row and column, not per pair.
    c0 = tl.load(cs_ptr + chunk_off + tl.maximum(i_m * BLOCK_M - 1, 0), cache_modifier=CACHE) * 1.4426950408889634
    c0 = tl.where(i_m == 0, 0.0, c0)
    cb_base = cb_ptr + ((i_b * nchunks + i_c) * G + i_g).to(tl.int64) * Q * Q
    x_base = x_ptr + i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
    C_base = C_ptr + i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g
    out_base = i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
    x_off = o_lt.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
    st_off = ((i_b * nchunks + i_c) * H + i_h).to(tl.int64) * P * N
    seq_base = seq_idx_ptr + i_b.to(tl.int64) * stride_seq_b

    # Descriptor rows: x, out, y_pre (B * L, H * P), C (B * L, G * N), C B^T (B * C * G * Q, Q).
    row_t = i_b * L + i_c * Q + i_m * BLOCK_M
    row_cb = ((i_b * nchunks + i_c) * G + i_g) * Q + i_m * BLOCK_M
    # The state entering the chunk: (P, N), read once per row block.
    b_S = tl.load(states_ptr + st_off + o_p[:, None] * N + o_n[None, :],
                  mask=m_p[:, None] & m_n[None, :], other=0.0, cache_modifier=CACHE)
    if TMA:
        # Each bulk copy waits for its data right after it is issued (Triton 3.6, outside a
        # pipelined loop), so the tiles that go through registers anyway are plain loads issued
        # first, whose latencies overlap with the C copy's: the state, the diagonal C B^T tile,
        # z. (Every tile by bulk copies, the state, z and the diagonal tile too: 108 instead of
        # 128 registers, but 0.351 vs 0.335 ms for the forward at the main shape, H100.)
        cb_diag = tl.load(cb_base + o_t[:, None] * Q + o_t[None, :])
        if HAS_Z:
            b_z = tl.load(z_ptr + out_base + x_off)
        b_C = C_desc.load([row_t, i_g * N])
    else:
        b_C = tl.load(C_base + o_lt.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n,
                      mask=m_t[:, None] & m_n[None, :], other=0.0)
    # State term exp(cs_t) C_t S^T = exp2(cs_t - c0) [exp2(c0) C_t S^T]; the first factor
    # is applied with the tiles before the diagonal, below.
    scale_t = tl.zeros((BLOCK_M,), dtype=tl.float32) + ptx_exp2(c0, PTX)
    if HAS_SEQ_IDX:
        seq_t = tl.load(seq_base + o_lt.to(tl.int64) * stride_seq_l, mask=m_t, other=-1)
        seq_prev = tl.load(seq_base + tl.maximum(i_c * Q - 1, 0).to(tl.int64) * stride_seq_l)
        scale_t = tl.where(seq_t == seq_prev, scale_t, 0.0)
    acc = _dot(b_C, tl.trans(b_S), DOT_DTYPE) * scale_t[:, None]

    # The tiles before the diagonal: sum_s CB_ts exp2(c0 - cs_s) dt_s x_s, with the row
    # weights on x (C B^T goes to the matrix product as stored). seq_idx is non-decreasing,
    # so a pair s < c0's row < t is in one sequence iff both s and t are in c0's: the mask
    # splits too (a row weight and a row scale; rows t outside c0's sequence have no
    # state term either, as the state entering the chunk precedes c0's row).
    if HAS_SEQ_IDX:
        seq_c0 = tl.load(seq_base + tl.minimum(i_c * Q + tl.maximum(i_m * BLOCK_M - 1, 0), L - 1).to(tl.int64)
                         * stride_seq_l)
    for j in range(i_m):
        o_s = j * BLOCK_M + tl.arange(0, BLOCK_M)
        o_ls = i_c * Q + o_s
        m_s = (o_ls < L) | EVEN
        w_s = ptx_exp2(c0 - tl.load(cs_ptr + chunk_off + o_s, cache_modifier=CACHE) * 1.4426950408889634, PTX) \
            * tl.load(dt_ptr + chunk_off + o_s, cache_modifier=CACHE)
        if HAS_SEQ_IDX:
            seq_s = tl.load(seq_base + o_ls.to(tl.int64) * stride_seq_l, mask=m_s, other=-2)
            w_s = tl.where(seq_s == seq_c0, w_s, 0.0)
        if TMA:
            cb = cb_desc.load([row_cb, j * BLOCK_M])
            b_xs = x_desc.load([i_b * L + i_c * Q + j * BLOCK_M, i_h * P]).to(tl.float32)
        else:
            cb = tl.load(cb_base + o_t[:, None] * Q + o_s[None, :])
            b_xs = tl.load(x_base + o_ls.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p,
                           mask=m_s[:, None] & m_p[None, :], other=0.0).to(tl.float32)
        acc += _dot(cb, b_xs * w_s[:, None], DOT_DTYPE)
    scale_t = ptx_exp2(cs_t - c0, PTX)
    if HAS_SEQ_IDX:
        scale_t = tl.where(seq_t == seq_c0, scale_t, 0.0)
    acc = acc * scale_t[:, None]

    # The diagonal tile (this block's own rows): the exact decay per pair, and D x_t.
    m_tp = m_t[:, None] & m_p[None, :]
    dt_t = tl.load(dt_ptr + chunk_off + o_t, cache_modifier=CACHE)
    if TMA:
        cb = cb_diag.to(tl.float32)
        b_x = x_desc.load([row_t, i_h * P])
    else:
        cb = tl.load(cb_base + o_t[:, None] * Q + o_t[None, :]).to(tl.float32)
        b_x = tl.load(x_base + x_off, mask=m_tp, other=0.0)
    keep = o_t[:, None] >= o_t[None, :]
    if HAS_SEQ_IDX:
        keep = keep & (seq_t[:, None] == seq_t[None, :])
    # Select, not multiply: above the diagonal the decay overflows, and C B^T there was
    # never written.
    scores = tl.where(keep, cb * ptx_exp2(cs_t[:, None] - cs_t[None, :], PTX) * dt_t[None, :], 0.0)
    acc += _dot(scores, b_x, DOT_DTYPE)
    if HAS_D:
        if D_HAS_HDIM:
            acc += b_x.to(tl.float32) * tl.load(D_ptr + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
        else:
            acc += b_x.to(tl.float32) * tl.load(D_ptr + i_h).to(tl.float32)

    if TMA:
        if HAS_Z:
            ypre_desc.store([row_t, i_h * P], acc.to(ypre_desc.dtype))
            b_z = b_z.to(tl.float32)
            acc = acc * b_z * tl.sigmoid(b_z)
        out_desc.store([row_t, i_h * P], acc.to(out_desc.dtype))
    else:
        if HAS_Z:
            tl.store(ypre_ptr + out_base + x_off, acc.to(ypre_ptr.dtype.element_ty), mask=m_tp)
            b_z = tl.load(z_ptr + out_base + x_off, mask=m_tp, other=0.0).to(tl.float32)
            acc = acc * b_z * tl.sigmoid(b_z)
        tl.store(out_ptr + out_base + x_off, acc.to(out_ptr.dtype.element_ty), mask=m_tp)


def _whole_tiles(L, P, N, Q) -> bool:
    """Whether the tile kernels' row, P and N blocks all lie inside the tensors (whole chunks,
    P and N powers of two): their masks are then constants and the loads unmasked (offline
    sm_90, Triton 3.6: the forward scan 1600 -> 1480 instructions)."""
    return L % Q == 0 and P == block_size(P) and N == block_size(N)


def _pick_block_m(Q):
    return min(Q, 64)


def _scan_outputs(x, z):
    """(out, y_pre) of the chunk scan, uninitialised."""
    # fp32: the z gradient is dout * y_pre * silu'(z), and rounding y_pre would add
    # the storage rounding to it.
    ypre = torch.empty(x.shape, device=x.device, dtype=torch.float32) if z is not None else absent(x)
    return torch.empty_like(x), ypre


def _chunk_scan_fwd_outputs(x, z, B, Q, keep_states):
    """(out, y_pre, final, dt, cs, states) of the forward, uninitialised: the fake op's (the
    real one takes final, dt, cs and the states from the walk)."""
    states, final, dt_c, cs_c = _chunk_state_fwd_outputs(x, B, Q, keep_states)
    return _scan_outputs(x, z) + (final, dt_c, cs_c, states)


# The scan launched beside the walk (programmatic dependent launch on sm_90+; elsewhere, and in
# the interpreter, after it with the same counts and waits), each program waiting for its
# chunk's state. Off: measured slower on an H100 (main shape, CUDA graph: 0.451 vs 0.440 ms with
# the walk's 82 KB steps, which leave room for one scan program per SM). bench_ssd --overlap
# measures it with the walk's lighter configs (see chunk_state._prune_walk_configs).
OVERLAP_WALK = False


# Programmatic dependent launch (PDL, sm_90+) along the forward's launches, each later launch a
# dependent of the one before: its programs may start while its predecessor runs (the predecessor lets
# them at its start, gdc_launch_dependents) and wait (gdc_wait) before they read what it writes; no
# counters (OVERLAP_WALK's). 0: off. 1: C B^T with the dt processing -> walk -> scan. 2: dt processing
# -> walk -> C B^T -> scan: C B^T (no input from the walk) runs beside the walk, whose programs (one per
# SM at the main shape, ~162 KB of shared memory) leave room for it; one C B^T program waits for the walk
# at its end, so that the scan's wait (for C B^T) implies the walk's. H100, same process, CUDA graph
# (session 12), orders 2 / 1 / 0: forward 0.326 / 0.335 / 0.335 ms at B=4 L=8192 H=32 (mamba_ssm 0.662),
# 0.091 / 0.092 / 0.093 at L=2048, 0.146 / 0.148 / 0.149 at B=8 L=2048 H=24; fwd+bwd 1.356 / 1.360 / 1.365
# at L=8192: hiding the launch gaps (order 1) gains nothing, C B^T off the critical path ~9 us. Order 2 is
# one launch more than 1 (host time: +11 us per eager forward on the CPU model of host_ssd.py, ~4x that on
# the H100's host), so eagerly it runs like the bulk copies (_graph_variant): from FORWARD_PDL_EAGER_ROWS
# rows and on the first call of a signature; other eager calls run order 1. The interpreter runs the order
# without PDL; GPUs before sm_90 run 0.
FORWARD_PDL = 2
FORWARD_PDL_EAGER_ROWS = 1 << 22


def _pdl_chain(x) -> bool:
    """Whether the forward's launches on x's device can be chained by programmatic dependent launch."""
    return x.is_cuda and not triton_interpret() and sm90(x.device.index)


def _forward_pdl(x, key) -> tuple[int, bool]:
    """(launch order, whether its launches are chained by PDL) of the forward of x (FORWARD_PDL;
    key: see _graph_variant)."""
    if triton_interpret():
        return FORWARD_PDL, False
    if not FORWARD_PDL or not _pdl_chain(x):
        return 0, False
    if FORWARD_PDL == 2 and not _graph_variant(x, "ssd_forward_order_2", key, FORWARD_PDL_EAGER_ROWS):
        return 1, True
    return FORWARD_PDL, True


# The forward scan's x, C and C B^T tiles by bulk copies (TMA, sm_90+, through Triton's tensor
# descriptors) where every tile lies inside its tensor (_whole_tiles) and the tensors allow 2-D
# views with 16-byte aligned rows; else (and when off) plain loads; same bits either way. H100,
# same process, CUDA graph, forward (session 11, two calls): 0.335-0.338 vs 0.361-0.363 ms at
# B=4 L=8192 H=32, 0.093-0.095 vs 0.099-0.102 at L=2048, 0.149-0.151 vs 0.159-0.160 at B=8 L=2048
# H=24 (the scan alone about 0.204 vs 0.226 ms). The dx and W kernels the same way: no gain (notes).
SCAN_TMA = True
# The descriptors are encoded on the host at every launch (~15 us each on the H100 host: +90 us per
# forward call, session 11 lead diag, eager: B=4 L=2048 H=32 0.28 vs 0.21-0.26 ms, B=8 L=2048 H=24 0.39-0.41
# vs 0.30-0.31, B=4 L=8192 H=32 0.48-0.50 vs 0.37-0.38), while they save ~25 us of GPU time at the main
# shape. So on a GPU the bulk copies are taken while a CUDA graph is captured (the cost paid once), or
# eagerly where the scan has at least SCAN_TMA_EAGER_ROWS (batch * L * heads) rows: there the GPU time
# (~0.33 us per 1024 rows) outgrows the host's. None: never eagerly.
SCAN_TMA_EAGER_ROWS = 1 << 22


def _scan_tma(x, key):
    """Whether the forward scan of x (B, L, H, P) asks for bulk copies: SCAN_TMA and _graph_variant
    (SCAN_TMA_EAGER_ROWS); _scan_descriptors then says whether they apply."""
    return SCAN_TMA and _graph_variant(x, "ssd_chunk_scan_fwd_tma", key, SCAN_TMA_EAGER_ROWS)


def _graph_variant(x, tag, key, eager_rows) -> bool:
    """Whether a forward of x (B, L, H, P) takes a variant that costs host time at every eager call
    and saves GPU time: in the interpreter, off a GPU, while capturing a CUDA graph (the host cost is
    paid once), or eagerly from eager_rows rows (batch * L * heads; None: never). key: a callable
    giving the launch's signature (_launch.signature), computed only for the eager launches below that
    size: the first of a signature (tag: which variant) takes the variant anyway, so that it is
    compiled and tuned before a graph captures it (_launch.variant_needed)."""
    if triton_interpret() or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return True
    if eager_rows is not None and x.shape[0] * x.shape[1] * x.shape[2] >= eager_rows:
        return True
    return variant_needed(tag, key())


@functools.lru_cache(maxsize=None)
def _has_descriptors() -> bool:
    """Whether this Triton has host tensor descriptors (the package allows Triton 3.0, which has not)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _descriptor_class():
    """Triton's host tensor descriptor, made a launch-cache key (ops/_launch.py keys a launch on its
    non-pointer arguments): equal and hashed by what a compiled kernel specialises on (dtype, shape,
    strides, block), its tensor held weakly, so that a cached launch signature keeps no tensor alive.
    The compiled launcher encodes each call's descriptor from the live tensor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    class Descriptor(TensorDescriptor):
        def __init__(self, base, shape, strides, block_shape):
            # Not the dataclass's checks (several us per descriptor on every call): _scan_descriptors
            # checks what the copies need (aligned base and rows, blocks of powers of two <= 256).
            self._base = weakref.ref(base)
            self.shape, self.strides, self.block_shape = shape, strides, block_shape
            self.padding, self.round_f32_to_tf32 = "zero", False
            # Kept from construction: a key's tensor may be gone when later keys are compared.
            self._signature = (base.dtype, tuple(shape), tuple(strides), tuple(block_shape))

        @property
        def base(self):
            return self._base()

        def __eq__(self, other):
            return type(other) is type(self) and self._signature == other._signature

        def __hash__(self):
            return hash(self._signature)

    return Descriptor


def _bulk_copies_apply(L, P, N, Q, views) -> bool:
    """Whether tile kernels may take their tiles by bulk copies from 2-D views of `views`, pairs of
    (tensor, row stride in elements): whole tiles (no block crosses a chunk or a tensor's end, so
    the views need no masks; blocks are powers of two), at most 256 columns (a copy's box), a
    Triton with tensor descriptors, an sm_90+ GPU or the interpreter, 16-byte aligned bases and rows."""
    device = views[0][0].device
    return _whole_tiles(L, P, N, Q) and max(P, N) <= 256 and _has_descriptors() \
        and (triton_interpret() or (device.type == "cuda" and sm90(device.index))) \
        and not any(t.data_ptr() % 16 or (row * t.element_size()) % 16 for t, row in views)


def _group_rows(B):
    """The row stride of B or C (B, L, G, N) as a (B * L, G * N) view, or None where it has none
    (B may be a slice of a wider tensor: its rows need one stride and (G, N) contiguous)."""
    batch, L, G, N = B.shape
    rows = B.stride(1)
    return rows if B.stride(3) == 1 and B.stride(2) == N and (batch == 1 or B.stride(0) == L * rows) else None


def _scan_descriptors(x, z, C, cb, out, ypre, Q):
    """(x, C, C B^T, out, y_pre) as tensor descriptors of 2-D views for the forward scan's bulk
    copies, or None where they do not apply (the plain loads run then): x, out, y_pre (B * L, H * P)
    with (BLOCK_M, P) blocks, C (B * L, G * N) with (BLOCK_M, N) blocks, C B^T (B * C * G * Q, Q) with
    (BLOCK_M, BLOCK_M) blocks."""
    batch, L, H, P = x.shape
    G, N = C.shape[2], C.shape[3]
    c_rows = _group_rows(C)
    views = [(x, H * P), (C, c_rows), (cb, Q), (out, H * P)] + ([(z, H * P), (ypre, H * P)] if z is not None else [])
    if c_rows is None or not _bulk_copies_apply(L, P, N, Q, views):
        return None
    Descriptor = _descriptor_class()
    block_m = min(Q, _fwd_block_m())
    rows = lambda t: Descriptor(t, [batch * L, H * P], [H * P, 1], [block_m, P])  # noqa: E731
    return (rows(x), Descriptor(C, [batch * L, G * N], [c_rows, 1], [block_m, N]),
            Descriptor(cb, [cb.numel() // Q, Q], [Q, 1], [block_m, block_m]), rows(out),
            rows(ypre) if z is not None else 0)


@launcher_op("ssd_chunk_scan_fwd")
def _chunk_scan_fwd(x: Tensor, z: Tensor | None, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                    dt_bias: Tensor | None, seq_idx: Tensor | None, initial_states: Tensor | None, dt_softplus: bool,
                    dt_min: float, dt_max: float, Q: int,
                    keep_states: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass: C B^T with the dt processing, the walk (chunk_state.py), the chunk
    scan (FORWARD_PDL 2: the dt processing, the walk, C B^T beside it, the chunk scan). x, z
    (B, L, H, P) contiguous; returns out (B, L, H, P), y_pre (B, L, H, P) fp32 [empty without z], final
    (B, H, P, N) fp32, dt and cs (B, H, C, Q) fp32 (the processed dt and its cumsum), and with
    keep_states the states entering each chunk (B, C, H, P, N) (else empty).

    C B^T comes first, so that the scan is the launch right after the walk: with OVERLAP_WALK
    the walk lets it start at once (programmatic dependent launch), and each scan program
    waits for the walk's count of its chunk (ready: the walk is a chain of 32 dependent steps
    at the main shape, and the scan's programs of chunk c only need its chunks up to c)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nchunks = cdiv(L, Q)
    dot_dtype = dot_dtype_for(x.dtype)
    walk_outputs = _chunk_state_fwd_outputs(x, B, Q, True)
    wait = OVERLAP_WALK
    seq_strides = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    scalars = (L, H, P, N, H // G, nchunks, *x.stride(), *B.stride(), *seq_strides)
    flags = dict(HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
                 HAS_SEQ_IDX=seq_idx is not None, Q=Q, BLOCK_P=block_size(P), BLOCK_N=block_size(N),
                 DOT_DTYPE=dot_dtype, PTX=ptx_math(_chunk_scan_fwd_kernel.fn), EVEN=_whole_tiles(L, P, N, Q))
    memo = []

    def key():
        """The launch signature of the eager-call policies (_graph_variant: launch order 2, the scan's bulk
        copies), computed at most once per call and only where asked: a superset of what order 2's launches
        and the scan specialise on (the tensors allocated here are fresh, so aligned)."""
        if not memo:
            memo.append(signature(x, z, dt, A, B, C, D, dt_bias, seq_idx, *scalars, *x.shape, *B.shape, *dt.stride(),
                                  *C.stride(), dt_softplus, dt_min, dt_max, FORWARD_PDL, **flags))
        return memo[0]
    order, chain = _forward_pdl(x, key) if not wait else (0, False)
    cb_dtypes = (_cb_operand_dtype(dot_dtype),)
    if order != 2:
        # The dt processing runs in the C B^T launch (its programs after the C B^T tiles).
        (cb,) = _bmm_chunk(B, C, Q, dot_dtype, cb_dtypes, pdl=int(chain),
                           dt_job=(dt, A, dt_bias, dt_softplus, dt_min, dt_max, Q, *walk_outputs[2:]))
    pdl = wait and _pdl_chain(x)
    ready = torch.zeros(batch, H, nchunks, device=x.device, dtype=torch.int32) if wait else None
    states, final, dt_c, cs_c = launch_forward_walk(x, dt, A, B, dt_bias, seq_idx, initial_states, dt_softplus,
                                                    dt_min, dt_max, Q, True, ready, pdl, walk_outputs,
                                                    process_dt=order == 2, pdl=chain)
    if order == 2:
        (cb,) = _bmm_chunk(B, C, Q, dot_dtype, cb_dtypes, pdl=2 if chain else 0)
    out, ypre = _scan_outputs(x, z)
    grid = lambda meta: (H * (Q // meta["BLOCK_M"]) * batch * nchunks,)
    seq_arg = seq_idx if seq_idx is not None else cs_c
    tensors = (x, z if z is not None else x, C, cb, D if D is not None else cs_c, seq_arg, dt_c, cs_c, states, out,
               ypre if z is not None else out, ready if wait else out)
    descriptors = None
    if not wait and _scan_tma(x, key):
        descriptors = _scan_descriptors(x, z, C, cb, out, ypre, Q)
    launch(_chunk_scan_fwd_kernel, grid, *tensors, *(descriptors or (0,) * 5), *scalars, **flags, WAIT_READY=wait,
           USE_PDL=pdl, PDL_WAIT=chain, **({"launch_pdl": True} if pdl or chain else {}), TMA=descriptors is not None)
    return out, ypre, final, dt_c, cs_c, states if keep_states else absent(x)


@_chunk_scan_fwd.register_fake
def _(x, z, dt, A, B, C, D, dt_bias, seq_idx, initial_states, dt_softplus, dt_min, dt_max, Q, keep_states=False):
    return _chunk_scan_fwd_outputs(x, z, B, Q, keep_states)


@triton.jit
def _load_dy(dout_base, z_base, x_off, mask, HAS_Z: tl.constexpr):
    dy = tl.load(dout_base + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_base + x_off, mask=mask, other=0.0).to(tl.float32)
        dy = dy * zz * tl.sigmoid(zz)
    return dy


@triton.autotune(configs=_head_loop_configs(capped=True), key=[k for k in _KEY if k != "N"])
@triton.jit
def _chunk_scan_bwd_w_kernel(
    x_ptr, dout_ptr, z_ptr, cb_ptr, seq_idx_ptr, dt_ptr, cs_ptr, w_ptr, rowsum_ptr, colsum_ptr,
    L, H, P, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_seq_b, stride_seq_l,
    HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, DOT_DTYPE: tl.constexpr, PTX: tl.constexpr,
    EVEN: tl.constexpr,
):
    # One program per (t block, s block <= t block) of a chunk and group; the
    # loop over the group's heads is the long, pipelined loop. Blocks below the diagonal
    # block and the diagonal block have loops of their own (no pair masks below it).
    G = H // heads_per_group
    i_t, i_s, i_bcg, i_g, i_c, i_b = _block_pair(G, nchunks, Q, BLOCK_M)
    if i_s < i_t:
        _w_heads(x_ptr, dout_ptr, z_ptr, cb_ptr, seq_idx_ptr, dt_ptr, cs_ptr, w_ptr, rowsum_ptr, colsum_ptr,
                 i_t, i_s, i_bcg, i_g, i_c, i_b, L, H, P, heads_per_group, nchunks,
                 stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_seq_b, stride_seq_l,
                 HAS_Z, HAS_SEQ_IDX, Q, BLOCK_M, BLOCK_P, DOT_DTYPE, PTX, EVEN, True)
    elif i_s == i_t:
        _w_heads(x_ptr, dout_ptr, z_ptr, cb_ptr, seq_idx_ptr, dt_ptr, cs_ptr, w_ptr, rowsum_ptr, colsum_ptr,
                 i_t, i_s, i_bcg, i_g, i_c, i_b, L, H, P, heads_per_group, nchunks,
                 stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_seq_b, stride_seq_l,
                 HAS_Z, HAS_SEQ_IDX, Q, BLOCK_M, BLOCK_P, DOT_DTYPE, PTX, EVEN, False)


@triton.jit
def _w_heads(
    x_ptr, dout_ptr, z_ptr, cb_ptr, seq_idx_ptr, dt_ptr, cs_ptr, w_ptr, rowsum_ptr, colsum_ptr,
    i_t, i_s, i_bcg, i_g, i_c, i_b, L, H, P, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_seq_b, stride_seq_l,
    HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, DOT_DTYPE: tl.constexpr, PTX: tl.constexpr,
    EVEN: tl.constexpr, BELOW: tl.constexpr,
):
    """The W tile and the pair sums of one block pair (BELOW: s block < t block, else the
    diagonal block), over the group's heads."""
    n_mblocks = Q // BLOCK_M
    o_p = tl.arange(0, BLOCK_P)
    m_p = (o_p < P) | EVEN
    o_t = i_t * BLOCK_M + tl.arange(0, BLOCK_M)
    o_s = i_s * BLOCK_M + tl.arange(0, BLOCK_M)
    o_lt = i_c * Q + o_t
    o_ls = i_c * Q + o_s
    m_t = (o_lt < L) | EVEN
    m_s = (o_ls < L) | EVEN
    cb_off = i_bcg.to(tl.int64) * Q * Q + o_t[:, None] * Q + o_s[None, :]
    cb = tl.load(cb_ptr + cb_off)
    if HAS_SEQ_IDX:
        seq_base = seq_idx_ptr + i_b.to(tl.int64) * stride_seq_b
        seq_t = tl.load(seq_base + o_lt.to(tl.int64) * stride_seq_l, mask=m_t, other=-1)
        seq_s = tl.load(seq_base + o_ls.to(tl.int64) * stride_seq_l, mask=m_s, other=-2)
    xt_off = o_lt.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
    xs_off = o_ls.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
    w = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    if BELOW:
        # Every s precedes every t: the decay splits at the s block's last row c (as in the
        # forward scan), an outer product of two exp2 vectors applied in fp32 after the
        # product (the operands stay the exact inputs).
        if HAS_SEQ_IDX:
            # The sequence mask splits there too (see the forward scan): both rows in c's sequence.
            seq_c = tl.load(seq_base + tl.minimum(i_c * Q + i_s * BLOCK_M + BLOCK_M - 1, L - 1).to(tl.int64)
                            * stride_seq_l)
            keep_t = seq_t == seq_c
            keep_s = seq_s == seq_c
    else:
        keep = o_t[:, None] >= o_s[None, :]
        if HAS_SEQ_IDX:
            keep = keep & (seq_t[:, None] == seq_s[None, :])
        # The diagonal (s = t) cancels in rowsum - colsum; leave it out of both.
        off_diag = o_t[:, None] > o_s[None, :]
    for hh in range(heads_per_group):
        i_h = i_g * heads_per_group + hh
        head_off = i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
        chunk_off = ((i_b * H + i_h) * nchunks + i_c).to(tl.int64) * Q
        cs_t = tl.load(cs_ptr + chunk_off + o_t) * 1.4426950408889634
        cs_s = tl.load(cs_ptr + chunk_off + o_s) * 1.4426950408889634
        dt_s = tl.load(dt_ptr + chunk_off + o_s)
        dy = _load_dy(dout_ptr + head_off, z_ptr + head_off, xt_off, m_t[:, None] & m_p[None, :], HAS_Z)
        b_xs = tl.load(x_ptr + head_off + xs_off, mask=m_s[:, None] & m_p[None, :], other=0.0)
        if BELOW:
            c = tl.load(cs_ptr + chunk_off + i_s * BLOCK_M + BLOCK_M - 1) * 1.4426950408889634
            decay_t = ptx_exp2(cs_t - c, PTX)
            decay_s = ptx_exp2(c - cs_s, PTX) * dt_s
            if HAS_SEQ_IDX:
                decay_t = tl.where(keep_t, decay_t, 0.0)
                decay_s = tl.where(keep_s, decay_s, 0.0)
            decay = decay_t[:, None] * decay_s[None, :]
        else:
            decay = tl.where(keep, ptx_exp2(cs_t[:, None] - cs_s[None, :], PTX), 0.0) * dt_s[None, :]
        w_h = _dot(dy, tl.trans(b_xs), DOT_DTYPE) * decay
        w += w_h
        if BELOW:
            pair = w_h * cb
        else:
            pair = tl.where(off_diag, w_h * cb, 0.0)
        # Slot = the other block: each (head, chunk, block, slot) is written by one
        # program; slots of pairs that do not exist (s block > t block) are never
        # written, and the dt kernel masks them out.
        part = chunk_off * n_mblocks
        tl.store(rowsum_ptr + part + i_s * Q + o_t, tl.sum(pair, axis=1))
        tl.store(colsum_ptr + part + i_t * Q + o_s, tl.sum(pair, axis=0))
    tl.store(w_ptr + cb_off, w)


@triton.autotune(configs=_head_loop_configs(fewer_stages=True), key=_KEY + ["BLOCK_N"])
@triton.jit
def _chunk_scan_bwd_dbc_kernel(
    x_ptr, dout_ptr, z_ptr, B_ptr, C_ptr, w_ptr, seq_idx_ptr, dt_ptr, cs_ptr, states_ptr, dstates_ptr,
    dB_ptr, dC_ptr, rowsum_state_ptr, ddecay_ptr,
    L, H, P, N, heads_per_group, nchunks, heads_per_prog, split_stride, n_nblocks, slot_stride,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_seq_b, stride_seq_l,
    HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EVEN: tl.constexpr,
):
    # Rows r of one block, columns of one BLOCK_N block of N: dC for r as the target t, dB
    # for r as the source s, in programs of their own (one (rows, N) fp32 accumulator each:
    # about half the registers of both in one program). A 1-D grid with the row blocks of a
    # chunk as neighbours, then dC / dB, then its N blocks.
    n_mblocks = Q // BLOCK_M
    i_m = tl.program_id(0) % n_mblocks
    is_dB = (tl.program_id(0) // n_mblocks) % 2
    i_nb = (tl.program_id(0) // (2 * n_mblocks)) % n_nblocks
    i_prog = tl.program_id(0) // (2 * n_mblocks * n_nblocks)
    G = H // heads_per_group
    n_split = heads_per_group // heads_per_prog
    i_split = i_prog % n_split
    i_bcg = i_prog // n_split
    i_g = i_bcg % G
    i_c = (i_bcg // G) % nchunks
    i_b = i_bcg // (G * nchunks)
    o_p = tl.arange(0, BLOCK_P)
    o_n = i_nb * BLOCK_N + tl.arange(0, BLOCK_N)
    m_p = (o_p < P) | EVEN
    m_n = (o_n < N) | EVEN
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_lr = i_c * Q + o_r
    m_r = (o_lr < L) | EVEN
    group_off = i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g
    rn_off = o_lr.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n
    seq_base = seq_idx_ptr + i_b.to(tl.int64) * stride_seq_b
    # Programs of the first head split add the terms inside the chunk, through W (summed over
    # the group's heads); with several splits each writes its own fp32 partial sum.
    w_base = w_ptr + ((i_b * nchunks + i_c) * G + i_g).to(tl.int64) * Q * Q
    out_off = i_split.to(tl.int64) * split_stride + group_off + rn_off
    xr_off = o_lr.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
    pn_off = o_p[:, None] * N + o_n[None, :]
    m_pn = m_p[:, None] & m_n[None, :]
    # The heads of this program: (batch, head) offsets in x, in the (B, H, C, Q) and in the
    # (B, C, H, P, N) layouts, of its first head; the next ones follow at fixed strides.
    i_h0 = i_g * heads_per_group + i_split * heads_per_prog
    head_off = i_b.to(tl.int64) * stride_x_b + i_h0 * stride_x_h
    chunk_off = ((i_b * H + i_h0) * nchunks + i_c).to(tl.int64) * Q
    st_off = ((i_b * nchunks + i_c) * H + i_h0).to(tl.int64) * P * N
    # The pair sums are partial sums over this N block: one slot of batch * H * nchunks
    # (ddecay) or that times Q (rowsum_state) per block.
    if is_dB == 0:
        _dbc_dC_rows(dout_ptr + head_off, z_ptr + head_off, B_ptr, C_ptr, w_base, cs_ptr + chunk_off,
                     states_ptr + st_off, dC_ptr + out_off, rowsum_state_ptr + i_nb.to(tl.int64) * slot_stride * Q
                     + chunk_off, seq_base, i_m, i_c, L, P, N, nchunks, heads_per_prog, i_split,
                     stride_x_h, stride_B_l, stride_B_n, stride_seq_l,
                     o_n, m_p, m_n, o_r, o_lr, m_r, group_off, rn_off, xr_off, pn_off, m_pn,
                     HAS_Z, HAS_SEQ_IDX, Q, BLOCK_M, DOT_DTYPE, EVEN)
    else:
        _dbc_dB_rows(x_ptr + head_off, C_ptr, w_base, dt_ptr + chunk_off, cs_ptr + chunk_off, states_ptr + st_off,
                     dstates_ptr + st_off, dB_ptr + out_off,
                     ddecay_ptr + i_nb.to(tl.int64) * slot_stride + chunk_off // Q, seq_base,
                     i_m, i_c, L, P, N, nchunks, heads_per_prog, i_split,
                     stride_x_h, stride_B_l, stride_B_n, stride_seq_l,
                     o_n, m_p, m_n, o_r, o_lr, m_r, group_off, rn_off, xr_off, pn_off, m_pn,
                     HAS_SEQ_IDX, Q, BLOCK_M, DOT_DTYPE, EVEN)


@triton.jit
def _dbc_dC_rows(dout_ptr, z_ptr, B_ptr, C_ptr, w_base, cs_ptr, states_ptr, dC_out, rowsum_state_ptr, seq_base,
                 i_m, i_c, L, P, N, nchunks, heads_per_prog, i_split, stride_x_h, stride_B_l, stride_B_n, stride_seq_l,
                 o_n, m_p, m_n, o_r, o_lr, m_r, group_off, rn_off, xr_off, pn_off, m_pn,
                 HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, EVEN: tl.constexpr):
    """dC of the dB/dC kernel's rows (pointers at the program's first head): the state terms
    dC_t += exp(cs_t) dy_t S_{c-1} per head, with each head's pair sums from the entering
    state, rowsum_state_t = <dC_state_t, C_t>, for the decay gradient; then
    dC_t += sum_{s <= t} W_ts B_s."""
    m_rn = m_r[:, None] & m_n[None, :]
    # Kept in its storage dtype through the head loop: the fp32 accumulator and the state
    # term already take most of the registers.
    b_C = tl.load(C_ptr + group_off + rn_off, mask=m_rn, other=0.0)
    start_mask = m_r
    if HAS_SEQ_IDX:
        seq_r = tl.load(seq_base + o_lr.to(tl.int64) * stride_seq_l, mask=m_r, other=-1)
        seq_prev = tl.load(seq_base + tl.maximum(i_c * Q - 1, 0).to(tl.int64) * stride_seq_l)
        start_mask = start_mask & (seq_r == seq_prev)
    dC = tl.zeros((BLOCK_M, o_n.shape[0]), dtype=tl.float32)
    for hh in range(heads_per_prog):
        scale = tl.where(start_mask, tl.exp(tl.load(cs_ptr + hh * nchunks * Q + o_r)), 0.0)
        dy = _load_dy(dout_ptr + hh * stride_x_h, z_ptr + hh * stride_x_h, xr_off, m_r[:, None] & m_p[None, :],
                      HAS_Z)
        b_S = tl.load(states_ptr + hh * P * N + pn_off, mask=m_pn, other=0.0)
        dC_state = _dot(dy, b_S, DOT_DTYPE) * scale[:, None]
        tl.store(rowsum_state_ptr + hh * nchunks * Q + o_r, tl.sum(dC_state * b_C.to(tl.float32), axis=1))
        dC += dC_state
    if i_split == 0:
        for j in range(i_m + 1):
            o_j = j * BLOCK_M + tl.arange(0, BLOCK_M)
            o_lj = i_c * Q + o_j
            b_w = tl.load(w_base + o_r[:, None] * Q + o_j[None, :])
            b_B = tl.load(B_ptr + group_off + o_lj.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n,
                          mask=((o_lj < L) | EVEN)[:, None] & m_n[None, :], other=0.0)
            dC += _dot(b_w, b_B, DOT_DTYPE)
    tl.store(dC_out, dC.to(dC_out.dtype.element_ty), mask=m_rn)


@triton.jit
def _dbc_dB_rows(x_ptr, C_ptr, w_base, dt_ptr, cs_ptr, states_ptr, dstates_ptr, dB_out, ddecay_ptr, seq_base,
                 i_m, i_c, L, P, N, nchunks, heads_per_prog, i_split, stride_x_h, stride_B_l, stride_B_n, stride_seq_l,
                 o_n, m_p, m_n, o_r, o_lr, m_r, group_off, rn_off, xr_off, pn_off, m_pn,
                 HAS_SEQ_IDX: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 EVEN: tl.constexpr):
    """dB of the dB/dC kernel's rows (pointers at the program's first head): the state terms
    dB_s += exp(cs_Q - cs_s) dt_s x_s dS_c per head, and (first row block) each chunk's decay
    gradient through the state it carries across; then dB_s += sum_{t >= s} W_ts C_t."""
    end_mask = m_r
    if HAS_SEQ_IDX:
        seq_r = tl.load(seq_base + o_lr.to(tl.int64) * stride_seq_l, mask=m_r, other=-1)
        seq_prev = tl.load(seq_base + tl.maximum(i_c * Q - 1, 0).to(tl.int64) * stride_seq_l)
        seq_end = tl.load(seq_base + (tl.minimum(i_c * Q + Q, L) - 1).to(tl.int64) * stride_seq_l)
        end_mask = end_mask & (seq_r == seq_end)
        # A sequence that starts inside the chunk carries no state across it.
        keep_decay = seq_prev == seq_end
    dB = tl.zeros((BLOCK_M, o_n.shape[0]), dtype=tl.float32)
    for hh in range(heads_per_prog):
        cs_r = tl.load(cs_ptr + hh * nchunks * Q + o_r)
        total = tl.load(cs_ptr + hh * nchunks * Q + Q - 1)
        b_dS = tl.load(dstates_ptr + hh * P * N + pn_off, mask=m_pn, other=0.0)
        b_x = tl.load(x_ptr + hh * stride_x_h + xr_off, mask=m_r[:, None] & m_p[None, :], other=0.0).to(tl.float32)
        weight = tl.where(end_mask, tl.exp(total - cs_r), 0.0) * tl.load(dt_ptr + hh * nchunks * Q + o_r)
        dB += _dot(b_x * weight[:, None], b_dS, DOT_DTYPE)
        if i_m == 0:
            # Gradient wrt the chunk's total log-decay through exp(total) S_{c-1}: the pairs
            # that cross the whole chunk, <dS_c, S_{c-1}> exp(total) (the dt kernel adds it).
            # Here, not in the dC programs: their accumulator and C tile take more registers.
            b_S = tl.load(states_ptr + hh * P * N + pn_off, mask=m_pn, other=0.0)
            ddecay = tl.sum(tl.sum(b_dS.to(tl.float32) * b_S.to(tl.float32), axis=1), axis=0) * tl.exp(total)
            if HAS_SEQ_IDX:
                ddecay = tl.where(keep_decay, ddecay, 0.0)
            tl.store(ddecay_ptr + hh * nchunks, ddecay)
    if i_split == 0:
        for j in range(i_m, Q // BLOCK_M):
            o_j = j * BLOCK_M + tl.arange(0, BLOCK_M)
            o_lj = i_c * Q + o_j
            # Load the (t, s) tile row-major (coalesced) and transpose in registers.
            b_wT = tl.trans(tl.load(w_base + o_j[:, None] * Q + o_r[None, :]))
            b_Cj = tl.load(C_ptr + group_off + o_lj.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n,
                           mask=((o_lj < L) | EVEN)[:, None] & m_n[None, :], other=0.0)
            dB += _dot(b_wT, b_Cj, DOT_DTYPE)
    tl.store(dB_out, dB.to(dB_out.dtype.element_ty), mask=m_r[:, None] & m_n[None, :])


@triton.autotune(configs=_tile_configs(), key=_KEY)
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, dout_ptr, z_ptr, ypre_ptr, B_ptr, cb_ptr, D_ptr, seq_idx_ptr, dt_ptr, cs_ptr, dstates_ptr,
    dx_ptr, dz_ptr, ddt_ptr, colsum_state_ptr, dD_ptr,
    L, H, P, N, heads_per_group, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_seq_b, stride_seq_l,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PTX: tl.constexpr, EVEN: tl.constexpr,
):
    # One program per (source row block, head, chunk), a 1-D grid (axes 1 and 2 allow
    # at most 65535 programs); the row blocks of a head's chunk are neighbours (they
    # share its dy tiles in L2), then the heads of a chunk (its C B^T tiles).
    i_m = tl.program_id(0) % (Q // BLOCK_M)
    i_bch = tl.program_id(0) // (Q // BLOCK_M)
    i_h = i_bch % H
    i_c = (i_bch // H) % nchunks
    i_b = i_bch // (H * nchunks)
    G = H // heads_per_group
    i_g = i_h // heads_per_group
    n_mblocks = Q // BLOCK_M
    o_p = tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p = (o_p < P) | EVEN
    m_n = (o_n < N) | EVEN
    o_s = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # these rows are the sources s
    o_ls = i_c * Q + o_s
    m_s = (o_ls < L) | EVEN
    m_sp = m_s[:, None] & m_p[None, :]
    group_off = i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g
    head_off = i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h
    chunk_off = ((i_b * H + i_h) * nchunks + i_c).to(tl.int64) * Q
    cb_base = cb_ptr + ((i_b * nchunks + i_c) * G + i_g).to(tl.int64) * Q * Q
    b_B = tl.load(B_ptr + group_off + o_ls.to(tl.int64)[:, None] * stride_B_l + o_n[None, :] * stride_B_n,
                  mask=m_s[:, None] & m_n[None, :], other=0.0)
    end_mask = m_s
    if HAS_SEQ_IDX:
        seq_base = seq_idx_ptr + i_b.to(tl.int64) * stride_seq_b
        seq_s = tl.load(seq_base + o_ls.to(tl.int64) * stride_seq_l, mask=m_s, other=-1)
        seq_end = tl.load(seq_base + (tl.minimum(i_c * Q + Q, L) - 1).to(tl.int64) * stride_seq_l)
        end_mask = end_mask & (seq_s == seq_end)
    xs_off = o_ls.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p
    # Log-decays in log2 units. c1: the cumulative log-decay at this block's last row. For
    # a source s of the block and a later row t (a later block, or the chunk's end),
    # exp(cs_t - cs_s) = exp2(c1 - cs_s) exp2(cs_t - c1), each factor between 1 and the
    # product (cs is monotone), as in the forward scan: a row scale of the sum and row
    # weights on dy, no exp per pair, C B^T to the tensor cores as stored.
    cs_s = tl.load(cs_ptr + chunk_off + o_s) * 1.4426950408889634
    dt_s = tl.load(dt_ptr + chunk_off + o_s)
    c1 = tl.load(cs_ptr + chunk_off + i_m * BLOCK_M + BLOCK_M - 1) * 1.4426950408889634
    total = tl.load(cs_ptr + chunk_off + Q - 1) * 1.4426950408889634
    x_f = tl.load(x_ptr + head_off + xs_off, mask=m_sp, other=0.0).to(tl.float32)
    st_off = ((i_b * nchunks + i_c) * H + i_h).to(tl.int64) * P * N
    b_dS = tl.load(dstates_ptr + st_off + o_p[:, None] * N + o_n[None, :],
                   mask=m_p[:, None] & m_n[None, :], other=0.0)
    dx_state = _dot(b_B, tl.trans(b_dS), DOT_DTYPE)
    scale_s = ptx_exp2(c1 - cs_s, PTX)
    end_scale = tl.where(end_mask, ptx_exp2(total - c1, PTX), 0.0)
    tl.store(colsum_state_ptr + chunk_off + o_s, tl.sum(x_f * dx_state, axis=1) * end_scale * scale_s * dt_s)
    dxc = dx_state * end_scale[:, None]
    # The sequence mask splits as in the forward scan: a pair s <= c1's row < t is in one
    # sequence iff s and t are in c1's (and a source outside it has no end-of-chunk term).
    if HAS_SEQ_IDX:
        # Clamped into the sequence: past L there are no targets, and the chunk's end is L - 1.
        seq_c1 = tl.load(seq_base + tl.minimum(i_c * Q + i_m * BLOCK_M + BLOCK_M - 1, L - 1).to(tl.int64)
                         * stride_seq_l)
    for j in range(i_m + 1, n_mblocks):
        o_t = j * BLOCK_M + tl.arange(0, BLOCK_M)
        o_lt = i_c * Q + o_t
        m_t = (o_lt < L) | EVEN
        w_t = ptx_exp2(tl.load(cs_ptr + chunk_off + o_t) * 1.4426950408889634 - c1, PTX)
        if HAS_SEQ_IDX:
            seq_t = tl.load(seq_base + o_lt.to(tl.int64) * stride_seq_l, mask=m_t, other=-2)
            w_t = tl.where(seq_t == seq_c1, w_t, 0.0)
        dy_t = _load_dy(dout_ptr + head_off, z_ptr + head_off,
                        o_lt.to(tl.int64)[:, None] * stride_x_l + o_p[None, :] * stride_x_p,
                        m_t[:, None] & m_p[None, :], HAS_Z)
        cbT = tl.trans(tl.load(cb_base + o_t[:, None] * Q + o_s[None, :]))  # (s, t)
        dxc += _dot(cbT, dy_t * w_t[:, None], DOT_DTYPE)
    if HAS_SEQ_IDX:
        scale_s = tl.where(seq_s == seq_c1, scale_s, 0.0)
    dxc = dxc * scale_s[:, None]

    # The diagonal tile (t in this block): the exact decay per pair. Its dy rows are the
    # sources' own (D and dD below).
    do = tl.load(dout_ptr + head_off + xs_off, mask=m_sp, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + head_off + xs_off, mask=m_sp, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zz)
        dy_s = do * zz * sig
    else:
        dy_s = do
    cbT = tl.trans(tl.load(cb_base + o_s[:, None] * Q + o_s[None, :]).to(tl.float32))  # (s, t)
    keep = o_s[None, :] >= o_s[:, None]
    if HAS_SEQ_IDX:
        keep = keep & (seq_s[None, :] == seq_s[:, None])
    dxc += _dot(tl.where(keep, cbT * ptx_exp2(cs_s[None, :] - cs_s[:, None], PTX), 0.0), dy_s, DOT_DTYPE)
    # Gradient wrt the processed dt through the input term dt_s x_s (the dt kernel adds the rest).
    tl.store(ddt_ptr + chunk_off + o_s, tl.sum(dxc * x_f, axis=1))

    if HAS_Z:
        yp = tl.load(ypre_ptr + head_off + xs_off, mask=m_sp, other=0.0).to(tl.float32)
        dz = do * yp * sig * (1.0 + zz * (1.0 - sig))
        tl.store(dz_ptr + head_off + xs_off, dz.to(dz_ptr.dtype.element_ty), mask=m_sp)
    dx = dxc * dt_s[:, None]
    if HAS_D:
        if D_HAS_HDIM:
            b_D = tl.load(D_ptr + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
            dx += dy_s * b_D[None, :]
        else:
            dx += dy_s * tl.load(D_ptr + i_h).to(tl.float32)
        # Partial sums of dy * x per (chunk, row block, head), reduced by the launcher.
        dD_off = (((i_b * nchunks + i_c) * n_mblocks + i_m) * H + i_h).to(tl.int64) * P
        tl.store(dD_ptr + dD_off + o_p, tl.sum(dy_s * x_f, axis=0), mask=m_p)
    tl.store(dx_ptr + head_off + xs_off, dx.to(dx_ptr.dtype.element_ty), mask=m_sp)


@triton.jit
def _dt_bwd_kernel(
    row_part_ptr, col_part_ptr, rowsum_state_ptr, colsum_state_ptr, ddecay_ptr, ddt_ptr, dt_ptr, A_ptr,
    dt_raw_ptr, dt_bias_ptr, ddt_raw_ptr, sums_ptr, dB_part_ptr, dC_part_ptr, dB_ptr, dC_ptr,
    L, H, N, heads_per_group, nchunks, n_split, split_stride, n_nblocks, slot_stride, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_ddt_b, stride_ddt_l, stride_ddt_h,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, HAS_SPLIT: tl.constexpr,
    PTX: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The dt chain of one chunk and head (program order = the (B, H, C) layout).

    Decay gradient of step k (the log-decay dt_k A), from the pair sums of the other kernels:
        ddA_k = sum_{j >= k} (rowsum_j - colsum_j) + sum_{j < k} colsum_state_j + ddecay
    (rowsum_j: pairs ending at j inside the chunk and from the entering state; colsum_j:
    pairs starting at j inside the chunk; colsum_state_j: pairs from j to later chunks;
    ddecay: pairs crossing the whole chunk). Only sums inside one chunk: a cumulative sum
    over the whole sequence would cancel two large sums and lose the precision. Then
    ddt_k = ddt_in_k + ddA_k A through the clamp and softplus, and partial sums of dA and
    ddt_bias for the launcher.

    With a head split in the dB/dC kernel, the programs of a group's heads also sum its
    fp32 dB/dC partials, ROWS rows of the chunk each (no extra launch, no torch sums).
    """
    i_bhc = tl.program_id(0)
    i_c = i_bhc % nchunks
    i_h = (i_bhc // nchunks) % H
    i_b = i_bhc // (nchunks * H)
    chunk_off = i_bhc.to(tl.int64) * Q
    o_q = tl.arange(0, Q)
    # Pair sums by slot (the other block of the pair): row sums come from source blocks
    # <= the row's block, column sums from target blocks >= it; other slots are never written.
    o_slot = tl.arange(0, Q // BLOCK_M)
    slot_off = chunk_off * (Q // BLOCK_M) + o_slot[:, None] * Q + o_q[None, :]
    blk = (o_q // BLOCK_M)[None, :]
    rows = tl.sum(tl.load(row_part_ptr + slot_off, mask=o_slot[:, None] <= blk, other=0.0), axis=0)
    cols = tl.sum(tl.load(col_part_ptr + slot_off, mask=o_slot[:, None] >= blk, other=0.0), axis=0)
    # The dB/dC kernel's sums come in n_nblocks partials (its N blocks), slot_stride chunks apart.
    rowsum_state = tl.zeros((Q,), dtype=tl.float32)
    ddecay = 0.0
    for k in range(n_nblocks):
        rowsum_state += tl.load(rowsum_state_ptr + k * slot_stride * Q + chunk_off + o_q)
        ddecay += tl.load(ddecay_ptr + k * slot_stride + i_bhc)
    diff = rowsum_state + rows - cols
    state_cols = tl.load(colsum_state_ptr + chunk_off + o_q)
    ddA = tl.cumsum(diff, axis=0, reverse=True) + (tl.cumsum(state_cols, axis=0) - state_cols) + ddecay

    o_l = i_c * Q + o_q
    m_l = o_l < L
    dt = tl.load(dt_ptr + chunk_off + o_q)
    A = tl.load(A_ptr + i_h).to(tl.float32)
    grad = tl.load(ddt_ptr + chunk_off + o_q) + ddA * A
    v = tl.load(dt_raw_ptr + i_b.to(tl.int64) * stride_dt_b + o_l.to(tl.int64) * stride_dt_l + i_h * stride_dt_h,
                mask=m_l, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        v += tl.load(dt_bias_ptr + i_h).to(tl.float32)
    if DT_SOFTPLUS:
        # torch's softplus: the identity above 20, with derivative 1 there.
        grad = grad * tl.where(v > 20.0, 1.0, ptx_sigmoid(v, PTX))
        v = _softplus(v, PTX)
    if HAS_DT_LIMIT:
        grad = tl.where((v >= dt_min) & (v <= dt_max), grad, 0.0)
    grad = tl.where(m_l, grad, 0.0)
    tl.store(ddt_raw_ptr + i_b.to(tl.int64) * stride_ddt_b + o_l.to(tl.int64) * stride_ddt_l + i_h * stride_ddt_h,
             grad.to(ddt_raw_ptr.dtype.element_ty), mask=m_l)
    # Partial sums per (batch, chunk, head): [dA, ddt_bias].
    sums_off = ((i_b * nchunks + i_c) * H + i_h).to(tl.int64) * 2
    tl.store(sums_ptr + sums_off, tl.sum(tl.where(m_l, ddA * dt, 0.0), axis=0))
    tl.store(sums_ptr + sums_off + 1, tl.sum(grad, axis=0))

    if HAS_SPLIT:
        i_g = i_h // heads_per_group
        o_r = i_c * Q + (i_h % heads_per_group) * ROWS + tl.arange(0, ROWS)
        o_n = tl.arange(0, BLOCK_N)
        m_rn = ((o_r < L) & (o_r < i_c * Q + Q))[:, None] & (o_n < N)[None, :]
        # Each split's partial has B's strides, as the outputs (split_stride elements apart).
        out_off = (i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g + o_r.to(tl.int64)[:, None] * stride_B_l
                   + o_n[None, :] * stride_B_n)
        acc_B = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        acc_C = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        p_B = dB_part_ptr + out_off
        p_C = dC_part_ptr + out_off
        for _ in range(n_split):
            acc_B += tl.load(p_B, mask=m_rn, other=0.0)
            acc_C += tl.load(p_C, mask=m_rn, other=0.0)
            p_B += split_stride
            p_C += split_stride
        tl.store(dB_ptr + out_off, acc_B.to(dB_ptr.dtype.element_ty), mask=m_rn)
        tl.store(dC_ptr + out_off, acc_C.to(dC_ptr.dtype.element_ty), mask=m_rn)


# The dB/dC kernel's N block: a whole N up to 256 per program (its two (rows, N) fp32
# accumulators fill the registers there); a wider N is split over programs, each reading
# the dy and x tiles again and writing partial pair sums. At N=128 on an H100, N in 2 or 4
# blocks was 0.06-0.2 ms slower than one (see _head_split).
DBC_BLOCK_N = 256


def _head_split(heads_per_group, programs, target=512):
    """How many programs share the heads of one group: enough programs to fill the GPU,
    a divisor of heads_per_group (each extra split costs an fp32 dB/dC partial, written by
    the dB/dC kernel and read by the dt kernel). On an H100 at the main shape (512 programs
    without a split) the four backward tile kernels took 1.045 ms unsplit, 1.119 with 4
    splits (the old 2048-program target), 1.10-1.24 with N split in 2 or 4 blocks."""
    want = max(1, target // max(programs, 1))
    return max(d for d in range(1, heads_per_group + 1) if heads_per_group % d == 0 and d <= want)


def _chunk_scan_bwd_outputs(x, z, dt, A, B, C, D, dt_bias):
    """(dx, dz, dB, dC, ddt, dA, ddt_bias, dD) of the backward, uninitialised; shared with
    the fake op."""
    dz = torch.empty_like(z) if z is not None else absent(x)
    ddt_bias = torch.empty_like(dt_bias) if dt_bias is not None else absent(x)
    dD = torch.empty_like(D) if D is not None else absent(x)
    return (torch.empty_like(x), dz, torch.empty_like(B), torch.empty_like(C), dt.new_empty(dt.shape),
            torch.empty_like(A), ddt_bias, dD)


def _dinit_output(x, B, Q, walks_here):
    """The gradient wrt the initial state (B, H, P, N) fp32 when the backward op runs the walks,
    else empty."""
    return _state_walks_bwd_outputs(x, B, Q)[2] if walks_here else absent(x)


# With the walks inside the backward op, C B^T and the W kernel (which need neither the states
# nor their gradients) run on a side stream beside them. 0: every launch on the current stream.
# 1: C B^T and W beside the walks. 2: also the dB/dC kernel on the side stream (after W and the
# walks), beside the dx kernel (after C B^T and the walks), which then may start while W still
# runs. H100, same process, CUDA graph fwd+bwd (session 10): B=4 L=8192 H=32 1.435 / 1.426 /
# 1.392 ms for 0 / 1 / 2; L=2048 0.441 / 0.441 / 0.412; B=8 L=2048 H=24 0.645 / 0.636 / 0.610.
# 1 gains little there: the reverse walk's pick, (64, 64) blocks at 4 warps (2 programs of 234
# registers per SM), leaves no room beside it, so W mostly runs after it.
BACKWARD_STREAMS = 2


@functools.lru_cache(maxsize=None)
def _side_stream(device_index):
    return torch.cuda.Stream(device_index)


@launcher_op("ssd_chunk_scan_bwd")
def _chunk_scan_bwd(x: Tensor, dout: Tensor, z: Tensor | None, ypre: Tensor | None, dt: Tensor, A: Tensor,
                    B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor | None, seq_idx: Tensor | None,
                    dt_c: Tensor, cs_c: Tensor, states: Tensor | None, dstates: Tensor | None,
                    dt_softplus: bool, dt_min: float, dt_max: float, Q: int,
                    head_split: int = 0, n_blocks: int = 0, initial_states: Tensor | None = None,
                    dfinal: Tensor | None = None,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch C B^T and the four backward kernels. x, dout, z, B, C (B, L, ...) contiguous;
    dt (B, L, H) the raw dt (any strides); states and dstates (B, C, H, P, N) from the walks.
    dstates None: this op runs the walks first (chunk_state._state_walks_bwd: the reverse walk
    from dfinal (B, H, P, N) or zeros, and with states None also the rerun of the forward walk
    from initial_states), with C B^T and kernel 1 beside them on a side stream (CUDA,
    BACKWARD_STREAMS).

    1. W kernel: per (chunk, group, t block, s block <= t block), over the group's
       heads, W_ts = sum_h (dy_t . x_s) exp(cs_t - cs_s) dt_s (B, C, G, Q, Q) fp32,
       and each head's row and column sums of the pair terms W_h * CB.
    2. dB/dC kernel: per (chunk, group, row block, dC or dB): the state terms (a loop
       over heads) plus W B (dC) or W^T C (dB). B and C are shared by the heads of a
       group, so the terms inside a chunk cost two matrix products per group instead of
       per head; and (dB programs) each chunk's decay gradient through the state it
       carries across.
    3. dx kernel: per (chunk, head, row block): dx, dz, the input-term ddt, the state
       column sums, dD partial sums.
    4. dt kernel: per (chunk, head): the decay gradient from the pair sums, the clamp
       and softplus backward, partial sums of dA and ddt_bias (one small launch instead
       of about thirty torch ops).

    Returns dx, dz, dB, dC, ddt (B, L, H) in dt's dtype, dA (H,), ddt_bias (H,), dD (shape
    of D), each in its input's dtype, and dinit (B, H, P, N) fp32 (the gradient wrt the initial
    state); dz, ddt_bias, dD are empty when their input is None, dinit when dstates is given.
    head_split: programs per group in kernel 2 (0: chosen to fill the GPU); n_blocks: its
    blocks of N (0: N / DBC_BLOCK_N; each needs 16 columns or more).
    Deterministic: every sum has a fixed order.
    """
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nchunks = cdiv(L, Q)
    dot_dtype = dot_dtype_for(x.dtype)
    BLOCK_M = _pick_block_m(Q)
    n_mblocks = Q // BLOCK_M
    BLOCK_N = block_size(N)
    seq_arg = seq_idx if seq_idx is not None else cs_c
    seq_strides = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    heads_per_group = H // G
    z_arg = z if z is not None else dout
    common = dict(HAS_SEQ_IDX=seq_idx is not None, HAS_Z=z is not None, Q=Q, BLOCK_M=BLOCK_M,
                  BLOCK_P=block_size(P), DOT_DTYPE=dot_dtype, EVEN=_whole_tiles(L, P, N, Q))
    dx, dz, dB, dC, ddt, dA, ddt_bias, dD = _chunk_scan_bwd_outputs(x, z, dt, A, B, C, D, dt_bias)

    dinit = absent(x)
    side = main = None
    if dstates is None:
        if BACKWARD_STREAMS and x.is_cuda and not triton_interpret():
            # The side stream starts here, before the walks are queued; everything it uses is
            # allocated on the current stream, which waits for it before reading its results.
            side, main = _side_stream(x.device.index), torch.cuda.current_stream(x.device)
            side.wait_stream(main)
        # The op body directly (not a nested op call, which would dispatch again).
        walked, dstates, dinit = _state_walks_bwd._init_fn(x, B, seq_idx, initial_states, Q, dout, z, C, dt_c, cs_c,
                                                           dfinal, states is None)
        states = walked if states is None else states
    cb, cb_operand = _bmm_chunk(B, C, Q, dot_dtype, (torch.float32, _cb_operand_dtype(dot_dtype)), side)
    dbc_stream = side if BACKWARD_STREAMS >= 2 else None
    if dbc_stream is not None:
        main.wait_stream(side)  # the dx kernel reads C B^T
    w = torch.empty_like(cb)
    row_part = torch.empty(batch, H, nchunks, n_mblocks, Q, device=x.device, dtype=torch.float32)
    col_part = torch.empty_like(row_part)
    with torch.cuda.stream(side):
        launch(_chunk_scan_bwd_w_kernel, (batch * nchunks * G * n_mblocks * n_mblocks,),
            x, dout, z_arg, cb, seq_arg, dt_c, cs_c, w, row_part, col_part,
            L, H, P, heads_per_group, nchunks, *x.stride(), *seq_strides, PTX=ptx_math(_chunk_scan_bwd_w_kernel.fn),
            **common,
        )
    if dbc_stream is not None:
        dbc_stream.wait_stream(main)  # the dB/dC kernel reads the walks' dstates
    elif side is not None:
        main.wait_stream(side)

    n_nblocks = n_blocks or max(1, BLOCK_N // DBC_BLOCK_N)
    n_split = head_split or _head_split(heads_per_group, n_mblocks * batch * nchunks * G * n_nblocks)
    heads_per_prog = heads_per_group // n_split
    if n_split > 1:
        dB_part = torch.empty((n_split,) + tuple(B.shape), device=B.device, dtype=torch.float32)
        dC_part = torch.empty_like(dB_part)
    rowsum_state = cs_c.new_empty((n_nblocks,) + tuple(cs_c.shape))
    ddecay = cs_c.new_empty(n_nblocks, batch, H, nchunks)
    with torch.cuda.stream(dbc_stream):
        launch(_chunk_scan_bwd_dbc_kernel, (batch * nchunks * G * n_split * n_nblocks * 2 * n_mblocks,),
            x, dout, z_arg, B, C, w, seq_arg, dt_c, cs_c, states, dstates,
            dB if n_split == 1 else dB_part, dC if n_split == 1 else dC_part, rowsum_state, ddecay,
            L, H, P, N, heads_per_group, nchunks, heads_per_prog, B.numel(), n_nblocks, batch * H * nchunks,
            *x.stride(), *B.stride(), *seq_strides, BLOCK_N=BLOCK_N // n_nblocks, **common,
        )

    ddt_in = torch.empty_like(cs_c)
    colsum_state = torch.empty_like(cs_c)
    dD_part = torch.empty(batch, nchunks, n_mblocks, H, P, device=x.device, dtype=torch.float32) \
        if D is not None else None
    launch(_chunk_scan_bwd_dx_kernel, (batch * nchunks * H * n_mblocks,),
        x, dout, z_arg, ypre if z is not None else dout, B, cb_operand, D if D is not None else cs_c, seq_arg, dt_c,
        cs_c, dstates, dx, dz if z is not None else dx, ddt_in, colsum_state,
        dD_part if dD_part is not None else ddt_in,
        L, H, P, N, heads_per_group, nchunks, *x.stride(), *B.stride(), *seq_strides,
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, BLOCK_N=BLOCK_N,
        PTX=ptx_math(_chunk_scan_bwd_dx_kernel.fn), **common,
    )
    if dbc_stream is not None:
        main.wait_stream(dbc_stream)

    sums = torch.empty(batch, nchunks, H, 2, device=x.device, dtype=torch.float32)
    launch(_dt_bwd_kernel, (batch * H * nchunks,),
        row_part, col_part, rowsum_state, colsum_state, ddecay, ddt_in, dt_c, A,
        dt, dt_bias if dt_bias is not None else A, ddt, sums,
        dB_part if n_split > 1 else dB, dC_part if n_split > 1 else dC, dB, dC,
        L, H, N, heads_per_group, nchunks, n_split, B.numel(), n_nblocks, batch * H * nchunks, float(dt_min),
        float(dt_max),
        *dt.stride(), *ddt.stride(), *dB.stride(),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        HAS_DT_LIMIT=(dt_min, dt_max) != (0.0, float("inf")), HAS_SPLIT=n_split > 1, PTX=ptx_math(_dt_bwd_kernel),
        Q=Q, BLOCK_M=BLOCK_M,
        ROWS=block_size(cdiv(Q, heads_per_group)),
        BLOCK_N=BLOCK_N, num_warps=4,
    )
    sums = sums.view(-1, H, 2)
    _sum_into(dA, sums[:, :, 0], (0,))
    if dt_bias is not None:
        _sum_into(ddt_bias, sums[:, :, 1], (0,))
    if D is not None:
        _sum_into(dD, dD_part.view(-1, H, P), (0, 2) if D.dim() == 1 else (0,))
    return dx, dz, dB, dC, ddt, dA, ddt_bias, dD, dinit


def _sum_into(out, parts, dims):
    """out = parts.sum(dims), one op when out is fp32 like the partial sums."""
    if out.dtype == parts.dtype:
        torch.sum(parts, dim=dims, out=out)
    else:
        out.copy_(parts.sum(dim=dims))


@_chunk_scan_bwd.register_fake
def _(x, dout, z, ypre, dt, A, B, C, D, dt_bias, seq_idx, dt_c, cs_c, states, dstates, dt_softplus,
      dt_min, dt_max, Q, head_split=0, n_blocks=0, initial_states=None, dfinal=None):
    return _chunk_scan_bwd_outputs(x, z, dt, A, B, C, D, dt_bias) + (_dinit_output(x, B, Q, dstates is None),)
