"""Causal conv1d: ours vs causal_conv1d, bf16, bias + silu, forward and forward+backward.

B=4, D=2048, W=4, L in {2048, 8192}, x in (B, D, L)-contiguous and channel-last layouts.
Fewest bytes (each input read once, each output written once): fwd reads x and writes out
(2 * B*D*L * 2 B); the backward reads x and dout and writes dx (3 more; dweight/dbias are
D*W values); fwd+bwd = 5 * B*D*L * 2 B. pct_limit = GB/s / 3000 (HBM).

Every case is timed twice, for both providers:
- timing=graph: CUDA-graph replays (GPU time of the kernels; what the ratios in the notes use,
  since it compares the kernels and does not depend on how loaded the host is);
- timing=eager: triton.testing.do_bench of the Python call (what an eager training step
  sees: when the host takes longer to launch than the GPU to run, this is host time).
  host_ms is the host's time to issue one call (no sync), to show which bound applies.

Then Mamba-2's split conv at mamba2-130m's training shape (B=8, L=2048, xBC = 1536 + 128 + 128
channels of zxbcdt's 3352-value rows; bench_conv_split): the forward and backward launches of
one layer as graph replays, three launches per pass (x, B, C apart) against one fused launch
per pass, causal_conv1d's forward on the whole xBC slice, and a per-kernel profile.

    PYTHONPATH=. python benchmarks/bench_conv.py [--tune] [--quick] [--split] [--split-tune]
                                                 [--baseline DIR] [--rounds N] [--host-profile]

--tune first times tile shapes and backward variants (graph replays, L=2048 and 8192), then runs
the comparison with the fastest (printed and stored with the rows; copy them into
mamba_pkg/ops/causal_conv1d.py). --quick: L=8192 only. --graph-only: no eager timings.
--split: the split rows only; --split-tune: a sweep of the channel-last settings at the split
shape and the channel-last standalone cases first (bench_conv_split_sweep).
--baseline DIR: also time DIR/causal_conv1d.py (a copy of the file from another commit) as provider
"ours@base", in the same process (see load_baseline). --rounds N: eager timings are taken N times,
the providers interleaved, and the median kept (the H100 host's eager times move by +-0.1 ms between
runs; interleaving keeps the comparison fair). --host-profile: a cProfile of our eager fwd+bwd.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import host_profile as common_host_profile
from benchmarks.common import bandwidth_row, cuda_profile, save_results, time_ms, try_provider
from mamba_pkg.ops import causal_conv1d as conv
from mamba_pkg.ops._launch import clear_plans

B, D, W = 4, 2048, 4
LENGTHS = (2048, 8192)


def make_inputs(length, layout, requires_grad):
    torch.manual_seed(0)
    x = torch.randn(B, D, length, device="cuda", dtype=torch.bfloat16)
    if layout == "channel_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(D, W, device="cuda", dtype=torch.bfloat16) / W
    b = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    return x, w, b


def fwd_fn(impl, x, w, b):
    return lambda: impl(x, w, b, activation="silu")


def fwdbwd_fn(impl, x, w, b):
    g = torch.randn_like(x)

    def run():
        out = impl(x, w, b, activation="silu")
        # autograd.grad, not backward(): no .grad accumulation kernels in the timing.
        return torch.autograd.grad(out, (x, w, b), g)

    return run


def graph_ms(fn):
    """Median ms of fn replayed in a CUDA graph; falls back to time_ms if capture fails."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception as exc:  # an op that cannot be captured is still timed
        print(f"  graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
        return time_ms(fn)


def host_ms(fn, n=50):
    """Host time to issue one call (the GPU runs behind; synchronised only at the end)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e3


def load_baseline(path: str, name: str):
    """The op module at ``path`` (a copy of one of mamba_pkg/ops' files from another commit, for an A/B
    in one process), imported against today's package; its custom ops are registered as
    ``base_<name>`` so that they do not clash with ours."""
    import re
    import sys
    import types

    with open(path) as f:
        source = re.sub(r'launcher_op\("(\w+)"', r'launcher_op("base_\1"', f.read())
    module = types.ModuleType(f"mamba_pkg.ops._base_{name}")
    module.__file__ = path  # Triton reads the kernels' source from the file (same lines as the source run)
    sys.modules[module.__name__] = module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


BASELINE = None  # the --baseline module, a provider when given


def providers():
    out = {"ours": lambda x, w, b, activation: conv.causal_conv1d_fn(x, w, b, activation=activation)}
    if BASELINE is not None:
        out["ours@base"] = lambda x, w, b, activation: BASELINE.causal_conv1d_fn(x, w, b, activation=activation)
    try:
        import causal_conv1d

        out["causal_conv1d"] = lambda x, w, b, activation: causal_conv1d.causal_conv1d_fn(
            x, w, b, activation=activation)
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"causal_conv1d not installed ({exc}); timing ours only")
    return out


def eager_ms(fns: dict, rounds: int) -> dict:
    """{provider: (ms, host_ms)}: do_bench of each Python call, ``rounds`` times with the providers
    interleaved, medians over the rounds."""
    import statistics

    times = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ms = try_provider(name, lambda: time_ms(fn))
            if ms is not None:
                times[name][0].append(ms)
                times[name][1].append(host_ms(fn))
    return {name: (statistics.median(ms), statistics.median(host)) for name, (ms, host) in times.items() if ms}


def main_rows(lengths, timings=("graph", "eager"), rounds=3):
    rows = []
    for length in lengths:
        for layout in ("contiguous", "channel_last"):
            for pass_name, make in (("fwd", fwd_fn), ("fwdbwd", fwdbwd_fn)):
                n_bytes = (2 if pass_name == "fwd" else 5) * B * D * length * 2
                fns = {}
                for name, impl in providers().items():
                    x, w, b = make_inputs(length, layout, pass_name == "fwdbwd")
                    fns[name] = make(impl, x, w, b)
                for timing in timings:
                    case = f"{pass_name} B={B} D={D} W={W} L={length} layout={layout} timing={timing}"
                    if timing == "eager":
                        for name, (ms, host) in eager_ms(fns, rounds).items():
                            rows.append(dict(bandwidth_row(case, name, ms, n_bytes), host_ms=round(host, 4)))
                        continue
                    for name, fn in fns.items():
                        ms = try_provider(name, lambda: graph_ms(fn))
                        if ms is not None:
                            rows.append(bandwidth_row(case, name, ms, n_bytes))
    return rows


def host_profile(length=8192, layout="channel_last", n=200, top=25):
    """cProfile of n eager fwd+bwd calls of ours (printed): where the host time goes."""
    x, w, b = make_inputs(length, layout, True)
    common_host_profile(fwdbwd_fn(providers()["ours"], x, w, b), n, f"ours fwd+bwd, L={length} {layout}", top)


def kernel_rows(lengths):
    """Our backward launch alone (graph replays), for the notes: its share of fwd+bwd (and the
    baseline's, when given)."""
    rows = []
    modules = {"ours": conv, **({"ours@base": BASELINE} if BASELINE is not None else {})}
    for length in lengths:
        for layout in ("contiguous", "channel_last"):
            x, w, b = make_inputs(length, layout, False)
            g = torch.randn_like(x)
            for name, module in modules.items():
                ms = try_provider(f"{name} bwd", lambda: graph_ms(lambda: module._causal_conv1d_bwd(
                    x, w, b, None, None, None, True, g, False)))
                if ms is not None:
                    rows.append(bandwidth_row(f"bwd B={B} D={D} W={W} L={length} layout={layout} timing=graph",
                                              name, ms, 3 * B * D * length * 2))
    return rows


# Few candidates: each is a Triton compile, and a device run is short. The chunked path's
# configs are (BLOCK_D, chunks of 8 positions, num_warps[, register cap]) with (tiles per
# program, prefetch); the rows kernels' (channel-last: both passes)
# (BLOCK_D = 128 * num_warps at 8-byte loads, chunks of 4 rows per program, num_warps[, register
# cap]) with, for the backward, (variant, minimum programs per SM: STEPS is halved below that).
FWD_CANDIDATES = {"chunked": [(2, 128, 8), (4, 64, 4)],
                  "channel_last": [(128, 16, 1), (512, 16, 2)]}
BWD_CANDIDATES = {"chunked": [((2, 64, 4), (16, False)), ((2, 64, 4), (16, True)), ((2, 64, 4), (8, False)),
                              ((4, 32, 4), (16, False)), ((2, 128, 8), (16, False)), ((1, 64, 2), (16, False))],
                  "channel_last": [((128, 32, 1), ("rows", 8)), ((128, 32, 1), ("rows", 4)),
                                   ((256, 32, 2), ("rows", 4)), ((128, 16, 1), ("rows", 4))]}
SWEEP_LENGTHS = (2048, 8192)


def sweep():
    """Time the candidates at both lengths (graph replays); return (rows, the best per path:
    the smallest sum over the lengths of ms / the length's fastest ms)."""
    rows, best = [], {}

    def timed(case, label, fn):
        ms = try_provider(label, lambda: graph_ms(fn))
        if ms is not None:
            rows.append({"case": case, "provider": f"ours {label}", "ms": round(ms, 4)})
            print(f"{case:40s} {label:40s} {ms:.4f}", flush=True)
        return ms if ms is not None else float("inf")

    def fastest(times):  # times: {length: {candidate: ms}}
        rel = {c: sum(t[c] / min(t.values()) for t in times.values()) for c in next(iter(times.values()))}
        return min(rel, key=rel.get)

    for path, layout in (("chunked", "contiguous"), ("channel_last", "channel_last")):
        fwd, bwd = {}, {}
        for length in SWEEP_LENGTHS:
            x, w, b = make_inputs(length, layout, False)
            g = torch.randn_like(x)
            out = conv._empty_in_layout(x)
            dx, dw, db = conv._bwd_outputs(x, w, b, False)
            fwd[length] = {cfg: timed(f"fwd L={length} layout={layout}", str(cfg), lambda: conv._launch_fwd(
                out, x, w, b, None, None, None, True, config=cfg)) for cfg in FWD_CANDIDATES[path]}
            bwd[length] = {}
            for cfg, option in BWD_CANDIDATES[path]:
                extra = ({"tiles_per_program": option[0], "prefetch": option[1]} if path == "chunked"
                         else {"variant": option[0], "programs_per_sm": option[1]})
                bwd[length][(cfg, option)] = timed(f"bwd L={length} layout={layout}", f"{cfg} {option}",
                                                   lambda: conv._launch_bwd(dx, dw, db, x, w, b, None, None, None,
                                                                            True, g, config=cfg, **extra))
        best[path] = (fastest(fwd), fastest(bwd))
    return rows, best


def apply(best):
    """Make the library use the given settings (the values to copy into causal_conv1d.py)."""
    for path, (fwd_cfg, (bwd_cfg, option)) in best.items():
        conv.FWD_CONFIG["rows" if path == "channel_last" else path] = fwd_cfg
        if path == "chunked":
            conv.BWD_CONFIG[path] = bwd_cfg
            conv.BWD_TILES_PER_PROGRAM, conv.BWD_PREFETCH = option
        else:
            variant, min_programs = option
            conv.BWD_CONFIG["rows" if variant == "rows" else path] = bwd_cfg
            conv.BWD_DY_SHIFT[path] = variant
            conv.BWD_ROWS_MIN_PROGRAMS_PER_SM = min_programs
    clear_plans()  # the dicts changed in place: no attribute hook sees that


def settings():
    return {"fwd": dict(conv.FWD_CONFIG), "bwd": dict(conv.BWD_CONFIG), "dy_shift": dict(conv.BWD_DY_SHIFT),
            "fwd_channel_last": conv.FWD_CHANNEL_LAST, "fwd_rows_load_bytes": conv.FWD_ROWS_LOAD_BYTES,
            "bwd_rows_load_bytes": conv.BWD_ROWS_LOAD_BYTES,
            "tiles_per_program": conv.BWD_TILES_PER_PROGRAM, "prefetch": conv.BWD_PREFETCH,
            "programs_per_sm": conv.BWD_PROGRAMS_PER_SM, "rows_min_programs_per_sm": conv.BWD_ROWS_MIN_PROGRAMS_PER_SM}


# Mamba-2's split conv (ops/split_conv1d.py) at mamba2-130m's training shape: xBC is a channel
# slice of zxbcdt (B, L, 2*D_inner + 2*G*N + H) rows; x, B and C come out dense, and the
# backward writes dxBC into a slice of a dense (B, L, d_in_proj) gradient.
SPLIT = {"B": 8, "L": 2048, "d_inner": 1536, "gn": 128, "H": 24}


def split_inputs():
    torch.manual_seed(0)
    batch, length, d_inner, gn = SPLIT["B"], SPLIT["L"], SPLIT["d_inner"], SPLIT["gn"]
    dim = d_inner + 2 * gn
    zxbcdt = torch.randn(batch, length, 2 * dim + SPLIT["H"], device="cuda", dtype=torch.bfloat16)
    w = torch.randn(dim, W, device="cuda", dtype=torch.bfloat16) / W
    b = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    parts = ((0, d_inner), (d_inner, gn), (d_inner + gn, gn))
    outs = [torch.empty(batch, length, width, device="cuda", dtype=torch.bfloat16) for _, width in parts]
    douts = [torch.randn_like(o) for o in outs]
    dz = torch.empty_like(zxbcdt)
    dw, db = torch.empty_like(w), torch.empty_like(b)
    return zxbcdt, w, b, parts, outs, douts, dz, dw, db


def split_calls(fused, fwd_opts=None, bwd_opts=None):
    """(fwd, bwd) closures: the split op's three launches per pass (fused=False, what
    split_conv1d.py runs at session-9 HEAD) or one launch per pass with the parts as tuples."""
    zxbcdt, w, b, parts, outs, douts, dz, dw, db = split_inputs()
    d_inner = SPLIT["d_inner"]
    dim = w.shape[0]
    fwd_opts, bwd_opts = fwd_opts or {}, bwd_opts or {}

    def cols(t, lo, hi):
        return t[..., lo:hi].transpose(1, 2)

    if fused:
        x_all, dx_all = cols(zxbcdt, d_inner, d_inner + dim), cols(dz, d_inner, d_inner + dim)
        outs_t = tuple(o.transpose(1, 2) for o in outs)
        douts_t = tuple(d.transpose(1, 2) for d in douts)

        def fwd():
            conv._launch_fwd(outs_t, x_all, w, b, None, None, None, True, **fwd_opts)

        def bwd():
            conv._launch_bwd(dx_all, dw, db, x_all, w, b, None, None, None, True, douts_t, **bwd_opts)
    else:
        def fwd():
            for (first, width), out in zip(parts, outs):
                lo, hi = d_inner + first, d_inner + first + width
                conv._launch_fwd(out.transpose(1, 2), cols(zxbcdt, lo, hi), w[first:first + width],
                                 b[first:first + width], None, None, None, True, **fwd_opts)

        def bwd():
            for (first, width), dout in zip(parts, douts):
                lo, hi = d_inner + first, d_inner + first + width
                conv._launch_bwd(cols(dz, lo, hi), dw[first:first + width], db[first:first + width],
                                 cols(zxbcdt, lo, hi), w[first:first + width], b[first:first + width], None, None,
                                 None, True, dout.transpose(1, 2), **bwd_opts)
    return fwd, bwd


def split_case(pass_name):
    batch, length = SPLIT["B"], SPLIT["L"]
    dim = SPLIT["d_inner"] + 2 * SPLIT["gn"]
    case = f"split {pass_name} B={batch} L={length} D={SPLIT['d_inner']}+2*{SPLIT['gn']} W={W} timing=graph"
    return case, (2 if pass_name == "fwd" else 3) * batch * length * dim * 2


def split_rows():
    """The split op's conv launches of one mamba2-130m layer (graph replays): three launches per
    pass (as split_conv1d.py calls them at session-9 HEAD), one fused launch per pass, and
    causal_conv1d on the whole xBC slice (one launch: its outputs would be slices, not dense)."""
    rows = []
    for label, fused in (("ours 3 launches", False), ("ours fused", True)):
        fwd, bwd = split_calls(fused)
        for pass_name, fn in (("fwd", fwd), ("bwd", bwd)):
            case, n_bytes = split_case(pass_name)
            ms = try_provider(label, lambda: graph_ms(fn))
            if ms is not None:
                rows.append(bandwidth_row(case, label, ms, n_bytes))
    try:
        import causal_conv1d

        zxbcdt, w, b, *_ = split_inputs()
        d_inner, dim = SPLIT["d_inner"], w.shape[0]
        x = zxbcdt[..., d_inner:d_inner + dim].transpose(1, 2)
        case, n_bytes = split_case("fwd")
        ms = try_provider("causal_conv1d", lambda: graph_ms(
            lambda: causal_conv1d.causal_conv1d_fn(x, w, b, activation="silu")))
        if ms is not None:
            rows.append(bandwidth_row(case, "causal_conv1d", ms, n_bytes))
    except ImportError as exc:
        print(f"causal_conv1d not installed ({exc})")
    return rows


def split_profile():
    """Per-kernel device time (us per layer) of the fused launches, from torch.profiler."""
    fwd, bwd = split_calls(True)
    prof = cuda_profile(lambda: (fwd(), bwd()), steps=5)
    rows = []
    for evt in prof.key_averages():
        us = evt.device_time_total / 5
        if us > 0:
            rows.append({"case": f"split profile per layer: {evt.key[:60]}", "provider": "ours fused",
                         "ms": round(us / 1e3, 5), "calls": evt.count // 5})
            print(f"  {evt.key[:60]:60s} {us:8.2f} us  x{evt.count // 5}")
    return rows


# Split-shape tuning: (variant, config, rows-kernel load bytes) for the forward; (config, load
# bytes, rows-kernel minimum programs per SM) for the backward. Session 9's sweep
# (results/bench_conv_split_sweep_s9.json) also had a few more rows shapes.
SPLIT_FWD_CANDIDATES = [("general", (128, 32, 4), 16), ("rows", (256, 16, 1), 16), ("rows", (128, 16, 1), 8),
                        ("rows", (512, 16, 2), 16), ("rows", (512, 8, 4), 8)]
SPLIT_BWD_CANDIDATES = [((256, 32, 1), 16, 4), ((128, 32, 1), 8, 4), ((256, 32, 2), 8, 4), ((128, 16, 1), 8, 4),
                        ((128, 32, 1), 8, 8)]


def split_sweep():
    """Each candidate at the split shape (fused) and on the standalone channel-last cases."""
    rows = []
    standalone = []
    for length in LENGTHS:
        x, w, b = make_inputs(length, "channel_last", False)
        standalone.append((length, x, w, b, torch.randn_like(x), conv._empty_in_layout(x),
                           conv._bwd_outputs(x, w, b, False)))

    def timed(case, label, fn):
        ms = try_provider(label, lambda: graph_ms(fn))
        if ms is not None:
            rows.append({"case": case, "provider": f"ours {label}", "ms": round(ms, 4)})
            print(f"{case:36s} {label:40s} {ms:.4f}", flush=True)

    saved = conv.FWD_ROWS_LOAD_BYTES, conv.BWD_ROWS_LOAD_BYTES
    for variant, cfg, nbytes in SPLIT_FWD_CANDIDATES:
        conv.FWD_ROWS_LOAD_BYTES = nbytes
        opts = {"variant": variant, "config": cfg}
        label = f"{variant} {cfg} {nbytes}B"
        timed("split fwd fused", label, split_calls(True, fwd_opts=opts)[0])
        for length, x, w, b, g, out, _ in standalone:
            timed(f"fwd L={length} channel_last", label,
                  lambda: conv._launch_fwd(out, x, w, b, None, None, None, True, **opts))
    for cfg, nbytes, min_programs in SPLIT_BWD_CANDIDATES:
        conv.BWD_ROWS_LOAD_BYTES = nbytes
        opts = {"config": cfg, "programs_per_sm": min_programs}
        label = f"{cfg} {nbytes}B min{min_programs}"
        timed("split bwd fused", label, split_calls(True, bwd_opts=opts)[1])
        for length, x, w, b, g, _, (dx, dw, db) in standalone:
            timed(f"bwd L={length} channel_last", label,
                  lambda: conv._launch_bwd(dx, dw, db, x, w, b, None, None, None, True, g, **opts))
    conv.FWD_ROWS_LOAD_BYTES, conv.BWD_ROWS_LOAD_BYTES = saved
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true",
                        help="sweep tile shapes first and run the comparison with the fastest ones")
    parser.add_argument("--quick", action="store_true", help="L=8192 only")
    parser.add_argument("--graph-only", action="store_true", help="skip the eager timings")
    parser.add_argument("--split", action="store_true",
                        help="only the split op's launches at mamba2-130m's training shape (every run ends with them)")
    parser.add_argument("--split-tune", action="store_true", help="sweep channel-last settings (split shape too)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also time DIR/causal_conv1d.py (a copy from another commit) as provider ours@base")
    parser.add_argument("--rounds", type=int, default=3, help="eager timings: interleaved rounds (median kept)")
    parser.add_argument("--host-profile", action="store_true", help="print a cProfile of ours' eager fwd+bwd")
    args = parser.parse_args()
    global BASELINE
    if args.baseline:
        import os

        BASELINE = load_baseline(os.path.join(args.baseline, "causal_conv1d.py"), "causal_conv1d")
    if args.split_tune:
        save_results("bench_conv_split_sweep", split_sweep(), plot_key="L")
    if args.split or args.split_tune:
        save_results("bench_conv_split", split_rows() + split_profile(), plot_key="L")
        return
    if args.tune:
        rows, best = sweep()
        apply(best)
        save_results("bench_conv_sweep", rows, plot_key="L")
    print("settings:", settings(), flush=True)
    lengths = (8192,) if args.quick else LENGTHS
    rows = main_rows(lengths, ("graph",) if args.graph_only else ("graph", "eager"), args.rounds) + kernel_rows(lengths)
    if args.host_profile:
        host_profile()
    for r in rows:
        if r["provider"] == "ours":
            r["settings"] = str(settings())
    save_results("bench_conv", rows, plot_key="L")
    save_results("bench_conv_split", split_rows() + split_profile(), plot_key="L")


if __name__ == "__main__":
    main()
