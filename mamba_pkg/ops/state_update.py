"""One (or a few) decode steps of the selective SSM recurrence, state updated in place.

For each new token, per head h, head channel p, state index n (g = group of h):

    dt'      = softplus(dt + dt_bias)            (softplus only if dt_softplus)
    state    = state * exp(A * dt') + dt' * B[g] * x
    out      = sum_n state * C[g] + D * x,   times silu(z) if z is given

Mamba-1: state (B, D, N); x, dt, z (B, D); A (D, N); B, C (B, N) or (B, G, N); D, dt_bias (D,).
Mamba-2: state (B, H, P, N); x, dt, z (B, H, P); A (H, P, N); B, C (B, G, N); D, dt_bias (H, P).
(dt, A, D, dt_bias of Mamba-2 are usually expand()s of per-head values.)
Several tokens per call: x, dt, z, B, C get a T dimension after the batch.
Internally both layouts are one: Mamba-1 with G groups is Mamba-2 with H = G, P = D / G.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_pkg.ops.backend import FLOAT_DTYPES, check_same_device, check_tensor, resolve_backend

INDEX_DTYPES = (torch.int32, torch.int64)


def _softplus(dt):
    # Same threshold as torch's softplus: above 20 it is the identity in fp32.
    return torch.where(dt <= 20.0, F.softplus(dt), dt)


def _canonical(state, x, dt, A, B, C, D, z, dt_bias):
    """Views in the Mamba-2 layout with a token axis: x (B, T, H, P), B (B, T, G, N), state (Bs, H, P, N)."""
    mamba1 = state.dim() == 3
    multi = x.dim() == (3 if mamba1 else 4)
    if not multi:
        x, dt, z = x.unsqueeze(1), dt.unsqueeze(1), None if z is None else z.unsqueeze(1)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    if mamba1:
        if B.dim() == 3:  # (B, T, N): one group
            B, C = B.unsqueeze(2), C.unsqueeze(2)
        groups = B.shape[2]
        batch, n_tok, dim = x.shape
        heads, hdim = groups, dim // groups
        state = state.view(state.shape[0], heads, hdim, state.shape[-1])
        x = x.reshape(batch, n_tok, heads, hdim)
        dt = dt.reshape(batch, n_tok, heads, hdim)
        z = None if z is None else z.reshape(batch, n_tok, heads, hdim)
        A = A.reshape(heads, hdim, A.shape[-1])
        D = None if D is None else D.reshape(heads, hdim)
        dt_bias = None if dt_bias is None else dt_bias.reshape(heads, hdim)
    return mamba1, multi, state, x, dt, A, B, C, D, z, dt_bias


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """Torch reference of :func:`selective_state_update` (fp32 math; updates ``state`` in place)."""
    out_shape, out_dtype = x.shape, x.dtype
    _, _, st, x, dt, A, B, C, D, z, dt_bias = _canonical(state, x, dt, A, B, C, D, z, dt_bias)
    batch, n_tok, heads = x.shape[:3]
    groups = B.shape[2]
    if state_batch_indices is None:
        rows = torch.arange(batch, device=x.device)
        valid = torch.ones(batch, dtype=torch.bool, device=x.device)
    else:
        rows = state_batch_indices.long()
        valid = rows >= 0
        rows = rows.clamp_min(0)
    h = st[rows].float()  # (B, H, P, N)
    Bh = B.float().repeat_interleave(heads // groups, dim=2)  # (B, T, H, N)
    Ch = C.float().repeat_interleave(heads // groups, dim=2)
    Af = A.float()
    outs = []
    for t in range(n_tok):
        dtt = dt[:, t].float()
        if dt_bias is not None:
            dtt = dtt + dt_bias.float()
        if dt_softplus:
            dtt = _softplus(dtt)
        xt = x[:, t].float()
        h = h * torch.exp(Af * dtt[..., None]) + (dtt * xt)[..., None] * Bh[:, t, :, None, :]
        y = (h * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + D.float() * xt
        if z is not None:
            y = y * F.silu(z[:, t].float())
        outs.append(y)
    out = torch.stack(outs, dim=1) * valid[:, None, None, None]
    with torch.no_grad():
        st[rows[valid]] = h[valid].to(st.dtype)
    return out.to(out_dtype).reshape(out_shape)


def _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    check_tensor("state", state, ndim=(3, 4), dtype=FLOAT_DTYPES)
    mamba1 = state.dim() == 3
    layout = "Mamba-1" if mamba1 else "Mamba-2"
    check_tensor("x", x, ndim=(2, 3) if mamba1 else (3, 4), dtype=FLOAT_DTYPES)
    multi = x.dim() == (3 if mamba1 else 4)
    batch = x.shape[0]
    tok = (x.shape[1],) if multi else ()
    inner = tuple(x.shape[2:] if multi else x.shape[1:])  # (D,) or (H, P)
    n_state = state.shape[-1]
    if tuple(state.shape[1:-1]) != inner:
        raise ValueError(f"{layout} state must have shape (B, {', '.join(map(str, inner))}, N) to match x "
                         f"{tuple(x.shape)}, got {tuple(state.shape)}")
    check_tensor("dt", dt, shape=(batch, *tok, *inner), dtype=FLOAT_DTYPES)
    check_tensor("z", z, shape=(batch, *tok, *inner), dtype=FLOAT_DTYPES, optional=True)
    check_tensor("A", A, shape=(*inner, n_state), dtype=FLOAT_DTYPES)
    check_tensor("D", D, shape=inner, dtype=FLOAT_DTYPES, optional=True)
    check_tensor("dt_bias", dt_bias, shape=inner, dtype=FLOAT_DTYPES, optional=True)
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, dtype=FLOAT_DTYPES)
        ranks = (len(tok) + 2, len(tok) + 3) if mamba1 else (len(tok) + 3,)
        if t.dim() not in ranks or tuple(t.shape[: 1 + len(tok)]) != (batch, *tok) or t.shape[-1] != n_state:
            want = "(B, [T,] N) or (B, [T,] G, N)" if mamba1 else "(B, [T,] G, N)"
            raise ValueError(f"{name} must have shape {want} with B={batch}, N={n_state}, got {tuple(t.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = B.shape[-2] if B.dim() == len(tok) + 3 else 1
    split = inner[0]
    if split % groups != 0:
        raise ValueError(f"the number of groups G={groups} in B/C must divide {'D' if mamba1 else 'H'}={split}")
    check_tensor("state_batch_indices", state_batch_indices, shape=(batch,), dtype=INDEX_DTYPES, optional=True)
    if state_batch_indices is None and state.shape[0] != batch:
        raise ValueError(f"state must have batch B={batch} when state_batch_indices is None, "
                         f"got shape {tuple(state.shape)}")
    check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      state_batch_indices=state_batch_indices)
    if state_batch_indices is not None and state_batch_indices.numel() > 0:
        top = int(state_batch_indices.max())
        if top >= state.shape[0]:
            raise ValueError(f"state_batch_indices holds {top} but state has only {state.shape[0]} rows")


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, *, backend=None):
    """Advance the SSM state by one or T tokens (in place) and return the outputs.

    Mamba-1 layout:
        state (B_state, D, N) fp32, updated in place; x, dt, z (B, D); A (D, N);
        B, C (B, N) or (B, G, N) with G dividing D; D, dt_bias (D,). Returns (B, D).
    Mamba-2 layout:
        state (B_state, H, P, N) fp32; x, dt, z (B, H, P) (dt usually an expand of (B, H));
        A (H, P, N); B, C (B, G, N) with G dividing H; D, dt_bias (H, P). Returns (B, H, P).
    Several tokens per call (speculative decoding, chunked prefill): x, dt, z get a T axis
    after the batch ((B, T, D) or (B, T, H, P)), and so do B and C ((B, T, [G,] N)); the
    tokens are applied in order and out is (B, T, ...).
    state_batch_indices: (B,) int32, row of ``state`` used by each sequence; a negative
    index is a padding slot: its state is untouched and its output is zero.
    dt_softplus applies softplus to dt + dt_bias. backend: "torch", "triton" or None.
    """
    _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    resolve_backend(backend, state, x)
    # TODO(issue 5): Triton kernel; until it lands every backend runs the reference.
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
