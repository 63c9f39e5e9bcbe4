"""Block: residual add -> norm -> mixer (-> residual add -> norm2 -> mlp).

    residual = hidden_states + residual;   hidden_states = mixer(norm(residual))
    (with an MLP)  residual = hidden_states + residual;  hidden_states = mlp(norm2(residual))

Returns (hidden_states, residual); the next block (or the final norm) adds them. This is the
mamba_ssm block order, which lets the add and the norm run as one fused op
(mamba_pkg.ops.norm.layer_norm_fn with prenorm=True) when ``fused_add_norm``. A decode step of
at most STEP_LINEAR_MAX_ROWS rows (width <= STEP_NORM_MAX_DIM, models/_cache_utils.py) goes one
further: add, RMSNorm and the mixer's in_proj are one launch (ops/decode_linear.add_rms_norm_linear),
the mixer continues from its in_proj output.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mamba_pkg.models import _cache_utils
from mamba_pkg.models._cache_utils import plain_linear
from mamba_pkg.models.norm import RMSNorm
from mamba_pkg.ops import decode_linear as _dl
from mamba_pkg.ops.decode_linear import add_rms_norm_linear, add_rms_norm_rows
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
        if self._fused_step(hidden_states, inference_params, mixer_kwargs):
            in_proj = self.mixer.in_proj
            # Mamba-2 folds its conv update into the same launch (Mamba.step fuses its conv with x_proj).
            conv = self.mixer.step_conv(inference_params, hidden_states.shape[0]) if hasattr(self.mixer, "step_conv") else None
            proj, residual = add_rms_norm_linear(
                hidden_states.squeeze(1), None if residual is None else residual.squeeze(1), self.norm.weight,
                in_proj.weight, in_proj.bias, self.norm.eps, self.residual_in_fp32, conv,
            )
            if conv is not None:
                return self.mixer.cached_step(proj, inference_params, conv_done=True), residual.unsqueeze(1)
            return self.mixer.cached_step(proj, inference_params), residual.unsqueeze(1)
        if self._step_norm_rows(hidden_states, inference_params, mixer_kwargs):
            hidden_states, residual = add_rms_norm_rows(
                hidden_states.squeeze(1), None if residual is None else residual.squeeze(1), self.norm.weight,
                self.norm.eps, self.residual_in_fp32,
            )
            hidden_states, residual = hidden_states.unsqueeze(1), residual.unsqueeze(1)
        else:
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

    def _rms_decode_token(self, hidden_states, inference_params, mixer_kwargs) -> bool:
        """One token (B, 1, dim) continuing a cache, without mixer arguments, into a fused RMSNorm: the
        decode steps that the two paths below may take."""
        return (inference_params is not None and inference_params.seqlen_offset > 0 and not mixer_kwargs
                and self.fused_add_norm and isinstance(self.norm, RMSNorm)
                and hidden_states.dim() == 3 and hidden_states.shape[1] == 1)

    def _fused_step(self, hidden_states, inference_params, mixer_kwargs) -> bool:
        """A decode step that can run add + RMSNorm + in_proj as one launch: one token of at most
        STEP_LINEAR_MAX_ROWS rows and width STEP_NORM_MAX_DIM, continuing a cache, a mixer with
        cached_step and a plain in_proj, no MLP (its norm2 would need the mixer's output first)."""
        return (self._rms_decode_token(hidden_states, inference_params, mixer_kwargs)
                and self.mlp is None and hasattr(self.mixer, "cached_step")
                and hidden_states.shape[0] <= _cache_utils.STEP_LINEAR_MAX_ROWS
                and hidden_states.shape[-1] <= _cache_utils.STEP_NORM_MAX_DIM and plain_linear(self.mixer.in_proj))

    def _step_norm_rows(self, hidden_states, inference_params, mixer_kwargs) -> bool:
        """A decode step whose add + RMSNorm runs as decode_linear.add_rms_norm_rows (STEP_NORM_ROWS):
        one token of up to decode_linear.MAX_ROWS rows continuing a cache, a fused RMSNorm of width
        <= PREPASS_MAX_K, no gradient (the row kernel has no backward)."""
        return (_cache_utils.STEP_NORM_ROWS and self._rms_decode_token(hidden_states, inference_params, mixer_kwargs)
                and hidden_states.shape[0] <= _dl.MAX_ROWS and hidden_states.shape[-1] <= _dl.PREPASS_MAX_K
                and not (torch.is_grad_enabled() and (hidden_states.requires_grad or self.norm.weight.requires_grad)))

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
