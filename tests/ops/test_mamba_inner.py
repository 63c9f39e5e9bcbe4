"""mamba_inner_fn (conv1d -> x_proj -> dt_proj -> selective scan -> out_proj) against
mamba_inner_ref, forward and every gradient; recompute levels; packed sequences;
bad input; on CUDA realistic shapes and activation memory against mamba_ssm."""

import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.ops.mamba_inner import mamba_inner_fn, mamba_inner_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_params(batch, dim, seqlen, dstate=4, rank=2, d_model=6, width=4, device="cpu", dtype=torch.float32,
                conv_3d=False):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    conv_w = rnd(dim, width, scale=0.5)
    p = dict(
        xz=rnd(batch, 2 * dim, seqlen).to(dtype),
        conv1d_weight=(conv_w[:, None, :] if conv_3d else conv_w).to(dtype),
        conv1d_bias=rnd(dim, scale=0.1).to(dtype),
        x_proj_weight=rnd(rank + 2 * dstate, dim, scale=dim ** -0.5).to(dtype),
        delta_proj_weight=rnd(dim, rank, scale=rank ** -0.5).to(dtype),
        out_proj_weight=rnd(d_model, dim, scale=dim ** -0.5).to(dtype),
        out_proj_bias=rnd(d_model, scale=0.1).to(dtype),
        A=-torch.exp(rnd(dim, dstate, scale=0.5)),
        D=rnd(dim),
        delta_bias=rnd(dim, scale=0.3) - 1.0,
    )
    return p


def _grads(fn, params, dout, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in params.items()}
    out = fn(**leaves, **kw)
    wanted = {k: v for k, v in leaves.items() if v is not None}
    grads = torch.autograd.grad((out.float() * dout).sum(), list(wanted.values()))
    return out, dict(zip(wanted, grads))


def _check(params, device, **kw):
    params = {k: v.to(device) if v is not None else None for k, v in params.items()}
    out_ref = mamba_inner_ref(**params, cu_seqlens=kw.get("cu_seqlens"))
    dout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(5)).to(device)
    out, grads = _grads(mamba_inner_fn, params, dout, backend="triton", **kw)
    ref, ref_grads = _grads(mamba_inner_ref, params, dout, cu_seqlens=kw.get("cu_seqlens"))
    tol = dict(rtol=1e-4, atol=1e-4) if params["xz"].dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out, ref, **tol)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale, **tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("checkpoint_lvl", [0, 1])
def test_inner_kernel_matches_ref(checkpoint_lvl):
    _check(make_params(2, 4, 7, conv_3d=checkpoint_lvl == 1), DEV, checkpoint_lvl=checkpoint_lvl)


def test_inner_without_conv_bias_matches_ref():
    params = make_params(2, 4, 9)
    params["conv1d_bias"] = None
    _check(params, DEV)


def test_inner_proj_biases_match_ref():
    """The written-out backward (B and C from x_proj) with B/C projection biases, every gradient."""
    params = make_params(2, 4, 9)
    g = torch.Generator().manual_seed(7)
    params.update(B_proj_bias=torch.randn(4, generator=g), C_proj_bias=torch.randn(4, generator=g))
    _check(params, DEV)


def _count_dz_copies(monkeypatch):
    """Calls of the backward's two ways to build dxz: the conv writing around the scan's dz buffer
    (adopted) or a new buffer with dz copied in."""
    from mamba_pkg.ops import mamba_inner as mi

    calls = {"adopted": 0, "copied": 0}
    for name, key in (("_conv_bwd_into_dxz", "adopted"), ("_conv_bwd_dxz", "copied")):
        real = getattr(mi, name)
        monkeypatch.setattr(mi, name, lambda *a, real=real, key=key: calls.__setitem__(key, calls[key] + 1) or real(*a))
    return calls


def test_inner_dz_written_into_dxz(monkeypatch):
    """The scan's backward writes dz into the z half of a buffer in xz's layout, which becomes xz's
    gradient (no copy of dz); packed sequences take the conv's autograd (neither)."""
    calls = _count_dz_copies(monkeypatch)
    _check(make_params(2, 4, 9), DEV)
    assert calls == {"adopted": 1, "copied": 0}


