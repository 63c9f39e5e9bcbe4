"""Shared benchmark plumbing: timing, the results file, the table and the plot.

Every `bench_<family>.py` builds a list of rows, one per (case, provider), with
`time_ms`, then calls `save_results`. Row format (STYLE.md):
    {"case": "fwd B=4 D=2048 L=8192 N=16", "provider": "ours", "ms": 0.123,
     "gbps": ..., "tflops": ..., "pct_limit": ..., "speedup_vs_best_other": ...}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from typing import Callable, Optional

import torch

HBM_BYTES_PER_S = 3.0e12  # measured device-to-device copy on an H100 80GB HBM3
BF16_FLOPS = 790e12  # measured large bf16 matmul
EXP_PER_S = 3.9e12  # MUFU exponentials

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn: Callable[[], object], warmup_ms: int = 100, rep_ms: int = 400) -> float:
    """Median time of ``fn`` in ms with CUDA events, after warm-up.

    The caller runs ``fn`` once before this (compilation, autotuning) so that the
    warm-up here measures steady state only.
    """
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cuda_profile(step: Callable[[], object], steps: int = 2):
    """torch.profiler (CUDA activity) over ``steps`` calls of ``step``, after one warm-up call
    outside it; returns the profiler (``.key_averages()`` for per-kernel device times)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof


def host_profile(step: Callable[[], object], steps: int, title: str, top: int = 25) -> str:
    """cProfile's top functions (own time) of ``steps`` eager calls of ``step``, after one warm-up
    call outside it: where the host time of an eager call goes. Printed and returned."""
    import cProfile
    import io
    import pstats

    step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    report = f"--- host profile: {title}, {steps} eager calls ---\n{text.getvalue()}"
    print(report, flush=True)
    return report


def try_provider(name: str, fn: Callable[[], float]) -> Optional[float]:
    """Run one provider's timing; a provider that fails is reported, not fatal."""
    try:
        return fn()
    except Exception as exc:  # a missing anchor or an OOM must not lose the other rows
        print(f"  [{name}] failed: {type(exc).__name__}: {exc}")
        return None


def bandwidth_row(case: str, provider: str, ms: float, n_bytes: int) -> dict:
    """A row for a memory-bound op: ms, GB/s and percent of the HBM limit."""
    gbps = n_bytes / ms / 1e6
    return {"case": case, "provider": provider, "ms": round(ms, 4), "gbps": round(gbps, 1),
            "pct_limit": round(100 * gbps * 1e9 / HBM_BYTES_PER_S, 1)}


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "mamba_ssm", "causal_conv1d", "transformers", "mamba_pkg"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def add_ratios(rows: list) -> list:
    """Set ``speedup_vs_best_other`` on each row: best other provider's ms / this row's ms."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case_rows in by_case.values():
        for r in case_rows:
            others = [o["ms"] for o in case_rows if o is not r and o.get("ms")]
            if r.get("ms") and others:
                r["speedup_vs_best_other"] = round(min(others) / r["ms"], 3)
    return rows


def print_table(rows: list) -> None:
    cols = ["case", "provider", "ms", "gbps", "tflops", "pct_limit", "speedup_vs_best_other"]
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def save_results(name: str, rows: list, out_dir: Optional[str] = None, plot_key: str = "L") -> str:
    """Write ``<name>.json`` and ``<name>.png`` (ms against ``plot_key``) and print the table."""
    out_dir = out_dir or os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    add_ratios(rows)
    print_table(rows)
    doc = {
        "gpu": gpu_name(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "rows": rows,
    }
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    _plot(name, rows, out_dir, plot_key)
    return path


def _plot(name: str, rows: list, out_dir: str, plot_key: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # One line per (pass + shape without plot_key, provider); x = plot_key value.
    series: dict = {}
    for r in rows:
        if not r.get("ms"):
            continue
        m = re.search(rf"\b{plot_key}=(\d+)", r["case"])
        if not m:
            continue
        family = re.sub(rf"\s*\b{plot_key}=\d+", "", r["case"])
        series.setdefault((family, r["provider"]), []).append((int(m.group(1)), r["ms"]))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (family, provider), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if provider == "ours" else "--", label=f"{provider}: {family}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(plot_key)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{name} on {gpu_name()}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=110)
    plt.close(fig)
