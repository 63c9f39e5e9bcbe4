"""Causal depthwise conv1d, for sequences and for decode steps.

    out[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * xpad[b, d, t + k])

x (B, D, L), weight (D, W) with W in 2..8, bias (D,), act = identity or silu, and
xpad (B, D, W-1+L) = [initial_states (B, D, W-1) or zeros ; x]. The final state is the
last W-1 columns of xpad (the inputs a continuation needs).

Packed sequences (``seq_idx`` (B, L) or ``cu_seqlens`` (num_seqs+1,)) never mix: an
input only reaches outputs of its own sequence. With ``cu_seqlens`` every sequence has
its own initial / final state (num_seqs, D, W-1). With ``seq_idx`` the one state per
row belongs to the row's first (initial) and last (final) sequence.

``causal_conv1d_update`` runs T new tokens against a rolling ``conv_state``
(B_state, D, S), S >= W-1, holding the last S inputs oldest first (or, with
``cache_seqlens``, a circular buffer), and updates it in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    resolve_backend,
    seq_idx_from_cu_seqlens,
)

ACTIVATIONS = (None, "silu", "swish")
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_activation(activation) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _conv_dense_ref(x, weight, bias, initial_states, seq_idx, apply_silu):
    """One row batch, no cu_seqlens. Returns (out fp32, xpad fp32, seqpad or None)."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    xf = x.float()
    if initial_states is None:
        initial = xf.new_zeros(batch, dim, width - 1)
    else:
        initial = initial_states.float()
    xpad = torch.cat([initial, xf], dim=-1)  # (B, D, W-1+L)
    seqpad = None
    if seq_idx is not None:
        # The initial state belongs to the row's first sequence.
        seqpad = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)  # (B, W-1+L)
    out = xf.new_zeros(batch, dim, length)
    wf = weight.float()
    for k in range(width):
        tap = xpad[..., k : k + length]
        if seqpad is not None:
            tap = tap * (seqpad[:, k : k + length] == seq_idx).unsqueeze(1)
        out = out + wf[:, k, None] * tap
    if bias is not None:
        out = out + bias.float()[:, None]
    if apply_silu:
        out = F.silu(out)
    return out, xpad, seqpad


def causal_conv1d_ref(
    x,
    weight,
    bias=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
    *,
    seq_idx=None,
    cu_seqlens=None,
):
    """Torch reference of :func:`causal_conv1d_fn` (fp32 math, differentiable)."""
    apply_silu = _check_activation(activation)
    width = weight.shape[1]
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for s in range(len(bounds) - 1):
            x_s = x[:, :, bounds[s] : bounds[s + 1]]
            init_s = None if initial_states is None else initial_states[s : s + 1]
            out_s, xpad_s, _ = _conv_dense_ref(x_s, weight, bias, init_s, None, apply_silu)
            outs.append(out_s)
            finals.append(xpad_s[..., xpad_s.shape[-1] - (width - 1) :])
        out = torch.cat(outs, dim=-1).to(x.dtype)
        final = torch.cat(finals, dim=0)
    else:
        out_f, xpad, seqpad = _conv_dense_ref(x, weight, bias, initial_states, seq_idx, apply_silu)
        out = out_f.to(x.dtype)
        final = xpad[..., xpad.shape[-1] - (width - 1) :]
        if seqpad is not None:
            # Only the last sequence of the row continues; older inputs are not its history.
            tail = seqpad[:, seqpad.shape[-1] - (width - 1) :]
            final = final * (tail == seqpad[:, -1:]).unsqueeze(1)
    if not return_final_states:
        return out
    final = final.to(x.dtype)
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final)
        final = final_states_out if not final.requires_grad else final
    return out, final


