"""Host (CPU) time per call of selective_scan_fn / mamba_inner_fn with the Triton launches
stubbed out: what a call costs the host before any kernel runs. Runs on CPU.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/host_selective_scan.py [--profile]

Small shapes (the host path does not depend on the sizes except through torch ops on
tiny tensors), B/C input-dependent, with D, z, delta_bias and softplus (the bench setup).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import mamba_pkg.ops.selective_scan as ss  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _inputs(batch=2, dim=16, seqlen=16, dstate=16, requires_grad=False):
    torch.manual_seed(0)
    args = [torch.randn(batch, dim, seqlen), torch.randn(batch, dim, seqlen), -torch.rand(dim, dstate),
            torch.randn(batch, dstate, seqlen), torch.randn(batch, dstate, seqlen), torch.randn(dim),
            torch.randn(batch, dim, seqlen), torch.rand(dim)]
    args = [a.to(torch.bfloat16) if a.dim() == 3 else a for a in args]
    for a in args:
        a.requires_grad_(requires_grad)
    return args


def per_call_us(fn, reps=200, rounds=5):
    """Best of `rounds` averages of this process's CPU time (the machine may be shared)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - t0) / reps * 1e6)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true", help="cProfile of the fwd+bwd call")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ss._selective_scan_fwd_kernel = _NoLaunch()
    ss._selective_scan_bwd_kernel = _NoLaunch()
    fwd_args = _inputs()
    grad_args = _inputs(requires_grad=True)
    dout = torch.randn(fwd_args[0].shape).to(torch.bfloat16)

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

    print(f"fwd (no_grad):   {per_call_us(fwd):7.1f} us/call")
    print(f"fwd+bwd:         {per_call_us(fwdbwd):7.1f} us/call")
    print(f"harness only:    {per_call_us(fwdbwd_plain_autograd):7.1f} us/call")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fwdbwd()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
