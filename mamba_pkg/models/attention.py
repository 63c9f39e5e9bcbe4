"""MHA: causal multi-head self-attention for hybrid Mamba models (mamba_ssm's mha.py layout).

    [q, k, v, (mlp)] = in_proj(x);  optional depthwise causal conv over [q, k, v] (d_conv > 0);
    rotary on the first rotary_emb_dim channels of q and k;  GQA with num_heads_kv heads;
    out = out_proj([attention(q, k, v), up * silu(gate)])   (the mlp half only if mlp_dim > 0)

Parameter names and shapes equal mamba_ssm's (in_proj, conv1d, out_proj; the rotary
frequencies are a non-persistent buffer), so its state dicts load unchanged.
Inference cache: (kv_cache (B, max_seqlen, 2, Hkv, P), conv_state (B, qkv_dim, d_conv) or None).
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mamba_pkg.models._cache_utils import (
    check_mixer_input,
    conv_with_cache,
    layer_cache,
    positions_in_sequence,
)
from mamba_pkg.ops.attention import attention, attention_kvcache
from mamba_pkg.ops.backend import seq_idx_from_cu_seqlens


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin (..., rotary_dim / 2) fp32 of angles positions * inv_freq; positions (...) integer."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of x; the rest pass through.

    x: (B, L, H, P); cos, sin: (B, L, R / 2) or (L, R / 2), fp32. Non-interleaved (GPT-NeoX)
    pairs channel i with i + R/2; interleaved (GPT-J) pairs 2i with 2i + 1. Math in fp32.
    """
    rotary_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``dim`` channels of each head (no parameters)."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, device=None):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"rotary_emb_dim must be even, got {dim}")
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q (B, L, H, P), k (B, L, Hkv, P), positions (L,) or (B, L) -> rotated q, k."""
        cos, sin = rotary_cos_sin(positions, self.inv_freq)
        return apply_rotary(q, cos, sin, self.interleaved), apply_rotary(k, cos, sin, self.interleaved)


class MHA(nn.Module):
    """Causal multi-head self-attention with GQA, rotary and an optional qkv conv."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_heads_kv=None,
        head_dim=None,
        mlp_dim=0,
        qkv_proj_bias=True,
        out_proj_bias=True,
        softmax_scale=None,
        causal=True,
        layer_idx=None,
        d_conv=0,
        rotary_emb_dim=0,
        rotary_emb_base=10000.0,
        rotary_emb_interleaved=False,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.layer_idx = layer_idx
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.num_heads = num_heads
        self.num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if self.num_heads_kv < 1 or num_heads % self.num_heads_kv != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_heads_kv={self.num_heads_kv}")
        if head_dim is None and embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} (or give head_dim)")
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        if rotary_emb_dim > self.head_dim:
            raise ValueError(f"rotary_emb_dim={rotary_emb_dim} exceeds head_dim={self.head_dim}")
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_dim = self.head_dim * self.num_heads
        if rotary_emb_dim > 0:
            self.rotary_emb = RotaryEmbedding(
                rotary_emb_dim, base=rotary_emb_base, interleaved=rotary_emb_interleaved, device=device
            )
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory_kwargs)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(
                qkv_dim, qkv_dim, kernel_size=d_conv, padding=d_conv - 1, groups=qkv_dim, **factory_kwargs
            )
        self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory_kwargs)

    # -- cache ------------------------------------------------------------------------------

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(kv_cache (B, max_seqlen, 2, Hkv, P), conv_state (B, qkv_dim, d_conv) or None)."""
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        device = self.out_proj.weight.device
        # Zeros, not empty: masked-out cache slots still enter the softmax-weighted sum as 0 * v.
        kv_cache = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, dtype=dtype, device=device)
        conv_state = None
        if self.d_conv > 0:
            conv_state = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, dtype=dtype, device=device)
        return kv_cache, conv_state

    # -- pieces ---------------------------------------------------------------------------

    def _split_mlp(self, qkv):
        if self.mlp_dim == 0:
            return qkv, None
        qkv, x_mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        return qkv, up * F.silu(gate)

    def _conv(self, qkv, conv_state, *, fresh, cu_seqlens):
        """Causal depthwise conv over qkv (B, L, D), no activation; updates conv_state in place."""
        weight = rearrange(self.conv1d.weight, "d 1 w -> d w")
        out = conv_with_cache(qkv.transpose(1, 2), weight, self.conv1d.bias, None, conv_state, fresh=fresh, cu_seqlens=cu_seqlens)
        return out.transpose(1, 2)

    def _attend_cached(self, q, k, v, kv_cache, offset, *, fresh, cu_seqlens):
        k_cache, v_cache = kv_cache[:, :, 0], kv_cache[:, :, 1]
        if fresh:
            # Prefill: plain (packed) attention, then store the keys/values of every sequence.
            longest = k.shape[1] if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            if longest > k_cache.shape[1]:
                raise ValueError(f"a prompt of {longest} tokens does not fit the KV cache of max_seqlen={k_cache.shape[1]}")
            context = attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens)
            if cu_seqlens is None:
                k_cache[:, : k.shape[1]] = k
                v_cache[:, : v.shape[1]] = v
            else:
                rows = seq_idx_from_cu_seqlens(cu_seqlens, k.shape[1])[0].long()
                cols = positions_in_sequence(cu_seqlens, k.shape[1])
                k_cache.index_put_((rows, cols), k[0])
                v_cache.index_put_((rows, cols), v[0])
            return context
        if cu_seqlens is not None:
            raise ValueError("packed sequences (cu_seqlens) can only be prefilled from an empty cache")
        return attention_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=offset, causal=self.causal, softmax_scale=self.softmax_scale
        )

    # -- forward / step -------------------------------------------------------------------

    def forward(self, x, inference_params=None, *, cu_seqlens=None):
        """x (B, L, embed_dim) -> (B, L, embed_dim).

        cu_seqlens (num_seqs + 1,) int32 packs sequences along L (B == 1): attention, rotary
        positions and the conv restart at each boundary. With inference_params and
        seqlen_offset == 0 the keys/values (and conv state) of the prompt are written into the
        cache (with cu_seqlens: cache row s holds sequence s); with seqlen_offset > 0 the new
        tokens attend to the cache and are appended to it (per-sequence offsets from
        inference_params.lengths_per_sample when set).
        """
        check_mixer_input("x", x, self.embed_dim, cu_seqlens)
        if inference_params is None:
            return self._mix(x, None, None, 0, fresh=True, cu_seqlens=cu_seqlens)
        fresh = inference_params.seqlen_offset == 0
        cache_batch = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        kv_cache, conv_state = layer_cache(self, inference_params, cache_batch)
        offset: Union[int, torch.Tensor] = 0
        if not fresh:
            lengths = inference_params.lengths_per_sample
            offset = inference_params.seqlen_offset if lengths is None else lengths[: x.shape[0]]
        return self._mix(x, kv_cache, conv_state, offset, fresh=fresh, cu_seqlens=cu_seqlens)

    def step(self, hidden_states, kv_cache, conv_state, cache_seqlens):
        """One decode step. hidden_states (B, 1, embed_dim); kv_cache, conv_state as allocated
        (rows [:B] updated in place); cache_seqlens: int or (B,) tokens already cached.
        Returns (out (B, 1, embed_dim), kv_cache, conv_state)."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"step takes hidden_states (B, 1, embed_dim), got {tuple(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        rows_conv = None if conv_state is None else conv_state[:batch]
        out = self._mix(hidden_states, kv_cache[:batch], rows_conv, cache_seqlens, fresh=False, cu_seqlens=None)
        return out, kv_cache, conv_state

    def _mix(self, x, kv_cache, conv_state, offset, *, fresh, cu_seqlens):
        seqlen = x.shape[1]
        qkv, x_mlp = self._split_mlp(self.in_proj(x))
        if self.d_conv > 0:
            qkv = self._conv(qkv, conv_state, fresh=fresh, cu_seqlens=cu_seqlens)
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim, self.num_heads_kv * self.head_dim],
            dim=-1,
        )
        q = rearrange(q, "b l (h p) -> b l h p", p=self.head_dim)
        k = rearrange(k, "b l (h p) -> b l h p", p=self.head_dim)
        v = rearrange(v, "b l (h p) -> b l h p", p=self.head_dim)
        if self.rotary_emb_dim > 0:
            if cu_seqlens is not None:
                positions = positions_in_sequence(cu_seqlens, seqlen)
            elif isinstance(offset, torch.Tensor):
                positions = offset.to(torch.long)[:, None] + torch.arange(seqlen, device=x.device)
            else:
                positions = offset + torch.arange(seqlen, device=x.device)
            q, k = self.rotary_emb(q, k, positions)
        if kv_cache is None:
            context = attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens)
        else:
            context = self._attend_cached(q, k, v, kv_cache, offset, fresh=fresh, cu_seqlens=cu_seqlens)
        context = rearrange(context, "b l h p -> b l (h p)")
        if x_mlp is not None:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context)
