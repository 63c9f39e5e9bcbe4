"""ops/_library.py: launchers as custom ops, and the eager fast path that skips the dispatcher."""

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


def test_grad_mode_and_dispatch_modes_use_the_op():
    x = torch.randn(5)
    hit, out = _dispatched(lambda: _scale(x, 3.0))
    assert hit
    torch.testing.assert_close(out, 3 * x)
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
