"""Fused norms: ours vs mamba_ssm, bf16 activations.

add+RMSNorm as the Mamba blocks run it: x bf16, residual fp32, residual_in_fp32, prenorm;
bytes = read x (2) + residual (4), write out (2) + residual (4) = 12 B per element.
Gated RMSNorm (Mamba-2 output norm, group_size = D / 4, norm_before_gate=False):
x, z bf16 in, out bf16 = 6 B per element. fwdbwd rows time forward + backward.
pct_limit = GB/s / 3000 (HBM).

    PYTHONPATH=. python benchmarks/bench_norm.py [--sweep]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bandwidth_row, save_results, time_ms, try_provider
from mamba_pkg.ops import norm
from mamba_pkg.ops.backend import next_pow2

SHAPES = ((32768, 2048), (32768, 4096))


def add_norm_inputs(rows, dim, requires_grad=False):
    torch.manual_seed(0)
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(rows, dim, device="cuda", dtype=torch.float32)
    w = torch.randn(dim, device="cuda", dtype=torch.float32)
    for t in (x, res, w):
        t.requires_grad_(requires_grad)
    return x, res, w


def add_norm_providers():
    out = {"ours": lambda x, w, res: norm.rms_norm_fn(x, w, None, res, eps=1e-5, prenorm=True, residual_in_fp32=True)}
    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

        out["mamba_ssm"] = lambda x, w, res: rms_norm_fn(x, w, None, residual=res, eps=1e-5, prenorm=True,
                                                         residual_in_fp32=True)
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"mamba_ssm not installed ({exc}); timing ours only")
    return out


def gated_providers():
    out = {"ours": lambda x, w, z, gs: norm.rms_norm_gated_fn(x, w, None, z, 1e-5, gs, False)}
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        out["mamba_ssm"] = lambda x, w, z, gs: rmsnorm_fn(x, w, None, z=z, eps=1e-5, group_size=gs,
                                                          norm_before_gate=False)
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"mamba_ssm gated norm not importable ({exc})")
    return out


def main_rows():
    rows = []
    for m, d in SHAPES:
        for name, fn in add_norm_providers().items():
            x, res, w = add_norm_inputs(m, d)
            ms = try_provider(name, lambda: time_ms(lambda: fn(x, w, res)))
            if ms is not None:
                rows.append(bandwidth_row(f"fwd add_rmsnorm M={m} D={d}", name, ms, 12 * m * d))
            x, res, w = add_norm_inputs(m, d, True)
            g, gs = torch.randn_like(x), torch.randn_like(res)

            def fwdbwd():
                out, s = fn(x, w, res)
                return torch.autograd.grad((out, s), (x, res, w), (g, gs))

            ms = try_provider(name, lambda: time_ms(fwdbwd))
            # backward: read s (4), dy (2), ds (4), write dx (2), dres (4)
            if ms is not None:
                rows.append(bandwidth_row(f"fwdbwd add_rmsnorm M={m} D={d}", name, ms, (12 + 16) * m * d))
        for name, fn in gated_providers().items():
            torch.manual_seed(0)
            x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            z = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(d, device="cuda", dtype=torch.float32, requires_grad=True)
            ms = try_provider(name, lambda: time_ms(lambda: fn(x, w, z, d // 4)))
            if ms is not None:
                rows.append(bandwidth_row(f"fwd gated_rmsnorm M={m} D={d}", name, ms, 6 * m * d))
            g = torch.randn_like(x)
            ms = try_provider(name, lambda: time_ms(lambda: torch.autograd.grad(fn(x, w, z, d // 4), (x, z, w), g)))
            if ms is not None:
                # backward: read x, z, dy, write dx, dz (10 B)
                rows.append(bandwidth_row(f"fwdbwd gated_rmsnorm M={m} D={d}", name, ms, 16 * m * d))
    return rows


def sweep():
    rows = []
    x, res, w = add_norm_inputs(32768, 2048)
    original = norm._row_blocks
    for block_m in (1, 2, 4):
        for warps in (4, 8, 16):
            norm._row_blocks = lambda dim, bm=block_m, nw=warps: (bm, next_pow2(dim), nw)
            ms = try_provider("ours", lambda: time_ms(
                lambda: norm.rms_norm_fn(x, w, None, res, prenorm=True, residual_in_fp32=True), 25, 100))
            if ms:
                rows.append(bandwidth_row("fwd add_rmsnorm M=32768 D=2048", f"ours block_m={block_m} warps={warps}", ms,
                                 12 * 32768 * 2048))
                print(rows[-1])
    norm._row_blocks = original
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time tile shapes instead of the comparison")
    args = parser.parse_args()
    if args.sweep:
        save_results("bench_norm_sweep", sweep(), plot_key="M")
    else:
        save_results("bench_norm", main_rows(), plot_key="M")


if __name__ == "__main__":
    main()
