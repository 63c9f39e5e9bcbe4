"""selective_scan: the chunked torch reference against a naive per-step loop, its
options (B/C forms, groups, varlen, states), input validation, and the Triton
kernels against the reference (interpreter on CPU, realistic shapes on CUDA)."""

import os

import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.ops.selective_scan import selective_scan_fn, selective_scan_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """One time step per iteration, fp32: the definition of the recurrence."""
    u, delta = u.float(), delta.float()
    batch, dim, seqlen = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def at(t, l):  # (B, D, N) slice of B or C at step l
        t = t.float()
        if t.dim() == 2:
            return t.expand(batch, dim, -1)
        if t.dim() == 3:
            return t[:, None, :, l].expand(batch, dim, -1)
        return t[:, :, :, l].repeat_interleave(dim // t.shape[1], dim=1)

    h = torch.zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for l in range(seqlen):
        dt = delta[:, :, l, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, l, None] * at(B, l)
        ys.append((h * at(C, l)).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y, h


def make_inputs(batch, dim, seqlen, dstate, bc="var", groups=2, dtype=torch.float32, device="cpu",
                with_options=True, requires_grad=False):
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u = rnd(batch, dim, seqlen).to(dtype)
    delta = (rnd(batch, dim, seqlen, scale=0.5) - 1.0).to(dtype)
    A = -torch.exp(rnd(dim, dstate, scale=0.5))
    shapes = {"fixed": (dim, dstate), "var": (batch, dstate, seqlen), "group": (batch, groups, dstate, seqlen)}
    B = rnd(*shapes[bc]).to(dtype if bc != "fixed" else torch.float32)
    C = rnd(*shapes[bc]).to(dtype if bc != "fixed" else torch.float32)
    args = dict(u=u, delta=delta, A=A, B=B, C=C)
    if with_options:
        args.update(D=rnd(dim), z=rnd(batch, dim, seqlen).to(dtype), delta_bias=rnd(dim, scale=0.3))
    if requires_grad:
        for t in args.values():
            t.requires_grad_(True)
    return args


# ---------------------------------------------------------------------------
# The reference against the naive loop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 7, 63, 500])
@pytest.mark.parametrize("bc", ["fixed", "var", "group"])
def test_ref_matches_naive_forward(seqlen, bc):
    args = make_inputs(2, 4, seqlen, 5, bc=bc)
    h0 = torch.randn(2, 4, 5)
    out, last = selective_scan_ref(**args, delta_softplus=True, return_last_state=True, initial_state=h0)
    want, want_last = naive_scan(**args, delta_softplus=True, initial_state=h0)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, want_last, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seqlen,bc", [(7, "group"), (130, "var"), (70, "fixed")])
def test_ref_matches_naive_backward(seqlen, bc):
    args = make_inputs(2, 4, seqlen, 3, bc=bc, requires_grad=True)
    h0 = torch.randn(2, 4, 3, requires_grad=True)
    out, last = selective_scan_ref(**args, delta_softplus=True, return_last_state=True, initial_state=h0)
    want, want_last = naive_scan(**args, delta_softplus=True, initial_state=h0)
    g_out, g_last = torch.randn_like(out), torch.randn_like(last)
    inputs = list(args.values()) + [h0]
    grads = torch.autograd.grad((out * g_out).sum() + (last * g_last).sum(), inputs)
    want_grads = torch.autograd.grad((want * g_out).sum() + (want_last * g_last).sum(), inputs)
    for name, got, exp in zip(list(args) + ["initial_state"], grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


def test_ref_without_options_and_low_precision():
    args = make_inputs(1, 3, 65, 4, bc="var", with_options=False, dtype=torch.bfloat16)
    out = selective_scan_ref(**args, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    want, _ = naive_scan(**args, delta_softplus=True)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_state_chaining():
    args = make_inputs(2, 4, 150, 6, bc="group", groups=4)
    cut = 67
    first = {k: (v[..., :cut] if v.dim() >= 3 else v) for k, v in args.items()}
    second = {k: (v[..., cut:] if v.dim() >= 3 else v) for k, v in args.items()}
    out, last = selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    out_a, last_a = selective_scan_ref(**first, delta_softplus=True, return_last_state=True)
    out_b, last_b = selective_scan_ref(**second, delta_softplus=True, return_last_state=True, initial_state=last_a)
    torch.testing.assert_close(torch.cat([out_a, out_b], -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_b, last, rtol=1e-5, atol=1e-5)


def _split(args, lo, hi):
    return {k: (v[..., lo:hi] if v.dim() >= 3 else v) for k, v in args.items()}


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("bc", ["fixed", "group"])
def test_varlen_equals_per_sequence(with_h0, bc):
    lengths = [5, 0, 64, 1, 70]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    args = make_inputs(1, 4, sum(lengths), 3, bc=bc)
    h0 = torch.randn(len(lengths), 4, 3) if with_h0 else None
    out, last = selective_scan_ref(**args, delta_softplus=True, return_last_state=True, initial_state=h0,
                                   cu_seqlens=cu)
    assert last.shape == (len(lengths), 4, 3)
    for i in range(len(lengths)):
        lo, hi = cu[i].item(), cu[i + 1].item()
        init = None if h0 is None else h0[i:i + 1]
        if hi == lo:
            want_last = torch.zeros(1, 4, 3) if init is None else init
            torch.testing.assert_close(last[i:i + 1], want_last)
            continue
        want, want_last = selective_scan_ref(**_split(args, lo, hi), delta_softplus=True, return_last_state=True,
                                             initial_state=init)
        torch.testing.assert_close(out[..., lo:hi], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last[i:i + 1], want_last, rtol=1e-5, atol=1e-5)


def test_public_fn_torch_backend():
    args = make_inputs(2, 4, 20, 3)
    out = selective_scan_fn(**args, delta_softplus=True, backend="torch")
    torch.testing.assert_close(out, selective_scan_ref(**args, delta_softplus=True))


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ---------------------------------------------------------------------------


def _bad(**changes):
    args = make_inputs(1, 4, 9, 3)
    args.update(changes)
    return args


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "changes,exc,match",
    [
        (dict(u=torch.randn(4, 9)), ValueError, "u must have 3 dimensions"),
        (dict(delta=torch.randn(1, 4, 8)), ValueError, r"delta must have shape \(1, 4, 9\)"),
        (dict(A=torch.randn(5, 3)), ValueError, r"A must have shape \(D, N\)"),
        (dict(A=-torch.rand(4, 257)), ValueError, "N=257"),
        (dict(A=-torch.rand(4, 3, dtype=torch.float64)), TypeError, "A must have dtype float32"),
        (dict(B=torch.randn(1, 3, 8)), ValueError, r"B must have shape \(1, 3, 9\)"),
        (dict(C=torch.randn(1, 3, 3, 9)), ValueError, "G=3 groups"),
        (dict(B=torch.randn(4, 9)), ValueError, r"B must have shape \(4, 3\)"),
        (dict(C=torch.randn(1, 1, 1, 3, 9)), ValueError, "C must have 2 or 3 or 4 dimensions"),
        (dict(u=torch.randint(0, 3, (1, 4, 9))), TypeError, "u must have dtype"),
        (dict(delta=torch.rand(1, 4, 9, dtype=torch.float16)), TypeError, "delta must have dtype float32"),
        (dict(D=torch.randn(5)), ValueError, r"D must have shape \(4\)"),
        (dict(z=torch.randn(1, 4, 10)), ValueError, r"z must have shape \(1, 4, 9\)"),
        (dict(delta_bias=torch.randn(4, dtype=torch.float16)), TypeError, "delta_bias must have dtype float32"),
        (dict(initial_state=torch.randn(2, 4, 3)), ValueError, r"initial_state must have shape \(1, 4, 3\)"),
        (dict(u=[1.0]), TypeError, "u must be a torch.Tensor"),
        (dict(B=torch.randn(1, 3, 9, device="meta")), ValueError, "B is on meta"),
        (dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "end at the sequence length"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0.0, 9.0])), TypeError, "cu_seqlens must have dtype int32"),
        (dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32),
              initial_state=torch.randn(1, 4, 2)), ValueError, r"initial_state must have shape \(1, 4, 3\)"),
    ],
)
def test_bad_input(changes, exc, match, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "0" and not torch.cuda.is_available():
        pytest.skip("triton backend needs CUDA or the interpreter")
    # On a CUDA machine the Triton backend needs CUDA tensors (the meta one stays on meta).
    args = {k: v.to(DEV) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
            for k, v in _bad(**changes).items()}
    with pytest.raises(exc, match=match):
        selective_scan_fn(**args, backend=backend)


def test_common_case_takes_the_fast_check(monkeypatch):
    """Valid common-case calls (B/C (B, N, L) or (D, N)) skip the full validation, which costs
    host time; its errors are covered by test_bad_input."""
    import mamba_pkg.ops.selective_scan as ss

    def full_check(*args):
        raise AssertionError("full validation ran")

    if os.environ.get("TRITON_INTERPRET", "0") == "0" and not torch.cuda.is_available():
        pytest.skip("triton backend needs CUDA or the interpreter")
    monkeypatch.setattr(ss, "_check_inputs", full_check)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for bc in ("var", "fixed"):
        args = make_inputs(1, 4, 9, 3, bc=bc, device=DEV)
        assert ss._inputs_ok(*(args[k] for k in names))
    with torch.no_grad():
        out = ss.selective_scan_fn(**args, backend="triton")
    assert out.shape == (1, 4, 9)
    args = make_inputs(1, 4, 9, 3, bc="group", device=DEV)
    assert not ss._inputs_ok(*(args[k] for k in names))
    with pytest.raises(AssertionError, match="full validation"):
        ss.selective_scan_fn(**args, backend="triton")


def test_bad_cu_seqlens_batch():
    args = make_inputs(2, 4, 9, 3)
    with pytest.raises(ValueError, match="batch size 1"):
        selective_scan_ref(**args, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))


