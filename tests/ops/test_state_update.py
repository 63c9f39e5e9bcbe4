import math

import pytest
import torch

from mamba_pkg.ops._launch import clear_plans
from mamba_pkg.ops.state_update import selective_state_update, selective_state_update_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive_step(h, x, dt, a, b, c, d, z, softplus):
    """Scalar recurrence for one channel: h (N,), x, dt, d, z floats, a, b, c (N,)."""
    if softplus:
        dt = math.log1p(math.exp(dt)) if dt <= 20 else dt
    h = [h[n] * math.exp(a[n] * dt) + dt * b[n] * x for n in range(len(h))]
    y = sum(h[n] * c[n] for n in range(len(h))) + d * x
    if z is not None:
        y = y * z / (1 + math.exp(-z))
    return h, y


def mamba1_inputs(batch, dim, n, groups=None, tokens=None, dtype=torch.float32):
    tok = () if tokens is None else (tokens,)
    g = () if groups is None else (groups,)
    return dict(
        state=torch.randn(batch, dim, n),
        x=torch.randn(batch, *tok, dim, dtype=dtype),
        dt=torch.randn(batch, *tok, dim, dtype=dtype),
        A=-torch.rand(dim, n) * 2,
        B=torch.randn(batch, *tok, *g, n, dtype=dtype),
        C=torch.randn(batch, *tok, *g, n, dtype=dtype),
        D=torch.randn(dim),
        z=torch.randn(batch, *tok, dim, dtype=dtype),
        dt_bias=torch.randn(dim),
    )


def mamba2_inputs(batch, heads, hdim, n, groups, tokens=None, dtype=torch.float32):
    tok = () if tokens is None else (tokens,)
    return dict(
        state=torch.randn(batch, heads, hdim, n),
        x=torch.randn(batch, *tok, heads, hdim, dtype=dtype),
        dt=torch.randn(batch, *tok, heads, 1, dtype=dtype).expand(batch, *tok, heads, hdim),
        A=(-torch.rand(heads, 1, 1) * 2).expand(heads, hdim, n),
        B=torch.randn(batch, *tok, groups, n, dtype=dtype),
        C=torch.randn(batch, *tok, groups, n, dtype=dtype),
        D=torch.randn(heads, 1).expand(heads, hdim),
        z=torch.randn(batch, *tok, heads, hdim, dtype=dtype),
        dt_bias=torch.randn(heads, 1).expand(heads, hdim),
    )


@pytest.mark.parametrize("groups", [None, 1, 3])
def test_mamba1_ref_matches_scalar_loop(groups):
    batch, dim, n = 2, 6, 5
    kw = mamba1_inputs(batch, dim, n, groups)
    state0 = kw["state"].clone()
    out = selective_state_update_ref(**kw, dt_softplus=True)
    g = 1 if groups is None else groups
    for bi in range(batch):
        for di in range(dim):
            gi = di // (dim // g)
            bvec = kw["B"][bi] if groups is None else kw["B"][bi, gi]
            cvec = kw["C"][bi] if groups is None else kw["C"][bi, gi]
            h, y = naive_step(state0[bi, di].tolist(), kw["x"][bi, di].item(),
                              kw["dt"][bi, di].item() + kw["dt_bias"][di].item(), kw["A"][di].tolist(),
                              bvec.tolist(), cvec.tolist(), kw["D"][di].item(), kw["z"][bi, di].item(), True)
            assert out[bi, di].item() == pytest.approx(y, rel=1e-4, abs=1e-4)
            torch.testing.assert_close(kw["state"][bi, di], torch.tensor(h), rtol=1e-4, atol=1e-4)


