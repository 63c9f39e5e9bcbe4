import math

import pytest
import torch
import torch.nn.functional as F

import mamba_pkg.ops.ssm_decode_step as sds
from mamba_pkg.ops.ssm_decode_step import ssm_decode_step, ssm_decode_step_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mamba1_inputs(batch, dim, n, rank, groups=None, dtype=torch.float32, device=DEVICE):
    """Inputs as Mamba.step makes them: x and z are the two halves of one in_proj output, dt_low,
    B, C slices of one x_proj output (strided views, not copies)."""
    g = () if groups is None else (groups,)
    g_n = n * (groups or 1)
    xz = torch.randn(batch, 2 * dim, device=device, dtype=dtype)
    x_dbl = torch.randn(batch, rank + 2 * g_n, device=device, dtype=dtype)
    return dict(
        state=torch.randn(batch, dim, n, device=device),
        x=xz[:, :dim],
        dt=x_dbl[:, :rank],
        A_log=torch.randn(dim, n, device=device) * 0.5,
        B=x_dbl[:, rank:rank + g_n].reshape(batch, *g, n),
        C=x_dbl[:, rank + g_n:].reshape(batch, *g, n),
        D=torch.randn(dim, device=device),
        z=xz[:, dim:],
        dt_bias=torch.randn(dim, device=device),
        dt_proj_weight=torch.randn(dim, rank, device=device, dtype=dtype) / math.sqrt(rank),
    )


def mamba2_inputs(batch, heads, hdim, n, groups, dtype=torch.float32, device=DEVICE):
    """x, B, C slices of a conv output (B, H*P + 2*G*N); dt a slice of an in_proj output."""
    xbc = torch.randn(batch, heads * hdim + 2 * groups * n, device=device, dtype=dtype)
    zdt = torch.randn(batch, heads * hdim + heads, device=device, dtype=dtype)
    d_ssm = heads * hdim
    return dict(
        state=torch.randn(batch, heads, hdim, n, device=device),
        x=xbc[:, :d_ssm].view(batch, heads, hdim),
        dt=zdt[:, d_ssm:],
        A_log=torch.rand(heads, device=device).log(),
        B=xbc[:, d_ssm:d_ssm + groups * n].view(batch, groups, n),
        C=xbc[:, d_ssm + groups * n:].view(batch, groups, n),
        D=torch.randn(heads, device=device),
        z=zdt[:, :d_ssm].view(batch, heads, hdim),
        dt_bias=torch.randn(heads, device=device),
    )


def explicit_step(kw, dt_limit=(0.0, float("inf"))):
    """The unfused chain written out in fp32 (independent of the op's reference): returns (out, new state)."""
    f = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    state = f["state"]
    if state.dim() == 3:
        dt = f["dt"] @ f["dt_proj_weight"].t() if f.get("dt_proj_weight") is not None else f["dt"]
        dt = F.softplus(dt + f["dt_bias"]).clamp(*dt_limit)[..., None]  # (B, D, 1)
        A = -torch.exp(f["A_log"])
        Bm, Cm = f["B"], f["C"]
        if Bm.dim() == 2:
            Bm, Cm = Bm[:, None], Cm[:, None]
        rep = state.shape[1] // Bm.shape[1]
        Bh, Ch = Bm.repeat_interleave(rep, 1), Cm.repeat_interleave(rep, 1)  # (B, D, N)
        x = f["x"][..., None]
        D = f["D"]
    else:
        dt = F.softplus(f["dt"] + f["dt_bias"]).clamp(*dt_limit)[..., None, None]  # (B, H, 1, 1)
        A = -torch.exp(f["A_log"])[:, None, None]
        rep = state.shape[1] // f["B"].shape[1]
        Bh = f["B"].repeat_interleave(rep, 1)[:, :, None, :]
        Ch = f["C"].repeat_interleave(rep, 1)[:, :, None, :]
        x = f["x"][..., None]
        D = f["D"] if f["D"].dim() == 2 else f["D"][:, None]
    new_state = state * torch.exp(A * dt) + dt * x * Bh
    out = (new_state * Ch).sum(-1) + D * f["x"]
    if f.get("z") is not None:
        out = out * F.silu(f["z"])
    return out, new_state


