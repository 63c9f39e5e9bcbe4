"""Causal conv1d: ours vs causal_conv1d, bf16, bias + silu, forward and forward+backward.

B=4, D=2048, W=4, L in {2048, 8192}, x in (B, D, L)-contiguous and channel-last layouts.
Bytes moved: fwd reads x and writes out (2 * B*D*L * 2 B); fwd+bwd adds reading x and
dout and writing dx (5 * B*D*L * 2 B). pct_limit = GB/s / 3000 (HBM).
fwd rows are timed as CUDA-graph replays (GPU time only: a 0.1 ms kernel is otherwise
timed partly as Python launch overhead, which differs between the providers); fwdbwd rows
(autograd.grad) both eagerly with common.time_ms and as CUDA-graph replays.

    PYTHONPATH=. python benchmarks/bench_conv.py [--tune]

--tune first times the tile shapes, both backward variants and the persistent grid size,
then runs the comparison with the fastest (printed and stored with the rows; copy them
into mamba_pkg/ops/causal_conv1d.py).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bandwidth_row, save_results, time_ms, try_provider
from mamba_pkg.ops import causal_conv1d as conv

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


def providers():
    out = {"ours": lambda x, w, b, activation: conv.causal_conv1d_fn(x, w, b, activation=activation)}
    try:
        import causal_conv1d

        out["causal_conv1d"] = lambda x, w, b, activation: causal_conv1d.causal_conv1d_fn(
            x, w, b, activation=activation)
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"causal_conv1d not installed ({exc}); timing ours only")
    return out


def main_rows():
    # fwdbwd twice: eager (what a training step sees, host overhead included: at this size
    # both providers are host-bound, about 0.6 ms whatever L) and as a CUDA-graph replay
    # (GPU time of the kernels).
    passes = (("fwd", fwd_fn, graph_ms, ""), ("fwdbwd", fwdbwd_fn, time_ms, " timing=eager"),
              ("fwdbwd", fwdbwd_fn, graph_ms, " timing=graph"))
    rows = []
    for length in LENGTHS:
        for layout in ("contiguous", "channel_last"):
            for pass_name, make, timer, suffix in passes:
                case = f"{pass_name} B={B} D={D} W={W} L={length} layout={layout}{suffix}"
                n_bytes = (2 if pass_name == "fwd" else 5) * B * D * length * 2
                for name, impl in providers().items():
                    x, w, b = make_inputs(length, layout, pass_name == "fwdbwd")
                    ms = try_provider(name, lambda: timer(make(impl, x, w, b)))
                    if ms is None:
                        continue
                    rows.append(bandwidth_row(case, name, ms, n_bytes))
    return rows


# Few candidates: each is a Triton compile, and a device run is short.
FWD_CANDIDATES = {"contiguous": [(8, 256, 4), (8, 512, 8)], "channel_last": [(128, 32, 4), (64, 64, 4)]}
BWD_CANDIDATES = {"contiguous": [(8, 256, 4), (16, 128, 4)], "channel_last": [(64, 64, 4), (128, 32, 4)]}


def sweep():
    """Time the tile shapes, the two backward variants and the persistent grid size at
    L=8192; return (rows, the fastest setting per layout and pass)."""
    rows, best = [], {}

    def timed(case, label, fn):
        ms = try_provider(label, lambda: graph_ms(fn))
        if ms is not None:
            rows.append({"case": case, "provider": f"ours {label}", "ms": round(ms, 4)})
            print(f"{case:40s} {label:40s} {ms:.4f}")
        return ms if ms is not None else float("inf")

    for layout in ("contiguous", "channel_last"):
        x, w, b = make_inputs(8192, layout, False)
        g = torch.randn_like(x)
        fwd = {cfg: timed(f"fwd L=8192 layout={layout}", str(cfg), lambda: conv._causal_conv1d_fwd(
            x, w, b, None, None, None, True, config=cfg)) for cfg in FWD_CANDIDATES[layout]}
        bwd = {}
        # The recompute variant only at the first tile shape: it is the fallback, not a contender.
        for cfg, variant in [(c, "scratch") for c in BWD_CANDIDATES[layout]] + [(BWD_CANDIDATES[layout][0],
                                                                                "recompute")]:
            bwd[(cfg, variant, 8)] = timed(f"bwd L=8192 layout={layout}", f"{cfg} {variant} pps=8", lambda: (
                conv._causal_conv1d_bwd(x, w, b, None, None, None, True, g, config=cfg, variant=variant,
                                        programs_per_sm=8)))
        cfg, variant, _ = min(bwd, key=bwd.get)
        bwd[(cfg, variant, 16)] = timed(f"bwd L=8192 layout={layout}", f"{cfg} {variant} pps=16", lambda: (
            conv._causal_conv1d_bwd(x, w, b, None, None, None, True, g, config=cfg, variant=variant,
                                    programs_per_sm=16)))
        best[layout] = (min(fwd, key=fwd.get), min(bwd, key=bwd.get))
    return rows, best


def apply(best):
    """Make the library use the given settings (the values to copy into causal_conv1d.py)."""
    for layout, (fwd_cfg, (bwd_cfg, variant, pps)) in best.items():
        conv.FWD_CONFIG[layout] = fwd_cfg
        conv.BWD_CONFIG[layout] = bwd_cfg
        conv.BWD_DY_SHIFT[layout] = variant
    # One grid size for both layouts: the contiguous layout's (the benchmark's headline case).
    conv.BWD_PROGRAMS_PER_SM = best["contiguous"][1][2]


def settings():
    return {"fwd": dict(conv.FWD_CONFIG), "bwd": dict(conv.BWD_CONFIG), "dy_shift": dict(conv.BWD_DY_SHIFT),
            "programs_per_sm": conv.BWD_PROGRAMS_PER_SM}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true",
                        help="sweep tile shapes first and run the comparison with the fastest ones")
    args = parser.parse_args()
    if args.tune:
        rows, best = sweep()
        apply(best)
        save_results("bench_conv_sweep", rows, plot_key="L")
    print("settings:", settings())
    rows = main_rows()
    for r in rows:
        if r["provider"] == "ours":
            r["settings"] = str(settings())
    save_results("bench_conv", rows, plot_key="L")


if __name__ == "__main__":
    main()
