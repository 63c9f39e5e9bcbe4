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
    with pytest.raises(ValueError, match="bias is on meta"):
        causal_conv1d_fn(x, w, b.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="initial_states is on meta"):
        causal_conv1d_fn(x, w, b, initial_states=init.to("meta"), backend="torch")


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
    with pytest.raises(ValueError, match="conv_state is on meta"):
        causal_conv1d_update(x, state.to("meta"), w, backend="torch")
    with pytest.raises(ValueError, match="cache_seqlens is on meta"):
        causal_conv1d_update(x, state, w, cache_seqlens=torch.zeros(2, dtype=torch.int32, device="meta"),
                             backend="torch")


# ------------------------------------------------------------------ Triton kernels
# On CPU these run through the Triton interpreter (tiny shapes); on a GPU, natively.

from conftest import assert_close_rule  # noqa: E402

import mamba_pkg.ops.causal_conv1d as conv_mod  # noqa: E402
from mamba_pkg.ops._launch import clear_plans  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The small-tile matrix compiles ~20 kernel variants: on a GPU the test_gpu_* tests cover the
# same paths (default tiles, interior and edge tiles, packing, states) with fewer compiles.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter matrix; GPU: test_gpu_*")


def _bf16_atol(ref):
    """The Triton interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so on CPU
    allow one bf16 ulp of the largest value on top of the 2x rule."""
    if torch.cuda.is_available():
        return 1e-2
    return max(1e-2, ref.abs().max().item() * 2.0**-7)


def _channel_last(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _run_fwd_bwd(fn, x, w, b, init, seq_idx, cu, act, g, gf):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, init)]
    out, final = fn(leaves[0], leaves[1], leaves[2], leaves[3], seq_idx, cu, act)
    ((out.float() * g).sum() + (final.float() * gf).sum()).backward()
    return [out, final] + [t.grad for t in leaves if t is not None]


def _triton(x, w, b, init, seq_idx, cu, act):
    return causal_conv1d_fn(x, w, b, seq_idx, init, True, None, act, cu_seqlens=cu, backend="triton")


def _torch(x, w, b, init, seq_idx, cu, act):
    return causal_conv1d_ref(x, w, b, init, True, None, act, seq_idx=seq_idx, cu_seqlens=cu)


CONV_CASES = [
    # (B, D, L, W, layout, init, bias, act, packing); L > 2 tiles of 16 so that interior
    # (unmasked) tiles run too
    (2, 5, 37, 4, "contiguous", True, True, "silu", None),
    (2, 16, 64, 4, "contiguous", False, True, "silu", None),
    (2, 3, 7, 2, "channel_last", False, False, None, None),
    (2, 16, 70, 5, "channel_last", True, True, "silu", None),
    (2, 4, 40, 8, "contiguous", True, True, "silu", "seq_idx"),
    (1, 4, 33, 3, "channel_last", True, True, "silu", "cu_seqlens"),
    (1, 3, 1, 7, "contiguous", True, False, None, None),
    (2, 4, 20, 6, "contiguous", True, True, "silu", None),
    # chunked path: W=8 (shifts up to 7), two programs along L with a partial last one
    (2, 3, 100, 8, "contiguous", False, True, "silu", None),
    (2, 4, 19, 3, "contiguous", True, False, None, None),
]
# "chunked": (BLOCK_D, chunks of 8 positions, warps), the contiguous unpacked path; "rows":
# (BLOCK_D, chunks of 4 rows per program, warps), the channel-last unpacked backward.
SMALL_TILES = {"chunked": (4, 2, 4), "contiguous": (8, 16, 4), "channel_last": (8, 16, 4), "rows": (8, 2, 1)}


def _conv_case(B, D, L, W, layout, init, bias, act, packing, dtype):
    x, w, b, i = make(B, D, L, W)
    x = x.to(DEVICE)
    if layout == "channel_last":
        x = _channel_last(x)
    w, b = w.to(DEVICE), b.to(DEVICE) if bias else None
    seq_idx = cu = None
    if packing == "seq_idx":
        seq_idx = torch.sort(torch.randint(0, 3, (B, L)), dim=1).values.to(torch.int32).to(DEVICE)
    if packing == "cu_seqlens":
        cu = torch.tensor([0, 1, 1, 12, L], dtype=torch.int32, device=DEVICE)
        i = torch.randn(4, D, W - 1)
    i = i.to(DEVICE) if init else None
    cast = [t.to(dtype) if t is not None else None for t in (x, w, b, i)]
    return cast, seq_idx, cu


