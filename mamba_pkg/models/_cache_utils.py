"""Glue shared by the mixers: input checks, which cache rows a call uses, conv states.

A conv state (B, D, W) holds the last W inputs of the causal conv (oldest first, zeros
before the sequence start), the layout causal_conv1d_update expects.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mamba_pkg.ops.backend import FLOAT_DTYPES, check_cu_seqlens, check_tensor
from mamba_pkg.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_pkg.ops import decode_linear as _dl
from mamba_pkg.ops.decode_linear import decode_linear

# Decode steps of at most this many rows use decode_linear for in_proj / out_proj. It streams
# the weight once in one launch; it re-reads x per program, so it is meant for batch 1-2
# (at batch 3-8 cuBLAS's GEMM wins). 0 switches it off.
STEP_LINEAR_MAX_ROWS = 2
# From 9 rows up to this many, 16-bit layers of at least STEP_DOT_MIN_WEIGHT weights that are wide
# enough for decode_linear's tl.dot kernel (dot_config: split-K in one launch) use it instead of
# cuBLAS (whose split-K GEMMs take a second launch for the reduction and do not chain by PDL). 0: off.
# H100 b64 whole step (graph replay, same process, session 9): mamba-1.4b 2.649 ms vs 2.801 (in_proj
# with the conv folded in and out_proj by the tl.dot kernel, x_proj cuBLAS); mamba2-1.3b 4.463 vs 4.462.
# The 130m models' products (2.6M weights and less, latency-bound) lost with 64 features per program
# (mamba-130m 0.760 vs 0.739) and win with 32 (decode_linear.DOT_SMALL_BLOCK_N) and the block's add +
# RMSNorm chained with them (STEP_NORM_ROWS): session 10, mamba2-130m 0.995 vs 1.073 ms, mamba-130m
# 0.789 vs 0.820; so no weight minimum now (0).
STEP_DOT_MAX_ROWS = 64
STEP_DOT_MIN_WEIGHT = 0
# Decode steps of more than STEP_LINEAR_MAX_ROWS rows (up to decode_linear.MAX_ROWS) run the block's
# residual add + RMSNorm as decode_linear.add_rms_norm_rows, a row kernel chained by programmatic
# dependent launch with the step's tl.dot products on both sides (the fused add + norm of ops/norm.py
# is a full stop in that chain). H100 b64 whole steps (graph replay, same process, session 10):
# mamba-1.4b 2.753 vs 2.786 ms, mamba2-130m 0.995 vs 1.008 and mamba-130m 0.789 vs 0.810 (with the
# 32-feature products), mamba2-1.3b 4.495 vs 4.472 (within noise). False: off.
STEP_NORM_ROWS = True
# Blocks of at most this width fold their add + RMSNorm into the in_proj of a decode step of
# <= STEP_LINEAR_MAX_ROWS rows (decode_linear.add_rms_norm_linear): each program re-reads the
# input row. Without programmatic dependent launch this lost at d_model 2048 (mamba-1.4b step
# 1.898 vs 1.860 ms); with it the separate norm kernel is a full stop in an otherwise overlapped
# chain, and folding wins there too (H100 graph replay, mamba-1.4b b1: 1.409 vs 1.575 ms).
# 0 switches it off.
STEP_NORM_MAX_DIM = 4096
# Likewise Mamba-2's gated RMSNorm folds into its out_proj (decode_linear.gated_rms_norm_linear)
# up to this d_ssm (the out_proj input width; mamba2-130m 1536, mamba2-1.3b 4096: with PDL
# 1.613 vs 1.697 ms per step at 4096). 0 switches it off.
STEP_GATED_NORM_MAX_DIM = 4096


def check_mixer_input(name: str, x, d_model: int, cu_seqlens=None) -> None:
    """A mixer's input must be (B, L, d_model) float; cu_seqlens, if given, must pack it (B == 1)."""
    check_tensor(name, x, shape=(None, None, d_model), dtype=FLOAT_DTYPES)
    check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])


def cache_rows(inference_params, batch: int, cache: tuple) -> tuple:
    """Views of this call's rows [batch_size_offset, batch_size_offset + batch) of each cache tensor."""
    start = inference_params.batch_size_offset
    rows = []
    for t in cache:
        if t is None:
            rows.append(None)
            continue
        if start + batch > t.shape[0]:
            raise ValueError(
                f"inference cache holds {t.shape[0]} sequences, but this call needs rows "
                f"[{start}, {start + batch}); allocate it with a larger batch size"
            )
        rows.append(t[start : start + batch])
    return tuple(rows)


