"""Decode-step ops: ours vs causal_conv1d (causal_conv1d_update) and mamba_ssm
(selective_state_update), bf16 activations, fp32 SSM state (and bf16 state: cases
``state=bf16``, both providers), batch 1 / 64 / 256; and ``ssm_fused``: our one-kernel
ssm_decode_step against the chain mamba_ssm's Mamba.step runs for the same work.

Shapes: Mamba-1 D=2048, N=16; Mamba-2 H=32, P=64, N=128, G=1 (conv over
D + 2*G*N = 2304 channels); conv width 4, conv_state (batch, channels, 4).
Bytes: the state is read and written once (fp32 SSM state, bf16 conv state) plus the
per-token inputs and outputs. pct_limit = GB/s / 3000 (HBM).
Timed as CUDA-graph replays, as decoding runs them (generation captures the step): an
eager call of these microsecond kernels measures the host, not the op. Without the L2
flush of time_ms, a Mamba-1 state (8 MB at batch 64) can stay in L2; Mamba-2's does not.

    PYTHONPATH=. python benchmarks/bench_decode_ops.py [--tune] [--quick] [--baseline DIR] [--rounds N]

--tune first times tile shapes and runs the comparison with the fastest (printed).
State-update rows are also timed eagerly (``timing=eager``: triton.testing.do_bench of the plain
Python call, with host_ms, the host's time to issue one call), under the default grad mode
(``mode=grad``) and under torch.inference_mode (``mode=inference``), the providers interleaved over
--rounds rounds (median kept). --baseline DIR: also time DIR/state_update.py (a copy from another
commit) as provider "ours@base" in the same process; under grad mode it runs with the custom-op
dispatcher as before session 12 (_library.bypass_without_grad off).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bandwidth_row, save_results, time_ms, try_provider
from mamba_pkg.ops import state_update as ssu
from mamba_pkg.ops._launch import clear_plans
from mamba_pkg.ops.causal_conv1d import causal_conv1d_update

BATCHES = (1, 64, 256)
MAMBA1 = dict(dim=2048, n=16)
MAMBA2 = dict(heads=32, hdim=64, n=128, groups=1)
W = 4


def ssu_inputs(model, batch, state_dtype=torch.float32):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    sb = torch.finfo(state_dtype).bits // 8
    if model == "mamba1":
        dim, n = MAMBA1["dim"], MAMBA1["n"]
        kw = dict(state=torch.randn(batch, dim, n, device=dev).to(state_dtype), x=torch.randn(batch, dim, device=dev, dtype=bf),
                  dt=torch.randn(batch, dim, device=dev, dtype=bf), A=-torch.rand(dim, n, device=dev),
                  B=torch.randn(batch, n, device=dev, dtype=bf), C=torch.randn(batch, n, device=dev, dtype=bf),
                  D=torch.randn(dim, device=dev), z=torch.randn(batch, dim, device=dev, dtype=bf),
                  dt_bias=torch.randn(dim, device=dev))
        n_bytes = batch * dim * n * sb * 2 + batch * dim * 2 * 4 + batch * n * 2 * 2
    else:
        h, p, n, g = MAMBA2["heads"], MAMBA2["hdim"], MAMBA2["n"], MAMBA2["groups"]
        kw = dict(state=torch.randn(batch, h, p, n, device=dev).to(state_dtype), x=torch.randn(batch, h, p, device=dev, dtype=bf),
                  dt=torch.randn(batch, h, device=dev, dtype=bf)[..., None].expand(batch, h, p),
                  A=(-torch.rand(h, device=dev))[:, None, None].expand(h, p, n),
                  B=torch.randn(batch, g, n, device=dev, dtype=bf), C=torch.randn(batch, g, n, device=dev, dtype=bf),
                  D=torch.randn(h, device=dev)[:, None].expand(h, p),
                  z=torch.randn(batch, h, p, device=dev, dtype=bf),
                  dt_bias=torch.randn(h, device=dev)[:, None].expand(h, p))
        n_bytes = batch * h * p * n * sb * 2 + batch * h * p * 2 * 3 + batch * g * n * 2 * 2
    return kw, n_bytes


def conv_inputs(model, batch):
    torch.manual_seed(0)
    channels = MAMBA1["dim"] if model == "mamba1" else MAMBA1["dim"] + 2 * MAMBA2["groups"] * MAMBA2["n"]
    x = torch.randn(batch, channels, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(batch, channels, W, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(channels, W, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(channels, device="cuda", dtype=torch.bfloat16)
    n_bytes = batch * channels * (W * 2 * 2 + 2 * 2)
    return (x, state, w, b), n_bytes


def graph_ms(fn, rep=100):
    """Median ms of fn replayed in a CUDA graph; falls back to time_ms if capture fails."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception as exc:  # an op that cannot be captured is still timed
        print(f"  graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
        return time_ms(fn)


def ssu_providers():
    out = {"ours": ssu.selective_state_update}
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        out["mamba_ssm"] = selective_state_update
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"mamba_ssm not installed ({exc}); timing ours only")
    return out


