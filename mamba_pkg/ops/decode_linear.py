"""A linear layer for the few rows of a decode step, as one Triton kernel.

    out = x @ weight.T + bias        x (B, K), weight (N, K), bias (N,), out (B, N); B <= 64

and, for the in_proj of a decode step, the block's residual add + RMSNorm folded in:

    s = x + residual;  out = (s * rsqrt(mean(s^2) + eps) * norm_weight) @ weight.T + bias
    returns (out, s)                 B <= 2; s in fp32 if residual_in_fp32

and, for Mamba-2's in_proj (either form above), its depthwise causal conv update folded in: the
outputs [conv_start, conv_start + C) are replaced by

    out[:, c] = act(conv_bias[c - conv_start] + sum_k conv_weight[c - conv_start, k] * window[:, c, k])
    window = the last W-1 inputs in conv_state, then the product itself (conv_state advances in place)

and, for Mamba-2's out_proj, its gated RMSNorm (one group spanning the row) folded in:

    g = x * silu(z);  out = (g * rsqrt(mean(g^2) + eps) * norm_weight) @ weight.T + bias
    (norm_before_gate: out = (x * rsqrt(mean(x^2) + eps) * norm_weight * silu(z)) @ weight.T + bias)

At batch 1 a decode step reads every weight once, so in_proj / out_proj are weight-streaming
matrix-vector products. cuBLAS runs them as split-K GEMMs followed by a separate reduction
kernel (two launches per projection). Here each program owns BLOCK_N output features and
reads their full rows in one go (no loop-carried dependency), so every load of a program is
in flight at once and one launch does the whole product; math in fp32. A norm either runs as
a pre-pass (NORM_PREPASS): one program per row writes the normalised row once, in fp32 (not
rounded), and the product reads that row; or it is folded into the product: every one of its
~500-2100 programs re-reads the input row, the residual (or gate) and the norm weight and sums
the squares again (at d_model 2048 as many bytes from L2 as it streams weights), scaling the
finished dot product by rsqrt(...). The pre-pass is one more launch per norm, which PDL
overlaps with the product's first weight loads; which one is faster depends on the product
(measured settings below). The conv is depthwise, so the
program that computes an output feature owns its conv channel (state, weights) outright.
Above SMALL_ROWS (2) rows the product is a tl.dot over BLOCK_K steps (a weight-streaming GEMM with
the whole batch in one tile; where the outputs alone give too few programs, the K range is split
over several and the last one of a tile to finish adds their partials: one launch), or, for
decode_linear's plain one-dtype product where that is faster, cuBLAS (F.linear, see CUBLAS_MAX_ROWS).

On Hopper and newer the decode kernels (these, conv_xproj_step, ssm_decode_step) are launched
with programmatic dependent launch (PDL): each lets its successor start at once, issues the
loads of its weights, and only then waits for its predecessor to finish (gdc_wait) before it
reads an activation or stores anything. At batch 1 a step is a chain of ~100-250 short kernels;
this overlaps each kernel's launch and first weight round trip with the tail of the one before.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_pkg.ops._launch import Plan, launch, settings_cache, variant_needed
from mamba_pkg.ops._library import absent, launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_same_device,
    check_tensor,
    next_pow2,
    ptx_math,
    ptx_sigmoid,
    resolve_backend,
    sm90,
    sm_count,
    tl,
    triton,
    triton_interpret,
)
from mamba_pkg.ops.causal_conv1d import causal_conv1d_update_ref
from mamba_pkg.ops.norm import _residual_dtype, layer_norm_ref, rms_norm_gated_ref

MAX_ROWS = 64
# Up to SMALL_ROWS rows (the decode steps' batch 1-2, models/_cache_utils.STEP_LINEAR_MAX_ROWS) the
# broadcast-sum kernel; above, the tl.dot kernel, except that decode_linear's plain product (one dtype,
# no conv) is F.linear up to CUBLAS_MAX_ROWS rows and where dot_config has too few programs: cuBLAS
# streams the weight faster there. H100, CUDA graph (sweep_decode probe, session 8), mamba-1.4b in_proj
# at 3 / 8 rows: cuBLAS 7.8 / 7.0 us, tl.dot 12.5 / 12.3, broadcast-sum 21.1 / 56.0; out_proj 7.1 / 7.1,
# 17.8 / 15.9, 11.4 / 28.9 (at 64 rows the tl.dot kernel won on in_proj shapes, see DOT_CONFIGS).
SMALL_ROWS = 2
CUBLAS_MAX_ROWS = 8
# Broadcast-sum kernel: output features per program, fp32 values per product tile, warps
# (benchmarks/sweep_decode.py, H100, batch 1: the best or within 5% of it on the in_proj and
# out_proj shapes of mamba-130m and mamba-1.4b).
BLOCK_N = 4
TILE_ELEMS = 8192  # BLOCK_B * BLOCK_N * BLOCK_K per product tile
# Rows at least WIDE_K wide take WIDE_BLOCK_N output features per program (twice the programs, and
# out_proj's 4096-wide rows whole in one tile, all loaded before the PDL wait), except where the gated
# norm is folded in (each program re-reads the gate row and recomputes its sigmoids). H100 b1 whole
# step, same run (results/bench_generation_session6_ab2.json), BLOCK_N 2 vs 4 everywhere: mamba-1.4b
# 1.245 vs 1.274-1.294 ms, mamba2-1.3b (pre-pass norms) 1.370 vs 1.424-1.427.
WIDE_K = 2048
WIDE_BLOCK_N = 2
# Mamba-2's wide products with a norm folded in (the add + norm before an in_proj that carries the
# conv, the plain RMSNorm before out_proj) take FOLD_BLOCK_N features per program in tiles of
# FOLD_TILE_ELEMS: every program re-reads the input row (and the residual, the norm weight) and sums
# its squares again, so fewer, wider programs cut those L2 re-reads (mamba2-1.3b in_proj: 1064
# programs instead of 4256). H100 b1 whole step, same run (session 7, results/decode_run_log_session7.txt):
# mamba2-1.3b 1.283 ms vs 1.318 / 1.342 with the add + norm pre-pass and 2 features per program.
FOLD_BLOCK_N = 8
FOLD_TILE_ELEMS = 16384
FOLD_RMS_BLOCK_N = 8  # the plain RMSNorm before out_proj (mamba2-1.3b: 256 programs of 8 x 4096)
NUM_WARPS = 4
# tl.dot kernel (a weight-streaming GEMM with all rows, up to 64, in one tile): DOT_BLOCK_N output
# features per program; below DOT_TARGET_PROGRAMS programs the K range is split over up to
# DOT_MAX_SPLIT programs per tile (a power of two), whose fp32 partial tiles the last one of them to
# finish adds up in split order (deterministic) before the epilogue: one launch, no separate
# reduction kernel (cuBLAS's split-K GEMMs take two). Fewer than DOT_MIN_PROGRAMS programs even so:
# dot_config says None (decode_linear's plain product then goes to cuBLAS).
DOT_BLOCK_N = 64
# Weights of fewer than DOT_SMALL_WEIGHT values (the 130m models' in_proj / out_proj, 2.6M and less) take
# DOT_SMALL_BLOCK_N features per program (at most DOT_BLOCK_N): twice the programs of a latency-bound
# launch. H100 b64 whole steps (graph replay, same process, session 10 sweep): mamba2-130m 1.008 ms vs
# 1.073 on cuBLAS, mamba-130m 0.810 vs 0.820 (with 64 features, session 9: 0.760 vs 0.739, a loss).
DOT_SMALL_WEIGHT = 4 * 2**20
DOT_SMALL_BLOCK_N = 32
DOT_BLOCK_K = 128
# Pipeline stages: a launch of at most one program per SM streams as fast as it has weight bytes in flight
# (stages - 1 tiles of BLOCK_N x BLOCK_K). H100, 64 rows, out_proj 2048 x 4096 split 4, cold weights
# (session 9 sweep): 24 KB in flight per SM 13.39 us, 32 KB 12.06, 48 KB (4 stages) 10.0, which fits
# 6.6 + 163 / KB; 6 stages (192 KB of shared memory, 80 KB in flight) by that ~8.6 us.
DOT_STAGES = 6
DOT_WARPS = 4
# With the conv update in the epilogue: 8 warps (the (64, 64) tile's state slots, taps and pointers
# fit in registers; 4 warps spilled, offline sm_90 SASS).
DOT_CONV_WARPS = 8
# With the RMSNorm prologue: 8 warps (H100, mamba2-1.3b out_proj 2048 x 4096 at 64 rows, cold weights,
# PDL chain: 12.7 us vs 24.9 with 4; cuBLAS + an x * norm_weight kernel 14.3).
DOT_NORM_WARPS = 8
# Products of more than DOT_MANY_PROGRAMS programs (lm_head) take DOT_MANY_STAGES stages (H100, 50280 x
# 2048 at 64 rows: 74.7 us with 3 vs 78.2 with 4, cuBLAS 80.1).
DOT_MANY_PROGRAMS = 264
DOT_MANY_STAGES = 3
# A launch of more programs than the GPU has SMs runs at one program per SM (DOT_STAGES stages of (64, 128)
# x and weight tiles: 128-192 KB of shared memory; the conv epilogue's 153 registers x 8 warps) in two
# waves, the second a tail of few programs (mamba2-1.3b in_proj + conv at 64 rows: 133 tiles on 132 SMs).
# There it takes DOT_FIT_STAGES stages of DOT_FIT_BLOCK_K (96 KB, 40 KB of weights in flight) and, with the
# conv, at most DOT_CONV_MAXNREG registers per thread (128 x 256 threads x 2 = the register file; offline
# sm_90: 96 bytes of epilogue spill, none in the K loop), so that two programs fit per SM and all run in
# one wave. False: off.
DOT_FIT = True
# Where the output features run a few past one tile per SM (no more features past them than SMs; one row
# block, no K split, no norm in the K loop, none of them a conv channel: mamba2-1.3b's in_proj at 64 rows, 8512
# features = 132 tiles of 64 + its 64 dt features), the launch runs one program per SM over the first SM-count
# tiles (the plain config, no fit), and program p also computes overflow feature SMs * BLOCK_N + p whole, as a
# matrix-vector product on the x tiles its K loop streams anyway (one more weight row per program; the sums
# stay elementwise over the loop and are reduced once). H100, 64 rows, mamba2-1.3b's in_proj + conv, cold weights
# (session 14, results/sweep_decode_s14_overflow.json): 18.2 us vs 24.1 with the fit (the 132-tile product
# alone: 17.1); b64 step graph replay 3.956 / 3.957 ms vs 4.054 / 4.045. Splitting the 133rd tile along K
# instead (16 or 8 slices, the last to finish adds them up) lost in the step: 4.14-4.23 ms
# (sweep_decode_s14_overflow_slices.json). DOT_OVERFLOW_SMS: the SM count to plan for (0: the device's; CPU
# tests set it to run the path through the interpreter). False: off (the fit above).
DOT_OVERFLOW = True
DOT_OVERFLOW_SMS = 0
DOT_FIT_BLOCK_K = 64
DOT_FIT_STAGES = 6
DOT_CONV_MAXNREG = 128
# The conv epilogue of the tl.dot kernel reads and writes a 4-slot contiguous state as whole rows
# (_conv_tile's ROWS4); False: slot by slot.
DOT_CONV_ROWS4 = True
DOT_MIN_PROGRAMS = 32
DOT_TARGET_PROGRAMS = 128
DOT_MAX_SPLIT = 32
# K steps (DOT_BLOCK_K) each split streams at least (H100, 64 rows: x_proj 160 x 4096 7.9 us in 16 splits
# of 2 steps vs 12.0 in 32 of 1; 768 x 1536 5.0 us in 4 splits vs 6.1 in 8).
DOT_MIN_SPLIT_STEPS = 2
# With PDL the product lets its successor launch at its start (True) or after its K loop (False:
# the successor's programs do not take SM slots while the weights stream). H100, 64 rows, chains of
# one shape: no better (e.g. norm + out_proj 21.2 vs 24.9 us at 4 warps, but 8 warps 12.7 early).
DOT_LAUNCH_EARLY = True
# The first K step's weight tile is loaded before the PDL wait (peeled off the pipelined loop).
# H100 b64 whole steps slower: mamba-1.4b 2.745 vs 2.665 ms, mamba2-1.3b 4.574 vs 4.463.
DOT_PEEL = False
# Before its PDL wait each program asks L2 for the first DOT_PREFETCH_K columns of its weight rows (its
# K range at most; nothing held: no registers or shared memory), so that the first K steps' weights are
# on their way from HBM while the predecessor finishes, instead of only after the wait. 0: off (also off
# the interpreter, before sm_90, and where the weight rows are not 16-byte aligned). DOT_PREFETCH_LINES:
# one prefetch.global.L2 per 128-byte line, per thread; False: one sm_90 bulk prefetch per row
# (cp.async.bulk.prefetch.L2), whose uniform operands make ptxas loop over a warp's 32 rows before the
# first load. H100 b64 whole steps (graph replay, same process, session 11; committed 4.398 / 2.426 /
# 0.944 / 0.678 ms for mamba2-1.3b / mamba-1.4b / mamba2-130m / mamba-130m): by lines, 256 columns
# 4.302 / 2.303 / 0.910 / 0.652, 512 4.326 / 2.324 / 0.916 / 0.650, the whole K range 4.462 / 2.408 /
# 0.912 / 0.658 (floods HBM out of the pipeline's order); bulk, 512 columns 4.364 / 2.354 / 0.974 / 0.742.
DOT_PREFETCH_K = 256
DOT_PREFETCH_LINES = True
# The weight (TMA_W) and x (TMA_X) tiles through TMA tensor descriptors (Hopper bulk copies: 66 instead of
# 102 registers and 968 instead of 1144 instructions at out_proj's shape, offline sm_90 SASS) instead of
# cp.async pointer loads, for programs of at least DOT_TMA_MIN_STEPS K steps, or with the RMSNorm
# prologue. The descriptors are made on the host (the launch encodes them; a CUDA graph keeps them) and
# need 16-byte aligned rows contiguous along K (else the pointer loads). Each program pays the
# descriptor's first fetch: short K loops lose (H100, 64 rows, cold weights: x_proj 160 x 4096 split 16,
# 2 steps, 6.41 vs 5.90 us; out_proj 2048 x 4096 split 4, 8 steps, 10.6 vs 10.2); in_proj + conv 23.1 vs
# 24.1 (32 steps), norm + out_proj 13.3 vs 14.4. Whole b64 steps (same process): TMA everywhere
# mamba2-1.3b 4.304 vs 4.392, mamba-1.4b 2.481 vs 2.422 (its x_proj, dt_proj, out_proj); only 16+ steps or
# the norm 4.309 / 2.418; with the prefetch by lines (512) 4.261 / 2.306 vs 4.326 / 2.324 without. Both as
# adopted (TMA for 16+ steps, 256 columns by lines) against neither, same process: 4.196 vs 4.390, 2.300 vs 2.409,
# mamba2-130m 0.909 vs 0.941, mamba-130m 0.655 vs 0.680 (bench_generation b64: 0.679x / 0.698x mamba_ssm's). False: off.
DOT_TMA = True
DOT_TMA_MIN_STEPS = 16
# Descriptors are encoded on the host at every launch (the H100 host, session 11 lead diag: ~15 us each),
# so on a GPU the TMA path is taken only while a CUDA graph is being captured, where that cost is paid once
# (generate(cg=True)'s decode graphs), and by the first eager launch of each signature (a capture's warm-up:
# it compiles the variant, since a capture cannot load modules; _launch.variant_needed); other eager
# launches, host-bound at decode sizes, keep the pointer loads. True: every eager launch takes it (tests).
DOT_TMA_EAGER = False
# NORM_SUMS (rms_scaled_linear) with the K range split: every program loads its rows' sums right after its PDL
# wait (in flight over the K loop), not only the program that finishes the tile, after the partial sums.
# H100 b64 whole steps (session 13, with the SSM step's 4 warps): mamba2-1.3b 4.052 vs 4.143 ms, mamba2-130m
# 0.882 vs 0.895 (results/sweep_decode_s13_fold_b.json).
DOT_SUMS_EARLY = True
# Per-tile arrival counters of the split-K tiles, per device (zeroed once; the last program of a
# tile resets its counter).
DOT_COUNTERS = 8192
_COUNTERS = {}
# The split-K tiles' partial sums (and sums of squares) of eager launches, per (device, shape, what):
# reused by every eager launch instead of allocated by each (on the H100 host a torch.empty is several
# us of a launch's host time). Safe in a PDL chain: a kernel writes them only after its gdc_wait, that
# is after every kernel before it (the last one to read them included) finished. Launches under CUDA
# graph capture allocate their own (from the graph's pool), as before. Like the counters, one set per
# device: split-K launches on two streams at once would share them.
_SCRATCH = {}


# Launch plans of this module's launchers (settings_cache).
_PLANS = settings_cache(__name__)


# Programmatic dependent launch of the decode kernels (module docstring); False switches it off.
PDL = True
# The weights are read once per step: their loads ask L2 to drop them first, so that they do not
# push out what is read again (activations, states). H100 b1 whole step: mamba-1.4b 1.273 vs 1.294 ms,
# mamba2-1.3b 1.422 vs 1.436 (results/bench_generation_session6_ab.json).
WEIGHT_EVICT_FIRST = True
# The norms of add_rms_norm_linear / gated_rms_norm_linear as a pre-pass over each row (module
# docstring) for rows PREPASS_MIN_K..PREPASS_MAX_K wide; False, or other widths, fold them into every
# program of the product. Narrow rows (the 130m models: 768, 1536) keep the fold: their steps are
# latency-bound chains where one more launch per norm costs more than the re-reads. PREPASS_MAX_K:
# one register tile per row. H100, b1 step (graph replay, same run): mamba2-1.3b (gated norm before
# out_proj, add + norm before an in_proj with the conv folded) 1.45 ms with the pre-pass vs 1.57
# folded; mamba-1.4b (add + norm before a plain in_proj) 1.43-1.45 vs 1.39 folded, so the add + norm
# takes the pre-pass only where the product also carries the conv (PREPASS_ADD_NORM_ALONE). Session 6,
# with the batch-1 product reducing in its load layout (cheaper folds): mamba2-1.3b's gated norm folded
# 1.360 ms vs 1.424-1.427 with its pre-pass, so it is folded again (PREPASS_GATED); the add + norm before
# its in_proj + conv: 1.425 folded, no change (results/bench_generation_session6_ab2.json).
NORM_PREPASS = True
PREPASS_GATED = False  # the gated norm before out_proj
PREPASS_RMS = False  # a plain RMSNorm (rms_norm_linear)
PREPASS_ADD_NORM_CONV = False  # the add + norm before an in_proj that carries the conv (FOLD_BLOCK_N)
PREPASS_ADD_NORM_ALONE = False  # the add + norm before a plain in_proj
PREPASS_MIN_K = 2048
# The pre-pass writes the normalised row in fp32 (not rounded); False: in x's dtype (half the bytes
# that every program of the product re-reads).
PREPASS_FP32 = True
PREPASS_MAX_K = 8192


def use_pdl(t: Tensor) -> bool:
    """Launch the decode kernels on t's device with programmatic dependent launch: CUDA on sm_90+,
    not the interpreter. Every kernel so launched must call gdc_wait before it reads an activation
    or writes anything, so that "kernel k finished" still implies "every kernel before it did"."""
    return PDL and _sm90(t)


@functools.lru_cache(maxsize=None)
def _shared_memory(device_index):
    """Shared memory bytes one program may use on the device (the opt-in limit; where torch does not say,
    an SM's less the 1 KB the driver reserves per program)."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_multiprocessor - 1024


@functools.lru_cache(maxsize=None)
def _resident_programs(device_index, warps, regs=0):
    """Programs of ``warps`` warps and ``regs`` registers per thread (0: unknown) that the GPU holds at
    once at most: the thread limit per SM, and the register file (without allocation rounding, so
    never below the true count)."""
    props = torch.cuda.get_device_properties(device_index)
    per_sm = props.max_threads_per_multi_processor // (32 * warps)
    if regs:
        per_sm = min(per_sm, getattr(props, "regs_per_multiprocessor", 65536) // (regs * 32 * warps))
    return props.multi_processor_count * per_sm


# Registers per thread of the broadcast-sum kernel as compiled, by (weight shape, prologue as
# launched, conv, BLOCK_B), recorded at each launch: the folds' one (8, 2048) tile takes ~108, so an
# SM holds 4 such programs, not 16 (completes_before_next).
_REGISTERS = {}


def completes_before_next(rows: int, weight: Tensor, norm: int = 0, conv: bool = False) -> bool:
    """Whether, with PDL, the kernel launched right after a small-batch product (rows <= SMALL_ROWS
    of x (rows, K) times weight (N, K); norm: the NORM_* prologue asked for, conv: the conv update
    folded in) can start only once every kernel launched before that product has completed. True
    when the product has more programs than the GPU holds at once: its last programs start only
    after earlier ones exited, each of which had waited (gdc_wait) for the kernel before it, which
    had waited for its own, and so on; the next kernel starts only after the product's last program
    started. The answer is kept in _PLANS once the product's registers are known."""
    key = ("completes_before_next", rows, weight.shape, weight.device, norm, conv)
    known = _PLANS.get(key)
    if known is not None:
        return known
    if rows > SMALL_ROWS or not use_pdl(weight):
        return False
    if _prepass(norm, weight.shape[1], conv):
        norm = NORM_NONE
    block_n, _ = _small_config(weight.shape[1], norm, conv)
    regs = _REGISTERS.get((tuple(weight.shape), norm, conv, next_pow2(rows)), 0)
    answer = cdiv(weight.shape[0], block_n) > _resident_programs(weight.device.index, NUM_WARPS, regs)
    if regs:  # kept once the product's registers are known (its first launch)
        _PLANS[key] = answer
    return answer


def pdl_launch(pdl: bool) -> dict:
    """The launch keyword of a PDL launch (none otherwise: the interpreter takes no launch_pdl)."""
    return {"launch_pdl": True} if pdl else {}


def dot_config(n_out, n_in=None):
    """(BLOCK_N, BLOCK_K, stages, warps, SPLIT) of the tl.dot kernel for weight (n_out, n_in), or
    None where even the K split gives fewer than DOT_MIN_PROGRAMS programs (n_in None: no split).
    Kept in _PLANS (a decode step asks for each of its products several times)."""
    key = ("dot_config", n_out, n_in)
    if key not in _PLANS:
        _PLANS[key] = _dot_config(n_out, n_in)
    return _PLANS[key]


def _dot_config(n_out, n_in):
    block_n = min(DOT_BLOCK_N, DOT_SMALL_BLOCK_N) if n_in and n_out * n_in < DOT_SMALL_WEIGHT else DOT_BLOCK_N
    tiles = cdiv(n_out, block_n)
    split = 1
    steps = cdiv(n_in, DOT_BLOCK_K) if n_in else 1
    while (tiles * split < DOT_TARGET_PROGRAMS and split < DOT_MAX_SPLIT
           and steps >= 2 * split * DOT_MIN_SPLIT_STEPS and tiles <= DOT_COUNTERS):
        split *= 2
    if tiles * split < DOT_MIN_PROGRAMS:
        return None
    return block_n, DOT_BLOCK_K, DOT_MANY_STAGES if tiles * split > DOT_MANY_PROGRAMS else DOT_STAGES, DOT_WARPS, split


def _conv_columns_ref(out, conv):
    """out with its columns [conv_start, conv_start + C) put through the conv update (in place)."""
    if conv is None:
        return out
    conv_state, conv_weight, conv_bias, conv_start, activation = conv
    cols = slice(conv_start, conv_start + conv_weight.shape[0])
    out[:, cols] = causal_conv1d_update_ref(out[:, cols], conv_state, conv_weight, conv_bias, activation)
    return out


def decode_linear_ref(x, weight, bias=None, conv=None):
    """Torch reference of :func:`decode_linear` (fp32 math, output in x's dtype)."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return _conv_columns_ref(out, conv)


def add_rms_norm_linear_ref(x, residual, norm_weight, weight, bias=None, eps=1e-5, residual_in_fp32=False, conv=None):
    """Torch reference of :func:`add_rms_norm_linear` (fp32 math)."""
    s = x.float() if residual is None else x.float() + residual.float()
    normed = layer_norm_ref(s, norm_weight, None, eps=eps, is_rms_norm=True)  # fp32 in, fp32 out: not rounded
    out = _conv_columns_ref(decode_linear_ref(normed, weight, bias).to(x.dtype), conv)
    return out, s.to(_residual_dtype(x, residual, residual_in_fp32))


def rms_scaled_linear_ref(x, sums, weight, bias=None, eps=1e-5):
    """Torch reference of :func:`rms_scaled_linear` (fp32 math)."""
    scale = torch.rsqrt(sums.float().sum(1, keepdim=True) / x.shape[1] + eps)
    out = F.linear(x.float(), weight.float()) * scale
    return (out if bias is None else out + bias.float()).to(x.dtype)


def rms_norm_linear_ref(x, norm_weight, weight, bias=None, eps=1e-5):
    """Torch reference of :func:`rms_norm_linear` (fp32 math)."""
    normed = layer_norm_ref(x.float(), norm_weight, None, eps=eps, is_rms_norm=True)  # fp32: not rounded
    return decode_linear_ref(normed, weight, bias).to(x.dtype)


def gated_rms_norm_linear_ref(x, z, norm_weight, weight, bias=None, eps=1e-5, norm_before_gate=False):
    """Torch reference of :func:`gated_rms_norm_linear` (fp32 math)."""
    normed = rms_norm_gated_ref(x.float(), norm_weight, None, z, eps, None, norm_before_gate)  # fp32: not rounded
    return decode_linear_ref(normed, weight, bias).to(x.dtype)


# Prologues of the product (NORM): none, add + RMSNorm, gated RMSNorm (gate first or last), RMSNorm.
NORM_NONE, NORM_ADD, NORM_GATE, NORM_GATE_AFTER, NORM_RMS, NORM_SUMS = 0, 1, 2, 3, 4, 5


@triton.jit
def _row_norm_kernel(
    x_ptr, res_ptr, nw_ptr, res_out_ptr, y_ptr,
    K, eps, stride_x_b, stride_x_k, stride_r_b, stride_r_k, stride_ro_b, stride_ro_k,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    PTX: tl.constexpr,
):
    # One program per row: y = the normalised row (fp32, contiguous (B, K)); res_ptr / res_out_ptr
    # as in _decode_linear_kernel (NORM_ADD: residual in, sum out; NORM_GATE*: res_ptr is z).
    i_b = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    b_nw = tl.load(nw_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    b_x = tl.load(x_ptr + i_b * stride_x_b + o_k * stride_x_k, mask=m_k, other=0.0).to(tl.float32)
    if NORM == 1:
        if HAS_RESIDUAL:
            b_x += tl.load(res_ptr + i_b * stride_r_b + o_k * stride_r_k, mask=m_k, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + i_b * stride_ro_b + o_k * stride_ro_k, b_x.to(res_out_ptr.dtype.element_ty), mask=m_k)
    if NORM == 2 or NORM == 3:
        b_z = tl.load(res_ptr + i_b * stride_r_b + o_k * stride_r_k, mask=m_k, other=0.0).to(tl.float32)
        b_gate = b_z * ptx_sigmoid(b_z, PTX)
        if NORM == 2:
            b_x *= b_gate
    b_y = b_x * (1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / K + eps)) * b_nw
    if NORM == 3:
        b_y *= b_gate
    tl.store(y_ptr + i_b * K + o_k, b_y.to(y_ptr.dtype.element_ty), mask=m_k)


@triton.jit
def _conv_tile(b_out, o_b, m_b, o_n, m_n, cs_ptr, cw_ptr, cb_ptr, conv_start, conv_dim,
               stride_cs_b, stride_cs_d, stride_cs_s, stride_cw_d, stride_cw_k,
               CONV_BIAS: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr, S_LEN: tl.constexpr, PTX: tl.constexpr,
               ROWS4: tl.constexpr = False, n_start=0, BLOCK_B: tl.constexpr = 1, BLOCK_N: tl.constexpr = 1):
    # The conv update of a finished (rows o_b, features o_n) output tile: features [conv_start,
    # conv_start + conv_dim) are conv channels, cs_ptr their state (B, conv_dim, S_LEN), cw_ptr the
    # weights (conv_dim, W), cb_ptr the bias. State slot s holds input (s - S_LEN) relative to the
    # new one; the window is its last W-1 slots (tap s - (S_LEN - (W-1))) and the new input (tap
    # W-1): the product as stored (rounded), as the unfused conv reads it. Unrolled over the slots
    # with tiles in the product's layout (a (B, N, S) tile made Triton 3.6 spill at d_model 2048).
    # Only this program reads or writes these (row, channel) slots, but the tile of a few features
    # is held by several threads (replicas in every warp), which run apart: a barrier between the
    # reads of a slot and the shift that overwrites it. Without it a late replica read an already
    # shifted slot (H100: one output in 8512 off by 1.3 at mamba2-1.3b's in_proj, 8 features per
    # program).
    o_c = o_n - conv_start
    m_c = m_n & (o_c >= 0) & (o_c < conv_dim)
    m_bc = m_b[:, None] & m_c[None, :]
    p_cs = cs_ptr + o_b[:, None].to(tl.int64) * stride_cs_b + o_c[None, :] * stride_cs_d
    p_cw = cw_ptr + o_c * stride_cw_d
    b_conv = b_out.to(tl.float32) * tl.load(p_cw + (W - 1) * stride_cw_k, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if CONV_BIAS:
        b_conv += tl.load(cb_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if ROWS4:
        # Contiguous 4-slot state (stride_cs_d 4, stride_cs_s 1): each row's slots of the tile's
        # channels are 4 * BLOCK_N contiguous values, loaded and stored as one (B, 4 * BLOCK_N) tile
        # (16-byte accesses) and split into the slots in registers. Per-slot (B, N) tiles in the
        # product's layout read 2 of every 8 bytes: at 64 rows that epilogue took ~30 us (H100, session 9).
        o_j = tl.arange(0, 4 * BLOCK_N)
        o_cj = n_start - conv_start + o_j // 4
        m_j = m_b[:, None] & ((o_cj >= 0) & (o_cj < conv_dim))[None, :]
        p_j = cs_ptr + o_b[:, None].to(tl.int64) * stride_cs_b + (n_start - conv_start) * 4 + o_j[None, :]
        b_e, b_o = tl.split(tl.reshape(tl.load(p_j, mask=m_j, other=0.0), (BLOCK_B, BLOCK_N, 2, 2)))
        b_s0, b_s2 = tl.split(b_e)  # slot 2i + j is element [i, j]
        b_s1, b_s3 = tl.split(b_o)
        if W == 5:
            b_conv += b_s0.to(tl.float32) * tl.load(p_cw, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if W >= 4:
            b_conv += b_s1.to(tl.float32) * tl.load(p_cw + (W - 4) * stride_cw_k, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if W >= 3:
            b_conv += b_s2.to(tl.float32) * tl.load(p_cw + (W - 3) * stride_cw_k, mask=m_c, other=0.0).to(tl.float32)[None, :]
        b_conv += b_s3.to(tl.float32) * tl.load(p_cw + (W - 2) * stride_cw_k, mask=m_c, other=0.0).to(tl.float32)[None, :]
        tl.debug_barrier()  # every slot read before the shift overwrites it
        b_new = tl.join(tl.join(b_s1, b_s3), tl.join(b_s2, b_out.to(cs_ptr.dtype.element_ty)))
        tl.store(p_j, tl.reshape(b_new, (BLOCK_B, 4 * BLOCK_N)), mask=m_j)
    else:
        for i_s in tl.static_range(S_LEN):
            b_slot = tl.load(p_cs + i_s * stride_cs_s, mask=m_bc, other=0.0)
            if i_s >= S_LEN - (W - 1):
                b_tap = tl.load(p_cw + (i_s - (S_LEN - (W - 1))) * stride_cw_k, mask=m_c, other=0.0).to(tl.float32)
                b_conv += b_slot.to(tl.float32) * b_tap[None, :]
            tl.debug_barrier()  # every thread has read slot i_s - 1 (previous iteration) and slot i_s
            if i_s > 0:
                tl.store(p_cs + (i_s - 1) * stride_cs_s, b_slot, mask=m_bc)
        tl.store(p_cs + (S_LEN - 1) * stride_cs_s, b_out.to(cs_ptr.dtype.element_ty), mask=m_bc)
    if SILU:
        b_conv = b_conv * ptx_sigmoid(b_conv, PTX)
    return tl.where(m_c[None, :], b_conv.to(b_out.dtype), b_out)


@triton.jit
def _finish_tile(b_acc, b_ss, o_b, m_b, o_n, m_n, K, eps, bias_ptr, out_ptr, stride_o_b, stride_o_n,
                 cs_ptr, cw_ptr, cb_ptr, conv_start, conv_dim, stride_cs_b, stride_cs_d, stride_cs_s,
                 stride_cw_d, stride_cw_k, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, CONV: tl.constexpr,
                 CONV_BIAS: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr, S_LEN: tl.constexpr, PTX: tl.constexpr,
                 ROWS4: tl.constexpr = False, n_start=0, BLOCK_B: tl.constexpr = 1, BLOCK_N: tl.constexpr = 1):
    # The epilogue of both product kernels: the norm's row scale rsqrt(mean(s^2) + eps) (SCALE; b_ss
    # holds the rows' sums of squares), the bias, the conv update (CONV), the store.
    if SCALE:
        b_acc *= (1.0 / tl.sqrt(b_ss / K + eps))[:, None]
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_out = b_acc.to(out_ptr.dtype.element_ty)
    if CONV:
        b_out = _conv_tile(b_out, o_b, m_b, o_n, m_n, cs_ptr, cw_ptr, cb_ptr, conv_start, conv_dim,
                           stride_cs_b, stride_cs_d, stride_cs_s, stride_cw_d, stride_cw_k,
                           CONV_BIAS, SILU, W, S_LEN, PTX, ROWS4, n_start, BLOCK_B, BLOCK_N)
    tl.store(out_ptr + o_b[:, None] * stride_o_b + o_n[None, :] * stride_o_n, b_out, mask=m_b[:, None] & m_n[None, :])


@triton.jit
def _decode_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, nw_ptr, res_out_ptr, cs_ptr, cw_ptr, cb_ptr,
    batch, N, K, eps, conv_start, conv_dim,
    stride_x_b, stride_x_k, stride_w_n, stride_w_k, stride_o_b, stride_o_n,
    stride_r_b, stride_r_k, stride_ro_b, stride_ro_k,
    stride_cs_b, stride_cs_d, stride_cs_s, stride_cw_d, stride_cw_k,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    CONV: tl.constexpr, CONV_BIAS: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr, S_LEN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr,
    USE_PDL: tl.constexpr, PTX: tl.constexpr, W_EVICT: tl.constexpr,
):
    # NORM_ADD: res_ptr is the residual (if HAS_RESIDUAL), res_out_ptr takes the sum.
    # NORM_GATE / NORM_GATE_AFTER: res_ptr is the gate z.
    # CONV: output features [conv_start, conv_start + conv_dim) are conv channels; cs_ptr is their
    # state (B, conv_dim, S_LEN), cw_ptr the weights (conv_dim, W), cb_ptr the bias.
    i_n = tl.program_id(0)
    o_b = tl.arange(0, BLOCK_B)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_b, m_n = o_b < batch, o_n < N
    b_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    b_ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Unrolled over K: the chunks are independent loads, all issued before the first sum.
    for i_k in tl.static_range(K_BLOCKS):
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        m_bk = m_b[:, None] & m_k[None, :]
        b_w = tl.load(w_ptr + o_n[:, None].to(tl.int64) * stride_w_n + o_k[None, :] * stride_w_k,
                      mask=m_n[:, None] & m_k[None, :], other=0.0, eviction_policy=W_EVICT).to(tl.float32)
        if NORM != 0:
            b_nw = tl.load(nw_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]  # a parameter: before the wait
        if USE_PDL and i_k == 0:  # the first weight chunk is in flight while the predecessor finishes
            tl.extra.cuda.gdc_wait()
        b_x = tl.load(x_ptr + o_b[:, None] * stride_x_b + o_k[None, :] * stride_x_k,
                      mask=m_bk, other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_K)
        if NORM == 1:
            if HAS_RESIDUAL:
                b_x += tl.load(res_ptr + o_b[:, None] * stride_r_b + o_k[None, :] * stride_r_k,
                               mask=m_bk, other=0.0).to(tl.float32)
            # Every program has the sum; the first one writes it out.
            if i_n == 0:
                tl.store(res_out_ptr + o_b[:, None] * stride_ro_b + o_k[None, :] * stride_ro_k,
                         b_x.to(res_out_ptr.dtype.element_ty), mask=m_bk)
        if NORM == 2 or NORM == 3:
            b_z = tl.load(res_ptr + o_b[:, None] * stride_r_b + o_k[None, :] * stride_r_k,
                          mask=m_bk, other=0.0).to(tl.float32)
            b_gate = b_z * ptx_sigmoid(b_z, PTX)
            if NORM == 2:
                b_x *= b_gate
        if NORM != 0:
            b_ss += tl.sum(b_x * b_x, axis=1)
            b_x *= b_nw
        if NORM == 3:
            b_x *= b_gate
        if BLOCK_B == 1:
            # One row: reduce the weight tile along K in the layout it was loaded in (the
            # (B, N, K) broadcast below makes Triton 3.6 pass every weight tile through shared
            # memory first: 8 store / barrier / load rounds per program at mamba-1.4b's in_proj).
            b_acc += tl.sum(b_w * b_x, axis=1)[None, :]
        else:
            b_acc += tl.sum(b_x[:, None, :] * b_w[None, :, :], axis=2)
    _finish_tile(b_acc, b_ss, o_b, m_b, o_n, m_n, K, eps, bias_ptr, out_ptr, stride_o_b, stride_o_n,
                 cs_ptr, cw_ptr, cb_ptr, conv_start, conv_dim, stride_cs_b, stride_cs_d, stride_cs_s,
                 stride_cw_d, stride_cw_k, HAS_BIAS, NORM != 0, CONV, CONV_BIAS, SILU, W, S_LEN, PTX)


@triton.jit
def _dot_step(b_acc, b_ss, b_x, b_w, b_nw, NORM: tl.constexpr, FP32: tl.constexpr):
    # One K step of the tl.dot kernel: b_acc += x_tile @ w_tile; NORM_RMS: x_tile * norm_weight into
    # the dot, its rows' sums of squares into b_ss.
    if NORM == 4:
        b_xf = b_x.to(tl.float32)
        b_ss += tl.sum(b_xf * b_xf, axis=1)
        b_x = b_xf * b_nw.to(tl.float32)[None, :]
        if not FP32:
            b_x = b_x.to(b_w.dtype)
    if FP32:  # mixed or fp32 operands: exact fp32 products
        b_acc = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), b_acc, input_precision="ieee")
    else:  # bf16 / fp16 on the tensor cores, fp32 accumulation
        b_acc = tl.dot(b_x, b_w, b_acc)
    return b_acc, b_ss


@triton.jit
def _row_sums(p_sums, o_b, m_b, n_sums, stride_b, BLOCK_S: tl.constexpr):
    # Each row's total of its n_sums fp32 partial sums of squares (NORM_SUMS), in a fixed order.
    o_s = tl.arange(0, BLOCK_S)
    p = p_sums + o_b[:, None].to(tl.int64) * stride_b + o_s[None, :]
    return tl.sum(tl.load(p, mask=m_b[:, None] & (o_s < n_sums)[None, :], other=0.0), axis=1)


@triton.jit
def _prefetch_l2(p_row, n_bytes):
    # An L2 prefetch of n_bytes (a multiple of 16) from each 16-byte aligned address of p_row (sm_90 bulk
    # prefetch: one instruction per address, nothing held); the value returned is a dummy.
    return tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                     [p_row, n_bytes + tl.zeros_like(p_row.to(tl.int64)).to(tl.int32)],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_line(p, m):
    # An L2 prefetch of the line holding each address of p where m (per thread: no bulk prefetch's
    # uniform operands, which ptxas serialises over a warp's distinct addresses); the value is a dummy.
    return tl.inline_asm_elementwise("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\t@p prefetch.global.L2 [$1];"
                                     "\n\tmov.u32 $0, 0;\n\t}", "=r,l,r", [p, m.to(tl.int32)],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _dot_x_tile(p_x, x_desc, o_k, m_k, m_b, stride_x_k, b_start, k0, TMA: tl.constexpr):
    # The (BLOCK_B, BLOCK_K) x tile at K offset k0: by TMA (rows past the batch and columns past K read
    # as zeros), or pointers (p_x: the rows' pointers, o_k = k0 + arange).
    if TMA:
        return x_desc.load([b_start, k0])
    return tl.load(p_x + o_k[None, :] * stride_x_k, mask=m_b[:, None] & m_k[None, :], other=0.0)


@triton.jit
def _dot_w_tile(p_w, w_desc, o_k, m_k, m_n, stride_w_k, n_start, k0, TMA: tl.constexpr):
    # The (BLOCK_K, BLOCK_N) weight tile at K offset k0, as _dot_x_tile (the descriptor's block is (BLOCK_N, BLOCK_K)).
    if TMA:
        return tl.trans(w_desc.load([n_start, k0]))
    return tl.load(p_w + o_k[:, None] * stride_w_k, mask=m_k[:, None] & m_n[None, :], other=0.0)


@triton.jit
def _decode_linear_dot_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, nw_ptr, cs_ptr, cw_ptr, cb_ptr, part_ptr, ss_ptr, cnt_ptr,
    batch, N, K, k_split, eps, conv_start, conv_dim, n_sums,
    stride_x_b, stride_x_k, stride_w_n, stride_w_k, stride_o_b, stride_o_n, stride_sums_b,
    stride_cs_b, stride_cs_d, stride_cs_s, stride_cw_d, stride_cw_k, w_desc, x_desc,
    HAS_BIAS: tl.constexpr, FP32: tl.constexpr, NORM: tl.constexpr,
    CONV: tl.constexpr, CONV_BIAS: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr, S_LEN: tl.constexpr,
    ROWS4: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    SPLIT: tl.constexpr, PEEL: tl.constexpr, USE_PDL: tl.constexpr, LAUNCH_EARLY: tl.constexpr,
    PTX: tl.constexpr,
    TMA_W: tl.constexpr, TMA_X: tl.constexpr, PREFETCH_K: tl.constexpr, PREFETCH_LINE: tl.constexpr,
    BLOCK_S: tl.constexpr = 1, SUMS_EARLY: tl.constexpr = False,
    over_start=0, OVER: tl.constexpr = False,
):
    # Program (i_n, i_s) of row block i_b: features [i_n * BLOCK_N, +BLOCK_N) over K range
    # [i_s * k_split, +k_split). NORM_RMS: x is RMS-normalised on the fly: the tile fed to the dot is
    # x * norm_weight, the rows' sums of squares accumulate beside it and rsqrt(mean + eps) scales the
    # finished rows (a row scale commutes with the product). CONV: as in _decode_linear_kernel.
    # SPLIT > 1: part_ptr (SPLIT, B_pad, N) fp32 and ss_ptr (n_tiles, SPLIT, B_pad) take the partial
    # tile and sums of squares; cnt_ptr[i_n] counts the tile's finished splits; the last one adds
    # the partials up in split order (the same bits whichever program is last) and finishes the tile.
    # NORM_SUMS: x is already times the norm weight and nw_ptr holds (B, n_sums) fp32 partial sums of
    # squares of the rows (ssm_decode_step's norm_weight): the program that finishes a tile scales its rows.
    # OVER (one row block, SPLIT 1, NORM 0 or 5): the grid covers the features below over_start, and program
    # pid also computes feature over_start + pid (if < N) from the same x tiles: b_of holds its elementwise
    # products over the K loop, summed once at the end.
    pid = tl.program_id(0)
    i_n, i_s, i_b = pid // SPLIT, pid % SPLIT, tl.program_id(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_b, m_n = o_b < batch, o_n < N
    p_x = x_ptr + o_b[:, None].to(tl.int64) * stride_x_b
    p_w = w_ptr + o_n[None, :].to(tl.int64) * stride_w_n
    b_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    b_ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    k_lo = i_s * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    o_k = k_lo + tl.arange(0, BLOCK_K)
    m_k = o_k < k_hi
    b_nw = b_ss  # unused without the norm (NORM_NONE)
    if OVER:  # this program's overflow feature: its weight row (past N: row N - 1, not stored), its products with x
        i_of = over_start + pid
        has_of = i_of < N
        p_of = w_ptr + tl.minimum(i_of, N - 1).to(tl.int64) * stride_w_n
        b_of = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    if NORM == 4:  # a parameter: loaded before the wait, and one K step ahead in the loop
        b_nw = tl.load(nw_ptr + o_k, mask=m_k, other=0.0)
    if PREFETCH_K > 0:  # the weight rows' first PREFETCH_K columns into L2 (rows past N: row N - 1 again)
        p_pf = w_ptr + tl.minimum(o_n, N - 1).to(tl.int64) * stride_w_n + k_lo
        if PREFETCH_LINE > 0:  # one prefetch per 128-byte line (PREFETCH_LINE values), per thread
            o_l = tl.arange(0, PREFETCH_K // PREFETCH_LINE) * PREFETCH_LINE
            _prefetch_line(p_pf[:, None] + o_l[None, :], (k_lo + o_l < k_hi)[None, :] & m_n[:, None])
        else:  # one bulk prefetch per row
            n_bytes = tl.minimum(k_hi - k_lo, PREFETCH_K) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8) // 16 * 16
            if n_bytes > 0:
                _prefetch_l2(p_pf, n_bytes)
    if PEEL:  # the first weight tile is in flight while the predecessor finishes
        b_w = _dot_w_tile(p_w, w_desc, o_k, m_k, m_n, stride_w_k, i_n * BLOCK_N, k_lo, TMA_W)
    if USE_PDL:
        if LAUNCH_EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if NORM == 5 and (SPLIT == 1 or SUMS_EARLY):  # written by the predecessor; in flight over the K loop
        b_ss = _row_sums(nw_ptr, o_b, m_b, n_sums, stride_sums_b, BLOCK_S)
    if PEEL:
        b_x = _dot_x_tile(p_x, x_desc, o_k, m_k, m_b, stride_x_k, i_b * BLOCK_B, k_lo, TMA_X)
        if NORM == 4:
            b_nw_next = tl.load(nw_ptr + o_k + BLOCK_K, mask=o_k + BLOCK_K < k_hi, other=0.0)
        b_acc, b_ss = _dot_step(b_acc, b_ss, b_x, b_w, b_nw, NORM, FP32)
        if NORM == 4:
            b_nw = b_nw_next
        if OVER:
            b_of += b_x.to(tl.float32) * tl.load(p_of + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        k_lo += BLOCK_K
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < k_hi
        b_x = _dot_x_tile(p_x, x_desc, o_k, m_k, m_b, stride_x_k, i_b * BLOCK_B, k0, TMA_X)
        b_w = _dot_w_tile(p_w, w_desc, o_k, m_k, m_n, stride_w_k, i_n * BLOCK_N, k0, TMA_W)
        if NORM == 4:
            # The next step's norm weight is in flight while this step's waits for its use: a load
            # used in its own step exposed one L2 round trip per K step (session 7).
            b_nw_next = tl.load(nw_ptr + o_k + BLOCK_K, mask=o_k + BLOCK_K < k_hi, other=0.0)
        b_acc, b_ss = _dot_step(b_acc, b_ss, b_x, b_w, b_nw, NORM, FP32)
        if NORM == 4:
            b_nw = b_nw_next
        if OVER:
            b_of += b_x.to(tl.float32) * tl.load(p_of + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
    if USE_PDL and not LAUNCH_EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    if SPLIT == 1:
        _finish_tile(b_acc, b_ss, o_b, m_b, o_n, m_n, K, eps, bias_ptr, out_ptr, stride_o_b, stride_o_n,
                     cs_ptr, cw_ptr, cb_ptr, conv_start, conv_dim, stride_cs_b, stride_cs_d, stride_cs_s,
                     stride_cw_d, stride_cw_k, HAS_BIAS, NORM != 0, CONV, CONV_BIAS, SILU, W, S_LEN, PTX, ROWS4,
                     i_n * BLOCK_N, BLOCK_B, BLOCK_N)
        if OVER:
            if has_of:
                b_o = tl.sum(b_of, axis=1)
                if NORM == 5:
                    b_o *= 1.0 / tl.sqrt(b_ss / K + eps)
                if HAS_BIAS:
                    b_o += tl.load(bias_ptr + i_of).to(tl.float32)
                tl.store(out_ptr + o_b * stride_o_b + i_of * stride_o_n, b_o.to(out_ptr.dtype.element_ty), mask=m_b)
    else:
        n_pad = tl.num_programs(1) * BLOCK_B  # rows of the partial buffers
        p_part = part_ptr + o_b[:, None].to(tl.int64) * N + o_n[None, :]
        tl.store(p_part + i_s * n_pad * N, b_acc, mask=m_n[None, :])
        p_ss = ss_ptr + i_n * SPLIT * n_pad + o_b
        if NORM == 4:
            tl.store(p_ss + i_s * n_pad, b_ss)
        # Every thread's partial is stored before the tile's counter moves (release, GPU scope).
        tl.debug_barrier()
        n_done = tl.atomic_add(cnt_ptr + i_n * tl.num_programs(1) + i_b, 1, sem="acq_rel", scope="gpu")
        if n_done == SPLIT - 1:
            tl.atomic_xchg(cnt_ptr + i_n * tl.num_programs(1) + i_b, 0, sem="relaxed", scope="gpu")
            b_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            if NORM == 4:
                b_ss = tl.zeros([BLOCK_B], dtype=tl.float32)
            for j in tl.static_range(SPLIT):  # ".cg": from L2, where the other programs' stores are
                b_acc += tl.load(p_part + j * n_pad * N, mask=m_n[None, :], other=0.0, cache_modifier=".cg")
                if NORM == 4:
                    b_ss += tl.load(p_ss + j * n_pad, cache_modifier=".cg")
            if NORM == 5 and not SUMS_EARLY:
                b_ss = _row_sums(nw_ptr, o_b, m_b, n_sums, stride_sums_b, BLOCK_S)
            _finish_tile(b_acc, b_ss, o_b, m_b, o_n, m_n, K, eps, bias_ptr, out_ptr, stride_o_b, stride_o_n,
                         cs_ptr, cw_ptr, cb_ptr, conv_start, conv_dim, stride_cs_b, stride_cs_d, stride_cs_s,
                         stride_cw_d, stride_cw_k, HAS_BIAS, NORM != 0, CONV, CONV_BIAS, SILU, W, S_LEN, PTX,
                         ROWS4, i_n * BLOCK_N, BLOCK_B, BLOCK_N)


def _outputs(x, weight):
    return torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)


def layout_key(t):
    """What a plan key needs of an optional tensor operand: None, or its shape, strides and dtype."""
    return None if t is None else (t.shape, t.stride(), t.dtype)


_NO_CONV = (None, None, None, 0, False)


def _conv_key(conv):
    if conv is None:
        return None
    conv_state, conv_weight, conv_bias, conv_start, silu = conv
    return (layout_key(conv_state), layout_key(conv_weight), None if conv_bias is None else conv_bias.dtype,
            conv_start, silu)


def _launch_row_norm(x, residual, norm_weight, res_out, eps, norm, normed=None):
    """The normalised rows (B, K) in fp32 of x (and residual or gate, as in _launch_small), or into normed."""
    batch, n_in = x.shape
    if normed is None:
        normed = torch.empty(batch, n_in, device=x.device, dtype=torch.float32 if PREPASS_FP32 else x.dtype)
    key = ("row_norm", x.device, x.shape, x.stride(), x.dtype, layout_key(residual), norm_weight.dtype,
           layout_key(res_out), normed.dtype, eps, norm)
    plan = _PLANS.get(key)
    if plan is None:
        block_k = next_pow2(n_in)
        pdl = use_pdl(x)
        plan = _PLANS[key] = Plan(
            _row_norm_kernel, (batch,), n_in, eps, *x.stride(),
            *(residual.stride() if residual is not None else (0, 0)),
            *(res_out.stride() if res_out is not None else (0, 0)),
            NORM=norm, HAS_RESIDUAL=residual is not None, BLOCK_K=block_k, USE_PDL=pdl,
            PTX=ptx_math(_row_norm_kernel), num_warps=4 if block_k <= 2048 else 8, **pdl_launch(pdl))
    plan(x, residual, norm_weight, res_out, normed)
    return normed


def _prepass(norm, n_in, has_conv):
    """Whether the norm runs as the row pre-pass (else folded into the product): the switches above."""
    if norm == NORM_NONE or not NORM_PREPASS or not PREPASS_MIN_K <= n_in <= PREPASS_MAX_K:
        return False
    if norm == NORM_RMS:
        return PREPASS_RMS
    if norm != NORM_ADD:
        return PREPASS_GATED
    return PREPASS_ADD_NORM_CONV if has_conv else PREPASS_ADD_NORM_ALONE


def _small_config(n_in, norm, conv):
    """(BLOCK_N, fp32 values per product tile) of the broadcast-sum kernel for rows n_in wide with
    the prologue ``norm`` (after the pre-pass decision) and the conv (bool): FOLD_BLOCK_N for Mamba-2's
    wide folds, WIDE_BLOCK_N for other wide rows except the gated fold, else BLOCK_N."""
    if n_in < WIDE_K or norm in (NORM_GATE, NORM_GATE_AFTER):
        return BLOCK_N, TILE_ELEMS
    if norm == NORM_RMS:
        return FOLD_RMS_BLOCK_N, FOLD_TILE_ELEMS
    if norm == NORM_ADD and conv:
        return FOLD_BLOCK_N, FOLD_TILE_ELEMS
    return WIDE_BLOCK_N, TILE_ELEMS


def _launch_small(x, weight, bias, out, residual=None, norm_weight=None, res_out=None, eps=0.0, norm=NORM_NONE,
                  conv=None):
    """residual: the residual (NORM_ADD) or the gate z (NORM_GATE*). conv: None or (conv_state,
    conv_weight, conv_bias, conv_start, silu)."""
    if norm != NORM_NONE and _prepass(norm, x.shape[1], conv is not None):
        x = _launch_row_norm(x, residual, norm_weight, res_out, eps, norm)
        residual = norm_weight = res_out = None
        norm = NORM_NONE
    conv_state, conv_weight, conv_bias, conv_start, silu = conv or _NO_CONV
    key = ("small", x.device, x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype,
           None if bias is None else bias.dtype, out.stride(), out.dtype, layout_key(residual),
           None if norm_weight is None else norm_weight.dtype, layout_key(res_out), eps, norm, _conv_key(conv))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _small_plan(x, weight, bias, out, residual, res_out, eps, norm, conv)
    run, registers = plan
    compiled = run(x, weight, bias, out, residual, norm_weight, res_out, conv_state, conv_weight, conv_bias)
    if registers is not None and registers not in _REGISTERS:
        _REGISTERS[registers] = getattr(compiled, "n_regs", 0)


def _small_plan(x, weight, bias, out, residual, res_out, eps, norm, conv):
    """(the launch Plan, the _REGISTERS key or None) of _launch_small's kernel for these operands."""
    batch, n_in = x.shape
    block_b = next_pow2(batch)
    block_n, tile_elems = _small_config(n_in, norm, conv is not None)
    block_k = min(next_pow2(n_in), max(16, tile_elems // (block_b * block_n)))
    pdl = use_pdl(x)
    conv_state, conv_weight, conv_bias, conv_start, silu = conv or _NO_CONV
    scalars = (batch, weight.shape[0], n_in, eps, conv_start, conv_weight.shape[0] if conv is not None else 0,
               *x.stride(), *weight.stride(), *out.stride(),
               *(residual.stride() if residual is not None else (0, 0)),
               *(res_out.stride() if res_out is not None else (0, 0)),
               *(conv_state.stride() if conv is not None else (0, 0, 0)),
               *(conv_weight.stride() if conv is not None else (0, 0)))
    kwargs = dict(
        HAS_BIAS=bias is not None, NORM=norm, HAS_RESIDUAL=residual is not None,
        CONV=conv is not None, CONV_BIAS=conv_bias is not None, SILU=silu,
        W=conv_weight.shape[1] if conv is not None else 1, S_LEN=conv_state.shape[2] if conv is not None else 1,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, K_BLOCKS=cdiv(n_in, block_k),
        USE_PDL=pdl, PTX=ptx_math(_decode_linear_kernel), W_EVICT="evict_first" if WEIGHT_EVICT_FIRST else "",
        num_warps=NUM_WARPS, **pdl_launch(pdl),
    )
    registers = (tuple(weight.shape), norm, conv is not None, block_b) if pdl else None
    return Plan(_decode_linear_kernel, (cdiv(weight.shape[0], block_n),), *scalars, **kwargs), registers


def _counters(device, n):
    """The split-K tiles' arrival counters on ``device`` (int32, zero between launches), or None
    while a CUDA graph is being captured before they exist (no allocation inside a capture)."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS[device] = torch.zeros(DOT_COUNTERS, device=device, dtype=torch.int32)
    return counters if n <= counters.numel() else None


def _scratch(device, shape, capturing):
    """An fp32 buffer of ``shape`` for a split-K launch: fresh under capture, else _SCRATCH's."""
    if capturing:
        return torch.empty(shape, device=device, dtype=torch.float32)
    buf = _SCRATCH.get((device, shape))
    if buf is None:
        buf = _SCRATCH[(device, shape)] = torch.empty(shape, device=device, dtype=torch.float32)
    return buf


def _aligned(t):
    """Rows of t (2-D) start 16-byte aligned and are contiguous along K (TMA, bulk prefetch)."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def _sm90(t):
    """t is on an sm_90+ CUDA device and kernels are compiled (TMA, bulk prefetch)."""
    return t.is_cuda and not triton_interpret() and sm90(t.device.index)


def _descriptor(t, block):
    """A TMA descriptor of t (2-D) with tiles of ``block`` (out of bounds: zeros), or None where t is
    not _aligned. The SSD's descriptor class: a launch-cache key (_launch.launch keys on it), its tensor
    held weakly."""
    from mamba_pkg.ops.ssd.chunk_scan import _descriptor_class

    return _descriptor_class()(t, list(t.shape), list(t.stride()), block) if _aligned(t) else None


def _launch_dot(x, weight, bias, out, norm_weight=None, eps=0.0, conv=None, sums=None):
    """The tl.dot kernel (more than SMALL_ROWS rows): norm_weight: x is RMS-normalised first
    (NORM_RMS); sums: (B, S) fp32 partial sums of squares that scale the rows (NORM_SUMS, x already
    times the norm weight); conv: as in _launch_small."""
    conv_state, conv_weight, conv_bias, conv_start, silu = conv or _NO_CONV
    key = ("dot", x.device, x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype,
           weight.data_ptr() % 16 == 0, None if bias is None else bias.dtype, out.stride(), out.dtype,
           None if norm_weight is None else norm_weight.dtype, eps, _conv_key(conv), layout_key(sums))
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _dot_plan(x, weight, bias, out, norm_weight, eps, conv, split_ok=True, sums=sums)
    counters = part = ss = None
    if plan.split > 1:
        counters = _COUNTERS.get(x.device)
        if counters is None:
            counters = _counters(x.device, 0)
        if counters is None or plan.counters > counters.numel():  # a capture before any counters: no split
            key += ("no split",)
            plan = _PLANS.get(key)
            if plan is None:
                plan = _PLANS[key] = _dot_plan(x, weight, bias, out, norm_weight, eps, conv, split_ok=False,
                                               sums=sums)
        else:
            part = _scratch(x.device, plan.part_shape, capturing)
            ss = _scratch(x.device, plan.ss_shape, capturing)
    ptrs = (x, weight, bias, out, norm_weight if sums is None else sums, conv_state, conv_weight, conv_bias, part, ss,
            counters)
    tma = plan.tma and (plan.interpret or DOT_TMA_EAGER or capturing or variant_needed(
        "decode_linear_dot_tma", (key, tuple([None if t is None else t.data_ptr() % 16 for t in ptrs]))))
    if not tma:
        plan.plain(*ptrs)
        return
    w_desc = _descriptor(weight, [plan.block_n, plan.block_k])
    x_desc = _descriptor(x, [plan.block_b, plan.block_k])
    launch(_decode_linear_dot_kernel, plan.grid, *ptrs, *plan.scalars, w_desc, x_desc,
           **{**plan.kwargs, "TMA_W": w_desc is not None, "TMA_X": x_desc is not None})


class _DotPlan:
    """_launch_dot's launch for one key: grid, scalar arguments, constexprs and launch options (TMA off),
    the launch Plan of the pointer loads (plain), the split-K buffers' shapes and counters, and whether TMA
    tiles may be taken (plan.tma) and how big."""

    __slots__ = ("grid", "scalars", "kwargs", "plain", "split", "over", "counters", "part_shape", "ss_shape", "tma",
                 "interpret", "block_b", "block_n", "block_k")


def _overflow(n_out, block_n, split, row_blocks, x, norm, conv):
    """1 where the launch of ``n_out`` features in tiles of ``block_n`` takes DOT_OVERFLOW (its last tile's
    features one per program of the others), else 0: that tile lies past one tile per SM and holds no more
    features than SMs; one row block, no K split, no norm in the K loop (norm: a norm weight), no conv
    channel among those features."""
    if not DOT_OVERFLOW or split != 1 or row_blocks != 1 or norm:
        return 0
    sms = DOT_OVERFLOW_SMS or (sm_count(x.device) if x.is_cuda else 0)
    start = sms * block_n
    if not (sms and start < n_out <= start + min(sms, block_n)):
        return 0
    if conv is not None and conv[3] + conv[1].shape[0] > start:  # conv channels [conv_start, + conv_dim)
        return 0
    return 1


def _dot_plan(x, weight, bias, out, norm_weight, eps, conv, split_ok, sums=None):
    batch, n_in = x.shape
    n_out = weight.shape[0]
    block_n, block_k, stages, warps, split = (dot_config(n_out, n_in)
                                              or (DOT_BLOCK_N, DOT_BLOCK_K, DOT_STAGES, DOT_WARPS, 1))
    if conv is not None:
        warps = max(warps, DOT_CONV_WARPS)
    if norm_weight is not None:
        warps = max(warps, DOT_NORM_WARPS)
    block_b = min(64, max(16, next_pow2(batch)))
    tiles, row_blocks = cdiv(n_out, block_n), cdiv(batch, block_b)
    if not split_ok:
        split = 1
    # 1: the last tile's features go one per program of the others, from over_start on (DOT_OVERFLOW).
    over = _overflow(n_out, block_n, split, row_blocks, x, norm_weight is not None, conv)
    over_start = (tiles - over) * block_n if over else 0
    flags = {}
    if DOT_FIT and x.is_cuda and (tiles - over) * split * row_blocks > sm_count(x.device):
        block_k, stages = DOT_FIT_BLOCK_K, DOT_FIT_STAGES
        if conv is not None:
            flags["maxnreg"] = DOT_CONV_MAXNREG
    if x.is_cuda:  # as many stages of x and weight tiles as the device's shared memory holds (4 KB spare)
        stage_bytes = block_k * (block_b * x.element_size() + block_n * weight.element_size())
        stages = max(2, min(stages, (_shared_memory(x.device.index) - 4096) // stage_bytes))
    k_split = cdiv(cdiv(n_in, block_k), split) * block_k
    # The CPU interpreter's tl.dot gets 16-bit operands wrong: it takes the fp32 route there.
    fp32 = x.dtype != weight.dtype or x.dtype == torch.float32 or triton_interpret()
    pdl = use_pdl(x)
    conv_state, conv_weight, conv_bias, conv_start, silu = conv or _NO_CONV
    hopper = _sm90(x)
    prefetch = DOT_PREFETCH_K if hopper and _aligned(weight) else 0
    line = 128 // weight.element_size() if DOT_PREFETCH_LINES else 0
    if prefetch and line:
        prefetch = next_pow2(max(min(prefetch, k_split), line))  # a power of two of lines, at most the K range's
    plan = _DotPlan()
    plan.grid = (tiles * split - over, row_blocks)
    plan.split, plan.over, plan.counters = split, over, tiles * row_blocks
    rows_pad = row_blocks * block_b
    plan.part_shape = (split, rows_pad, n_out)
    plan.ss_shape = (tiles, split, rows_pad)
    plan.scalars = (batch, n_out, n_in, k_split, eps, conv_start, conv_weight.shape[0] if conv is not None else 0,
                    0 if sums is None else sums.shape[1], *x.stride(), *weight.stride(), *out.stride(),
                    0 if sums is None else sums.stride(0),
                    *(conv_state.stride() if conv is not None else (0, 0, 0)),
                    *(conv_weight.stride() if conv is not None else (0, 0)))
    plan.kwargs = dict(
        HAS_BIAS=bias is not None, FP32=fp32,
        NORM=NORM_SUMS if sums is not None else NORM_NONE if norm_weight is None else NORM_RMS,
        BLOCK_S=1 if sums is None else next_pow2(sums.shape[1]), SUMS_EARLY=DOT_SUMS_EARLY,
        CONV=conv is not None, CONV_BIAS=conv_bias is not None, SILU=silu,
        W=conv_weight.shape[1] if conv is not None else 1, S_LEN=conv_state.shape[2] if conv is not None else 1,
        ROWS4=conv is not None and conv_state.shape[2] == 4 and conv_state.stride()[1:] == (4, 1) and DOT_CONV_ROWS4,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, SPLIT=split, PEEL=DOT_PEEL, USE_PDL=pdl,
        LAUNCH_EARLY=DOT_LAUNCH_EARLY, PTX=ptx_math(_decode_linear_dot_kernel), num_warps=warps,
        num_stages=stages, **flags, **pdl_launch(pdl), PREFETCH_K=prefetch, PREFETCH_LINE=line,
        TMA_W=False, TMA_X=False, over_start=over_start, OVER=bool(over),
    )
    plan.plain = Plan(_decode_linear_dot_kernel, plan.grid, *plan.scalars, None, None, **plan.kwargs)
    plan.interpret = triton_interpret()  # the interpreter runs descriptors too (CPU tests)
    plan.tma = DOT_TMA and (k_split // block_k >= DOT_TMA_MIN_STEPS or norm_weight is not None) and (
        plan.interpret or hopper)
    plan.block_b, plan.block_n, plan.block_k = block_b, block_n, block_k
    return plan


@launcher_op("decode_linear")
def _decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = _outputs(x, weight)
    if x.shape[0] <= SMALL_ROWS:
        _launch_small(x, weight, bias, out)
    else:
        _launch_dot(x, weight, bias, out)
    return out


@_decode_linear.register_fake
def _(x, weight, bias):
    return _outputs(x, weight)


def _norm_outputs(x, weight, residual, residual_in_fp32):
    res_out = torch.empty(x.shape, device=x.device, dtype=_residual_dtype(x, residual, residual_in_fp32))
    return _outputs(x, weight), res_out


@launcher_op("add_rms_norm_linear")
def _add_rms_norm_linear(x: Tensor, residual: Tensor | None, norm_weight: Tensor, weight: Tensor,
                         bias: Tensor | None, eps: float, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    out, res_out = _norm_outputs(x, weight, residual, residual_in_fp32)
    _launch_small(x, weight, bias, out, residual, norm_weight, res_out, eps, NORM_ADD)
    return out, res_out


@_add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, weight, bias, eps, residual_in_fp32):
    return _norm_outputs(x, weight, residual, residual_in_fp32)


@launcher_op("gated_rms_norm_linear")
def _gated_rms_norm_linear(x: Tensor, z: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                           eps: float, norm_before_gate: bool) -> Tensor:
    out = _outputs(x, weight)
    _launch_small(x, weight, bias, out, z, norm_weight, None, eps, NORM_GATE_AFTER if norm_before_gate else NORM_GATE)
    return out


@_gated_rms_norm_linear.register_fake
def _(x, z, norm_weight, weight, bias, eps, norm_before_gate):
    return _outputs(x, weight)


@launcher_op("rms_norm_linear")
def _rms_norm_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    out = _outputs(x, weight)
    if x.shape[0] <= SMALL_ROWS:
        _launch_small(x, weight, bias, out, None, norm_weight, None, eps, NORM_RMS)
    else:
        _launch_dot(x, weight, bias, out, norm_weight, eps)
    return out


@_rms_norm_linear.register_fake
def _(x, norm_weight, weight, bias, eps):
    return _outputs(x, weight)


@launcher_op("rms_scaled_linear")
def _rms_scaled_linear(x: Tensor, sums: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    out = _outputs(x, weight)
    _launch_dot(x, weight, bias, out, None, eps, sums=sums)
    return out


@_rms_scaled_linear.register_fake
def _(x, sums, weight, bias, eps):
    return _outputs(x, weight)


def _add_rms_norm_outputs(x, residual, residual_in_fp32):
    res_out = torch.empty(x.shape, device=x.device, dtype=_residual_dtype(x, residual, residual_in_fp32))
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), res_out


@launcher_op("add_rms_norm_rows")
def _add_rms_norm_rows(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float,
                       residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    normed, res_out = _add_rms_norm_outputs(x, residual, residual_in_fp32)
    _launch_row_norm(x, residual, norm_weight, res_out, eps, NORM_ADD, normed)
    return normed, res_out


@_add_rms_norm_rows.register_fake
def _(x, residual, norm_weight, eps, residual_in_fp32):
    return _add_rms_norm_outputs(x, residual, residual_in_fp32)


def _conv_outputs(x, residual, norm_weight, weight, residual_in_fp32):
    if norm_weight is None:
        return _outputs(x, weight), absent(x)
    return _norm_outputs(x, weight, residual, residual_in_fp32)


@launcher_op("linear_conv_step", mutates_args=("conv_state",))
def _linear_conv_step(x: Tensor, residual: Tensor | None, norm_weight: Tensor | None, weight: Tensor,
                      bias: Tensor | None, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                      conv_start: int, silu: bool, eps: float, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """decode_linear (norm_weight None) or add_rms_norm_linear with the conv folded in; the second
    output is absent without the norm."""
    out, res_out = _conv_outputs(x, residual, norm_weight, weight, residual_in_fp32)
    conv = (conv_state, conv_weight, conv_bias, conv_start, silu)
    if norm_weight is None and x.shape[0] > SMALL_ROWS:
        _launch_dot(x, weight, bias, out, conv=conv)
    elif norm_weight is None:
        _launch_small(x, weight, bias, out, conv=conv)
    else:
        _launch_small(x, weight, bias, out, residual, norm_weight, res_out, eps, NORM_ADD, conv=conv)
    return out, res_out


@_linear_conv_step.register_fake
def _(x, residual, norm_weight, weight, bias, conv_state, conv_weight, conv_bias, conv_start, silu, eps,
      residual_in_fp32):
    return _conv_outputs(x, residual, norm_weight, weight, residual_in_fp32)


def _check_conv(conv, x, weight):
    """conv = (conv_state (B, C, S), conv_weight (C, W), conv_bias (C,) or None, conv_start, activation).
    Each check is a few comparisons, and only a failing one builds its error (a decode step is host-bound)."""
    if not (isinstance(conv, tuple) and len(conv) == 5):
        raise TypeError("conv must be a tuple (conv_state, conv_weight, conv_bias, conv_start, activation)")
    conv_state, conv_weight, conv_bias, conv_start, activation = conv
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if not (isinstance(conv_weight, torch.Tensor) and conv_weight.dim() == 2 and conv_weight.dtype in FLOAT_DTYPES):
        check_tensor("conv_weight", conv_weight, ndim=2, dtype=FLOAT_DTYPES)
    channels, width = conv_weight.shape
    if not 2 <= width <= 8:
        raise ValueError(f"conv_weight must have shape (C, W) with W in 2..8, got {tuple(conv_weight.shape)}")
    if not (isinstance(conv_state, torch.Tensor) and conv_state.dim() == 3 and conv_state.shape[0] == x.shape[0]
            and conv_state.shape[1] == channels and conv_state.dtype in FLOAT_DTYPES):
        check_tensor("conv_state", conv_state, shape=(x.shape[0], channels, None), dtype=FLOAT_DTYPES)
    if conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state must have shape (B, C, S) with S >= W-1 = {width - 1}, "
                         f"got {tuple(conv_state.shape)}")
    if conv_bias is not None and not (isinstance(conv_bias, torch.Tensor) and conv_bias.shape == (channels,)
                                      and conv_bias.dtype in FLOAT_DTYPES):
        check_tensor("conv_bias", conv_bias, shape=(channels,), dtype=FLOAT_DTYPES)
    if not (isinstance(conv_start, int) and 0 <= conv_start <= weight.shape[0] - channels):
        raise ValueError(f"conv_start must be an int in [0, {weight.shape[0] - channels}] (the conv channels "
                         f"are outputs [conv_start, conv_start + {channels}) of {weight.shape[0]}), got {conv_start!r}")
    device = x.device
    if conv_state.device != device or conv_weight.device != device or (conv_bias is not None
                                                                       and conv_bias.device != device):
        check_same_device(x=x, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias)


def _launch_conv(x, residual, norm_weight, weight, bias, conv, eps, residual_in_fp32):
    conv_state, conv_weight, conv_bias, conv_start, activation = conv
    return _linear_conv_step(x, residual, norm_weight, weight, bias, conv_state, conv_weight, conv_bias,
                             int(conv_start), activation is not None, float(eps), residual_in_fp32)


# The decode products' input checks. Each is a few comparisons, and only a failing one builds its error
# (check_tensor's message, naming the argument): an eager decode step is host-bound.
def _check_x(x, max_rows):
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype in FLOAT_DTYPES):
        check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    if not 1 <= x.shape[0] <= max_rows:
        raise ValueError(f"x must have shape (B, K) with 1 <= B <= {max_rows}, got {tuple(x.shape)}")


def _check_weight_bias(x, weight, bias):
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and weight.dtype in FLOAT_DTYPES):
        check_tensor("weight", weight, shape=(None, x.shape[1]), dtype=FLOAT_DTYPES)
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],)
                                 and bias.dtype in FLOAT_DTYPES):
        check_tensor("bias", bias, shape=(weight.shape[0],), dtype=FLOAT_DTYPES)


def _check_norm_weight(norm_weight, x):
    if not (isinstance(norm_weight, torch.Tensor) and norm_weight.shape == (x.shape[1],)
            and norm_weight.dtype in FLOAT_DTYPES):
        check_tensor("norm_weight", norm_weight, shape=(x.shape[1],), dtype=FLOAT_DTYPES)


def _validate(x, weight, bias):
    """x (B, K) with 1 <= B <= MAX_ROWS, weight (N, K), bias (N,) or None, on one device."""
    _check_x(x, MAX_ROWS)
    _check_weight_bias(x, weight, bias)
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        check_same_device(x=x, weight=weight, bias=bias)


def decode_linear(x, weight, bias=None, *, conv=None, backend=None):
    """``x @ weight.T + bias`` for a decode step's few rows.

    Args:
        x: (B, K) with 1 <= B <= 64 (any strides).  weight: (N, K).  bias: (N,) or None.
            3-8 rows (and above, where dot_config is None), with x, weight and bias of one dtype
            and no conv: F.linear (cuBLAS is faster there).
        conv: None, or (conv_state (B, C, S), conv_weight (C, W), conv_bias (C,) or None,
            conv_start, activation): outputs [conv_start, conv_start + C) go through a
            depthwise causal conv update (causal_conv1d_update's math; W in 2..8, S >= W-1,
            activation None | "silu" | "swish"), conv_state advancing in place.
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (B, N) in x's dtype, accumulated in fp32.
    """
    _validate(x, weight, bias)
    if conv is not None:
        _check_conv(conv, x, weight)
    if resolve_backend(backend, x, weight) == "torch":
        return decode_linear_ref(x, weight, bias, conv)
    if conv is not None:
        return _launch_conv(x, None, None, weight, bias, conv, 0.0, False)[0]
    if (x.shape[0] > SMALL_ROWS and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
            and (x.shape[0] <= CUBLAS_MAX_ROWS or dot_config(weight.shape[0], x.shape[1]) is None)):
        return F.linear(x, weight, bias)  # cuBLAS: faster than either kernel there (CUBLAS_MAX_ROWS)
    return _decode_linear(x, weight, bias)


def _check_norm_inputs(x, extra_name, extra, norm_weight, weight, bias, extra_optional):
    """The shared checks of the fused-norm variants (1 <= B <= SMALL_ROWS; extra: the residual or the gate)."""
    _check_x(x, SMALL_ROWS)
    if not ((extra is None and extra_optional)
            or (isinstance(extra, torch.Tensor) and extra.shape == x.shape and extra.dtype in FLOAT_DTYPES)):
        check_tensor(extra_name, extra, shape=tuple(x.shape), dtype=FLOAT_DTYPES, optional=extra_optional)
    _check_norm_weight(norm_weight, x)
    _check_weight_bias(x, weight, bias)
    device = x.device
    if (weight.device != device or norm_weight.device != device or (bias is not None and bias.device != device)
            or (extra is not None and extra.device != device)):
        check_same_device(x=x, weight=weight, bias=bias, **{extra_name: extra}, norm_weight=norm_weight)


def add_rms_norm_linear(x, residual, norm_weight, weight, bias=None, eps=1e-5, residual_in_fp32=False, conv=None, *,
                        backend=None):
    """The prenorm block's add + RMSNorm and the in_proj that follows, in one launch.

    Args:
        x: (B, K) with 1 <= B <= 2 (SMALL_ROWS), the previous block's output.  residual: (B, K) or None (zero).
        norm_weight: (K,).  weight: (N, K).  bias: (N,) or None.
        residual_in_fp32: return the sum in fp32 (else in residual's dtype, or x's without one).
        conv: None, or a conv update folded into the output, as in :func:`decode_linear`.
        backend: "torch", "triton" or None (the device decides).
    Returns:
        out (B, N) in x's dtype: rmsnorm(x + residual) * norm_weight @ weight.T + bias, accumulated
        in fp32 (the normalised row is not rounded); s = x + residual (B, K).
    """
    _check_norm_inputs(x, "residual", residual, norm_weight, weight, bias, True)
    if conv is not None:
        _check_conv(conv, x, weight)
    if resolve_backend(backend, x, weight) == "torch":
        return add_rms_norm_linear_ref(x, residual, norm_weight, weight, bias, eps, residual_in_fp32, conv)
    if conv is not None:
        return _launch_conv(x, residual, norm_weight, weight, bias, conv, eps, residual_in_fp32)
    return _add_rms_norm_linear(x, residual, norm_weight, weight, bias, float(eps), residual_in_fp32)


def add_rms_norm_rows(x, residual, norm_weight, eps=1e-5, residual_in_fp32=False, *, backend=None):
    """A prenorm block's residual add + RMSNorm for a decode step's rows, one program per row, chained
    with the decode kernels around it by programmatic dependent launch (the norm before a product that
    cannot fold it: more than SMALL_ROWS rows).

    Args:
        x: (B, K) with 1 <= B <= 64, the previous block's output.  residual: (B, K) or None (zero).
        norm_weight: (K,), K <= 8192.
        residual_in_fp32: return the sum in fp32 (else in residual's dtype, or x's without one).
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (normed (B, K) in x's dtype: rmsnorm(x + residual) * norm_weight, s = x + residual (B, K)).
    """
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    if not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] > PREPASS_MAX_K:
        raise ValueError(f"x must have shape (B, K) with 1 <= B <= {MAX_ROWS}, K <= {PREPASS_MAX_K}, "
                         f"got {tuple(x.shape)}")
    check_tensor("residual", residual, shape=tuple(x.shape), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("norm_weight", norm_weight, shape=(x.shape[1],), dtype=FLOAT_DTYPES)
    check_same_device(x=x, residual=residual, norm_weight=norm_weight)
    if resolve_backend(backend, x) == "torch":
        s = x.float() if residual is None else x.float() + residual.float()
        normed = layer_norm_ref(s, norm_weight, None, eps=eps, is_rms_norm=True).to(x.dtype)
        return normed, s.to(_residual_dtype(x, residual, residual_in_fp32))
    return _add_rms_norm_rows(x, residual, norm_weight, float(eps), residual_in_fp32)


def gated_rms_norm_linear(x, z, norm_weight, weight, bias=None, eps=1e-5, norm_before_gate=False, *, backend=None):
    """Mamba-2's gated RMSNorm (one group over the whole row) and the out_proj that follows, in one launch.

    Args:
        x: (B, K) with 1 <= B <= 2 (SMALL_ROWS), the SSM output.  z: (B, K), the gate.  norm_weight: (K,).
        weight: (N, K).  bias: (N,) or None.
        norm_before_gate: False (Mamba-2's default): normalise x * silu(z); True: normalise x,
            then multiply by silu(z).
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (B, N) in x's dtype, accumulated in fp32 (the normalised row is not rounded).
    """
    _check_norm_inputs(x, "z", z, norm_weight, weight, bias, False)
    if resolve_backend(backend, x, weight) == "torch":
        return gated_rms_norm_linear_ref(x, z, norm_weight, weight, bias, eps, norm_before_gate)
    return _gated_rms_norm_linear(x, z, norm_weight, weight, bias, float(eps), norm_before_gate)


def rms_norm_linear(x, norm_weight, weight, bias=None, eps=1e-5, *, backend=None):
    """An RMSNorm of the rows and the linear layer that follows, in one launch (Mamba-2's out_proj
    after its gated norm when the SSM step already applied the gate: x = y * silu(z)).

    Args:
        x: (B, K) with 1 <= B <= 64.  norm_weight: (K,).  weight: (N, K).  bias: (N,) or None.
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (B, N) in x's dtype: (x * rsqrt(mean(x^2) + eps) * norm_weight) @ weight.T + bias, accumulated
        in fp32 (up to SMALL_ROWS rows the normalised row is not rounded; above, x * norm_weight is rounded to
        weight's dtype for the tensor cores and the row scale applied to the fp32 result).
    """
    _check_x(x, MAX_ROWS)
    _check_weight_bias(x, weight, bias)
    _check_norm_weight(norm_weight, x)
    if weight.device != x.device or norm_weight.device != x.device or (bias is not None and bias.device != x.device):
        check_same_device(x=x, weight=weight, bias=bias, norm_weight=norm_weight)
    if resolve_backend(backend, x, weight) == "torch":
        return rms_norm_linear_ref(x, norm_weight, weight, bias, eps)
    return _rms_norm_linear(x, norm_weight, weight, bias, float(eps))


def rms_scaled_linear(x, sums, weight, bias=None, eps=1e-5, *, backend=None):
    """The second half of an RMSNorm folded into its producer, and the linear layer that follows, in one
    launch: the producer wrote x = v * norm_weight and partial sums of squares of v (ssm_decode_step with
    norm_weight: Mamba-2's gated output), and this is rmsnorm(v) * norm_weight @ weight.T + bias.

    Args:
        x: (B, K) with 1 <= B <= 64, 16-bit (the tensor-core kernel).  sums: (B, S) fp32, sums.sum(1) = each
            row's sum of squares of v (S <= 1024).  weight: (N, K) in x's dtype.  bias: (N,) or None.
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (B, N) in x's dtype: (x @ weight.T) * rsqrt(sums.sum(1) / K + eps) + bias, accumulated in fp32.
    """
    _check_x(x, MAX_ROWS)
    _check_weight_bias(x, weight, bias)
    if not (isinstance(sums, torch.Tensor) and sums.dim() == 2 and sums.shape[0] == x.shape[0]
            and sums.dtype == torch.float32):
        check_tensor("sums", sums, shape=(x.shape[0], None), dtype=(torch.float32,))
    if not 1 <= sums.shape[1] <= 1024:
        raise ValueError(f"sums must have shape (B, S) with 1 <= S <= 1024, got {tuple(sums.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a 16-bit dtype (bfloat16 or float16), got {x.dtype} "
                         f"and {weight.dtype}")
    if weight.device != x.device or sums.device != x.device or (bias is not None and bias.device != x.device):
        check_same_device(x=x, weight=weight, bias=bias, sums=sums)
    if resolve_backend(backend, x, weight) == "torch":
        return rms_scaled_linear_ref(x, sums, weight, bias, eps)
    return _rms_scaled_linear(x, sums, weight, bias, float(eps))
