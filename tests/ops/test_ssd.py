"""SSD reference (torch path) against a per-time-step recurrence, plus input checks."""

import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined
from mamba_pkg.ops.ssd.reference import mamba_chunk_scan_combined_ref, ssd_minimal


def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None, initial_states=None,
              seq_idx=None):
    """One time step at a time, float64: the definition of the recurrence."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    B = B.repeat_interleave(H // G, dim=2)
    C = C.repeat_interleave(H // G, dim=2)
    state = torch.zeros(batch, H, P, N, dtype=torch.float64)
    if initial_states is not None:
        state = initial_states.double().clone()
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
            state = state * keep
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        D = D.double()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.double())
    return y, state


def make_inputs(batch, L, H, P, G, N, dtype=torch.float32, d_has_hdim=False, requires_grad=False):
    x = torch.randn(batch, L, H, P, dtype=dtype)
    dt = (torch.randn(batch, L, H) * 0.5 - 1.0).to(dtype)
    A = -torch.rand(H) * 2 - 0.1
    B = torch.randn(batch, L, G, N, dtype=dtype)
    C = torch.randn(batch, L, G, N, dtype=dtype)
    D = torch.randn(H, P) if d_has_hdim else torch.randn(H)
    z = torch.randn(batch, L, H, P, dtype=dtype)
    dt_bias = torch.randn(H) * 0.3
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if requires_grad:
        for t in inputs.values():
            t.requires_grad_(True)
    return inputs


@pytest.mark.parametrize(
    "batch,L,H,P,G,N,chunk,d_has_hdim",
    [(2, 37, 4, 3, 2, 5, 8, False), (1, 1, 2, 4, 1, 3, 16, True), (2, 64, 3, 2, 1, 4, 16, True),
     (1, 63, 6, 5, 3, 7, 7, False)],
)
def test_forward_matches_recurrence(batch, L, H, P, G, N, chunk, d_has_hdim):
    inp = make_inputs(batch, L, H, P, G, N, d_has_hdim=d_has_hdim)
    init = torch.randn(batch, H, P, N)
    out, final = mamba_chunk_scan_combined(**inp, chunk_size=chunk, dt_softplus=True, initial_states=init,
                                           return_final_states=True, backend="torch")
    ref, ref_final = naive_ssd(**inp, dt_softplus=True, initial_states=init)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-4, atol=1e-4)


def test_dt_limit_and_no_optionals():
    inp = make_inputs(2, 20, 2, 3, 1, 4)
    out = mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8, dt_limit=(0.05, 0.3),
                                    backend="torch")
    ref, _ = naive_ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], dt_limit=(0.05, 0.3))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_backward_matches_recurrence():
    inp = make_inputs(2, 21, 4, 3, 2, 5, requires_grad=True)
    init = torch.randn(2, 4, 3, 5, requires_grad=True)
    out, final = mamba_chunk_scan_combined(**inp, chunk_size=8, dt_softplus=True, initial_states=init,
                                           return_final_states=True, backend="torch")
    g_out, g_final = torch.randn_like(out), torch.randn_like(final)
    leaves = list(inp.values()) + [init]
    grads = torch.autograd.grad((out * g_out).sum() + (final * g_final).sum(), leaves)
    ref, ref_final = naive_ssd(**inp, dt_softplus=True, initial_states=init)
    ref_grads = torch.autograd.grad((ref * g_out.double()).sum() + (ref_final * g_final.double()).sum(), leaves)
    for name, g, rg in zip(list(inp) + ["initial_states"], grads, ref_grads):
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-3, atol=1e-4, msg=name)


def test_low_precision_output_dtype():
    inp = make_inputs(1, 19, 2, 4, 1, 4, dtype=torch.bfloat16)
    out, final = mamba_chunk_scan_combined(**inp, chunk_size=8, return_final_states=True, backend="torch")
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref, _ = naive_ssd(**inp)
    assert (out.double() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_ssd_minimal_matches_recurrence():
    batch, L, H, P, N = 2, 32, 3, 4, 5
    x, B, C = torch.randn(batch, L, H, P), torch.randn(batch, L, H, N), torch.randn(batch, L, H, N)
    dt = torch.rand(batch, L, H) * 0.5
    A = -torch.rand(H)
    init = torch.randn(batch, H, P, N)
    y, final = ssd_minimal(x * dt[..., None], dt * A, B, C, 8, initial_states=init)
    # With one group per head the recurrence takes B, C as (B, L, G=H, N).
    ref, ref_final = naive_ssd(x, dt, A, B, C, initial_states=init)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of block_len"):
        ssd_minimal(x[:, :30], (dt * A)[:, :30], B[:, :30], C[:, :30], 8)


def test_state_chaining():
    inp = make_inputs(2, 45, 4, 3, 2, 5)
    full, full_final = mamba_chunk_scan_combined(**inp, chunk_size=8, dt_softplus=True, return_final_states=True,
                                                 backend="torch")
    cut = 19
    first = {k: (v[:, :cut] if v.dim() >= 3 else v) for k, v in inp.items()}
    second = {k: (v[:, cut:] if v.dim() >= 3 else v) for k, v in inp.items()}
    out_a, state_a = mamba_chunk_scan_combined(**first, chunk_size=8, dt_softplus=True, return_final_states=True,
                                               backend="torch")
    out_b, state_b = mamba_chunk_scan_combined(**second, chunk_size=8, dt_softplus=True, initial_states=state_a,
                                               return_final_states=True, backend="torch")
    torch.testing.assert_close(torch.cat([out_a, out_b], dim=1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state_b, full_final, rtol=1e-4, atol=1e-4)


def test_seq_idx_blocks_state():
    inp = make_inputs(2, 30, 2, 3, 1, 4)
    seq_idx = torch.tensor([[0] * 10 + [1] * 13 + [2] * 7, [0] * 30], dtype=torch.int32)
    init = torch.randn(2, 2, 3, 4)
    out, final = mamba_chunk_scan_combined(**inp, chunk_size=8, seq_idx=seq_idx, initial_states=init,
                                           return_final_states=True, backend="torch")
    ref, ref_final = naive_ssd(**inp, seq_idx=seq_idx, initial_states=init)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-4, atol=1e-4)


def test_varlen_equals_per_sequence():
    lengths = [5, 0, 17, 9]
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inp = make_inputs(1, total, 4, 3, 2, 5)
    init = torch.randn(len(lengths), 4, 3, 5)
    out, final, varlen = mamba_chunk_scan_combined(**inp, chunk_size=8, dt_softplus=True, cu_seqlens=cu,
                                                   initial_states=init, return_final_states=True,
                                                   return_varlen_states=True, backend="torch")
    assert varlen.shape == (4, 4, 3, 5)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: (v[:, s:e] if v.dim() >= 3 else v) for k, v in inp.items()}
        if e > s:
            ref, ref_final = mamba_chunk_scan_combined_ref(**part, chunk_size=8, dt_softplus=True,
                                                           initial_states=init[i : i + 1], return_final_states=True)
            torch.testing.assert_close(out[:, s:e], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(varlen[i], ref_final[0], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(varlen[i], init[i])
    torch.testing.assert_close(final[0], varlen[-1])


def _bad_call(**overrides):
    inp = make_inputs(2, 10, 4, 3, 2, 5)
    inp.update(chunk_size=4)
    inp.update(overrides)
    return mamba_chunk_scan_combined(**inp, backend="torch")


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(x=torch.randn(2, 10, 4)), ValueError, "x must have 4"),
        (dict(x=torch.randint(0, 3, (2, 10, 4, 3))), TypeError, "x must have dtype"),
        (dict(dt=torch.randn(2, 9, 4)), ValueError, "dt must have shape"),
        (dict(A=torch.randn(3)), ValueError, "A must have shape"),
        (dict(B=torch.randn(2, 10, 3, 5), C=torch.randn(2, 10, 3, 5)), ValueError, "multiple of G"),
        (dict(B=torch.randn(2, 11, 2, 5)), ValueError, "B must have shape"),
        (dict(C=torch.randn(2, 10, 2, 6)), ValueError, "C must have shape"),
        (dict(D=torch.randn(5)), ValueError, "D must have shape"),
        (dict(z=torch.randn(2, 10, 4, 2)), ValueError, "z must have shape"),
        (dict(dt_bias=torch.randn(4, 1)), ValueError, "dt_bias must have shape"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(chunk_size=4.0), TypeError, "chunk_size must be an int"),
        (dict(dt_limit=(0.5, 0.1)), ValueError, "dt_limit"),
        (dict(dt_limit="fast"), TypeError, "dt_limit"),
        (dict(initial_states=torch.randn(2, 4, 3, 6)), ValueError, "initial_states must have shape"),
        (dict(seq_idx=torch.zeros(2, 10)), TypeError, "seq_idx must have dtype"),
        (dict(seq_idx=torch.tensor([[0] * 5 + [1] * 5, [1] * 5 + [0] * 5], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "batch size 1"),
        (dict(return_varlen_states=True), ValueError, "needs cu_seqlens"),
        (dict(x="x"), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(2, 0, 4, 3)), ValueError, "L, H, P >= 1"),
    ],
)
def test_bad_inputs(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _bad_call(**overrides)


def test_bad_varlen_inputs():
    inp = make_inputs(1, 10, 4, 3, 2, 5)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="must end at"):
        mamba_chunk_scan_combined(**inp, chunk_size=4, cu_seqlens=cu, backend="torch")
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\(num_seqs, H, P, N\)"):
        mamba_chunk_scan_combined(**inp, chunk_size=4, cu_seqlens=cu, initial_states=torch.randn(1, 4, 3, 5),
                                  backend="torch")
    with pytest.raises(ValueError, match="disagrees"):
        mamba_chunk_scan_combined(**inp, chunk_size=4, cu_seqlens=cu, seq_idx=torch.zeros(1, 10, dtype=torch.int32),
                                  backend="torch")
    with pytest.raises(ValueError, match="backend="):
        mamba_chunk_scan_combined(**inp, chunk_size=4, backend="cuda")
