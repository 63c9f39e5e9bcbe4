"""Host (CPU) time per call of selective_scan_fn: what a call costs the host before any
kernel runs.

    PYTHONPATH=. python benchmarks/host_selective_scan.py [--profile]          # CPU, launches stubbed
    PYTHONPATH=. python benchmarks/host_selective_scan.py --cuda [--profile]   # GPU host, real launches
    add --inner to time mamba_inner_fn (a Mamba-1 block's inner path) forward + backward instead

CPU mode: tiny shapes (the host path does not depend on the sizes except through torch ops
on tiny tensors), this process's CPU time, best of 5 rounds (the machine may be shared).
CUDA mode: B=4, D=2048, L=64 (the GPU finishes each call before the host issues the next,
so the wall time of many un-synchronised calls is the host time per call).
B/C input-dependent, with D, z, delta_bias and softplus (the bench setup).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

if "--cuda" not in sys.argv:
    # The stubbed kernels still go through backend selection, which wants CUDA tensors or
    # the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import mamba_pkg.ops.selective_scan as ss  # noqa: E402
from mamba_pkg.ops.mamba_inner import mamba_inner_fn  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _inputs(batch=2, dim=16, seqlen=16, dstate=16, requires_grad=False, device="cpu"):
    torch.manual_seed(0)
    args = [torch.randn(batch, dim, seqlen), torch.randn(batch, dim, seqlen), -torch.rand(dim, dstate),
            torch.randn(batch, dstate, seqlen), torch.randn(batch, dstate, seqlen), torch.randn(dim),
            torch.randn(batch, dim, seqlen), torch.rand(dim)]
    args = [(a.to(torch.bfloat16) if a.dim() == 3 else a).to(device) for a in args]
    for a in args:
        a.requires_grad_(requires_grad)
    return args


def _inner_inputs(batch=2, dim=16, seqlen=16, dstate=16, rank=4, d_model=32, device="cpu"):
    """mamba_inner_fn's arguments (mamba-130m's sizes on CUDA: D=1536, R=48, d_model=768), bf16
    activations and weights, fp32 A, D, delta_bias; all requiring gradients."""
    torch.manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    args = dict(xz=torch.randn(batch, 2 * dim, seqlen, **bf16), conv1d_weight=torch.randn(dim, 4, **bf16),
                conv1d_bias=torch.randn(dim, **bf16), x_proj_weight=torch.randn(rank + 2 * dstate, dim, **bf16) * 0.05,
                delta_proj_weight=torch.randn(dim, rank, **bf16) * 0.1, out_proj_weight=torch.randn(d_model, dim, **bf16) * 0.03,
                out_proj_bias=None, A=-torch.rand(dim, dstate, device=device), D=torch.randn(dim, device=device),
                delta_bias=torch.rand(dim, device=device))
    for t in args.values():
        if t is not None:
            t.requires_grad_(True)
    return args


def _stub_kernels(module):
    for name in dir(module):
        if name.startswith("_") and name.endswith("_kernel"):
            setattr(module, name, _NoLaunch())


def inner_main(cuda: bool, profile: bool):
    """Host time of mamba_inner_fn forward + backward (ours, and mamba_ssm's on CUDA)."""
    import mamba_pkg.ops.causal_conv1d as conv

    if not cuda:
        torch.set_num_threads(1)
        _stub_kernels(ss)
        _stub_kernels(conv)
    shape = dict(batch=4, dim=1536, seqlen=64, rank=48, d_model=768, device="cuda") if cuda else {}
    args = _inner_inputs(**shape)
    dout = torch.randn(args["xz"].shape[0], args["xz"].shape[2], args["out_proj_weight"].shape[0],
                       device=args["xz"].device, dtype=torch.bfloat16)

    def step(fn, **kw):
        def run():
            for t in args.values():
                if t is not None:
                    t.grad = None
            fn(**args, delta_softplus=True, **kw).backward(dout)
        return run

    ours = step(mamba_inner_fn, backend="triton")
    print(f"mamba_inner_fn fwd+bwd ours:      {per_call_us(ours, cuda):7.1f} us/call")
    if cuda:
        try:
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn as anchor
        except ImportError:
            anchor = None
        if anchor is not None:
            print(f"mamba_inner_fn fwd+bwd mamba_ssm: {per_call_us(step(anchor), cuda):7.1f} us/call")
    if profile:
        _profile(ours, 100)


def _profile(fn, reps: int):
    """cProfile of reps calls of fn, the 30 functions with the most own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def per_call_us(fn, cuda: bool, reps=200, rounds=5):
    """Best of `rounds` averages: on CUDA the wall time of un-synchronised calls, on CPU this
    process's CPU time (the machine may be shared)."""
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = clock()
        for _ in range(reps):
            fn()
        best = min(best, (clock() - t0) / reps * 1e6)
    sync()
    return best


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true", help="cProfile of the fwd+bwd call")
    parser.add_argument("--cuda", action="store_true", help="real launches on the GPU")
    parser.add_argument("--inner", action="store_true", help="mamba_inner_fn instead of selective_scan_fn")
    args = parser.parse_args(argv)
    if args.inner:
        return inner_main(args.cuda, args.profile)
    if args.cuda:
        shape = dict(batch=4, dim=2048, seqlen=64, device="cuda")
    else:
        torch.set_num_threads(1)
        _stub_kernels(ss)
        shape = {}
    def timer(fn):
        return per_call_us(fn, args.cuda)

    fwd_args = _inputs(**shape)
    grad_args = _inputs(requires_grad=True, **shape)
    dout = torch.randn_like(fwd_args[0])

    def fwd():
        with torch.no_grad():
            ss.selective_scan_fn(*fwd_args, delta_softplus=True, backend="triton")

    def fwdbwd():
        for t in grad_args:
            t.grad = None
        ss.selective_scan_fn(*grad_args, delta_softplus=True, backend="triton").backward(dout)

    def fwdbwd_plain_autograd():
        """The harness alone: the same tensors through an identity-like op."""
        for t in grad_args:
            t.grad = None
        (grad_args[0] * 1.0).backward(dout)

    print(f"fwd (no_grad):   {timer(fwd):7.1f} us/call")
    print(f"fwd+bwd:         {timer(fwdbwd):7.1f} us/call")
    print(f"harness only:    {timer(fwdbwd_plain_autograd):7.1f} us/call")
    if args.cuda:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as anchor
        except ImportError:
            anchor = None
        if anchor is not None:
            def anchor_fwd():
                with torch.no_grad():
                    anchor(*fwd_args, delta_softplus=True)

            def anchor_fwdbwd():
                for t in grad_args:
                    t.grad = None
                anchor(*grad_args, delta_softplus=True).backward(dout)

            print(f"mamba_ssm fwd:   {timer(anchor_fwd):7.1f} us/call")
            print(f"mamba_ssm f+b:   {timer(anchor_fwdbwd):7.1f} us/call")
    if args.profile:
        _profile(fwdbwd, 200)


if __name__ == "__main__":
    main()