def test_mamba2_ref_matches_scalar_loop():
    batch, heads, hdim, n, groups = 2, 4, 3, 5, 2
    kw = mamba2_inputs(batch, heads, hdim, n, groups)
    state0 = kw["state"].clone()
    out = selective_state_update_ref(**kw, dt_softplus=False)
    for bi in range(batch):
        for hi in range(heads):
            gi = hi // (heads // groups)
            for pi in range(hdim):
                h, y = naive_step(state0[bi, hi, pi].tolist(), kw["x"][bi, hi, pi].item(),
                                  kw["dt"][bi, hi, pi].item() + kw["dt_bias"][hi, pi].item(),
                                  kw["A"][hi, pi].tolist(), kw["B"][bi, gi].tolist(), kw["C"][bi, gi].tolist(),
                                  kw["D"][hi, pi].item(), kw["z"][bi, hi, pi].item(), False)
                assert out[bi, hi, pi].item() == pytest.approx(y, rel=1e-4, abs=1e-4)
                torch.testing.assert_close(kw["state"][bi, hi, pi], torch.tensor(h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_several_tokens_equal_single_steps(layout):
    tokens = 5
    kw = mamba1_inputs(3, 4, 6, tokens=tokens) if layout == "mamba1" else mamba2_inputs(3, 4, 2, 6, 2, tokens=tokens)
    single_state = kw["state"].clone()
    outs = []
    for t in range(tokens):
        step = {k: (v[:, t] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        step["state"] = single_state
        outs.append(selective_state_update(**step, dt_softplus=True, backend="torch"))
    out = selective_state_update(**kw, dt_softplus=True, backend="torch")
    torch.testing.assert_close(out, torch.stack(outs, 1))
    torch.testing.assert_close(kw["state"], single_state)


def test_no_optional_inputs_and_low_precision():
    kw = mamba2_inputs(2, 4, 3, 5, 1, dtype=torch.bfloat16)
    for k in ("D", "z", "dt_bias"):
        kw[k] = None
    st = kw["state"].clone()
    out = selective_state_update(**kw, backend="torch")
    assert out.dtype == torch.bfloat16 and kw["state"].dtype == torch.float32
    dt = kw["dt"].float()[..., None]
    b_heads = kw["B"].float()[:, :, None, :].expand(2, 4, 3, 5)  # one group shared by the 4 heads
    exp_state = st * torch.exp(kw["A"] * dt) + dt * kw["x"].float()[..., None] * b_heads
    torch.testing.assert_close(kw["state"], exp_state)


def test_state_batch_indices_and_padding():
    kw = mamba1_inputs(3, 4, 5)
    pool = torch.randn(6, 4, 5)
    before = pool.clone()
    kw["state"] = pool
    idx = torch.tensor([5, -1, 2], dtype=torch.int32)
    out = selective_state_update(**kw, state_batch_indices=idx, backend="torch")
    for row, slot in ((0, 5), (2, 2)):
        one = {k: (v[row:row + 1] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        one["state"] = before[slot:slot + 1].clone()
        exp = selective_state_update_ref(**one)
        torch.testing.assert_close(out[row:row + 1], exp)
        torch.testing.assert_close(pool[slot], one["state"][0])
    assert torch.all(out[1] == 0)
    for slot in (0, 1, 3, 4):
        assert torch.equal(pool[slot], before[slot])


def test_errors():
    kw = mamba1_inputs(2, 4, 5)
    bad = dict(kw, state=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="state must have 3 or 4"):
        selective_state_update(**bad, backend="torch")
    with pytest.raises(ValueError, match="state must have shape"):
        selective_state_update(**dict(kw, state=torch.zeros(2, 5, 5)), backend="torch")
    with pytest.raises(ValueError, match="dt must have shape"):
        selective_state_update(**dict(kw, dt=torch.zeros(2, 3)), backend="torch")
    with pytest.raises(ValueError, match="A must have shape"):
        selective_state_update(**dict(kw, A=torch.zeros(4, 4)), backend="torch")
    with pytest.raises(ValueError, match="B must have shape"):
        selective_state_update(**dict(kw, B=torch.zeros(2, 4)), backend="torch")
    with pytest.raises(ValueError, match="B and C must have the same shape"):
        selective_state_update(**dict(kw, C=torch.zeros(2, 1, 5)), backend="torch")
    with pytest.raises(ValueError, match="groups G=3"):
        selective_state_update(**dict(kw, B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)), backend="torch")
    with pytest.raises(ValueError, match="D must have shape"):
        selective_state_update(**dict(kw, D=torch.zeros(5)), backend="torch")
    with pytest.raises(ValueError, match="dt_bias must have shape"):
        selective_state_update(**dict(kw, dt_bias=torch.zeros(3)), backend="torch")
    with pytest.raises(ValueError, match="z must have shape"):
        selective_state_update(**dict(kw, z=torch.zeros(2, 3)), backend="torch")
    with pytest.raises(TypeError, match="x must have dtype"):
        selective_state_update(**dict(kw, x=torch.zeros(2, 4, dtype=torch.int64)), backend="torch")
    with pytest.raises(ValueError, match="state must have batch"):
        selective_state_update(**dict(kw, state=torch.zeros(3, 4, 5)), backend="torch")
    with pytest.raises(ValueError, match="state_batch_indices holds 7"):
        selective_state_update(**kw, state_batch_indices=torch.tensor([0, 7], dtype=torch.int32), backend="torch")
    with pytest.raises(TypeError, match="state_batch_indices must have dtype"):
        selective_state_update(**kw, state_batch_indices=torch.zeros(2), backend="torch")
    with pytest.raises(ValueError, match="dt_bias is on meta"):
        selective_state_update(**dict(kw, dt_bias=kw["dt_bias"].to("meta")), backend="torch")
    kw2 = mamba2_inputs(2, 4, 3, 5, 2)
    with pytest.raises(ValueError, match=r"B must have shape \(B, \[T,\] G, N\)"):
        selective_state_update(**dict(kw2, B=torch.zeros(2, 5)), backend="torch")
    with pytest.raises(ValueError, match="groups G=3"):
        selective_state_update(**dict(kw2, B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)), backend="torch")


# ------------------------------------------------------------------ Triton kernel
# On CPU it runs through the Triton interpreter (tiny shapes); on a GPU, natively.

from conftest import assert_close_rule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_atol(ref):
    """The Triton interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so on CPU
    allow one bf16 ulp of the largest value on top of the 2x rule."""
    if torch.cuda.is_available():
        return 1e-2
    return max(1e-2, ref.abs().max().item() * 2.0**-7)


def _to(kw, device, dtype=None):
    out = {}
    for k, v in kw.items():
        if v is None:
            out[k] = None
            continue
        v = v.to(device)
        if dtype is not None and k in ("x", "dt", "B", "C", "z"):
            v = v.to(dtype)
        out[k] = v
    return out


STATE_CASES = [
    ("mamba1", None, None, True),
    ("mamba1", 2, 3, False),
    ("mamba2", None, None, True),
    ("mamba2", 2, 4, True),
]


@pytest.mark.parametrize("layout,groups,tokens,padding", STATE_CASES)
def test_triton_matches_ref(layout, groups, tokens, padding):
    if layout == "mamba1":
        kw = mamba1_inputs(3, 6, 5, groups, tokens)
    else:
        kw = mamba2_inputs(3, 4, 3, 5, groups or 1, tokens)
    kw = _to(kw, DEVICE)
    idx = None
    if padding:
        kw["state"] = torch.randn(5, *kw["state"].shape[1:], device=DEVICE)
        idx = torch.tensor([4, -1, 1], dtype=torch.int32, device=DEVICE)
    state_ref = kw["state"].clone()
    out = selective_state_update(**kw, dt_softplus=True, state_batch_indices=idx, backend="triton")
    exp = selective_state_update_ref(**dict(kw, state=state_ref), dt_softplus=True, state_batch_indices=idx)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw["state"], state_ref, rtol=1e-5, atol=1e-5)


def test_triton_untied_A_and_no_optionals():
    kw = _to(mamba2_inputs(2, 4, 3, 5, 2), DEVICE)
    kw["A"] = -torch.rand(4, 3, 5, device=DEVICE)  # per-channel A: the non-tied path
    kw["D"] = kw["z"] = kw["dt_bias"] = None
    state_ref = kw["state"].clone()
    out = selective_state_update(**kw, backend="triton")
    exp = selective_state_update_ref(**dict(kw, state=state_ref))
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw["state"], state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_triton_bf16_tolerance_rule(layout):
    kw = mamba1_inputs(2, 8, 6, tokens=2) if layout == "mamba1" else mamba2_inputs(2, 4, 4, 6, 2, tokens=2)
    low = _to(kw, DEVICE, torch.bfloat16)
    f32 = {k: (v.float() if v is not None else None) for k, v in low.items()}
    states = [low["state"].clone() for _ in range(3)]
    out = selective_state_update(**dict(low, state=states[0]), dt_softplus=True, backend="triton")
    ref32 = selective_state_update_ref(**dict(f32, state=states[1]), dt_softplus=True)
    ref16 = selective_state_update_ref(**dict(low, state=states[2]), dt_softplus=True)
    assert out.dtype == torch.bfloat16 and states[0].dtype == torch.float32
    assert_close_rule(out, ref32, ref16, atol=_bf16_atol(ref32), name="out")
    torch.testing.assert_close(states[0], states[1], rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_gpu_full_size_bf16(layout):
    if layout == "mamba1":
        kw = mamba1_inputs(64, 2048, 16, dtype=torch.bfloat16)
    else:
        kw = mamba2_inputs(64, 32, 64, 128, 1, dtype=torch.bfloat16)
    kw = _to(kw, DEVICE)
    f32 = {k: (v.float() if v is not None else None) for k, v in kw.items()}
    states = [kw["state"].clone() for _ in range(3)]
    out = selective_state_update(**dict(kw, state=states[0]), dt_softplus=True)
    ref32 = selective_state_update_ref(**dict(f32, state=states[1]), dt_softplus=True)
    ref16 = selective_state_update_ref(**dict(kw, state=states[2]), dt_softplus=True)
    assert_close_rule(out, ref32, ref16, atol=1e-2, name="out")
    torch.testing.assert_close(states[0], states[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_triton_bf16_state(layout):
    """A bf16 state (mamba_ssm's generate keeps the model dtype): half the bytes per step; the
    kernel equals the reference on the same inputs up to the one rounding of the state."""
    kw = mamba1_inputs(3, 6, 5) if layout == "mamba1" else mamba2_inputs(3, 4, 3, 5, 2)
    kw = _to(kw, DEVICE, torch.bfloat16)
    kw["state"] = kw["state"].to(torch.bfloat16)
    state_ref = kw["state"].clone()
    out = selective_state_update(**kw, dt_softplus=True, backend="triton")
    exp = selective_state_update_ref(**dict(kw, state=state_ref), dt_softplus=True)
    assert kw["state"].dtype == torch.bfloat16
    torch.testing.assert_close(kw["state"].float(), state_ref.float(), rtol=0,
                               atol=state_ref.float().abs().max().item() * 2.0**-7)
    torch.testing.assert_close(out.float(), exp.float(), rtol=0, atol=exp.float().abs().max().item() * 2.0**-6)


def test_custom_op_opcheck():
    """The launcher is torch.ops.mamba_pkg.selective_state_update with a matching fake impl."""
    kw = _to(mamba2_inputs(2, 4, 3, 5, 2), DEVICE)
    args = (kw["state"], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["dt_bias"], True, None)
    torch.library.opcheck(torch.ops.mamba_pkg.selective_state_update, args)
    idx = torch.tensor([1, -1], dtype=torch.int32, device=DEVICE)
    args = (kw["state"], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], None, None, None, False, idx)
    torch.library.opcheck(torch.ops.mamba_pkg.selective_state_update, args)


def test_grad_mode_call_skips_the_dispatcher_unless_an_input_needs_grad():
    """A decode step under grad mode (no torch.no_grad around generation) launches directly, as it
    does under no_grad; a call that autograd would record still goes through the custom op."""
    from torch.profiler import ProfilerActivity, profile

    def dispatched(kw):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = selective_state_update(**kw, dt_softplus=True, backend="triton")
        return any(e.name == "mamba_pkg::selective_state_update" for e in prof.events()), out

    kw = _to(mamba2_inputs(2, 4, 3, 5, 2), DEVICE)
    state_ref = kw["state"].clone()
    hit, out = dispatched(kw)
    assert not hit
    torch.testing.assert_close(out, selective_state_update_ref(**dict(kw, state=state_ref), dt_softplus=True),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw["state"], state_ref, rtol=1e-5, atol=1e-5)
    assert dispatched(dict(kw, x=kw["x"].clone().requires_grad_()))[0]


def test_launch_plan_per_signature(monkeypatch):
    """Calls with one signature share a launch plan; another stride gets its own; a tile setting
    changed in place (then clear_plans()) or set as an attribute drops the plans, and each call
    matches the reference."""
    from mamba_pkg.ops import state_update as ssu

    clear_plans()
    kw = _to(mamba1_inputs(3, 8, 5), DEVICE)
    strided = dict(kw, x=torch.randn(3, 16, device=DEVICE)[:, ::2])

    def check(call):
        state_ref = call["state"].clone()
        out = selective_state_update(**call, dt_softplus=True, backend="triton")
        exp = selective_state_update_ref(**dict(call, state=state_ref), dt_softplus=True)
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)

    for call in (kw, kw, strided, strided):
        check(call)
    assert len(ssu._PLANS) == 2
    saved = ssu.TILE_ELEMS[16]
    try:
        ssu.TILE_ELEMS[16] = 16  # BLOCK_P 2 instead of 8: a grid of 4 programs per head
        clear_plans()
        assert not ssu._PLANS
        check(kw)
        assert len(ssu._PLANS) == 1 and next(iter(ssu._PLANS.values())).grid[0] == 4
    finally:
        ssu.TILE_ELEMS[16] = saved
        clear_plans()
    check(kw)
    assert next(iter(ssu._PLANS.values())).grid[0] == 1
    monkeypatch.setattr(ssu, "TILE_ELEMS", {**ssu.TILE_ELEMS, 16: 16})
    assert not ssu._PLANS
    check(kw)
    assert next(iter(ssu._PLANS.values())).grid[0] == 4
