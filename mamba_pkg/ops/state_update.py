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
from torch import Tensor

from mamba_pkg.ops._launch import Plan, settings_cache
from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    cdiv,
    check_same_device,
    check_tensor,
    next_pow2,
    resolve_backend,
    state_row,
    tl,
    triton,
)

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


# ---------------------------------------------------------------------------
# Triton kernel: a program owns a (BLOCK_P, N) slice of one (sequence, head) state,
# keeps it in registers across the T tokens and writes it back once.
# ---------------------------------------------------------------------------


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, idx_ptr, out_ptr,
    T, P, N, n_rows, heads_per_group,
    stride_s_b, stride_s_h, stride_s_p, stride_s_n,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h, stride_dt_p,
    stride_A_h, stride_A_p, stride_A_n,
    stride_B_b, stride_B_t, stride_B_g, stride_B_n,
    stride_C_b, stride_C_t, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_z_b, stride_z_t, stride_z_h, stride_z_p,
    stride_dtb_h, stride_dtb_p,
    stride_o_b, stride_o_t, stride_o_h, stride_o_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_INDICES: tl.constexpr,
    SOFTPLUS: tl.constexpr, TIE_HDIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_p, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < P, o_n < N
    row, valid = state_row(idx_ptr, i_b, n_rows, o_p, HAS_INDICES)
    m_state = (m_p & valid)[:, None] & m_n[None, :]
    p_state = (state_ptr + row * stride_s_b + i_h.to(tl.int64) * stride_s_h
               + o_p.to(tl.int64)[:, None] * stride_s_p + o_n[None, :] * stride_s_n)
    b_state = tl.load(p_state, mask=m_state, other=0.0).to(tl.float32)

    i_g = i_h // heads_per_group
    p_x = x_ptr + i_b.to(tl.int64) * stride_x_b + i_h * stride_x_h + o_p * stride_x_p
    p_B = B_ptr + i_b.to(tl.int64) * stride_B_b + i_g * stride_B_g + o_n * stride_B_n
    p_C = C_ptr + i_b.to(tl.int64) * stride_C_b + i_g * stride_C_g + o_n * stride_C_n
    p_o = out_ptr + i_b.to(tl.int64) * stride_o_b + i_h * stride_o_h + o_p * stride_o_p
    # With TIE_HDIM (Mamba-2: dt, A, D, dt_bias shared by a head's channels) these are
    # scalars, and exp(A * dt) is one exponential per head and token.
    if TIE_HDIM:
        p_dt = dt_ptr + i_b.to(tl.int64) * stride_dt_b + i_h * stride_dt_h
        b_A = tl.load(A_ptr + i_h * stride_A_h).to(tl.float32)
        if HAS_D:
            b_D = tl.load(D_ptr + i_h * stride_D_h).to(tl.float32)
        if HAS_DT_BIAS:
            b_dt_bias = tl.load(dt_bias_ptr + i_h * stride_dtb_h).to(tl.float32)
    else:
        p_dt = dt_ptr + i_b.to(tl.int64) * stride_dt_b + i_h * stride_dt_h + o_p * stride_dt_p
        b_A = tl.load(A_ptr + i_h * stride_A_h + o_p[:, None] * stride_A_p + o_n[None, :] * stride_A_n,
                      mask=m_p[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        if HAS_D:
            b_D = tl.load(D_ptr + i_h * stride_D_h + o_p * stride_D_p, mask=m_p, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            b_dt_bias = tl.load(dt_bias_ptr + i_h * stride_dtb_h + o_p * stride_dtb_p, mask=m_p,
                                other=0.0).to(tl.float32)
    if HAS_Z:
        p_z = z_ptr + i_b.to(tl.int64) * stride_z_b + i_h * stride_z_h + o_p * stride_z_p

    for t in range(T):
        b_x = tl.load(p_x + t * stride_x_t, mask=m_p, other=0.0).to(tl.float32)
        if TIE_HDIM:
            b_dt = tl.load(p_dt + t * stride_dt_t).to(tl.float32)
        else:
            b_dt = tl.load(p_dt + t * stride_dt_t, mask=m_p, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            b_dt += b_dt_bias
        if SOFTPLUS:
            b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(b_dt)), b_dt)
        b_B = tl.load(p_B + t * stride_B_t, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(p_C + t * stride_C_t, mask=m_n, other=0.0).to(tl.float32)
        if TIE_HDIM:
            b_dA = tl.exp(b_A * b_dt)
            b_state = b_state * b_dA + (b_x * b_dt)[:, None] * b_B[None, :]
        else:
            b_dA = tl.exp(b_A * b_dt[:, None])
            b_state = b_state * b_dA + (b_x * b_dt)[:, None] * b_B[None, :]
        b_out = tl.sum(b_state * b_C[None, :], axis=1)
        if HAS_D:
            b_out += b_x * b_D
        if HAS_Z:
            b_z = tl.load(p_z + t * stride_z_t, mask=m_p, other=0.0).to(tl.float32)
            b_out = b_out * b_z / (1.0 + tl.exp(-b_z))
        b_out = tl.where(valid, b_out, 0.0)
        tl.store(p_o + t * stride_o_t, b_out.to(out_ptr.dtype.element_ty), mask=m_p)
    tl.store(p_state, b_state.to(state_ptr.dtype.element_ty), mask=m_state)


# Tile of the state per program: BLOCK_P * BLOCK_N about TILE_ELEMS fp32 values, chosen
# by measurement on an H100 (benchmarks/bench_decode_ops.py --sweep).
TILE_ELEMS = {16: 2048, 128: 4096}
NUM_WARPS = {16: 4, 128: 8}


def _blocks(hdim, n_state):
    block_n = next_pow2(n_state)
    key = 16 if block_n <= 16 else 128
    block_p = max(1, min(next_pow2(hdim), TILE_ELEMS[key] // block_n))
    return block_p, block_n, NUM_WARPS[key]


def _canonical_strides(state, x, dt, A, B, C, D, z, dt_bias, out):
    """Strides of every input seen in the canonical layout, without building views: state
    (Bs, H, P, N), x/dt/z/out (B, T, H, P), A (H, P, N), B/C (B, T, G, N), D/dt_bias (H, P).
    Mamba-1 channels split into H = G groups of P = D / G. Returns (heads, hdim, groups, strides)."""
    mamba1 = state.dim() == 3
    multi = x.dim() == (3 if mamba1 else 4)

    def tok(t):  # add a token axis of stride 0 for a single-token call
        st = t.stride()
        return st if multi else (st[0], 0) + st[1:]

    b_st, c_st = tok(B), tok(C)
    if mamba1:
        if len(b_st) == 3:  # (B, T, N): one group
            b_st, c_st = b_st[:2] + (0,) + b_st[2:], c_st[:2] + (0,) + c_st[2:]
        groups = B.shape[-2] if B.dim() == x.dim() + 1 else 1
        hdim = x.shape[-1] // groups
        heads = groups

        def split(st, axis):  # channel axis -> (H, P) axes
            return st[:axis] + (hdim * st[axis], st[axis]) + st[axis + 1:]

        seq = [split(tok(t), 2) if t is not None else None for t in (x, dt, z, out)]
        state_st, a_st = split(state.stride(), 1), split(A.stride(), 0)
        d_st = split(D.stride(), 0) if D is not None else None
        dtb_st = split(dt_bias.stride(), 0) if dt_bias is not None else None
    else:
        groups, heads, hdim = B.shape[-2], x.shape[-2], x.shape[-1]
        seq = [tok(t) if t is not None else None for t in (x, dt, z, out)]
        state_st, a_st = state.stride(), A.stride()
        d_st = D.stride() if D is not None else None
        dtb_st = dt_bias.stride() if dt_bias is not None else None
    x_st, dt_st, z_st, out_st = seq
    return heads, hdim, groups, (state_st, x_st, dt_st, a_st, b_st, c_st, d_st or (0, 0), z_st or (0, 0, 0, 0),
                                 dtb_st or (0, 0), out_st)


def _outputs(x):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


# Launch plans per signature of the inputs (shapes, strides, flags): a decode step's inputs keep theirs
# from step to step, so the canonical strides, the tile and the launch's arguments are computed once
# (session 12: ~15 of the ~20 us of Python per call on this CPU, with the launch signature that a Plan
# call no longer builds). Dropped when a tile setting is set (_launch.settings_cache; code that changes
# TILE_ELEMS or NUM_WARPS in place calls _launch.clear_plans()).
_PLANS = settings_cache(__name__)


def _plan(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, has_indices, out) -> Plan:
    key = (state.shape, state.stride(), x.shape, x.stride(), dt.stride(), A.stride(), B.shape, B.stride(),
           C.stride(), None if D is None else D.stride(), None if z is None else z.stride(),
           None if dt_bias is None else dt_bias.stride(), dt_softplus, has_indices)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    batch = x.shape[0]
    n_tok = x.shape[1] if x.dim() == state.dim() else 1
    n_state = state.shape[-1]
    heads, hdim, groups, strides = _canonical_strides(state, x, dt, A, B, C, D, z, dt_bias, out)
    state_st, x_st, dt_st, a_st, b_st, c_st, d_st, z_st, dtb_st, out_st = strides
    # Mamba-2: dt, A, D, dt_bias are expand()s of per-head values (stride 0 along P and N).
    tie = (dt_st[3] == 0 and a_st[1] == 0 and a_st[2] == 0 and (D is None or d_st[1] == 0)
           and (dt_bias is None or dtb_st[1] == 0))
    block_p, block_n, warps = _blocks(hdim, n_state)
    plan = Plan(_selective_state_update_kernel, (cdiv(hdim, block_p), batch, heads),
                n_tok, hdim, n_state, state.shape[0], heads // groups,
                *state_st, *x_st, *dt_st, *a_st, *b_st, *c_st, *d_st, *z_st, *dtb_st, *out_st,
                HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
                HAS_INDICES=has_indices, SOFTPLUS=dt_softplus, TIE_HDIM=tie,
                BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
    _PLANS[key] = plan
    return plan


@launcher_op("selective_state_update", mutates_args=("state",))
def _selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                            z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
                            state_batch_indices: Tensor | None) -> Tensor:
    out = _outputs(x)
    _plan(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices is not None, out)(
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out)
    return out


@_selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return _outputs(x)


def _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    """What selective_state_update accepts, in one place. Each check is a few comparisons, and only one
    that fails builds its error (naming the argument): an accepted call, a decode step that is
    host-bound, pays the comparisons only."""
    if not (isinstance(state, torch.Tensor) and state.dim() in (3, 4) and state.dtype in FLOAT_DTYPES):
        check_tensor("state", state, ndim=(3, 4), dtype=FLOAT_DTYPES)
    mamba1 = state.dim() == 3
    x_ndims = (2, 3) if mamba1 else (3, 4)
    if not (isinstance(x, torch.Tensor) and x.dim() in x_ndims and x.dtype in FLOAT_DTYPES):
        check_tensor("x", x, ndim=x_ndims, dtype=FLOAT_DTYPES)
    shape = x.shape
    n_lead = 2 if x.dim() == x_ndims[1] else 1
    batch, lead, inner = shape[0], shape[:n_lead], shape[n_lead:]  # (B, [T]), (D,) or (H, P)
    n_state = state.shape[-1]
    if state.shape[1:-1] != inner:
        raise ValueError(f"{'Mamba-1' if mamba1 else 'Mamba-2'} state must have shape "
                         f"(B, {', '.join(map(str, inner))}, N) to match x {tuple(shape)}, got {tuple(state.shape)}")
    # Each accepted argument: a tensor, of this shape, of a float dtype (check_tensor's test, inline).
    tensor = torch.Tensor
    if not (isinstance(dt, tensor) and dt.shape == shape and dt.dtype in FLOAT_DTYPES):
        check_tensor("dt", dt, shape=shape, dtype=FLOAT_DTYPES)
    if z is not None and not (isinstance(z, tensor) and z.shape == shape and z.dtype in FLOAT_DTYPES):
        check_tensor("z", z, shape=shape, dtype=FLOAT_DTYPES)
    if not (isinstance(A, tensor) and A.shape == (*inner, n_state) and A.dtype in FLOAT_DTYPES):
        check_tensor("A", A, shape=(*inner, n_state), dtype=FLOAT_DTYPES)
    if D is not None and not (isinstance(D, tensor) and D.shape == inner and D.dtype in FLOAT_DTYPES):
        check_tensor("D", D, shape=inner, dtype=FLOAT_DTYPES)
    if dt_bias is not None and not (isinstance(dt_bias, tensor) and dt_bias.shape == inner
                                    and dt_bias.dtype in FLOAT_DTYPES):
        check_tensor("dt_bias", dt_bias, shape=inner, dtype=FLOAT_DTYPES)
    # B: (B, [T,] N) (Mamba-1) or (B, [T,] G, N); C: B's shape (checked through B's, then the full
    # checks of each only if that fails).
    ranks = (n_lead + 1, n_lead + 2) if mamba1 else (n_lead + 2,)
    b_shape = getattr(B, "shape", None)
    if not (isinstance(B, tensor) and B.dtype in FLOAT_DTYPES and B.dim() in ranks and b_shape[:n_lead] == lead
            and b_shape[-1] == n_state and isinstance(C, tensor) and C.dtype in FLOAT_DTYPES and C.shape == b_shape):
        for name, t in (("B", B), ("C", C)):
            check_tensor(name, t, dtype=FLOAT_DTYPES)
            if t.dim() not in ranks or t.shape[:n_lead] != lead or t.shape[-1] != n_state:
                want = "(B, [T,] N) or (B, [T,] G, N)" if mamba1 else "(B, [T,] G, N)"
                raise ValueError(f"{name} must have shape {want} with B={batch}, N={n_state}, got {tuple(t.shape)}")
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = b_shape[-2] if len(b_shape) == n_lead + 2 else 1
    if groups == 0 or inner[0] % groups != 0:
        raise ValueError(f"the number of groups G={groups} in B/C must divide {'D' if mamba1 else 'H'}={inner[0]}")
    if state_batch_indices is None:
        if state.shape[0] != batch:
            raise ValueError(f"state must have batch B={batch} when state_batch_indices is None, "
                             f"got shape {tuple(state.shape)}")
    elif not (isinstance(state_batch_indices, torch.Tensor) and state_batch_indices.shape == (batch,)
              and state_batch_indices.dtype in INDEX_DTYPES):
        check_tensor("state_batch_indices", state_batch_indices, shape=(batch,), dtype=INDEX_DTYPES)
    device = state.device
    if (x.device != device or dt.device != device or A.device != device or B.device != device or C.device != device
            or (D is not None and D.device != device) or (z is not None and z.device != device)
            or (dt_bias is not None and dt_bias.device != device)
            or (state_batch_indices is not None and state_batch_indices.device != device)):
        check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                          state_batch_indices=state_batch_indices)
    # The indices' range is checked on the host for CPU tensors only (a GPU decode step must not sync).
    if state_batch_indices is not None and not state_batch_indices.is_cuda and state_batch_indices.numel() > 0:
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
    index is a padding slot: its state is untouched and its output is zero. An index past the
    end of ``state`` is an error on CPU; on the GPU (no host sync per step) it is padding.
    dt_softplus applies softplus to dt + dt_bias. backend: "torch", "triton" or None.
    """
    _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    if resolve_backend(backend, state, x) == "torch":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    return _selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