# ---------------------------------------------------------------------------
# Triton kernels against the reference (interpreter on CPU, tiny shapes)
# ---------------------------------------------------------------------------


def _rule(out, ref32, reflow, name):
    # The STYLE.md rule with an atol scaled to the tensor: fp32 outputs (dA, dD, ...)
    # differ from the reference only by summation order, and a low-precision output
    # may round to the other neighbour (half an ulp at the largest magnitude).
    scale = ref32.double().abs().max().item()
    atol = 2e-5 * scale + 1e-6
    if out.dtype in (torch.float16, torch.bfloat16):
        atol += 0.5 * torch.finfo(out.dtype).eps * scale
    assert_close_rule(out, ref32, reflow, atol=atol, name=name)


def assert_close_rule(out, ref_fp32, ref_lowp, *, factor=2.0, atol=1e-5, name="output"):
    """STYLE.md tolerance rule (same as tests/conftest.py's, which cannot be imported)."""
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    err = (out.double() - ref_fp32.double()).abs().max().item()
    base = (ref_lowp.double() - ref_fp32.double()).abs().max().item()
    assert err <= factor * base + atol, f"{name}: max error {err:.3e} > {factor} x {base:.3e} + {atol:.1e}"


def _run(backend, args, h0, cu, softplus, dout, dlast, use_out=True):
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in args.items()}
    init = h0.detach().clone().requires_grad_(True) if h0 is not None else None
    out, last = selective_scan_fn(**leaves, delta_softplus=softplus, return_last_state=True, initial_state=init,
                                  cu_seqlens=cu, backend=backend)
    loss = (last * dlast).sum()
    if use_out:
        loss = loss + (out.float() * dout).sum()
    names = list(leaves) + (["initial_state"] if init is not None else [])
    tensors = list(leaves.values()) + ([init] if init is not None else [])
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    result = {"out": out, "last_state": last}
    result.update({f"d{n}": (g if g is not None else torch.zeros_like(t)) for n, t, g in zip(names, tensors, grads)})
    return result


