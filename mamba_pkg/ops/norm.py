"""Fused residual-add + LayerNorm / RMSNorm, and gated RMSNorm.

Add + norm, x and residual (..., D):
    s   = x + residual                      (in fp32 if residual_in_fp32)
    out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (LayerNorm)
    out = s / sqrt(mean(s^2) + eps) * weight + bias               (RMSNorm)
returns out, or (out, s) with prenorm (s is the residual stream for the next block).

Gated RMSNorm, x and z (..., D), normalised over groups of group_size channels:
    norm_before_gate:      out = rmsnorm(x) * weight (+ bias) * silu(z)
    not norm_before_gate:  out = rmsnorm(x * silu(z)) * weight (+ bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_pkg.ops.backend import FLOAT_DTYPES, check_same_device, check_tensor, resolve_backend


def _residual_dtype(x, residual, residual_in_fp32):
    if residual_in_fp32:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def layer_norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                   is_rms_norm=False):
    """Torch reference of :func:`layer_norm_fn` (fp32 math, differentiable)."""
    s = x.float() if residual is None else x.float() + residual.float()
    res_out = s.to(_residual_dtype(x, residual, residual_in_fp32))
    # The norm sees the fp32 sum, before it is rounded to the residual dtype.
    sf = s
    if is_rms_norm:
        y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    else:
        mean = sf.mean(-1, keepdim=True)
        y = (sf - mean) * torch.rsqrt((sf - mean).square().mean(-1, keepdim=True) + eps)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    out = y.to(x.dtype)
    return (out, res_out) if prenorm else out


def _validate_add_norm(x, weight, bias, residual, eps):
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    check_tensor("weight", weight, shape=(dim,), dtype=FLOAT_DTYPES)
    check_tensor("bias", bias, shape=(dim,), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("residual", residual, shape=tuple(x.shape), dtype=FLOAT_DTYPES, optional=True)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)


def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                  is_rms_norm=False, *, backend=None):
    """Fused residual add + LayerNorm (or RMSNorm with ``is_rms_norm``).

    Args:
        x: (..., D).  residual: (..., D) or None.  weight: (D,).  bias: (D,) or None.
        eps: added to the variance.
        prenorm: also return the sum s = x + residual.
        residual_in_fp32: keep s in fp32 (else in the dtype of residual, or of x without one).
        backend: "torch", "triton" or None (auto).

    Returns:
        out (..., D) in the dtype of x, or (out, s) with prenorm.
    """
    _validate_add_norm(x, weight, bias, residual, eps)
    resolve_backend(backend, x, weight)
    # TODO(issue 5): Triton kernels; until they land every backend runs the reference.
    return layer_norm_ref(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm)


def rms_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, *,
                backend=None):
    """Fused residual add + RMSNorm; :func:`layer_norm_fn` with ``is_rms_norm=True``."""
    return layer_norm_fn(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True, backend=backend)


# ---------------------------------------------------------------------------
# Gated RMSNorm (Mamba-2 output norm).
# ---------------------------------------------------------------------------


def rms_norm_gated_ref(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Torch reference of :func:`rms_norm_gated_fn` (fp32 math, differentiable)."""
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    xg = xf.reshape(*x.shape[:-1], dim // group_size, group_size)
    y = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if z is not None and norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def rms_norm_gated_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True, *,
                      backend=None):
    """RMSNorm over groups of channels with a silu(z) gate.

    Args:
        x: (..., D).  z: (..., D) or None (no gate).  weight: (D,).  bias: (D,) or None.
        group_size: channels per normalisation group; must divide D (None = D).
        norm_before_gate: True: rmsnorm(x) * w * silu(z); False: rmsnorm(x * silu(z)) * w.
        backend: "torch", "triton" or None (auto).

    Returns:
        out (..., D) in the dtype of x.
    """
    _validate_add_norm(x, weight, bias, None, eps)
    dim = x.shape[-1]
    check_tensor("z", z, shape=tuple(x.shape), dtype=FLOAT_DTYPES, optional=True)
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or dim % group_size):
        raise ValueError(f"group_size must be a positive int dividing D={dim}, got {group_size!r}")
    check_same_device(x=x, z=z)
    resolve_backend(backend, x, weight)
    # TODO(issue 5): Triton kernels; until they land every backend runs the reference.
    return rms_norm_gated_ref(x, weight, bias, z, eps, group_size, norm_before_gate)
