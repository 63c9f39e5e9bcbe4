"""Cached kernel launches (mamba_pkg/ops/_launch.py: the SSD kernels and the selective scan), with
stand-ins for Triton's compiled kernel, autotuner, driver and knobs: which calls take Triton's own
launch path and what a cached launch passes to the compiled kernel. (On a GPU,
test_gpu_backward_is_deterministic in test_ssd_triton.py checks that cached and uncached launches
give the same bits, and the selective scan's GPU tests run on cached launches.)"""

from types import SimpleNamespace

import pytest
import torch

from mamba_pkg.ops import _launch


class FakeCompiled:
    function = "function"
    packed_metadata = "packed"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class FakeJit:
    """kernel[grid](*args, **kwargs) records the call and returns its compiled kernel."""
    arg_names = ["x_ptr", "y_ptr", "n", "scale", "FLAG", "BLOCK"]

    def __init__(self):
        self.pre_run_hooks = []
        self.compiled = FakeCompiled()
        self.slow = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return self.compiled
        return launch


class FakeAutotuner(FakeJit):
    def __init__(self, pre_hook=None):
        super().__init__()
        self.fn = FakeJit()
        self.configs = [SimpleNamespace(kwargs={"BLOCK": 32}, pre_hook=pre_hook)]
        self.best_config = self.configs[0]


@pytest.fixture
def fakes(monkeypatch):
    hooks = SimpleNamespace(launch_enter_hook=SimpleNamespace(calls=[]), launch_exit_hook=None, debug=False)
    monkeypatch.setattr(_launch, "CompiledKernel", FakeCompiled)
    monkeypatch.setattr(_launch, "Autotuner", FakeAutotuner)
    monkeypatch.setattr(_launch, "triton", SimpleNamespace(__version__=_launch.DIRECT_LAUNCH_TRITON[0] + "0"))
    monkeypatch.setattr(_launch, "knobs", SimpleNamespace(runtime=hooks,
                                                         compilation=SimpleNamespace(instrumentation_mode="")))
    monkeypatch.setattr(_launch, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 99)))
    monkeypatch.setattr(_launch, "_caches", {})
    return hooks


def test_second_launch_of_a_signature_calls_the_compiled_kernel(fakes):
    k = FakeJit()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    for _ in range(3):
        _launch.launch(k, (5, 2), x, y, 7, 0.5, FLAG=True, BLOCK=16, num_warps=4)
    assert len(k.slow) == 1
    assert k.slow[0] == ((5, 2), (x, y, 7, 0.5), {"FLAG": True, "BLOCK": 16, "num_warps": 4})
    assert len(k.compiled.calls) == 2
    # grid padded to 3-D, the stream, the kernel's handles, no launch metadata or hooks, then
    # every parameter in signature order: the pointers as addresses, then the other arguments and
    # the constexprs (launch options such as num_warps are not parameters).
    want = (5, 2, 1, 99, "function", "packed", None, None, None, x.data_ptr(), y.data_ptr(), 7, 0.5, True, 16)
    assert k.compiled.calls[0] == want


def test_absent_pointer_is_passed_as_none(fakes):
    """An optional pointer left out (None) stays None in the direct launch, and None-ness is part of
    the signature."""
    k = FakeJit()
    x = torch.zeros(64)
    for y in (None, None, x, x):
        _launch.launch(k, (1,), x, y, 3, 1.0, FLAG=False, BLOCK=16)
    assert len(k.slow) == 2 and len(k.compiled.calls) == 2
    assert k.compiled.calls[0][9:11] == (x.data_ptr(), None)
    assert k.compiled.calls[1][9:11] == (x.data_ptr(), x.data_ptr())


@pytest.mark.parametrize("change", ["int", "float", "dtype", "alignment", "none", "constexpr", "option"])
def test_anything_that_selects_a_specialisation_is_a_new_signature(fakes, change):
    k = FakeJit()
    base = torch.zeros(64)
    args = dict(x=base, y=base, n=16, scale=0.5, FLAG=True, BLOCK=16, num_warps=4)
    changed = dict(args, **{
        "int": {"n": 1}, "float": {"scale": 0.25}, "dtype": {"y": base.double()}, "alignment": {"x": base[1:]},
        "none": {"y": None}, "constexpr": {"FLAG": False}, "option": {"num_warps": 8}}[change])
    for a in (args, args, changed, changed):
        _launch.launch(k, (1,), a["x"], a["y"], a["n"], a["scale"], FLAG=a["FLAG"], BLOCK=a["BLOCK"],
                       num_warps=a["num_warps"])
    assert len(k.slow) == 2 and len(k.compiled.calls) == 2