def _validate_conv(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, cu_seqlens):
    check_tensor("x", x, ndim=3, dtype=FLOAT_DTYPES)
    batch, dim, length = x.shape
    check_tensor("weight", weight, ndim=2, dtype=FLOAT_DTYPES)
    if weight.shape[0] != dim or not 2 <= weight.shape[1] <= 8:
        raise ValueError(f"weight must have shape (D={dim}, W) with W in 2..8, got {tuple(weight.shape)}")
    width = weight.shape[1]
    check_tensor("bias", bias, shape=(dim,), dtype=FLOAT_DTYPES, optional=True)
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError("give seq_idx or cu_seqlens, not both")
    check_tensor("seq_idx", seq_idx, shape=(batch, length), dtype=INDEX_DTYPES, optional=True)
    check_same_device(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                      final_states_out=final_states_out, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, length, batch)
    n_states = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    who = "B" if cu_seqlens is None else "num_seqs"
    if initial_states is not None:
        check_tensor(f"initial_states", initial_states, dtype=FLOAT_DTYPES)
        if tuple(initial_states.shape) != (n_states, dim, width - 1):
            raise ValueError(f"initial_states must have shape ({who}={n_states}, D={dim}, W-1={width - 1}), "
                             f"got {tuple(initial_states.shape)}")
    if final_states_out is not None:
        if not return_final_states:
            raise ValueError("final_states_out is given but return_final_states=False")
        check_tensor("final_states_out", final_states_out, dtype=FLOAT_DTYPES)
        if tuple(final_states_out.shape) != (n_states, dim, width - 1):
            raise ValueError(f"final_states_out must have shape ({who}={n_states}, D={dim}, W-1={width - 1}), "
                             f"got {tuple(final_states_out.shape)}")


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
    *,
    cu_seqlens=None,
    backend=None,
):
    """Causal depthwise conv1d over a sequence (see the module header for the formula).

    Args:
        x: (B, D, L), contiguous or channel-last (``x.transpose(1, 2)`` contiguous).
        weight: (D, W), W in 2..8.
        bias: (D,) or None.
        seq_idx: (B, L) int32, sequence index of each position (packed rows); inputs
            never reach outputs of another sequence.
        initial_states: (B, D, W-1) (with cu_seqlens: (num_seqs, D, W-1)), the W-1
            inputs before position 0; zeros if None. Gets gradients.
        return_final_states: also return the last W-1 inputs, (B, D, W-1)
            (with cu_seqlens: (num_seqs, D, W-1)), dtype of x.
        final_states_out: optional tensor of that shape to write the final states into.
        activation: None, "silu" or "swish" (= silu).
        cu_seqlens: (num_seqs + 1,) int32 packed-sequence boundaries; needs B == 1.
        backend: "torch", "triton" or None (auto).

    Returns:
        out (B, D, L) in the dtype and memory layout of x, or (out, final_states).
    """
    _check_activation(activation)
    _validate_conv(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, cu_seqlens)
    resolve_backend(backend, x, weight)
    # TODO(issue 5): Triton kernels; until they land every backend runs the reference.
    return causal_conv1d_ref(x, weight, bias, initial_states, return_final_states, final_states_out,
                             activation, seq_idx=seq_idx, cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------
# Decode: T new tokens against a rolling conv_state.
# ---------------------------------------------------------------------------


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
    """Torch reference of :func:`causal_conv1d_update`; updates ``conv_state`` in place."""
    apply_silu = _check_activation(activation)
    single = x.dim() == 2
    xt = x.unsqueeze(-1) if single else x  # (B, D, T)
    batch, dim, n_tok = xt.shape
    state_len = conv_state.shape[-1]
    width = weight.shape[1]
    if conv_state_indices is None:
        rows = torch.arange(batch, device=x.device)
        valid = torch.ones(batch, dtype=torch.bool, device=x.device)
    else:
        rows = conv_state_indices.long()
        valid = rows >= 0
        rows = rows.clamp_min(0)
    state = conv_state[rows].float()  # (B, D, S)
    if cache_seqlens is None:
        hist = torch.cat([state, xt.float()], dim=-1)  # (B, D, S+T), oldest first
        new_state = hist[..., n_tok:]
        window = hist[..., state_len - (width - 1) :]  # (B, D, W-1+T)
    else:
        # Circular buffer: logical position j lives at slot j % S; the next token is at cache_seqlens.
        pos = cache_seqlens.long()[:, None] + torch.arange(-(width - 1), 0, device=x.device)  # (B, W-1)
        past = torch.gather(state, 2, (pos % state_len)[:, None, :].expand(batch, dim, width - 1))
        window = torch.cat([past, xt.float()], dim=-1)
        slots = (cache_seqlens.long()[:, None] + torch.arange(n_tok, device=x.device)) % state_len  # (B, T)
        new_state = state.clone()
        # Only the last S of the T tokens survive a wrap; write them in order.
        keep = max(0, n_tok - state_len)
        new_state.scatter_(2, slots[:, None, keep:].expand(batch, dim, n_tok - keep), xt.float()[..., keep:])
    wf = weight.float()
    out = xt.new_zeros(batch, dim, n_tok, dtype=torch.float32)
    for k in range(width):
        out = out + wf[:, k, None] * window[..., k : k + n_tok]
    if bias is not None:
        out = out + bias.float()[:, None]
    if apply_silu:
        out = F.silu(out)
    out = out * valid[:, None, None]
    with torch.no_grad():
        idx = rows[valid]
        conv_state[idx] = new_state[valid].to(conv_state.dtype)
    out = out.to(x.dtype)
    return out.squeeze(-1) if single else out


def _validate_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices):
    check_tensor("x", x, ndim=(2, 3), dtype=FLOAT_DTYPES)
    batch, dim = x.shape[:2]
    check_tensor("weight", weight, ndim=2, dtype=FLOAT_DTYPES)
    if weight.shape[0] != dim or not 2 <= weight.shape[1] <= 8:
        raise ValueError(f"weight must have shape (D={dim}, W) with W in 2..8, got {tuple(weight.shape)}")
    width = weight.shape[1]
    check_tensor("conv_state", conv_state, ndim=3, dtype=FLOAT_DTYPES)
    if conv_state.shape[1] != dim or conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state must have shape (B_state, D={dim}, S) with S >= W-1={width - 1}, "
                         f"got {tuple(conv_state.shape)}")
    check_tensor("bias", bias, shape=(dim,), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("cache_seqlens", cache_seqlens, shape=(batch,), dtype=INDEX_DTYPES, optional=True)
    check_tensor("conv_state_indices", conv_state_indices, shape=(batch,), dtype=INDEX_DTYPES, optional=True)
    if conv_state_indices is None and conv_state.shape[0] != batch:
        raise ValueError(f"conv_state must have batch B={batch} when conv_state_indices is None, "
                         f"got shape {tuple(conv_state.shape)}")
    check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                      conv_state_indices=conv_state_indices)
    if conv_state_indices is not None and conv_state_indices.numel() > 0:
        top = int(conv_state_indices.max())
        if top >= conv_state.shape[0]:
            raise ValueError(f"conv_state_indices holds {top} but conv_state has only {conv_state.shape[0]} rows")


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, *, backend=None):
    """Causal conv1d over T new tokens, continuing from ``conv_state`` (updated in place).

    Args:
        x: (B, D) one token or (B, D, T) T tokens per sequence.
        conv_state: (B_state, D, S), S >= W-1: the last S inputs, oldest first; after the
            call it holds the last S inputs including the new tokens. With ``cache_seqlens``
            it is a circular buffer instead: input at position j is stored at slot j % S.
        weight: (D, W), W in 2..8.  bias: (D,) or None.  activation: None | "silu" | "swish".
        cache_seqlens: (B,) int32, number of tokens already in each sequence (circular mode).
            The caller advances it.
        conv_state_indices: (B,) int32, row of conv_state for each sequence; a negative
            index is a padding slot: no state is touched and its output is zero.
        backend: "torch", "triton" or None (auto).

    Returns:
        out shaped like x.
    """
    _check_activation(activation)
    _validate_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    resolve_backend(backend, x, conv_state)
    # TODO(issue 5): Triton kernel; until it lands every backend runs the reference.
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
