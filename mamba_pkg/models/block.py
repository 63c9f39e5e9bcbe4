"""Block: residual add -> norm -> mixer (-> residual add -> norm2 -> mlp).

    residual = hidden_states + residual;   hidden_states = mixer(norm(residual))
    (with an MLP)  residual = hidden_states + residual;  hidden_states = mlp(norm2(residual))

Returns (hidden_states, residual); the next block (or the final norm) adds them. This is the
mamba_ssm block order, which lets the add and the norm run as one fused op
(mamba_pkg.ops.norm.layer_norm_fn with prenorm=True) when ``fused_add_norm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mamba_pkg.models.norm import RMSNorm
from mamba_pkg.ops.norm import layer_norm_fn


def add_norm(norm, hidden_states, residual, *, fused: bool, residual_in_fp32: bool):
    """(norm(hidden_states + residual), hidden_states + residual); residual None means zero.

    norm: nn.LayerNorm or RMSNorm. fused: one fused add+norm op (ops/norm.py) instead of
    the add and the module call. The residual is kept in fp32 when residual_in_fp32.
    """
    if fused:
        return layer_norm_fn(
            hidden_states,
            norm.weight,
            norm.bias,
            residual=residual,
            eps=norm.eps,
            prenorm=True,
            residual_in_fp32=residual_in_fp32,
            is_rms_norm=isinstance(norm, RMSNorm),
        )
    residual = hidden_states if residual is None else hidden_states + residual
    normed = norm(residual.to(dtype=norm.weight.dtype))
    if residual_in_fp32:
        residual = residual.to(torch.float32)
    return normed, residual


class Block(nn.Module):
    def __init__(self, dim, mixer_cls, mlp_cls, norm_cls=nn.LayerNorm, fused_add_norm=False, residual_in_fp32=False):
        """mixer_cls, mlp_cls, norm_cls: callables taking ``dim`` (e.g. functools.partial of a module);
        mlp_cls = nn.Identity means no MLP (and no norm2)."""
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None
        if fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, RMSNorm)):
            raise TypeError(f"fused_add_norm needs nn.LayerNorm or RMSNorm norms, got {type(self.norm).__name__}")

    def forward(self, hidden_states, residual: Optional[torch.Tensor] = None, inference_params=None, **mixer_kwargs):
        """hidden_states, residual (B, L, dim) (residual None for the first block).

        mixer_kwargs (e.g. cu_seqlens) go to the mixer. Returns (hidden_states, residual), both (B, L, dim).
        """
        hidden_states, residual = add_norm(
            self.norm, hidden_states, residual, fused=self.fused_add_norm, residual_in_fp32=self.residual_in_fp32
        )
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = add_norm(
                self.norm2, hidden_states, residual, fused=self.fused_add_norm, residual_in_fp32=self.residual_in_fp32
            )
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
