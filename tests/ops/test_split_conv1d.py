"""split_conv1d (Mamba-2's split + conv with one dense zxbcdt gradient) and the Triton path of
mamba_split_conv1d_scan_combined built on it, against the torch composition; CPU through the
Triton interpreter, CUDA when present."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_rule
from mamba_pkg.ops.causal_conv1d import causal_conv1d_ref
from mamba_pkg.ops.split_conv1d import split_conv1d
from mamba_pkg.ops.ssd.combined import mamba_split_conv1d_scan_combined
from tests.ops.compile_check import compiled_matches_eager

# CUDA when present, else CPU tensors through the Triton interpreter (conftest sets TRITON_INTERPRET=1 there).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _split_ref(zxbcdt, weight, bias, d_inner, gn, silu, seq_idx=None):
    """torch.split + the conv reference: (z, x, B, C, dt)."""
    z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * gn, zxbcdt.shape[-1] - 2 * d_inner - 2 * gn], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), weight, bias, activation="silu" if silu else None,
                            seq_idx=seq_idx).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_inner, gn, gn], dim=-1)
    return z, x, B, C, dt


def _inputs(batch, L, d_inner, gn, H, W, device, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(L)
    conv_dim = d_inner + 2 * gn
    zxbcdt = torch.randn(batch, L, 2 * d_inner + 2 * gn + H, generator=g)
    weight = torch.randn(conv_dim, W, generator=g) * 0.5
    b = torch.randn(conv_dim, generator=g) * 0.3 if bias else None
    return [t.to(device, dtype) if t is not None else None for t in (zxbcdt, weight, b)]


# H=8: zxbcdt rows of 40 values, 16-byte multiples that Triton cannot see (the kernels are told).
@pytest.mark.parametrize("L,W,bias,silu,packed,H", [(1, 4, True, True, False, 3), (37, 4, True, True, True, 8),
                                                     (19, 3, False, False, False, 3)])
def test_split_conv1d_equals_split_and_conv(L, W, bias, silu, packed, H):
    device = DEV
    d_inner, gn = 12, 4
    leaves = _inputs(2, L, d_inner, gn, H, W, device, bias=bias)
    seq_idx = None
    if packed:
        seq_idx = torch.tensor([[0] * 20 + [1] * (L - 20), [0] * L], dtype=torch.int32, device=device)
    outs = []
    for fn in (lambda *a: split_conv1d(*a, d_inner, gn, silu, seq_idx=seq_idx),
               lambda *a: _split_ref(*a, d_inner, gn, silu, seq_idx=seq_idx)):
        inputs = [t.clone().requires_grad_() if t is not None else None for t in leaves]
        parts = fn(*inputs)
        weights = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device)
                   for i, p in enumerate(parts)]
        loss = sum((p * w).sum() for p, w in zip(parts, weights))
        grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
        outs.append((parts, grads))
    (parts, grads), (ref_parts, ref_grads) = outs
    for name, a, b in zip("z x B C dt".split(), parts, ref_parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(["zxbcdt", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"grad {name}")
    z, x, B, C, dt = parts
    # x, B and C are dense (the SSD kernels need no copy); z and dt stay views of zxbcdt.
    assert x.is_contiguous() and B.is_contiguous() and C.is_contiguous()
    assert z.data_ptr() == leaves[0].data_ptr() or z._base is not None
    assert dt.stride(1) == leaves[0].shape[-1]
    # One dense gradient for the whole in_proj output.
    assert grads[0].shape == leaves[0].shape and grads[0].is_contiguous()


def _mixer_inputs(device, dtype, L=29):
    """Mixer arguments in dtype (the fp32 parameters in fp32); d_in_proj 104: rows of 16-byte
    multiples whose stride is not divisible by 16, like mamba2-130m's 3352."""
    g = torch.Generator().manual_seed(3)
    H, P, G, N, W, d_model = 8, 4, 2, 8, 4, 16
    d = H * P
    t = dict(zxbcdt=torch.randn(2, L, 2 * d + 2 * G * N + H, generator=g),
             conv1d_weight=torch.randn(d + 2 * G * N, W, generator=g) * 0.5,
             conv1d_bias=torch.randn(d + 2 * G * N, generator=g) * 0.2,
             dt_bias=torch.randn(H, generator=g) * 0.3 - 1.0, A=-torch.rand(H, generator=g) - 0.3,
             D=torch.randn(H, generator=g), rmsnorm_weight=torch.rand(d, generator=g) + 0.5,
             outproj_weight=torch.randn(d_model, d, generator=g) * 0.2)
    low = ("zxbcdt", "conv1d_weight", "conv1d_bias", "rmsnorm_weight", "outproj_weight")
    return {k: v.to(device, dtype if k in low else torch.float32) for k, v in t.items()}, dict(
        chunk_size=16, headdim=P, ngroups=G, norm_before_gate=False)


