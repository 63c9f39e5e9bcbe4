import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive_conv(x, weight, bias=None, initial_states=None, activation=None, seq_idx=None):
    """Per-time-step loop: out[t] = sum_k w[k] * input[t - (W-1) + k] within t's sequence."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states
    outs = []
    for t in range(length):
        acc = torch.zeros(batch, dim, dtype=torch.float64)
        for k in range(width):
            p = t - (width - 1) + k
            val = (x[:, :, p] if p >= 0 else init[:, :, width - 1 + p]).double()
            if seq_idx is not None:
                same = seq_idx[:, max(p, 0)] == seq_idx[:, t]
                val = val * same[:, None]
            acc = acc + weight[:, k].double() * val
        if bias is not None:
            acc = acc + bias.double()
        if activation is not None:
            acc = F.silu(acc)
        outs.append(acc)
    return torch.stack(outs, dim=-1)


def make(batch, dim, length, width, dtype=torch.float32, grad=False):
    x = torch.randn(batch, dim, length, dtype=dtype)
    w = torch.randn(dim, width, dtype=dtype) / width**0.5
    b = torch.randn(dim, dtype=dtype)
    init = torch.randn(batch, dim, width - 1, dtype=dtype)
    for t in (x, w, b, init):
        t.requires_grad_(grad)
    return x, w, b, init


@pytest.mark.parametrize("width", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("length", [1, 7, 13])
def test_ref_matches_naive_loop_fwd_bwd(width, length):
    x, w, b, init = make(2, 3, length, width, grad=True)
    out, final = causal_conv1d_ref(x, w, b, init, return_final_states=True, activation="silu")
    exp = naive_conv(x, w, b, init, "silu").float()
    torch.testing.assert_close(out, exp)
    pad = torch.cat([init, x], dim=-1)
    torch.testing.assert_close(final, pad[..., -(width - 1):])
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (x, w, b, init))
    grads_exp = torch.autograd.grad((exp * g).sum(), (x, w, b, init))
    for a, e in zip(grads, grads_exp):
        torch.testing.assert_close(a, e)


def test_public_torch_backend_matches_ref_and_layouts():
    x, w, b, _ = make(2, 5, 63, 4)
    ref = causal_conv1d_ref(x, w, b, activation="swish")
    out = causal_conv1d_fn(x, w, b, activation="silu", backend="torch")
    torch.testing.assert_close(out, ref)
    x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel-last strides
    torch.testing.assert_close(causal_conv1d_fn(x_cl, w, b, activation="silu", backend="torch"), ref)
    no_act = causal_conv1d_fn(x, w, None, backend="torch")
    torch.testing.assert_close(no_act.double(), naive_conv(x, w), rtol=1e-5, atol=1e-5)


def test_state_chaining():
    width = 4
    x, w, b, init = make(2, 3, 20, width)
    out, final = causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation="silu",
                                  backend="torch")
    for cut in (1, 2, 9):
        out_a, fin_a = causal_conv1d_fn(x[..., :cut], w, b, initial_states=init, return_final_states=True,
                                        activation="silu", backend="torch")
        out_b, fin_b = causal_conv1d_fn(x[..., cut:], w, b, initial_states=fin_a, return_final_states=True,
                                        activation="silu", backend="torch")
        torch.testing.assert_close(torch.cat([out_a, out_b], -1), out)
        torch.testing.assert_close(fin_b, final)


def test_final_states_out_is_written():
    x, w, b, _ = make(2, 3, 7, 5)
    buf = torch.full((2, 3, 4), 7.0)
    out, final = causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=buf, backend="torch")
    torch.testing.assert_close(buf, x[..., -4:])
    assert final.data_ptr() == buf.data_ptr()


def test_seq_idx_no_mixing():
    width = 3
    x, w, b, init = make(2, 4, 17, width)
    seq_idx = torch.tensor([[0] * 5 + [1] * 2 + [2] * 10, [0] * 16 + [1]], dtype=torch.int32)
    out, final = causal_conv1d_fn(x, w, b, seq_idx, initial_states=init, return_final_states=True,
                                  activation="silu", backend="torch")
    torch.testing.assert_close(out.double(), naive_conv(x, w, b, init, "silu", seq_idx), rtol=1e-5, atol=1e-5)
    # Row 1 ends with a 1-long sequence: its final state holds only that input.
    torch.testing.assert_close(final[1], torch.stack([torch.zeros(4), x[1, :, -1]], dim=-1))
    torch.testing.assert_close(final[0], x[0, :, -2:])


def test_cu_seqlens_equals_per_sequence_runs():
    width = 4
    lengths = [5, 1, 0, 12, 2]
    total = sum(lengths)
    x, w, b, _ = make(1, 3, total, width, grad=False)
    init = torch.randn(len(lengths), 3, width - 1)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out, final = causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation="silu",
                                  cu_seqlens=cu, backend="torch")
    start = 0
    for s, n in enumerate(lengths):
        o, f = causal_conv1d_ref(x[..., start:start + n], w, b, init[s:s + 1], return_final_states=True,
                                 activation="silu")
        torch.testing.assert_close(out[..., start:start + n], o)
        torch.testing.assert_close(final[s:s + 1], f)
        start += n


# ------------------------------------------------------------------ update


@pytest.mark.parametrize("width", [2, 4, 7])
@pytest.mark.parametrize("state_len_extra", [0, 3])
def test_update_loop_equals_full_conv(width, state_len_extra):
    x, w, b, _ = make(2, 3, 11, width)
    full, final = causal_conv1d_ref(x, w, b, return_final_states=True, activation="silu")
    state = torch.zeros(2, 3, width - 1 + state_len_extra)
    outs = [causal_conv1d_update(x[..., t], state, w, b, "silu", backend="torch") for t in range(11)]
    torch.testing.assert_close(torch.stack(outs, -1), full)
    torch.testing.assert_close(state[..., -(width - 1):], final)
    # Several tokens per call, in two chunks.
    state2 = torch.zeros_like(state)
    o1 = causal_conv1d_update(x[..., :4], state2, w, b, "silu", backend="torch")
    o2 = causal_conv1d_update(x[..., 4:], state2, w, b, "silu", backend="torch")
    torch.testing.assert_close(torch.cat([o1, o2], -1), full)
    torch.testing.assert_close(state2, state)


def test_update_circular_buffer_equals_full_conv():
    width, state_len = 4, 5
    x, w, b, _ = make(2, 3, 13, width)
    full = causal_conv1d_ref(x, w, b, activation="silu")
    state = torch.zeros(2, 3, state_len)
    seqlens = torch.zeros(2, dtype=torch.int32)
    outs = []
    for t0, t1 in ((0, 1), (1, 4), (4, 11), (11, 13)):
        outs.append(causal_conv1d_update(x[..., t0:t1], state, w, b, "silu", cache_seqlens=seqlens,
                                         backend="torch"))
        seqlens += t1 - t0
    torch.testing.assert_close(torch.cat(outs, -1), full)
    # Input j sits at slot j % S.
    for j in range(13 - state_len, 13):
        torch.testing.assert_close(state[..., j % state_len], x[..., j])


def test_update_state_indices_and_padding():
    width = 4
    x, w, b, _ = make(3, 3, 1, width)
    x = x[..., 0]
    pool = torch.randn(5, 3, width - 1)
    before = pool.clone()
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    out = causal_conv1d_update(x, pool, w, b, None, conv_state_indices=idx, backend="torch")
    for row, slot in ((0, 4), (2, 1)):
        state = before[slot:slot + 1].clone()
        exp = causal_conv1d_update_ref(x[row:row + 1], state, w, b)
        torch.testing.assert_close(out[row:row + 1], exp)
        torch.testing.assert_close(pool[slot], state[0])
    assert torch.all(out[1] == 0)
    for slot in (0, 2, 3):
        assert torch.equal(pool[slot], before[slot])


# ------------------------------------------------------------------ errors


def test_conv_errors():
    x, w, b, init = make(2, 3, 7, 4)
    with pytest.raises(ValueError, match="x must have 3"):
        causal_conv1d_fn(x[0], w, b, backend="torch")
    with pytest.raises(TypeError, match="x must have dtype"):
        causal_conv1d_fn(x.long(), w, b, backend="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d_fn(x, torch.randn(3, 9), b, backend="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d_fn(x, torch.randn(4, 4), b, backend="torch")
    with pytest.raises(ValueError, match="bias must have shape"):
        causal_conv1d_fn(x, w, torch.randn(4), backend="torch")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_fn(x, w, b, activation="relu", backend="torch")
    with pytest.raises(ValueError, match="initial_states must have shape"):
        causal_conv1d_fn(x, w, b, initial_states=init[..., :2], backend="torch")
    with pytest.raises(ValueError, match="final_states_out is given"):
        causal_conv1d_fn(x, w, b, final_states_out=torch.zeros(2, 3, 3), backend="torch")
    with pytest.raises(ValueError, match="final_states_out must have shape"):
        causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=torch.zeros(2, 3, 2), backend="torch")
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        causal_conv1d_fn(x, w, b, torch.zeros(2, 6, dtype=torch.int32), backend="torch")
    with pytest.raises(TypeError, match="seq_idx must have dtype"):
        causal_conv1d_fn(x, w, b, torch.zeros(2, 7), backend="torch")
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d_fn(x, w, b, cu_seqlens=cu, backend="torch")
    with pytest.raises(ValueError, match="end at the sequence length"):
        causal_conv1d_fn(x[:1], w, b, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match="not both"):
        causal_conv1d_fn(x[:1], w, b, torch.zeros(1, 7, dtype=torch.int32), cu_seqlens=cu, backend="torch")
    with pytest.raises(ValueError, match=r"initial_states must have shape \(num_seqs=2"):
        causal_conv1d_fn(x[:1], w, b, initial_states=init[:1], cu_seqlens=cu, backend="torch")
    with pytest.raises(ValueError, match="backend="):
        causal_conv1d_fn(x, w, b, backend="cuda")


def test_update_errors():
    x = torch.randn(2, 3)
    w = torch.randn(3, 4)
    state = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="x must have 2 or 3"):
        causal_conv1d_update(x[0], state, w, backend="torch")
    with pytest.raises(ValueError, match="conv_state must have shape"):
        causal_conv1d_update(x, torch.zeros(2, 3, 2), w, backend="torch")
    with pytest.raises(ValueError, match="conv_state must have batch"):
        causal_conv1d_update(x, torch.zeros(3, 3, 3), w, backend="torch")
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d_update(x, state, torch.randn(3, 1), backend="torch")
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        causal_conv1d_update(x, state, w, cache_seqlens=torch.zeros(3, dtype=torch.int32), backend="torch")
    with pytest.raises(TypeError, match="conv_state_indices must have dtype"):
        causal_conv1d_update(x, state, w, conv_state_indices=torch.zeros(2), backend="torch")
    with pytest.raises(ValueError, match="conv_state_indices holds 5"):
        causal_conv1d_update(x, state, w, conv_state_indices=torch.tensor([0, 5], dtype=torch.int32),
                             backend="torch")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(x, state, w, activation="gelu", backend="torch")