def _check(kw, dt_limit=(0.0, float("inf")), backend=None, tol=1e-5):
    state0 = kw["state"].clone()
    inputs = {k: v for k, v in dict(kw, state=state0).items() if k != "state_ready"}
    exp_out, exp_state = explicit_step(inputs, dt_limit)
    out = ssm_decode_step(**kw, dt_limit=dt_limit, backend=backend)
    assert out.shape == kw["x"].shape and out.dtype == kw["x"].dtype
    torch.testing.assert_close(out.double(), exp_out, rtol=tol, atol=tol)
    torch.testing.assert_close(kw["state"].double(), exp_state.to(kw["state"].dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("groups", [None, 2])
def test_ref_mamba1_matches_explicit_chain(groups):
    _check(mamba1_inputs(3, 4, 5, 3, groups, device="cpu"), backend="torch")


def test_ref_mamba2_matches_explicit_chain_with_limit_and_per_channel_D():
    kw = mamba2_inputs(2, 4, 3, 5, 2, device="cpu")
    kw["D"] = torch.randn(4, 3)
    _check(kw, dt_limit=(0.05, 0.5), backend="torch")


# ------------------------------------------------------------------ Triton kernel (interpreter on CPU)


@pytest.mark.parametrize("groups,batch", [(None, 1), (2, 5), (None, 19)])
def test_triton_mamba1(groups, batch):
    """One row per program (batch 1), several rows with the in-kernel projection (ragged last
    block of rows and of channels), and from CUBLAS_DT_BATCH rows dt by a GEMM first."""
    config = sds._launch_config(batch, 40, 5, 3, False)
    assert (config[0] > 1) == (batch > 1) and config[1] == sds.PROJ_BLOCK_P < 40
    assert (batch >= sds.CUBLAS_DT_BATCH) == (batch == 19)
    _check(mamba1_inputs(batch, 40, 5, 3, groups), backend="triton")


@pytest.mark.parametrize("batch", [19, 70])
def test_triton_mamba1_dt_proj_rows(batch, monkeypatch):
    """From CUBLAS_DT_BATCH rows dt_proj is a product first: decode_linear (DT_PROJ_DOT, 16-bit weight)
    up to its MAX_ROWS rows, F.linear above (counted); both equal the reference on the rounded dt."""
    calls = []
    real = sds.decode_linear
    monkeypatch.setattr(sds, "decode_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = mamba1_inputs(batch, 40, 5, 3, dtype=torch.bfloat16)
    state_ref = kw["state"].clone()
    out = ssm_decode_step(**kw, backend="triton")
    assert len(calls) == (1 if batch <= 64 else 0)
    ref_kw = dict(kw, state=state_ref, dt=F.linear(kw["dt"], kw["dt_proj_weight"]), dt_proj_weight=None)
    torch.testing.assert_close(out.float(), ssm_decode_step_ref(**ref_kw).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kw["state"], state_ref, rtol=1e-3, atol=1e-3)


def test_triton_mamba1_without_dt_proj_or_optionals():
    kw = mamba1_inputs(2, 4, 3, 4)
    kw["dt"] = torch.randn(2, 4, device=DEVICE)
    kw["dt_proj_weight"] = kw["D"] = kw["z"] = kw["dt_bias"] = None
    state_ref = kw["state"].clone()
    out = ssm_decode_step(**kw, backend="triton")
    exp = ssm_decode_step_ref(**dict(kw, state=state_ref))
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kw["state"], state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel_D,state_ready", [(False, False), (True, False), (False, True)])
def test_triton_mamba2(per_channel_D, state_ready):
    """state_ready: the state is loaded before the PDL wait (the same result)."""
    kw = mamba2_inputs(3, 4, 3, 5, 2)
    if per_channel_D:
        kw["D"] = torch.randn(4, 3, device=DEVICE)
        kw["z"] = None
    if state_ready:
        kw["state_ready"] = True
    _check(kw, dt_limit=(0.0, float("inf")) if per_channel_D else (0.05, 0.7), backend="triton")


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_triton_low_precision_state_and_inputs(layout):
    """bf16 activations and a bf16 state (what mamba_ssm's generate keeps): equal to the
    reference on the same inputs up to the state's one rounding per step."""
    kw = mamba1_inputs(2, 8, 6, 4, dtype=torch.bfloat16) if layout == "mamba1" else mamba2_inputs(2, 4, 4, 6, 1, dtype=torch.bfloat16)
    kw["state"] = kw["state"].to(torch.bfloat16)
    state_ref = kw["state"].clone()
    out = ssm_decode_step(**kw, backend="triton")
    exp = ssm_decode_step_ref(**dict(kw, state=state_ref))
    assert out.dtype == torch.bfloat16 and kw["state"].dtype == torch.bfloat16
    scale = exp.float().abs().max().item()
    torch.testing.assert_close(out.float(), exp.float(), rtol=0, atol=scale * 2.0**-6)
    s_scale = state_ref.float().abs().max().item()
    torch.testing.assert_close(kw["state"].float(), state_ref.float(), rtol=0, atol=s_scale * 2.0**-7)


@pytest.mark.parametrize("tile_elems", [None, 32])
def test_triton_mamba2_norm_weight(tile_elems, monkeypatch):
    """norm_weight (the RMSNorm after the gate folded in): out * norm_weight and partial sums of squares
    that add up to each row's sum of squares of the gated output (two programs per head with 32-element
    tiles); the state as without it. Tolerance rule: the kernel's error against the fp32 reference is
    at most 2x that of the bf16 chain it replaces (the gated output rounded, then times the weight)."""
    if tile_elems:
        monkeypatch.setattr(sds, "TILE_ELEMS", {16: tile_elems, 128: tile_elems})
    kw = mamba2_inputs(3, 4, 6, 5, 1, dtype=torch.bfloat16)
    nw = torch.rand(24, device=DEVICE) + 0.5
    state0 = kw["state"].clone()
    out, sums = ssm_decode_step(**kw, norm_weight=nw, backend="triton")
    if tile_elems:
        assert sums.shape == (3, 8)  # (B, H * 2)
    plain_state = state0.clone()
    plain = ssm_decode_step(**dict(kw, state=plain_state), backend="triton")
    torch.testing.assert_close(kw["state"], plain_state, rtol=0, atol=0)
    exp, exp_sums = ssm_decode_step_ref(**dict(kw, state=state0.clone()), norm_weight=nw)
    fp32 = ssm_decode_step_ref(**dict(kw, state=state0.clone(), x=kw["x"].float(), z=kw["z"].float()))
    exact = fp32 * nw.view(4, 6)
    chain = (plain.float() * nw.view(4, 6)).to(torch.bfloat16).float()
    assert out.dtype == torch.bfloat16
    assert (out.float() - exact).abs().max() <= 2 * (chain - exact).abs().max() + 1e-3
    torch.testing.assert_close(sums.sum(1), exp_sums.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exp_sums.sum(1), fp32.square().sum((1, 2)), rtol=1e-6, atol=1e-6)


def test_norm_weight_errors():
    kw = mamba2_inputs(2, 4, 3, 5, 1, device="cpu")
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(12\)"):
        ssm_decode_step(**kw, norm_weight=torch.ones(4))
    with pytest.raises(ValueError, match="norm_weight needs the Mamba-2 layout"):
        ssm_decode_step(**dict(kw, z=None), norm_weight=torch.ones(12))
    with pytest.raises(ValueError, match="norm_weight needs the Mamba-2 layout"):
        ssm_decode_step(**mamba1_inputs(2, 4, 5, 3, device="cpu"), norm_weight=torch.ones(4))
    with pytest.raises(ValueError, match="norm_weight is on meta"):
        ssm_decode_step(**kw, norm_weight=torch.ones(12, device="meta"))


def test_norm_weight_opcheck():
    kw = mamba2_inputs(2, 4, 3, 5, 1)
    args = (kw["state"], kw["x"], kw["dt"], kw["A_log"], kw["B"], kw["C"], kw["D"], kw["z"], kw["dt_bias"],
            [0.0, float("inf")], torch.rand(12, device=DEVICE) + 0.5, False)
    torch.library.opcheck(torch.ops.mamba_pkg.ssm_decode_step_norm, args)


def test_errors():
    kw = mamba1_inputs(2, 4, 5, 3, device="cpu")
    with pytest.raises(ValueError, match="state must have 3 or 4"):
        ssm_decode_step(**dict(kw, state=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="x must have shape"):
        ssm_decode_step(**dict(kw, x=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="dt_proj_weight must have shape"):
        ssm_decode_step(**dict(kw, dt_proj_weight=torch.zeros(4, 2)))
    with pytest.raises(ValueError, match="dt must have shape"):
        ssm_decode_step(**dict(kw, dt_proj_weight=None))
    with pytest.raises(ValueError, match="A_log must have shape"):
        ssm_decode_step(**dict(kw, A_log=torch.zeros(4)))
    with pytest.raises(ValueError, match="B and C must have the same shape"):
        ssm_decode_step(**dict(kw, C=torch.zeros(2, 1, 5)))
    with pytest.raises(ValueError, match="groups G=3"):
        ssm_decode_step(**dict(kw, B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)))
    with pytest.raises(TypeError, match="z must have dtype"):
        ssm_decode_step(**dict(kw, z=torch.zeros(2, 4, dtype=torch.int32)))
    with pytest.raises(ValueError, match="dt_limit"):
        ssm_decode_step(**kw, dt_limit=(1.0, 0.5))
    kw2 = mamba2_inputs(2, 4, 3, 5, 2, device="cpu")
    with pytest.raises(ValueError, match=r"dt must have shape \(2, 4\)"):
        ssm_decode_step(**dict(kw2, dt=torch.zeros(2, 4, 3)))
    with pytest.raises(ValueError, match="dt_proj_weight is for the Mamba-1 layout"):
        ssm_decode_step(**kw2, dt_proj_weight=torch.zeros(12, 2))
    with pytest.raises(ValueError, match="D must have shape"):
        ssm_decode_step(**dict(kw2, D=torch.zeros(3)))
    with pytest.raises(ValueError, match="A_log must have shape"):
        ssm_decode_step(**dict(kw2, A_log=torch.zeros(4, 3, 5)))
    with pytest.raises(TypeError, match="D must be a torch.Tensor"):
        ssm_decode_step(**dict(kw2, D=[1.0] * 4))
    with pytest.raises(ValueError, match=r"B must have shape \(2, \*, 5\)"):
        ssm_decode_step(**dict(kw2, B=torch.zeros(2, 2, 4), C=torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match="dt_bias must have dtype"):
        ssm_decode_step(**dict(kw2, dt_bias=torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="dt_bias is on meta"):
        ssm_decode_step(**dict(kw2, dt_bias=torch.zeros(4, device="meta")))
    with pytest.raises(ValueError, match="B must have shape"):
        ssm_decode_step(**dict(kw, B=torch.zeros(2, 4), C=torch.zeros(2, 4)))


@requires_cuda
@pytest.mark.parametrize("layout,batch", [("mamba1", 1), ("mamba1", 64), ("mamba2", 64)])
def test_gpu_full_size(layout, batch):
    if layout == "mamba1":
        kw = mamba1_inputs(batch, 4096, 16, 128, dtype=torch.bfloat16)
    else:
        kw = mamba2_inputs(batch, 32, 64, 128, 1, dtype=torch.bfloat16)
    state_ref = kw["state"].clone()
    out = ssm_decode_step(**kw)
    ref_kw = dict(kw, state=state_ref)
    if layout == "mamba1" and batch >= sds.CUBLAS_DT_BATCH:  # dt from a bf16 GEMM, rounded once
        ref_kw.update(dt=F.linear(kw["dt"], kw["dt_proj_weight"]), dt_proj_weight=None)
    exp = ssm_decode_step_ref(**ref_kw)
    torch.testing.assert_close(out.float(), exp.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kw["state"], state_ref, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("heads", [24, 64])
def test_gpu_norm_weight_full_size(heads):
    """The fold at mamba2-130m / -1.3b's batch-64 shapes: the same state as without it, out * norm_weight
    within one rounding of the unfolded output times the weight, sums as the reference's."""
    kw = mamba2_inputs(64, heads, 64, 128, 1, dtype=torch.bfloat16)
    kw["state"] = kw["state"].to(torch.bfloat16)
    nw = torch.rand(heads * 64, device="cuda") + 0.5
    state0 = kw["state"].clone()
    out, sums = ssm_decode_step(**kw, norm_weight=nw)
    plain = ssm_decode_step(**dict(kw, state=state0))
    assert torch.equal(kw["state"], state0)
    torch.testing.assert_close(out.float(), plain.float() * nw.view(heads, 64), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(sums.sum(1), plain.float().square().sum((1, 2)), rtol=1e-2, atol=1e-2)


@requires_cuda
def test_gpu_late_dependents_same_bits(monkeypatch):
    """Mamba-2 at batch 64 with the successor's early launch withheld (LATE_DEPENDENTS_ROWS): the same
    outputs and states."""
    kw = mamba2_inputs(64, 32, 64, 128, 1, dtype=torch.bfloat16)
    state0 = kw["state"].clone()
    runs = []
    for rows in (None, 16):
        monkeypatch.setattr(sds, "LATE_DEPENDENTS_ROWS", rows)
        kw["state"].copy_(state0)
        runs.append((ssm_decode_step(**kw), kw["state"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@requires_cuda
def test_gpu_state_ready_after_a_barrier_product():
    """The Mamba-2 chain at mamba2-1.3b's batch-1 sizes, three steps: a product of 4256 programs
    (decode_linear, a barrier: completes_before_next) then the SSM step loading its state before the
    PDL wait; the same outputs and states as the chain without state_ready."""
    from mamba_pkg.ops.decode_linear import completes_before_next, decode_linear

    torch.manual_seed(0)
    w = torch.randn(8512, 2048, device="cuda", dtype=torch.bfloat16) / 45
    assert completes_before_next(1, w)
    u = torch.randn(3, 1, 2048, device="cuda", dtype=torch.bfloat16)
    A_log, D, dt_bias = torch.randn(64, device="cuda"), torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    runs = []
    for ready in (False, True):
        state = torch.zeros(1, 64, 64, 128, device="cuda", dtype=torch.bfloat16)
        outs = []
        for t in range(3):
            proj = decode_linear(u[t], w)
            x, z, B, C, dt = torch.split(proj, [4096, 4096, 128, 128, 64], dim=-1)
            outs.append(ssm_decode_step(state, x.view(1, 64, 64), dt, A_log, B.view(1, 1, 128), C.view(1, 1, 128), D,
                                        z.view(1, 64, 64), dt_bias, state_ready=ready))
        torch.cuda.synchronize()
        runs.append((torch.stack(outs), state))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_compiles_to_one_graph_with_the_custom_op():
    """torch.compile(fullgraph=True) of the step (Triton backend) equals eager: the launcher is
    an opaque custom op that updates the state in place."""
    kw = mamba1_inputs(2, 4, 3, 4)

    def step(state):
        return ssm_decode_step(state, kw["x"], kw["dt"], kw["A_log"], kw["B"], kw["C"], kw["D"], kw["z"],
                               kw["dt_bias"], kw["dt_proj_weight"], backend="triton")

    states = [kw["state"].clone(), kw["state"].clone()]
    eager = step(states[0])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(states[1])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(states[1], states[0])