def conv_providers():
    out = {"ours": causal_conv1d_update}
    try:
        import causal_conv1d

        out["causal_conv1d"] = causal_conv1d.causal_conv1d_update
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"causal_conv1d not installed ({exc}); timing ours only")
    return out


def fused_inputs(batch, rank=128):
    """Mamba-1 step inputs (mamba-1.4b: D=4096, N=16, dt rank 128) as the mixer has them."""
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    dim, n = 2 * MAMBA1["dim"], MAMBA1["n"]
    xz = torch.randn(batch, 2 * dim, device=dev, dtype=bf)
    x_dbl = torch.randn(batch, rank + 2 * n, device=dev, dtype=bf)
    kw = dict(state=torch.randn(batch, dim, n, device=dev), x=xz[:, :dim], dt=x_dbl[:, :rank],
              A_log=torch.randn(dim, n, device=dev), B=x_dbl[:, rank:rank + n], C=x_dbl[:, rank + n:],
              D=torch.randn(dim, device=dev), z=xz[:, dim:], dt_bias=torch.randn(dim, device=dev, dtype=bf),
              dt_proj_weight=torch.randn(dim, rank, device=dev, dtype=bf) / rank**0.5)
    n_bytes = batch * dim * n * 4 * 2 + batch * dim * 2 * 3 + dim * rank * 2 + dim * n * 4
    return kw, n_bytes


def fused_providers():
    """The SSM part of Mamba.step: ours as the model runs it (one kernel; from CUBLAS_DT_BATCH rows the
    dt projection is a cuBLAS GEMM first); mamba_ssm's chain (dt_proj GEMM, A = -exp(A_log), bias cast,
    selective_state_update) as its Mamba.step runs it."""
    from mamba_pkg.ops.ssm_decode_step import ssm_decode_step

    out = {"ours": ssm_decode_step}
    try:
        import torch.nn.functional as F
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        def chain(state, x, dt, A_log, B, C, D, z, dt_bias, dt_proj_weight):
            A = -torch.exp(A_log.float())
            return selective_state_update(state, x, F.linear(dt, dt_proj_weight), A, B, C, D, z=z,
                                          dt_bias=dt_bias.float(), dt_softplus=True)

        out["mamba_ssm"] = chain
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"mamba_ssm not installed ({exc}); timing ours only")
    return out


LINEAR_SHAPES = {  # (out_features, in_features) of a step's projections
    "mamba-1.4b in_proj": (8192, 2048), "mamba-1.4b out_proj": (2048, 4096),
    "mamba-130m in_proj": (3072, 768), "mamba-130m out_proj": (768, 1536),
}


def linear_rows(batches=(1, 8)):
    """A decode step's projection as the models run it (models/_cache_utils.step_linear: decode_linear's
    one launch up to STEP_LINEAR_MAX_ROWS rows, else the nn.Linear, i.e. cuBLAS) against torch's F.linear
    (cuBLAS); ``path=`` in the case names what ours ran."""
    import torch.nn.functional as F

    from mamba_pkg.models import _cache_utils

    rows = []
    for name, (n_out, n_in) in LINEAR_SHAPES.items():
        layer = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        for batch in batches:
            x = torch.randn(batch, n_in, device="cuda", dtype=torch.bfloat16)
            n_bytes = n_out * n_in * 2 + batch * (n_in + n_out) * 2
            path = "decode_linear" if batch <= _cache_utils.STEP_LINEAR_MAX_ROWS else "cublas"
            case = f"step linear {name.replace(' ', '_')} batch={batch} path={path}"
            for provider, fn in (("ours", lambda: _cache_utils.step_linear(layer, x)),
                                 ("torch", lambda: F.linear(x, layer.weight))):
                ms = try_provider(provider, lambda fn=fn: graph_ms(fn))
                if ms is not None:
                    rows.append(bandwidth_row(case, provider, ms, n_bytes))
    return rows


