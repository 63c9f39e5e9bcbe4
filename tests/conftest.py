"""Shared test setup.

Without a GPU, the Triton kernels run through Triton's CPU interpreter. The
switch must be set before any kernel module is imported, so it lives here, at
the top of the first file pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the same behaviour runs on CPU via the interpreter)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_rule(out, ref_fp32, ref_lowp, *, factor: float = 2.0, atol: float = 1e-5, name: str = "output"):
    """The STYLE.md tolerance rule.

    ``out`` (the kernel, in low precision) must be within ``factor`` times the
    error that the torch reference makes in the same low precision
    (``ref_lowp``), plus ``atol``, both measured against the fp32 reference.
    """
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    err = (out.double() - ref_fp32.double()).abs().max().item()
    base = (ref_lowp.double() - ref_fp32.double()).abs().max().item()
    assert err <= factor * base + atol, f"{name}: max error {err:.3e} > {factor} x {base:.3e} + {atol:.1e}"
