"""Causal conv1d: ours vs causal_conv1d, bf16, bias + silu, forward and forward+backward.

B=4, D=2048, W=4, L in {2048, 8192}, x in (B, D, L)-contiguous and channel-last layouts.
Bytes moved: fwd reads x and writes out (2 * B*D*L * 2 B); fwd+bwd adds reading x and
dout and writing dx (5 * B*D*L * 2 B). pct_limit = GB/s / 3000 (HBM).

    PYTHONPATH=. python benchmarks/bench_conv.py [--sweep]

--sweep times the kernel tile shapes and both backward variants and prints them (it does
not change the defaults; copy the winners into mamba_pkg/ops/causal_conv1d.py).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import HBM_BYTES_PER_S, save_results, time_ms, try_provider
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


def providers():
    out = {"ours": lambda x, w, b, activation: conv.causal_conv1d_fn(x, w, b, activation=activation)}
    try:
        import causal_conv1d

        out["causal_conv1d"] = lambda x, w, b, activation: causal_conv1d.causal_conv1d_fn(
            x, w, b, activation=activation)
    except ImportError as exc:
        print(f"causal_conv1d not installed ({exc}); timing ours only")
    return out


def main_rows():
    rows = []
    for length in LENGTHS:
        for layout in ("contiguous", "channel_last"):
            for pass_name, make in (("fwd", fwd_fn), ("fwdbwd", fwdbwd_fn)):
                case = f"{pass_name} B={B} D={D} W={W} L={length} layout={layout}"
                n_bytes = (2 if pass_name == "fwd" else 5) * B * D * length * 2
                for name, impl in providers().items():
                    x, w, b = make_inputs(length, layout, pass_name == "fwdbwd")
                    ms = try_provider(name, lambda: time_ms(make(impl, x, w, b)))
                    if ms is None:
                        continue
                    gbps = n_bytes / ms / 1e6
                    rows.append({"case": case, "provider": name, "ms": round(ms, 4), "gbps": round(gbps, 1),
                                 "pct_limit": round(100 * gbps * 1e9 / HBM_BYTES_PER_S, 1)})
    return rows


def sweep():
    """Tile shapes for each layout, and the two ways the backward pass shifts dy."""
    rows = []
    fwd_configs = [(4, 512, 4), (8, 256, 4), (8, 512, 8), (16, 256, 4), (16, 512, 8)]
    cl_configs = [(64, 64, 4), (128, 32, 4), (128, 64, 8), (256, 32, 8)]
    for layout, configs in (("contiguous", fwd_configs), ("channel_last", cl_configs)):
        x, w, b = make_inputs(8192, layout, False)
        g = torch.randn_like(x)
        for cfg in configs:
            ms = try_provider(str(cfg), lambda: time_ms(
                lambda: conv._causal_conv1d_fwd(x, w, b, None, None, None, True, config=cfg), 25, 100))
            rows.append({"case": f"fwd L=8192 layout={layout}", "provider": f"ours{cfg}", "ms": ms})
            for variant in ("scratch", "recompute"):
                ms = try_provider(str(cfg), lambda: time_ms(
                    lambda: conv._causal_conv1d_bwd(x, w, b, None, None, None, True, g, config=cfg, variant=variant),
                    25, 100))
                rows.append({"case": f"bwd L=8192 layout={layout} {variant}", "provider": f"ours{cfg}",
                             "ms": ms})
    for r in rows:
        print(f"{r['case']:45s} {r['provider']:22s} {r['ms']}")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time tile shapes instead of the comparison")
    args = parser.parse_args()
    if args.sweep:
        save_results("bench_conv_sweep", [r for r in sweep() if r["ms"]], plot_key="L")
    else:
        save_results("bench_conv", main_rows(), plot_key="L")


if __name__ == "__main__":
    main()
