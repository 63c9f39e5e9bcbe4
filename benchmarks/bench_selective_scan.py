"""Mamba-1 selective scan: ours (Triton) against mamba_ssm's CUDA selective_scan_fn.

bf16 u / delta / z / B / C (B, C input-dependent (B, N, L)), fp32 A, D, delta_bias,
delta_softplus=True. Passes: `fwd` (no grad) and `fwdbwd` (forward + backward of
every input). Limits reported per row:
  pct_hbm: the minimum HBM traffic (fwd: read u, delta, z, write out; fwdbwd: that
           plus read u, delta, z, dout and write du, ddelta, dz; bf16) at 3.0 TB/s,
  pct_exp: one exp per (b, d, l, n) in the forward and one in the backward at 3.9e12/s,
as a percentage of the measured time (100 = at the limit).

    python benchmarks/bench_selective_scan.py [--quick] [--sweep 16,4,64] [--profile] [--skip-anchor]
                                              [--variants all|NAME,NAME]
                                              [--passes fwd,fwdbwd] [--rep-ms 400] [--waves]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks.common import EXP_PER_S, HBM_BYTES_PER_S, cuda_profile, save_results, time_ms, try_provider


# Timed repetitions per case in ms (--rep-ms; the warm-up is a quarter of it).
REP_MS = 400


def make_inputs(batch, dim, seqlen, dstate, requires_grad=False, dtype=torch.bfloat16):
    dev = "cuda"
    u = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)
    delta = (0.5 * torch.rand(batch, dim, seqlen, device=dev) - 4.0).to(dtype)
    A = -torch.rand(dim, dstate, device=dev) * 4 - 0.5
    B = torch.randn(batch, dstate, seqlen, device=dev, dtype=dtype)
    C = torch.randn(batch, dstate, seqlen, device=dev, dtype=dtype)
    D = torch.randn(dim, device=dev)
    z = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)
    delta_bias = torch.rand(dim, device=dev) * 2
    args = [u, delta, A, B, C, D, z, delta_bias]
    if requires_grad:
        for t in args:
            t.requires_grad_(True)
    return args


def provider_fn(name):
    if name == "ours":
        from mamba_pkg.ops.selective_scan import selective_scan_fn

        return lambda *a: selective_scan_fn(*a, delta_softplus=True, backend="triton")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return lambda *a: selective_scan_fn(*a, delta_softplus=True)


def bench_case(provider, pass_, batch, dim, seqlen, dstate, deterministic=False):
    """ms per call; deterministic: under torch.use_deterministic_algorithms (our backward then sums
    per-block dB / dC partials instead of adding them atomically)."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return bench_case(provider, pass_, batch, dim, seqlen, dstate)
        finally:
            torch.use_deterministic_algorithms(False)
    fn = provider_fn(provider)
    if pass_ == "fwd":
        args = make_inputs(batch, dim, seqlen, dstate)

        def run():
            with torch.no_grad():
                return fn(*args)
    else:
        args = make_inputs(batch, dim, seqlen, dstate, requires_grad=True)
        grad = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16)

        def run():
            for t in args:
                t.grad = None
            fn(*args).backward(grad)
    run()
    return time_ms(run, warmup_ms=REP_MS // 4, rep_ms=REP_MS)


def limits(pass_, batch, dim, seqlen, dstate):
    elems = batch * dim * seqlen
    hbm_bytes = elems * 2 * (4 if pass_ == "fwd" else 11)
    exps = elems * dstate * (1 if pass_ == "fwd" else 2)
    return hbm_bytes, hbm_bytes / HBM_BYTES_PER_S * 1e3, exps / EXP_PER_S * 1e3


def cases(quick: bool, main: bool = False):
    """(B, D, L, N) rows: the issue's matrix; --quick keeps one of each kind; --main only the
    issue's main shapes (B=4, D=2048, N=16, L in 512, 2048, 8192)."""
    if main:
        return [(4, 2048, L, 16) for L in (512, 2048, 8192)]
    out = [(4, 2048, L, 16) for L in ([512, 2048, 8192] if quick else [512, 2048, 8192, 32768])]
    out += [(1, 4096, L, 16) for L in ([32768] if quick else [8192, 32768, 131072])]
    out += [(4, 2048, 4096, N) for N in (4, 16, 64)]
    return out


def _outputs_and_grads(dstate, seed=0, seqlen=1024, batch=2, dim=512):
    torch.manual_seed(seed)
    args = make_inputs(batch, dim, seqlen, dstate, requires_grad=True)
    out = provider_fn("ours")(*args)
    grads = torch.autograd.grad(out.float().square().sum(), args)
    return [out.detach()] + list(grads)


# Candidate kernel shapes (BLOCK_D, N_IN, N_LANES, BLOCK_L, num_warps[, max_registers]) per state
# size: "fwd" is the forward without gradients, "bwd" the backward (and the forward that saves
# its checkpoints). BLOCK_D * N_LANES is a multiple of 32 * num_warps (a thread holds
# BLOCK_D * N_LANES / (32 * num_warps) channels).
SWEEP = {
    (16, "fwd"): [(8, 4, 4, 16, 1), (16, 4, 4, 8, 1), (4, 2, 8, 16, 1)],
    (16, "bwd"): [(8, 4, 4, 8, 1), (16, 4, 4, 4, 1), (4, 2, 8, 8, 1), (4, 2, 8, 16, 1)],
    (4, "fwd"): [(32, 4, 1, 16, 1), (16, 2, 2, 16, 1), (32, 4, 1, 8, 1)],
    (4, "bwd"): [(32, 4, 1, 8, 1), (16, 2, 2, 8, 1), (32, 4, 1, 4, 1), (32, 2, 2, 4, 1)],
    (64, "fwd"): [(4, 8, 8, 8, 1), (16, 8, 8, 8, 4), (8, 16, 4, 8, 1)],
    (64, "bwd"): [(8, 16, 4, 4, 1), (4, 8, 8, 4, 1), (16, 8, 8, 4, 4), (8, 4, 16, 4, 4), (4, 4, 16, 4, 2)],
}


def _hook_block_sizes(overrides):
    """Make the launchers use overrides {(dstate, pass_): cfg} ("fwd", "ckpt", "bwd"; cfg as in
    SWEEP, the checkpointing forward following "bwd" unless given); returns the undo function."""
    import mamba_pkg.ops.selective_scan as ss

    original = ss._block_sizes

    def hooked(dstate, group_size, grouped, pass_):
        cfg = overrides.get((dstate, pass_))
        if cfg is None and pass_ == "ckpt" and (dstate, "bwd") in overrides:
            cfg = overrides[(dstate, "bwd")]
        if cfg is None or grouped:
            return original(dstate, group_size, grouped, pass_)
        return (*cfg, None) if len(cfg) == 5 else tuple(cfg)

    ss._block_sizes = hooked
    return lambda: setattr(ss, "_block_sizes", original)


def sweep(states=(16, 4, 64)):
    """Time the SWEEP shapes at B=4, D=2048 (L=2048 for N=16, else 4096), check each
    against the default shapes' results, and use the fastest in the rows that follow."""
    chosen = {}
    _hook_block_sizes(chosen)
    lines = []
    for dstate in states:
        seqlen = 2048 if dstate == 16 else 4096
        reference = _outputs_and_grads(dstate)
        for pass_ in ("fwd", "bwd"):
            best = (1e9, None)
            for cfg in SWEEP[(dstate, pass_)]:
                chosen[(dstate, pass_)] = cfg
                try:
                    got = _outputs_and_grads(dstate)
                    worst = max(((g.double() - r.double()).norm() / r.double().norm()).item()
                                for g, r in zip(got, reference))
                except Exception as exc:  # a shape Triton cannot compile is skipped, not fatal
                    worst, ms = float("nan"), None
                    print(f"  cfg {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
                else:
                    timed = "fwd" if pass_ == "fwd" else "fwdbwd"
                    ms = try_provider("ours", lambda: bench_case("ours", timed, 4, 2048, seqlen, dstate)) \
                        if worst < 1e-2 else None
                lines.append(f"sweep {pass_} B=4 D=2048 L={seqlen} N={dstate} "
                             f"cfg(BLOCK_D,N_IN,N_LANES,BLOCK_L,warps)={cfg}: ms={ms} max_rel_err_vs_default={worst:.1e}")
                print(lines[-1], flush=True)
                if ms and ms < best[0]:
                    best = (ms, cfg)
            chosen[(dstate, pass_)] = best[1]
            lines.append(f"sweep best N={dstate} {pass_}: {best[1]} ({best[0]:.4f} ms)")
            print(lines[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT") or ".", "bench_selective_scan_sweep.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


# Variants timed side by side (--variants): block-shape overrides per pass at N=16 (cfg as in SWEEP, with
# a register cap as a sixth entry), "fast_math": False for Triton's own exp2 / log2 (libdevice's accurate
# log2f on Triton 3.6) instead of the inline-PTX approximations, and the module switches of FLAGS.
# Each is checked against the first variant on the same inputs before it is timed.
# Not kept (H100, same run, session 6; results/bench_selective_scan_s6_variants.txt): eight lanes
# per channel (twice the warps), fwd (4, 2, 8, 16, 1) 0.277 / (4, 2, 8, 8, 1) 0.313 ms against 0.176
# at B=4 D=2048 L=2048 (0.516 / 0.647 against 0.502 at B=1 D=4096 L=8192), bwd (4, 2, 8, 8, 1)
# fwd+bwd 1.396 against 0.799; 8-step forward tiles computing the decays a tile ahead 0.223.
VARIANTS = {
    "default": {},
    "exact math": {"fast_math": False},
    "no L1 prefetch": {"l1_prefetch": False},
    # Sums across lanes by shuffles (session 6) instead of the layout change of _sum_last.
    "shuffle sums": {"split_sums": False},
    # The forward's last blocks of channels in two half-length programs (selective_scan._tail_split).
    "split tail": {"split_tail": True},
    # B and C converted to fp32 before their layout change (session 7) instead of moved as bf16 words.
    "no B/C words": {"bc_words_fwd": False, "bc_words_bwd": False},
    "no B/C words in bwd": {"bc_words_bwd": False},
    # Session 6's forward (fp32 B/C, shuffle sums): the B=8 D=1536 L=8192 row measured 1.087 ms then.
    "session 6 forward": {"bc_words_fwd": False, "split_sums": False},
    # Our deterministic mode (per-block dB / dC partials summed by torch instead of atomic adds).
    "deterministic": {"deterministic": True},
    # The backward capped at 216 / 200 registers (9 / 10 one-warp programs per SM instead of 8; offline sm_90
    # SASS, Triton 3.6: 24 / 104 bytes of spill, loop otherwise unchanged), the checkpointing forward as is.
    "bwd 216 regs": {"bwd": (8, 4, 4, 8, 1, 216), "ckpt": (8, 4, 4, 16, 1)},
    "bwd 200 regs": {"bwd": (8, 4, 4, 8, 1, 200), "ckpt": (8, 4, 4, 16, 1)},
    # Both forwards capped at 152 registers (13 programs per SM instead of 12; offline: no spill, same loop).
    "fwd 152 regs": {"fwd": (8, 4, 4, 16, 1, 152), "ckpt": (8, 4, 4, 16, 1, 152)},
}
# Not kept (H100, same run, session 10, B=4 D=4096 L=2048 fwd+bwd, default 1.336 ms;
# results/bench_selective_scan_s10_variants.txt): the backward's atomic dB / dC adds spread over 4 / 16
# copies of dB / dC (program i_d into copy i_d % copies, then a torch sum) 1.343 / 1.353, so the adds of
# the 512 programs of a batch row into the same lines do not contend; the tail split (SPLIT_TAIL) with the
# B / C words kernels at 12 programs per SM, in both forwards: fwd 0.321 against 0.289, fwd+bwd 1.347.
# The backward capped at 224 registers (9 programs per SM, no spill, loop +5 instructions) where a launch has
# more than 8 per SM (results/bench_selective_scan_s10_variants.txt, kernel times): 0.984 against 0.963 ms
# at B=4 D=4096 L=2048, 0.801 against 0.780 at B=8 D=1536 L=2048.
# Module switches of mamba_pkg.ops.selective_scan a variant may set, and the passes they change.
FLAGS = {
    "l1_prefetch": ("L1_PREFETCH", {"fwd", "fwdbwd"}),
    "split_sums": ("SPLIT_SUMS", {"fwd", "fwdbwd"}),
    "split_tail": ("SPLIT_TAIL", {"fwd"}),
    "bc_words_fwd": ("BC_WORDS_FWD", {"fwd", "fwdbwd"}),
    "bc_words_bwd": ("BC_WORDS_BWD", {"fwdbwd"}),
}
# Not kept (H100, same run, session 7; results/bench_selective_scan_s7_variants.txt): B and C taken to
# the scan layout as 64-bit pairs (one STS.128 per two pairs instead of a stmatrix between two warp
# syncs per register; offline SASS fwd 614 -> 570 loop instructions per tile, bwd 849 -> 831):
# fwd B=4 D=2048 L=2048 0.196 against 0.165 ms, L=8192 0.750 against 0.621, bwd kernel 0.536 vs 0.506.


# (B, D, L[, N]) rows of --variants (N 16 unless given).
VARIANT_SHAPES = [(4, 2048, 2048), (4, 2048, 8192), (8, 1536, 2048), (1, 4096, 8192)]


def variants(names=None, shapes=None, kernels=False):
    """kernels: also our kernel times per pass (kernel_ms) for each variant and shape."""
    import mamba_pkg.ops.selective_scan as ss

    fast_math = ss.ptx_math
    saved = {attr: getattr(ss, attr) for attr, _ in FLAGS.values()}
    shapes = [(*row, 16)[:4] for row in shapes or VARIANT_SHAPES]
    lines, reference = [], None
    for batch, dim, seqlen, dstate in shapes:
        for pass_ in ("fwd", "fwdbwd"):
            ms = try_provider("mamba_ssm", lambda: bench_case("mamba_ssm", pass_, batch, dim, seqlen, dstate))
            lines.append(f"mamba_ssm {pass_} B={batch} D={dim} L={seqlen} N={dstate}: ms={ms}")
            print(lines[-1], flush=True)
    for name, spec in VARIANTS.items():
        if names and name not in names and name != "default":
            continue
        overrides = {(16, k): v for k, v in spec.items() if k in ("fwd", "ckpt", "bwd")}
        undo = _hook_block_sizes(overrides)
        ss.ptx_math = fast_math if spec.get("fast_math", True) else (lambda kernel: False)
        for key, (attr, _) in FLAGS.items():
            setattr(ss, attr, spec.get(key, saved[attr]))
        try:
            # Full and partial tiles; at the first row's B and D (whose launch shapes the variants may change).
            got = _outputs_and_grads(16) + _outputs_and_grads(16, seqlen=1000) \
                + _outputs_and_grads(16, batch=shapes[0][0], dim=shapes[0][1])
            if reference is None:
                reference = got
            worst = max(((g.double() - r.double()).norm() / r.double().norm()).item()
                        for g, r in zip(got, reference))
            passes = {"fwd", "fwdbwd"} if name == "default" or "fast_math" in spec else set()
            passes |= {"fwd"} if {"fwd"} & set(spec) else set()
            passes |= {"fwdbwd"} if {"ckpt", "bwd", "deterministic"} & set(spec) else set()
            for key in spec:
                passes |= FLAGS[key][1] if key in FLAGS else set()
            det = spec.get("deterministic", False)
            for batch, dim, seqlen, dstate in shapes:
                for pass_ in sorted(passes) if worst < 1e-2 else ():
                    ms = try_provider("ours", lambda: bench_case("ours", pass_, batch, dim, seqlen, dstate, det))
                    lines.append(f"variant {name!r} {pass_} B={batch} D={dim} L={seqlen} N={dstate}: ms={ms}")
                    print(lines[-1], flush=True)
                if kernels and worst < 1e-2:
                    ms = try_provider("ours", lambda: kernel_ms(batch, dim, seqlen, dstate, deterministic=det))
                    lines.append(f"variant {name!r} kernels B={batch} D={dim} L={seqlen} N={dstate}: {ms}")
                    print(lines[-1], flush=True)
            lines.append(f"variant {name!r}: max_rel_err_vs_default={worst:.1e}")
            print(lines[-1], flush=True)
        finally:
            undo()
            ss.ptx_math = fast_math
            for attr, value in saved.items():
                setattr(ss, attr, value)
    with open(os.path.join(os.environ.get("OUT") or ".", "bench_selective_scan_variants.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --waves: the default N = 16 shapes against low-register ones (12 instead of 8 one-warp programs per
# SM: one wave for the 1536 programs of B=8 D=1536, mamba-130m's training shape, issue #8), at that
# shape, the B=4 D=2048 and mamba-1.4b's B=4 D=4096. Not kept: slower at every shape (H100,
# session 6 round 2, results/bench_selective_scan_waves.txt: B=8 D=1536 L=2048 fwd+bwd 1.450 default,
# 1.658 low-register, 1.608 low-register backward only; the 4-step backward is 40% slower per step).
WAVE_SHAPES = [(8, 1536, 2048), (4, 2048, 2048), (4, 4096, 2048), (8, 1536, 8192), (4, 2048, 8192)]
# Session 7: the two-channels-per-thread forward (half the programs: B=8 D=1536 in one wave at 5.8
# per SM; 584 instead of 614 loop instructions per 64 elements, offline SASS).
WAVE_VARIANTS = {
    "default": {"fwd": (8, 4, 4, 16, 1), "ckpt": (8, 4, 4, 16, 1), "bwd": (8, 4, 4, 8, 1)},
    "low_reg": {"fwd": (8, 4, 4, 8, 1), "ckpt": (8, 4, 4, 8, 1), "bwd": (8, 4, 4, 4, 1, 168)},
    # Only the backward low-register (the checkpointing forward keeps 16-step tiles, 246 registers).
    "low_reg_bwd": {"fwd": (8, 4, 4, 16, 1), "ckpt": (8, 4, 4, 16, 1), "bwd": (8, 4, 4, 4, 1, 168)},
    # Not yet measured: the default tile lengths capped at 168 registers (12 programs per SM), which
    # spill (offline sm_90 SASS, Triton 3.6: fwd 216 B, ckpt fwd 224 B, bwd 312 B of stack).
    "capped": {"fwd": (8, 4, 4, 16, 1, 168), "ckpt": (8, 4, 4, 16, 1, 168), "bwd": (8, 4, 4, 8, 1, 168)},
    "capped_bwd": {"fwd": (8, 4, 4, 16, 1), "ckpt": (8, 4, 4, 16, 1), "bwd": (8, 4, 4, 8, 1, 168)},
    "two_channel_fwd": {"fwd": (16, 4, 4, 8, 1), "ckpt": (16, 4, 4, 8, 1), "bwd": (8, 4, 4, 8, 1)},
}


def kernel_ms(batch, dim, seqlen, dstate=16, steps=5, deterministic=False):
    """ms per call of our kernels (torch.profiler): the forward without gradients, then the
    checkpointing forward, the backward and everything else on the GPU ("other": fills, sums
    of partials, casts) of a fwd+bwd."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return kernel_ms(batch, dim, seqlen, dstate, steps)
        finally:
            torch.use_deterministic_algorithms(False)
    fn = provider_fn("ours")
    result = {"other": 0.0}
    for pass_ in ("fwd", "fwdbwd"):
        args = make_inputs(batch, dim, seqlen, dstate, requires_grad=pass_ == "fwdbwd")
        grad = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16)

        def step():
            if pass_ == "fwd":
                with torch.no_grad():
                    fn(*args)
            else:
                for t in args:
                    t.grad = None  # else "other" holds autograd's accumulation into .grad
                fn(*args).backward(grad)

        for e in cuda_profile(step, steps).key_averages():
            total = getattr(e, "self_device_time_total", 0) / 1e3 / steps
            for kernel, name in (("_fwd_kernel", "fwd" if pass_ == "fwd" else "ckpt_fwd"), ("_bwd_kernel", "bwd")):
                if e.key.startswith("_selective_scan") and e.key.endswith(kernel):
                    result[name] = round(total, 4)
                    break
            else:
                if pass_ == "fwdbwd" and total > 0:
                    result["other"] = round(result["other"] + total, 4)
    return result


def waves(names=None, shapes=None):
    """names: WAVE_VARIANTS to time (default: all); shapes: (B, D, L) rows (default: WAVE_SHAPES)."""
    lines, rows = [], []
    reference = _outputs_and_grads(16) + _outputs_and_grads(16, seqlen=1000)

    def log(text):
        lines.append(text)
        print(text, flush=True)

    for batch, dim, seqlen in shapes or WAVE_SHAPES:
        log(f"B={batch} D={dim} L={seqlen}")
        for pass_ in ("fwd", "fwdbwd"):
            ms = try_provider("mamba_ssm", lambda: bench_case("mamba_ssm", pass_, batch, dim, seqlen, 16))
            rows.append({"case": f"{pass_} B={batch} D={dim} L={seqlen} N=16", "provider": "mamba_ssm", "ms": ms})
            log(f"  mamba_ssm {pass_}: {ms}")
        for name, spec in WAVE_VARIANTS.items():
            if names and name not in names:
                continue
            undo = _hook_block_sizes({(16, k): v for k, v in spec.items()})
            try:
                got = _outputs_and_grads(16) + _outputs_and_grads(16, seqlen=1000)
                worst = max(((g.double() - r.double()).norm() / r.double().norm()).item()
                            for g, r in zip(got, reference))
                if worst > 1e-2:
                    log(f"  {name}: max_rel_err {worst:.1e} vs the launch's shapes: not timed")
                    continue
                for pass_ in ("fwd", "fwdbwd"):
                    ms = try_provider("ours", lambda: bench_case("ours", pass_, batch, dim, seqlen, 16))
                    rows.append({"case": f"{pass_} B={batch} D={dim} L={seqlen} N=16", "provider": f"ours {name}",
                                 "ms": ms})
                    log(f"  ours {name} {pass_}: {ms}")
                log(f"  ours {name} kernels ms: {kernel_ms(batch, dim, seqlen)} (max_rel_err {worst:.1e})")
            finally:
                undo()
        with open(os.path.join(os.environ.get("OUT") or ".", "bench_selective_scan_waves.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(os.environ.get("OUT") or ".", "bench_selective_scan_waves.json"), "w") as f:
            json.dump(rows, f)


def profile(seqlen=2048):
    """Kernel-level breakdown of our fwd+bwd at B=4, D=2048, N=16 (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn = provider_fn("ours")
    args = make_inputs(4, 2048, seqlen, 16, requires_grad=True)
    grad = torch.randn(4, 2048, seqlen, device="cuda", dtype=torch.bfloat16)
    def step():
        for t in args:
            t.grad = None
        fn(*args).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12)
    print(table)
    with open(os.path.join(os.environ.get("OUT") or ".", "bench_selective_scan_profile.txt"), "w") as f:
        f.write(f"fwd+bwd x5, B=4 D=2048 L={seqlen} N=16\n{table}\n")


def main(argv=None):
    global REP_MS
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--main", action="store_true",
                        help="only B=4 D=2048 N=16 L=512/2048/8192, plus our fwd+bwd in deterministic mode; "
                             "results to bench_selective_scan_main")
    parser.add_argument("--sweep", type=str, default="", help="state sizes to sweep, e.g. 16,4,64")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", type=str, default=None,
                        help="time VARIANTS (comma-separated names, or 'all') and exit")
    parser.add_argument("--kernel-ms", action="store_true", help="--variants: also our kernel times per variant")
    parser.add_argument("--waves", action="store_true",
                        help="default vs low-register N=16 shapes at WAVE_SHAPES (kernel times too) and exit")
    parser.add_argument("--wave-variants", type=str, default=None, help="comma-separated WAVE_VARIANTS names")
    parser.add_argument("--wave-shapes", type=str, default=None,
                        help="B,D,L rows separated by ';' for --waves and --variants (default WAVE_SHAPES, "
                             "VARIANT_SHAPES; --variants also B,D,L,N)")
    parser.add_argument("--skip-anchor", action="store_true", help="time ours only")
    parser.add_argument("--passes", type=str, default="fwd,fwdbwd",
                        help="which passes to time; other than both, results go to bench_selective_scan_<passes>")
    parser.add_argument("--rep-ms", type=int, default=REP_MS, help="timed repetitions per case, in ms")
    parser.add_argument("--cases", type=str, default=None,
                        help="B,D,L,N rows separated by ';' instead of the issue's matrix")
    parser.add_argument("--name", type=str, default=None, help="results file name (default from the options)")
    args = parser.parse_args(argv)
    REP_MS = args.rep_ms
    passes = tuple(args.passes.split(","))
    if args.waves:
        shapes = [tuple(int(x) for x in row.split(",")) for row in args.wave_shapes.split(";")] \
            if args.wave_shapes else None
        waves(args.wave_variants.split(",") if args.wave_variants else None, shapes)
        return 0
    if args.variants:
        shapes = [tuple(int(x) for x in row.split(",")) for row in args.wave_shapes.split(";")] \
            if args.wave_shapes else None
        variants(None if args.variants == "all" else args.variants.split(","), shapes, args.kernel_ms)
        return 0
    if args.sweep:
        sweep(tuple(int(n) for n in args.sweep.split(",")))
    if args.profile:
        profile()
    rows = []
    rows_to_run = [tuple(int(x) for x in row.split(",")) for row in args.cases.split(";")] if args.cases \
        else cases(args.quick, args.main)
    for batch, dim, seqlen, dstate in rows_to_run:
        if args.main and "fwdbwd" in passes:
            ms = try_provider("ours", lambda: bench_case("ours", "fwdbwd", batch, dim, seqlen, dstate, True))
            rows.append({"case": f"fwdbwd B={batch} D={dim} L={seqlen} N={dstate} deterministic=1",
                         "provider": "ours", "ms": ms})
            print(rows[-1], flush=True)
        for pass_ in passes:
            case = f"{pass_} B={batch} D={dim} L={seqlen} N={dstate}"
            hbm_bytes, hbm_ms, exp_ms = limits(pass_, batch, dim, seqlen, dstate)
            for provider in ("ours",) if args.skip_anchor else ("ours", "mamba_ssm"):
                ms = try_provider(provider, lambda: bench_case(provider, pass_, batch, dim, seqlen, dstate))
                torch.cuda.empty_cache()
                row = {"case": case, "provider": provider, "ms": ms}
                if ms:
                    row.update(gbps=round(hbm_bytes / ms / 1e6, 1), pct_hbm=round(100 * hbm_ms / ms, 1),
                               pct_exp=round(100 * exp_ms / ms, 1), pct_limit=round(100 * max(hbm_ms, exp_ms) / ms, 1))
                rows.append(row)
                print(row, flush=True)
        # The rows so far, in case a time limit cuts the run (the plot is made at the end).
        with open(os.path.join(os.environ.get("OUT") or ".", "bench_selective_scan_partial.json"), "w") as f:
            json.dump(rows, f)
    both = set(passes) == {"fwd", "fwdbwd"}
    name = "bench_selective_scan" if both else "bench_selective_scan_" + "_".join(passes)
    save_results(args.name or (name + "_main" if args.main else name), rows)


if __name__ == "__main__":
    sys.exit(main())
