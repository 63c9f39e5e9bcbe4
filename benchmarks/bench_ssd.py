"""Mamba-2 SSD scan: ours (Triton) vs mamba_ssm's mamba_chunk_scan_combined, bf16.

Cases: B=4, H=32, P=64, N=128, G=1, chunk 256, L in {2048, 8192, 32768}; the
2.7B shape H=80 at L=8192; N in {64, 256} at L=8192 (order: L=8192, 2048, 32768, H=80,
N=64, N=256). Both providers get D,
dt_bias and dt_softplus. Each case is timed twice: timing=eager (do_bench of the
Python call: what a caller sees, host overhead included; the row also gives host_ms,
the host time to issue one call) and timing=graph (the same call captured in a CUDA
graph and replayed: the kernels alone). `--stages` also prints the time of each of
our kernels at the main shape; `--profile` prints torch.profiler's kernel table of
one fwd+bwd step per provider at the main shape.

mamba_ssm autotunes every kernel for each new d_state, which takes minutes cold; at
N != 128 its autotuners are pinned to the configs they chose at N = 128 (rows marked
anchor_configs="N=128 picks"); ours autotune normally. `--budget-s` skips the shapes
that would start after that many seconds (the rows so far are saved after each shape).
`--host-profile` prints cProfile's top functions of our eager fwd+bwd step; `--uncached` adds, at
the main shape, ours launched through Triton's launch path every call (no cached launches).
`--overlap` adds, at the main shape, ours with the forward scan launched beside the walk
(provider ours_overlap_walk; chunk_scan.OVERLAP_WALK, off by default). `--save-states` adds, at
every shape, ours fwd+bwd with the states between chunks kept for the backward (provider
ours_saved_states; combined.SAVE_STATES, on by default since session 9). `--backward-streams K [K ...]` adds, at every
shape, ours fwd+bwd with chunk_scan.BACKWARD_STREAMS = K (provider ours_backward_streams=K; 0: every launch on
one stream, session 9's order; 1: C B^T and the W kernel beside the walks on a side stream; 2, the default since
session 10: also dB/dC beside dx). `--train-shape` (with
`--lengths`) adds Mamba-2 130m's training shape, B=8 L=2048 H=24. `--tma-ab` adds, at every shape, ours with plain
loads instead of bulk copies (TMA) in the forward scan (provider ours_no_tma: chunk_scan.SCAN_TMA off, the forward
before session 11).
`--forward-pdl K [K ...]` adds, at every shape, ours with chunk_scan.FORWARD_PDL = K (provider
ours_forward_pdl=K; 0: the forward's three launches one after the other, session 11's; 1: programmatic dependent
launches along them; 2, the default since session 12: dt processing, walk, C B^T beside the walk, scan, chained the
same way). `--walk-probe` times
the forward walk alone (CUDA graph) at the main shape in each of a few pinned configs (chunk_state's space and deeper
pipelines).
`--dbc-block-n` / `--two-walk-launches` switch our backward to its other layouts (the stage
times of `--stages` compare them at the main shape).

Cold compiles dominate a device call (every autotuning config of every kernel, per d_state).
`--precompile N [N ...]` only compiles every config of our kernels for the main shape (or the
shapes of `--lengths` / `--train-shape`) with d_state N (no kernel runs), and `--precompile-anchor
N [N ...]` mamba_ssm's pinned N=128 picks at those N: run them in parallel processes (e.g. beside the GPU tests) with a shared
TRITON_CACHE_DIR, and the benchmark then only loads and times.

    PYTHONPATH=. python benchmarks/bench_ssd.py [--quick | --lengths L .. [--train-shape]] [--stages] [--profile]
        [--host-profile] [--uncached] [--overlap] [--save-states] [--backward-streams K ..] [--tma-ab]
        [--forward-pdl K ..] [--walk-probe] [--budget-s S]
    PYTHONPATH=. python benchmarks/bench_ssd.py --precompile 64 128 256
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.bench_conv import graph_ms, host_ms
from benchmarks.common import host_profile as common_host_profile
from benchmarks.common import BF16_FLOPS, HBM_BYTES_PER_S, save_results, time_ms, try_provider

CHUNK = 256


# Mamba-2 130m's SSD in training (24 heads of 64, d_state 128, batch 8 of 2048 tokens).
TRAIN_SHAPE = dict(B=8, H=24, P=64, N=128, G=1, L=2048)


def shapes(quick: bool, lengths=None, train=False):
    base = dict(B=4, H=32, P=64, N=128, G=1)
    if quick:
        return [dict(base, L=8192)]
    if lengths:
        return [dict(base, L=L) for L in lengths] + ([TRAIN_SHAPE] if train else [])
    # The main shape first: a run cut short still has it; then the shapes that compile
    # nothing new, while `--precompile 64 256` / `--precompile-anchor 64 256` processes
    # beside the run compile the other d_states.
    out = [dict(base, L=L) for L in (8192, 2048, 32768)]
    out += [dict(base, H=80, L=8192), dict(base, N=64, L=8192), dict(base, N=256, L=8192)]
    return out


def make_inputs(s, requires_grad):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    Bsz, L, H, P, G, N = s["B"], s["L"], s["H"], s["P"], s["G"], s["N"]
    x = torch.randn(Bsz, L, H, P, device=dev, dtype=bf)
    dt = (torch.randn(Bsz, L, H, device=dev) * 0.5 - 2.0).to(bf)
    A = -torch.empty(H, device=dev).uniform_(1, 16)
    B = torch.randn(Bsz, L, G, N, device=dev, dtype=bf)
    C = torch.randn(Bsz, L, G, N, device=dev, dtype=bf)
    D = torch.randn(H, device=dev)
    dt_bias = torch.randn(H, device=dev) * 0.1
    leaves = [x, dt, A, B, C, D, dt_bias]
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return leaves


def flops_and_bytes(s, fwdbwd: bool):
    """Work of the chunked algorithm (chunk 256) and the bytes of reading inputs / writing outputs once."""
    Bsz, L, H, P, G, N = s["B"], s["L"], s["H"], s["P"], s["G"], s["N"]
    Q = CHUNK
    # Per chunk: C B^T per group (Q^2 N / 2 causal), scores @ x (Q^2 P / 2), chunk state and
    # state output (Q P N each); 2 flops per multiply-add.
    fwd = 2 * Bsz * L * (G * Q * N / 2 + H * (Q * P / 2 + 2 * P * N))
    io = 2 * (2 * Bsz * L * H * P + 2 * Bsz * L * G * N + Bsz * L * H)  # bf16 x, out, B, C, dt
    if not fwdbwd:
        return fwd, io
    # The backward does about twice the forward's products (dx, dB, dC, and the states again).
    return 3 * fwd, 2 * io + 2 * Bsz * L * H * P


def bench_case(s, provider, fwdbwd):
    """(eager ms, graph ms, host ms) of one pass of one provider at shape s."""
    if provider.startswith("ours"):
        from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined as fn
    else:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn
    switch = variant_switch(provider)
    if switch is not None:
        with switch:
            return bench_case(s, "ours", fwdbwd)
    x, dt, A, B, C, D, dt_bias = make_inputs(s, fwdbwd)

    def fwd():
        return fn(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)

    if not fwdbwd:
        def step():
            with torch.no_grad():
                return fwd()
    else:
        grad = torch.randn_like(fwd())
        leaves = [x, dt, A, B, C, D, dt_bias]

        def step():
            # autograd.grad, not backward(): no .grad accumulation kernels in the timing.
            return torch.autograd.grad(fwd(), leaves, grad)

    # Twice: the first eager call of a signature takes the variants of CUDA-graph captures (chunk_scan's
    # bulk copies, launch order 2), the second the eager ones, compiled here and not inside the timing.
    step()
    step()
    return time_ms(step, warmup_ms=50, rep_ms=200), graph_ms(step), host_ms(step, n=20)


# Our kernels launched through Triton's own launch path every time (no cached launches,
# mamba_pkg/ops/_launch.py): the host time before session 5 round 2, same kernels.
UNCACHED = "ours_uncached_launch"


# Our forward scan launched beside the walk (chunk_scan.OVERLAP_WALK = True: programmatic
# dependent launch, the walk in its lighter configs), session 8's off-by-default variant.
OVERLAP = "ours_overlap_walk"


# The forward keeps the states between chunks for the backward (combined.SAVE_STATES: no rerun of
# the forward walk in the backward, B * C * H * P * N bf16 more memory), on by default since session 9.
SAVED = "ours_saved_states"


# Our backward with its launches on one stream or two (chunk_scan.BACKWARD_STREAMS = k: 0 = session
# 9's order, 1 = C B^T and W beside the walks, 2 = also dB/dC beside dx (the default)); same kernels.
STREAMS = "ours_backward_streams="


# Plain loads instead of bulk copies (TMA) in the forward scan (chunk_scan.SCAN_TMA, on by default since session
# 11); same arithmetic, same bits.
NO_TMA = "ours_no_tma"


# Our forward's launches chained by programmatic dependent launch or not (chunk_scan.FORWARD_PDL = k: 0 = session 11's
# three launches one after the other, 1 = chained, 2 = dt processing, walk, C B^T beside the walk, scan, chained).
FWD_PDL = "ours_forward_pdl="


@contextlib.contextmanager
def module_flag(module, name, value):
    """``module.name = value`` inside the block, its previous value after it."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def backward_streams(k):
    from mamba_pkg.ops.ssd import chunk_scan

    return module_flag(chunk_scan, "BACKWARD_STREAMS", k)


