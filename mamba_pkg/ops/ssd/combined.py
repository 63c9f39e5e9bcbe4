"""Mamba-2 SSD public entry points: input checks, then the torch or Triton path.

``mamba_chunk_scan_combined``: the chunked SSD scan (formula and shapes in
reference.py). ``mamba_split_conv1d_scan_combined``: the whole Mamba-2 mixer
after in_proj (split -> causal conv1d + silu -> SSD -> gated RMSNorm -> out_proj).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    resolve_backend,
    seq_idx_from_cu_seqlens,
)
from mamba_pkg.ops.ssd.reference import mamba_chunk_scan_combined_ref

INT_DTYPES = (torch.int32, torch.int64)


def _check_dt_limit(dt_limit) -> tuple:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of floats (min, max), got {dt_limit!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi or lo < 0:
        raise ValueError(f"dt_limit must satisfy 0 <= min <= max, got {dt_limit!r}")
    return lo, hi


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _check_seq_idx(seq_idx, batch: int, L: int, device) -> None:
    check_tensor("seq_idx", seq_idx, shape=(batch, L), dtype=INT_DTYPES, device=device, optional=True)
    if seq_idx is not None and L > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along L (one run of positions per sequence)")


def check_chunk_scan_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                            dt_limit, return_varlen_states):
    """Validate the arguments of ``mamba_chunk_scan_combined``; returns (dt_limit, num_seqs)."""
    check_tensor("x", x, ndim=4, dtype=FLOAT_DTYPES)
    batch, L, H, P = x.shape
    if L < 1 or H < 1 or P < 1:
        raise ValueError(f"x must have shape (B, L, H, P) with L, H, P >= 1, got {tuple(x.shape)}")
    device = check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                               initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    _check_chunk_size(chunk_size)
    check_tensor("dt", dt, shape=(batch, L, H), dtype=FLOAT_DTYPES)
    check_tensor("A", A, shape=(H,), dtype=FLOAT_DTYPES)
    check_tensor("B", B, ndim=4, dtype=FLOAT_DTYPES)
    if B.shape[:2] != (batch, L):
        raise ValueError(f"B must have shape (B, L, G, N) = ({batch}, {L}, G, N), got {tuple(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G < 1 or N < 1 or H % G != 0:
        raise ValueError(f"B has G={G} groups; the number of heads H={H} must be a multiple of G (and N >= 1)")
    check_tensor("C", C, shape=(batch, L, G, N), dtype=FLOAT_DTYPES)
    if D is not None:
        check_tensor("D", D, ndim=(1, 2), dtype=FLOAT_DTYPES)
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"D must have shape ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    check_tensor("z", z, shape=(batch, L, H, P), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("dt_bias", dt_bias, shape=(H,), dtype=FLOAT_DTYPES, optional=True)
    dt_limit = _check_dt_limit(dt_limit)

    num_seqs = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, L, batch)
        num_seqs = cu_seqlens.numel() - 1
        if seq_idx is not None:
            check_tensor("seq_idx", seq_idx, shape=(batch, L), dtype=INT_DTYPES)
            if not torch.equal(seq_idx.long(), seq_idx_from_cu_seqlens(cu_seqlens, L).long()):
                raise ValueError("seq_idx disagrees with cu_seqlens; pass one of them (cu_seqlens is enough)")
    else:
        _check_seq_idx(seq_idx, batch, L, device)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens (the packed sequence boundaries)")
    state_rows = batch if cu_seqlens is None else num_seqs
    want = "(B, H, P, N)" if cu_seqlens is None else "(num_seqs, H, P, N)"
    if initial_states is not None:
        check_tensor("initial_states", initial_states, ndim=4, dtype=FLOAT_DTYPES)
        if tuple(initial_states.shape) != (state_rows, H, P, N):
            raise ValueError(f"initial_states must have shape {want} = {(state_rows, H, P, N)}, "
                             f"got {tuple(initial_states.shape)}")
    return dt_limit, num_seqs


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    return_varlen_states=False,
    *,
    backend: Optional[str] = None,
):
    """Mamba-2 SSD scan over a whole sequence, chunked (mamba_ssm semantics).

    Args:
        x: (B, L, H, P) input.
        dt: (B, L, H) step sizes before dt_bias / softplus / dt_limit.
        A: (H,) decay rates (negative), fp32 recommended.
        B, C: (B, L, G, N); head h uses group h // (H / G).
        chunk_size: chunk length Q (L need not be a multiple of it).
        D: (H,) or (H, P) skip connection, out = y + D * x.
        z: (B, L, H, P) gate, out = (y + D * x) * silu(z).
        dt_bias: (H,) added to dt before softplus.
        initial_states: (B, H, P, N) (or (num_seqs, H, P, N) with cu_seqlens).
        seq_idx: (B, L) int32, non-decreasing; no state crosses a change of value,
            and initial_states feeds the first run of each row.
        cu_seqlens: (num_seqs + 1,) int32 boundaries of packed sequences (B == 1).
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (min, max) clamp of the processed dt.
        return_final_states: also return the (B, H, P, N) fp32 state after the last step.
        return_varlen_states: also return (num_seqs, H, P, N) fp32 final states of
            each packed sequence (needs cu_seqlens).
        backend: "torch" | "triton" | None (see mamba_pkg.ops.backend).

    Returns:
        out (B, L, H, P) in x.dtype; with return_final_states (out, final_states);
        with return_varlen_states the varlen states come last.
    """
    dt_limit, _ = check_chunk_scan_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                          cu_seqlens, dt_limit, return_varlen_states)
    which = resolve_backend(backend, x, dt, A, B, C)
    # TODO(issue 4): the Triton kernels replace this for backend == "triton".
    del which
    return mamba_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                         initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                         dt_softplus=dt_softplus, dt_limit=dt_limit,
                                         return_final_states=return_final_states,
                                         return_varlen_states=return_varlen_states)