def check_kernel(args, h0=None, cu=None, softplus=True, use_out=True, device=DEV):
    args = {k: v.to(device) for k, v in args.items()}
    h0 = h0.to(device) if h0 is not None else None
    cu = cu.to(device) if cu is not None else None
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(args["u"].shape, generator=g).to(device)
    num_seqs = args["u"].shape[0] if cu is None else cu.numel() - 1
    dlast = torch.randn(num_seqs, *args["A"].shape, generator=g).to(device)
    got = _run("triton", args, h0, cu, softplus, dout, dlast, use_out)
    lowp = _run("torch", args, h0, cu, softplus, dout, dlast, use_out)
    args32 = {k: (v.float() if v.is_floating_point() else v) for k, v in args.items()}
    ref = _run("torch", args32, h0, cu, softplus, dout, dlast, use_out)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == lowp[name].dtype, name
        _rule(got[name], ref[name], lowp[name], name)


def check_forward_no_grad(args, h0=None):
    """The forward without gradients (no checkpoints, its own tile length) against the reference:
    the output under the tolerance rule, the last state to 1e-4."""
    with torch.no_grad():
        out, last = selective_scan_fn(**args, delta_softplus=True, return_last_state=True, initial_state=h0,
                                      backend="triton")
        args32 = {k: v.float() for k, v in args.items()}
        ref, ref_last = selective_scan_ref(**args32, delta_softplus=True, return_last_state=True, initial_state=h0)
        lowp = selective_scan_ref(**args, delta_softplus=True, initial_state=h0)
    _rule(out, ref, lowp, "out")
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "dtype,bc,seqlen,dstate,dim",
    [
        (torch.float32, "var", 7, 4, 4),
        (torch.float16, "group", 63, 8, 8),
        (torch.bfloat16, "fixed", 1, 16, 4),
        (torch.bfloat16, "var", 20, 5, 6),
        # N=33..64: block shapes of their own (four-warp backward with 4-step tiles).
        (torch.float32, "var", 13, 40, 2),
    ],
)
def test_kernel_matches_ref(dtype, bc, seqlen, dstate, dim):
    args = make_inputs(2, dim, seqlen, dstate, bc=bc, dtype=dtype)
    check_kernel(args, h0=torch.randn(2, dim, dstate))


