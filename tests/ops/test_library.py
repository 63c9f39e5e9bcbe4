"""ops/_library.py: launchers as custom ops, and the eager fast path that skips the dispatcher."""

import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mamba_pkg.ops._library import launcher_op


@launcher_op("_test_scale")
def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


@_scale.register_fake
def _(x, factor):
    return torch.empty_like(x)


def _dispatched(fn) -> tuple[bool, torch.Tensor]:
    """Whether the call went through the dispatcher (the profiler records the op's name)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return any(e.name == "mamba_pkg::_test_scale" for e in prof.events()), out


def test_eager_no_grad_skips_the_dispatcher():
    x = torch.randn(5)
    with torch.no_grad():
        hit, out = _dispatched(lambda: _scale(x, 2.0))
    assert not hit
    torch.testing.assert_close(out, 2 * x)


def test_grad_mode_without_grad_inputs_skips_the_dispatcher(monkeypatch):
    """Under grad mode a call on tensors that need no grad (a decode step outside no_grad) is not
    recorded by autograd either way: it skips the dispatcher, unless the switch is off."""
    from mamba_pkg.ops import _library

    x = torch.randn(5)
    hit, out = _dispatched(lambda: _scale(x, 3.0))
    assert not hit
    torch.testing.assert_close(out, 3 * x)
    monkeypatch.setattr(_library, "bypass_without_grad", False)
    assert _dispatched(lambda: _scale(x, 3.0))[0]


@launcher_op("_test_add_into", mutates_args=("out",))
def _add_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.data.add_(x)  # as a kernel writes: autograd's version counter does not see it


@_add_into.register_fake
def _(x, out):
    return None


def test_grad_mode_bypass_bumps_the_version_of_mutated_arguments():
    """A call that skips the dispatcher under grad mode still marks what it overwrote, as the
    dispatcher does: a backward through a tensor saved before the overwrite is refused, not wrong."""
    w = torch.randn(4, requires_grad=True)
    buf = torch.randn(4)
    y = (w * buf).sum()  # saves buf for the backward
    expected = buf + 1
    before = buf._version
    _add_into(torch.ones(4), out=buf)
    assert buf._version == before + 1
    assert torch.equal(buf, expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    other = torch.zeros(3)
    _add_into(torch.ones(3), other)  # positional
    assert other._version == 1 and torch.equal(other, torch.ones(3))


def test_grad_mode_and_dispatch_modes_use_the_op():
    x = torch.randn(5, requires_grad=True)
    hit, out = _dispatched(lambda: _scale(x, 3.0))
    assert hit
    torch.testing.assert_close(out, 3 * x)
    with torch.no_grad():
        assert not _dispatched(lambda: _scale(x, 3.0))[0]
    from torch._subclasses.fake_tensor import FakeTensorMode
    with torch.no_grad(), FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        out = _scale(fake, 2.0)
    assert out.shape == x.shape and type(out).__name__ == "FakeTensor"


def test_compiled_call_matches_eager():
    x = torch.randn(6)
    compiled = torch.compile(lambda t: _scale(t, 0.5) + 1, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), 0.5 * x + 1)


def test_opcheck():
    torch.library.opcheck(torch.ops.mamba_pkg._test_scale, (torch.randn(4), 2.0))


@launcher_op("_test_shift")
def _shift(x: torch.Tensor, by: float) -> torch.Tensor:
    return x + by


@_shift.register_fake
def _(x, by):
    return torch.empty_like(x)


def test_inductor_fallback_registered_before_lowering(monkeypatch):
    """Inductor < 2.13 formats the implicit-fallback message eagerly (exponential for deep graphs):
    the op's fake registers the fallback itself, so lowering never takes that branch."""
    import torch._inductor.graph as graph
    import torch._inductor.lowering as lowering
    from torch._library.utils import get_layout_constraint_tag

    from mamba_pkg.ops import _library

    monkeypatch.setattr(_library, "_EAGER_FALLBACK_LOG", True)
    op = torch.ops.mamba_pkg._test_shift.default
    with monkeypatch.context() as m:  # dynamo's trace, before Inductor's lowering is imported
        m.delitem(sys.modules, "torch._inductor.lowering")
        assert _library.explicit_inductor_fallback(op) is False
    assert op not in lowering.lowerings
    messages = []
    monkeypatch.setattr(graph.log, "info", lambda msg, *args: messages.append(msg))
    compiled = torch.compile(lambda t: _shift(t * 2, 1.5), fullgraph=True, backend="inductor")
    x = torch.randn(8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), 2 * x + 1.5)
    assert op in lowering.lowerings and _shift._inductor_ready
    assert not any("implicit fallback" in str(msg) for msg in messages)
    expected = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
    assert lowering._maybe_layout_constraints.get(op) is expected
