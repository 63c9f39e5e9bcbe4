"""Cached kernel launches: Triton's Python per launch, paid once per launch signature.

``kernel[grid](*args, **kwargs)`` costs 15-45 us of host time per launch on top of the driver
call with Triton 3.6 (binding and specialising every argument, the kernel-cache key with the
options' string, the autotuner's key over every argument, launch metadata, two hook chains).
On the H100 host that made the eager SSD forward and the selective scan at L=2048 host-bound.
``launch`` goes through ``kernel[grid]`` the first time it meets a signature (so the autotuner
still benchmarks its configs on first use and Triton compiles what it must), keeps the compiled
kernel and the autotuner's config, and later calls the compiled kernel's launcher directly with
the tensors' addresses (so the launcher neither calls ``data_ptr()`` nor asks the driver about
each pointer: the callers check that their tensors are on one CUDA device).

The signature is everything that selects a config or a specialisation, or more: the device;
per pointer its None-ness, dtype and whether its address is a multiple of 16; every other
argument's value (ints exactly: Triton specialises on == 1, divisibility by 16 and the integer
width); the constexpr keywords and launch options; Triton's debug and instrumentation knobs.

Only for Triton versions whose launch convention was checked on a GPU; launches that something
else watches or changes (launch hooks such as a profiler's, pre-run hooks, config pre-hooks,
the interpreter) always take Triton's own path.
"""

from __future__ import annotations

import sys
import types

import torch

try:
    import triton
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
except ImportError:  # no Triton, or one without these internals: always the normal path
    triton = knobs = CompiledKernel = Autotuner = driver = None

# Triton versions whose JITFunction.run ends in the launch repeated here (checked on an H100).
DIRECT_LAUNCH_TRITON = ("3.6.",)
# Off: every launch takes Triton's path (bench_ssd's compile-only mode and A/B runs).
enabled = True
# Entries per kernel before its cache is dropped (a new length or batch is a new signature).
_MAX_ENTRIES = 256
_caches: dict = {}


def _direct_ok() -> bool:
    return (CompiledKernel is not None and enabled and triton.__version__.startswith(DIRECT_LAUNCH_TRITON)
            and not _hooked())


