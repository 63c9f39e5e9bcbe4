"""mamba_split_conv1d_scan_combined: the Mamba-2 mixer core against a hand composition."""

import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.ops.ssd.combined import mamba_split_conv1d_scan_combined, mamba_split_conv1d_scan_combined_ref
from tests.ops.test_ssd import naive_ssd


def make_split_inputs(batch=2, L=23, H=4, P=3, G=2, N=5, W=4, d_model=7, d_has_hdim=False):
    d_inner = H * P
    conv_dim = d_inner + 2 * G * N
    return dict(
        zxbcdt=torch.randn(batch, L, 2 * d_inner + 2 * G * N + H),
        conv1d_weight=torch.randn(conv_dim, W) * 0.5,
        conv1d_bias=torch.randn(conv_dim) * 0.1,
        dt_bias=torch.randn(H) * 0.3 - 1.0,
        A=-torch.rand(H) - 0.2,
        D=torch.randn(H, P) if d_has_hdim else torch.randn(H),
        rmsnorm_weight=torch.rand(d_inner) + 0.5,
        outproj_weight=torch.randn(d_model, d_inner) * 0.3,
        outproj_bias=torch.randn(d_model),
    )


def hand_composition(inp, P, G, norm_before_gate, eps=1e-6, seq_idx=None, use_norm=True):
    """Written from the definition with plain torch ops (F.conv1d, a per-step scan)."""
    zxbcdt, weight = inp["zxbcdt"], inp["conv1d_weight"]
    batch, L, _ = zxbcdt.shape
    H = inp["A"].shape[0]
    d_inner = H * P
    N = (weight.shape[0] - d_inner) // (2 * G)
    z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * G * N, H], dim=-1)
    conv = F.conv1d(F.pad(xBC.transpose(1, 2), (weight.shape[1] - 1, 0)), weight.unsqueeze(1), inp["conv1d_bias"],
                    groups=weight.shape[0])
    if seq_idx is not None:
        # Recompute each sequence on its own: no tap reaches across a boundary.
        conv = torch.cat([
            torch.cat([F.conv1d(F.pad(xBC[b : b + 1, (seq_idx[b] == s)].transpose(1, 2), (weight.shape[1] - 1, 0)),
                                weight.unsqueeze(1), inp["conv1d_bias"], groups=weight.shape[0])
                       for s in seq_idx[b].unique()], dim=-1)
            for b in range(batch)])
    xBC = F.silu(conv).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
    y, _ = naive_ssd(x.reshape(batch, L, H, P), dt, inp["A"], B.reshape(batch, L, G, N), C.reshape(batch, L, G, N),
                     D=inp["D"], z=None if use_norm else z.reshape(batch, L, H, P), dt_bias=inp["dt_bias"],
                     dt_softplus=True, seq_idx=seq_idx)
    y = y.reshape(batch, L, d_inner).float()
    if use_norm:
        zg = F.silu(z)
        if not norm_before_gate:
            y = y * zg
        yg = y.reshape(batch, L, G, d_inner // G)
        y = (yg / torch.sqrt(yg.square().mean(-1, keepdim=True) + eps)).reshape(batch, L, d_inner)
        y = y * inp["rmsnorm_weight"]
        if norm_before_gate:
            y = y * zg
    return F.linear(y, inp["outproj_weight"], inp["outproj_bias"])


@pytest.mark.parametrize("norm_before_gate,d_has_hdim", [(True, False), (False, True)])
def test_split_matches_hand_composition(norm_before_gate, d_has_hdim):
    inp = make_split_inputs(d_has_hdim=d_has_hdim)
    out = mamba_split_conv1d_scan_combined(**inp, chunk_size=8, headdim=3, ngroups=2,
                                           norm_before_gate=norm_before_gate, backend="torch")
    ref = hand_composition(inp, 3, 2, norm_before_gate)
    assert out.shape == (2, 23, 7)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_split_without_norm_and_outproj():
    inp = make_split_inputs(G=1)
    inp["rmsnorm_weight"], inp["outproj_weight"], inp["outproj_bias"] = None, None, None
    out = mamba_split_conv1d_scan_combined(**inp, chunk_size=8, headdim=3, backend="torch")
    inp["outproj_weight"], inp["outproj_bias"] = torch.eye(12), torch.zeros(12)
    ref = hand_composition(inp, 3, 1, True, use_norm=False)
    assert out.shape == (2, 23, 12)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_split_seq_idx_and_varlen():
    inp = make_split_inputs(batch=1, L=20)
    seq_idx = torch.tensor([[0] * 7 + [1] * 13], dtype=torch.int32)
    out, states = mamba_split_conv1d_scan_combined(**inp, chunk_size=8, headdim=3, ngroups=2, seq_idx=seq_idx,
                                                   return_final_states=True, backend="torch")
    ref = hand_composition(inp, 3, 2, True, seq_idx=seq_idx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out_v, states_v = mamba_split_conv1d_scan_combined(**inp, chunk_size=8, headdim=3, ngroups=2, cu_seqlens=cu,
                                                       return_final_states=True, backend="torch")
    torch.testing.assert_close(out_v, out, rtol=1e-5, atol=1e-5)
    assert states_v.shape == (2, 4, 3, 5)
    torch.testing.assert_close(states_v[1], states[0], rtol=1e-5, atol=1e-5)


def test_split_backward_matches_ref():
    inp = make_split_inputs(L=17)
    for t in inp.values():
        t.requires_grad_(True)
    out = mamba_split_conv1d_scan_combined(**inp, chunk_size=8, headdim=3, ngroups=2, backend="torch")
    ref = hand_composition(inp, 3, 2, True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), list(inp.values()))
    ref_grads = torch.autograd.grad((ref * g).sum(), list(inp.values()))
    for name, a, b in zip(inp, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "overrides,kw,exc,match",
    [
        (dict(zxbcdt=torch.randn(2, 23, 50)), {}, ValueError, "zxbcdt must have shape"),
        (dict(conv1d_weight=torch.randn(31, 4)), {}, ValueError, "conv1d_weight must have shape"),
        (dict(D=torch.randn(4)), dict(headdim=None), ValueError, "headdim"),
        (dict(dt_bias=torch.randn(3)), {}, ValueError, "dt_bias must have shape"),
        (dict(rmsnorm_weight=torch.randn(11)), {}, ValueError, "rmsnorm_weight must have shape"),
        (dict(outproj_weight=torch.randn(7, 11)), {}, ValueError, "outproj_weight must have shape"),
        (dict(initial_states=torch.randn(2, 4, 3, 6)), {}, ValueError, "initial_states must have shape"),
        ({}, dict(ngroups=3), ValueError, "ngroups"),
        ({}, dict(activation="relu"), ValueError, "activation"),
        ({}, dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_split_bad_inputs(overrides, kw, exc, match):
    inp = make_split_inputs()
    inp.update(overrides)
    args = dict(chunk_size=8, headdim=3, ngroups=2)
    args.update(kw)
    with pytest.raises(exc, match=match):
        mamba_split_conv1d_scan_combined(**inp, **args, backend="torch")


def test_split_ref_equals_public_torch():
    inp = make_split_inputs(L=9)
    a = mamba_split_conv1d_scan_combined(**inp, chunk_size=4, headdim=3, ngroups=2, backend="torch")
    b = mamba_split_conv1d_scan_combined_ref(**inp, chunk_size=4, headdim=3, ngroups=2)
    torch.testing.assert_close(a, b)
