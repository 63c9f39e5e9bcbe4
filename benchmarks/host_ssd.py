"""Host time per call of our SSD op on a CPU-only machine, Triton's real launch Python included
(session 5 round 2; the script behind the CPU numbers in notes_ssd.md).

Triton 3.6 (the H100's version) from an unpacked wheel at T36 (default /tmp/t36), TRITON_INTERPRET
unset: kernels compile for sm_90 against a stand-in driver, autotuners take their first config
without benchmarking, and the compiled kernels' launcher records instead of launching. Everything
above the driver call runs as on the GPU host (which was ~4-5x slower per Python call here).

    PYTHONPATH=. python benchmarks/host_ssd.py [--uncached] [--verify]

--uncached: Triton's own launch path every call (ops/_launch.py off). --verify: check that cached
launches pass the compiled kernels the same grid, stream and parameters as Triton's path.
"""
import os
import sys
import time

sys.path.insert(0, os.environ.get("T36", "/tmp/t36"))
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/ssd_host_cpu_cache")

import torch  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import mamba_pkg.ops.backend as backend  # noqa: E402
from benchmarks.sass_stats import _FakeDriver  # noqa: E402

LOG = []


def _init_handles(self):
    if self._run is None:
        name = self.hash
        # Records only for --verify: kept launches keep their tensors alive (no allocator reuse).
        self._run = (lambda *a: LOG.append((name,) + a)) if "--verify" in sys.argv else (lambda *a: None)
        self.function = 0


driver.set_active(_FakeDriver())
CompiledKernel._init_handles = _init_handles
Autotuner._bench = lambda self, *a, config, **k: [float(self.configs.index(config))]
backend.triton_interpret = lambda: True  # backend="triton" accepts CPU tensors
from mamba_pkg.ops import _launch  # noqa: E402
from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined as fn  # noqa: E402

_launch.triton_interpret = lambda: False
_launch.enabled = "--uncached" not in sys.argv
torch.set_num_threads(1)


def inputs(requires_grad, batch=2, L=512, H=4, P=64, N=128):
    torch.manual_seed(0)
    bf = torch.bfloat16
    ts = [torch.randn(batch, L, H, P, dtype=bf), torch.randn(batch, L, H).to(bf), -torch.rand(H),
          torch.randn(batch, L, 1, N, dtype=bf), torch.randn(batch, L, 1, N, dtype=bf), torch.rand(H), torch.rand(H)]
    return [t.requires_grad_(requires_grad) for t in ts]


fwd_in, grad_in = inputs(False), inputs(True)
dout = torch.randn_like(fwd_in[0])


def call(ts):
    x, dt, A, B, C, D, dt_bias = ts
    return fn(x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True, backend="triton")


def fwd():
    with torch.no_grad():
        call(fwd_in)


def fwdbwd():
    torch.autograd.grad(call(grad_in), grad_in, dout)


def per_call_us(f, reps=100, rounds=5):
    for _ in range(10):
        f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(reps):
            f()
        best = min(best, (time.process_time() - t0) / reps * 1e6)
    return best


def launches(f, enabled, n=3):
    """The recorded launches of n calls, pointers by alignment, without the launch metadata and
    hooks (Triton's path passes empty hook chains, the cached one None)."""
    _launch.enabled = enabled
    LOG.clear()
    for _ in range(n):
        f()
    return [tuple(_canonical(a) for a in rec[:7] + rec[10:]) for rec in LOG]


def _canonical(a):
    """A pointer argument as its 16-byte alignment: Triton's path passes the tensor, the cached path
    its address (an int far above any scalar argument of these kernels)."""
    if isinstance(a, torch.Tensor):  # an empty tensor's address is 0 in both paths
        return ("pointer", a.data_ptr() % 16) if a.data_ptr() else 0
    if isinstance(a, int) and not isinstance(a, bool) and a > 2**40:
        return ("pointer", a % 16)
    return a


if "--verify" in sys.argv:
    for name, f in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        slow = launches(f, False)
        launches(f, True)
        same = slow == launches(f, True)
        print(f"{name}: {len(slow)} launches, cached launches identical: {same}")
else:
    print(f"cached launches: {_launch.enabled}")
    print(f"fwd (no_grad): {per_call_us(fwd):7.1f} us/call")
    print(f"fwd+bwd:       {per_call_us(fwdbwd):7.1f} us/call")