def plain_loads():
    from mamba_pkg.ops.ssd import chunk_scan

    return module_flag(chunk_scan, "SCAN_TMA", False)


def forward_pdl(k):
    from mamba_pkg.ops.ssd import chunk_scan

    return module_flag(chunk_scan, "FORWARD_PDL", k)


def saved_states():
    from mamba_pkg.ops.ssd import combined

    return module_flag(combined, "SAVE_STATES", True)


def overlap_walk(on=True):
    from mamba_pkg.ops.ssd import chunk_scan

    return module_flag(chunk_scan, "OVERLAP_WALK", on)


def uncached_launches():
    from mamba_pkg.ops import _launch

    return module_flag(_launch, "enabled", False)


def variant_switch(provider):
    """The module switch (a context manager) that makes ours the A/B provider ``provider``, or None
    for a provider that is not one of those variants."""
    fixed = {UNCACHED: uncached_launches, OVERLAP: overlap_walk, SAVED: saved_states, NO_TMA: plain_loads}
    if provider in fixed:
        return fixed[provider]()
    for prefix, switch in ((STREAMS, backward_streams), (FWD_PDL, forward_pdl)):
        if provider.startswith(prefix):
            return switch(int(provider[len(prefix):]))
    return None


@contextlib.contextmanager
def compile_only():
    """Launches inside only compile: every (pruned) config of an autotuned kernel, the kernel
    itself otherwise; nothing runs (the outputs stay uninitialised)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run, tuned_run = JITFunction.run, Autotuner.run

    def compile_jit(self, *args, grid, warmup, **kwargs):
        return jit_run(self, *args, grid=grid, warmup=True, **kwargs)

    def compile_configs(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        return self.warmup(*args, **kwargs)

    JITFunction.run, Autotuner.run = compile_jit, compile_configs
    try:
        with uncached_launches():  # a cached launch would run the kernel
            yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuned_run


def precompile(d_states, provider, bases=None):
    """Compile (not run) what one fwd+bwd step of `provider` launches at each shape of `bases`
    (default: the main shape) with each d_state (Triton specialises on the sizes, e.g. on H and
    the chunk count being multiples of 16, so L=2048 and the training shape compile anew).
    mamba_ssm first runs one real step per shape at N=128 (some of its autotuning keys hold the
    head count: a new key compiles every config) and is then pinned to its picks, as in main()."""
    base = dict(B=4, H=32, P=64, N=128, G=1, L=8192)
    if provider == "ours":
        from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined as fn
    else:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn

    def step(s):
        leaves = make_inputs(s, True)
        x, dt, A, B, C, D, dt_bias = leaves
        out = fn(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    if provider != "ours":
        for shape in bases or [base]:
            step(shape)
        pin_anchor_autotuners()
    for shape in bases or [base]:
        for n in d_states:
            if provider != "ours" and n == 128:
                continue  # compiled by the real steps
            t0 = time.time()
            with compile_only():
                step(dict(shape, N=n))
            print(f"precompiled {provider} {dict(shape, N=n)} in {time.time() - t0:.0f} s", flush=True)


def host_profile(s, steps=20):
    """cProfile's top functions (own time) of `steps` eager fwd+bwd steps of ours at shape s."""
    from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined as fn
    leaves = make_inputs(s, True)
    x, dt, A, B, C, D, dt_bias = leaves
    grad = torch.randn_like(x)

    def step():
        return torch.autograd.grad(fn(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True), leaves, grad)

    common_host_profile(step, steps, "ours fwd+bwd", top=18)


