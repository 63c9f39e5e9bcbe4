"""Compile the Triton kernels an op launches for sm_90 (H100) on a CPU-only machine, and report
registers, spills and SASS instruction counts per kernel. No GPU needed: the launches are
intercepted and compiled (JITFunction.warmup) against a fake CUDA driver instead of run.

Usage (from the repo root; TRITON_INTERPRET must NOT be set):
    python benchmarks/sass_stats.py 'from mamba_pkg.ops.causal_conv1d import causal_conv1d_fn as f; import torch; \
        x = torch.randn(4, 256, 512, dtype=torch.bfloat16); w = torch.randn(256, 4, dtype=torch.bfloat16); \
        f(x, w, None, activation="silu", backend="triton")'
    add --sass DIR to also write each kernel's SASS to DIR/<kernel>.sass (diff two versions of a
    refactor: identical SASS = identical kernel).
Inside your own script: `from sass_stats import intercept; with intercept() as found: <call ops on CPU
tensors with backend="triton">`; `found` is a list of dicts (name, regs, spills, n_instr, sass, ...).
Autotuned kernels are compiled with their first config only. The inputs are CPU tensors; shapes only
matter through the launch parameters (grid is not used).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("sass_stats compiles real kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _FakeDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


def _stats(kernel):
    """Registers, stack (spill) and shared bytes, SASS opcode counts and the SASS text of a compiled kernel."""
    cubin = kernel.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    shared = re.search(r"SHARED:(\d+)", res)
    instrs = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s", ln)]
    ops = {}
    for ln in instrs:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if m:
            op = m.group(1).split(".")[0]
            ops[op] = ops.get(op, 0) + 1
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "shared": int(shared.group(1)) if shared else None, "n_instr": len(instrs), "ops": ops,
            "spills": "STL" in ops or "LDL" in ops, "sass": sass}


@contextlib.contextmanager
def intercept():
    found = []
    orig_getitem, orig_at = JITFunction.__getitem__, Autotuner.run
    driver.set_active(_FakeDriver())

    def jit_getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.warmup(*args, grid=grid, **kwargs)
            found.append({"name": self.__name__, **_stats(kernel)})
        return launch

    def autotuned_run(self, *args, **kwargs):
        cfg = self.configs[0]
        kw = {**kwargs, **cfg.all_kwargs()}
        kw.pop("grid", None)
        kw.pop("warmup", None)  # Triton 3.6 passes the launch's warmup flag on to Autotuner.run
        kernel = self.fn.warmup(*args, grid=(1,), **kw)
        found.append({"name": self.fn.__name__ + " (autotune config 0)", **_stats(kernel)})

    JITFunction.__getitem__ = jit_getitem
    Autotuner.run = autotuned_run
    try:
        yield found
    finally:
        JITFunction.__getitem__, Autotuner.run = orig_getitem, orig_at
        driver._active = None


def main():
    args = sys.argv[1:]
    sass_dir = None
    if "--sass" in args:
        i = args.index("--sass")
        sass_dir = args[i + 1]
        del args[i:i + 2]
        os.makedirs(sass_dir, exist_ok=True)
    import mamba_pkg.ops.backend as backend
    backend.triton_interpret = lambda: True  # let backend="triton" accept CPU tensors
    with intercept() as found:
        exec(args[0], {})
    for k in found:
        top = ", ".join(f"{o}:{n}" for o, n in sorted(k["ops"].items(), key=lambda t: -t[1])[:8])
        print(f"{k['name']}: regs={k['regs']} stack={k['stack']} shared={k['shared']} instr={k['n_instr']} [{top}]")
        if sass_dir:
            with open(os.path.join(sass_dir, k["name"].split(" ")[0] + ".sass"), "w") as f:
                f.write(k["sass"])


if __name__ == "__main__":
    main()
