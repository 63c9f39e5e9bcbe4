import pytest
import torch
import torch.nn.functional as F

import mamba_pkg.ops.decode_linear as dl

from mamba_pkg.ops.decode_linear import (
    add_rms_norm_linear,
    add_rms_norm_rows,
    add_rms_norm_linear_ref,
    decode_linear,
    decode_linear_ref,
    gated_rms_norm_linear,
    gated_rms_norm_linear_ref,
    rms_norm_linear,
    rms_norm_linear_ref,
    rms_scaled_linear,
    rms_scaled_linear_ref,
)
from mamba_pkg.ops.causal_conv1d import causal_conv1d_update_ref
from mamba_pkg.ops.norm import layer_norm_ref, rms_norm_gated_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _small_dot(monkeypatch, block_n=16, block_k=64, split=False):
    """The tl.dot kernel with small tiles for tiny test shapes; split: as many K splits as dot_config
    allows (up to 4), whatever the program count."""
    for name, value in (("DOT_BLOCK_N", block_n), ("DOT_BLOCK_K", block_k), ("DOT_STAGES", 2), ("DOT_WARPS", 4),
                        ("DOT_MAX_SPLIT", 4), ("DOT_TARGET_PROGRAMS", 1 << 20 if split else 1)):
        monkeypatch.setattr(dl, name, value)
    if split:
        monkeypatch.setattr(dl, "DOT_MIN_PROGRAMS", 1)
        monkeypatch.setattr(dl, "DOT_MIN_SPLIT_STEPS", 1)