def _mixer_grads(inp, kw, **extra):
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    out = mamba_split_conv1d_scan_combined(**leaves, **kw, **extra)
    g = torch.cos(torch.arange(out.numel(), device=out.device, dtype=torch.float32)).reshape(out.shape)
    grads = torch.autograd.grad((out.float() * g).sum(), list(leaves.values()))
    return [out] + list(grads)


NAMES = ["out"] + list(_mixer_inputs("cpu", torch.float32)[0])


@pytest.mark.parametrize("varlen", ["none", "seq_idx", "cu_seqlens"])
def test_mixer_triton_path_equals_torch(varlen):
    """The default Triton path (split op, no recompute) and recompute=True both equal the torch
    composition: forward and every gradient, with and without packed sequences."""
    device = DEV
    inp, kw = _mixer_inputs(device, torch.float32)
    if varlen == "seq_idx":
        kw["seq_idx"] = torch.tensor([[0] * 11 + [1] * 18, [0] * 29], dtype=torch.int32, device=device)
    elif varlen == "cu_seqlens":
        inp["zxbcdt"] = inp["zxbcdt"][:1]
        kw["cu_seqlens"] = torch.tensor([0, 11, 29], dtype=torch.int32, device=device)
    ref = _mixer_grads(inp, kw, backend="torch")
    for extra in ({}, {"recompute": True}):
        got = _mixer_grads(inp, kw, backend="triton", **extra)
        for name, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=f"{name} {extra}")


def test_mixer_adopts_gated_norm_dz(monkeypatch):
    """The gated norm hands z's gradient back in zxbcdt's layout and the split backward writes the
    rest of zxbcdt's gradient around it: no dz copy, the same gradients as the copying path."""
    import mamba_pkg.ops.split_conv1d as split_mod

    inp, kw = _mixer_inputs(DEV, torch.float32)
    calls = {"into": 0, "copy": 0}
    into, copy = split_mod._split_conv1d_bwd_into, split_mod._copy_rows

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(split_mod, "_split_conv1d_bwd_into", counted("into", into))
    monkeypatch.setattr(split_mod, "_copy_rows", counted("copy", copy))
    got = _mixer_grads(inp, kw, backend="triton")
    assert calls == {"into": 1, "copy": 0}
    # A dz not in zxbcdt's layout (z with a second consumer, say) is copied.
    monkeypatch.setattr(split_mod, "_fills_z_columns", lambda dz, zxbcdt: False)
    copied = _mixer_grads(inp, kw, backend="triton")
    assert calls == {"into": 1, "copy": 1}
    for name, a, b in zip(NAMES, got, copied):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_mixer_triton_path_bf16_tolerance_rule():
    device = DEV
    inp32, kw = _mixer_inputs(device, torch.float32)
    inp16, _ = _mixer_inputs(device, torch.bfloat16)
    ref32 = _mixer_grads(inp32, kw, backend="torch")
    ref16 = _mixer_grads(inp16, kw, backend="torch")
    got = _mixer_grads(inp16, kw, backend="triton")
    for name, a, r32, r16 in zip(NAMES, got, ref32, ref16):
        assert_close_rule(a.float(), r32.float(), r16.float(), atol=2e-2 * r32.abs().max().item() + 1e-4, name=name)


def test_split_conv1d_compiles_to_one_graph():
    d_inner, gn, H = 8, 4, 2
    zxbcdt, weight, bias = _inputs(1, 9, d_inner, gn, H, 4, DEV)

    def step(zxbcdt, weight, bias):
        z, x, B, C, dt = split_conv1d(zxbcdt, weight, bias, d_inner, gn, True)
        return (z * x).sum() + (B * C).sum() + F.softplus(dt).sum()

    forward, backward = compiled_matches_eager(step, [zxbcdt, weight, bias])
    assert "split_conv1d_fwd" in forward and "split_conv1d_bwd" in backward
    assert "cat" not in backward


@pytest.mark.parametrize("change,match", [
    (dict(zxbcdt=torch.randn(2, 5, 20)), "zxbcdt must have shape"),
    (dict(zxbcdt=torch.randn(5, 35)), "zxbcdt must have 3 dim"),
    (dict(weight=torch.randn(19, 4)), "weight must have shape"),
    (dict(weight=torch.randn(20, 9)), "weight must have shape"),
    (dict(bias=torch.randn(7)), "bias must have shape"),
    (dict(d_inner=0), "d_inner must be a positive int"),
    (dict(gn=2.0), "gn must be a positive int"),
    (dict(seq_idx=torch.zeros(2, 4, dtype=torch.int32)), "seq_idx must have shape"),
    (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),
])
def test_split_conv1d_bad_inputs(change, match):
    d_inner, gn, H = 12, 4, 3
    zxbcdt, weight, bias = _inputs(2, 5, d_inner, gn, H, 4, DEV)
    args = dict(zxbcdt=zxbcdt, weight=weight, bias=bias, d_inner=d_inner, gn=gn, silu=True)
    args.update({k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        split_conv1d(**args)