def test_inner_xz_as_a_view_of_in_proj_output(monkeypatch):
    """Mamba's xz is a (B, 2D, L) view of in_proj's (2D, B * L) product: the gradient comes back in
    that layout (no extra permute copy, dz written in place by the scan) and matches the reference's."""
    calls = _count_dz_copies(monkeypatch)
    params = {k: v.to(DEV) for k, v in make_params(2, 4, 9).items()}
    base = params.pop("xz").permute(1, 0, 2).reshape(8, 2 * 9)  # (2D, B * L)
    dout = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(5)).to(DEV)
    grads, layouts = {}, []
    for name, fn, kw in (("ours", mamba_inner_fn, {"backend": "triton"}), ("ref", mamba_inner_ref, {})):
        leaf = base.detach().clone().requires_grad_(True)
        xz = leaf.reshape(8, 2, 9).permute(1, 0, 2)  # (B, 2D, L) with strides (L, B * L, 1)
        xz.register_hook(lambda g: layouts.append(g.stride()))
        out = fn(xz=xz, **params, **kw)
        (grads[name],) = torch.autograd.grad((out.float() * dout).sum(), leaf)
    assert layouts[0] == (9, 18, 1) and calls == {"adopted": 1, "copied": 0}
    torch.testing.assert_close(grads["ours"], grads["ref"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim, seqlen", [(4, 1024), (5, 7), (3, 1030), (70, 300)])
def test_copy_rows_into_a_permuted_layout(dim, seqlen):
    """The row copy that assembles dxz: (B, D, L) contiguous into one half of a (B, 2D, L) view
    of a (2D, B * L) buffer, full and partial tiles; the other half is left alone."""
    from mamba_pkg.ops.mamba_inner import _copy_rows

    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, dim, seqlen, generator=g).to(DEV, torch.bfloat16)
    buf = torch.full((2 * dim, 2 * seqlen), -7.0, device=DEV, dtype=torch.bfloat16)
    view = buf.view(2 * dim, 2, seqlen).permute(1, 0, 2)  # (B, 2D, L), strides (L, B * L, 1)
    _copy_rows(view[:, dim:], src)
    assert torch.equal(view[:, dim:], src)
    assert bool((view[:, :dim] == -7.0).all())


@pytest.mark.parametrize("row", [40, 35])
def test_copy_rows_into_rows_of_another_width(row):
    """Mamba-2's dz: (B, L, D) rows into the first D columns of (B, L, row) rows. A row of 40
    bf16 values is a multiple of 16 bytes but not of 16 elements (the kernel is told: strides
    in units of 16 bytes); 35 is not (element strides)."""
    from mamba_pkg.ops.mamba_inner import _copy_rows

    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 9, 24, generator=g).to(DEV, torch.bfloat16)
    buf = torch.full((2, 9, row), -7.0, device=DEV, dtype=torch.bfloat16)
    _copy_rows(buf[..., 8:32], src)
    assert torch.equal(buf[..., 8:32], src)
    assert bool((buf[..., :8] == -7.0).all()) and bool((buf[..., 32:] == -7.0).all())


def test_inner_input_without_grad():
    """Only the weights need gradients (xz does not): they match the reference's."""
    params = {k: v.to(DEV) for k, v in make_params(2, 4, 9).items()}
    dout = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(5)).to(DEV)
    grads = {}
    for fn, kw in ((mamba_inner_fn, dict(backend="triton")), (mamba_inner_ref, {})):
        leaves = {k: v.detach().clone().requires_grad_(k != "xz") for k, v in params.items()}
        out = fn(**leaves, **kw)
        names = [k for k in leaves if k != "xz"]
        grads[fn] = dict(zip(names, torch.autograd.grad((out * dout).sum(), [leaves[k] for k in names])))
    for name, want in grads[mamba_inner_ref].items():
        torch.testing.assert_close(grads[mamba_inner_fn][name], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_inner_save_scan_states_skips_the_scan_recompute(monkeypatch, packed):
    """save_scan_states=True: the forward keeps the scan's output and checkpoints, the backward
    launches no scan forward, and output and every gradient equal the recomputing path's."""
    import mamba_pkg.ops.mamba_inner as inner

    params = {k: v.to(DEV) for k, v in make_params(1 if packed else 2, 4, 10).items()}
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEV) if packed else None
    dout = torch.randn(params["xz"].shape[0], 10, 6, generator=torch.Generator().manual_seed(5)).to(DEV)
    calls = []
    real = inner._selective_scan_fwd_op

    def counting(*args):
        calls.append(args[-1])  # store_ckpt
        return real(*args)

    monkeypatch.setattr(inner, "_selective_scan_fwd_op", counting)
    out_r, grads_r = _grads(mamba_inner_fn, params, dout, backend="triton", cu_seqlens=cu)
    assert calls == [True]  # the backward's recompute (the forward ran through selective_scan_fn)
    calls.clear()
    out_s, grads_s = _grads(mamba_inner_fn, params, dout, backend="triton", cu_seqlens=cu, save_scan_states=True)
    assert calls == [True]  # the forward only
    torch.testing.assert_close(out_s, out_r, rtol=0, atol=0)
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_inner_varlen_equals_per_sequence():
    lengths = [3, 6, 1]
    cu = torch.tensor([0, 3, 9, 10], dtype=torch.int32)
    params = make_params(1, 4, sum(lengths))
    out = mamba_inner_ref(**params, cu_seqlens=cu)
    for i in range(len(lengths)):
        lo, hi = cu[i].item(), cu[i + 1].item()
        part = dict(params, xz=params["xz"][..., lo:hi])
        torch.testing.assert_close(out[:, lo:hi], mamba_inner_ref(**part), rtol=1e-5, atol=1e-5)


