"""torch.library registration of the Triton launchers.

Each launcher (the Python function that allocates outputs and launches Triton kernels)
is registered as a custom op ``torch.ops.mamba_pkg.<name>`` with a fake implementation
that gives its outputs' shapes, dtypes and strides without running anything. The
autograd.Function of an op calls these launchers as before; torch.compile then traces
through the Function and sees each launch as one opaque node, so a model compiles to
one graph (fullgraph=True) without tracing into Triton's launch machinery.

Rules the launchers follow (torch.library.custom_op's contract):
- annotated arguments: Tensor, Optional[Tensor], int, float, bool, str, torch.dtype,
  Sequence[int] / Sequence[float]; no dicts, dataclasses or Union[int, Tensor];
- outputs are fresh tensors (never an input or a view of one); an output that a call
  does not produce is ``absent(like)``, an empty tensor, since an op cannot return None;
- inputs written in place are listed in ``mutates_args`` and not returned;
- the fake implementation calls the same allocation helper as the real one, so the
  two cannot disagree on shapes or strides.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterable

import torch
from torch._library.custom_ops import CustomOpDef
from torch.autograd.graph import increment_version
from torch.torch_version import TorchVersion

NAMESPACE = "mamba_pkg"

# Inductor before torch 2.13 formats "Creating implicit fallback for: <op>(<args>)" eagerly, even
# with logging off, when it first meets an op without a lowering. The arguments' IR prints its
# producers recursively, once per path: for the final-norm / loss op at the end of a 24-layer
# model of extern kernels (a Mamba-1 LM), that is exponential in depth. On torch 2.11 the compile
# of mamba-130m never got past it (> 270 s, H100 host), and a hybrid model's compile died in it
# (a segfault, the C stack). 2.13 formats the message lazily.
_EAGER_FALLBACK_LOG = TorchVersion(torch.__version__) < (2, 13)


def explicit_inductor_fallback(op: torch._ops.OpOverload) -> bool:
    """Register Inductor's fallback for ``op`` (what its implicit fallback registers, without the
    message) once Inductor's lowering module is loaded. True when nothing is left to do."""
    if not _EAGER_FALLBACK_LOG:
        return True
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None:  # dynamo's trace runs before Inductor is imported: try again later
        return False
    if op not in lowering.lowerings:
        try:
            from torch._library.utils import get_layout_constraint_tag

            tag = get_layout_constraint_tag(op, with_default=True)
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag))
        except (AttributeError, ImportError, TypeError):
            pass  # Inductor's internals moved: its own implicit fallback still works (slowly)
    return True


# Off: grad mode alone sends every call through the dispatcher, as before session 12 (A/B runs).
bypass_without_grad = True


def _wants_grad(args, kwargs) -> bool:
    """Whether any tensor argument requires grad (autograd would record the call)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in kwargs.values())


class _LauncherOp(CustomOpDef):
    """A custom op that an eager call outside autograd bypasses.

    Going through the dispatcher costs about 40 us of host time per call (measured on the
    H100 host; 60 us for selective_state_update under grad mode in session 12), which made small
    eager launches host-bound (the scan's forward at L=512: 0.128 instead of 0.072 ms). The op is
    used whenever something may need it: torch.compile tracing (checked first: dynamo folds it to
    a constant), a dispatch mode such as fake tensors, or a call autograd would record (grad mode
    and a tensor argument that requires grad, so a differentiable call keeps the custom op's
    autograd error instead of silently dropping gradients). Launchers run inside
    autograd.Function.forward / backward, under no_grad, or (decode steps, under grad mode) on
    tensors that need no grad, so they take the direct path.
    """

    # (position, name) of each argument the op writes in place (set by launcher_op).
    _mutated: tuple = ()

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
            return self._opoverload(*args, **kwargs)
        if not torch.is_grad_enabled():
            return self._init_fn(*args, **kwargs)
        if not bypass_without_grad or _wants_grad(args, kwargs):
            return self._opoverload(*args, **kwargs)
        out = self._init_fn(*args, **kwargs)
        # What the dispatcher does for an op that mutates its arguments: bump their version counters, so
        # that autograd still refuses a backward through a tensor saved before this call overwrote it.
        for i, name in self._mutated:
            t = args[i] if i < len(args) else kwargs.get(name)
            if isinstance(t, torch.Tensor):
                increment_version(t)
        return out

    _inductor_ready = False

    def register_fake(self, fn, /):
        """CustomOpDef.register_fake, with the fake also registering Inductor's fallback for the
        op (see explicit_inductor_fallback): fakes run in the AOT trace, before lowering."""
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            if not self._inductor_ready:
                self._inductor_ready = explicit_inductor_fallback(self._opoverload)
            return fn(*args, **kwargs)

        super().register_fake(fake)
        return fn


def launcher_op(name: str, *, mutates_args: Iterable[str] = ()):
    """Decorator registering a launcher as ``torch.ops.mamba_pkg.<name>``.

    Returns torch.library.custom_op's object: call it like the function, and attach the
    fake implementation with ``@<op>.register_fake``. It runs on every device type (CUDA,
    and CPU tensors under TRITON_INTERPRET=1). Eager calls that autograd would not record skip
    the dispatcher (see _LauncherOp).
    """
    def register(fn):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(fn)
        op.__class__ = _LauncherOp
        params = list(inspect.signature(fn).parameters)
        op._mutated = tuple((params.index(arg), arg) for arg in mutates_args)
        return op

    return register


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output a launcher does not produce (an op cannot return None)."""
    return like.new_empty(0)