def test_ref_is_fp32_linear():
    x, w, b = torch.randn(3, 7, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(5)
    out = decode_linear_ref(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5)
    torch.testing.assert_close(out, (x.double() @ w.double().t() + b.double()).to(torch.bfloat16))


@pytest.mark.parametrize("batch,n_in,n_out,bias", [(1, 700, 9, True), (2, 40, 6, False), (2, 1100, 5, True),
                                                   (3, 40, 6, False), (19, 70, 37, True)])
def test_triton_matches_ref(batch, n_in, n_out, bias, monkeypatch):
    """Odd sizes: a ragged output block, ragged K, several unrolled K chunks (1100 at batch 2: chunks
    of 1024), a strided x (half of a wider tensor, as in_proj's halves); above SMALL_ROWS rows a bf16
    weight with fp32 x (two dtypes: not cuBLAS) takes the tl.dot kernel (ragged batch tile, K steps of
    64, ragged output blocks of 16)."""
    _small_dot(monkeypatch)
    assert dl.dot_config(n_out, n_in) is None  # too few programs for the GEMM path: the fallback config
    x = torch.randn(batch, 2 * n_in, device=DEVICE)[:, n_in:]
    w = torch.randn(n_out, n_in, device=DEVICE)
    if batch > dl.SMALL_ROWS:
        w = w.to(torch.bfloat16)
    b = torch.randn(n_out, device=DEVICE) if bias else None
    out = decode_linear(x, w, b, backend="triton")
    torch.testing.assert_close(out, decode_linear_ref(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [3, 8, 64])
def test_one_dtype_above_small_rows_is_cublas(batch, monkeypatch):
    """3-8 rows, and more where dot_config finds too few programs (6 outputs), a plain product of one
    dtype is F.linear (cuBLAS on CUDA), no kernel."""
    for name in ("_launch_small", "_launch_dot"):
        monkeypatch.setattr(dl, name, lambda *a, **k: pytest.fail("a decode_linear kernel ran"))
    x = torch.randn(batch, 40, device=DEVICE, dtype=torch.bfloat16)
    w, b = torch.randn(6, 40, device=DEVICE, dtype=torch.bfloat16), torch.randn(6, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(decode_linear(x, w, b, backend="triton"), F.linear(x, w, b), rtol=0, atol=0)


def test_bf16():
    x = torch.randn(2, 300, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(11, 300, device=DEVICE, dtype=torch.bfloat16)
    out = decode_linear(x, w, backend="triton")
    ref = decode_linear_ref(x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=ref.float().abs().max().item() * 2.0**-7)


def test_errors():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="1 <= B <= 64"):
        decode_linear(torch.randn(65, 4), w)
    with pytest.raises(ValueError, match="weight must have shape"):
        decode_linear(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        decode_linear(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="x must have dtype"):
        decode_linear(x.long(), w)


def test_custom_op_opcheck():
    x, w = torch.randn(2, 40, device=DEVICE), torch.randn(6, 40, device=DEVICE)
    torch.library.opcheck(torch.ops.mamba_pkg.decode_linear, (x, w, torch.randn(6, device=DEVICE)))
    torch.library.opcheck(torch.ops.mamba_pkg.decode_linear, (x, w, None))


@pytest.mark.parametrize("batch,residual,residual_in_fp32", [(1, None, False), (5, torch.float32, True),
                                                            (3, torch.bfloat16, False)])
def test_add_rms_norm_rows(batch, residual, residual_in_fp32):
    """The PDL add + RMSNorm of a decode step's rows against the fp32 reference (normed rounded once to
    x's dtype, the sum in the residual dtype)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 40, device=DEVICE, dtype=torch.bfloat16)
    res = None if residual is None else torch.randn(batch, 40, device=DEVICE, dtype=residual)
    nw = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    normed, s = add_rms_norm_rows(x, res, nw, 1e-5, residual_in_fp32, backend="triton")
    s_ref = x.float() if res is None else x.float() + res.float()
    normed_ref = layer_norm_ref(s_ref, nw, None, eps=1e-5, is_rms_norm=True)
    assert normed.dtype == x.dtype and s.dtype == (torch.float32 if residual_in_fp32 else (res if res is not None else x).dtype)
    torch.testing.assert_close(s, s_ref.to(s.dtype))  # one rounding of the fp32 sum (bf16: the dtype's tolerance)
    torch.testing.assert_close(normed.float(), normed_ref.to(x.dtype).float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(add_rms_norm_rows(x, res, nw, 1e-5, residual_in_fp32, backend="torch")[0], normed,
                               rtol=1e-2, atol=1e-2)


def test_add_rms_norm_rows_opcheck():
    x, nw = torch.randn(2, 24, device=DEVICE), torch.randn(24, device=DEVICE)
    torch.library.opcheck(torch.ops.mamba_pkg.add_rms_norm_rows, (x, torch.randn(2, 24, device=DEVICE), nw, 1e-5, True))


def test_add_rms_norm_rows_errors():
    x, nw = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="1 <= B <= 64"):
        add_rms_norm_rows(torch.randn(65, 8), None, nw)
    with pytest.raises(ValueError, match="residual must have shape"):
        add_rms_norm_rows(x, torch.randn(2, 7), nw)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        add_rms_norm_rows(x, None, torch.randn(7))


def _norm_path(monkeypatch, prepass):
    """The norm as a pre-pass at every width (with and without a conv), or folded into the product;
    every width takes WIDE_BLOCK_N output features per program (the gated fold keeps BLOCK_N)."""
    monkeypatch.setattr(dl, "NORM_PREPASS", prepass)
    monkeypatch.setattr(dl, "PREPASS_MIN_K", 1)
    for name in ("PREPASS_ADD_NORM_ALONE", "PREPASS_ADD_NORM_CONV", "PREPASS_GATED", "PREPASS_RMS"):
        monkeypatch.setattr(dl, name, True)
    monkeypatch.setattr(dl, "WIDE_K", 1)


@pytest.mark.parametrize("residual,prepass,batch", [(None, True, 2), (torch.float32, True, 1), (torch.bfloat16, True, 2),
                                                    (torch.float32, False, 2), (torch.float32, False, 1)])
def test_add_rms_norm_linear_matches_ref(residual, prepass, batch, monkeypatch):
    """The fused add + RMSNorm + linear (norm as a pre-pass or folded into the product; batch 1
    takes the one-row product) equals its reference, and the reference equals the composition it
    replaces (the block's add + norm, then the linear)."""
    _norm_path(monkeypatch, prepass)
    torch.manual_seed(0)
    x = torch.randn(batch, 2 * 50, device=DEVICE)[:, 50:]
    res = None if residual is None else torch.randn(batch, 50, device=DEVICE).to(residual)
    nw, w, b = torch.randn(50, device=DEVICE), torch.randn(9, 50, device=DEVICE), torch.randn(9, device=DEVICE)
    fp32_res = residual is None
    out, s = add_rms_norm_linear(x, res, nw, w, b, 1e-5, fp32_res, backend="triton")
    ref_out, ref_s = add_rms_norm_linear_ref(x, res, nw, w, b, 1e-5, fp32_res)
    normed, s2 = layer_norm_ref(x, nw, None, res, 1e-5, prenorm=True, residual_in_fp32=fp32_res, is_rms_norm=True)
    assert s.dtype == ref_s.dtype == s2.dtype == (torch.float32 if residual is None else residual)
    torch.testing.assert_close(ref_s, s2)
    torch.testing.assert_close(ref_out, decode_linear_ref(normed, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, ref_s)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


def test_add_rms_norm_linear_errors_and_opcheck():
    x, w, nw = torch.randn(2, 8), torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="1 <= B <= 2"):
        add_rms_norm_linear(torch.randn(3, 8), None, nw, w)
    with pytest.raises(ValueError, match="residual must have shape"):
        add_rms_norm_linear(x, torch.randn(2, 7), nw, w)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        add_rms_norm_linear(x, None, torch.randn(7), w)
    x, w, nw = (t.to(DEVICE) for t in (x, w, nw))
    op = torch.ops.mamba_pkg.add_rms_norm_linear
    torch.library.opcheck(op, (x, torch.randn(2, 8, device=DEVICE), nw, w, None, 1e-5, True))
    torch.library.opcheck(op, (x, None, nw, w, torch.randn(3, device=DEVICE), 1e-5, False))


@pytest.mark.parametrize("norm_before_gate,prepass,batch", [(False, True, 2), (True, True, 1), (False, False, 2),
                                                            (True, False, 2), (False, False, 1)])
def test_gated_rms_norm_linear_matches_ref(norm_before_gate, prepass, batch, monkeypatch):
    """Gate z (a strided view, as Mamba-2's slice of in_proj), both gate orders, the norm as a
    pre-pass or folded into the product, batch 1 (the one-row product) and 2; the reference equals
    the gated norm it replaces followed by the linear."""
    _norm_path(monkeypatch, prepass)
    torch.manual_seed(0)
    x = torch.randn(batch, 60, device=DEVICE)
    z = torch.randn(batch, 2 * 60, device=DEVICE)[:, :60]
    nw, w, b = torch.randn(60, device=DEVICE), torch.randn(7, 60, device=DEVICE), torch.randn(7, device=DEVICE)
    out = gated_rms_norm_linear(x, z, nw, w, b, 1e-5, norm_before_gate, backend="triton")
    ref = gated_rms_norm_linear_ref(x, z, nw, w, b, 1e-5, norm_before_gate)
    normed = rms_norm_gated_ref(x, nw, z=z, eps=1e-5, norm_before_gate=norm_before_gate)
    torch.testing.assert_close(ref, decode_linear_ref(normed, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="z must have shape"):
        gated_rms_norm_linear(x, z[:, :59], nw, w)
    torch.library.opcheck(torch.ops.mamba_pkg.gated_rms_norm_linear, (x, z, nw, w, None, 1e-5, norm_before_gate))


@pytest.mark.parametrize("prepass,batch", [(True, 2), (False, 1), (False, 19)])
def test_rms_norm_linear_matches_ref(prepass, batch, monkeypatch):
    """RMSNorm + linear: the norm as a pre-pass or folded (batch 1, 2), and in the tl.dot kernel
    (batch 19: ragged batch tile, two K steps, ragged output blocks) as a row scale after the
    product; the reference equals the norm followed by the linear."""
    _norm_path(monkeypatch, prepass)
    _small_dot(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(batch, 2 * 70, device=DEVICE)[:, 70:]
    nw, w, b = torch.randn(70, device=DEVICE), torch.randn(37, 70, device=DEVICE), torch.randn(37, device=DEVICE)
    out = rms_norm_linear(x, nw, w, b, 1e-5, backend="triton")
    ref = rms_norm_linear_ref(x, nw, w, b, 1e-5)
    normed = layer_norm_ref(x, nw, None, eps=1e-5, is_rms_norm=True)
    torch.testing.assert_close(ref, decode_linear_ref(normed, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_rms_norm_linear_errors_and_opcheck():
    x, w, nw = torch.randn(2, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        rms_norm_linear(x, torch.randn(7, device=DEVICE), w)
    with pytest.raises(ValueError, match="1 <= B <= 64"):
        rms_norm_linear(torch.randn(65, 8, device=DEVICE), nw, w)
    with pytest.raises(TypeError, match="norm_weight must have dtype"):
        rms_norm_linear(x, nw.long(), w)
    op = torch.ops.mamba_pkg.rms_norm_linear
    torch.library.opcheck(op, (x, nw, w, torch.randn(3, device=DEVICE), 1e-5))
    torch.library.opcheck(op, (torch.randn(12, 8, device=DEVICE), nw, w, None, 1e-6))


def _folded_norm_inputs(batch, n_in, n_out, device=DEVICE):
    """v (the rows before the norm, fp32), norm weight, x = bf16(v * nw), three partial sums of squares of v
    per row (as ssm_decode_step(norm_weight=...) writes them), bf16 weight and bias."""
    torch.manual_seed(0)
    v = torch.randn(batch, n_in, device=device)
    nw = torch.rand(n_in, device=device) + 0.5
    x = (v * nw).to(torch.bfloat16)
    sums = torch.stack([c.square().sum(1) for c in v.chunk(3, dim=1)], 1)
    w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) / n_in**0.5
    b = torch.randn(n_out, device=device, dtype=torch.bfloat16)
    return v, nw, x, sums, w, b


@pytest.mark.parametrize("batch,split,early", [(1, False, False), (5, False, False), (12, True, False),
                                               (33, True, False), (12, True, True)])
def test_rms_scaled_linear_matches_ref(batch, split, early, monkeypatch):
    """The norm's row scale from partial sums, in the tl.dot kernel's finishing programs (split: the K range
    in up to 4 programs, the last one scales; early: every program loads the sums before its K loop):
    equal to the fp32 RMSNorm + product of the unrounded rows under the tolerance rule (the bf16 torch
    reference on the same rounded x as the baseline)."""
    _small_dot(monkeypatch, split=split)
    monkeypatch.setattr(dl, "DOT_SUMS_EARLY", early)
    v, nw, x, sums, w, b = _folded_norm_inputs(batch, 70, 37)
    out = rms_scaled_linear(x, sums, w, b, 1e-5, backend="triton")
    exact = rms_norm_linear_ref(v, nw, w.float(), b.float(), 1e-5)
    low = rms_scaled_linear_ref(x, sums, w, b, 1e-5)
    assert out.dtype == torch.bfloat16 and out.shape == (batch, 37)
    assert (out.float() - exact).abs().max() <= 2 * (low.float() - exact).abs().max() + 1e-2
    if split:
        assert any(getattr(p, "split", 1) > 1 for p in dl._PLANS.values())


def test_rms_scaled_linear_errors_and_opcheck():
    v, nw, x, sums, w, b = _folded_norm_inputs(4, 24, 8)
    with pytest.raises(ValueError, match=r"sums must have shape \(4, \*\)"):
        rms_scaled_linear(x, sums[:3], w)
    with pytest.raises(TypeError, match="sums must have dtype"):
        rms_scaled_linear(x, sums.double(), w)
    with pytest.raises(ValueError, match="16-bit"):
        rms_scaled_linear(x.float(), sums, w.float())
    with pytest.raises(ValueError, match="1 <= B <= 64"):
        rms_scaled_linear(torch.zeros(65, 24, device=DEVICE, dtype=torch.bfloat16), sums, w)
    op = torch.ops.mamba_pkg.rms_scaled_linear
    torch.library.opcheck(op, (x, sums, w, b, 1e-5))
    torch.library.opcheck(op, (x, sums, w, None, 1e-6))


def test_device_mismatch_is_named():
    """Each product's operands on another device than x (meta tensors) are named in the error."""
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    w, nw = torch.zeros(6, 8, dtype=torch.bfloat16), torch.ones(8)
    meta = {"device": "meta"}
    with pytest.raises(ValueError, match="weight is on meta"):
        decode_linear(x, w.to(**meta))
    with pytest.raises(ValueError, match="bias is on meta"):
        decode_linear(x, w, torch.zeros(6, **meta))
    with pytest.raises(ValueError, match="conv_state is on meta"):
        decode_linear(x, w, conv=(torch.zeros(4, 2, 4, **meta), torch.zeros(2, 4), None, 0, None))
    with pytest.raises(ValueError, match="norm_weight is on meta"):
        rms_norm_linear(x, nw.to(**meta), w)
    with pytest.raises(ValueError, match="sums is on meta"):
        rms_scaled_linear(x, torch.zeros(4, 2, **meta), w)
    with pytest.raises(ValueError, match="residual is on meta"):
        add_rms_norm_linear(x[:2], torch.zeros(2, 8, **meta), nw, w)


def test_conv_fold_in_dot_kernel_matches_ref(monkeypatch):
    """Above SMALL_ROWS rows the conv update runs in the tl.dot kernel's epilogue: batch 11 (a
    ragged batch tile), conv channels [9, 29) of 37 across ragged output blocks of 16, a bf16 state."""
    _small_dot(monkeypatch, block_k=32)
    torch.manual_seed(2)
    x = torch.randn(11, 2 * 40, device=DEVICE)[:, 40:]
    w, b = torch.randn(37, 40, device=DEVICE), torch.randn(37, device=DEVICE)
    state, conv = _conv_case(11, 37, 20, 9, 4, torch.bfloat16)
    ref_state = state.clone()
    out = decode_linear(x, w, b, conv=conv, backend="triton")
    ref = decode_linear_ref(x, w, b, (ref_state, *conv[1:]))
    torch.testing.assert_close(state, ref_state, rtol=2.0**-7, atol=1e-4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm,conv,peel", [(False, False, False), (True, False, False), (False, 4, False),
                                            (True, False, True), (False, 5, True)])
def test_dot_split_k_matches_ref(norm, conv, peel, monkeypatch):
    """The tl.dot kernel with its K range split over 4 programs per output tile (K steps of 32 over
    200 values: splits of 64, the last one 8 wide), batch 19 (a ragged row tile), 37 outputs (ragged
    blocks of 16): the last program of each tile adds the partials and runs the epilogue (bias, the
    RMSNorm's row scale, the conv update, 4 or 5 state slots); the arrival counters are back at zero, and a second call
    gives the same bits. peel: the first K step's weight tile loaded before the loop (DOT_PEEL)."""
    _small_dot(monkeypatch, block_k=32, split=True)
    monkeypatch.setattr(dl, "DOT_PEEL", peel)
    assert dl.dot_config(37, 200)[4] == 4
    torch.manual_seed(3)
    x = torch.randn(19, 2 * 200, device=DEVICE)[:, 200:]
    w, b, nw = torch.randn(37, 200, device=DEVICE), torch.randn(37, device=DEVICE), torch.randn(200, device=DEVICE)
    state = conv_args = None
    if conv:
        state, conv_args = _conv_case(19, 37, 20, 9, conv, torch.bfloat16)  # conv: the state's slots
        ref_state = state.clone()
        first_state = state.clone()

    def run():
        if norm:
            return rms_norm_linear(x, nw, w, b, 1e-5, backend="triton")
        return decode_linear(x, w, b, conv=conv_args, backend="triton")
    out = run()
    if norm:
        ref = rms_norm_linear_ref(x, nw, w, b, 1e-5)
    else:
        ref = decode_linear_ref(x, w, b, None if not conv else (ref_state, *conv_args[1:]))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if conv:
        torch.testing.assert_close(state, ref_state, rtol=2.0**-7, atol=1e-4)
        state.copy_(first_state)
    assert not dl._COUNTERS[x.device].any()
    assert torch.equal(run(), out)


@pytest.mark.parametrize("case", ["plain", "sums", "conv", "peel", "tma"])
def test_dot_overflow_features_match_ref(case, monkeypatch):
    """Features past one tile per SM (DOT_OVERFLOW; 3 "SMs" planned for, tiles of 16 outputs, 51 outputs:
    the last 3 past 48, or 50: a program without one) computed one per program of the first tiles, as a matrix-vector product on the x
    tiles of its K loop (32-wide steps over 200 values): equal to the reference with a bias, with the row
    scale from partial sums (sums), with a conv update of channels below them (conv), with the first K step
    peeled (peel), through TMA descriptors (tma). The launch has 3 programs, and a second call gives the
    same bits."""
    _small_dot(monkeypatch, block_k=32)
    monkeypatch.setattr(dl, "DOT_MIN_PROGRAMS", 1)
    monkeypatch.setattr(dl, "DOT_OVERFLOW_SMS", 3)
    monkeypatch.setattr(dl, "DOT_PEEL", case == "peel")
    monkeypatch.setattr(dl, "DOT_TMA_MIN_STEPS", 1 if case == "tma" else 1 << 20)
    n_out = 50 if case in ("sums", "conv") else 51
    torch.manual_seed(5)
    x = torch.randn(19, 2 * 200, device=DEVICE)[:, 200:]
    w, b = torch.randn(n_out, 200, device=DEVICE), torch.randn(n_out, device=DEVICE)
    if case == "tma":
        x, w, b = x.contiguous().to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)
    conv_args = ref_state = None
    if case == "conv":
        state, conv_args = _conv_case(19, n_out, 21, 20, 4, torch.bfloat16)  # channels 20..40: below 48
        ref_state, first_state = state.clone(), state.clone()
    if case == "sums":
        v, nw, xs, sums, wb, bb = _folded_norm_inputs(19, 200, n_out)

    def run():
        if case == "sums":
            return rms_scaled_linear(xs, sums, wb, bb, 1e-5, backend="triton")
        return decode_linear(x, w, b, conv=conv_args, backend="triton")
    out = run()
    if case == "sums":
        ref = rms_scaled_linear_ref(xs, sums, wb, bb, 1e-5)
    else:
        ref = decode_linear_ref(x.float(), w.float(), b.float(), None if conv_args is None else (ref_state, *conv_args[1:]))
    plans = [p for p in dl._PLANS.values() if getattr(p, "over", 0)]
    assert plans and plans[-1].grid == (3, 1) and plans[-1].tma == (case == "tma")
    tol = dict(rtol=2e-2, atol=2e-2) if case in ("sums", "tma") else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    if conv_args is not None:
        torch.testing.assert_close(state, ref_state, rtol=2.0**-7, atol=1e-4)
        state.copy_(first_state)
    assert torch.equal(run(), out)


def test_dot_overflow_only_for_a_few_features_past_the_tiles(monkeypatch):
    """DOT_OVERFLOW takes launches whose last tile lies past one tile per SM and holds no more features than
    SMs; not with a K split, several row blocks, a norm in the K loop, a conv channel among those features,
    the switch off, or no SM count (a CPU tensor without DOT_OVERFLOW_SMS)."""
    monkeypatch.setattr(dl, "DOT_OVERFLOW_SMS", 132)
    x = torch.empty(64, 2048)
    conv_state, conv_w = torch.empty(64, 4352, 4), torch.empty(4352, 4)
    assert dl._overflow(8512, 64, 1, 1, x, False, None) == 1
    assert dl._overflow(8512, 64, 1, 1, x, False, (conv_state, conv_w, None, 4096, True)) == 1
    assert dl._overflow(8512, 64, 1, 1, x, False, (conv_state, conv_w, None, 4160, True)) == 0
    assert dl._overflow(8448, 64, 1, 1, x, False, None) == 0
    assert dl._overflow(8513, 64, 1, 1, x, False, None) == 0  # a 134th tile
    assert dl._overflow(8512, 64, 2, 1, x, False, None) == 0
    assert dl._overflow(8512, 64, 1, 2, x, False, None) == 0
    assert dl._overflow(8512, 64, 1, 1, x, True, None) == 0
    monkeypatch.setattr(dl, "DOT_OVERFLOW_SMS", 100)
    assert dl._overflow(100 * 128 + 101, 128, 1, 1, x, False, None) == 0  # more features than SMs
    monkeypatch.setattr(dl, "DOT_OVERFLOW", False)
    assert dl._overflow(6500, 64, 1, 1, x, False, None) == 0
    monkeypatch.setattr(dl, "DOT_OVERFLOW", True)
    monkeypatch.setattr(dl, "DOT_OVERFLOW_SMS", 0)
    assert dl._overflow(8512, 64, 1, 1, x, False, None) == 0


def _conv_case(batch, n_out, channels, start, state_len, dtype=torch.float32, bias=True):
    conv_state = torch.randn(batch, channels, state_len, device=DEVICE).to(dtype)
    conv_weight = torch.randn(channels, 4, device=DEVICE)
    conv_bias = torch.randn(channels, device=DEVICE) if bias else None
    return conv_state, (conv_state, conv_weight, conv_bias, start, "silu")


@pytest.mark.parametrize("norm,state_dtype,prepass,batch", [(False, torch.float32, True, 2), (False, torch.float32, True, 1),
                                                           (True, torch.float32, True, 2), (True, torch.bfloat16, True, 1),
                                                           (True, torch.float32, False, 2), (True, torch.float32, False, 1)])
def test_conv_fold_matches_ref(norm, state_dtype, prepass, batch, monkeypatch):
    """The conv update folded into the linear: outputs [9, 29) of 37 (not aligned to the output
    blocks), a state of 5 slots for a width-4 conv; out and the advanced state equal the
    reference, and the reference equals the linear followed by causal_conv1d_update on the slice.
    With the norm: as a pre-pass or folded into the product. Batch 1: the one-row product."""
    _norm_path(monkeypatch, prepass)
    torch.manual_seed(0)
    x = torch.randn(batch, 2 * 40, device=DEVICE)[:, 40:]
    w, b = torch.randn(37, 40, device=DEVICE), torch.randn(37, device=DEVICE)
    res, nw = torch.randn(batch, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    state, conv = _conv_case(batch, 37, 20, 9, 5, state_dtype, bias=not norm)
    ref_state = state.clone()
    ref_conv = (ref_state, *conv[1:])
    if norm:
        out, s = add_rms_norm_linear(x, res, nw, w, b, 1e-5, True, conv, backend="triton")
        ref, ref_s = add_rms_norm_linear_ref(x, res, nw, w, b, 1e-5, True, ref_conv)
        torch.testing.assert_close(s, ref_s)
        plain = add_rms_norm_linear_ref(x, res, nw, w, b, 1e-5, True)[0]
    else:
        out = decode_linear(x, w, b, conv=conv, backend="triton")
        ref = decode_linear_ref(x, w, b, ref_conv)
        plain = decode_linear_ref(x, w, b)
    # A bf16 state stores the new input rounded: a last-bit difference of the fp32 product may round apart.
    tol = 1e-4 if state_dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(state, ref_state, rtol=tol, atol=1e-4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, :9], plain[:, :9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 29:], plain[:, 29:], rtol=1e-4, atol=1e-4)


def test_conv_fold_ref_is_linear_then_conv_update():
    torch.manual_seed(1)
    x, w = torch.randn(1, 12, device=DEVICE), torch.randn(10, 12, device=DEVICE)
    state, conv = _conv_case(1, 10, 6, 3, 3)
    before = state.clone()
    out = decode_linear_ref(x, w, None, conv)
    plain = decode_linear_ref(x, w)
    expected = causal_conv1d_update_ref(plain[:, 3:9], before, conv[1], conv[2], "silu")
    torch.testing.assert_close(out[:, 3:9], expected)
    torch.testing.assert_close(state, before)  # the reference advanced the state like the update did
    torch.testing.assert_close(torch.cat([out[:, :3], out[:, 9:]], 1), torch.cat([plain[:, :3], plain[:, 9:]], 1))


def test_conv_fold_errors_and_opcheck():
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(12, 8, device=DEVICE)
    state, conv = _conv_case(2, 12, 5, 4, 3)
    with pytest.raises(ValueError, match="conv_start must be"):
        decode_linear(x, w, conv=(*conv[:3], 8, "silu"))
    with pytest.raises(ValueError, match="conv_state must have shape"):
        decode_linear(x, w, conv=(state[:, :4], *conv[1:]))
    with pytest.raises(ValueError, match="S >= W-1"):
        decode_linear(x, w, conv=(state[..., :2], *conv[1:]))
    with pytest.raises(ValueError, match="activation must be"):
        decode_linear(x, w, conv=(*conv[:4], "relu"))
    with pytest.raises(ValueError, match="conv_state must have shape"):
        decode_linear(torch.randn(9, 8, device=DEVICE), w, conv=conv)  # the state holds 2 rows
    with pytest.raises(TypeError, match="conv must be a tuple"):
        decode_linear(x, w, conv=list(conv))
    op = torch.ops.mamba_pkg.linear_conv_step
    torch.library.opcheck(op, (x, None, None, w, None, state, conv[1], conv[2], 4, True, 0.0, False))
    torch.library.opcheck(op, (x, torch.randn(2, 8, device=DEVICE), torch.randn(8, device=DEVICE), w,
                               torch.randn(12, device=DEVICE), state, conv[1], None, 7, False, 1e-5, True))


@requires_cuda
@pytest.mark.parametrize("norm", [False, True])
def test_gpu_conv_fold_full_size(norm):
    """mamba2-1.3b's in_proj (2048 -> 8512, conv channels [4096, 8448)) at batch 1 and 2; norm: with
    the block's add + RMSNorm (the default: folded, FOLD_BLOCK_N features per program)."""
    for batch in (1, 2):
        x = torch.randn(batch, 2048, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(batch, 2048, device="cuda")
        nw = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
        w = torch.randn(8512, 2048, device="cuda", dtype=torch.bfloat16) / 45
        state = torch.randn(batch, 4352, 4, device="cuda", dtype=torch.bfloat16)
        cw, cb = torch.randn(4352, 4, device="cuda", dtype=torch.bfloat16), torch.randn(4352, device="cuda")
        ref_state = state.clone()
        if norm:
            out, s = add_rms_norm_linear(x, res, nw, w, None, 1e-5, True, (state, cw, cb, 4096, "silu"))
            ref, ref_s = add_rms_norm_linear_ref(x, res, nw, w, None, 1e-5, True, (ref_state, cw, cb, 4096, "silu"))
            torch.testing.assert_close(s, ref_s)
        else:
            out = decode_linear(x, w, conv=(state, cw, cb, 4096, "silu"))
            ref = decode_linear_ref(x, w, None, (ref_state, cw, cb, 4096, "silu"))
        torch.testing.assert_close(state, ref_state, rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=5e-2)


@requires_cuda
@pytest.mark.parametrize("width,prepass", [(1536, True), (4096, True), (4096, False)])
def test_gpu_gated_rms_norm_linear_full_size(width, prepass, monkeypatch):
    """mamba2-130m's and mamba2-1.3b's out_proj widths, the norm as a pre-pass (4 and 8 warps) or folded."""
    _norm_path(monkeypatch, prepass)
    x, z = torch.randn(2, 2, width, device="cuda", dtype=torch.bfloat16).unbind(0)
    nw = torch.rand(width, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(768, width, device="cuda", dtype=torch.bfloat16) / 40
    out = gated_rms_norm_linear(x, z, nw, w)
    ref = gated_rms_norm_linear_ref(x, z, nw, w)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("prepass", [True, False])
def test_gpu_add_rms_norm_linear_full_size(prepass, monkeypatch):
    _norm_path(monkeypatch, prepass)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, 2048, device="cuda")
    nw = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16) / 45
    out, s = add_rms_norm_linear(x, res, nw, w, None, 1e-5, True)
    ref_out, ref_s = add_rms_norm_linear_ref(x, res, nw, w, None, 1e-5, True)
    torch.testing.assert_close(s, ref_s)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("batch,width", [(1, 4096), (2, 1536), (64, 4096), (64, 1536), (33, 1536)])
def test_gpu_rms_norm_linear_full_size(batch, width):
    """Mamba-2 out_proj widths after a gate applied by the SSM step: the one-row / two-row product
    and the tl.dot kernel (bf16 x * norm_weight into the tensor cores, fp32 row scale after)."""
    x = torch.randn(batch, width, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(width, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(768, width, device="cuda", dtype=torch.bfloat16) / 40
    out = rms_norm_linear(x, nw, w)
    ref = rms_norm_linear_ref(x, nw, w)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("batch,width,n_out", [(64, 4096, 2048), (64, 1536, 768), (33, 1536, 768), (3, 4096, 2048)])
def test_gpu_rms_scaled_linear_full_size(batch, width, n_out):
    """Mamba-2 out_proj shapes with the norm folded into the SSM step (split-K picks of dot_config): as close
    to the fp32 RMSNorm + product as rms_norm_linear's in-loop norm is."""
    v, nw, x, sums, w, b = _folded_norm_inputs(batch, width, n_out, "cuda")
    out = rms_scaled_linear(x, sums, w, b)
    exact = rms_norm_linear_ref(v, nw, w.float(), b.float())
    in_loop = rms_norm_linear(v.to(torch.bfloat16), nw.to(torch.bfloat16), w, b)
    assert (out.float() - exact).abs().max() <= 2 * (in_loop.float() - exact).abs().max() + 1e-2


@requires_cuda
@pytest.mark.parametrize("batch,d_model,d_ssm", [(64, 768, 1536), (64, 2048, 4096), (16, 768, 1536)])
def test_gpu_conv_fold_dot_full_size(batch, d_model, d_ssm):
    """Mamba-2 in_proj + conv at batch 16-64 (the tl.dot kernel's conv epilogue), bf16 state."""
    n_out, channels = 2 * d_ssm + 256 + d_ssm // 64, d_ssm + 256
    x = torch.randn(batch, d_model, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, d_model, device="cuda", dtype=torch.bfloat16) / d_model**0.5
    state = torch.randn(batch, channels, 4, device="cuda", dtype=torch.bfloat16)
    cw, cb = torch.randn(channels, 4, device="cuda", dtype=torch.bfloat16), torch.randn(channels, device="cuda")
    ref_state = state.clone()
    out = decode_linear(x, w, conv=(state, cw, cb, d_ssm, "silu"))
    ref = decode_linear_ref(x, w, None, (ref_state, cw, cb, d_ssm, "silu"))
    torch.testing.assert_close(state, ref_state, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=5e-2)


@requires_cuda
def test_gpu_dot_fit_same_bits(monkeypatch):
    """mamba2-1.3b's in_proj + conv at 64 rows (133 tiles: more programs than an H100's 132 SMs) in the
    two-per-SM config (DOT_FIT: 64-wide K steps, a register cap) and with the 64 features past 132 tiles one
    per program of the others (DOT_OVERFLOW, 132 SMs planned for) gives what the one-per-SM config gives; the
    overflow's second call gives the same bits."""
    torch.manual_seed(0)
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8512, 2048, device="cuda", dtype=torch.bfloat16) / 45
    state0 = torch.randn(64, 4352, 4, device="cuda", dtype=torch.bfloat16)
    cw, cb = torch.randn(4352, 4, device="cuda", dtype=torch.bfloat16), torch.randn(4352, device="cuda")
    runs = []
    for fit, over in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(dl, "DOT_FIT", fit)
        monkeypatch.setattr(dl, "DOT_OVERFLOW", over)
        monkeypatch.setattr(dl, "DOT_OVERFLOW_SMS", 8448 // 64 if over else 0)
        state = state0.clone()
        runs.append((decode_linear(x, w, conv=(state, cw, cb, 4096, "silu")), state))
        if over:
            assert any(getattr(p, "over", 0) for p in dl._PLANS.values())
            state = state0.clone()
            again = decode_linear(x, w, conv=(state, cw, cb, 4096, "silu"))
            assert torch.equal(again, runs[-1][0]) and torch.equal(state, runs[-1][1])
    for out, state in runs[1:]:
        torch.testing.assert_close(out, runs[0][0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(state, runs[0][1], rtol=1e-2, atol=1e-2)


@requires_cuda
# mamba-130m's x_proj (80, 1536) is absent: too few programs even split (dot_config None; it stays on cuBLAS).
@pytest.mark.parametrize("n_out,n_in,conv,peel", [(160, 4096, False, False),
                                                  (2048, 4096, False, False), (2048, 4096, False, True),
                                                  (768, 1536, False, False), (8192, 2048, True, False),
                                                  (3072, 768, True, False), (3072, 768, True, True),
                                                  (3352, 768, True, False)])
def test_gpu_dot_64_rows_model_shapes(n_out, n_in, conv, peel, monkeypatch):
    """Batch 64 on the models' shapes through the tl.dot kernel as dot_config picks it (split-K for
    x_proj / out_proj, whole K for in_proj): Mamba-1's x_proj and out_proj, its in_proj with the conv
    on the x half (conv_start 0), bf16 state; twice the same bits (the split sums in a fixed order).
    peel: the first weight tile loaded before the PDL wait (DOT_PEEL)."""
    monkeypatch.setattr(dl, "DOT_PEEL", peel)
    monkeypatch.setattr(dl, "DOT_TMA_EAGER", True)  # eager launches: TMA only while capturing otherwise
    torch.manual_seed(0)
    x = torch.randn(64, n_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
    assert dl.dot_config(n_out, n_in) is not None
    state = ref_state = conv_args = None
    if conv:
        state = torch.randn(64, n_out // 2, 4, device="cuda", dtype=torch.bfloat16)
        conv_args = (state, torch.randn(n_out // 2, 4, device="cuda", dtype=torch.bfloat16),
                     torch.randn(n_out // 2, device="cuda", dtype=torch.bfloat16), 0, "silu")
        ref_state, first = state.clone(), state.clone()
    out = decode_linear(x, w, conv=conv_args)
    ref = decode_linear_ref(x, w, None, None if not conv else (ref_state, *conv_args[1:]))
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=2e-2)
    if conv:
        torch.testing.assert_close(state, ref_state, rtol=1e-2, atol=2e-2)
        state.copy_(first)
    assert torch.equal(decode_linear(x, w, conv=conv_args), out)


def test_dot_config_narrow_tiles_for_small_weights():
    """Weights of fewer than DOT_SMALL_WEIGHT values (the 130m models' in_proj / out_proj) take
    DOT_SMALL_BLOCK_N features per program, larger ones DOT_BLOCK_N; never more than DOT_BLOCK_N."""
    assert dl.dot_config(3072, 768)[0] == dl.dot_config(768, 1536)[0] == dl.DOT_SMALL_BLOCK_N < dl.DOT_BLOCK_N
    assert dl.dot_config(2048, 4096)[0] == dl.dot_config(8192, 2048)[0] == dl.DOT_BLOCK_N
    assert 768 * 1536 < dl.DOT_SMALL_WEIGHT <= 2048 * 4096


def test_completes_before_next_needs_pdl_and_few_rows():
    """Without PDL (CPU) or above SMALL_ROWS rows a product is never taken for a barrier."""
    w = torch.empty(8512, 2048, device=DEVICE)
    assert not dl.completes_before_next(64, w)
    if not torch.cuda.is_available():
        assert not dl.completes_before_next(1, w)


@requires_cuda
def test_gpu_completes_before_next_counts_programs():
    """mamba2-1.3b's in_proj at batch 1 (4256 programs of 4 warps: the add + norm as a pre-pass, or
    none) is a barrier on an H100 (at most 16 such programs per SM, 132 SMs); with the add + norm and
    the conv folded (1064 programs of FOLD_BLOCK_N features) it is one once a launch has shown its
    ~108 registers per thread (4 programs per SM); mamba2-130m's (838 small programs) is not."""
    w = torch.randn(8512, 2048, device="cuda", dtype=torch.bfloat16)
    assert dl.completes_before_next(1, w)
    dl._REGISTERS.clear()
    dl._PLANS.clear()  # answers kept there once the registers are known
    assert not dl.completes_before_next(1, w, dl.NORM_ADD, conv=True)  # registers unknown: thread limit only
    x, res = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16), torch.randn(1, 2048, device="cuda")
    conv = (torch.randn(1, 4352, 4, device="cuda", dtype=torch.bfloat16),
            torch.randn(4352, 4, device="cuda", dtype=torch.bfloat16), None, 4096, "silu")
    add_rms_norm_linear(x, res, torch.ones(2048, device="cuda", dtype=torch.bfloat16), w, None, 1e-5, True, conv)
    assert dl.completes_before_next(1, w, dl.NORM_ADD, conv=True) == (not dl.PREPASS_ADD_NORM_CONV)
    assert not dl.completes_before_next(1, torch.empty(3352, 768, device="cuda", dtype=torch.bfloat16))


@requires_cuda
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_gpu_full_size(batch):
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64
    out = decode_linear(x, w)
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=2e-2)


def _record_descriptors(monkeypatch):
    """decode_linear's TMA descriptors as they are made: a list of (tensor shape, descriptor or None)."""
    made = []
    descriptor = dl._descriptor

    def record(t, block):
        made.append((t.shape, descriptor(t, block)))
        return made[-1][1]
    monkeypatch.setattr(dl, "_descriptor", record)
    return made


@pytest.mark.parametrize("norm,conv,aligned", [(False, False, True), (True, False, True), (False, 4, True),
                                               (False, False, False)])
def test_dot_tma_matches_pointer_loads(norm, conv, aligned, monkeypatch):
    """DOT_TMA: the tl.dot kernel's x and weight tiles through TMA descriptors (the interpreter runs them
    too) give the pointer loads' bits: split-K over 4 programs with a ragged last split (K 200, steps of
    32), batch 19 (rows past it read as zeros), 37 outputs in ragged blocks of 16, with the RMSNorm
    prologue or the conv epilogue. aligned False: x's rows 201 values apart (not 16-byte aligned) take
    the pointer loads, the weight the descriptor."""
    _small_dot(monkeypatch, block_k=32, split=True)
    monkeypatch.setattr(dl, "DOT_TMA_MIN_STEPS", 0)
    monkeypatch.setattr(dl, "DOT_TMA_EAGER", True)
    made = _record_descriptors(monkeypatch)
    torch.manual_seed(5)
    width = 200 if aligned else 201
    x = torch.randn(19, 2 * width, device=DEVICE)[:, width:width + 200]
    w, b, nw = torch.randn(37, 200, device=DEVICE), torch.randn(37, device=DEVICE), torch.randn(200, device=DEVICE)
    state0 = conv_args = None
    if conv:
        state0, conv_args = _conv_case(19, 37, 20, 9, conv, torch.bfloat16)
    outs, states = [], []
    for tma in (False, True):
        monkeypatch.setattr(dl, "DOT_TMA", tma)
        if conv:
            conv_args = (state0.clone(), *conv_args[1:])
        outs.append(rms_norm_linear(x, nw, w, b, 1e-5, backend="triton") if norm
                    else decode_linear(x, w, b, conv=conv_args, backend="triton"))
        states.append(conv_args[0] if conv else None)
    assert [d is not None for _, d in made] == [True, aligned]  # the weight's, then x's
    assert torch.equal(outs[1], outs[0])
    if conv:
        assert torch.equal(states[1], states[0])
    ref = rms_norm_linear_ref(x, nw, w, b, 1e-5) if norm else decode_linear_ref(
        x, w, b, None if not conv else (state0.clone(), *conv_args[1:]))
    torch.testing.assert_close(outs[1], ref, rtol=1e-4, atol=1e-4)


def test_dot_tma_min_steps(monkeypatch):
    """DOT_TMA_MIN_STEPS: programs of fewer K steps keep the pointer loads, except with the RMSNorm prologue."""
    _small_dot(monkeypatch, block_k=32, split=True)  # K 200 over 4 splits: 2 steps per program
    monkeypatch.setattr(dl, "DOT_TMA", True)
    monkeypatch.setattr(dl, "DOT_TMA_EAGER", True)
    monkeypatch.setattr(dl, "DOT_TMA_MIN_STEPS", 3)
    made = _record_descriptors(monkeypatch)
    x, w, nw = torch.randn(19, 200, device=DEVICE), torch.randn(37, 200, device=DEVICE), torch.randn(200, device=DEVICE)
    torch.testing.assert_close(decode_linear(x, w, backend="triton"), decode_linear_ref(x, w), rtol=1e-4, atol=1e-4)
    assert made == []
    torch.testing.assert_close(rms_norm_linear(x, nw, w, None, 1e-5, backend="triton"),
                               rms_norm_linear_ref(x, nw, w, None, 1e-5), rtol=1e-4, atol=1e-4)
    assert [shape for shape, _ in made] == [w.shape, x.shape]


def test_dot_tma_and_prefetch_need_aligned_rows():
    """TMA descriptors and the bulk prefetch need rows that start 16-byte aligned and are contiguous."""
    w = torch.empty(8, 64, dtype=torch.bfloat16)
    assert dl._aligned(w) and dl._aligned(w[:, 8:])
    assert not dl._aligned(w[:, 1:]) and not dl._aligned(w[:, :60].t())
    assert not dl._aligned(torch.empty(8, 67, dtype=torch.bfloat16)[:, :64])  # rows 134 bytes apart
    assert not dl._sm90(w)  # CPU: the pointer loads, no prefetch


@requires_cuda
@pytest.mark.parametrize("n_out,n_in,norm,conv", [(2048, 4096, True, None), (2048, 4096, False, None),
                                                  (8512, 2048, False, (4096, 4352)), (8192, 2048, False, (0, 4096)),
                                                  (160, 4096, False, None)])
def test_gpu_dot_tma_prefetch_model_shapes(n_out, n_in, norm, conv, monkeypatch):
    """Batch 64 on the 1.3b / 1.4b models' shapes (out_proj with and without the RMSNorm prologue, split
    4; in_proj + conv, Mamba-2's in two programs per SM; x_proj, split 16): the weight slice prefetched
    into L2 before the PDL wait (DOT_PREFETCH_K: by rows or by lines), the tiles through TMA (DOT_TMA), or both, as close to
    the fp32 reference as the pointer loads, and the same bits twice; a weight whose rows are not
    16-byte aligned takes neither and is right too."""
    monkeypatch.setattr(dl, "DOT_TMA_EAGER", True)  # eager launches: TMA only while capturing otherwise
    torch.manual_seed(0)
    x = torch.randn(64, n_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
    nw = torch.rand(n_in, device="cuda", dtype=torch.bfloat16) + 0.5
    state0 = conv_rest = None
    if conv:
        state0 = torch.randn(64, conv[1], 4, device="cuda", dtype=torch.bfloat16)
        conv_rest = (torch.randn(conv[1], 4, device="cuda", dtype=torch.bfloat16),
                     torch.randn(conv[1], device="cuda", dtype=torch.bfloat16), conv[0], "silu")

    def run(weight):
        state = None if conv is None else state0.clone()
        if norm:
            return rms_norm_linear(x, nw, weight, None, 1e-5), state
        return decode_linear(x, weight, conv=None if conv is None else (state, *conv_rest)), state
    base, base_state = run(w)
    if norm:
        ref = rms_norm_linear_ref(x, nw, w, None, 1e-5)
    else:
        ref_state = None if conv is None else state0.clone()
        ref = decode_linear_ref(x, w, None, None if conv is None else (ref_state, *conv_rest))
    base_err = (base.float() - ref.float()).abs().max().item()
    misaligned = torch.empty(n_out, n_in + 1, device="cuda", dtype=torch.bfloat16)[:, :n_in].copy_(w)
    for tma, prefetch, lines in ((False, 1 << 20, False), (True, 0, False), (True, 1 << 20, False), (False, 512, False),
                                 (False, 512, True), (False, 1 << 20, True), (True, 256, True)):
        monkeypatch.setattr(dl, "DOT_TMA", tma)
        monkeypatch.setattr(dl, "DOT_PREFETCH_K", prefetch)
        monkeypatch.setattr(dl, "DOT_PREFETCH_LINES", lines)
        out, state = run(w)
        assert (out.float() - ref.float()).abs().max().item() <= 2 * base_err + 1e-2, (tma, prefetch)
        assert torch.equal(run(w)[0], out)
        if conv:
            torch.testing.assert_close(state, base_state, rtol=1e-2, atol=2e-2)
        out, _ = run(misaligned)
        assert (out.float() - ref.float()).abs().max().item() <= 2 * base_err + 1e-2, ("misaligned", tma, prefetch)


@requires_cuda
@pytest.mark.parametrize("batch", [3, 9, 19, 33])
def test_gpu_dot_tma_odd_batches(batch, monkeypatch):
    """Batches below the row tile (16, 32 or 64 rows: the x descriptor's box is taller than x, the rows
    past the batch read as zeros): the RMSNorm + out_proj product and Mamba-1's in_proj + conv (16 K steps)
    through TMA equal the pointer loads' results and the fp32 reference."""
    monkeypatch.setattr(dl, "DOT_TMA_EAGER", True)
    torch.manual_seed(batch)
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    w_out = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64
    h = torch.randn(batch, 2048, device="cuda", dtype=torch.bfloat16)
    w_in = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16) / 45
    state0 = torch.randn(batch, 4096, 4, device="cuda", dtype=torch.bfloat16)
    conv_rest = (torch.randn(4096, 4, device="cuda", dtype=torch.bfloat16),
                 torch.randn(4096, device="cuda", dtype=torch.bfloat16), 0, "silu")
    runs = []
    for tma in (False, True):
        monkeypatch.setattr(dl, "DOT_TMA", tma)
        state = state0.clone()
        runs.append((rms_norm_linear(x, nw, w_out, None, 1e-5), decode_linear(h, w_in, conv=(state, *conv_rest)), state))
    ref_state = state0.clone()
    refs = (rms_norm_linear_ref(x, nw, w_out, None, 1e-5), decode_linear_ref(h, w_in, None, (ref_state, *conv_rest)))
    for got, base, ref in zip(runs[1][:2], runs[0][:2], refs):
        torch.testing.assert_close(got.float(), base.float(), rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(runs[1][2], runs[0][2], rtol=1e-2, atol=2e-2)


@requires_cuda
def test_gpu_dot_tma_only_while_capturing(monkeypatch):
    """DOT_TMA_EAGER False (the default): the first eager 64-row launch of a signature takes the TMA tiles
    (compiling them for a later capture), later eager launches the pointer loads (no descriptor encoded on
    the host), a launch captured into a CUDA graph the TMA tiles again; each result is as accurate as the
    other (RMSNorm + out_proj, 32 K steps)."""
    from mamba_pkg.ops import _launch

    monkeypatch.setattr(_launch, "_VARIANTS_SEEN", set())
    made = _record_descriptors(monkeypatch)
    torch.manual_seed(1)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64
    first = rms_norm_linear(x, nw, w, None, 1e-5)
    assert [shape for shape, _ in made] == [w.shape, x.shape]
    made.clear()
    eager = rms_norm_linear(x, nw, w, None, 1e-5)
    assert made == []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rms_norm_linear(x, nw, w, None, 1e-5)
    assert [shape for shape, _ in made] == [w.shape, x.shape]
    graph.replay()
    torch.cuda.synchronize()
    ref = rms_norm_linear_ref(x, nw, w, None, 1e-5)
    base_err = (eager.float() - ref.float()).abs().max().item()
    for out in (first, captured):
        assert (out.float() - ref.float()).abs().max().item() <= 2 * base_err + 1e-2


def test_launch_plans_are_reused_and_dropped_when_a_switch_is_set(monkeypatch):
    """A launcher derives its launch (grid, scalars, constexprs) once per operand layout and reuses
    it (decode_linear._PLANS); setting a switch of a module with plans (here BLOCK_N) drops every
    module's plans (ssm_decode_step's too), so that the next call follows the new setting."""
    from mamba_pkg.ops import ssm_decode_step as sds

    from mamba_pkg.ops._launch import Plan, clear_plans

    grids = []
    run = Plan.__call__
    monkeypatch.setattr(Plan, "__call__", lambda self, *a: grids.append(self.grid) or run(self, *a))
    clear_plans()  # whatever earlier tests left
    torch.manual_seed(0)
    x, w = torch.randn(2, 40, device=DEVICE), torch.randn(37, 40, device=DEVICE)
    first = decode_linear(x, w, backend="triton")
    plans = dict(dl._PLANS)
    assert len(plans) == 1
    assert torch.equal(decode_linear(x, w, backend="triton"), first)
    assert dl._PLANS == plans and grids == [(dl.cdiv(37, dl.BLOCK_N),)] * 2
    sds._PLANS["probe"] = None
    monkeypatch.setattr(dl, "BLOCK_N", 2 * dl.BLOCK_N)
    assert not dl._PLANS and not sds._PLANS
    torch.testing.assert_close(decode_linear(x, w, backend="triton"), first, rtol=1e-5, atol=1e-5)
    assert grids[-1] == (dl.cdiv(37, dl.BLOCK_N),) != grids[0]
