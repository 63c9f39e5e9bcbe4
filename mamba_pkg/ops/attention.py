"""Scaled dot-product attention for MHA layers: dense, packed (varlen) and KV-cache decode.

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h // (H / Hkv)]) v[b, j, h // (H / Hkv)]

over keys j <= i (causal) and, for packed sequences, only keys of the same sequence.
q (B, L, H, P); k, v (B, L, Hkv, P) with H % Hkv == 0 (GQA / MQA); out (B, L, H, P).

Implementations (no Triton kernel of our own: FlashAttention-2 already exists inside PyTorch):
- ``attention_ref``: explicit fp32 math, the specification.
- backend "torch": torch SDPA; packed sequences get a block-diagonal causal mask.
- backend "triton" (CUDA default): flash_attn if installed (fp16/bf16), else SDPA for dense
  inputs and FlexAttention with a document mask for packed inputs (compiled on CUDA), so that
  packed sequences never materialise an (L, L) mask.

``attention_kvcache`` writes new keys/values into a preallocated cache in place and attends
the new queries to everything cached so far (decode steps and chunked prefill).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Union

import torch
import torch.nn.functional as F
from einops import repeat

from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    resolve_backend,
    seq_idx_from_cu_seqlens,
)


# Looked up once at import: torch.compile must not trace importlib (torch 2.11's dynamo refuses
# find_spec as a skipped function, which broke fullgraph=True for hybrid models on CUDA).
_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def flash_attn_installed() -> bool:
    return _FLASH_ATTN_INSTALLED


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_qkv(q, k, v, cu_seqlens):
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    batch, seqlen, nheads, headdim = q.shape
    check_tensor("k", k, shape=(batch, seqlen, None, headdim), dtype=q.dtype)
    check_tensor("v", v, shape=tuple(k.shape), dtype=q.dtype)
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    nheads_kv = k.shape[2]
    if nheads_kv == 0 or nheads % nheads_kv != 0:
        raise ValueError(f"q has {nheads} heads, which must be a multiple of the {nheads_kv} heads of k and v")
    if not _compiling():
        check_cu_seqlens(cu_seqlens, seqlen, batch)


def _packed_mask(cu_seqlens: torch.Tensor, seqlen: int, causal: bool) -> torch.Tensor:
    """(L, L) bool: True where query i may attend key j (same sequence, and j <= i if causal)."""
    seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)[0]
    mask = seq_idx[:, None] == seq_idx[None, :]
    if causal:
        pos = torch.arange(seqlen, device=cu_seqlens.device)
        mask = mask & (pos[:, None] >= pos[None, :])
    return mask


def attention_ref(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """Reference attention (fp32 math, output in q's dtype). Shapes as in ``attention``."""
    _check_qkv(q, k, v, cu_seqlens)
    seqlen, nheads, headdim = q.shape[1:]
    groups = nheads // k.shape[2]
    scale = headdim**-0.5 if softmax_scale is None else softmax_scale
    k_rep = repeat(k.float(), "b l hkv p -> b l (hkv g) p", g=groups)
    v_rep = repeat(v.float(), "b l hkv p -> b l (hkv g) p", g=groups)
    scores = torch.einsum("bihp,bjhp->bhij", q.float(), k_rep) * scale
    if cu_seqlens is not None:
        allowed = _packed_mask(cu_seqlens, seqlen, causal)
    else:
        allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhp->bihp", probs, v_rep).to(q.dtype)


def _sdpa(q, k, v, *, causal, scale, attn_mask=None):
    """torch SDPA on (B, L, H, P) tensors."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=causal and attn_mask is None,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _flex_attention_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled FlexAttention materialises the scores; on CUDA compile it into a fused kernel
    # (default dynamic setting: after a second packed length it compiles a length-generic kernel).
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


# Compiled FlexAttention (CUDA) lowers only head dims of 16 and more (Inductor: "NYI: embedding
# dimension ... must be at least 16"); smaller heads take the masked SDPA path.
_FLEX_MIN_HEADDIM_CUDA = 16


def _use_flex(device_type: str, headdim: int) -> bool:
    return device_type != "cuda" or headdim >= _FLEX_MIN_HEADDIM_CUDA


def _flex_packed(q, k, v, cu_seqlens, *, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    seqlen = q.shape[1]
    seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)[0]

    def document_mask(b, h, q_idx, kv_idx):
        same = seq_idx[q_idx] == seq_idx[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    block_mask = create_block_mask(document_mask, None, None, seqlen, seqlen, device=q.device)
    out = _flex_attention_fn(q.device.type)(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, *, causal, scale):
    import flash_attn

    if cu_seqlens is None:
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    out = flash_attn.flash_attn_varlen_func(
        q[0], k[0], v[0], cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal
    )
    return out.unsqueeze(0)


def attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None, backend=None):
    """Self-attention with GQA and packed sequences.

    Args:
        q: (B, L, H, P).
        k, v: (B, L, Hkv, P), H % Hkv == 0, same dtype as q.
        causal: query i attends keys j <= i only.
        softmax_scale: defaults to P ** -0.5.
        cu_seqlens: (num_seqs + 1,) int32, packed sequences (B == 1); a query never attends a key
            of another sequence.
        max_seqlen: longest packed sequence (only used by flash_attn; computed when None).
        backend: "torch" | "triton" | None (see the module docstring).
    Returns:
        out (B, L, H, P), dtype of q.
    """
    _check_qkv(q, k, v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    which = resolve_backend(backend, q, k, v)
    if which == "triton":
        if flash_attn_installed() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
        if cu_seqlens is not None and _use_flex(q.device.type, q.shape[-1]):
            return _flex_packed(q, k, v, cu_seqlens, causal=causal, scale=scale)
    if cu_seqlens is not None:
        return _sdpa(q, k, v, causal=causal, scale=scale, attn_mask=_packed_mask(cu_seqlens, q.shape[1], causal))
    return _sdpa(q, k, v, causal=causal, scale=scale)


def _write_kv(k_cache, v_cache, k, v, cache_seqlens):
    """Write k, v (B, T, Hkv, P) into the caches at positions cache_seqlens + t; returns the positions (B, T)."""
    batch, steps = k.shape[:2]
    offsets = torch.arange(steps, device=k.device)
    if isinstance(cache_seqlens, int):
        k_cache[:batch, cache_seqlens : cache_seqlens + steps] = k
        v_cache[:batch, cache_seqlens : cache_seqlens + steps] = v
        return (cache_seqlens + offsets).unsqueeze(0).expand(batch, steps)
    positions = cache_seqlens.to(torch.long)[:, None] + offsets  # (B, T)
    rows = torch.arange(batch, device=k.device)[:, None].expand(batch, steps)
    k_cache.index_put_((rows, positions), k)
    v_cache.index_put_((rows, positions), v)
    return positions


def attention_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens: Union[int, torch.Tensor] = 0,
    *,
    causal=True,
    softmax_scale=None,
    backend=None,
):
    """Attention of new queries against a KV cache, after appending the new keys/values to it.

    Args:
        q: (B, T, H, P) queries of the T new tokens.
        k_cache, v_cache: (B_cache, S, Hkv, P), B_cache >= B; rows [:B] are used and updated IN PLACE.
        k, v: (B, T, Hkv, P) new keys/values, written at positions cache_seqlens[b] + t; or None
            when they are already in the cache.
        cache_seqlens: int or (B,) int32 tensor: tokens already cached per sequence.
        causal: new token t sees cache positions <= cache_seqlens[b] + t (else all up to the end).
    Returns:
        out (B, T, H, P), dtype of q.
    """
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    batch, steps, nheads, headdim = q.shape
    check_tensor("k_cache", k_cache, shape=(None, None, None, headdim), dtype=q.dtype)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=q.dtype)
    if k_cache.shape[0] < batch:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has batch {batch}")
    nheads_kv, max_len = k_cache.shape[2], k_cache.shape[1]
    if nheads % nheads_kv != 0:
        raise ValueError(f"q has {nheads} heads, which must be a multiple of the {nheads_kv} heads of k_cache")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        check_tensor("k", k, shape=(batch, steps, nheads_kv, headdim), dtype=q.dtype)
        check_tensor("v", v, shape=(batch, steps, nheads_kv, headdim), dtype=q.dtype)
    if isinstance(cache_seqlens, torch.Tensor):
        check_tensor("cache_seqlens", cache_seqlens, shape=(batch,), dtype=(torch.int32, torch.int64))
    elif not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool) or cache_seqlens < 0:
        raise TypeError(f"cache_seqlens must be an int >= 0 or a (B,) int32 tensor, got {cache_seqlens!r}")
    elif cache_seqlens + (steps if k is not None else 0) > max_len:
        raise ValueError(f"cache of length {max_len} cannot hold {cache_seqlens} + {steps} tokens")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    scale = headdim**-0.5 if softmax_scale is None else softmax_scale
    which = resolve_backend(backend, q, k_cache)

    if which == "triton" and flash_attn_installed() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        import flash_attn

        seqlens = cache_seqlens
        if isinstance(seqlens, torch.Tensor):
            seqlens = seqlens.to(torch.int32)
        return flash_attn.flash_attn_with_kvcache(
            q, k_cache[:batch], v_cache[:batch], k, v, cache_seqlens=seqlens, softmax_scale=scale, causal=causal
        )

    new_tokens = steps if k is not None else 0
    if k is not None:
        _write_kv(k_cache, v_cache, k, v, cache_seqlens)
    if isinstance(cache_seqlens, int):
        # Static length: attend only over the filled part of the cache.
        total = cache_seqlens + new_tokens
        keys, values = k_cache[:batch, :total], v_cache[:batch, :total]
        if steps == 1 or not causal:
            # One new token (or no causality) sees the whole filled cache: no mask needed.
            return _sdpa(q, keys, values, causal=False, scale=scale)
        first = total - steps  # absolute position of query 0 (queries are the last T cached tokens)
        key_pos = torch.arange(total, device=q.device)
        query_pos = first + torch.arange(steps, device=q.device)
        mask = (key_pos[None, :] <= query_pos[:, None]).expand(batch, 1, steps, total)
    else:
        # Per-sequence lengths: attend over the whole cache with a mask, so that shapes stay
        # static (CUDA-graph safe); unwritten positions are masked out.
        keys, values = k_cache[:batch], v_cache[:batch]
        ends = cache_seqlens.to(torch.long) + new_tokens  # (B,)
        query_pos = ends[:, None] - steps + torch.arange(steps, device=q.device)  # (B, T)
        key_pos = torch.arange(max_len, device=q.device)
        if causal:
            allowed = key_pos[None, None, :] <= query_pos[:, :, None]
        else:
            allowed = (key_pos[None, :] < ends[:, None])[:, None, :].expand(batch, steps, max_len)
        mask = allowed[:, None]
    return _sdpa(q, keys, values, causal=False, scale=scale, attn_mask=mask)