def last_inputs(x: torch.Tensor, width: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Conv state after a prefill: the last ``width`` columns of x, zero-padded on the left.

    x: (B, D, L). Without cu_seqlens returns (B, D, width). With cu_seqlens (num_seqs + 1,)
    (B == 1) returns (num_seqs, D, width), each sequence's own last inputs (no host sync).
    """
    if cu_seqlens is None:
        return F.pad(x, (width - x.shape[-1], 0))
    cu = cu_seqlens.to(torch.long)
    idx = cu[1:, None] - width + torch.arange(width, device=x.device)  # (S, W)
    valid = idx >= cu[:-1, None]
    gathered = x[0][:, idx.clamp(min=0)]  # (D, S, W)
    return (gathered * valid.to(x.dtype)).permute(1, 0, 2)


def positions_in_sequence(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(L,) long: each packed token's position inside its own sequence."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=seqlen)
    return torch.arange(seqlen, device=cu_seqlens.device) - starts


def layer_cache(module, inference_params, batch: int) -> tuple:
    """This call's rows of ``module``'s cache in ``inference_params``, allocated on first use.

    The cache is allocated for ``inference_params.max_batch_size`` sequences with the module's
    own ``allocate_inference_cache``; ``module.layer_idx`` is the key.
    """
    if module.layer_idx is None:
        raise ValueError(f"{type(module).__name__} needs layer_idx (constructor argument) to use an inference cache")
    memory = inference_params.key_value_memory_dict
    if module.layer_idx not in memory:
        memory[module.layer_idx] = module.allocate_inference_cache(
            max(inference_params.max_batch_size, inference_params.batch_size_offset + batch), inference_params.max_seqlen
        )
    return cache_rows(inference_params, batch, memory[module.layer_idx])


def conv_with_cache(x, weight, bias, activation, conv_state=None, *, fresh=True, cu_seqlens=None, seq_idx=None):
    """Causal depthwise conv of x (B, D, L) -> (B, D, L), keeping conv_state (B, D, W) current.

    conv_state None: a plain (packed) conv; seq_idx (B, L) is only used then (no cache). fresh: a prefill from an empty cache; the state
    becomes the last W inputs (per sequence with cu_seqlens, whose cache rows are the
    sequences). Not fresh: continue from conv_state (one token: the update op; several: the
    conv with the cached inputs as initial states), then advance it.
    """
    if conv_state is None or fresh:
        out = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation, cu_seqlens=cu_seqlens)
        if conv_state is not None:
            conv_state.copy_(last_inputs(x, conv_state.shape[-1], cu_seqlens))
        return out
    if cu_seqlens is not None:
        raise ValueError("packed sequences (cu_seqlens) can only be prefilled from an empty cache (seqlen_offset == 0)")
    if x.shape[-1] == 1:
        return causal_conv1d_update(x[..., 0], conv_state, weight, bias, activation).unsqueeze(-1)
    out = causal_conv1d_fn(x, weight, bias, initial_states=conv_state[..., -(weight.shape[1] - 1) :], activation=activation)
    conv_state.copy_(last_inputs(torch.cat([conv_state, x], dim=-1), conv_state.shape[-1]))
    return out


def plain_linear(layer) -> bool:
    """True when calling ``layer`` is nothing but its matrix product: no forward hooks (tensor
    parallelism all-reduces through them) and plain-tensor weights (not DTensors), so a fused
    kernel may read its weight directly."""
    return not (layer._forward_hooks or layer._forward_pre_hooks) and type(layer.weight.data) is torch.Tensor


def dot_rows(layer, rows: int, dtype: torch.dtype) -> bool:
    """A decode step of ``rows`` rows of ``dtype`` takes decode_linear's tl.dot kernel for ``layer``:
    16-bit x and weight of one dtype, SMALL_ROWS < rows <= STEP_DOT_MAX_ROWS, at least
    STEP_DOT_MIN_WEIGHT weights, programs enough (dot_config), a plain layer."""
    return (_dl.SMALL_ROWS < rows <= min(STEP_DOT_MAX_ROWS, _dl.MAX_ROWS) and dtype == layer.weight.dtype
            and dtype in (torch.bfloat16, torch.float16) and layer.weight.numel() >= STEP_DOT_MIN_WEIGHT
            and _dl.dot_config(layer.out_features, layer.in_features) is not None and plain_linear(layer))


def step_linear(layer, x: torch.Tensor, dot: bool = True) -> torch.Tensor:
    """``layer(x)`` for a decode step, x (B, in_features): up to STEP_LINEAR_MAX_ROWS rows one
    decode_linear launch (cuBLAS takes two at batch 1: split-K GEMM + reduction); with ``dot``, rows
    in dot_rows decode_linear's tl.dot kernel; else the layer (cuBLAS)."""
    if x.shape[0] <= STEP_LINEAR_MAX_ROWS and plain_linear(layer):
        return decode_linear(x, layer.weight, layer.bias)
    if dot and dot_rows(layer, x.shape[0], x.dtype):
        return decode_linear(x, layer.weight, layer.bias)
    return layer(x)
