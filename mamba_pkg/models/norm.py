"""RMSNorm and gated RMSNorm modules (parameter names as mamba_ssm: ``weight``, no bias).

RMSNorm:      y = x / sqrt(mean(x^2) + eps) * weight                                x (..., D)
RMSNormGated: y = rmsnorm(x) * weight * silu(z)   (norm_before_gate=True)
              y = rmsnorm(x * silu(z)) * weight   (norm_before_gate=False), per group of
              group_size channels.
Both call mamba_pkg.ops.norm; Block uses RMSNorm's weight/eps for its fused add+norm.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mamba_pkg.ops.norm import rms_norm_fn, rms_norm_gated_fn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        # mamba_ssm's RMSNorm has no bias; keep the attribute so norm code can treat it like LayerNorm.
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x (..., D) -> (..., D); with residual, normalises x + residual (returned too if prenorm)."""
        return rms_norm_fn(
            x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32
        )


class RMSNormGated(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, norm_before_gate=True, group_size=None, device=None, dtype=None):
        super().__init__()
        if group_size is not None and hidden_size % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide hidden_size={hidden_size}")
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        """x, z (..., D) -> (..., D)."""
        return rms_norm_gated_fn(
            x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size, norm_before_gate=self.norm_before_gate
        )