def conv_xproj_rows(batch=1):
    """conv_xproj_step (one launch) against the chain it replaces: causal_conv1d's update and the
    cuBLAS x_proj (mamba-1.4b: D=4096, x_proj 160 x 4096)."""
    import torch.nn.functional as F

    from mamba_pkg.ops.conv_xproj_step import conv_xproj_step

    dim, n_out = 2 * MAMBA1["dim"], 128 + 2 * MAMBA1["n"]
    bf = torch.bfloat16
    xz = torch.randn(batch, 2 * dim, device="cuda", dtype=bf)
    state = torch.randn(batch, dim, W, device="cuda", dtype=bf)
    w, b = torch.randn(dim, W, device="cuda", dtype=bf), torch.randn(dim, device="cuda", dtype=bf)
    wx = torch.randn(n_out, dim, device="cuda", dtype=bf)
    n_bytes = n_out * dim * 2 + batch * dim * (2 * W * 2 + 2 * 2)
    providers = {"ours": lambda: conv_xproj_step(xz[:, :dim], state, w, b, wx, "silu")}
    try:
        import causal_conv1d

        providers["causal_conv1d"] = lambda: F.linear(causal_conv1d.causal_conv1d_update(xz[:, :dim], state, w, b, "silu"), wx)
    except Exception as exc:  # a missing or broken anchor must not stop our rows
        print(f"causal_conv1d not installed ({exc}); timing ours only")
    rows = []
    for name, fn in providers.items():
        ms = try_provider(name, lambda fn=fn: graph_ms(fn))
        if ms is not None:
            rows.append(bandwidth_row(f"step conv_xproj model=mamba1-1.4b batch={batch}", name, ms, n_bytes))
    return rows


BASELINE = None  # the --baseline state_update module, a provider when given


def eager_ssu_rows(batches, rounds):
    """selective_state_update timed eagerly (see the module docstring), grad mode and inference mode."""
    from benchmarks.bench_conv import eager_ms
    from mamba_pkg.ops import _library

    rows = []
    providers = dict(ssu_providers())
    if BASELINE is not None:
        providers["ours@base"] = BASELINE.selective_state_update
    for model in ("mamba1", "mamba2"):
        for batch in batches:
            kw, n_bytes = ssu_inputs(model, batch)
            for mode in ("grad", "inference"):
                fns = {}
                for name, fn in providers.items():
                    fns[name] = lambda fn=fn: fn(**kw, dt_softplus=True)
                if "ours@base" in fns:
                    base = fns["ours@base"]

                    def before(base=base):
                        _library.bypass_without_grad = False
                        try:
                            return base()
                        finally:
                            _library.bypass_without_grad = True
                    fns["ours@base"] = before
                with torch.inference_mode() if mode == "inference" else torch.enable_grad():
                    times = eager_ms(fns, rounds)
                case = f"step state_update model={model} batch={batch} timing=eager mode={mode}"
                for name, (ms, host) in times.items():
                    rows.append(dict(bandwidth_row(case, name, ms, n_bytes), host_ms=round(host, 4)))
                    print(f"{case:70s} {name:10s} {ms:.4f} ms  host {host:.4f} ms", flush=True)
    return rows