@pytest.mark.parametrize("bc", ["var", "group"])
def test_kernel_deterministic_mode_matches_ref(bc):
    """Under torch.use_deterministic_algorithms the input-dependent dB / dC come from per-block
    partials summed in torch instead of atomic adds: same results under the tolerance rule."""
    args = make_inputs(2, 8, 20, 16, bc=bc, dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        check_kernel(args, h0=torch.randn(2, 8, 16))
    finally:
        torch.use_deterministic_algorithms(False)


def test_kernel_shuffle_sums_match_ref(monkeypatch):
    """SPLIT_SUMS off: the sums across lanes by shuffles (tl.sum, and the dB / dC halving), which
    the shapes other than one channel per thread of a one-warp program still use."""
    import mamba_pkg.ops.selective_scan as ss

    monkeypatch.setattr(ss, "SPLIT_SUMS", False)
    args = make_inputs(2, 8, 20, 16, bc="var", dtype=torch.bfloat16)
    check_kernel(args, h0=torch.randn(2, 8, 16))


def test_few_programs_rule(monkeypatch):
    """The forward without checkpoints splits its sums, and the forward kernels skip the L1 prefetch,
    from FEW_PROGRAMS_PER_SM programs per SM on (the interpreter: always split, never prefetched)."""
    import mamba_pkg.ops.selective_scan as ss

    monkeypatch.setattr(ss, "sm_count", lambda device: 132)
    per_sm = ss.FEW_PROGRAMS_PER_SM
    assert not ss._few_programs(torch.device("cuda", 0), per_sm * 132)
    assert ss._few_programs(torch.device("cuda", 0), per_sm * 132 - 1)
    assert not ss._few_programs(torch.device("cpu"), 1)


@pytest.mark.parametrize("seqlen", [40, 64])
def test_kernel_split_tail_matches_ref(monkeypatch, seqlen):
    """The forward launch without gradients with its last blocks of channels split along L
    (SPLIT_TAIL; forced here: 2 of 6 blocks): first halves, whole blocks, then second halves that
    start from the first halves' states."""
    import mamba_pkg.ops.selective_scan as ss

    monkeypatch.setattr(ss, "_tail_split", lambda device, n_blocks, n_tiles, *_: (n_blocks - 2, 2))
    monkeypatch.setattr(ss, "BC_WORDS_FWD", False)  # the words kernel runs B=8 D=1536 in one wave: no split
    args = make_inputs(2, 24, seqlen, 16, bc="var", dtype=torch.bfloat16, device=DEV)
    check_forward_no_grad(args, torch.randn(2, 24, 16).to(DEV))


def test_kernel_full_tiles():
    """D, N and L that fill every tile: the kernels drop their bounds masks."""
    args = make_inputs(2, 16, 32, 16, bc="var", dtype=torch.bfloat16, device=DEV)
    h0 = torch.randn(2, 16, 16).to(DEV)
    check_kernel(args, h0=h0)
    check_forward_no_grad(args, h0)  # the forward without checkpoints uses its own tile length


def test_kernel_bc_words_need_aligned_rows(monkeypatch):
    """Full tiles of bf16 B and C: read as 32-bit words of two steps (BC_WORDS) when their rows start
    on 4-byte boundaries; as views at an odd element offset they are read step by step. The same
    results either way."""
    import mamba_pkg.ops.selective_scan as ss

    seen = []
    real = ss._bc_words
    monkeypatch.setattr(ss, "_bc_words", lambda *a: seen.append(real(*a)) or seen[-1])
    args = make_inputs(2, 8, 32, 16, bc="var", dtype=torch.bfloat16, device=DEV)
    check_forward_no_grad(args)
    for name in ("B", "C"):
        buf = torch.empty(args[name].numel() + 1, dtype=torch.bfloat16, device=DEV)
        args[name] = buf[1:].view(args[name].shape).copy_(args[name])
    check_forward_no_grad(args)
    assert seen == [True, False]


def test_kernel_strided_rows():
    """u and z as the halves of one (B, 2D, L) tensor and delta with padded rows: the
    kernels read them in place (batch and channel strides); values and gradients match."""
    g = torch.Generator().manual_seed(3)
    xz = torch.randn(2, 8, 11, generator=g).to(DEV).requires_grad_(True)
    delta_buf = (0.5 * torch.randn(2, 4, 16, generator=g) - 1.0).to(DEV).requires_grad_(True)
    rest = make_inputs(2, 4, 11, 4, bc="var", device=DEV)
    dout = torch.randn(2, 4, 11, generator=g).to(DEV)
    results = []
    for backend in ("triton", "torch"):
        u, z = xz.chunk(2, dim=1)
        delta = delta_buf[:, :, :11]
        assert backend == "torch" or (u.stride() == (88, 11, 1) and delta.stride() == (64, 16, 1))
        out = selective_scan_fn(u, delta, rest["A"], rest["B"], rest["C"], rest["D"], z, rest["delta_bias"],
                                delta_softplus=True, backend=backend)
        results.append([out] + list(torch.autograd.grad((out * dout).sum(), [xz, delta_buf])))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_kernel_mixed_bc_forms():
    """B with groups, C shared by all channels (and the reverse): each is indexed by its own groups."""
    args = make_inputs(1, 8, 9, 4, bc="group", groups=4)
    args["C"] = torch.randn(1, 4, 9)
    check_kernel(args)
    args = make_inputs(1, 8, 9, 4, bc="group", groups=2)
    args["B"] = torch.randn(8, 4)
    check_kernel(args)
    # Same groups, different dtypes: one reduction of both partials, a cast each.
    args = make_inputs(2, 8, 9, 4, bc="var")
    args["B"] = args["B"].to(torch.bfloat16)
    check_kernel(args)


def test_kernel_no_options_no_softplus():
    args = make_inputs(1, 4, 33, 4, bc="var", with_options=False)
    args["delta"] = args["delta"].abs() * 0.1
    check_kernel(args, softplus=False)


def test_kernel_only_last_state_used():
    args = make_inputs(2, 4, 10, 4, bc="group")
    check_kernel(args, h0=torch.randn(2, 4, 4), use_out=False)


@pytest.mark.parametrize("with_h0,bc,dtype", [(True, "var", torch.float32), (False, "group", torch.bfloat16)])
def test_kernel_varlen(with_h0, bc, dtype):
    lengths = [5, 0, 12, 1, 19]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    args = make_inputs(1, 4, sum(lengths), 4, bc=bc, dtype=dtype)
    check_kernel(args, h0=torch.randn(len(lengths), 4, 4) if with_h0 else None, cu=cu)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_length(backend):
    args = make_inputs(2, 4, 0, 3, bc="var", device=DEV)
    h0 = torch.randn(2, 4, 3).to(DEV)
    out, last = selective_scan_fn(**args, return_last_state=True, initial_state=h0, backend=backend)
    assert out.shape == (2, 4, 0)
    torch.testing.assert_close(last, h0)


def test_kernel_large_state_and_strided_inputs():
    args = make_inputs(1, 4, 5, 256, bc="var")
    # A (B, L, D) buffer seen as (B, D, L): the kernel copies what it needs contiguous.
    args["u"] = args["u"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not args["u"].is_contiguous()
    check_kernel(args)


# ---------------------------------------------------------------------------
# GPU: realistic shapes, and mamba_ssm where it is installed
# ---------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize(
    "dtype,bc,batch,dim,seqlen,dstate",
    [
        (torch.bfloat16, "var", 2, 256, 2049, 16),
        # Full tiles: the forward's L1 prefetch (EVEN only).
        (torch.bfloat16, "var", 2, 256, 2048, 16),
        (torch.float16, "group", 2, 192, 1000, 16),
        (torch.float32, "fixed", 1, 64, 777, 64),
        (torch.bfloat16, "var", 1, 32, 300, 256),
        (torch.bfloat16, "var", 3, 130, 4100, 4),
    ],
)
def test_kernel_matches_ref_cuda(dtype, bc, batch, dim, seqlen, dstate):
    args = make_inputs(batch, dim, seqlen, dstate, bc=bc, groups=4, dtype=dtype)
    check_kernel(args, h0=torch.randn(batch, dim, dstate), device="cuda")


@requires_cuda
@pytest.mark.parametrize("dstate", [4, 16])
def test_kernel_l1_prefetch_changes_no_bits_cuda(monkeypatch, dstate):
    """The forward kernels' L1 prefetch (PTX, full tiles) is only a hint: the same output and
    last state, with and without gradients (the checkpointing forward), bit for bit."""
    import mamba_pkg.ops.selective_scan as ss

    args = make_inputs(2, 256, 1024, dstate, bc="var", dtype=torch.bfloat16, device="cuda")
    results = []
    for prefetch in (True, False):
        monkeypatch.setattr(ss, "L1_PREFETCH", prefetch)
        with torch.no_grad():
            plain = selective_scan_fn(**args, delta_softplus=True, return_last_state=True, backend="triton")
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
        ckpt = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend="triton")
        results.append([t.detach() for t in (*plain, *ckpt)])
    for on, off in zip(*results):
        assert torch.equal(on, off)


