"""The SSM part of one decode step in one kernel: dt projection, softplus, A from A_log,
state update, D skip and z gate (the ops that a mixer's ``step`` runs between the x_proj /
conv and out_proj). Fusing them removes 3-4 launches per layer and token, which is most of
a decode step's time at small batch (benchmarks/notes_decode.md).

For one token, per head h, channel p, state index n (g = group of h):

    dt     = dt_proj_weight @ dt_low           (Mamba-1 low-rank dt; else dt as given)
    dt'    = clamp(softplus(dt + dt_bias), *dt_limit)
    A      = -exp(A_log)
    state  = state * exp(A * dt') + dt' * B[g] * x
    out    = sum_n state * C[g] + D * x,   times silu(z) if z is given

Mamba-1: state (B, D, N); x, z (B, D); dt (B, R) with dt_proj_weight (D, R), or dt (B, D);
         A_log (D, N); B, C (B, N) or (B, G, N); D, dt_bias (D,).
Mamba-2: state (B, H, P, N); x, z (B, H, P); dt (B, H); A_log (H,); B, C (B, G, N);
         D (H,) or (H, P); dt_bias (H,).
The state may be fp32, bf16 or fp16 (math is fp32; the state is rounded once per step).
Inputs may be strided views (e.g. slices of the in_proj / conv outputs): no copies.
split_sum: dt, B, C carry a leading axis S of partial sums (the split-K x_proj of
conv_xproj_step) that the kernel adds while loading them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_pkg.ops._launch import Plan, settings_cache
from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_same_device,
    check_tensor,
    next_pow2,
    ptx_exp2,
    ptx_log2,
    ptx_math,
    ptx_sigmoid,
    resolve_backend,
    tl,
    triton,
)
from mamba_pkg.ops.decode_linear import MAX_ROWS, decode_linear, layout_key, pdl_launch, use_pdl
from mamba_pkg.ops.state_update import _softplus, selective_state_update_ref

NO_DT_LIMIT = (0.0, float("inf"))


def _full_dt(state, x, dt, dt_bias, dt_proj_weight, dt_limit):
    """dt' in fp32, shaped like x."""
    if dt_proj_weight is not None:
        dt = dt.float() @ dt_proj_weight.float().t()  # (B, D)
    elif state.dim() == 4:
        dt = dt.float()[..., None].expand(x.shape)  # (B, H) -> (B, H, P)
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + (dt_bias.float()[:, None] if state.dim() == 4 else dt_bias.float())
    dt = _softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(*dt_limit)
    return dt


def ssm_decode_step_ref(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, dt_proj_weight=None,
                        dt_limit=NO_DT_LIMIT, split_sum=False, norm_weight=None):
    """Torch reference of :func:`ssm_decode_step` (fp32 math; updates ``state`` in place)."""
    if norm_weight is not None:  # (out * norm_weight, per-head sums of squares of out), out in fp32
        out = ssm_decode_step_ref(state, x.float(), dt, A_log, B, C, D, z.float(), dt_bias, dt_proj_weight, dt_limit,
                                  split_sum)
        return (out * norm_weight.float().view(out.shape[1:])).to(x.dtype), out.square().sum(-1)
    if split_sum:
        dt, B, C = dt.float().sum(0), B.float().sum(0), C.float().sum(0)
    dt = _full_dt(state, x, dt, dt_bias, dt_proj_weight, dt_limit)
    A = -torch.exp(A_log.float())
    if state.dim() == 4:
        heads, hdim, n_state = state.shape[1:]
        A = A[:, None, None].expand(heads, hdim, n_state)
        if D is not None and D.dim() == 1:
            D = D[:, None].expand(heads, hdim)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z)


# ---------------------------------------------------------------------------
# Triton kernel. Canonical layout (as in state_update.py): Mamba-1 channels split into
# H = G heads of P = D / G channels. A program owns a (BLOCK_B, BLOCK_P, N) tile: BLOCK_B
# batch rows of a BLOCK_P-channel slice of one head, so that the dt_proj and A tiles it
# loads serve BLOCK_B rows at once (from CUBLAS_DT_BATCH rows on the launcher forms dt with a
# cuBLAS GEMM first, see _launch_config).
# ---------------------------------------------------------------------------