def main_rows(batches=BATCHES, with_conv=True):
    rows = linear_rows() + conv_xproj_rows()
    for batch in batches:
        case = f"step ssm_fused model=mamba1-1.4b batch={batch}"
        for name, fn in fused_providers().items():
            kw, n_bytes = fused_inputs(batch)
            ms = try_provider(name, lambda: graph_ms(lambda: fn(**kw)))
            if ms is not None:
                rows.append(bandwidth_row(case, name, ms, n_bytes))
    for model in ("mamba1", "mamba2"):
        for batch in batches:
            for state_dtype in (torch.float32, torch.bfloat16):
                suffix = "" if state_dtype == torch.float32 else " state=bf16"
                case = f"step state_update model={model} batch={batch}{suffix}"
                for name, fn in ssu_providers().items():
                    kw, n_bytes = ssu_inputs(model, batch, state_dtype)
                    ms = try_provider(name, lambda: graph_ms(lambda: fn(**kw, dt_softplus=True)))
                    if ms is not None:
                        rows.append(bandwidth_row(case, name, ms, n_bytes))
            if not with_conv:
                continue
            case = f"step conv_update model={model} batch={batch}"
            for name, fn in conv_providers().items():
                (x, state, w, b), n_bytes = conv_inputs(model, batch)
                ms = try_provider(name, lambda: graph_ms(lambda: fn(x, state, w, b, "silu")))
                if ms is not None:
                    rows.append(bandwidth_row(case, name, ms, n_bytes))
    return rows


def sweep():
    """Time state tiles (fp32 values per program) and warps at batch 64, and the conv-update
    channel block; return (rows, the fastest settings)."""
    import mamba_pkg.ops.causal_conv1d as conv

    rows, best = [], {}

    def timed(case, label, fn):
        ms = try_provider(label, lambda: graph_ms(fn, 30))
        if ms is not None:
            rows.append({"case": case, "provider": f"ours {label}", "ms": round(ms, 4)})
            print(f"{case:45s} {label:25s} {ms:.4f}")
        return ms if ms is not None else float("inf")

    for model, key in (("mamba1", 16), ("mamba2", 128)):
        kw, _ = ssu_inputs(model, 64)
        times = {}
        for tile in (2048, 4096, 8192):
            for warps in (4, 8):
                ssu.TILE_ELEMS[key], ssu.NUM_WARPS[key] = tile, warps
                clear_plans()  # changed in place: no attribute hook sees it
                times[(tile, warps)] = timed(f"step state_update model={model} batch=64", f"tile={tile} warps={warps}",
                                             lambda: ssu.selective_state_update(**kw, dt_softplus=True))
        best[key] = min(times, key=times.get)
        ssu.TILE_ELEMS[key], ssu.NUM_WARPS[key] = best[key]
        clear_plans()
    (x, state, w, b), _ = conv_inputs("mamba2", 64)
    times = {}
    for block in (128, 256):
        conv.UPDATE_BLOCK_D = block
        times[block] = timed("step conv_update model=mamba2 batch=64", f"block_d={block}",
                             lambda: causal_conv1d_update(x, state, w, b, "silu"))
    conv.UPDATE_BLOCK_D = min(times, key=times.get)
    best["conv_update_block_d"] = conv.UPDATE_BLOCK_D
    return rows, best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true",
                        help="sweep tile shapes first and run the comparison with the fastest ones")
    parser.add_argument("--quick", action="store_true",
                        help="batch 64 only, state update and fused rows (no conv_update rows)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also time DIR/state_update.py (a copy from another commit) as provider ours@base")
    parser.add_argument("--rounds", type=int, default=3, help="eager timings: interleaved rounds (median kept)")
    parser.add_argument("--eager-only", action="store_true", help="only the eager state-update rows")
    args = parser.parse_args()
    global BASELINE
    if args.baseline:
        import os

        from benchmarks.bench_conv import load_baseline

        BASELINE = load_baseline(os.path.join(args.baseline, "state_update.py"), "state_update")
    settings = None
    if args.tune:
        rows, settings = sweep()
        save_results("bench_decode_ops_sweep", rows, plot_key="batch")
        print("settings:", settings)
    batches = (64,) if args.quick or args.eager_only else BATCHES
    rows = [] if args.eager_only else main_rows((64,), with_conv=False) if args.quick else main_rows()
    rows += eager_ssu_rows(batches, args.rounds)
    for r in rows:
        if r["provider"] == "ours" and settings:
            r["settings"] = str(settings)
    save_results("bench_decode_ops", rows, plot_key="batch")


if __name__ == "__main__":
    main()
