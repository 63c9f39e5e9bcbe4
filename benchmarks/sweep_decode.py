"""Launch-config sweep of the decode-step kernels on the GPU, in one process (H100, bf16).

Parts (--parts, comma-separated):
- ssm: ssm_decode_step, Mamba-1 (mamba-130m: D=1536, R=48; mamba-1.4b: D=4096, R=128; N=16;
  bf16 state). Batch 1 with the split-K x_proj partials of conv_xproj_step (S = D/128):
  candidates (BLOCK_B, BLOCK_P, warps) of the in-kernel projection. Batch 64: dt by cuBLAS, then
  the kernel without the projection, candidates (BLOCK_B, BLOCK_P, warps); mamba_ssm's chain
  (dt_proj GEMM + exp + selective_state_update) as the reference.
- pair: conv_xproj_step + ssm_decode_step at batch 1 for conv_xproj's channel block BLOCK_D
  (more programs in the conv kernel, more partial sums for the SSM kernel to add).
- linear: decode_linear at batch 1 (BLOCK_N, TILE_ELEMS, warps) and 64 (the tl.dot kernel:
  BLOCK_N, BLOCK_K, stages, warps) against F.linear (cuBLAS); add_rms_norm_linear at batch 1
  against rms_norm_fn + decode_linear.
- fold: the in_proj launch variants of a Mamba-2 step at batch 1 (decode_linear, add + RMSNorm, each
  with and without the conv update folded in), mamba2-130m and mamba2-1.3b shapes, PDL on and off.
- probe: decode_linear at 3 and 8 rows (broadcast-sum kernel, tl.dot kernel, cuBLAS) and mamba-1.4b's SSM
  step at batch 64 (fp32 / bf16 state) in pieces against mamba_ssm's (bench_decode_ops' odd rows).
- gemm: decode_linear's tl.dot kernel at 64 rows on the models' shapes (GEMM64) against F.linear
  (cuBLAS), weights streaming from HBM: one CUDA graph of GEMM_COPIES launches, each on its own
  copy of the weight (together > the 50 MB L2), time per launch. Candidates: dot_config's pick,
  then (BLOCK_N, BLOCK_K, stages, warps, SPLIT) variants, PDL off, dependents launched late.
- model: whole decode steps (one CUDA-graph replay of our captured step, bf16 states) with a
  module setting switched, A against B, on the real model sizes (weights stream from HBM, unlike
  the isolated kernels above whose weights can stay in L2).
- ncu: one eager step of each --models model at --ncu-batch between cudaProfilerStart / Stop, for
  `ncu --profile-from-start off ...` (isolated kernel times, DRAM throughput, waves).
- timeline: the kernels of one replay of the captured step (ours under each TIMELINE setting, and
  mamba_ssm's captured step), from torch.profiler's trace: per kernel (name and grid) its count,
  mean duration and mean "advance" = how far its end moves the step's end past every kernel
  before it. With PDL a kernel starts early and waits (gdc_wait) inside its duration, so
  durations overlap; the advances add up to the step, so they say what each kernel costs.

Every time is a CUDA-graph replay (median). Prints one line per candidate and saves rows via
benchmarks.common.save_results ("sweep_decode").

    PYTHONPATH=. python3 benchmarks/sweep_decode.py [--parts ssm,pair,linear,model] [--budget-s 120]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time

import torch
import torch.nn.functional as F
import triton

from benchmarks.common import save_results, try_provider
from mamba_pkg.models.block import add_norm as _BLOCK_ADD_NORM
from mamba_pkg.ops import conv_xproj_step as cx
from mamba_pkg.ops import decode_linear as dl
from mamba_pkg.ops import ssm_decode_step as sds

BF = torch.bfloat16
MAMBA1 = {"mamba-130m": (1536, 48), "mamba-1.4b": (4096, 128)}  # d_inner, dt rank
N_STATE = 16
LINEAR = {  # (out_features, in_features)
    "mamba-1.4b in_proj": (8192, 2048), "mamba-1.4b out_proj": (2048, 4096),
    "mamba-130m in_proj": (3072, 768), "mamba-130m out_proj": (768, 1536),
}
SSM_B1 = [(1, 16, 4), (1, 16, 2), (1, 32, 4), (1, 32, 2), (1, 8, 4)]
SSM_B64 = [(1, 128, 4), (1, 256, 4), (1, 256, 8), (2, 64, 4), (4, 32, 4)]
PAIR_BLOCK_D = (64, 128, 256)
SMALL_LINEAR = [(4, 8192, 4), (2, 8192, 4), (4, 16384, 4)]
DOT_LINEAR = [(64, 128, 4, 4, 1), (32, 128, 4, 4, 1), (64, 128, 3, 4, 1), (64, 64, 5, 4, 1)]
NORM_BLOCK_N = (4, 8, 16)
# (model, batch, settings): each setting a dict {"module.ATTR": value} of mamba_pkg module attributes
# ("ops.decode_linear.BLOCK_N"); the first ({}) is the committed code. A setting repeated measures the
# noise of the A/B.
DL = "ops.decode_linear."
SDS = "ops.ssm_decode_step."
M2 = "models.mamba2."
LM = "models.lm."
CU = "models._cache_utils."
# Batch 9-64 products as decode_linear's tl.dot kernel (split-K in one launch), Mamba-2's conv in its
# in_proj and RMSNorm in its out_proj, Mamba-1's conv in its in_proj (session 9).
DOT_ALL = {CU + "STEP_DOT_MAX_ROWS": 64, M2 + "STEP_DOT": True, M2 + "STEP_DOT_NORM_OUT": True}
DOT_LM = {**DOT_ALL, LM + "STEP_LM_HEAD_DOT": True}
DOT_PEEL = {**DOT_ALL, DL + "DOT_PEEL": True}
# Session 10, batch 64 (committed: DOT_STAGES 6, DOT_FIT with 64-wide K steps in 6 stages): S9 = session 9's
# configs (4 stages, no fit), FIT128 = the fit as 3 stages of 128, STAGES4 = 4 stages where a launch fits one
# wave anyway, LATE_SSM = the SSM step not launching its successor early, SPLIT8 = split-K products of up to
# 256 programs (out_proj in 8 splits, two per SM), SMALL_DOT = the 130m models' products through the tl.dot
# kernel (32 features per program), M1_CHAIN = Mamba-1's x_proj / dt_proj by it too, PDL_NORM (below) = the
# block's add + RMSNorm as a PDL row kernel.
S9 = {DL + "DOT_STAGES": 4, DL + "DOT_FIT": False}
FIT128 = {DL + "DOT_FIT_BLOCK_K": 128, DL + "DOT_FIT_STAGES": 3}
STAGES4 = {DL + "DOT_STAGES": 4}
LATE_SSM = {SDS + "LATE_DEPENDENTS_ROWS": 16}
SPLIT8 = {DL + "DOT_TARGET_PROGRAMS": 256}
SMALL_DOT = {CU + "STEP_DOT_MIN_WEIGHT": 0, DL + "DOT_BLOCK_N": 32}
# Mamba-1's x_proj and dt_proj through the tl.dot kernel too: in_proj to out_proj one PDL chain.
M1_CHAIN = {"models.mamba.STEP_DOT_X_PROJ": True, CU + "STEP_DOT_MIN_WEIGHT": 0, SDS + "DT_PROJ_DOT": True}


def _pdl_add_norm(norm, hidden_states, residual, *, fused, residual_in_fp32):
    """models.block.add_norm with a decode step's (B, 1, D) rows through decode_linear.add_rms_norm_rows
    (one launch, PDL-chained with the products around it; the block's own is not); other calls as before."""
    from mamba_pkg.models.norm import RMSNorm

    if fused and isinstance(norm, RMSNorm) and hidden_states.dim() == 3 and hidden_states.shape[1] == 1:
        normed, residual = dl.add_rms_norm_rows(hidden_states[:, 0], None if residual is None else residual[:, 0],
                                                norm.weight, norm.eps, residual_in_fp32)
        return normed[:, None], residual[:, None]
    return _BLOCK_ADD_NORM(norm, hidden_states, residual, fused=fused, residual_in_fp32=residual_in_fp32)


# The block's add + RMSNorm before the mixer as the PDL row kernel (Block.forward is the lead's: A/B only).
PDL_NORM = {"models.block.add_norm": _pdl_add_norm}
# Session 10, lead (SMALL_DOT and the row-kernel add + norm, STEP_NORM_ROWS, are the defaults since c1eb100):
# whether Mamba-1's x_proj / dt_proj by the tl.dot kernel (M1_CHAIN) pays on top of them; the first row
# again last (a model's first row reads high: warm-up).
MODEL_AB = [
    ("mamba-1.4b", 64, ({}, M1_CHAIN, {})),
    ("mamba-130m", 64, ({}, M1_CHAIN, {})),
    ("mamba2-130m", 64, ({}, {CU + "STEP_NORM_ROWS": False}, {})),
]

# Session 11 (dprod, --model-ab MODEL_AB_DPROD): the settings of GEMM_SETTINGS in whole b64 steps, from the
# session-10 code (OFF: no prefetch, no TMA; the defaults since: TMA for 16+ K steps or the norm, 256 columns
# prefetched by lines). PF: bulk prefetch of the whole K range, PF512: of 512 columns.
OFF = {DL + "DOT_TMA": False, DL + "DOT_TMA_MIN_STEPS": 0, DL + "DOT_PREFETCH_K": 0, DL + "DOT_PREFETCH_LINES": False}
PF = {**OFF, DL + "DOT_PREFETCH_K": 1 << 20}
PF512 = {**OFF, DL + "DOT_PREFETCH_K": 512}
TMA = {**OFF, DL + "DOT_TMA": True}
MODEL_AB_DPROD = [(name, 64, (OFF, PF, TMA, {**TMA, **PF}, PF512, {**PF, DL + "DOT_STAGES": 3}, OFF))
                  for name in ("mamba2-1.3b", "mamba-1.4b", "mamba2-130m", "mamba-130m")]
# Call 2: the prefetch by lines (PFL), TMA only for programs of 16+ K steps or with the norm (TMA16).
PFL512 = {**OFF, DL + "DOT_PREFETCH_K": 512, DL + "DOT_PREFETCH_LINES": True}
PFL256 = {**OFF, DL + "DOT_PREFETCH_K": 256, DL + "DOT_PREFETCH_LINES": True}
PFL_ALL = {**OFF, DL + "DOT_PREFETCH_K": 1 << 20, DL + "DOT_PREFETCH_LINES": True}
TMA16 = {**TMA, DL + "DOT_TMA_MIN_STEPS": 16}
MODEL_AB_DPROD2 = [(name, 64, (OFF, PF512, PFL512, PFL256, PFL_ALL, TMA16, {**PFL512, **TMA16}, {**PFL512, **TMA},
                               OFF)) for name in ("mamba2-1.3b", "mamba-1.4b", "mamba2-130m", "mamba-130m")]
# Call 3: the adopted defaults ({}: TMA16 + PFL256) against OFF, PFL256 alone, TMA16 + PFL512, and 32 features
# per program for the 1.3b / 1.4b products too (the 130m models' already).
MODEL_AB_DPROD3 = [(name, 64, ({}, OFF, PFL256, {DL + "DOT_PREFETCH_K": 512}, {DL + "DOT_BLOCK_N": 32}, {}))
                   for name in ("mamba2-1.3b", "mamba-1.4b", "mamba2-130m", "mamba-130m")]
# Session 13 (--model-ab MODEL_AB_S13): the Mamba-2 out_proj's RMSNorm split between the SSM step and out_proj
# (models.mamba2.STEP_NORM_FOLD, on by default) against the norm in out_proj's K loop; the SSM step's tiles
# (TILE_ELEMS / NUM_WARPS of 128-state rows: 4096 values and 8 warps by default).
NO_FOLD = {M2 + "STEP_NORM_FOLD": False}
MODEL_AB_S13 = [(name, 64, ({}, NO_FOLD, {SDS + "TILE_ELEMS": {16: 2048, 128: 8192}},
                            {SDS + "TILE_ELEMS": {16: 2048, 128: 2048}, SDS + "NUM_WARPS": {16: 4, 128: 4}},
                            {SDS + "NUM_WARPS": {16: 4, 128: 4}}, {}, NO_FOLD))
                for name in ("mamba2-1.3b", "mamba2-130m")]
# Call 2: both SSM-step settings that gained in call 1, with and without the fold.
W4 = {SDS + "NUM_WARPS": {16: 4, 128: 4}}
T8K = {SDS + "TILE_ELEMS": {16: 2048, 128: 8192}}
MODEL_AB_S13B = [(name, 64, (NO_FOLD, {**NO_FOLD, **W4}, W4, {**NO_FOLD, **T8K}, T8K, {**NO_FOLD, **T8K, **W4},
                             {**T8K, **W4}, {DL + "DOT_SUMS_EARLY": True}, {DL + "DOT_SUMS_EARLY": True, **W4}, {},
                             NO_FOLD))
                 for name in ("mamba2-1.3b", "mamba2-130m")]


def _no_add_norm(x, residual, norm_weight, eps=1e-5, residual_in_fp32=False, **kw):
    """A stand-in for decode_linear.add_rms_norm_rows that launches nothing (wrong numbers): what a b64 step
    would take without the block's add + RMSNorm launch, the upper bound of folding it into the products."""
    return x, (residual if residual is not None else x.float() if residual_in_fp32 else x)


# Session 14 (--model-ab MODEL_AB_S14): the block's add + RMSNorm launch left out (timing only).
NO_ADD_NORM = {"models.block.add_rms_norm_rows": _no_add_norm}
MODEL_AB_S14 = [(name, 64, ({}, NO_ADD_NORM, {})) for name in ("mamba2-1.3b", "mamba-1.4b", "mamba2-130m", "mamba-130m")]
# Call 3: mamba2-1.3b's in_proj + conv (133 tiles) with its 64 dt features one per program of the first 132 tiles
# (DOT_OVERFLOW, the default) against the fit config.
OVER_OFF = {DL + "DOT_OVERFLOW": False}
MODEL_AB_S14B = [("mamba2-1.3b", 64, ({}, OVER_OFF, {}, OVER_OFF))]
# Call 4: mamba-130m's x_proj (80 x 1536: 6 programs even split, so cuBLAS, which breaks the PDL chain) by the
# tl.dot kernel: fewer programs allowed (6), or one K step per split too (12 programs).
MODEL_AB_S14C = [("mamba-130m", 64, ({}, {DL + "DOT_MIN_PROGRAMS": 4},
                                     {DL + "DOT_MIN_PROGRAMS": 4, DL + "DOT_MIN_SPLIT_STEPS": 1}, {}))]


def graph_ms(fn, rep=20):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def ssm_inputs(dim, rank, batch, split, block_d=128):
    torch.manual_seed(0)
    dev = "cuda"
    xz = torch.randn(batch, 2 * dim, device=dev, dtype=BF)
    if split:
        splits = -(-dim // block_d)
        parts = torch.randn(splits, batch, rank + 2 * N_STATE, device=dev) / splits
    else:
        parts = torch.randn(batch, rank + 2 * N_STATE, device=dev, dtype=BF)
    low = parts[..., :rank]
    kw = dict(state=torch.randn(batch, dim, N_STATE, device=dev).to(BF), x=xz[:, :dim], dt=low,
              A_log=torch.randn(dim, N_STATE, device=dev), B=parts[..., rank:rank + N_STATE],
              C=parts[..., rank + N_STATE:], D=torch.randn(dim, device=dev, dtype=BF), z=xz[:, dim:],
              dt_bias=torch.randn(dim, device=dev, dtype=BF),
              dt_proj_weight=torch.randn(dim, rank, device=dev, dtype=BF) / rank**0.5)
    return kw


class Sweep:
    def __init__(self, budget_s):
        self.t0, self.budget_s, self.rows = time.time(), budget_s, []

    def timed(self, case, label, fn, timer=graph_ms):
        if time.time() - self.t0 > self.budget_s:
            return None
        ms = try_provider(label, lambda: timer(fn))
        if ms is not None:
            self.rows.append({"case": case, "provider": label, "ms": round(ms, 5)})
            print(f"{case:42s} {label:34s} {ms * 1e3:8.2f} us", flush=True)
        return ms


def with_ssm_config(cfg, fn):
    block_b, block_p, warps = cfg
    original = sds._launch_config

    def config(batch, hdim, n_state, rank, tie):
        block_r = max(16, triton.next_power_of_2(rank)) if rank else 1
        return block_b, block_p, 16, block_r, warps

    def run():
        sds._launch_config = config
        try:
            return fn()
        finally:
            sds._launch_config = original
    return run


def ssm_part(sw):
    for name, (dim, rank) in MAMBA1.items():
        for batch in (1, 64):
            kw = ssm_inputs(dim, rank, batch, split=batch == 1)
            case = f"ssm {name} b{batch}"
            call = (lambda kw=kw, split=batch == 1: sds.ssm_decode_step(**kw, split_sum=split))
            sw.timed(case, "committed", call)
            for cfg in (SSM_B1 if batch == 1 else SSM_B64):
                sw.timed(case, "bb={} bp={} w={}".format(*cfg), with_ssm_config(cfg, call))
            if batch == 64:
                try:
                    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

                    def chain(kw=kw):
                        A = -torch.exp(kw["A_log"])
                        return selective_state_update(kw["state"], kw["x"], F.linear(kw["dt"], kw["dt_proj_weight"]), A,
                                                      kw["B"], kw["C"], kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                                                      dt_softplus=True)
                    sw.timed(case, "mamba_ssm chain", chain)
                except Exception as exc:  # the anchor is optional
                    print("mamba_ssm missing:", exc)


def pair_part(sw):
    original = cx.BLOCK_D
    for name, (dim, rank) in MAMBA1.items():
        case = f"conv_xproj+ssm {name} b1"
        x = torch.randn(1, dim, device="cuda", dtype=BF)
        conv_state = torch.randn(1, dim, 4, device="cuda", dtype=BF)
        conv_w, conv_b = torch.randn(dim, 4, device="cuda", dtype=BF), torch.randn(dim, device="cuda", dtype=BF)
        wx = torch.randn(rank + 2 * N_STATE, dim, device="cuda", dtype=BF) / dim**0.5
        kw = ssm_inputs(dim, rank, 1, split=False)
        for block_d in PAIR_BLOCK_D:
            def run(block_d=block_d, kw=kw):
                cx.BLOCK_D = block_d
                try:
                    xc, parts = cx.conv_xproj_step(x, conv_state, conv_w, conv_b, wx, "silu")
                    dt, B, C = torch.split(parts, [rank, N_STATE, N_STATE], dim=-1)
                    return sds.ssm_decode_step(kw["state"], xc, dt, kw["A_log"], B, C, kw["D"], kw["z"], kw["dt_bias"],
                                               kw["dt_proj_weight"], split_sum=True)
                finally:
                    cx.BLOCK_D = original
            sw.timed(case, f"block_d={block_d}", run)


def linear_inputs(sw, name, batches):
    """The weight of the LINEAR shape ``name`` and, per batch, (batch, x, case), cuBLAS timed for each."""
    n_out, n_in = LINEAR[name]
    w = torch.randn(n_out, n_in, device="cuda", dtype=BF) / n_in**0.5
    cases = []
    for batch in batches:
        x = torch.randn(batch, n_in, device="cuda", dtype=BF)
        cases.append((batch, x, f"linear {name} b{batch}"))
        sw.timed(cases[-1][2], "cublas", lambda x=x, w=w: F.linear(x, w))
    return w, cases


GEMM64 = {  # (out_features, in_features, RMSNorm prologue, conv (start, channels) or None)
    "m1.4b in_proj+conv": (8192, 2048, False, (0, 4096)),
    "m2-1.3b in_proj+conv": (8512, 2048, False, (4096, 4352)), "1.3b out_proj": (2048, 4096, False, None),
    "m2-1.3b norm+out_proj": (2048, 4096, True, None), "m1.4b x_proj": (160, 4096, False, None),
    "m130m in_proj+conv": (3072, 768, False, (0, 1536)), "m2-130m in_proj+conv": (3352, 768, False, (1536, 1792)),
    "130m out_proj": (768, 1536, False, None), "m130m x_proj": (80, 1536, False, None),
    "lm_head 1.3b": (50280, 2048, False, None),
    # Session 14: mamba2-1.3b's in_proj without its 64 dt features: 132 tiles of 64 (one per SM) instead of 133.
    "m2-1.3b in_proj+conv 132 tiles": (8448, 2048, False, (4096, 4352)),
}
GEMM_COPIES = 8
GEMM_VARIANTS = [  # changes to dot_config's pick: (BLOCK_N, BLOCK_K, stages, warps, SPLIT) fields by index
    {0: 32}, {0: 128, 4: "x2"}, {1: 64}, {2: 3}, {3: 8}, {3: 4}, {4: "x2"}, {4: "/2"},
]

# Session 11 (dprod), appended to the candidates above ("pick" and those: the defaults, since session 11 TMA for
# 16+ K steps or the norm and 256 columns prefetched by lines): (label, config fields changed by index or None,
# decode_linear attributes): each program's weight slice prefetched into L2 before the PDL wait (all of
# it, or its first 512 columns; with 3 stages), the x / weight tiles through TMA descriptors, both; K steps of 256.
_OFF = {k[len(DL):]: v for k, v in OFF.items()}  # measured from the session-10 code: no TMA, no prefetch
GEMM_SETTINGS = [
    ("pick off", None, _OFF),
    ("pick prefetch", None, {**_OFF, "DOT_PREFETCH_K": 1 << 20}),
    ("pick prefetch512", None, {**_OFF, "DOT_PREFETCH_K": 512}),
    ("pick tma", None, {**_OFF, "DOT_TMA": True}),
    ("pick tma+prefetch", None, {**_OFF, "DOT_TMA": True, "DOT_PREFETCH_K": 1 << 20}),
    ("k256 tma", {1: 256, 2: 3}, {**_OFF, "DOT_TMA": True}),
    ("k256 tma+prefetch", {1: 256, 2: 3}, {**_OFF, "DOT_TMA": True, "DOT_PREFETCH_K": 1 << 20}),
    ("n32 k256", {0: 32, 1: 256, 2: 4}, _OFF), ("prefetch s3", {2: 3}, {**_OFF, "DOT_PREFETCH_K": 1 << 20}),
    # call 2: the prefetch by 128-byte lines (one per thread and line: no loop over a warp's rows)
    ("pfline512", None, {**_OFF, "DOT_PREFETCH_K": 512, "DOT_PREFETCH_LINES": True}),
    ("pfline256", None, {**_OFF, "DOT_PREFETCH_K": 256, "DOT_PREFETCH_LINES": True}),
    ("pfline all", None, {**_OFF, "DOT_PREFETCH_K": 1 << 20, "DOT_PREFETCH_LINES": True}),
    ("tma+pfline512", None, {**_OFF, "DOT_TMA": True, "DOT_PREFETCH_K": 512, "DOT_PREFETCH_LINES": True}),
    ("n32", {0: 32}, {}),  # call 3: on the defaults (in_proj: 256-266 tiles, the fit config)
    # Session 13: wider feature tiles with the K range split to keep ~128 programs (x, re-read from L2 by every
    # program, is as many bytes as a program's weights at 64 features; at 256 a quarter of them).
    ("n128 s2", {0: 128, 3: 8, 4: 2}, {}), ("n128 s2 k128", {0: 128, 1: 128, 3: 8, 4: 2}, {}),
    ("n256 s4", {0: 256, 3: 8, 4: 4}, {}), ("n256 s4 w4", {0: 256, 3: 4, 4: 4}, {}),
    ("n256 s4 k32", {0: 256, 1: 32, 3: 8, 4: 4}, {}), ("n128 s4", {0: 128, 3: 8, 4: 4}, {}),
    ("n128 s8", {0: 128, 3: 8, 4: 8}, {}), ("n256 s16", {0: 256, 3: 8, 4: 16}, {}), ("n256 s8", {0: 256, 3: 8, 4: 8}, {}),
    # Session 14: the features past one tile per SM, one per program of the others (DOT_OVERFLOW, on by
    # default: "pick"), against the fit config (off).
    ("overflow off", None, {"DOT_OVERFLOW": False}),
]
GEMM_ONLY = None  # --gemm-only: only the candidates of these labels (and cuBLAS)


def gemm_part(sw, shapes=None, compile_only=False, batch=64):
    """GEMM64 shapes (``shapes``: their indices, all if None): cuBLAS vs the tl.dot kernel (dot_config
    and GEMM_VARIANTS), cold weights. compile_only: one eager launch per candidate, nothing timed."""
    saved = (dl.dot_config, dl.PDL, dl.DOT_LAUNCH_EARLY, dl.DOT_CONV_WARPS, dl.DOT_PEEL)

    def restore():
        dl.dot_config, dl.PDL, dl.DOT_LAUNCH_EARLY, dl.DOT_CONV_WARPS, dl.DOT_PEEL = saved
    from mamba_pkg.ops.causal_conv1d import causal_conv1d_update

    for index, (name, (n_out, n_in, norm, conv)) in enumerate(GEMM64.items()):
        if shapes is not None and index not in shapes:
            continue
        copies = 1 if compile_only else max(2, min(GEMM_COPIES, int(200e6 // (n_out * n_in * 2))))
        ws = [torch.randn(n_out, n_in, device="cuda", dtype=BF) / n_in**0.5 for _ in range(copies)]
        x = torch.randn(batch, n_in, device="cuda", dtype=BF)
        nw = torch.rand(n_in, device="cuda", dtype=BF) + 0.5
        outs = [torch.empty(batch, n_out, device="cuda", dtype=BF) for _ in range(copies)]
        convs = [None] * copies
        if conv is not None:
            start, ch = conv
            convs = [(torch.randn(batch, ch, 4, device="cuda", dtype=BF), torch.randn(ch, 4, device="cuda", dtype=BF),
                      torch.randn(ch, device="cuda", dtype=BF), start, "silu") for _ in range(copies)]
        case = f"gemm {name} b{batch} ({n_out}x{n_in}) per launch"
        weight_us = n_out * n_in * 2 / 3.0e6

        def cublas():
            for w, o, cv in zip(ws, outs, convs):
                torch.matmul(x * nw if norm else x, w.t(), out=o)
                if cv is not None:
                    causal_conv1d_update(o[:, cv[3]:cv[3] + cv[0].shape[1]], *cv[:3], cv[4])
        timer = (lambda f: f() and None) if compile_only else (lambda f: graph_ms(f) / copies)
        ms = sw.timed(case, "cublas" + (" (+x*nw)" if norm else " (+conv update)" if conv else ""), cublas,
                      timer=timer)
        base = saved[0](n_out, n_in) or (dl.DOT_BLOCK_N, dl.DOT_BLOCK_K, dl.DOT_STAGES, dl.DOT_WARPS, 1)
        if conv is not None:
            base = (*base[:3], max(base[3], dl.DOT_CONV_WARPS), base[4])
        cands = [("pick", base, {}), ("pick pdl off", base, {"PDL": False}),
                 ("pick launch late", base, {"DOT_LAUNCH_EARLY": False}), ("pick peel", base, {"DOT_PEEL": True})]
        for var in GEMM_VARIANTS:
            cfg = list(base)
            for i, v in var.items():
                cfg[i] = cfg[i] * 2 if v == "x2" else max(1, cfg[i] // 2) if v == "/2" else v
            if tuple(cfg) != base:
                cands.append((",".join(map(str, cfg)), tuple(cfg), {}))
        for label, var, attrs in GEMM_SETTINGS:
            cfg = list(base)
            for i, v in (var or {}).items():
                cfg[i] = v
            cands.append((label, tuple(cfg), attrs))
        if GEMM_ONLY:
            cands = [c for c in cands if c[0] in GEMM_ONLY]
        for label, cfg, attrs in cands:
            def run(cfg=cfg, attrs=attrs):
                dl.dot_config = lambda n_out, n_in=None, cfg=cfg: cfg
                dl.DOT_CONV_WARPS = cfg[3]
                try:
                    with applied({DL + k: v for k, v in attrs.items()}):
                        for w, o, cv in zip(ws, outs, convs):
                            dl._launch_dot(x, w, None, o, nw if norm else None, 1e-5,
                                           None if cv is None else (*cv[:4], True))
                finally:
                    restore()
            got = sw.timed(case, f"dot {label}", run, timer=timer)
            if label == "pick" and got:
                print(f"    pick {base}: {weight_us / (got * 1e3) * 100:.0f}% of 3.0 TB/s, cublas "
                      f"{weight_us / (ms * 1e3) * 100 if ms else 0:.0f}%", flush=True)
        if conv is None:
            ref = (F.linear(x.float() * nw.float(), ws[0].float())
                   * torch.rsqrt((x.float() ** 2).mean(1, keepdim=True) + 1e-5)) if norm else F.linear(x.float(), ws[0].float())
            run_err = (outs[0].float() - ref).abs().max().item() / ref.abs().max().item()
            print(f"    max rel err of the last candidate {run_err:.2e}", flush=True)
        del ws, outs
        torch.cuda.empty_cache()


def linear_part(sw):
    saved = (dl.BLOCK_N, dl.TILE_ELEMS, dl.NUM_WARPS, dl.dot_config)

    def restore():
        dl.BLOCK_N, dl.TILE_ELEMS, dl.NUM_WARPS, dl.dot_config = saved
    for name, (n_out, n_in) in LINEAR.items():
        w, cases = linear_inputs(sw, name, (1, 64))
        for batch, x, case in cases:
            for cfg in (SMALL_LINEAR if batch == 1 else DOT_LINEAR):
                def run(cfg=cfg, x=x, w=w, batch=batch):
                    if batch == 1:
                        dl.BLOCK_N, dl.TILE_ELEMS, dl.NUM_WARPS = cfg
                    else:
                        dl.dot_config = lambda n_out, n_in=None, cfg=cfg: cfg
                    try:
                        return dl.decode_linear(x, w)
                    finally:
                        restore()
                sw.timed(case, "cfg=" + ",".join(map(str, cfg)), run)
        if name.endswith("in_proj"):
            from mamba_pkg.ops.norm import rms_norm_fn

            h = torch.randn(1, n_in, device="cuda", dtype=BF)
            res = torch.randn(1, n_in, device="cuda")
            nw = torch.randn(n_in, device="cuda", dtype=BF)
            case = f"add_norm+linear {name} b1"
            for block_n in NORM_BLOCK_N:
                def fused(block_n=block_n):
                    dl.BLOCK_N = block_n
                    try:
                        return dl.add_rms_norm_linear(h, res, nw, w, None, 1e-5, True)
                    finally:
                        restore()
                sw.timed(case, f"fused block_n={block_n}", fused)
            sw.timed(case, "norm then decode_linear", lambda: dl.decode_linear(
                rms_norm_fn(h, nw, None, res, 1e-5, prenorm=True, residual_in_fp32=True)[0], w))


FOLD_SHAPES = {"mamba2-130m": (768, 1536, 24), "mamba2-1.3b": (2048, 4096, 64)}  # d_model, d_ssm, heads


def fold_part(sw):
    for name, (d_model, d_ssm, heads) in FOLD_SHAPES.items():
        conv_dim = d_ssm + 256
        n_out = 2 * d_ssm + 256 + heads
        w = torch.randn(n_out, d_model, device="cuda", dtype=BF) / d_model**0.5
        h = torch.randn(1, d_model, device="cuda", dtype=BF)
        res = torch.randn(1, d_model, device="cuda")
        nw = torch.randn(d_model, device="cuda", dtype=BF)
        state = torch.randn(1, conv_dim, 4, device="cuda", dtype=BF)
        conv = (state, torch.randn(conv_dim, 4, device="cuda", dtype=BF), torch.randn(conv_dim, device="cuda", dtype=BF),
                d_ssm, "silu")
        variants = {
            "linear": lambda: dl.decode_linear(h, w),
            "linear+conv": lambda: dl.decode_linear(h, w, conv=conv),
            "norm": lambda: dl.add_rms_norm_linear(h, res, nw, w, None, 1e-5, True),
            "norm+conv": lambda: dl.add_rms_norm_linear(h, res, nw, w, None, 1e-5, True, conv),
            "norm(no res)+conv": lambda: dl.add_rms_norm_linear(h, None, nw, w, None, 1e-5, True, conv),
        }
        for pdl in (True, False):
            for label, fn in variants.items():
                def run(fn=fn, pdl=pdl):
                    dl.PDL = pdl
                    try:
                        return fn()
                    finally:
                        dl.PDL = True
                sw.timed(f"in_proj {name} b1", f"{label} pdl={int(pdl)}", run)


def probe_part(sw):
    """The decode ops at the batch sizes of bench_decode_ops' suspicious rows: decode_linear at 3 and 8
    rows (broadcast-sum kernel, tl.dot kernel, cuBLAS); mamba-1.4b's SSM step at batch 64 (fp32 and
    bf16 state): ours as the model runs it (cuBLAS dt_proj + kernel), the kernel alone (dt given),
    PDL off, our state_update op, mamba_ssm's selective_state_update alone and its chain."""
    for name in LINEAR:
        w, cases = linear_inputs(sw, name, (3, 8))
        for batch, x, case in cases:
            for small_rows in (8, 2):
                def run(small_rows=small_rows, x=x, w=w):
                    with applied({DL + "SMALL_ROWS": small_rows}):
                        return dl._decode_linear(x, w, None)  # the kernels (decode_linear: cuBLAS here)
                sw.timed(case, "broadcast kernel" if small_rows == 8 else "tl.dot kernel", run)
    from mamba_pkg.ops.state_update import selective_state_update as ours_ssu
    dim, rank = MAMBA1["mamba-1.4b"]
    for state_dtype in (torch.float32, BF):
        kw = ssm_inputs(dim, rank, 64, split=False)
        kw["state"] = kw["state"].to(state_dtype)
        case = f"ssm mamba-1.4b b64 state={str(state_dtype)[6:]}"
        dt_full = F.linear(kw["dt"], kw["dt_proj_weight"])
        A = -torch.exp(kw["A_log"])
        sw.timed(case, "ours (model path)", lambda kw=kw: sds.ssm_decode_step(**kw))
        sw.timed(case, "ours kernel alone", lambda kw=kw, dt=dt_full: sds.ssm_decode_step(
            **{**kw, "dt": dt, "dt_proj_weight": None}))
        def no_pdl(kw=kw):
            with applied({DL + "PDL": False}):
                return sds.ssm_decode_step(**kw)
        sw.timed(case, "ours pdl off", no_pdl)
        sw.timed(case, "ours state_update op", lambda kw=kw, dt=dt_full, A=A: ours_ssu(
            kw["state"], kw["x"], dt, A, kw["B"], kw["C"], kw["D"], z=kw["z"], dt_bias=kw["dt_bias"], dt_softplus=True))
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        except Exception as exc:  # the anchor is optional
            print("mamba_ssm missing:", exc)
            continue
        sw.timed(case, "mamba_ssm ssu alone", lambda kw=kw, dt=dt_full, A=A: selective_state_update(
            kw["state"], kw["x"], dt, A, kw["B"], kw["C"], kw["D"], z=kw["z"], dt_bias=kw["dt_bias"], dt_softplus=True))
        sw.timed(case, "mamba_ssm chain", lambda kw=kw: selective_state_update(
            kw["state"], kw["x"], F.linear(kw["dt"], kw["dt_proj_weight"]), -torch.exp(kw["A_log"]), kw["B"], kw["C"],
            kw["D"], z=kw["z"], dt_bias=kw["dt_bias"].float(), dt_softplus=True))


# (model, batch, settings) of the timeline part; mamba_ssm's step is profiled after ours (unless
# --no-anchor).
TIMELINE = [(name, 64, ({},)) for name in ("mamba2-1.3b", "mamba-1.4b", "mamba2-130m", "mamba-130m")]
TIMELINE_NO_ANCHOR = False


def step_timeline(replay, reps=3):
    """Kernels of one ``replay()`` (a CUDA graph): list of (name, grid, start_us, end_us), by start."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    for _ in range(reps):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = [(e["name"], tuple(e.get("args", {}).get("grid", ())), float(e["ts"]), float(e["ts"]) + float(e["dur"]))
               for e in events if e.get("cat") == "kernel"]
    return sorted(kernels, key=lambda k: k[2])


def timeline_table(kernels):
    """Rows (label, count, mean duration us, mean advance us, total advance us) by total advance,
    and the step's span (us)."""
    stats, front = {}, None
    for name, grid, start, end in kernels:
        advance = end - start if front is None else max(0.0, end - front)
        front = end if front is None else max(front, end)
        label = f"{name[:48]} grid={list(grid)}"
        count, dur, adv = stats.get(label, (0, 0.0, 0.0))
        stats[label] = (count + 1, dur + end - start, adv + advance)
    rows = sorted(((lab, c, d / c, a / c, a) for lab, (c, d, a) in stats.items()), key=lambda r: -r[4])
    span = (max(k[3] for k in kernels) - kernels[0][2]) if kernels else 0.0
    return rows, span


def timeline_part(sw, models=None):
    """Per-kernel advances of one graph replay (TIMELINE), ours then mamba_ssm's, printed and saved
    as rows (provider = "<setting> <kernel label>", ms = total advance)."""
    from benchmarks.bench_generation import NEW, PROMPT, VOCAB, build_mamba_ssm, build_ours
    from mamba_pkg.generation.decode import _decode_graph, free_decode_graphs

    for name, batch, settings in TIMELINE:
        if (models is not None and name not in models) or time.time() - sw.t0 > sw.budget_s:
            continue
        torch.cuda.empty_cache()
        model = build_ours(name)
        runs = []
        for setting in settings:
            with applied(setting):
                free_decode_graphs(model)
                graph = _decode_graph(model, batch, PROMPT + NEW, BF, VOCAB, BF)
                runs.append((_label(setting), step_timeline(graph.graph.replay)))
        free_decode_graphs(model)
        theirs = None if TIMELINE_NO_ANCHOR else try_provider("mamba_ssm build", lambda: build_mamba_ssm(name, model))
        if theirs is not None:
            ids = torch.randint(0, VOCAB, (batch, PROMPT), device="cuda")
            theirs.generate(ids, max_length=PROMPT + 2, cg=True)
            run = theirs._decoding_cache.callables[batch, 1]
            tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
            runs.append(("mamba_ssm", step_timeline(lambda: run(tok, tok, PROMPT))))
        del model, theirs
        for label, kernels in runs:
            rows, span = timeline_table(kernels)
            print(f"== timeline {name} b{batch} {label}: {len(kernels)} kernels, span {span:.1f} us", flush=True)
            print(f"   {'kernel':70s} {'n':>4s} {'dur us':>8s} {'adv us':>8s} {'sum adv':>9s}")
            for lab, count, dur, adv, total in rows[:14]:
                print(f"   {lab:70s} {count:4d} {dur:8.2f} {adv:8.2f} {total:9.1f}")
                sw.rows.append({"case": f"timeline {name} b{batch}", "provider": f"{label} {lab}",
                                "ms": round(total / 1e3, 5), "count": count, "dur_us": round(dur, 3),
                                "adv_us": round(adv, 3)})
            # The first layer's kernels in order (start relative to the step, duration, advance).
            print("   first kernels: " + "; ".join(
                f"{n[:22]}{list(g)} +{s - kernels[0][2]:.1f} d{e - s:.1f}" for n, g, s, e in kernels[:12]))


def ncu_part(models, batch):
    """One eager step per model inside torch.cuda.profiler.profile() (after 3 warm-up steps)."""
    from benchmarks.bench_generation import build_ours, eager_step

    for name in models or ("mamba2-1.3b",):
        step = eager_step("ours", build_ours(name), batch)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.cuda.profiler.profile():
            step()
            torch.cuda.synchronize()


@contextlib.contextmanager
def applied(setting):
    """Set the module attributes of ``setting`` ({"ops.decode_linear.BLOCK_N": 2, ...}, relative to
    mamba_pkg) for the body of the with statement."""
    targets = {k: (importlib.import_module("mamba_pkg." + k.rsplit(".", 1)[0]), k.rsplit(".", 1)[1]) for k in setting}
    original = {k: getattr(mod, attr) for k, (mod, attr) in targets.items()}
    for k, v in setting.items():
        setattr(*targets[k], v)
    try:
        yield
    finally:
        for k, v in original.items():
            setattr(*targets[k], v)


def _label(setting):
    return ",".join(f"{k.rsplit('.', 1)[1]}={getattr(v, '__name__', v)}" for k, v in setting.items()) or "committed"


def model_part(sw, models=None, compile_only=False):
    """Whole-step A/B (MODEL_AB) of the models in ``models`` (all if None). compile_only: run one
    eager step per setting and time nothing (a process per model in parallel fills the Triton cache)."""
    from benchmarks.bench_generation import build_ours, eager_step, our_graph_ms
    from mamba_pkg.generation.decode import free_decode_graphs

    built = {}
    for name, batch, settings in MODEL_AB:
        if (models is not None and name not in models) or (not compile_only and time.time() - sw.t0 > sw.budget_s):
            continue
        if name not in built:
            built.clear()
            torch.cuda.empty_cache()
            built[name] = build_ours(name)
        model = built[name]
        for setting in settings:
            with applied(setting):
                free_decode_graphs(model)
                if compile_only:
                    eager_step("ours", model, batch)()
                    continue
                sw.timed(f"step {name} b{batch}", _label(setting), lambda: our_graph_ms(model, batch, BF),
                         timer=lambda f: f())
        free_decode_graphs(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="ssm,pair,linear,fold,model")
    ap.add_argument("--budget-s", type=float, default=120.0, help="start no new candidate after this")
    ap.add_argument("--models", help="model part: only these models (comma-separated)")
    ap.add_argument("--no-anchor", action="store_true", help="timeline part: ours only")
    ap.add_argument("--ncu-batch", type=int, default=1, help="ncu part: batch size")
    ap.add_argument("--compile-only", action="store_true", help="model / gemm part: compile, time nothing")
    ap.add_argument("--gemm-shapes", help="gemm part: only these GEMM64 indices (comma-separated)")
    ap.add_argument("--gemm-only", help="gemm part: only the candidates of these labels (comma-separated)")
    ap.add_argument("--model-ab", default="MODEL_AB", help="model part: the module's list of (model, batch, settings)")
    args = ap.parse_args()
    global GEMM_ONLY, MODEL_AB
    GEMM_ONLY = args.gemm_only.split(",") if args.gemm_only else None
    MODEL_AB = globals()[args.model_ab]
    sw = Sweep(args.budget_s)
    global TIMELINE_NO_ANCHOR
    TIMELINE_NO_ANCHOR = args.no_anchor
    models = args.models.split(",") if args.models else None
    shapes = [int(i) for i in args.gemm_shapes.split(",")] if args.gemm_shapes else None
    parts = {"gemm": lambda sw: gemm_part(sw, shapes, args.compile_only), "ssm": ssm_part, "pair": pair_part, "linear": linear_part, "fold": fold_part, "probe": probe_part,
             "model": lambda sw: model_part(sw, models, args.compile_only),
             "timeline": lambda sw: timeline_part(sw, models),
             "ncu": lambda sw: ncu_part(models, args.ncu_batch)}
    for part in args.parts.split(","):
        parts[part](sw)
    if args.compile_only or args.parts == "ncu":
        return
    print(f"sweep took {time.time() - sw.t0:.0f} s")
    save_results("sweep_decode", sw.rows, plot_key="case")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