def _interpreted(jit) -> bool:
    """Whether Triton's interpreter runs the kernel (decided when @triton.jit ran); cheaper than
    reading TRITON_INTERPRET from the environment on every launch (1.5 us on the H100 host)."""
    return type(jit).__name__ == "InterpretedFunction"


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.5+ keeps them in chains, empty unless a profiler
    such as proton adds one; without hooks the launch metadata is not needed)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def _n_pointers(args) -> int:
    """The pointer parameters come first in every kernel launched here: tensors, or None for an
    absent optional one."""
    n = 0
    while n < len(args) and (args[n] is None or isinstance(args[n], torch.Tensor)):
        n += 1
    return n


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for a @triton.jit or @triton.autotune kernel; args are
    the leading parameters (pointers first), kwargs the constexprs and launch options (num_warps,
    maxnreg, ...). Returns what ``kernel[grid]`` returns (the compiled kernel; None from the
    interpreter), the cached one on the direct path."""
    jit = kernel.fn if Autotuner is not None and isinstance(kernel, Autotuner) else kernel
    if not _direct_ok() or _interpreted(jit) or getattr(jit, "pre_run_hooks", None):
        return kernel[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    cache = _caches.get(kernel)
    # A new list of autotuning configs (the GPU tests pin them) starts a new cache.
    configs = getattr(kernel, "configs", None)
    if cache is None or cache["configs"] is not configs:
        cache = _caches[kernel] = {"n_pointers": _n_pointers(args), "configs": configs}
    n = cache["n_pointers"]
    addresses, pointer_key = _pointer_key(args[:n])
    key = (device, pointer_key, args[n:], tuple(kwargs.items()), knobs.runtime.debug,
           knobs.compilation.instrumentation_mode)
    entry = cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        entry = _entry(kernel, jit, compiled, len(args), kwargs)
        if entry is not None:
            if len(cache) > _MAX_ENTRIES:
                cache = _caches[kernel] = {"n_pointers": n, "configs": configs}
            cache[key] = entry
        return compiled
    return _run(entry, grid, device, addresses, args[n:])


def _pointer_key(pointers):
    """(the pointers' addresses, their part of a launch key: per pointer None, or its dtype and whether
    its address is a multiple of 16), shared by launch and Plan."""
    addresses = [None if t is None else t.data_ptr() for t in pointers]
    return addresses, tuple([None if t is None else (t.dtype, a % 16 == 0) for t, a in zip(pointers, addresses)])


def _run(entry, grid, device, addresses, scalars):
    """The direct launch of a cached entry: what JITFunction.run ends in (Triton 3.6). Returns
    the compiled kernel."""
    compiled, meta, tail = entry
    if callable(grid):
        grid = grid(meta)
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, None, None, None, *addresses, *scalars, *tail)
    return compiled


class Plan:
    """``launch(kernel, grid, *pointers, *scalars, **kwargs)`` with everything but the pointers fixed:
    a caller that caches its launch per signature of its inputs (shapes, strides, dtypes, flags)
    keeps a Plan, and a call then pays for its pointers only (their addresses, dtypes and 16-byte
    alignment, the current device), not for building and hashing the whole launch signature
    (~3 us per launch on this CPU, ~12 us on the H100 host). Same paths as ``launch``: the first
    call of a pointer signature goes through ``kernel[grid]``, and hooks, pre-run hooks, the
    interpreter, new autotuning configs and the ``enabled`` switch take Triton's own path."""

    __slots__ = ("kernel", "grid", "scalars", "kwargs", "_jit", "_configs", "_static_ok", "_entries")

    def __init__(self, kernel, grid, *scalars, **kwargs):
        self.kernel, self.grid, self.scalars, self.kwargs = kernel, grid, scalars, kwargs
        tuned = Autotuner is not None and isinstance(kernel, Autotuner)
        self._jit = kernel.fn if tuned else kernel
        # An autotuned kernel's list of configs (a new one is Triton's path: see launch); None: not tuned.
        self._configs = kernel.configs if tuned else None
        self._static_ok = (CompiledKernel is not None and triton.__version__.startswith(DIRECT_LAUNCH_TRITON)
                           and not _interpreted(self._jit))
        self._entries: dict = {}

    def __call__(self, *pointers):
        """Launch with these pointers; returns the compiled kernel (as ``launch``)."""
        kernel = self.kernel
        if (not (self._static_ok and enabled) or _hooked() or getattr(self._jit, "pre_run_hooks", None)
                or (self._configs is not None and kernel.configs is not self._configs)):
            return kernel[self.grid](*pointers, *self.scalars, **self.kwargs)
        device = driver.active.get_current_device()
        addresses, pointer_key = _pointer_key(pointers)
        key = (device, pointer_key, knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        entry = self._entries.get(key)
        if entry is None:
            compiled = kernel[self.grid](*pointers, *self.scalars, **self.kwargs)
            entry = _entry(kernel, self._jit, compiled, len(pointers) + len(self.scalars), self.kwargs)
            if entry is not None:
                self._entries[key] = entry
            return compiled
        return _run(entry, self.grid, device, addresses, self.scalars)

    def compiled(self) -> list:
        """The compiled kernels this plan launches directly (one per pointer signature met)."""
        return [entry[0] for entry in self._entries.values()]


def _entry(kernel, jit, compiled, n_args, kwargs):
    """(compiled kernel, the constexprs a grid function sees, the parameters after args) for
    the cache, or None where the direct launch would not be the same launch."""
    if not isinstance(compiled, CompiledKernel):
        return None  # the interpreter, or a launch that only compiled (intercepted)
    config = {}
    if jit is not kernel:
        best = kernel.best_config
        if best is None or best.pre_hook is not None:
            return None
        config = best.kwargs
    if not hasattr(jit, "arg_names"):
        return None
    meta = {**kwargs, **config}
    tail = jit.arg_names[n_args:]
    if any(name not in meta for name in tail):
        return None  # a parameter left to its default
    return compiled, meta, tuple(meta[name] for name in tail)


# Launch signatures (see variant_needed) that have launched a kernel's alternative variant.
_VARIANTS_SEEN: set = set()


def signature(*args, **kwargs) -> tuple:
    """A key that changes whenever Triton could compile a kernel anew for a launch of ``args``
    (pointers, scalars) and ``kwargs`` (constexprs, options): per tensor its device, dtype and
    whether its address is a multiple of 16, every other argument's value (a superset of what
    Triton specialises on)."""
    return tuple((a.device, a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                 for a in args) + tuple(kwargs.items())


def variant_needed(tag, key) -> bool:
    """Whether an eager launch with this signature (tag: which kernel and variant) must take a
    variant that CUDA-graph captures take (e.g. TMA tiles) although eager launches skip it, because
    no launch of that signature has taken it yet: a capture cannot compile or autotune (the driver
    refuses module loads while a stream captures), so the eager call that precedes a capture, its
    warm-up, compiles and tunes what the capture will launch. Marks the signature as seen."""
    entry = (tag, key)
    if entry in _VARIANTS_SEEN:
        return False
    _VARIANTS_SEEN.add(entry)
    return True


# Launch plans that depend on tuning switches: every settings_cache dict, emptied together (a switch of one
# module can enter another's plans: decode_linear.PDL decides the PDL launches of ssm_decode_step).
_SETTINGS_CACHES: list = []


class PlanCache(dict):
    """A module's launch plans (settings_cache): a dict that holds at most _MAX_ENTRIES of them (a new
    length or batch is a new key), emptied when one more would pass that."""

    __slots__ = ()

    def __setitem__(self, key, value):
        if len(self) >= _MAX_ENTRIES and key not in self:
            self.clear()
        super().__setitem__(key, value)


def clear_plans() -> None:
    """Empty every settings_cache. Setting a module's attribute does it (see settings_cache); code that
    changes a setting in place (``FWD_CONFIG["rows"] = ...``, ``monkeypatch.setitem``), which no
    attribute hook sees, calls this after the change (and after undoing it)."""
    for cache in _SETTINGS_CACHES:
        cache.clear()


class _SettingsModule(types.ModuleType):
    """A module whose attributes, set from outside (a test's monkeypatch.setattr, a sweep's setting),
    drop every settings_cache; the module's own code writes its globals without this hook."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        clear_plans()


def settings_cache(module_name: str) -> PlanCache:
    """A PlanCache for a module's launch plans (what a launcher derives from its operands' shapes,
    strides and dtypes and the modules' switches, kept so that an eager call does not derive it again
    each time), emptied whenever an attribute of this module or of another with a settings_cache is set
    from outside, or by clear_plans: a plan never outlives the switches it was made with, and a call
    pays one dict lookup for it (no settings in its key)."""
    module = sys.modules[module_name]
    if not isinstance(module, _SettingsModule):
        module.__class__ = _SettingsModule
    plans = PlanCache()
    _SETTINGS_CACHES.append(plans)
    return plans
