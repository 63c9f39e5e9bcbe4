"""Mamba-1 selective scan.

Per channel d, with a diagonal state h (N,) and input-dependent B_t, C_t (N,):

    dt_t  = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        A (D, N), real
    y_t   = C_t . h_t + D * u_t
    out_t = y_t * silu(z_t)                            (only if z is given)

Shapes: u, delta, z (B, D, L); A (D, N); B, C (D, N) fixed, or (B, N, L), or
(B, G, N, L) with channel d reading group d // (D / G); D, delta_bias (D,);
states (B, D, N) fp32. Packed sequences: batch 1 and ``cu_seqlens``
(num_seqs + 1,); every sequence starts from zero (or its own initial state) and
``last_state`` is (num_seqs, D, N). Math in fp32, out in u.dtype.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    resolve_backend,
)

MAX_DSTATE = 256
# Steps per chunk of the reference: the scan inside a chunk is vectorised, the
# state is carried across chunks in a Python loop of L / REF_CHUNK iterations.
REF_CHUNK = 64


# ---------------------------------------------------------------------------
# Input checks (shared by the reference and the kernels)
# ---------------------------------------------------------------------------


def _check_bc(name: str, t, batch: int, dim: int, dstate: int, seqlen: int) -> None:
    check_tensor(name, t, ndim=(2, 3, 4), dtype=FLOAT_DTYPES)
    if t.dim() == 2:
        check_tensor(name, t, shape=(dim, dstate))
    elif t.dim() == 3:
        check_tensor(name, t, shape=(batch, dstate, seqlen))
    else:
        check_tensor(name, t, shape=(batch, None, dstate, seqlen))
        groups = t.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"{name} (B, G, N, L) has G={groups} groups, which must divide D={dim}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens) -> int:
    """Validate every argument; returns the number of sequences (batch, or packed sequences)."""
    check_tensor("u", u, ndim=3, dtype=FLOAT_DTYPES)
    batch, dim, seqlen = u.shape
    check_tensor("delta", delta, shape=(batch, dim, seqlen), dtype=u.dtype)
    check_tensor("A", A, ndim=2, dtype=torch.float32)
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) = ({dim}, N), got {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"A has state size N={dstate}; supported: 1 <= N <= {MAX_DSTATE}")
    _check_bc("B", B, batch, dim, dstate, seqlen)
    _check_bc("C", C, batch, dim, dstate, seqlen)
    check_tensor("D", D, shape=(dim,), dtype=torch.float32, optional=True)
    check_tensor("z", z, shape=(batch, dim, seqlen), dtype=u.dtype, optional=True)
    check_tensor("delta_bias", delta_bias, shape=(dim,), dtype=torch.float32, optional=True)
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, seqlen, batch)
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    check_tensor("initial_state", initial_state, shape=(num_seqs, dim, dstate), dtype=torch.float32, optional=True)
    return num_seqs


def _expand_bc(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (B, D, N, L) (input-dependent) or (D, N) (fixed), fp32."""
    t = t.float()
    if t.dim() == 3:
        return t.unsqueeze(1)  # (B, 1, N, L) broadcasts over D
    if t.dim() == 4:
        return t.repeat_interleave(dim // t.shape[1], dim=1)  # (B, D, N, L)
    return t


# ---------------------------------------------------------------------------
# Reference (the spec; torch, fp32, differentiable by autograd)
# ---------------------------------------------------------------------------


def _scan_chunk(decay: torch.Tensor, inp: torch.Tensor):
    """Inclusive scan h_t = decay_t * h_{t-1} + inp_t from h_{-1} = 0 along dim 2.

    decay, inp: (B, D, T, N). Returns (prod, h): prod_t = decay_1 ... decay_t and the
    zero-start states, by log2(T) doubling steps (Hillis-Steele) of tensor ops.
    Products of decays stay bounded where cumulative sums of logs would overflow
    when subtracted.
    """
    T = decay.shape[2]
    step = 1
    while step < T:
        h_prev = F.pad(inp[:, :, :-step], (0, 0, step, 0))
        d_prev = F.pad(decay[:, :, :-step], (0, 0, step, 0), value=1.0)
        inp = inp + decay * h_prev
        decay = decay * d_prev
        step *= 2
    return decay, inp


def _reset_at_starts(decay, inp, local, initial_state):
    """Packed sequences (batch 1): at each local start position p of sequence i,
    h_p = decay_p * h0_i + inp_p instead of continuing the previous sequence."""
    pos = torch.tensor([p for _, p in local], device=decay.device)
    if initial_state is not None:
        idx = torch.tensor([i for i, _ in local], device=decay.device)
        carried = decay[:, :, pos] * rearrange(initial_state.float()[idx], "s d n -> 1 d s n")
        inp = inp.index_add(2, pos, carried)
    keep = torch.ones(decay.shape[2], device=decay.device, dtype=decay.dtype).index_fill(0, pos, 0.0)
    return decay * keep[:, None], inp


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None, cu_seqlens=None):
    """Torch reference of :func:`selective_scan_fn` (same arguments, fp32 math)."""
    num_seqs = _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    dtype_in = u.dtype
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u_f, delta_f = u.float(), delta.float()
    if delta_bias is not None:
        delta_f = delta_f + delta_bias.float()[:, None]
    if delta_softplus:
        delta_f = F.softplus(delta_f)
    B_f, C_f = _expand_bc(B, dim), _expand_bc(C, dim)

    # Packed sequences: a sequence start resets the state (decay 0) and injects
    # that sequence's initial state through its first step's input.
    starts: List[Tuple[int, int]] = []  # (sequence, first position)
    ends: List[Tuple[int, int]] = []  # (sequence, last position)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        for i in range(num_seqs):
            if bounds[i + 1] > bounds[i]:
                starts.append((i, bounds[i]))
                ends.append((i, bounds[i + 1] - 1))
    h = torch.zeros(batch, dim, dstate, device=u.device, dtype=torch.float32)
    if initial_state is not None and cu_seqlens is None:
        h = initial_state.float()
    A_f = A.float()
    last_states: list = [None] * num_seqs
    ys = []
    for c0 in range(0, seqlen, REF_CHUNK):
        c1 = min(c0 + REF_CHUNK, seqlen)
        dt = delta_f[:, :, c0:c1]  # (B, D, T)
        decay = torch.exp(dt.unsqueeze(-1) * A_f[:, None, :])  # (B, D, T, N)
        B_c = rearrange(B_f[..., c0:c1], "b d n t -> b d t n") if B_f.dim() == 4 else B_f[None, :, None]
        C_c = rearrange(C_f[..., c0:c1], "b d n t -> b d t n") if C_f.dim() == 4 else C_f[None, :, None]
        inp = (dt * u_f[:, :, c0:c1]).unsqueeze(-1) * B_c  # (B, D, T, N)
        local = [(i, s - c0) for i, s in starts if c0 <= s < c1]
        if local:
            decay, inp = _reset_at_starts(decay, inp, local, initial_state)
        prod, hs = _scan_chunk(decay, inp)
        hs = hs + prod * h.unsqueeze(2)  # (B, D, T, N)
        h = hs[:, :, -1]
        for i, e in ends:
            if c0 <= e < c1:
                last_states[i] = hs[0, :, e - c0]
        ys.append((hs * C_c).sum(-1))  # (B, D, T)
    y = torch.cat(ys, dim=2) if ys else u_f.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.float()[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    if not return_last_state:
        return out
    if cu_seqlens is None:
        last = h
    else:
        zero = torch.zeros(dim, dstate, device=u.device, dtype=torch.float32)
        last = torch.stack([
            s if s is not None else (initial_state[i].float() if initial_state is not None else zero)
            for i, s in enumerate(last_states)
        ])
    return out, last


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, cu_seqlens=None, backend=None):
    """Mamba-1 selective scan (see the module header for the recurrence).

    Args:
        u: (B, D, L) fp32 / fp16 / bf16 input.
        delta: (B, D, L) step sizes, same dtype as u.
        A: (D, N) fp32, real; N <= 256.
        B, C: (D, N) fixed, (B, N, L), or (B, G, N, L) with G dividing D (channel d uses
            group d // (D / G)); any float dtype.
        D: optional (D,) fp32 skip weight.
        z: optional (B, D, L) gate, same dtype as u: out = (y + D * u) * silu(z).
        delta_bias: optional (D,) fp32 added to delta before the softplus.
        delta_softplus: apply softplus to delta (+ delta_bias).
        return_last_state: also return the final state.
        initial_state: optional (B, D, N) fp32 state before the first step
            ((num_seqs, D, N) with cu_seqlens); differentiable.
        cu_seqlens: optional (num_seqs + 1,) int32/int64 boundaries of packed sequences
            (batch must be 1); each sequence starts from zero or its own initial state.
        backend: "torch" | "triton" | None (see mamba_pkg.ops.backend).

    Returns:
        out (B, D, L) in u.dtype, and with return_last_state=True also
        last_state (B, D, N) fp32 ((num_seqs, D, N) with cu_seqlens), differentiable.
    """
    which = resolve_backend(backend, u, delta, A, B, C, D, z, delta_bias, initial_state)
    if which == "torch":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state, cu_seqlens=cu_seqlens)
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    # TODO(issue 3): the Triton kernels.
    raise NotImplementedError("selective_scan_fn: the triton backend is not implemented yet; use backend='torch'")