# The recompute backward variant is W times slower in the interpreter: two cases suffice.
CONV_VARIANT_CASES = ([(c, "scratch") for c in CONV_CASES] + [(CONV_CASES[3], "recompute"), (CONV_CASES[5], "recompute")]
                      + [(CONV_CASES[2], "rows"), (CONV_CASES[3], "rows")])


@interpreter_only
@pytest.mark.parametrize("case,variant", CONV_VARIANT_CASES, ids=lambda c: f"W{c[3]}-L{c[2]}-{c[4]}-{c[8]}"
                         if isinstance(c, tuple) else c)
def test_triton_conv_matches_ref_fp32(case, variant, monkeypatch):
    B, D, L, W, layout, init, bias, act, packing = case
    monkeypatch.setattr(conv_mod, "BWD_DY_SHIFT", {"contiguous": variant, "channel_last": variant})
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", SMALL_TILES)
    monkeypatch.setattr(conv_mod, "BWD_CONFIG", SMALL_TILES)
    (x, w, b, i), seq_idx, cu = _conv_case(B, D, L, W, layout, init, bias, act, packing, torch.float32)
    g = torch.randn(B, D, L, device=DEVICE)
    gf = torch.randn(B if cu is None else cu.numel() - 1, D, W - 1, device=DEVICE)
    got = _run_fwd_bwd(_triton, x, w, b, i, seq_idx, cu, act, g, gf)
    exp = _run_fwd_bwd(_torch, x, w, b, i, seq_idx, cu, act, g, gf)
    assert got[0].stride() == x.stride()  # the output keeps the input's layout
    for name, a, e in zip(["out", "final", "dx", "dw", "db", "dinit"], got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


@interpreter_only
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_triton_conv_bwd_options(layout, monkeypatch):
    """Options the benchmark sweeps: a register cap (maxnreg) in a backward config, the
    chunked backward's prefetch of the next tile (with initial states: the first tile's), the
    rows kernel's STEPS halved for a small grid (16 -> 10 -> 5 -> 3: an odd count, a partial
    last program), and the weight-gradient reduction in several row blocks and programs."""
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", SMALL_TILES)
    monkeypatch.setattr(conv_mod, "BWD_CONFIG", {**{k: v + (64,) for k, v in SMALL_TILES.items()},
                                                 "rows": (8, 16, 1, 64)})
    monkeypatch.setattr(conv_mod, "BWD_PREFETCH", True)
    monkeypatch.setattr(conv_mod, "BWD_TILES_PER_PROGRAM", 2)
    monkeypatch.setattr(conv_mod, "BWD_ROWS_MIN_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(conv_mod, "WGRAD_MAX_P", 2)
    monkeypatch.setattr(conv_mod, "WGRAD_TILE", 16)
    (x, w, b, i), _, _ = _conv_case(2, 8, 40, 4, layout, True, True, "silu", None, torch.float32)
    g = torch.randn(2, 8, 40, device=DEVICE)
    gf = torch.randn(2, 8, 3, device=DEVICE)
    got = _run_fwd_bwd(_triton, x, w, b, i, None, None, "silu", g, gf)
    exp = _run_fwd_bwd(_torch, x, w, b, i, None, None, "silu", g, gf)
    for name, a, e in zip(["out", "final", "dx", "dw", "db", "dinit"], got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_triton_conv_on_a_channel_slice(monkeypatch):
    """Mamba-2 convolves xBC = zxbcdt[..., a:b].transpose(1, 2): channel-last, not dense."""
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", SMALL_TILES)
    monkeypatch.setattr(conv_mod, "BWD_CONFIG", SMALL_TILES)
    zxbcdt = torch.randn(2, 40, 20, device=DEVICE, requires_grad=True)
    w, b = torch.randn(8, 4, device=DEVICE), torch.randn(8, device=DEVICE)
    outs = []
    for fn in (_triton, _torch):
        x = zxbcdt[..., 5:13].transpose(1, 2)  # (B, D=8, L=40), strides (800, 1, 20)
        out, final = fn(x, w, b, None, None, None, "silu")
        (grad,) = torch.autograd.grad((out * out).sum() + final.sum(), zxbcdt)
        outs.append((out, final, grad))
    assert outs[0][0].stride(1) == 1  # written channel-last, like the input
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def _split_parts_run(widths, B, L, W, extra, seed=0):
    """Mamba-2's split conv as _launch_fwd / _launch_bwd with tuples: x a channel slice of a wider
    (B, L, .) tensor, outputs / output gradients one dense tensor per part, dx into a slice of a
    dense gradient. Returns (out parts, dx, dw, db, the gradient's columns outside the slice) and
    the reference (out, dx, dw, db)."""
    g = torch.Generator().manual_seed(seed)
    dim = sum(widths)
    z = torch.randn(B, L, dim + extra, generator=g).to(DEVICE)
    x = z[..., 3:3 + dim].transpose(1, 2)
    w, b = torch.randn(dim, W, generator=g).to(DEVICE), torch.randn(dim, generator=g).to(DEVICE)
    outs = [torch.empty(B, L, k, device=DEVICE).transpose(1, 2) for k in widths]
    conv_mod._launch_fwd(tuple(outs), x, w, b, None, None, None, True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = causal_conv1d_ref(*leaves, activation="silu")
    dout = torch.randn(B, dim, L, generator=g).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    douts = tuple(_channel_last(part) for part in dout.split(list(widths), dim=1))
    dz = torch.zeros_like(z)
    dw, db = torch.empty_like(w), torch.empty_like(b)
    conv_mod._launch_bwd(dz[..., 3:3 + dim].transpose(1, 2), dw, db, x, w, b, None, None, None, True, douts)
    outside = torch.cat([dz[..., :3], dz[..., 3 + dim:]], dim=-1)
    return (torch.cat(outs, dim=1), dz[..., 3:3 + dim].transpose(1, 2), dw, db, outside), (ref.detach(), *ref_grads)


@pytest.mark.parametrize("kernels", ["rows", "general"])
def test_triton_conv_channel_parts_share_a_launch(kernels, monkeypatch):
    """Outputs (forward) and output gradients (backward) given as channel parts (Mamba-2's x, B, C),
    parts of widths that are not multiples of the tile: one launch per pass for the rows kernels,
    the general forward's fused launch, or a launch per part (the general backward)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(conv_mod, "FWD_CONFIG", SMALL_TILES)
        monkeypatch.setattr(conv_mod, "BWD_CONFIG", SMALL_TILES)
    monkeypatch.setattr(conv_mod, "FWD_CHANNEL_LAST", kernels)
    monkeypatch.setattr(conv_mod, "BWD_DY_SHIFT", {"contiguous": "scratch",
                                                   "channel_last": "rows" if kernels == "rows" else "scratch"})
    (out, dx, dw, db, outside), exp = _split_parts_run((16, 5, 3), 2, 37, 4, 9)
    for name, a, e in zip(["out", "dx", "dw", "db"], (out, dx, dw, db), exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.all(outside == 0)  # nothing written outside dx's channels


@interpreter_only
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_triton_conv_bf16_tolerance_rule(layout, monkeypatch):
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", SMALL_TILES)
    monkeypatch.setattr(conv_mod, "BWD_CONFIG", SMALL_TILES)
    B, D, L, W = 2, 8, 40, 4
    (x, w, b, i), _, _ = _conv_case(B, D, L, W, layout, True, True, "silu", None, torch.float32)
    g = torch.randn(B, D, L, device=DEVICE)
    gf = torch.randn(B, D, W - 1, device=DEVICE)
    low = [t.to(torch.bfloat16) for t in (x, w, b, i)]
    ref32 = _run_fwd_bwd(_torch, *[t.float() for t in low], None, None, "silu", g, gf)
    ref16 = _run_fwd_bwd(_torch, *low, None, None, "silu", g, gf)
    got = _run_fwd_bwd(_triton, *low, None, None, "silu", g, gf)
    for name, a, r32, r16 in zip(["out", "final", "dx", "dw", "db", "dinit"], got, ref32, ref16):
        assert a.dtype == torch.bfloat16
        assert_close_rule(a, r32, r16, atol=_bf16_atol(r32), name=name)


def test_launch_runners_follow_signature_and_settings(monkeypatch):
    """A call builds its launches (Plans) once per signature; a call with another layout, or after a
    tuning setting changed, builds its own; every call matches the reference."""
    built = []

    class RecordingPlan(conv_mod.Plan):
        __slots__ = ()

        def __init__(self, kernel, *args, **kwargs):
            built.append(kernel)
            super().__init__(kernel, *args, **kwargs)

    monkeypatch.setattr(conv_mod, "Plan", RecordingPlan)
    monkeypatch.setattr(conv_mod, "FWD_CONFIG", dict(SMALL_TILES))
    monkeypatch.setattr(conv_mod, "BWD_CONFIG", SMALL_TILES)
    (x, w, b, _), _, _ = _conv_case(2, 8, 24, 4, "contiguous", False, True, "silu", None, torch.float32)
    g, gf = torch.randn(2, 8, 24, device=DEVICE), torch.randn(2, 8, 3, device=DEVICE)

    def check(x):
        got = _run_fwd_bwd(_triton, x, w, b, None, None, None, "silu", g, gf)
        exp = _run_fwd_bwd(_torch, x, w, b, None, None, None, "silu", g, gf)
        for name, a, e in zip(["out", "final", "dx", "dw", "db"], got, exp):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)

    check(x)
    check(x)
    assert built == [conv_mod._causal_conv1d_fwd_chunk_kernel, conv_mod._conv_wgrad_reduce_kernel,
                     conv_mod._causal_conv1d_bwd_chunk_kernel]
    x_cl = _channel_last(x)
    check(x_cl)
    check(x_cl)
    assert built[3:] == [conv_mod._causal_conv1d_fwd_rows_kernel, conv_mod._conv_wgrad_reduce_kernel,
                         conv_mod._causal_conv1d_bwd_rows_kernel]
    monkeypatch.setattr(conv_mod, "FWD_CHANNEL_LAST", "general")
    check(x_cl)
    assert built[6] is conv_mod._causal_conv1d_fwd_kernel and len(built) == 9
    # A setting changed in place is no attribute set: clear_plans() drops the runners.
    check(x_cl)
    assert len(built) == 9
    saved = conv_mod.FWD_CONFIG["channel_last"]
    conv_mod.FWD_CONFIG["channel_last"] = (8, 8, 2)
    try:
        clear_plans()
        assert not conv_mod._RUNNERS
        check(x_cl)
        assert len(built) == 12
    finally:
        conv_mod.FWD_CONFIG["channel_last"] = saved
        clear_plans()


def test_weight_copy_follows_the_weights():
    """The channel-last backward's (W, D) weight copy is reused while the weight is the same tensor at
    the same version (also through a new view of one parameter at each call), made again after an
    in-place update (its version moves), and never taken for another tensor (a different one, or one
    made after the first was freed)."""
    param = torch.randn(6, 1, 4, device=DEVICE)
    first = conv_mod._weight_taps_major(param[:, 0])
    assert torch.equal(first, param[:, 0].t()) and first.is_contiguous()
    assert conv_mod._weight_taps_major(param[:, 0]) is first  # a new view of the same parameter
    with torch.no_grad():
        param.mul_(2)  # an optimizer step: in place, the version moves
    second = conv_mod._weight_taps_major(param[:, 0])
    assert second is not first and torch.equal(second, param[:, 0].t())
    halves = [conv_mod._weight_taps_major(param[:3, 0]), conv_mod._weight_taps_major(param[3:, 0])]
    assert conv_mod._weight_taps_major(param[:3, 0]) is halves[0]
    assert conv_mod._weight_taps_major(param[3:, 0]) is halves[1]
    assert torch.equal(torch.cat(halves, 1), second)  # slices of one base keep a copy each
    other = param.clone()[:, 0]  # same values and shape, another tensor
    assert conv_mod._weight_taps_major(other) is not second
    for _ in range(3):  # a weight freed and another made in its place (often at its address)
        weight = torch.randn(6, 4, device=DEVICE)
        assert torch.equal(conv_mod._weight_taps_major(weight), weight.t())
        del weight


def test_channel_last_backward_sees_in_place_weight_updates():
    """Training steps with an in-place weight update between them, on one weight tensor: each
    backward (channel-last, rows path, cached weight copy) matches the reference with the weights of
    its step (dx is where stale weights would show)."""
    (x, w, b, _), _, _ = _conv_case(2, 8, 24, 4, "channel_last", False, True, "silu", None, torch.float32)
    x, w = x.requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(2, 8, 24, device=DEVICE)
    for _ in range(3):
        got = torch.autograd.grad(causal_conv1d_fn(x, w, b, activation="silu", backend="triton"), (x, w), g)
        exp = torch.autograd.grad(causal_conv1d_ref(x, w, b, activation="silu"), (x, w), g)
        for name, a, e in zip(["dx", "dw"], got, exp):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)
        with torch.no_grad():
            w.add_(torch.randn_like(w))


@pytest.mark.parametrize("mode", ["shift", "circular", "indices"])
def test_triton_update_matches_ref(mode):
    B, D, W, S, T = 3, 5, 4, 6, 4
    x = torch.randn(B, D, T, device=DEVICE)
    w, b = torch.randn(D, W, device=DEVICE), torch.randn(D, device=DEVICE)
    rows = B + 2 if mode == "indices" else B
    state = torch.randn(rows, D, S, device=DEVICE)
    state_ref = state.clone()
    seqlens = torch.tensor([0, 5, 13], dtype=torch.int32, device=DEVICE) if mode == "circular" else None
    idx = torch.tensor([4, -1, 0], dtype=torch.int32, device=DEVICE) if mode == "indices" else None
    out = causal_conv1d_update(x, state, w, b, "silu", seqlens, idx, backend="triton")
    exp = causal_conv1d_update_ref(x, state_ref, w, b, "silu", seqlens, idx)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref)
    one = causal_conv1d_update(x[..., 0], state, w, None, None, seqlens, idx, backend="triton")
    torch.testing.assert_close(one, causal_conv1d_update_ref(x[..., 0], state_ref, w, None, None, seqlens, idx),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref)


# ------------------------------------------------------------------ GPU, full size


@requires_cuda
@pytest.mark.parametrize("width,layout,variant,init", [(w, "contiguous", "-", w % 2 == 0) for w in (2, 3, 4, 5, 8)]
                         + [(4, "channel_last", "rows", True), (5, "channel_last", "rows", False),
                            (4, "channel_last", "scratch", True), (4, "channel_last", "recompute", False)])
def test_gpu_conv_all_widths_bf16(width, layout, variant, init, monkeypatch):
    monkeypatch.setattr(conv_mod, "BWD_DY_SHIFT", {"contiguous": variant, "channel_last": variant})
    B, D, L = 2, 96, 2000 + width  # several programs along L; a partial last chunk for odd widths
    (x, w, b, i), _, _ = _conv_case(B, D, L, width, layout, init, True, "silu", None, torch.bfloat16)
    g = torch.randn(B, D, L, device=DEVICE)
    gf = torch.randn(B, D, width - 1, device=DEVICE)
    ref32 = _run_fwd_bwd(_torch, *[t.float() if t is not None else None for t in (x, w, b, i)], None, None, "silu",
                         g, gf)
    ref16 = _run_fwd_bwd(_torch, x, w, b, i, None, None, "silu", g, gf)
    got = _run_fwd_bwd(_triton, x, w, b, i, None, None, "silu", g, gf)
    names = ["out", "final", "dx", "dw", "db", "dinit"][:len(got)]
    for name, a, r32, r16 in zip(names, got, ref32, ref16):
        assert_close_rule(a, r32, r16, atol=1e-2, name=name)
    again = _run_fwd_bwd(_triton, x, w, b, i, None, None, "silu", g, gf)
    for name, a, e in zip(names, got, again):
        assert torch.equal(a, e), f"{name} differs between two runs (the backward must be deterministic)"


@requires_cuda
@pytest.mark.parametrize("load_bytes", [16, 8])
def test_gpu_conv_split_shape_parts(load_bytes, monkeypatch):
    """Mamba-2 130m's xBC split (1536 + 128 + 128 channels of 3352-value rows) in one launch per
    pass, with 16- and 8-byte loads (8 or 4 channels per thread), against the reference."""
    monkeypatch.setattr(conv_mod, "FWD_ROWS_LOAD_BYTES", load_bytes)
    monkeypatch.setattr(conv_mod, "BWD_ROWS_LOAD_BYTES", load_bytes)
    (out, dx, dw, db, outside), exp = _split_parts_run((1536, 128, 128), 2, 300, 4, 3352 - 1792 - 3)
    for name, a, e in zip(["out", "dx", "dw", "db"], (out, dx, dw, db), exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3, msg=name)
    assert torch.all(outside == 0)


@requires_cuda
@pytest.mark.parametrize("packing", ["seq_idx", "cu_seqlens"])
def test_gpu_conv_packed_fp32(packing):
    B, D, L, W = 1, 64, 500, 4
    (x, w, b, i), seq_idx, cu = _conv_case(B, D, L, W, "channel_last", True, True, "silu", packing, torch.float32)
    g = torch.randn(B, D, L, device=DEVICE)
    gf = torch.randn(B if cu is None else cu.numel() - 1, D, W - 1, device=DEVICE)
    got = _run_fwd_bwd(_triton, x, w, b, i, seq_idx, cu, "silu", g, gf)
    exp = _run_fwd_bwd(_torch, x, w, b, i, seq_idx, cu, "silu", g, gf)
    for name, a, e in zip(["out", "final", "dx", "dw", "db", "dinit"], got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3, msg=name)


@requires_cuda
def test_gpu_conv_matches_causal_conv1d_package():
    cc = pytest.importorskip("causal_conv1d")
    x = torch.randn(2, 64, 300, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(64, 4, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(64, device=DEVICE, dtype=torch.bfloat16)
    ours = causal_conv1d_fn(x, w, b, activation="silu")
    theirs = cc.causal_conv1d_fn(x, w, b, activation="silu")
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ torch.library custom ops


def _opcheck_cases():
    x = torch.randn(2, 4, 12, device=DEVICE)
    x_cl = _channel_last(torch.randn(2, 4, 12, device=DEVICE))
    w, b = torch.randn(4, 4, device=DEVICE), torch.randn(4, device=DEVICE)
    init = torch.randn(2, 4, 3, device=DEVICE)
    starts = torch.tensor([[0] * 5 + [5] * 7, [0] * 12], dtype=torch.int32, device=DEVICE)
    dout = torch.randn(2, 4, 12, device=DEVICE)
    state, idx = torch.randn(3, 4, 5, device=DEVICE), torch.tensor([2, -1], dtype=torch.int32, device=DEVICE)
    ops = torch.ops.mamba_pkg
    return [
        (ops.causal_conv1d_fwd, (x, w, None, None, None, None, True)),
        (ops.causal_conv1d_fwd, (x_cl, w, b, init, starts, None, False)),
        (ops.causal_conv1d_bwd, (x, w, b, init, None, None, True, dout, True)),
        (ops.causal_conv1d_bwd, (x_cl, w, None, None, starts, None, True, dout, False)),
        (ops.causal_conv1d_update, (x[..., :2], state, w, b, None, idx, True)),
        (ops.causal_conv1d_update, (x[:, :, 0], state[:2], w, None, torch.tensor([3, 9], dtype=torch.int32,
                                                                                   device=DEVICE), None, False)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_conv_custom_ops_opcheck(case):
    """Schema, fake implementation and AOT dispatch of each registered launcher agree with the
    real op (torch.library.opcheck)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_conv_compiles_to_one_graph_with_custom_ops():
    """torch.compile(fullgraph=True) of the conv with initial states (Triton backend), forward and
    backward, equals eager; the launches appear as mamba_pkg custom ops in both graphs."""
    from compile_check import compiled_matches_eager

    def step(x, w, b, init):
        out, final = causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation="silu",
                                      backend="triton")
        return (out * out).sum() + final.sum()

    leaves = [torch.randn(2, 4, 12, device=DEVICE), torch.randn(4, 4, device=DEVICE), torch.randn(4, device=DEVICE),
              torch.randn(2, 4, 3, device=DEVICE)]
    forward, backward = compiled_matches_eager(step, leaves)
    assert "mamba_pkg.causal_conv1d_fwd" in forward
    assert "mamba_pkg.causal_conv1d_bwd" in backward
