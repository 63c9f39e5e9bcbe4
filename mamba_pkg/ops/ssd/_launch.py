"""Cached launches of the SSD kernels: Triton's Python per launch, paid once per signature.

``kernel[grid](*args, **kwargs)`` costs 15-40 us of host time per launch on top of the
driver call (binding and specialising every argument, the kernel-cache key with the
options' string, the autotuner's key over every argument, launch metadata): on the H100
host an eager fwd+bwd of the SSD (10 launches, 7 autotuned) spent most of its 2.7 ms of
host time there, and the eager forward was host-bound. ``launch`` goes through
``kernel[grid]`` the first time it meets a launch signature (so the autotuner still
benchmarks its configs on first use and Triton compiles what it must), keeps the compiled
kernel and the autotuner's config, and later calls the compiled kernel directly.

The signature is everything that selects a config or a specialisation: the current
device, each tensor's dtype and whether its address is a multiple of 16, every other
argument's value (ints exactly: Triton specialises on 1, divisibility by 16 and the
integer width), the constexpr keywords. Launches that something else watches or changes
(Triton launch hooks, pre-run hooks, config pre-hooks, the interpreter) always take the
normal path.
"""

from __future__ import annotations

import operator

import torch

from mamba_pkg.ops.backend import triton_interpret

try:
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
except ImportError:  # no Triton, or one without these internals: always the normal path
    knobs = CompiledKernel = Autotuner = driver = None

# bench_ssd's compile-only mode turns this off (its launches compile and must not run).
enabled = True
# Entries per kernel before its cache is dropped (a new length or batch is a new signature).
_MAX_ENTRIES = 256
_caches: dict = {}


_dtype = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr


def _signature(n_tensors, args, kwargs, device):
    """The launch signature; args[:n_tensors] are the kernel's tensors (the pointer parameters
    come first in every SSD kernel)."""
    tensors = args[:n_tensors]
    return (device, tuple(map(_dtype, tensors)), tuple([p % 16 == 0 for p in map(_data_ptr, tensors)]),
            args[n_tensors:], tuple(kwargs.items()))


def _leading_tensors(args) -> int:
    n = 0
    while n < len(args) and isinstance(args[n], torch.Tensor):
        n += 1
    return n


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.5+ keeps them in chains, empty unless a profiler
    such as proton adds one; without hooks the launch metadata is not needed)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a @triton.jit or @triton.autotune kernel; args are
    the leading parameters, kwargs the constexprs (and launch options such as num_warps)."""
    if CompiledKernel is None or not enabled or triton_interpret() or _hooked():
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    cache = _caches.get(kernel)
    # A new list of autotuning configs (the GPU tests pin them) starts a new cache.
    configs = getattr(kernel, "configs", None)
    if cache is None or cache["configs"] is not configs:
        cache = _caches[kernel] = {"n_tensors": _leading_tensors(args), "configs": configs}
    key = _signature(cache["n_tensors"], args, kwargs, device)
    entry = cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        entry = _entry(kernel, compiled, len(args), kwargs)
        if entry is not None:
            if len(cache) > _MAX_ENTRIES:
                cache = _caches[kernel] = {"n_tensors": cache["n_tensors"], "configs": configs}
            cache[key] = entry
        return
    compiled, meta, tail = entry
    if callable(grid):
        grid = grid(meta)
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


def _entry(kernel, compiled, n_args, kwargs):
    """(compiled kernel, the constexprs a grid function sees, the parameters after args) for
    the cache, or None where the direct launch would not be the same launch."""
    if not isinstance(compiled, CompiledKernel):
        return None  # the interpreter, or a launch that only compiled (intercepted)
    config = {}
    fn = kernel
    if isinstance(kernel, Autotuner):
        best = kernel.best_config
        if best is None or best.pre_hook is not None:
            return None
        config = best.kwargs
        fn = kernel.fn
    if getattr(fn, "pre_run_hooks", None) or not hasattr(fn, "arg_names"):
        return None
    meta = {**kwargs, **config}
    tail = fn.arg_names[n_args:]
    if any(name not in meta for name in tail):
        return None  # a parameter left to its default
    return compiled, meta, tuple(meta[name] for name in tail)