@triton.jit
def _ssm_decode_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, w_ptr, out_ptr, nw_ptr, ss_ptr,
    batch, P, N, R, heads_per_group, dt_min, dt_max, stride_dt_s, stride_B_s, stride_C_s,
    stride_s_b, stride_s_h, stride_s_p, stride_s_n,
    stride_x_b, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h, stride_dt_p,
    stride_A_h, stride_A_p, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_z_b, stride_z_h, stride_z_p,
    stride_dtb_h, stride_dtb_p,
    stride_w_h, stride_w_p, stride_w_r,
    stride_o_b, stride_o_h, stride_o_p, stride_ss_b,
    TIE_HDIM: tl.constexpr, HAS_DT_PROJ: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_DT_LIMIT: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr, PTX: tl.constexpr, STATE_EARLY: tl.constexpr,
    DEPENDENTS_EARLY: tl.constexpr = True, HAS_NORM: tl.constexpr = False,
):
    i_p, i_bb, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_b = i_bb * BLOCK_B + tl.arange(0, BLOCK_B)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_b, m_p, m_n = o_b < batch, o_p < P, o_n < N
    m_bp = m_b[:, None] & m_p[None, :]  # (BLOCK_B, BLOCK_P)
    m_bn = m_b[:, None] & m_n[None, :]  # (BLOCK_B, BLOCK_N)
    o_b = o_b.to(tl.int64)
    i_g = i_h // heads_per_group
    if USE_PDL and DEPENDENTS_EARLY:
        tl.extra.cuda.gdc_launch_dependents()

    # Parameters first: with PDL their loads are in flight while the previous kernel finishes.
    # Exponentials are base 2 (1.4426950408889634 = log2(e), 0.6931471805599453 = ln(2)): b_A holds
    # A * log2(e), so exp(A * dt) = exp2(b_A * dt) with no extra multiply per state element.
    if TIE_HDIM:
        b_A = ptx_exp2(tl.load(A_log_ptr + i_h * stride_A_h).to(tl.float32) * 1.4426950408889634, PTX)
    else:
        p_A = A_log_ptr + i_h * stride_A_h + o_p[:, None] * stride_A_p + o_n[None, :] * stride_A_n
        b_A = ptx_exp2(tl.load(p_A, mask=m_p[:, None] & m_n[None, :], other=0.0).to(tl.float32) * 1.4426950408889634,
                       PTX)  # (BLOCK_P, BLOCK_N)
    b_A = b_A * -1.4426950408889634
    if HAS_DT_PROJ:
        o_r = tl.arange(0, BLOCK_R)
        m_r = o_r < R
        p_w = w_ptr + i_h * stride_w_h + o_p[:, None] * stride_w_p + o_r[None, :] * stride_w_r
        b_w = tl.load(p_w, mask=m_p[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_R)
    if HAS_DT_BIAS:
        if TIE_HDIM:
            b_dt_bias = tl.load(dt_bias_ptr + i_h * stride_dtb_h).to(tl.float32)
        else:
            b_dt_bias = tl.load(dt_bias_ptr + i_h * stride_dtb_h + o_p * stride_dtb_p, mask=m_p,
                                other=0.0).to(tl.float32)[None, :]
    if HAS_D:
        b_D = tl.load(D_ptr + i_h * stride_D_h + o_p * stride_D_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM:  # the norm weight of channels h * P + p (the (H, P) output flattened)
        b_nw = tl.load(nw_ptr + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
    m_state = m_bp[:, :, None] & m_n[None, None, :]
    p_state = (state_ptr + o_b[:, None, None] * stride_s_b + i_h.to(tl.int64) * stride_s_h
               + o_p.to(tl.int64)[None, :, None] * stride_s_p + o_n[None, None, :] * stride_s_n)
    if STATE_EARLY:  # no kernel still running writes the state (state_ready): its DRAM round trip
        b_state = tl.load(p_state, mask=m_state, other=0.0).to(tl.float32)  # overlaps the predecessor
    if USE_PDL:
        tl.extra.cuda.gdc_wait()

    # The loads that do not depend on dt first: their DRAM round trip overlaps the dt math.
    if not STATE_EARLY:
        b_state = tl.load(p_state, mask=m_state, other=0.0).to(tl.float32)
    b_x = tl.load(x_ptr + o_b[:, None] * stride_x_b + i_h * stride_x_h + o_p[None, :] * stride_x_p, mask=m_bp,
                  other=0.0).to(tl.float32)
    # The S split-K partials of B, C (and dt below) as one (BLOCK_S, BLOCK_B, ...) tile summed over
    # S: one load in flight per operand (an unrolled loop of S loads spilled registers at S = 32).
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < SPLITS
    m_sbn = m_s[:, None, None] & m_bn[None, :, :]
    p_B = (B_ptr + o_s[:, None, None] * stride_B_s + o_b[None, :, None] * stride_B_b + i_g * stride_B_g
           + o_n[None, None, :] * stride_B_n)
    p_C = (C_ptr + o_s[:, None, None] * stride_C_s + o_b[None, :, None] * stride_C_b + i_g * stride_C_g
           + o_n[None, None, :] * stride_C_n)
    b_B = tl.sum(tl.load(p_B, mask=m_sbn, other=0.0).to(tl.float32), axis=0)  # (BLOCK_B, BLOCK_N)
    b_C = tl.sum(tl.load(p_C, mask=m_sbn, other=0.0).to(tl.float32), axis=0)
    if HAS_Z:
        b_z = tl.load(z_ptr + o_b[:, None] * stride_z_b + i_h * stride_z_h + o_p[None, :] * stride_z_p, mask=m_bp,
                      other=0.0).to(tl.float32)

    # dt (BLOCK_B, BLOCK_P), or (BLOCK_B, 1) when it is per head (Mamba-2).
    if HAS_DT_PROJ:
        # dt_ptr holds the low-rank dt (B, R); stride_dt_p walks R.
        p_dt_low = (dt_ptr + o_s[:, None, None] * stride_dt_s + o_b[None, :, None] * stride_dt_b
                    + o_r[None, None, :] * stride_dt_p)
        m_dt_low = m_s[:, None, None] & m_b[None, :, None] & m_r[None, None, :]
        b_dt_low = tl.sum(tl.load(p_dt_low, mask=m_dt_low, other=0.0).to(tl.float32), axis=0)  # (BLOCK_B, BLOCK_R)
        b_dt = tl.sum(b_dt_low[:, None, :] * b_w[None, :, :], axis=2)
    elif TIE_HDIM:
        b_dt = tl.load(dt_ptr + o_b * stride_dt_b + i_h * stride_dt_h, mask=m_b, other=0.0).to(tl.float32)[:, None]
    else:
        b_dt = tl.load(dt_ptr + o_b[:, None] * stride_dt_b + i_h * stride_dt_h + o_p[None, :] * stride_dt_p,
                       mask=m_bp, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += b_dt_bias
    b_dt = tl.where(b_dt <= 20.0, ptx_log2(1.0 + ptx_exp2(b_dt * 1.4426950408889634, PTX), PTX) * 0.6931471805599453,
                    b_dt)
    if HAS_DT_LIMIT:
        b_dt = tl.minimum(tl.maximum(b_dt, dt_min), dt_max)

    # exp(A * dt): with TIE_HDIM one exponential per head and row.
    if TIE_HDIM:
        b_dA = ptx_exp2(b_A * b_dt, PTX)[:, :, None]  # (BLOCK_B, 1, 1)
    else:
        b_dA = ptx_exp2(b_A[None, :, :] * b_dt[:, :, None], PTX)  # (BLOCK_B, BLOCK_P, BLOCK_N)

    b_state = b_state * b_dA + (b_x * b_dt)[:, :, None] * b_B[:, None, :]
    tl.store(p_state, b_state.to(state_ptr.dtype.element_ty), mask=m_state)
    b_out = tl.sum(b_state * b_C[:, None, :], axis=2)  # (BLOCK_B, BLOCK_P)
    if HAS_D:
        b_out += b_x * b_D
    if HAS_Z:
        b_out = b_out * b_z * ptx_sigmoid(b_z, PTX)
    if HAS_NORM:
        # The RMSNorm that follows, folded: this program's sum of squares of its channels of each row (column
        # i_h * n_p + i_p of ss), and the output times the norm weight; the consumer scales the rows.
        b_sq = tl.where(m_bp, b_out * b_out, 0.0)
        tl.store(ss_ptr + o_b * stride_ss_b + i_h * tl.num_programs(0) + i_p, tl.sum(b_sq, axis=1), mask=m_b)
        b_out = b_out * b_nw
    tl.store(out_ptr + o_b[:, None] * stride_o_b + i_h * stride_o_h + o_p[None, :] * stride_o_p,
             b_out.to(out_ptr.dtype.element_ty), mask=m_bp)


# Launch configs, from benchmarks/sweep_decode.py on an H100 (bf16 state; results/sweep_decode*.json).
# Without the in-kernel dt projection (Mamba-2, or dt given in full) a program owns BLOCK_P channels
# of one row: TILE_ELEMS fp32 state values. With it (Mamba-1, small batch) a program owns a
# (BLOCK_B, BLOCK_P) tile and forms the (BLOCK_B, BLOCK_P, R) product: BLOCK_P = 32 keeps 48-128
# programs busy at batch 1 (mamba-130m / -1.4b: 2.9 / 3.5 us; the old BLOCK_P = 128 / 64 with an
# unrolled loop over the S partial sums: 6.2 / 53 us, register spills).
# From CUBLAS_DT_BATCH rows on, dt_proj is one cuBLAS GEMM and the kernel takes the full dt: at
# batch 64 (mamba-1.4b) GEMM + kernel took 10.5 us, the best in-kernel projection 17.8 us (a tl.dot
# over 16-row tiles 27 us), mamba_ssm's chain 16.5 us.
TILE_ELEMS = {16: 2048, 128: 4096}
NUM_WARPS = {16: 4, 128: 8}
# From MANY_ROWS rows with a 16-bit state (Mamba-2 decode at batch 64): 4 warps per 4096-value tile. H100 b64
# whole steps (graph replay, same process, session 13, with models.mamba2.STEP_NORM_FOLD and
# decode_linear.DOT_SUMS_EARLY): mamba2-1.3b 4.052 vs 4.273 ms with 8 warps, mamba2-130m 0.882 vs 0.929
# (results/sweep_decode_s13_fold_b.json); with an fp32 state 8 warps stay (6.525 vs 6.544-6.570 ms, 1.332 vs
# 1.345: results/s13_lead/fp32_ab.log).
MANY_ROWS = 16
NUM_WARPS_MANY_ROWS = {16: 4, 128: 4}
PROJ_BLOCK_P = 32
PROJ_MAX_BLOCK_B = 4
PROJ_WARPS = 4
CUBLAS_DT_BATCH = 16
# From this many rows on (None: never) the kernel does not let its successor launch at its start
# (PDL then launches it as the last programs exit): at batch 64 the step is many waves of programs,
# and the successor's programs (out_proj's tl.dot kernel: 128 KB of shared memory, 8 warps each) would
# sit on the SMs in their PDL wait through all of them, taking slots from the state-streaming programs.
LATE_DEPENDENTS_ROWS = None
# That dt_proj GEMM by decode_linear (its tl.dot kernel: chained with this kernel by PDL) instead of cuBLAS,
# up to decode_linear's MAX_ROWS rows of a 16-bit weight. H100 b64 whole steps (graph replay, same process,
# session 10, with Mamba-1's x_proj by the tl.dot kernel too, models/mamba.STEP_DOT_X_PROJ): mamba-1.4b 2.426
# vs 2.484-2.546 ms, mamba-130m 0.678 vs 0.706-0.709. False: cuBLAS.
DT_PROJ_DOT = True
# Launch plans of _ssm_decode_step (_launch.settings_cache: dropped when a switch above is set).
_PLANS = settings_cache(__name__)


def _launch_config(batch, hdim, n_state, rank, tie, state_bytes=4):
    """(BLOCK_B, BLOCK_P, BLOCK_N, BLOCK_R, num_warps)."""
    block_n = next_pow2(n_state)
    key = 16 if block_n <= 16 else 128
    hdim_p2 = next_pow2(hdim)
    if tie or not rank:
        block_p = min(hdim_p2, max(1, TILE_ELEMS[key] // block_n))
        many = batch >= MANY_ROWS and state_bytes < 4
        return 1, block_p, block_n, 1, (NUM_WARPS_MANY_ROWS if many else NUM_WARPS)[key]
    block_b = min(next_pow2(batch), PROJ_MAX_BLOCK_B)
    return block_b, min(hdim_p2, PROJ_BLOCK_P), block_n, max(16, next_pow2(rank)), PROJ_WARPS


@launcher_op("ssm_decode_step", mutates_args=("state",))
def _ssm_decode_step(state: Tensor, x: Tensor, dt: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     z: Tensor | None, dt_bias: Tensor | None, dt_proj_weight: Tensor | None, dt_limit: list[float],
                     split_sum: bool, state_ready: bool = False) -> Tensor:
    out = _outputs(x)
    if dt_proj_weight is not None and x.shape[0] >= CUBLAS_DT_BATCH and not split_sum:
        # dt is rounded once to the weight dtype here (as mamba_ssm's step does); the rest is fp32.
        dot = (DT_PROJ_DOT and x.shape[0] <= MAX_ROWS
               and dt_proj_weight.dtype in (torch.bfloat16, torch.float16))
        dt = (decode_linear if dot else F.linear)(dt.to(dt_proj_weight.dtype), dt_proj_weight)
        dt_proj_weight = None
    _launch(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit, split_sum, state_ready, out)
    return out


@launcher_op("ssm_decode_step_norm", mutates_args=("state",))
def _ssm_decode_step_norm(state: Tensor, x: Tensor, dt: Tensor, A_log: Tensor, B: Tensor, C: Tensor,
                          D: Tensor | None, z: Tensor, dt_bias: Tensor | None, dt_limit: list[float],
                          norm_weight: Tensor, state_ready: bool = False) -> tuple[Tensor, Tensor]:
    out, sums = _norm_outputs(state, x)
    _launch(state, x, dt, A_log, B, C, D, z, dt_bias, None, dt_limit, False, state_ready, out, norm_weight, sums)
    return out, sums


def _launch(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit, split_sum, state_ready, out,
            norm_weight=None, sums=None):
    key = (x.device, split_sum, state_ready, dt_limit[0], dt_limit[1], *map(layout_key, (
        state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, norm_weight)))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _ssm_plan(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit, split_sum,
                                       state_ready, out, sums)
    plan(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, out, norm_weight, sums)


def _ssm_plan(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit, split_sum, state_ready, out, sums):
    """The launch Plan of the kernel for these operands."""
    batch = x.shape[0]
    n_state = state.shape[-1]
    split_st = (dt.stride(0), B.stride(0), C.stride(0)) if split_sum else (0, 0, 0)
    n_splits = dt.shape[0] if split_sum else 1
    if split_sum:  # one split's views, for their strides
        dt, B, C = dt[0], B[0], C[0]
    mamba2 = state.dim() == 4
    zero3 = (0, 0, 0)
    if mamba2:
        heads, hdim = x.shape[1:]
        groups = B.shape[1]
        state_st, x_st, o_st = state.stride(), x.stride(), out.stride()
        z_st = z.stride() if z is not None else zero3
        dt_st = (dt.stride(0), dt.stride(1), 0)
        a_st = (A_log.stride(0), 0, 0)
        d_st = ((D.stride(0), 0) if D.dim() == 1 else D.stride()) if D is not None else (0, 0)
        dtb_st = (dt_bias.stride(0), 0) if dt_bias is not None else (0, 0)
        b_st, c_st = B.stride(), C.stride()
        w_st, rank = zero3, 0
    else:
        groups = B.shape[1] if B.dim() == 3 else 1
        heads, hdim = groups, x.shape[1] // groups

        def split(st, axis=1):  # channel axis -> (H, P) axes
            return st[:axis] + (hdim * st[axis], st[axis]) + st[axis + 1:]

        state_st, x_st, o_st = split(state.stride()), split(x.stride()), split(out.stride())
        z_st = split(z.stride()) if z is not None else zero3
        a_st = split(A_log.stride(), 0)
        d_st = split(D.stride(), 0) if D is not None else (0, 0)
        dtb_st = split(dt_bias.stride(), 0) if dt_bias is not None else (0, 0)
        b_st = B.stride() if B.dim() == 3 else (B.stride(0), 0, B.stride(1))
        c_st = C.stride() if C.dim() == 3 else (C.stride(0), 0, C.stride(1))
        if dt_proj_weight is not None:
            rank = dt_proj_weight.shape[1]
            dt_st = (dt.stride(0), 0, dt.stride(1))
            w_st = split(dt_proj_weight.stride(), 0)
        else:
            rank, w_st = 0, zero3
            dt_st = split(dt.stride())
    block_b, block_p, block_n, block_r, warps = _launch_config(batch, hdim, n_state, rank, mamba2,
                                                               state.element_size())
    limit = tuple(dt_limit) != NO_DT_LIMIT
    pdl = use_pdl(x)
    scalars = (batch, hdim, n_state, rank, heads // groups, float(dt_limit[0]), float(dt_limit[1]) if limit else 0.0,
               *split_st, *state_st, *x_st, *dt_st, *a_st, *b_st, *c_st, *d_st, *z_st, *dtb_st, *w_st, *o_st,
               sums.stride(0) if sums is not None else 0)
    kwargs = dict(
        TIE_HDIM=mamba2, HAS_DT_PROJ=dt_proj_weight is not None, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_DT_LIMIT=limit, SPLITS=n_splits,
        BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_S=next_pow2(n_splits),
        USE_PDL=pdl, PTX=ptx_math(_ssm_decode_step_kernel), STATE_EARLY=state_ready, num_warps=warps,
        DEPENDENTS_EARLY=LATE_DEPENDENTS_ROWS is None or batch < LATE_DEPENDENTS_ROWS, HAS_NORM=sums is not None,
        **pdl_launch(pdl),
    )
    return Plan(_ssm_decode_step_kernel, (cdiv(hdim, block_p), cdiv(batch, block_b), heads), *scalars, **kwargs)


def _outputs(x):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _norm_outputs(state, x):
    """(out like x, sums (B, H * program columns per head) fp32) of ssm_decode_step_norm."""
    heads, hdim = x.shape[1:]
    n_p = cdiv(hdim, _launch_config(x.shape[0], hdim, state.shape[-1], 0, True)[1])
    return _outputs(x), torch.empty(x.shape[0], heads * n_p, device=x.device, dtype=torch.float32)


@_ssm_decode_step.register_fake
def _(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit, split_sum, state_ready=False):
    return _outputs(x)


@_ssm_decode_step_norm.register_fake
def _(state, x, dt, A_log, B, C, D, z, dt_bias, dt_limit, norm_weight, state_ready=False):
    return _norm_outputs(state, x)


def _validate(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit):
    """What ssm_decode_step accepts, in one place. Each check is a few comparisons, and only one that
    fails builds its error (naming the argument): an accepted call, a decode step that is host-bound,
    pays the comparisons only."""
    tensor, floats = torch.Tensor, FLOAT_DTYPES
    if not (isinstance(state, tensor) and state.dim() in (3, 4) and state.dtype in floats):
        check_tensor("state", state, ndim=(3, 4), dtype=floats)
    mamba2 = state.dim() == 4
    inner, n_state = tuple(state.shape[1:-1]), state.shape[-1]
    batch = state.shape[0]
    shape = (batch, *inner)
    if not (isinstance(x, tensor) and x.shape == shape and x.dtype in floats):
        check_tensor("x", x, shape=shape, dtype=floats)
    if z is not None and not (isinstance(z, tensor) and z.shape == shape and z.dtype in floats):
        check_tensor("z", z, shape=shape, dtype=floats)
    if not (isinstance(C, tensor) and C.dtype in floats):
        check_tensor("C", C, dtype=floats)
    if mamba2:
        heads, hdim = inner
        if dt_proj_weight is not None:
            raise ValueError("dt_proj_weight is for the Mamba-1 layout (state (B, D, N)); Mamba-2 takes dt (B, H)")
        if not (isinstance(dt, tensor) and dt.shape == (batch, heads) and dt.dtype in floats):
            check_tensor("dt", dt, shape=(batch, heads), dtype=floats)
        if not (isinstance(A_log, tensor) and A_log.shape == (heads,) and A_log.dtype in floats):
            check_tensor("A_log", A_log, shape=(heads,), dtype=floats)
        if not (isinstance(B, tensor) and B.dim() == 3 and B.shape[0] == batch and B.shape[2] == n_state
                and B.dtype in floats):
            check_tensor("B", B, shape=(batch, None, n_state), dtype=floats)
        if D is not None and not (isinstance(D, tensor) and D.shape in ((heads,), (heads, hdim)) and D.dtype in floats):
            if isinstance(D, tensor) and tuple(D.shape) not in ((heads,), (heads, hdim)):
                raise ValueError(f"D must have shape ({heads},) or ({heads}, {hdim}), got {tuple(D.shape)}")
            check_tensor("D", D, dtype=floats)
        if dt_bias is not None and not (isinstance(dt_bias, tensor) and dt_bias.shape == (heads,)
                                        and dt_bias.dtype in floats):
            check_tensor("dt_bias", dt_bias, shape=(heads,), dtype=floats)
        split, split_name = heads, "H"
    else:
        (dim,) = inner
        if dt_proj_weight is None:
            if not (isinstance(dt, tensor) and dt.shape == shape and dt.dtype in floats):
                check_tensor("dt", dt, shape=shape, dtype=floats)
        else:
            if not (isinstance(dt, tensor) and dt.dim() == 2 and dt.shape[0] == batch and dt.dtype in floats):
                check_tensor("dt", dt, shape=(batch, None), dtype=floats)
            if not (isinstance(dt_proj_weight, tensor) and dt_proj_weight.shape == (dim, dt.shape[1])
                    and dt_proj_weight.dtype in floats):
                check_tensor("dt_proj_weight", dt_proj_weight, shape=(dim, dt.shape[1]), dtype=floats)
        if not (isinstance(A_log, tensor) and A_log.shape == (dim, n_state) and A_log.dtype in floats):
            check_tensor("A_log", A_log, shape=(dim, n_state), dtype=floats)
        if not (isinstance(B, tensor) and B.dim() in (2, 3) and B.dtype in floats):
            check_tensor("B", B, ndim=(2, 3), dtype=floats)
        if B.shape[0] != batch or B.shape[-1] != n_state:
            raise ValueError(f"B must have shape ({batch}, {n_state}) or ({batch}, G, {n_state}), got {tuple(B.shape)}")
        if D is not None and not (isinstance(D, tensor) and D.shape == (dim,) and D.dtype in floats):
            check_tensor("D", D, shape=(dim,), dtype=floats)
        if dt_bias is not None and not (isinstance(dt_bias, tensor) and dt_bias.shape == (dim,)
                                        and dt_bias.dtype in floats):
            check_tensor("dt_bias", dt_bias, shape=(dim,), dtype=floats)
        split, split_name = dim, "D"
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = B.shape[1] if B.dim() == 3 else 1
    if groups == 0 or split % groups != 0:
        raise ValueError(f"the number of groups G={groups} in B/C must divide {split_name}={split}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must be (low, high) with low <= high, got {dt_limit}")
    device = state.device
    for t in (x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight):
        if t is not None and t.device != device:
            check_same_device(state=state, x=x, dt=dt, A_log=A_log, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                              dt_proj_weight=dt_proj_weight)


def ssm_decode_step(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, dt_proj_weight=None,
                    dt_limit=NO_DT_LIMIT, *, split_sum=False, state_ready=False, norm_weight=None, backend=None):
    """One token of the selective SSM, with the dt projection and softplus fused in; the
    state is updated in place and the output returned.

    Mamba-1 layout:
        state (B, D, N); x, z (B, D); dt (B, R) low-rank with dt_proj_weight (D, R), or dt (B, D)
        without it; A_log (D, N) (A = -exp(A_log)); B, C (B, N) or (B, G, N), G dividing D;
        D, dt_bias (D,). Returns (B, D).
    Mamba-2 layout:
        state (B, H, P, N); x, z (B, H, P); dt (B, H); A_log (H,); B, C (B, G, N), G dividing H;
        D (H,) or (H, P); dt_bias (H,). Returns (B, H, P).
    dt' = clamp(softplus(dt + dt_bias), *dt_limit) (softplus always applies, as in both mixers).
    From CUBLAS_DT_BATCH rows (without split_sum) the low-rank dt projection is a cuBLAS GEMM in
    dt_proj_weight's dtype before the kernel (faster there; dt is then rounded once to that dtype).
    The state may be fp32 (default of the mixers), bf16 or fp16; inputs may be strided views.
    split_sum: dt, B and C have an extra leading axis S and are summed over it (fp32) first,
        e.g. the partial x_proj products of conv_xproj_step: dt (S, B, R), B, C (S, B, N).
    state_ready: the caller guarantees that no kernel still running when this one is launched writes
        ``state`` (see decode_linear.completes_before_next), so that with PDL the kernel loads the
        state before it waits for its predecessor. Never true right after another step on the same
        state: with PDL that step may still be running.
    norm_weight: (H * P,), Mamba-2 layout with z only: the RMSNorm that follows the gated output
        (one group over the row, after the gate) folded in. Returns (out * norm_weight (B, H, P),
        sums (B, S) fp32) instead: sums.sum(1) is each row's sum of squares of the gated output, so
        that rmsnorm(out_gated) @ W.T = rsqrt(sums.sum(1) / (H * P) + eps) * (returned out @ W.T)
        (see decode_linear.rms_scaled_linear).
    backend: "torch", "triton" or None (the device decides).
    """
    if split_sum:
        _check_splits(dt, B, C)
        dt1, B1, C1 = dt[0], B[0], C[0]
    else:
        dt1, B1, C1 = dt, B, C
    _validate(state, x, dt1, A_log, B1, C1, D, z, dt_bias, dt_proj_weight, dt_limit)
    if norm_weight is not None:
        _check_norm_weight(norm_weight, state, x, z, dt_proj_weight, split_sum)
        if resolve_backend(backend, state, x) == "torch":
            return ssm_decode_step_ref(state, x, dt, A_log, B, C, D, z, dt_bias, None, dt_limit, False, norm_weight)
        return _ssm_decode_step_norm(state, x, dt, A_log, B, C, D, z, dt_bias,
                                     [float(dt_limit[0]), float(dt_limit[1])], norm_weight, bool(state_ready))
    if resolve_backend(backend, state, x) == "torch":
        return ssm_decode_step_ref(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight, dt_limit, split_sum)
    return _ssm_decode_step(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight,
                            [float(dt_limit[0]), float(dt_limit[1])], split_sum, bool(state_ready))


def _check_norm_weight(norm_weight, state, x, z, dt_proj_weight, split_sum):
    if state.dim() != 4 or z is None or dt_proj_weight is not None or split_sum:
        raise ValueError("norm_weight needs the Mamba-2 layout (state (B, H, P, N)) with the gate z, without "
                         "dt_proj_weight or split_sum")
    # Comparisons first; the named errors only on failure (a decode step is host-bound).
    if not (isinstance(norm_weight, torch.Tensor) and norm_weight.shape == (x.shape[1] * x.shape[2],)
            and norm_weight.dtype in FLOAT_DTYPES):
        check_tensor("norm_weight", norm_weight, shape=(x.shape[1] * x.shape[2],), dtype=FLOAT_DTYPES)
    if norm_weight.device != state.device:
        check_same_device(state=state, norm_weight=norm_weight)


def _check_splits(dt, B, C):
    for name, t in (("dt", dt), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != dt.shape[0]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must carry the split axis first with split_sum=True "
                             f"((S, ...) with the same S for dt, B and C), got {shape}")
