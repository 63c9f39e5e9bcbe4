import math

import pytest
import torch

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
    exp_state = st * torch.exp(kw["A"] * dt) + dt * kw["x"].float()[..., None] * kw["B"].float()[:, :, None, :].expand(2, 4, 3, 5)
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
    kw2 = mamba2_inputs(2, 4, 3, 5, 2)
    with pytest.raises(ValueError, match=r"B must have shape \(B, \[T,\] G, N\)"):
        selective_state_update(**dict(kw2, B=torch.zeros(2, 5)), backend="torch")
    with pytest.raises(ValueError, match="groups G=3"):
        selective_state_update(**dict(kw2, B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)), backend="torch")
