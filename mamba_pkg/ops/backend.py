"""Backend selection and the input checks shared by every op.

Each public op has two implementations behind one signature: ``torch`` (the
reference, fp32 math, runs anywhere) and ``triton`` (the fast path). The one that
runs is chosen by, in order:

1. the op's explicit ``backend=`` keyword;
2. the ``MAMBA_PKG_BACKEND`` environment variable (``torch`` or ``triton``);
3. the tensors' device: CUDA (and ROCm) tensors get ``triton``, anything else
   ``torch``.

Asking for ``triton`` where it cannot run is an error, never a silent fallback.
With ``TRITON_INTERPRET=1`` in the environment (set before the kernels are
imported), the Triton kernels also run on CPU tensors through Triton's
interpreter; that is how CI checks them without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Optional, Sequence

import torch


class _TritonMissing:
    """Stand-in for ``triton`` and ``triton.language`` where Triton is not installed
    (macOS, Windows): the kernel modules still import, so the torch backend works,
    and no kernel is ever launched because ``resolve_backend`` refuses ``triton``.
    Every attribute is this object again; called on a single function (a bare
    decorator) it returns the function, otherwise itself (a decorator factory)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = _TritonMissing()
    HAS_TRITON = False


@triton.jit
def state_row(idx_ptr, i_b, n_rows, offs, HAS_INDICES: tl.constexpr):
    """Cache row of batch entry ``i_b`` for the decode kernels, and a mask shaped like ``offs``.

    With indices, a negative index is a padding slot (state untouched, output zero); an index
    past ``n_rows`` is refused on the host for CPU tensors and treated as padding here (checking
    it on the GPU would cost a sync). Returns (row as int64, clamped to 0 for padding; valid).
    """
    if HAS_INDICES:
        row = tl.load(idx_ptr + i_b).to(tl.int64)
        row_v = tl.zeros_like(offs).to(tl.int64) + row
        valid = (row_v >= 0) & (row_v < n_rows)
        row = tl.where(row >= 0, row, 0)
    else:
        row = i_b.to(tl.int64)
        valid = offs >= 0
    return row, valid


@triton.jit
def _ptx_unary(x, ASM: tl.constexpr):
    """ASM, one PTX instruction "op $0, $1;" on fp32 registers, on each element of x."""
    return tl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


# PTX (ptx_math(kernel): compiled for NVIDIA, not run by the interpreter): the single approximate
# instructions, flush-to-zero (relative error ~2e-7), as inline PTX. Triton's own functions add
# range fix-ups, and Triton 3.6 lowers tl.log2 to libdevice's accurate log2f (about 40 SASS
# instructions: the scan's softplus of dt was 650 of its forward loop's 1416).
@triton.jit
def ptx_exp2(x, PTX: tl.constexpr):
    if PTX:
        return _ptx_unary(x, "ex2.approx.ftz.f32 $0, $1;")
    return tl.exp2(x)


@triton.jit
def ptx_log2(x, PTX: tl.constexpr):
    if PTX:
        return _ptx_unary(x, "lg2.approx.ftz.f32 $0, $1;")
    return tl.log2(x)


@triton.jit
def ptx_sigmoid(x, PTX: tl.constexpr):
    """1 / (1 + exp(-x)): with PTX ex2 and rcp approximations, 4 instructions."""
    if PTX:
        return _ptx_unary(1.0 + ptx_exp2(x * -1.4426950408889634, PTX), "rcp.approx.ftz.f32 $0, $1;")
    return tl.fdiv(1.0, 1.0 + tl.exp(-x), ieee_rounding=False)


def ptx_math(kernel) -> bool:
    """Whether ``kernel`` (a @triton.jit function) may take the PTX paths above: compiled for
    NVIDIA (not ROCm), not run by Triton's interpreter."""
    return torch.version.hip is None and type(kernel).__name__ != "InterpretedFunction"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def sm90(index: int) -> bool:
    """Whether CUDA device ``index`` is an NVIDIA sm_90+ GPU (Hopper: programmatic dependent launch,
    TMA bulk copies), cached."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device (a torch.device or its index; None: the current one), cached."""
    index = device.index if isinstance(device, torch.device) else device
    return _sm_count(torch.cuda.current_device() if index is None else index)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids on the host: triton.cdiv is a constexpr function in newer
    Triton, several us per host call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for block sizes on the host; like cdiv,
    ~100x cheaper to call than triton.next_power_of_2 (about 2 us per call)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