def test_autotuned_kernel_launches_with_its_best_config(fakes):
    k = FakeAutotuner()
    x = torch.zeros(64)
    grid = lambda meta: (128 // meta["BLOCK"],)
    for _ in range(2):
        _launch.launch(k, grid, x, x, 3, 1.0, FLAG=False)
    assert len(k.slow) == 1 and k.compiled.calls[0][:3] == (4, 1, 1)
    assert k.compiled.calls[0][-2:] == (False, 32)  # FLAG from the call, BLOCK from the config
    # A new list of configs (as the GPU tests' fixture pins them) goes through the autotuner again.
    k.configs = list(k.configs)
    _launch.launch(k, grid, x, x, 3, 1.0, FLAG=False)
    assert len(k.slow) == 2


def test_hooks_pre_hooks_and_switch_keep_the_normal_path(fakes, monkeypatch):
    x = torch.zeros(64)
    pre_hooked = FakeAutotuner(pre_hook=lambda nargs: None)
    for _ in range(2):
        _launch.launch(pre_hooked, (1,), x, x, 3, 1.0, FLAG=False)
    assert len(pre_hooked.slow) == 2 and not pre_hooked.compiled.calls

    k = FakeJit()
    fakes.launch_enter_hook.calls.append(print)  # a profiler's hook
    for _ in range(2):
        _launch.launch(k, (1,), x, x, 3, 1.0, FLAG=False, BLOCK=16)
    fakes.launch_enter_hook.calls.clear()
    monkeypatch.setattr(_launch, "enabled", False)
    for _ in range(2):
        _launch.launch(k, (1,), x, x, 3, 1.0, FLAG=False, BLOCK=16)
    monkeypatch.setattr(_launch, "enabled", True)
    k.pre_run_hooks.append(print)  # a pre-run hook added after the first launches
    for _ in range(2):
        _launch.launch(k, (1,), x, x, 3, 1.0, FLAG=False, BLOCK=16)
    assert len(k.slow) == 6 and not k.compiled.calls


def test_unchecked_triton_version_keeps_the_normal_path(fakes, monkeypatch):
    monkeypatch.setattr(_launch, "triton", SimpleNamespace(__version__="9.9.0"))
    k = FakeJit()
    x = torch.zeros(64)
    for _ in range(2):
        _launch.launch(k, (1,), x, x, 3, 1.0, FLAG=False, BLOCK=16)
    assert len(k.slow) == 2 and not k.compiled.calls


def test_plan_launches_like_launch(fakes):
    """A Plan (scalars and constexprs fixed) makes the same direct launch as launch() with the same
    arguments, and compiles anew for a pointer signature it has not seen (alignment, None, dtype)."""
    k, k_plan = FakeJit(), FakeJit()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    plan = _launch.Plan(k_plan, (5, 2), 7, 0.5, FLAG=True, BLOCK=16, num_warps=4)
    for _ in range(3):
        _launch.launch(k, (5, 2), x, y, 7, 0.5, FLAG=True, BLOCK=16, num_warps=4)
        assert plan(x, y) is k_plan.compiled  # returned on both paths, as by launch()
    assert plan.compiled() == [k_plan.compiled]
    assert k_plan.slow == k.slow and k_plan.compiled.calls == k.compiled.calls and len(k.compiled.calls) == 2
    for other in (x[1:], None, x.double(), x):
        plan(other, y)
    assert len(k_plan.slow) == 4 and len(k_plan.compiled.calls) == 3
    assert k_plan.compiled.calls[-1][9] == x.data_ptr()


def test_plan_keeps_the_normal_path_where_launch_does(fakes, monkeypatch):
    x = torch.zeros(64)
    tuned = FakeAutotuner()
    plan = _launch.Plan(tuned, lambda meta: (128 // meta["BLOCK"],), 3, 1.0, FLAG=False)
    for _ in range(2):
        plan(x, x)
    assert len(tuned.slow) == 1 and tuned.compiled.calls[0][:3] == (4, 1, 1)
    tuned.configs = list(tuned.configs)  # pinned configs: Triton's path
    plan(x, x)
    assert len(tuned.slow) == 2 and len(tuned.compiled.calls) == 1

    k = FakeJit()
    plan = _launch.Plan(k, (1,), 3, 1.0, FLAG=False, BLOCK=16)
    plan(x, x)
    fakes.launch_enter_hook.calls.append(print)  # a profiler's hook
    plan(x, x)
    fakes.launch_enter_hook.calls.clear()
    monkeypatch.setattr(_launch, "enabled", False)
    plan(x, x)
    monkeypatch.setattr(_launch, "enabled", True)
    k.pre_run_hooks.append(print)
    plan(x, x)
    assert len(k.slow) == 4 and not k.compiled.calls


def test_interpreted_kernels_take_tritons_path(fakes):
    class InterpretedFunction(FakeJit):  # the interpreter's kernels return no CompiledKernel
        pass

    k = InterpretedFunction()
    x = torch.zeros(64)
    plan = _launch.Plan(k, (1,), 3, 1.0, FLAG=False, BLOCK=16)
    for _ in range(2):
        _launch.launch(k, (1,), x, x, 3, 1.0, FLAG=False, BLOCK=16)
        plan(x, x)
    assert len(k.slow) == 4 and not k.compiled.calls


def test_settings_cache_dropped_by_a_module_setting_and_by_clear_plans(monkeypatch):
    """Every settings_cache is emptied when an attribute of a module holding one is set from outside
    (also another module's: their plans can depend on each other's switches) and by clear_plans();
    a cache holds at most _MAX_ENTRIES plans."""
    import sys
    import types

    names = ("mamba_pkg_test_settings_a", "mamba_pkg_test_settings_b")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    plans_a, plans_b = (_launch.settings_cache(name) for name in names)
    module_a = sys.modules[names[0]]
    try:
        plans_a["k"], plans_b["k"] = 1, 2
        module_a.SWITCH = True
        assert not plans_a and not plans_b
        plans_a["k"] = 1
        _launch.clear_plans()
        assert not plans_a
        last = _launch._MAX_ENTRIES + 4
        for i in range(last + 1):
            plans_b[i] = i
        assert 0 < len(plans_b) <= _launch._MAX_ENTRIES and plans_b[last] == last
    finally:
        # By identity: list.remove compares dicts by value and would take another module's empty cache.
        _launch._SETTINGS_CACHES[:] = [c for c in _launch._SETTINGS_CACHES if c is not plans_a and c is not plans_b]