@requires_cuda
def test_kernel_bc_words_change_no_bits_cuda(monkeypatch):
    """bf16 B and C moved to the scan layout as 32-bit words and unpacked there (BC_WORDS), or
    converted to fp32 before: exact either way. The forward without gradients gives the same bits;
    the other kernels may contract and order their fp32 sums differently (the H100 gave a few
    different bits in the checkpointing forward's output), and atomic adds sum dA, dB, dC, dD and
    d delta_bias in a varying order: those to rounding."""
    import mamba_pkg.ops.selective_scan as ss

    args = make_inputs(2, 256, 1024, 16, bc="var", dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(args["u"])
    results = []
    for words in (True, False):
        monkeypatch.setattr(ss, "BC_WORDS_FWD", words)
        monkeypatch.setattr(ss, "BC_WORDS_BWD", words)
        with torch.no_grad():
            plain = selective_scan_fn(**args, delta_softplus=True, backend="triton")
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
        out = selective_scan_fn(**leaves, delta_softplus=True, backend="triton")
        results.append([plain, out.detach(), *torch.autograd.grad(out, list(leaves.values()), dout)])
    assert torch.equal(results[0][0], results[1][0])
    for name, on, off in zip(["out", *(f"d{k}" for k in args)], results[0][1:], results[1][1:]):
        scale = off.float().abs().max().item()
        torch.testing.assert_close(on.float(), off.float(), rtol=2 ** -7, atol=1e-4 * scale, msg=name)


@requires_cuda
@pytest.mark.parametrize("seqlen", [128, 100])
def test_kernel_forward_split_sums_cuda(seqlen):
    """The forward without gradients at a launch with enough programs for the split sums (the
    other CUDA tests launch fewer, which keep the shuffles) against the reference."""
    import mamba_pkg.ops.selective_scan as ss

    args = make_inputs(8, 1024, seqlen, 16, bc="var", dtype=torch.bfloat16, device="cuda")
    assert not ss._few_programs(args["u"].device, 8 * 1024 // 8)
    check_forward_no_grad(args)


@requires_cuda
def test_kernel_split_tail_cuda(monkeypatch):
    """SPLIT_TAIL on a forward launch of more than one wave (B=8 D=1536: 1536 one-warp programs on an
    H100's 1056 slots): the last blocks of channels split along L, against the reference."""
    import mamba_pkg.ops.selective_scan as ss

    monkeypatch.setattr(ss, "SPLIT_TAIL", True)
    monkeypatch.setattr(ss, "BC_WORDS_FWD", False)  # the words kernel runs B=8 D=1536 in one wave: no split
    if ss._tail_split(torch.device("cuda", torch.cuda.current_device()), 8 * 1536 // 8, 16, 1, None) is None:
        pytest.skip("this GPU runs B=8 D=1536 in one wave or in two full ones")
    args = make_inputs(8, 1536, 256, 16, bc="var", dtype=torch.bfloat16, device="cuda")
    check_forward_no_grad(args, torch.randn(8, 1536, 16, device="cuda"))


@requires_cuda
def test_kernel_varlen_cuda():
    lengths = [700, 1, 0, 2048, 333]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    args = make_inputs(1, 256, sum(lengths), 16, bc="group", groups=2, dtype=torch.bfloat16)
    check_kernel(args, h0=torch.randn(len(lengths), 256, 16), cu=cu, device="cuda")


@requires_cuda
def test_kernel_matches_mamba_ssm_cuda():
    mamba_ssm = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    args = make_inputs(2, 512, 3000, 16, bc="var", device="cuda", requires_grad=True)
    out, last = selective_scan_fn(**args, delta_softplus=True, return_last_state=True, backend="triton")
    grads = torch.autograd.grad(out.sum(), list(args.values()))
    theirs, their_last = mamba_ssm.selective_scan_fn(*args.values(), delta_softplus=True, return_last_state=True)
    their_grads = torch.autograd.grad(theirs.sum(), list(args.values()))
    torch.testing.assert_close(out, theirs, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last, their_last, rtol=1e-3, atol=1e-3)
    for name, a, b in zip(args, grads, their_grads):
        assert rel_err(a, b) < 1e-3, name


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------
# torch.library custom ops (the launchers) and torch.compile
# ---------------------------------------------------------------------------


def _opcheck_cases():
    args = make_inputs(2, 8, 12, 4, bc="var", dtype=torch.bfloat16, device=DEV)
    u, delta, A, z = args["u"], args["delta"], args["A"], args["z"]
    B4, C4 = args["B"].unsqueeze(1).contiguous(), args["C"].unsqueeze(1).contiguous()
    D, db = args["D"], args["delta_bias"]
    h0 = torch.randn(2, 8, 4, device=DEV)
    seq_idx = torch.tensor([0] * 5 + [1] * 7, dtype=torch.int32, device=DEV)
    dout = torch.randn(2, 8, 12, device=DEV).bfloat16()
    ops = torch.ops.mamba_pkg
    fixed = torch.randn(8, 4, device=DEV)
    _, _, ckpt = ops.selective_scan_fwd(u, delta, A, B4, C4, D, z, db, h0, None, 2, True, True)
    _, _, ckpt_min = ops.selective_scan_fwd(u[:1], delta[:1], A, fixed, fixed, None, None, None, None, None, 1,
                                            False, True)
    return [
        (ops.selective_scan_fwd, (u, delta, A, B4, C4, D, z, db, h0, None, 2, True, True)),
        (ops.selective_scan_fwd, (u[:1], delta[:1], A, fixed, fixed, None, None, None, None, seq_idx, 2, False,
                                  False)),
        (ops.selective_scan_bwd, (u, delta, A, B4, C4, D, z, db, h0, None, 2, True, ckpt, dout,
                                  torch.randn(2, 8, 4, device=DEV))),
        (ops.selective_scan_bwd, (u[:1], delta[:1], A, fixed, fixed, None, None, None, None, None, 1, False,
                                  ckpt_min, dout[:1], None)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_custom_ops_opcheck(case):
    """Schema, fake implementation and AOT dispatch of each registered launcher agree with the
    real op (torch.library.opcheck)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_compiles_to_one_graph_with_custom_ops():
    """torch.compile(fullgraph=True) of the scan (Triton backend) forward + backward equals eager;
    the launches appear as mamba_pkg custom ops in the forward and backward graphs."""
    from compile_check import compiled_matches_eager

    def step(u, delta, A, B, C, D, z, delta_bias, h0):
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                      return_last_state=True, initial_state=h0, backend="triton")
        return (out.float() ** 2).sum() + last.sum()

    args = make_inputs(2, 8, 12, 4, bc="var", device=DEV)
    leaves = list(args.values()) + [torch.randn(2, 8, 4, device=DEV)]
    forward, backward = compiled_matches_eager(step, leaves)
    assert "mamba_pkg.selective_scan_fwd" in forward
    assert "mamba_pkg.selective_scan_bwd" in backward
