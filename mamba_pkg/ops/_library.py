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

from collections.abc import Iterable

import torch

NAMESPACE = "mamba_pkg"


def launcher_op(name: str, *, mutates_args: Iterable[str] = ()):
    """Decorator registering a launcher as ``torch.ops.mamba_pkg.<name>``.

    Returns torch.library.custom_op's object: call it like the function, and attach the
    fake implementation with ``@<op>.register_fake``. It runs on every device type (CUDA,
    and CPU tensors under TRITON_INTERPRET=1).
    """
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output a launcher does not produce (an op cannot return None)."""
    return like.new_empty(0)