def pin_anchor_autotuners():
    """Give each mamba_ssm autotuner that has tuned once only the config it picked (a new
    key then compiles that one config instead of benchmarking all of them)."""
    import sys

    from triton.runtime.autotuner import Autotuner

    pinned = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("mamba_ssm.ops.triton"):
            continue
        for obj in vars(module).values():
            if isinstance(obj, Autotuner) and obj.cache and len(obj.configs) > 1:
                obj.configs = [next(iter(obj.cache.values()))]
                pinned += 1
    print(f"  pinned {pinned} mamba_ssm autotuners to their N=128 picks")


def stage_profile(s):
    """Time each of our kernels alone at shape s (bf16); returns {stage: ms}."""
    from mamba_pkg.ops.ssd.chunk_scan import _chunk_scan_bwd, _chunk_scan_fwd
    from mamba_pkg.ops.ssd import chunk_state
    from mamba_pkg.ops.ssd.chunk_state import _state_walks_bwd, launch_forward_walk

    x, dt, A, B, C, D, dt_bias = make_inputs(s, False)
    Q, inf = CHUNK, float("inf")
    states, _, dt_c, cs_c = launch_forward_walk(x, dt, A, B, dt_bias, None, None, True, 0.0, inf, Q, True)
    dout = torch.randn_like(x)
    _, dstates, _ = _state_walks_bwd(x, B, None, None, Q, dout, None, C, dt_c, cs_c, None)

    def bwd(split=0, n_blocks=0):
        return _chunk_scan_bwd(x, dout, None, None, dt, A, B, C, D, dt_bias, None, dt_c, cs_c, states, dstates,
                               True, 0.0, inf, Q, head_split=split, n_blocks=n_blocks)

    def walks(fused):
        with module_flag(chunk_state, "FUSED_WALKS", fused):
            return _state_walks_bwd(x, B, None, None, Q, dout, None, C, dt_c, cs_c, None)

    def forward(overlap):
        with overlap_walk(overlap):
            return _chunk_scan_fwd(x, None, dt, A, B, C, D, dt_bias, None, None, True, 0.0, inf, Q)

    stages = {
        "fwd chunk_state (dt + cumsum + states walk)":
            lambda: launch_forward_walk(x, dt, A, B, dt_bias, None, None, True, 0.0, inf, Q, True),
        "fwd C B^T + walk + chunk_scan, scan beside the walk": lambda: forward(True),
        "fwd C B^T + walk + chunk_scan, one after the other": lambda: forward(False),
        "bwd walks, one launch (states rerun beside the state-gradient walk)": lambda: walks(True),
        "bwd walks, two launches": lambda: walks(False),
        "bwd W (+ C B^T) + dB/dC + dx (+ dt chain) kernels (auto head split)": bwd,
        "bwd W (+ C B^T) + dB/dC + dx (+ dt chain) kernels (no head split)": lambda: bwd(1),
        "bwd W (+ C B^T) + dB/dC + dx (+ dt chain) kernels (head split 4)": lambda: bwd(4),
        "bwd W (+ C B^T) + dB/dC + dx (+ dt chain) kernels (dB/dC N in 2 blocks, no head split)": lambda: bwd(1, 2),
        "bwd W (+ C B^T) + dB/dC + dx (+ dt chain) kernels (dB/dC N in 2 blocks, head split 2)": lambda: bwd(2, 2),
        "bwd W (+ C B^T) + dB/dC + dx (+ dt chain) kernels (dB/dC N in 4 blocks, no head split)": lambda: bwd(1, 4),
    }
    out = {}
    for name, fn in stages.items():
        fn()
        out[name] = graph_ms(fn)
        print(f"  stage {name}: {out[name]:.3f} ms (graph)")
    return out


