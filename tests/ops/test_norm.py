import math

import pytest
import torch

from mamba_pkg.ops.norm import (
    layer_norm_fn,
    layer_norm_ref,
    rms_norm_fn,
    rms_norm_gated_fn,
    rms_norm_gated_ref,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive_norm_row(row, weight, bias, eps, rms):
    """Plain-Python norm of one row (list of floats)."""
    n = len(row)
    mean = 0.0 if rms else sum(row) / n
    var = sum((v - mean) ** 2 for v in row) / n
    inv = 1.0 / math.sqrt(var + eps)
    return [(v - mean) * inv * w + (0.0 if bias is None else b)
            for v, w, b in zip(row, weight, bias if bias is not None else [0.0] * n)]


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_norm_ref_matches_naive(rms, with_residual):
    x = torch.randn(3, 7, dtype=torch.float64)
    res = torch.randn(3, 7, dtype=torch.float64) if with_residual else None
    w, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    out, s = layer_norm_ref(x, w, b, res, eps=1e-5, prenorm=True, is_rms_norm=rms)
    s_exp = x + res if with_residual else x
    torch.testing.assert_close(s, s_exp)
    for i in range(3):
        exp = naive_norm_row(s_exp[i].tolist(), w.tolist(), b.tolist(), 1e-5, rms)
        torch.testing.assert_close(out[i], torch.tensor(exp, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True])
def test_add_norm_backward_matches_autograd_of_naive(rms):
    x = torch.randn(5, 13, requires_grad=True)
    res = torch.randn(5, 13, requires_grad=True)
    w = torch.randn(13, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    out, s = layer_norm_fn(x, w, b, res, eps=1e-6, prenorm=True, is_rms_norm=rms, backend="torch")
    sn = x + res
    if rms:
        exp = sn / torch.sqrt(sn.pow(2).mean(-1, keepdim=True) + 1e-6) * w + b
    else:
        exp = torch.nn.functional.layer_norm(sn, (13,), w, b, 1e-6)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    g, gs = torch.randn_like(out), torch.randn_like(s)
    grads = torch.autograd.grad((out * g).sum() + (s * gs).sum(), (x, res, w, b))
    grads_exp = torch.autograd.grad((exp * g).sum() + (sn * gs).sum(), (x, res, w, b))
    for a, e in zip(grads, grads_exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_residual_dtypes_and_rms_norm_fn():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    res = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    w = torch.randn(16)
    out, s = rms_norm_fn(x, w, None, res, prenorm=True, residual_in_fp32=True, backend="torch")
    assert out.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(s, x.float() + res.float())
    _, s2 = rms_norm_fn(x, w, None, res, prenorm=True, backend="torch")
    assert s2.dtype == torch.bfloat16
    out_only = rms_norm_fn(x, w, None, res, backend="torch")
    assert torch.equal(out_only, out)
    _, s3 = rms_norm_fn(x, w, None, None, prenorm=True, residual_in_fp32=True, backend="torch")
    assert s3.dtype == torch.float32 and torch.equal(s3, x.float())


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_ref_matches_naive_fwd_bwd(norm_before_gate, group_size):
    x = torch.randn(3, 12, requires_grad=True)
    z = torch.randn(3, 12, requires_grad=True)
    w = torch.randn(12, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    out = rms_norm_gated_fn(x, w, b, z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate,
                            backend="torch")
    gs = 12 if group_size is None else group_size
    rows = []
    for i in range(3):
        gate = [zz / (1 + math.exp(-zz)) for zz in z[i].tolist()]
        xr = x[i].tolist()
        if not norm_before_gate:
            xr = [a * g for a, g in zip(xr, gate)]
        y = []
        for g0 in range(0, 12, gs):
            y += naive_norm_row(xr[g0:g0 + gs], w[g0:g0 + gs].tolist(), b[g0:g0 + gs].tolist(), 1e-5, True)
        if norm_before_gate:
            y = [a * g for a, g in zip(y, gate)]
        rows.append(y)
    torch.testing.assert_close(out, torch.tensor(rows), rtol=1e-5, atol=1e-5)
    # Backward against autograd of an independent torch formulation.
    xs = x * torch.sigmoid(z) * z if not norm_before_gate else x
    xg = xs.view(3, 12 // gs, gs)
    exp = (xg / xg.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 12) * w + b
    if norm_before_gate:
        exp = exp * z * torch.sigmoid(z)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (x, z, w, b))
    grads_exp = torch.autograd.grad((exp * g).sum(), (x, z, w, b))
    for a, e in zip(grads, grads_exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_gated_without_z_is_rms_norm():
    x = torch.randn(4, 10, dtype=torch.float16)
    w = torch.randn(10)
    out = rms_norm_gated_ref(x, w, None, None)
    torch.testing.assert_close(out, rms_norm_fn(x, w, None, backend="torch"))
    assert out.dtype == torch.float16


def test_errors():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm_fn(x, torch.randn(7), None, backend="torch")
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm_fn(x, w, torch.randn(9), backend="torch")
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm_fn(x, w, None, torch.randn(4, 7), backend="torch")
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm_fn(x.long(), w, None, backend="torch")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rms_norm_fn([1.0], w, None, backend="torch")
    with pytest.raises(ValueError, match="eps must be"):
        rms_norm_fn(x, w, None, eps=-1.0, backend="torch")
    with pytest.raises(ValueError, match="group_size must be"):
        rms_norm_gated_fn(x, w, None, x, group_size=3, backend="torch")
    with pytest.raises(ValueError, match="z must have shape"):
        rms_norm_gated_fn(x, w, None, torch.randn(4, 9), backend="torch")
    with pytest.raises(ValueError, match="backend="):
        rms_norm_fn(x, w, None, backend="gpu")


# ------------------------------------------------------------------ Triton kernels
# On CPU they run through the Triton interpreter (tiny shapes); on a GPU, natively.

from conftest import assert_close_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_atol(ref):
    """The Triton interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so on CPU
    allow one bf16 ulp of the largest value on top of the 2x rule."""
    if torch.cuda.is_available():
        return 1e-2
    return max(1e-2, ref.abs().max().item() * 2.0**-7)


def _add_norm_run(backend, x, w, b, res, prenorm, res_fp32, rms, g, gs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, res)]
    out = layer_norm_fn(leaves[0], leaves[1], leaves[2], leaves[3], 1e-5, prenorm, res_fp32, rms, backend=backend)
    outs = out if prenorm else (out,)
    loss = (outs[0].float() * g).sum()
    if prenorm:
        loss = loss + (outs[1].float() * gs).sum()
    loss.backward()
    return list(outs) + [t.grad for t in leaves if t is not None]


ADD_NORM_CASES = [  # (rms, residual, prenorm, residual_in_fp32, bias)
    (True, True, True, True, False),
    (True, False, False, False, True),
    (False, True, True, False, True),
    (False, False, True, True, True),
]


@pytest.mark.parametrize("rms,has_res,prenorm,res_fp32,has_bias", ADD_NORM_CASES)
def test_triton_add_norm_matches_ref(rms, has_res, prenorm, res_fp32, has_bias):
    shape = (3, 5, 7)
    x = torch.randn(*shape, device=DEVICE)
    res = torch.randn(*shape, device=DEVICE) if has_res else None
    w = torch.randn(7, device=DEVICE)
    b = torch.randn(7, device=DEVICE) if has_bias else None
    g, gs = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    got = _add_norm_run("triton", x, w, b, res, prenorm, res_fp32, rms, g, gs)
    exp = _add_norm_run("torch", x, w, b, res, prenorm, res_fp32, rms, g, gs)
    for a, e in zip(got, exp):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_triton_add_rms_norm_bf16_tolerance_rule():
    shape = (4, 6, 40)
    x, res = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    g, gs = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    low = [t.to(torch.bfloat16) for t in (x, w, b, res)]
    got = _add_norm_run("triton", *low, True, True, True, g, gs)
    ref32 = _add_norm_run("torch", *[t.float() for t in low], True, True, True, g, gs)
    ref16 = _add_norm_run("torch", *low, True, True, True, g, gs)
    assert got[1].dtype == torch.float32  # residual_in_fp32
    for name, a, r32, r16 in zip(["out", "residual", "dx", "dw", "db", "dres"], got, ref32, ref16):
        assert_close_rule(a, r32, r16, atol=_bf16_atol(r32), name=name)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size,has_z,has_bias", [(None, True, True), (4, True, False), (3, False, True)])
def test_triton_gated_matches_ref(norm_before_gate, group_size, has_z, has_bias):
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    z = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True) if has_z else None
    w = torch.randn(12, device=DEVICE, requires_grad=True)
    b = torch.randn(12, device=DEVICE, requires_grad=True) if has_bias else None
    out = rms_norm_gated_fn(x, w, b, z, 1e-5, group_size, norm_before_gate, backend="triton")
    exp = rms_norm_gated_ref(x, w, b, z, 1e-5, group_size, norm_before_gate)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [t for t in (x, z, w, b) if t is not None]
    for a, e in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(exp, params, g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("rms", [True, False])
def test_gpu_add_norm_bf16_large(rms):
    shape = (4, 100, 2560)
    x, res = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    w, b = torch.randn(2560, device=DEVICE), torch.randn(2560, device=DEVICE)
    g, gs = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    low = [t.to(torch.bfloat16) for t in (x, w, b, res)]
    got = _add_norm_run("triton", *low, True, True, rms, g, gs)
    ref32 = _add_norm_run("torch", *[t.float() for t in low], True, True, rms, g, gs)
    ref16 = _add_norm_run("torch", *low, True, True, rms, g, gs)
    for name, a, r32, r16 in zip(["out", "residual", "dx", "dw", "db", "dres"], got, ref32, ref16):
        assert_close_rule(a, r32, r16, atol=_bf16_atol(r32), name=name)


@requires_cuda
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gpu_gated_bf16_large(norm_before_gate):
    x = torch.randn(300, 4096, device=DEVICE).to(torch.bfloat16).requires_grad_()
    z = torch.randn(300, 4096, device=DEVICE).to(torch.bfloat16).requires_grad_()
    w = torch.randn(4096, device=DEVICE).to(torch.bfloat16).requires_grad_()
    g = torch.randn(300, 4096, device=DEVICE)
    outs = []
    for fn, cast in ((lambda *a: rms_norm_gated_fn(*a, backend="triton"), None), (rms_norm_gated_ref, torch.float32),
                     (rms_norm_gated_ref, None)):
        args = [t.detach().to(cast or t.dtype).requires_grad_() for t in (x, w, z)]
        out = fn(args[0], args[1], None, args[2], 1e-5, 1024, norm_before_gate)
        grads = torch.autograd.grad((out.float() * g).sum(), args)
        outs.append([out, *grads])
    for name, a, r32, r16 in zip(["out", "dx", "dw", "dz"], *outs):
        assert_close_rule(a, r32, r16, atol=_bf16_atol(r32), name=name)


# --- torch.library registration: each launcher is an opaque custom op for torch.compile ---


def _opcheck_cases():
    x, res = torch.randn(5, 12, device=DEVICE), torch.randn(5, 12, device=DEVICE)
    w, b, dy = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE), torch.randn(5, 12, device=DEVICE)
    rstd, mean = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    none_f32 = torch.empty(0, device=DEVICE)
    ops = torch.ops.mamba_pkg
    return [
        (ops.add_norm_fwd, (x, res, w, b, 1e-5, False, torch.float32, True)),
        (ops.add_norm_fwd, (x.bfloat16(), None, w, None, 1e-5, True, torch.float32, True)),
        (ops.add_norm_bwd, (x, w, b, dy, dy, mean, rstd, False, torch.float32, torch.float32)),
        (ops.add_norm_bwd, (x, w, None, dy, None, none_f32, rstd, True, torch.bfloat16, None)),
        (ops.rms_norm_gated_fwd, (x, res, w, None, 1e-5, 4, True)),
        (ops.rms_norm_gated_bwd, (x, res, w, b, dy, torch.rand(5, 3, device=DEVICE) + 0.5, 4, False)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_norm_custom_ops_opcheck(case):
    """Schema, fake (meta) implementation and AOT dispatch of each registered launcher agree with
    the real op (torch.library.opcheck)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_norm_compiles_to_one_graph_with_custom_ops():
    """torch.compile(fullgraph=True) of add+norm and gated norm (Triton backend) equals eager; the
    launches appear as mamba_pkg custom ops in the forward and backward graphs."""
    from compile_check import compiled_matches_eager

    def step(x, res, w, b):
        out, s = layer_norm_fn(x, w, b, res, prenorm=True, residual_in_fp32=True, backend="triton")
        gated = rms_norm_gated_fn(out, w, None, z=s, group_size=4, norm_before_gate=False, backend="triton")
        return (gated * gated).sum() + s.sum()

    leaves = [torch.randn(2, 3, 12, device=DEVICE), torch.randn(2, 3, 12, device=DEVICE),
              torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)]
    forward, backward = compiled_matches_eager(step, leaves)
    assert "mamba_pkg.add_norm_fwd" in forward and "mamba_pkg.rms_norm_gated_fwd" in forward
    assert "mamba_pkg.add_norm_bwd" in backward and "mamba_pkg.rms_norm_gated_bwd" in backward