BACKENDS = ("torch", "triton")
ENV_VAR = "MAMBA_PKG_BACKEND"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    return HAS_TRITON


def _devices(tensors: Iterable[Optional[torch.Tensor]]) -> list:
    return [t.device for t in tensors if isinstance(t, torch.Tensor)]


def resolve_backend(backend: Optional[str], *tensors: Optional[torch.Tensor]) -> str:
    """Return ``"torch"`` or ``"triton"`` for an op called on ``tensors``.

    Raises ValueError for an unknown name and RuntimeError when ``triton`` is
    asked for but cannot run on these tensors.
    """
    explicit = backend is not None
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
    devices = _devices(tensors)
    on_gpu = any(d.type == "cuda" for d in devices)
    if backend is None:
        return "triton" if on_gpu and triton_installed() else "torch"
    if backend == "triton":
        source = "backend=" if explicit else f"{ENV_VAR}="
        if not triton_installed():
            raise RuntimeError(f"{source}'triton' but triton is not installed: pip install triton")
        if not on_gpu and not triton_interpret():
            raise RuntimeError(
                f"{source}'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "mamba_pkg is imported to run the kernels on CPU through Triton's interpreter; "
                f"got tensors on {sorted({str(d) for d in devices}) or 'no device'}"
            )
    return backend


# ---------------------------------------------------------------------------
# Input checks. Every op validates up front and names the argument it rejects.
# ---------------------------------------------------------------------------


def _shape_str(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(
    name: str,
    t,
    *,
    shape: Optional[Sequence] = None,
    ndim: Optional[int | Sequence[int]] = None,
    dtype: Optional[torch.dtype | Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    optional: bool = False,
) -> None:
    """Validate one tensor argument and raise an error naming it.

    ``shape`` holds ints, or None for a dimension of any size. ``ndim`` and
    ``dtype`` may be one value or a sequence of allowed values. With
    ``optional=True`` a None argument passes.
    """
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(str(a) for a in allowed)} dimensions, "
                f"got shape {_shape_str(t.shape)}"
            )
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == ts for s, ts in zip(shape, t.shape))
        if not ok:
            want = _shape_str(["*" if s is None else s for s in shape])
            raise ValueError(f"{name} must have shape {want}, got {_shape_str(t.shape)}")
    if dtype is not None:
        allowed_dt = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed_dt:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed_dt)
            raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        if not (t.device.type == torch.device(device).type and torch.device(device).index is None):
            raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors must share one device; returns it."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = name, t
        elif t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}: "
                "all inputs must be on the same device"
            )
    if first is None:
        raise ValueError("no tensor inputs given")
    return first.device


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], total_len: int, batch: int, *, name: str = "cu_seqlens") -> None:
    """Validate packed-sequence boundaries (FlashAttention convention).

    ``cu_seqlens`` is a 1-D int32/int64 tensor ``(num_seqs + 1,)`` starting at 0,
    non-decreasing and ending at the packed length ``total_len``; packed inputs
    have batch size 1. The value checks read the tensor on the host (one small
    copy); while torch.compile traces they are skipped (a host read would break the
    graph), the type, dtype and shape checks still run.
    """
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"packed sequences ({name} given) need batch size 1, got batch {batch}")
    if torch.compiler.is_compiling():
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total_len:
        raise ValueError(f"{name} must end at the sequence length L={total_len}, got {values[-1]}")


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """``seq_idx`` (1, L) int32 holding, for each packed position, its sequence index."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_idx = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32), lengths.long(), output_size=total_len
    )
    return seq_idx.unsqueeze(0)