def test_inner_varlen_kernel():
    cu = torch.tensor([0, 3, 9, 10], dtype=torch.int32, device=DEV)
    _check(make_params(1, 4, 10), DEV, cu_seqlens=cu)


def test_inner_ref_matches_unfused_composition():
    p = make_params(2, 4, 9)
    x, z = p["xz"].chunk(2, dim=1)
    xc = F.silu(F.conv1d(x, p["conv1d_weight"][:, None, :], p["conv1d_bias"], padding=3, groups=4)[..., :9])
    x_dbl = torch.einsum("bdl,rd->blr", xc, p["x_proj_weight"])
    delta = torch.einsum("blr,dr->bdl", x_dbl[..., :2], p["delta_proj_weight"])
    B, C = x_dbl[..., 2:6].transpose(1, 2), x_dbl[..., 6:].transpose(1, 2)
    dt = F.softplus(delta + p["delta_bias"][:, None])
    h = torch.zeros(2, 4, 4)
    ys = []
    for t in range(9):
        h = torch.exp(dt[:, :, t, None] * p["A"]) * h + (dt[:, :, t] * xc[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = (torch.stack(ys, -1) + p["D"][:, None] * xc) * F.silu(z)
    want = y.transpose(1, 2) @ p["out_proj_weight"].t() + p["out_proj_bias"]
    torch.testing.assert_close(mamba_inner_ref(**p), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(xz=torch.randn(2, 7, 9)), ValueError, r"xz must have shape \(B, 2\*D, L\)"),
        (dict(conv1d_weight=torch.randn(4, 2, 4)), ValueError, "conv1d_weight must have shape"),
        (dict(x_proj_weight=torch.randn(9, 4)), ValueError, r"x_proj_weight must have shape \(10, 4\)"),
        (dict(delta_proj_weight=torch.randn(5, 2)), ValueError, "delta_proj_weight must have shape"),
        (dict(out_proj_weight=torch.randn(6, 5)), ValueError, "out_proj_weight must have shape"),
        (dict(A=torch.randn(4, 4, dtype=torch.float64)), TypeError, "A must have dtype float32"),
        (dict(checkpoint_lvl=2), ValueError, "checkpoint_lvl"),
        (dict(save_scan_states=1), TypeError, "save_scan_states must be a bool"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens.*batch size 1"),
    ],
)
def test_inner_bad_input(change, exc, match):
    p = make_params(2, 4, 9)
    p.update(change)
    with pytest.raises(exc, match=match):
        mamba_inner_fn(**p, backend="torch")


def test_inner_common_case_takes_the_fast_check(monkeypatch):
    """A valid call with B and C from x_proj skips the full validation (host time)."""
    import mamba_pkg.ops.mamba_inner as ss

    p = make_params(2, 4, 9)
    want = mamba_inner_fn(**p, backend="torch")

    def full_check(*args):
        raise AssertionError("full validation ran")

    monkeypatch.setattr(ss, "_check_inner", full_check)
    torch.testing.assert_close(mamba_inner_fn(**p, backend="torch"), want)


@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref])
def test_inner_cu_seqlens_must_end_at_length(fn):
    p = make_params(1, 4, 9)
    with pytest.raises(ValueError, match="cu_seqlens must end at the sequence length L=9"):
        fn(**p, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inner_matches_ref_cuda(dtype):
    _check(make_params(2, 256, 1000, dstate=16, rank=16, d_model=128, dtype=dtype), "cuda", checkpoint_lvl=1)


@requires_cuda
def test_inner_activation_memory_cuda():
    """checkpoint_lvl=1 keeps less for the backward than lvl 0 and than mamba_ssm."""
    p = make_params(2, 1024, 2048, dstate=16, rank=32, d_model=512, dtype=torch.bfloat16, device="cuda")
    for t in p.values():
        t.requires_grad_(True)

    def saved_bytes(fn, **kw):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = fn(**p, **kw)
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
        out.float().sum().backward()
        return used

    ours = saved_bytes(mamba_inner_fn, checkpoint_lvl=1)
    plain = saved_bytes(mamba_inner_fn, checkpoint_lvl=0)
    assert ours < plain
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn as theirs
    except ImportError:
        return
    args = dict(p)
    args["conv1d_weight"] = args["conv1d_weight"][:, None, :]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = theirs(**args)
    theirs_bytes = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    assert ours < theirs_bytes
