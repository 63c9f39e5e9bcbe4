"""Mamba-2 SSD (state-space duality): the torch specification.

Per head h, with a scalar decay a_t = exp(dt_t * A_h) and a state S (P, N):

    S_t = a_t * S_{t-1} + dt_t * x_t B_t^T            x_t (P,), B_t, C_t (N,)
    y_t = S_t C_t + D_h * x_t,   out_t = y_t * silu(z_t)  (when z is given)

Shapes: x (B, L, H, P), dt (B, L, H), A (H,), B/C (B, L, G, N) with head h reading
group h // (H / G), states (B, H, P, N).

The chunked ("dual") form splits L into chunks of Q steps. Inside a chunk the
output is a masked matrix product (C B^T weighted by the decay between the two
positions); across chunks only the (P, N) state is carried. ``ssd_minimal`` is
that algorithm in a few einsums; ``mamba_chunk_scan_combined_ref`` adds the
mamba_ssm options around it (dt processing, groups, D, z, packed sequences).
Everything is computed in fp32; outputs come back in x.dtype, states in fp32.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Pairwise sums of a decay sequence: (..., T) -> (..., T, T).

    out[..., i, j] = a[j+1] + ... + a[i] for i >= j (0 on the diagonal), -inf above
    the diagonal, so that exp(out) is the causal decay matrix.
    """
    T = a.size(-1)
    # Sum a masked copy instead of differencing a cumsum: differences of large
    # cumulative sums lose precision for long chunks.
    a_rep = repeat(a, "... i -> ... i j", j=T)
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    summed = torch.cumsum(a_rep.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return summed.masked_fill(~lower, float("-inf"))


def _mm(equation, *operands, matmul_dtype=None):
    """einsum; with matmul_dtype the operands are rounded to it first (fp32 result)."""
    if matmul_dtype is None:
        return torch.einsum(equation, *operands)
    return torch.einsum(equation, *(t.to(matmul_dtype) for t in operands)).float()


def ssd_minimal(X, A, B, C, block_len: int, initial_states=None, *, matmul_dtype=None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm, minimal form.

    X: (B, L, H, P) input already scaled by dt; A: (B, L, H) log-decay (dt * A);
    B, C: (B, L, H, N); initial_states: (B, H, P, N) or None. L must be a
    multiple of ``block_len``. Returns Y (B, L, H, P) and the final state
    (B, H, P, N), in the dtype of X. ``matmul_dtype`` (e.g. torch.bfloat16)
    rounds the operands of the matrix products inside a chunk, as a tensor-core
    kernel does: the tests use it as the low-precision baseline.
    """
    if X.size(1) % block_len != 0:
        raise ValueError(f"ssd_minimal: L={X.size(1)} must be a multiple of block_len={block_len}")
    X, B, C = (rearrange(t, "b (c q) h d -> b c q h d", q=block_len) for t in (X, B, C))
    A = rearrange(A, "b (c q) h -> b h c q", q=block_len)
    A_cumsum = torch.cumsum(A, dim=-1)  # (B, H, C, Q)

    # 1. Inside each chunk: y_t = sum_{s <= t} (C_t . B_s) exp(A_s+1 + ... + A_t) x_s.
    decay_in = torch.exp(segsum(A))  # (B, H, C, Q, Q)
    mm = functools.partial(_mm, matmul_dtype=matmul_dtype)
    scores = mm("bclhn,bcshn->bhcls", C, B) * decay_in
    Y_diag = mm("bhcls,bcshp->bclhp", scores, X)

    # 2. The state each chunk produces on its own (started from zero).
    decay_to_end = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (B, H, C, Q)
    chunk_states = mm("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)

    # 3. Carry states across chunks: a recurrence over C chunks, written as one
    #    decay-weighted sum so that it stays a single einsum.
    if initial_states is None:
        initial_states = torch.zeros_like(chunk_states[:, :1])
    else:
        initial_states = initial_states.unsqueeze(1).to(chunk_states.dtype)
    chunk_states = torch.cat([initial_states, chunk_states], dim=1)  # (B, C+1, H, P, N)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (B, H, C+1, C+1)
    carried = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, chunk_states)
    states_in, final_state = carried[:, :-1], carried[:, -1]

    # 4. What the state entering each chunk contributes to that chunk's outputs.
    Y_off = mm("bclhn,bchpn,bhcl->bclhp", C, states_in, torch.exp(A_cumsum))

    Y = rearrange(Y_diag + Y_off, "b c q h p -> b (c q) h p")
    return Y, final_state


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    """dt (B, L, H) -> fp32 step sizes: + dt_bias, softplus, then clamp to dt_limit."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _ssd_segment(x, dt, A, B, C, chunk_size, initial_state, matmul_dtype=None):
    """Run one packed-free stretch: fp32 x (b, l, h, p), dt (b, l, h), B/C (b, l, h, n).

    L need not be a multiple of chunk_size: padding with dt = 0 adds steps that
    neither decay the state nor write to it, so the final state is unchanged.
    """
    L = x.size(1)
    pad = (-L) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    y, final = ssd_minimal(x * dt.unsqueeze(-1), dt * A, B, C, chunk_size, initial_state, matmul_dtype=matmul_dtype)
    return y[:, :L], final


def _segments_from_seq_idx(seq_idx_row: torch.Tensor) -> List[int]:
    """Start offsets of the runs of equal values in one row, plus the row length."""
    values = seq_idx_row.tolist()
    starts = [0] + [t for t in range(1, len(values)) if values[t] != values[t - 1]]
    return starts + [len(values)]


def mamba_chunk_scan_combined_ref(
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
    matmul_dtype=None,
):
    """Torch reference of ``mamba_chunk_scan_combined`` (same arguments and returns).

    ``matmul_dtype`` rounds the matrix-product operands inside chunks (see
    ``ssd_minimal``); None (the default) keeps everything in fp32.

    Inputs are assumed valid (the public function checks them). A change of
    ``seq_idx`` between two neighbouring positions starts a new sequence from a
    zero state; ``initial_states`` (B, H, P, N) feeds the first run of each row.
    With ``cu_seqlens`` (batch 1) each packed sequence i starts from
    ``initial_states[i]`` (shape (num_seqs, H, P, N)) and its final state is
    row i of ``varlen_states``.
    """
    batch, _, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x_f = x.float()
    dt_f = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    A_f = A.float()
    # Head h reads group h // (H / G).
    B_f = repeat(B.float(), "b l g n -> b l (g r) n", r=H // G)
    C_f = repeat(C.float(), "b l g n -> b l (g r) n", r=H // G)

    varlen_states = None
    if cu_seqlens is None and seq_idx is None:
        y, final_states = _ssd_segment(x_f, dt_f, A_f, B_f, C_f, chunk_size, initial_states, matmul_dtype)
    else:
        ys, finals, seq_finals = [], [], []
        for b in range(batch):
            if cu_seqlens is not None:
                bounds = [int(v) for v in cu_seqlens.tolist()]
            else:
                bounds = _segments_from_seq_idx(seq_idx[b])
            state = None
            row = []
            for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
                if cu_seqlens is not None:
                    init = None if initial_states is None else initial_states[i]
                else:
                    init = initial_states[b] if (initial_states is not None and i == 0) else None
                if end == start:  # an empty packed sequence keeps its initial state
                    state = torch.zeros(H, P, N, device=x.device) if init is None else init.float()
                else:
                    sl = slice(start, end)
                    y_seg, state = _ssd_segment(
                        x_f[b : b + 1, sl], dt_f[b : b + 1, sl], A_f, B_f[b : b + 1, sl], C_f[b : b + 1, sl],
                        chunk_size, None if init is None else init.unsqueeze(0), matmul_dtype,
                    )
                    row.append(y_seg)
                    state = state[0]
                seq_finals.append(state)
            ys.append(torch.cat(row, dim=1))
            finals.append(state)
        y = torch.cat(ys, dim=0)
        final_states = torch.stack(finals, dim=0)
        if cu_seqlens is not None:
            varlen_states = torch.stack(seq_finals, dim=0)

    if D is not None:
        D_f = D.float()
        y = y + x_f * (D_f.unsqueeze(-1) if D_f.dim() == 1 else D_f)
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(x.dtype)
    final_states = final_states.float()

    result = (out,)
    if return_final_states:
        result += (final_states,)
    if return_varlen_states:
        result += (varlen_states.float(),)
    return result[0] if len(result) == 1 else result