# (BLOCK_P, BLOCK_N, BLOCK_L, warps, stages, maxnreg) of the forward walk probe: the session 10-11 pick first.
WALK_PROBE = ((64, 128, 256, 8, 2, None), (64, 128, 128, 8, 2, None), (64, 128, 128, 8, 3, None),
              (64, 128, 128, 8, 4, None), (64, 64, 256, 8, 2, 128))


def walk_probe(s):
    """The forward walk alone (dt processed once before), CUDA graph ms, in each WALK_PROBE config."""
    import triton

    from mamba_pkg.ops.ssd import chunk_state
    from mamba_pkg.ops.ssd.chunk_state import _chunk_state_fwd_outputs, launch_forward_walk

    x, dt, A, B, C, D, dt_bias = make_inputs(s, False)
    Q, inf = CHUNK, float("inf")
    outputs = _chunk_state_fwd_outputs(x, B, Q, True)
    launch_forward_walk(x, dt, A, B, dt_bias, None, None, True, 0.0, inf, Q, True, outputs=outputs, process_dt=True)
    kernel = chunk_state._chunk_state_walks_kernel
    out = {}
    for bp, bn, bl, w, st, r in WALK_PROBE:
        cfg = triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_L": bl}, num_warps=w, num_stages=st, maxnreg=r)
        name = f"({bp}, {bn}, {bl}) w{w} s{st} r{r}"
        with module_flag(kernel, "configs", [cfg]), module_flag(kernel, "cache", {}):
            def walk():
                launch_forward_walk(x, dt, A, B, dt_bias, None, None, True, 0.0, inf, Q, True, outputs=outputs)
            try:
                out[name] = graph_ms(walk)
            except Exception as exc:  # e.g. out of shared memory
                print(f"  walk probe {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
        print(f"  walk probe {name}: {out[name]:.4f} ms (graph)", flush=True)
    return out


def kernel_profile(s, provider):
    """torch.profiler table of the GPU kernels of 3 fwd+bwd steps at shape s."""
    from torch.profiler import ProfilerActivity, profile

    if provider == "ours":
        from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined as fn
    else:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn
    x, dt, A, B, C, D, dt_bias = make_inputs(s, True)
    leaves = [x, dt, A, B, C, D, dt_bias]

    def step():
        out = fn(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"--- kernel profile, {provider}, 3 fwd+bwd steps ---")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


def tuned_configs():
    """The autotuner's pick for each of our kernels (printed with the results)."""
    from mamba_pkg.ops.ssd import chunk_scan, chunk_state

    kernels = [chunk_state._chunk_state_walks_kernel,
               chunk_scan._chunk_scan_fwd_kernel, chunk_scan._chunk_scan_bwd_w_kernel,
               chunk_scan._chunk_scan_bwd_dbc_kernel, chunk_scan._chunk_scan_bwd_dx_kernel]
    for k in kernels:
        for key, cfg in getattr(k, "cache", {}).items():
            print(f"  tuned {k.fn.__name__} {key[:6]}: {cfg}")
        # The last tuning's time of every config (ms): how close the runners-up came.
        for cfg, ms in (getattr(k, "configs_timings", None) or {}).items():
            print(f"    {k.fn.__name__} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: {ms}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the main shape (L=8192)")
    ap.add_argument("--lengths", type=int, nargs="+", metavar="L", help="only these L at the main shape's B, H, P, N")
    ap.add_argument("--name", default="bench_ssd", help="results file name (<name>.json / .png)")
    ap.add_argument("--stages", action="store_true", help="also time each of our kernels at L=8192")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler kernel tables after the main shape (same process: no new compiles)")
    ap.add_argument("--host-profile", action="store_true", help="cProfile of our eager fwd+bwd at L=8192")
    ap.add_argument("--uncached", action="store_true",
                    help=f"main shape: also ours with Triton's own launch path every call (provider {UNCACHED})")
    ap.add_argument("--overlap", action="store_true",
                    help=f"main shape: also ours with the forward scan beside the walk (provider {OVERLAP})")
    ap.add_argument("--budget-s", type=float, default=160.0,
                    help="start no new shape after this many seconds")
    ap.add_argument("--precompile", type=int, nargs="+", metavar="N",
                    help="only compile our kernels' configs for these d_states, then exit")
    ap.add_argument("--precompile-anchor", type=int, nargs="+", metavar="N",
                    help="only compile mamba_ssm's pinned configs for these d_states, then exit")
    ap.add_argument("--save-states", action="store_true",
                    help=f"every shape, fwd+bwd: also ours with the states kept for the backward (provider {SAVED})")
    ap.add_argument("--backward-streams", type=int, nargs="+", metavar="K", default=[],
                    help=f"every shape, fwd+bwd: also ours with chunk_scan.BACKWARD_STREAMS = K (provider {STREAMS}K)")
    ap.add_argument("--tma-ab", action="store_true",
                    help=f"every shape: also ours with plain loads instead of bulk copies (provider {NO_TMA})")
    ap.add_argument("--forward-pdl", type=int, nargs="+", metavar="K", default=[],
                    help=f"every shape: also ours with chunk_scan.FORWARD_PDL = K (provider {FWD_PDL}K)")
    ap.add_argument("--walk-probe", action="store_true",
                    help="main shape: time the forward walk alone in a few pinned configs (CUDA graph)")
    ap.add_argument("--train-shape", action="store_true",
                    help="with --lengths: also Mamba-2 130m's training shape (B=8, L=2048, H=24)")
    ap.add_argument("--dbc-block-n", type=int, help="our dB/dC kernel's N block (chunk_scan.DBC_BLOCK_N)")
    ap.add_argument("--two-walk-launches", action="store_true",
                    help="our backward's walks as two launches (chunk_state.FUSED_WALKS = False)")
    args = ap.parse_args()
    from mamba_pkg.ops.ssd import chunk_scan, chunk_state

    if args.dbc_block_n:
        chunk_scan.DBC_BLOCK_N = args.dbc_block_n
    if args.two_walk_launches:
        chunk_state.FUSED_WALKS = False
    if args.precompile or args.precompile_anchor:
        bases = shapes(False, args.lengths, args.train_shape) if args.lengths else None
        if args.precompile:
            precompile(args.precompile, "ours", bases)
        if args.precompile_anchor:
            precompile(args.precompile_anchor, "mamba_ssm", bases)
        return
    rows = []
    t_start = time.time()
    pinned = False
    for i, s in enumerate(shapes(args.quick, args.lengths, args.train_shape)):
        if time.time() - t_start > args.budget_s:
            print(f"skipped (budget): {s}")
            continue
        if s["N"] != 128 and not pinned:
            try_provider("mamba_ssm", pin_anchor_autotuners)
            pinned = True
        for fwdbwd in (False, True):
            pass_name = "fwdbwd" if fwdbwd else "fwd"
            case = f"{pass_name} B={s['B']} L={s['L']} H={s['H']} P={s['P']} N={s['N']} G={s['G']} chunk={CHUNK}"
            flops, nbytes = flops_and_bytes(s, fwdbwd)
            variants = ((UNCACHED,) if args.uncached else ()) + ((OVERLAP,) if args.overlap else ())
            saved = ((SAVED,) if args.save_states and fwdbwd else ()) \
                + (tuple(f"{STREAMS}{k}" for k in args.backward_streams) if fwdbwd else ()) \
                + ((NO_TMA,) if args.tma_ab else ()) + tuple(f"{FWD_PDL}{k}" for k in args.forward_pdl)
            for provider in ("ours", "mamba_ssm") + (variants if i == 0 else ()) + saved:
                res = try_provider(provider, lambda s=s, provider=provider, fwdbwd=fwdbwd: bench_case(s, provider, fwdbwd))
                for timing, k in (("eager", 0), ("graph", 1)):
                    ms = res[k] if res else None
                    row = {"case": f"{case} timing={timing}", "provider": provider, "ms": ms}
                    if ms:
                        row["tflops"] = round(flops / ms / 1e9, 2)
                        row["gbps"] = round(nbytes / ms / 1e6, 1)
                        row["pct_tensor_core"] = round(100 * flops / (ms * 1e-3) / BF16_FLOPS, 1)
                        row["pct_hbm"] = round(100 * nbytes / (ms * 1e-3) / HBM_BYTES_PER_S, 1)
                        row["pct_limit"] = max(row["pct_tensor_core"], row["pct_hbm"])
                    if timing == "eager" and res:
                        row["host_ms"] = round(res[2], 3)
                    if provider == "mamba_ssm" and s["N"] != 128:
                        row["anchor_configs"] = "N=128 picks"
                    rows.append(row)
                print(f"{case} {provider}: eager/graph/host ms {res} (at {time.time() - t_start:.0f} s)", flush=True)
        save_results(args.name, [dict(r) for r in rows])  # after every shape: a cut-off run keeps its rows
        tuned_configs()
        if args.walk_probe and i == 0:
            try_provider("ours", lambda s=s: walk_probe(s))
        if args.stages and i == 0:
            try_provider("ours", lambda s=s: stage_profile(s))
        if args.profile and i == 0:
            for provider in ("ours", "mamba_ssm"):
                try_provider(provider, lambda s=s, provider=provider: kernel_profile(s, provider))
        if args.host_profile and i == 0:
            try_provider("ours", lambda s=s: host_profile(s))


if __name__ == "__main__":
    main()
