"""Launch-config sweep of the decode-step kernels on the GPU, in one process (H100, bf16):

- ssm_decode_step, Mamba-1 (mamba-130m: D=1536, R=48; mamba-1.4b: D=4096, R=128; N=16; bf16
  state): batch 1 with the split-K x_proj partials of conv_xproj_step (S = D/128), batch 64 with
  dt (B, R) a view of the x_proj output. Candidates (BLOCK_B, BLOCK_P, USE_DOT, warps), and at
  batch 64 also "dt by cuBLAS": F.linear for dt_proj, then the kernel without the projection.
  mamba_ssm's chain (dt_proj GEMM + exp + selective_state_update) as the reference at batch 64.
- decode_linear at batch 1 (BLOCK_N, TILE_ELEMS, warps) and at batch 64 (the tl.dot kernel:
  BLOCK_N, BLOCK_K, stages, warps) against F.linear (cuBLAS), in_proj / out_proj shapes.
- add_rms_norm_linear (batch 1) against rms_norm_fn + decode_linear.

Every time is a CUDA-graph replay (median, triton.testing.do_bench_cudagraph). Prints one line
per candidate and saves rows via benchmarks.common.save_results ("sweep_decode").

    PYTHONPATH=. python3 benchmarks/sweep_decode.py [--budget-s 120]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import save_results, try_provider
from mamba_pkg.ops import decode_linear as dl
from mamba_pkg.ops import ssm_decode_step as sds

BF = torch.bfloat16
MAMBA1 = {"mamba-130m": (1536, 48), "mamba-1.4b": (4096, 128)}  # d_inner, dt rank
N_STATE = 16
LINEAR = {  # (out_features, in_features)
    "mamba-1.4b in_proj": (8192, 2048), "mamba-1.4b out_proj": (2048, 4096),
    "mamba-130m in_proj": (3072, 768), "mamba-130m out_proj": (768, 1536),
}
SSM_B1 = [(1, p, False, w) for p in (16, 32, 64) for w in (2, 4)]
SSM_B64 = [(16, 16, True, 4), (16, 32, True, 4), (32, 16, True, 4), (64, 16, True, 8),
           (2, 16, False, 4), (4, 16, False, 4), (4, 8, False, 4)]
SMALL_LINEAR = [(4, 8192, 8), (2, 4096, 4), (4, 8192, 4), (8, 8192, 8), (8, 16384, 8), (16, 16384, 8)]
DOT_LINEAR = [(64, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 4), (64, 256, 3, 8)]


def graph_ms(fn, rep=20):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def ssm_inputs(dim, rank, batch, split):
    torch.manual_seed(0)
    dev = "cuda"
    xz = torch.randn(batch, 2 * dim, device=dev, dtype=BF)
    if split:
        parts = torch.randn(dim // 128, batch, rank + 2 * N_STATE, device=dev) / (dim // 128)
    else:
        parts = torch.randn(batch, rank + 2 * N_STATE, device=dev, dtype=BF)
    low = parts[..., :rank]
    kw = dict(state=torch.randn(batch, dim, N_STATE, device=dev).to(BF), x=xz[:, :dim], dt=low,
              A_log=torch.randn(dim, N_STATE, device=dev), B=parts[..., rank:rank + N_STATE],
              C=parts[..., rank + N_STATE:], D=torch.randn(dim, device=dev, dtype=BF), z=xz[:, dim:],
              dt_bias=torch.randn(dim, device=dev, dtype=BF),
              dt_proj_weight=torch.randn(dim, rank, device=dev, dtype=BF) / rank**0.5)
    return kw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop starting new candidates after this")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    original = sds._launch_config

    def timed(case, label, fn):
        if time.time() - t0 > args.budget_s:
            return None
        ms = try_provider(label, lambda: graph_ms(fn))
        if ms is not None:
            rows.append({"case": case, "provider": label, "ms": round(ms, 5)})
            print(f"{case:42s} {label:34s} {ms * 1e3:8.2f} us", flush=True)
        return ms

    def with_config(cfg, fn):
        block_b, block_p, dot, warps = cfg

        def config(batch, hdim, n_state, rank, tie):
            block_r = max(16, triton_next_pow2(rank)) if rank else 1
            return block_b, block_p, 16, block_r, dot, warps

        def run():
            sds._launch_config = config
            try:
                return fn()
            finally:
                sds._launch_config = original
        return run

    # ---- ssm_decode_step, Mamba-1
    for name, (dim, rank) in MAMBA1.items():
        for batch in (1, 64):
            kw = ssm_inputs(dim, rank, batch, split=batch == 1)
            case = f"ssm {name} b{batch}"
            call = (lambda kw=kw, split=batch == 1: sds.ssm_decode_step(**kw, split_sum=split))
            timed(case, "current", call)
            for cfg in (SSM_B1 if batch == 1 else SSM_B64):
                timed(case, f"bb={cfg[0]} bp={cfg[1]} dot={int(cfg[2])} w={cfg[3]}", with_config(cfg, call))
            if batch == 64:
                full = dict(kw, dt_proj_weight=None)

                def cublas_dt(full=full, kw=kw):
                    full["dt"] = F.linear(kw["dt"], kw["dt_proj_weight"])
                    return sds.ssm_decode_step(**full)
                for bp in (64, 128):
                    timed(case, f"cublas dt + bp={bp}", with_config((1, bp, False, 4), cublas_dt))
                timed(case, "cublas dt alone", lambda kw=kw: F.linear(kw["dt"], kw["dt_proj_weight"]))
                try:
                    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

                    def chain(kw=kw):
                        A = -torch.exp(kw["A_log"])
                        return selective_state_update(kw["state"], kw["x"], F.linear(kw["dt"], kw["dt_proj_weight"]), A,
                                                      kw["B"], kw["C"], kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                                                      dt_softplus=True)
                    timed(case, "mamba_ssm chain", chain)
                except Exception as exc:  # the anchor is optional
                    print("mamba_ssm missing:", exc)

    # ---- decode_linear batch 1 and 64, add_rms_norm_linear
    saved = (dl.BLOCK_N, dl.TILE_ELEMS, dl.NUM_WARPS, dl.DOT_CONFIG)
    for name, (n_out, n_in) in LINEAR.items():
        w = torch.randn(n_out, n_in, device="cuda", dtype=BF) / n_in**0.5
        for batch in (1, 64):
            x = torch.randn(batch, n_in, device="cuda", dtype=BF)
            case = f"linear {name} b{batch}"
            timed(case, "cublas", lambda x=x, w=w: F.linear(x, w))
            for cfg in (SMALL_LINEAR if batch == 1 else DOT_LINEAR):
                def run(cfg=cfg, x=x, w=w, batch=batch):
                    if batch == 1:
                        dl.BLOCK_N, dl.TILE_ELEMS, dl.NUM_WARPS = cfg
                    else:
                        dl.DOT_CONFIG = cfg
                    try:
                        return dl.decode_linear(x, w)
                    finally:
                        dl.BLOCK_N, dl.TILE_ELEMS, dl.NUM_WARPS, dl.DOT_CONFIG = saved
                timed(case, "cfg=" + ",".join(map(str, cfg)), run)
        if name.endswith("in_proj"):
            from mamba_pkg.ops.norm import rms_norm_fn

            h = torch.randn(1, n_in, device="cuda", dtype=BF)
            res = torch.randn(1, n_in, device="cuda")
            nw = torch.randn(n_in, device="cuda", dtype=BF)
            case = f"add_norm+linear {name} b1"
            timed(case, "fused", lambda: dl.add_rms_norm_linear(h, res, nw, w, None, 1e-5, True))
            timed(case, "norm then decode_linear", lambda: dl.decode_linear(
                rms_norm_fn(h, nw, None, res, 1e-5, prenorm=True, residual_in_fp32=True)[0], w))
    print(f"sweep took {time.time() - t0:.0f} s")
    save_results("sweep_decode", rows, plot_key="case")


def triton_next_pow2(n):
    import triton

    return triton.next_power_of_2(n)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
