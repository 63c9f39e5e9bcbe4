"""SSD Triton kernels against the torch reference: forward, every gradient, varlen.

On CPU these run through the Triton interpreter (tiny shapes); on a GPU the
requires_cuda tests add realistic shapes, bf16, determinism and mamba_ssm.
"""

import importlib.util
from unittest import mock

import pytest
import torch

from conftest import assert_close_rule
from mamba_pkg.ops.ssd.combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
from mamba_pkg.ops.ssd.reference import mamba_chunk_scan_combined_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


def make(batch, L, H, P, G, N, *, z=True, init=True, d_has_hdim=False, device=DEVICE, n_init=None):
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    return dict(
        x=rnd(batch, L, H, P), dt=rnd(batch, L, H, scale=0.5, shift=-1.0), A=-(rnd(H).abs() + 0.2),
        B=rnd(batch, L, G, N), C=rnd(batch, L, G, N), D=rnd(H, P) if d_has_hdim else rnd(H),
        z=rnd(batch, L, H, P) if z else None, dt_bias=rnd(H, scale=0.3),
        initial_states=rnd(n_init or batch, H, P, N) if init else None,
    )


def run(inputs, dtype, backend, chunk, **kw):
    """Forward + backward with fixed output cotangents; returns [out, final, grads...]."""
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            continue
        # Parameters (A, D, dt_bias) and states stay fp32, activations take `dtype`.
        v = v.to(dtype) if k in ("x", "dt", "B", "C", "z") else v.clone()
        leaves[k] = v.requires_grad_(True)
    if backend == "ref":
        fn = mamba_chunk_scan_combined_ref
    elif backend == "ref_lowp":
        # The low-precision baseline: matrix products with operands rounded to `dtype`,
        # as in any tensor-core kernel.
        def fn(**a):
            return mamba_chunk_scan_combined_ref(**a, matmul_dtype=dtype)
    else:
        def fn(**a):
            return mamba_chunk_scan_combined(**a, backend=backend)
    res = fn(**leaves, chunk_size=chunk, dt_softplus=True, return_final_states=True, **kw)
    out, final = res[0], res[1]
    g = torch.Generator().manual_seed(7)
    loss = (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g).to(out.device)).sum()
    if len(res) == 3:
        loss = loss + (res[2] * torch.randn(res[2].shape, generator=g).to(out.device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(out=out, final=final, **{f"d{k}": gr for k, gr in zip(leaves, grads)})


def check_rule(got, want, baselines):
    """STYLE.md tolerance rule; the low-precision error is the larger of the baselines'."""
    for k in want:
        worst = max(baselines, key=lambda b: (b[k].double() - want[k].double()).abs().max().item())
        assert_close_rule(got[k], want[k], worst[k], atol=1e-3 * want[k].abs().max().item(), name=k)


def anchor_run(inputs, chunk):
    """mamba_ssm's mamba_chunk_scan_combined in bf16, same cotangents as run()."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as anchor

    leaves = {k: (v.bfloat16() if k in ("x", "dt", "B", "C", "z") else v.clone()).requires_grad_(True)
              for k, v in inputs.items() if v is not None}
    out, final = anchor(**leaves, chunk_size=chunk, dt_softplus=True, return_final_states=True)
    g = torch.Generator().manual_seed(7)
    loss = (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g).to(out.device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(out=out, final=final, **{f"d{k}": gr for k, gr in zip(leaves, grads)})


HAS_ANCHOR = torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None


@pytest.fixture(autouse=True)
def tune_nothing(monkeypatch):
    """Cold compiles of every autotuning config (ours and mamba_ssm's) exceed a device
    call; the tests check values, which do not depend on the config. Ours: the first
    config. mamba_ssm's: its first and last (its first may not fit in shared memory
    at N=128; the autotuner skips a config that does not fit). The interpreter (CPU)
    has one config anyway."""
    if not torch.cuda.is_available():
        return
    import sys

    from triton.runtime.autotuner import Autotuner

    from mamba_pkg.ops.ssd import chunk_scan, chunk_state

    modules = [chunk_scan, chunk_state]
    if HAS_ANCHOR:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401  (imports the stage modules)

        modules += [m for name, m in sys.modules.items() if name.startswith("mamba_ssm.ops.triton.ssd")]
    for module in modules:
        ours = module in (chunk_scan, chunk_state)
        for obj in vars(module).values():
            # The forward scan's configs are pruned by chunk length: its first may not fit a short chunk.
            if obj is chunk_scan._chunk_scan_fwd_kernel:
                continue
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                # The state walks' first config needs more shared memory than the H100 has in
                # fp32 (264 KB): keep a second one that fits, as for mamba_ssm's kernels.
                keep = 2 if obj.fn.__name__ in _WALK_KERNELS else 1
                monkeypatch.setattr(obj, "configs", obj.configs[:keep] if ours else [obj.configs[0], obj.configs[-1]])


_WALK_KERNELS = ("_chunk_state_walks_kernel",)


def lowp_baselines(inputs, chunk, **kw):
    """The reference in bf16 two ways: bf16 inputs with fp32 math, and with the
    matrix-product operands rounded to bf16 as on tensor cores; on a GPU with the
    anchor installed, mamba_ssm's bf16 kernels too (same rounding points as ours)."""
    out = [run(inputs, torch.bfloat16, "ref", chunk, **kw), run(inputs, torch.bfloat16, "ref_lowp", chunk, **kw)]
    if HAS_ANCHOR and not kw:
        out.append(anchor_run(inputs, chunk))
    return out


def compare_fp32(got, want, tol):
    for k in want:
        err = (got[k].double() - want[k].double()).abs().max().item()
        assert err <= tol * want[k].abs().max().item() + 1e-6, f"{k}: max error {err:.3e}"


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 37, 4, 8, 2, 8), dict()),  # L not a multiple of the chunk, 2 groups, gate, initial states
        ((1, 45, 4, 4, 1, 8), dict(seq_idx=True, d_has_hdim=True, dt_limit=(0.1, 2.0))),
        ((1, 1, 2, 4, 1, 4), dict(z=False, init=False)),
    ],
)
def test_triton_fp32_matches_reference(shape, kw):
    kw = dict(kw)
    make_kw = {k: kw.pop(k) for k in ("d_has_hdim", "z", "init") if k in kw}
    inputs = make(*shape, **make_kw)
    if kw.pop("seq_idx", False):
        L = shape[1]
        seq = torch.zeros(shape[0], L, dtype=torch.int32, device=DEVICE)
        seq[:, L // 3 :] = 1
        seq[:, 2 * L // 3 :] = 4
        kw["seq_idx"] = seq
    got = run(inputs, torch.float32, "triton", 16, **kw)
    want = run(inputs, torch.float32, "ref", 16, **kw)
    compare_fp32(got, want, 1e-4)


def test_triton_dt_gradients_without_softplus_or_bias():
    """The dt kernel's other branches: no softplus, no dt_bias, a dt_limit that clamps some steps;
    every gradient against the reference (fp32)."""
    g = torch.Generator().manual_seed(5)
    batch, L, H, P, G, N = 1, 37, 4, 4, 2, 8
    leaves = dict(x=torch.randn(batch, L, H, P, generator=g), dt=torch.rand(batch, L, H, generator=g) * 0.6,
                  A=-torch.rand(H, generator=g) - 0.2, B=torch.randn(batch, L, G, N, generator=g),
                  C=torch.randn(batch, L, G, N, generator=g), D=torch.randn(H, generator=g))
    res = {}
    for backend in ("triton", "torch"):
        inputs = {k: v.to(DEVICE).requires_grad_(True) for k, v in leaves.items()}
        out, final = mamba_chunk_scan_combined(**inputs, chunk_size=16, dt_limit=(0.05, 0.4), return_final_states=True,
                                               backend=backend)
        loss = (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum() + final.square().sum()
        res[backend] = [out, final, *torch.autograd.grad(loss, list(inputs.values()))]
    for name, got, want in zip(["out", "final", *leaves], res["triton"], res["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("packed", [True, False])
def test_triton_several_row_blocks_per_chunk(monkeypatch, packed):
    """16-row blocks in 64-long chunks: the block-pair logic of the backward (W tiles,
    transposed tiles, row/column pair sums from several programs) and the forward's tiles
    before the diagonal (decay split at the block boundary); with seq_idx and D (H, P), or
    without seq_idx, with D (H,) and one head with A > 0 (an increasing cumulative decay)."""
    from mamba_pkg.ops.ssd import chunk_scan

    monkeypatch.setattr(chunk_scan, "_pick_block_m", lambda Q: 16)
    inputs = make(1, 100, 4, 4, 2, 8, d_has_hdim=packed)
    kw = {}
    if packed:
        kw["seq_idx"] = torch.zeros(1, 100, dtype=torch.int32, device=DEVICE)
        kw["seq_idx"][:, 40:] = 1
    else:
        inputs["A"][1] = 0.05
    got = run(inputs, torch.float32, "triton", 64, **kw)
    want = run(inputs, torch.float32, "ref", 64, **kw)
    compare_fp32(got, want, 1e-4)


def test_triton_bf16_tolerance_rule():
    inputs = make(2, 40, 4, 8, 1, 8)
    got = run(inputs, torch.bfloat16, "triton", 16)
    want = run(inputs, torch.float32, "ref", 16)
    assert got["out"].dtype == torch.bfloat16 and got["final"].dtype == torch.float32
    check_rule(got, want, lowp_baselines(inputs, 16))


def test_triton_no_grad_forward_equals_the_autograd_forward():
    """Under no_grad the forward skips the autograd.Function (host time): same outputs."""
    inp = make(1, 20, 2, 4, 1, 8)
    args = {k: v for k, v in inp.items() if v is not None}
    kw = dict(chunk_size=16, dt_softplus=True, return_final_states=True, backend="triton")
    args_grad = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    out, final = mamba_chunk_scan_combined(**args_grad, **kw)
    assert out.grad_fn is not None
    with torch.no_grad():
        out_ng, final_ng = mamba_chunk_scan_combined(**args, **kw)
    assert out_ng.grad_fn is None
    assert torch.equal(out.detach(), out_ng) and torch.equal(final.detach(), final_ng)


def test_triton_saved_states_give_the_same_gradients(monkeypatch):
    """SAVE_STATES: the backward takes the forward's states instead of rerunning the forward walk."""
    from mamba_pkg.ops.ssd import combined

    inp = make(1, 40, 2, 4, 1, 8)
    monkeypatch.setattr(combined, "SAVE_STATES", False)
    want = run(inp, torch.float32, "triton", 16)
    monkeypatch.setattr(combined, "SAVE_STATES", True)
    got = run(inp, torch.float32, "triton", 16)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_head_and_n_splits_give_the_same_gradients():
    """The dB/dC kernel may split a group's heads over programs (fp32 partial dB/dC) or N
    (partial pair sums); same result."""
    from mamba_pkg.ops.ssd.chunk_scan import _chunk_scan_bwd
    from mamba_pkg.ops.ssd.chunk_state import _state_walks_bwd, launch_forward_walk

    inp = make(1, 20, 4, 4, 1, 32)
    x, dt, A, B, C, D = (inp[k] for k in ("x", "dt", "A", "B", "C", "D"))
    inf = float("inf")
    states, _, dt_c, cs_c = launch_forward_walk(x, dt, A, B, None, None, None, True, 0.0, inf, 16, True)
    dout = torch.randn_like(x)
    _, dstates, _ = _state_walks_bwd(x, B, None, None, 16, dout, None, C, dt_c, cs_c, None)
    results = [_chunk_scan_bwd(x, dout, None, None, dt, A, B, C, D, None, None, dt_c, cs_c, states, dstates,
                               True, 0.0, inf, 16, head_split=split, n_blocks=nb)
               for split, nb in ((1, 1), (4, 1), (1, 2), (2, 2))]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_walk_counts_every_state_entry_of_each_chunk():
    """The forward walk adds the state entries it wrote to ready[b, h, c] (the forward scan,
    launched beside it on a GPU, waits for P * N): several (P, N) blocks, masked edges."""
    from mamba_pkg.ops.ssd.chunk_state import launch_forward_walk

    inp = make(2, 40, 3, 20, 1, 18)
    x, dt, A, B = (inp[k] for k in ("x", "dt", "A", "B"))
    ready = torch.zeros(2, 3, 3, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second launch after the autotuner's runs (which count too)
        ready.zero_()
        launch_forward_walk(x, dt, A, B, None, None, None, True, 0.0, float("inf"), 16, True, ready)
    assert (ready == 20 * 18).all()


def test_triton_whole_tiles_without_masks():
    """L a multiple of the chunk and P, N multiples of the walks' blocks: the walks load their
    tiles without masks (chunk_state._even_tiles)."""
    from mamba_pkg.ops.ssd.chunk_state import _even_tiles

    shape, chunk = ((1, 512, 2, 64, 1, 128), 256) if DEVICE == "cuda" else ((1, 32, 2, 16, 1, 16), 16)
    assert _even_tiles(shape[1], shape[3], shape[5], chunk)
    inputs = make(*shape)
    compare_fp32(run(inputs, torch.float32, "triton", chunk), run(inputs, torch.float32, "ref", chunk),
                 2e-3 if DEVICE == "cuda" else 1e-4)


def test_scan_beside_the_walk_gives_the_same_bits(monkeypatch):
    """The forward scan launched beside the walk (OVERLAP_WALK: on an H100 a programmatic
    dependent launch, each program waiting for its chunk's count) equals the scan after it,
    bit for bit, forward and backward. On CUDA 25 chunks, so that the scan's programs reach
    chunks the walk has not finished; in the interpreter the counts and waits run in order."""
    from mamba_pkg.ops.ssd import chunk_scan

    shape, chunk = ((2, 256 * 24 + 100, 8, 64, 1, 128), 256) if DEVICE == "cuda" else ((1, 50, 2, 4, 1, 4), 16)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inputs = make(*shape)
    a = run(inputs, dtype, "triton", chunk)
    monkeypatch.setattr(chunk_scan, "OVERLAP_WALK", True)
    b = run(inputs, dtype, "triton", chunk)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_forward_launch_orders_give_the_same_bits(monkeypatch):
    """chunk_scan.FORWARD_PDL 2 (dt processing, walk, C B^T, scan; on sm_90+ each a programmatic dependent
    launch after the one before) gives the bits of order 1 (C B^T with the dt processing, walk, scan; chained)
    and 0 (the same, not chained), forward and backward, with z and an initial state (the interpreter: the
    launch orders without PDL). On CUDA bf16 at the benchmark's head shape, 3 chunks: the cached launches
    keep the PDL attribute (the compiled launcher's), and a CUDA graph of each chained forward replays the
    eager bits."""
    from mamba_pkg.ops import _launch
    from mamba_pkg.ops.ssd import chunk_scan, chunk_state

    cuda = DEVICE == "cuda"
    shape, chunk = ((2, 768, 8, 64, 1, 128), 256) if cuda else ((1, 48, 2, 4, 1, 8), 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    inputs = make(*shape)
    monkeypatch.setattr(chunk_scan, "FORWARD_PDL_EAGER_ROWS", 0)  # order 2 on every eager call too
    results = {}
    for order in (2, 2, 1, 0):  # order 2 twice: the second call's launches are cached ones
        monkeypatch.setattr(chunk_scan, "FORWARD_PDL", order)
        results[order] = run(inputs, dtype, "triton", chunk)
    for order in (0, 1):
        for k in results[2]:
            assert torch.equal(results[2][k], results[order][k]), (order, k)
    if not cuda:
        compare_fp32(results[2], run(inputs, torch.float32, "ref", chunk), 1e-4)
        return
    chained = [(key, entry) for kernel in (chunk_state._chunk_state_walks_kernel, chunk_scan._chunk_scan_fwd_kernel,
                                           chunk_scan._bmm_chunk_kernel)
               for key, entry in _launch._caches.get(kernel, {}).items()
               if isinstance(key, tuple) and ("launch_pdl", True) in key[3]]
    if chunk_scan._pdl_chain(inputs["x"]):  # sm_90+
        assert len(chained) >= 3 and all(entry[0].metadata.launch_pdl for _, entry in chained)
    args = {k: (v.to(dtype) if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items() if v is not None}
    monkeypatch.setattr(chunk_scan, "FORWARD_PDL_EAGER_ROWS", None)  # eager: order 1 after the first call
    for order in (2, 1):
        monkeypatch.setattr(chunk_scan, "FORWARD_PDL", order)

        def fwd():
            return mamba_chunk_scan_combined(**args, chunk_size=chunk, dt_softplus=True, return_final_states=True)
        with torch.no_grad():
            fwd()
            eager = fwd()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = fwd()
            graph.replay()
            torch.cuda.synchronize()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want), order


@pytest.mark.parametrize("case", ["groups", "seq_idx"])
def test_scan_bulk_copies_give_the_same_bits(monkeypatch, case):
    """chunk_scan.SCAN_TMA (the forward scan's tiles through tensor descriptors, whole tiles) gives
    the same bits as the plain loads, forward and backward, and matches the reference; several row
    blocks per chunk, two groups and z, or seq_idx without z. On CUDA (sm_90+: bulk copies) bf16 at
    the benchmark's head shape, one autotuning config, the second call a cached launch; in the
    interpreter fp32."""
    from mamba_pkg.ops.ssd import chunk_scan

    cuda = DEVICE == "cuda"
    if case == "groups":
        shape, chunk, kw = ((2, 768, 4, 64, 2, 128), 256, {}) if cuda else ((2, 64, 4, 16, 2, 32), 32, {})
    else:
        shape, chunk, kw = ((1, 512, 4, 64, 1, 128), 256, dict(z=False)) if cuda else ((1, 64, 2, 16, 1, 16), 32,
                                                                                        dict(z=False))
    extra = {}
    if case == "seq_idx":
        extra["seq_idx"] = torch.zeros(1, shape[1], dtype=torch.int32, device=DEVICE)
        extra["seq_idx"][:, shape[1] // 3:] = 1
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        monkeypatch.setattr(chunk_scan, "SCAN_TMA_EAGER_ROWS", 0)  # eager launches too (else only while capturing)
        kernel = chunk_scan._chunk_scan_fwd_kernel
        monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
        monkeypatch.setattr(kernel, "cache", {})
    used = []
    descriptors = chunk_scan._scan_descriptors
    monkeypatch.setattr(chunk_scan, "_scan_descriptors", lambda *a: used.append(descriptors(*a)) or used[-1])
    inputs = make(*shape, **kw)
    results = []
    for on in (False, True, True):
        monkeypatch.setattr(chunk_scan, "SCAN_TMA", on)
        results.append(run(inputs, dtype, "triton", chunk, **extra))
    assert len(used) == 2 and all(d is not None for d in used)
    for other in results[1:]:
        for k in results[0]:
            assert torch.equal(results[0][k], other[k]), k
    if not cuda:
        compare_fp32(results[1], run(inputs, torch.float32, "ref", chunk, **extra), 1e-4)


def test_scan_bulk_copies_only_for_whole_tiles():
    """Tensor descriptors only where every row block lies inside one chunk (L a multiple of the
    chunk), C's rows are views of one stride with (G, N) contiguous, N <= 256, and Triton has
    tensor descriptors; else the plain loads.
    The descriptors are launch-cache keys: equal by dtype, shape, strides and block, not by tensor."""
    from mamba_pkg.ops.ssd import chunk_scan

    x, C = torch.zeros(2, 48, 2, 16, device=DEVICE), torch.zeros(2, 48, 1, 16, device=DEVICE)
    cb = torch.zeros(2, 3, 1, 16, 16, device=DEVICE)
    if DEVICE == "cpu":  # in the interpreter; on CUDA only sm_90+ has bulk copies
        first = chunk_scan._scan_descriptors(x, None, C, cb, x, x, 16)
        second = chunk_scan._scan_descriptors(x.clone(), None, C.clone(), cb.clone(), x.clone(), x, 16)
        assert first is not None and first == second and hash(first) == hash(second)
        assert first[0].base is x
    assert chunk_scan._scan_descriptors(x[:, :40], None, C[:, :40], cb, x, x, 16) is None  # L = 40
    wide = torch.zeros(2, 48, 1, 32, device=DEVICE)[..., :16]  # N = 16 of rows of 32
    assert chunk_scan._scan_descriptors(x, None, wide, cb, x, x, 16) is None
    big_n = torch.zeros(2, 48, 1, 512, device=DEVICE)  # a copy's box holds at most 256 columns
    assert chunk_scan._scan_descriptors(x, None, big_n, cb, x, x, 16) is None
    if DEVICE == "cpu":  # a Triton without tensor descriptors (3.0-3.2): the plain loads
        chunk_scan._has_descriptors.cache_clear()
        with mock.patch.dict("sys.modules", {"triton.tools.tensor_descriptor": None}):
            assert chunk_scan._scan_descriptors(x, None, C, cb, x, x, 16) is None
        chunk_scan._has_descriptors.cache_clear()
        assert chunk_scan._scan_descriptors(x, None, C, cb, x, x, 16) is not None


def test_triton_varlen_matches_reference():
    lengths = [5, 0, 23, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    inputs = make(1, sum(lengths), 4, 8, 2, 8, n_init=len(lengths))
    kw = dict(cu_seqlens=cu, return_varlen_states=True)
    got = run(inputs, torch.float32, "triton", 16, **kw)
    want = run(inputs, torch.float32, "ref", 16, **kw)
    compare_fp32(got, want, 1e-4)


def test_split_conv1d_triton_path_recomputes_and_matches():
    H, P, G, N, W = 4, 4, 2, 8, 4
    d_inner, conv_dim = H * P, H * P + 2 * G * N
    g = torch.Generator().manual_seed(3)
    args = dict(
        zxbcdt=torch.randn(2, 21, 2 * d_inner + 2 * G * N + H, generator=g),
        conv1d_weight=torch.randn(conv_dim, W, generator=g) * 0.5, conv1d_bias=torch.randn(conv_dim, generator=g),
        dt_bias=torch.randn(H, generator=g) * 0.3 - 1, A=-torch.rand(H, generator=g) - 0.2,
        D=torch.randn(H, generator=g), rmsnorm_weight=torch.rand(d_inner, generator=g) + 0.5,
        outproj_weight=torch.randn(6, d_inner, generator=g) * 0.3,
    )
    args = {k: v.to(DEVICE).requires_grad_(True) for k, v in args.items()}
    res = {}
    for backend in ("torch", "triton"):
        out = mamba_split_conv1d_scan_combined(**args, chunk_size=16, headdim=P, ngroups=G, backend=backend)
        res[backend] = [out] + list(torch.autograd.grad(out.square().sum(), list(args.values())))
    for name, a, b in zip(["out"] + list(args), res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


# The GPU tests share one head shape (P=64, N=128, chunk 256: the benchmark's), so
# that the kernels compile and autotune once per dtype; cold compiles dominate.
GPU_SHAPE = (2, 700, 4, 64, 2, 128)  # L not a multiple of the chunk, 2 groups


@requires_cuda
def test_gpu_bf16_tolerance_rule():
    inputs = make(*GPU_SHAPE)
    got = run(inputs, torch.bfloat16, "triton", 256)
    want = run(inputs, torch.float32, "ref", 256)
    check_rule(got, want, lowp_baselines(inputs, 256))


@requires_cuda
def test_gpu_whole_tiles_and_one_stage_configs_give_the_same_bits(monkeypatch):
    """bf16 at whole tiles (unmasked loads) equals the masked kernels bit for bit, and the
    one-stage configs of the forward scan and the dx kernel equal the first configs."""
    from mamba_pkg.ops.ssd import chunk_scan, chunk_state

    inputs = make(2, 512, 4, 64, 1, 128)
    a = run(inputs, torch.bfloat16, "triton", 256)
    for kernel, configs in ((chunk_scan._chunk_scan_fwd_kernel, chunk_scan._fwd_configs()),
                            (chunk_scan._chunk_scan_bwd_dx_kernel, chunk_scan._tile_configs())):
        monkeypatch.setattr(kernel, "configs", [c for c in configs if c.num_stages == 1])
        monkeypatch.setattr(kernel, "cache", {})
    b = run(inputs, torch.bfloat16, "triton", 256)
    monkeypatch.setattr(chunk_scan, "_whole_tiles", lambda *args: False)
    monkeypatch.setattr(chunk_state, "_even_tiles", lambda *args: False)
    c = run(inputs, torch.bfloat16, "triton", 256)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k


@requires_cuda
@pytest.mark.parametrize("pinned", ["scan rows 64", "walks 8 warps"])
def test_gpu_configs_meet_the_tolerance_rule(monkeypatch, pinned):
    """Configs the autotuner may pick that the other GPU tests do not run (they keep the first
    configs): the forward scan's 64-row blocks, the walks' (64, 64) blocks with 8 warps; bf16
    tolerance rule, a chunk of several row blocks and a partial last chunk."""
    from mamba_pkg.ops.ssd import chunk_scan, chunk_state

    if pinned.startswith("scan"):
        kernel, rows = chunk_scan._chunk_scan_fwd_kernel, int(pinned.split()[-1])
        configs = [c for c in chunk_scan._fwd_configs() if c.kwargs["BLOCK_M"] == rows][:1]
    else:
        kernel = chunk_state._chunk_state_walks_kernel
        configs = [c for c in chunk_state._walk_configs() if c.num_warps == 8 and c.kwargs["BLOCK_N"] == 64]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    inputs = make(*GPU_SHAPE)
    got = run(inputs, torch.bfloat16, "triton", 256)
    want = run(inputs, torch.float32, "ref", 256)
    check_rule(got, want, lowp_baselines(inputs, 256))


@requires_cuda
def test_gpu_fp32_and_seq_idx():
    inputs = make(2, 300, 4, 64, 2, 128)
    seq = torch.zeros(2, 300, dtype=torch.int32, device=DEVICE)
    seq[:, 100:] = 1
    seq[1, 257:] = 2
    got = run(inputs, torch.float32, "triton", 256, seq_idx=seq)
    want = run(inputs, torch.float32, "ref", 256, seq_idx=seq)
    compare_fp32(got, want, 2e-3)


@requires_cuda
def test_gpu_more_programs_than_a_grid_axis_allows():
    """batch * chunks * heads = 70400 programs per row block: more than the 65535 that grid
    axes 1 and 2 allow (the kernels use 1-D grids)."""
    inputs = make(1, 16 * 1100, 64, 4, 1, 8, z=False, init=False)
    got = run(inputs, torch.float32, "triton", 16)
    want = run(inputs, torch.float32, "ref", 16)
    compare_fp32(got, want, 2e-3)


@requires_cuda
def test_gpu_backward_is_deterministic(monkeypatch):
    """Same bits twice; the cached direct launches (ops/_launch.py: every launch of the
    second run) give the same bits as Triton's own launch path; and the backward's launches on
    one stream or two (chunk_scan.BACKWARD_STREAMS 0, 1, 2) the same bits."""
    from mamba_pkg.ops import _launch
    from mamba_pkg.ops.ssd import chunk_scan

    inputs = make(*GPU_SHAPE)
    a = run(inputs, torch.bfloat16, "triton", 256)
    b = run(inputs, torch.bfloat16, "triton", 256)
    monkeypatch.setattr(_launch, "enabled", False)
    c = run(inputs, torch.bfloat16, "triton", 256)
    monkeypatch.setattr(_launch, "enabled", True)
    others = []
    for streams in (0, 1, 2):
        monkeypatch.setattr(chunk_scan, "BACKWARD_STREAMS", streams)
        others.append(run(inputs, torch.bfloat16, "triton", 256))
    for k in a:
        for other in [b, c] + others:
            assert torch.equal(a[k], other[k]), k


@requires_cuda
@pytest.mark.skipif(not HAS_ANCHOR, reason="mamba_ssm anchor not installed")
def test_gpu_as_accurate_as_mamba_ssm():
    """Forward and every gradient: our error against the fp32 reference is within 2x
    of mamba_ssm's (or of the bf16-input reference's, whichever is larger)."""
    inputs = make(*GPU_SHAPE)
    got = run(inputs, torch.bfloat16, "triton", 256)
    want = run(inputs, torch.float32, "ref", 256)
    check_rule(got, want, [anchor_run(inputs, 256), run(inputs, torch.bfloat16, "ref", 256)])


# --- torch.library registration: each launcher is an opaque custom op for torch.compile ---


def _opcheck_cases():
    from mamba_pkg.ops.ssd import chunk_scan  # noqa: F401  (registers the chunk-scan ops)
    from mamba_pkg.ops.ssd.chunk_state import _state_walks_bwd, launch_forward_walk

    inp = make(1, 20, 2, 4, 1, 4, d_has_hdim=True)
    x, dt, A, B, C, D, z, dt_bias, init = (inp[k] for k in NAMES)
    cu = torch.tensor([0, 12, 20], dtype=torch.int32, device=DEVICE)
    seq = torch.zeros(1, 20, dtype=torch.int32, device=DEVICE)
    seq[:, 12:] = 1
    inf = float("inf")
    states, final, dt_c, cs_c = launch_forward_walk(x, dt, A, B, dt_bias, seq, init, True, 0.0, inf, 16, True)
    dout = torch.randn_like(x)
    _, dstates, _ = _state_walks_bwd(x, B, seq, init, 16, dout, z, C, dt_c, cs_c, final)
    ypre = torch.randn(x.shape, device=DEVICE)
    ops = torch.ops.mamba_pkg
    return [
        (ops.ssd_state_walks_bwd, (x, B, seq, init, 16, dout, z, C, dt_c, cs_c, final)),
        (ops.ssd_state_walks_bwd, (x, B, None, None, 16, dout, None, C, dt_c, cs_c, None, False)),
        (ops.ssd_chunk_scan_fwd, (x, z, dt, A, B, C, D, dt_bias, seq, init, True, 0.1, 2.0, 16)),
        (ops.ssd_chunk_scan_fwd, (x, None, dt, A, B, C, None, None, None, None, False, 0.0, inf, 16, True)),
        # The reverse walk inside the op (dstates None; the rerun beside it, states None, runs in
        # test_triton_saved_states_give_the_same_gradients).
        (ops.ssd_chunk_scan_bwd, (x, dout, z, ypre, dt, A, B, C, D, dt_bias, seq, dt_c, cs_c, states, None,
                                  True, 0.1, 2.0, 16, 0, 0, init, final)),
        (ops.ssd_chunk_scan_bwd, (x, dout, None, None, dt, A, B, C, None, None, None, dt_c, cs_c, states, dstates,
                                  False, 0.0, inf, 16, 2)),
        (ops.ssd_varlen_terms, (x, dt, A, B, C, dt_bias, torch.cat([init, init]), cu, True, 0.1, 2.0, True)),
        (ops.ssd_varlen_terms, (x, dt, A, B, C, None, None, cu, False, 0.0, inf, True)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_ssd_custom_ops_opcheck(case):
    """Schema, fake (meta) implementation and AOT dispatch of each registered launcher agree with
    the real op (torch.library.opcheck)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_ssd_compiles_to_one_graph_with_custom_ops():
    """torch.compile(fullgraph=True) of the scan (Triton backend) forward and backward equals
    eager; the launches appear as mamba_pkg custom ops in the forward and backward graphs."""
    from compile_check import compiled_matches_eager

    inp = make(1, 20, 2, 4, 1, 4)
    leaves = {k: v for k, v in inp.items() if v is not None}

    def step(x, dt, A, B, C, D, z, dt_bias, initial_states):
        out, final = mamba_chunk_scan_combined(x, dt, A, B, C, 16, D=D, z=z, dt_bias=dt_bias,
                                               initial_states=initial_states, dt_softplus=True,
                                               dt_limit=(0.05, 5.0), return_final_states=True, backend="triton")
        return (out * out).sum() + (final * final).sum()

    forward, backward = compiled_matches_eager(step, leaves)
    assert "mamba_pkg.ssd_chunk_scan_fwd" in forward
    assert "mamba_pkg.ssd_chunk_scan_bwd" in backward  # the walks run inside it


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_ssd_packed_compiles_to_one_graph():
    """Packed sequences with per-sequence initial and final states: the host read of cu_seqlens
    sits inside the ssd_varlen_terms custom op, so the scan still traces as one graph (fullgraph)
    and equals eager, forward and backward."""
    from compile_check import compiled_matches_eager

    lengths = [5, 0, 11]
    cu = torch.tensor([0, 5, 5, 16], dtype=torch.int32, device=DEVICE)
    inp = make(1, sum(lengths), 2, 4, 1, 4, n_init=len(lengths))
    leaves = {k: v for k, v in inp.items() if v is not None}

    def step(x, dt, A, B, C, D, z, dt_bias, initial_states):
        out, varlen = mamba_chunk_scan_combined(x, dt, A, B, C, 16, D=D, z=z, dt_bias=dt_bias,
                                                initial_states=initial_states, cu_seqlens=cu, dt_softplus=True,
                                                return_varlen_states=True, backend="triton")
        return (out * out).sum() + (varlen * varlen).sum()

    forward, backward = compiled_matches_eager(step, leaves)
    assert "mamba_pkg.ssd_varlen_terms" in forward and "mamba_pkg.ssd_varlen_terms_bwd" in backward


def test_scan_bulk_copies_policy(monkeypatch):
    """Where the forward scan asks for bulk copies on a GPU (the descriptors cost host time at every
    launch): while a CUDA graph is captured; eagerly on the first launch of a signature (so that a
    capture after it finds the variant compiled and tuned) and from SCAN_TMA_EAGER_ROWS rows; never
    with SCAN_TMA off."""
    from types import SimpleNamespace

    from mamba_pkg.ops import _launch
    from mamba_pkg.ops.ssd import chunk_scan

    capturing = [False]
    monkeypatch.setattr(chunk_scan, "triton_interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(_launch, "_VARIANTS_SEEN", set())
    asked = []
    key = lambda: asked.append(1) or "key"  # noqa: E731
    small = SimpleNamespace(is_cuda=True, shape=(4, 2048, 32, 64))
    big = SimpleNamespace(is_cuda=True, shape=(4, 32768, 32, 64))
    assert chunk_scan._scan_tma(small, key)  # first launch of the signature
    assert not chunk_scan._scan_tma(small, key)
    assert chunk_scan._scan_tma(small, lambda: "other key")
    assert chunk_scan._scan_tma(big, key)
    capturing[0] = True
    assert chunk_scan._scan_tma(small, key)
    assert len(asked) == 2  # the signature only for the small eager launches
    monkeypatch.setattr(chunk_scan, "SCAN_TMA_EAGER_ROWS", None)
    capturing[0] = False
    assert not chunk_scan._scan_tma(big, key)
    monkeypatch.setattr(chunk_scan, "SCAN_TMA", False)
    capturing[0] = True
    assert not chunk_scan._scan_tma(small, lambda: "third key")


def test_forward_launch_order_policy(monkeypatch):
    """Where the forward takes launch order 2 (one launch more than order 1: host time) on an sm_90+
    GPU: as the bulk copies (_graph_variant with FORWARD_PDL_EAGER_ROWS), else order 1; with FORWARD_PDL
    1 always 1; without a PDL-capable GPU 0; in the interpreter FORWARD_PDL's order without PDL."""
    from types import SimpleNamespace

    from mamba_pkg.ops import _launch
    from mamba_pkg.ops.ssd import chunk_scan

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(_launch, "_VARIANTS_SEEN", set())
    small = SimpleNamespace(is_cuda=True, shape=(4, 2048, 32, 64))
    big = SimpleNamespace(is_cuda=True, shape=(4, 32768, 32, 64))
    if chunk_scan.triton_interpret():
        assert chunk_scan._forward_pdl(small, lambda: "key") == (2, False)
    monkeypatch.setattr(chunk_scan, "triton_interpret", lambda: False)
    monkeypatch.setattr(chunk_scan, "_pdl_chain", lambda x: True)
    assert chunk_scan._forward_pdl(small, lambda: "key") == (2, True)  # the signature's first call
    assert chunk_scan._forward_pdl(small, lambda: "key") == (1, True)
    assert chunk_scan._forward_pdl(big, lambda: "key") == (2, True)
    capturing[0] = True
    assert chunk_scan._forward_pdl(small, lambda: "key") == (2, True)
    monkeypatch.setattr(chunk_scan, "FORWARD_PDL", 1)
    assert chunk_scan._forward_pdl(big, lambda: "other key") == (1, True)
    monkeypatch.setattr(chunk_scan, "_pdl_chain", lambda x: False)
    monkeypatch.setattr(chunk_scan, "FORWARD_PDL", 2)
    assert chunk_scan._forward_pdl(big, lambda: "key") == (0, False)


def test_launch_signature_and_variant_needed(monkeypatch):
    """_launch.signature changes with a tensor's dtype, device or 16-byte alignment and any other
    argument; variant_needed says True once per (tag, signature)."""
    from mamba_pkg.ops import _launch

    monkeypatch.setattr(_launch, "_VARIANTS_SEEN", set())
    x = torch.zeros(64)
    base = _launch.signature(x, 3, FLAG=True)
    assert base == _launch.signature(torch.ones(64), 3, FLAG=True)
    assert base != _launch.signature(x[1:], 3, FLAG=True)  # 4 bytes off: not 16-byte aligned
    assert base != _launch.signature(x.double(), 3, FLAG=True)
    assert base != _launch.signature(x, 4, FLAG=True) != _launch.signature(x, 3, FLAG=False)
    assert _launch.variant_needed("k", base) and not _launch.variant_needed("k", base)
    assert _launch.variant_needed("other", base)


@requires_cuda
def test_gpu_scan_bulk_copies_when_captured(monkeypatch):
    """A small forward (below SCAN_TMA_EAGER_ROWS) takes the bulk copies on the first eager call of its
    signature (tuning and compiling them), plain loads on later eager calls, and the bulk copies again
    inside a CUDA graph, whose replay gives the eager call's bits; the same for a second length."""
    from mamba_pkg.ops.ssd import chunk_scan

    from mamba_pkg.ops import _launch

    monkeypatch.setattr(_launch, "_VARIANTS_SEEN", set())
    used = []
    descriptors = chunk_scan._scan_descriptors
    monkeypatch.setattr(chunk_scan, "_scan_descriptors", lambda *a: used.append(descriptors(*a)) or used[-1])
    inputs = make(2, 512, 4, 64, 1, 128, z=False, init=False)
    args = {k: (v.to(torch.bfloat16) if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()
            if v is not None}

    def fwd():
        return mamba_chunk_scan_combined(**args, chunk_size=256, dt_softplus=True)
    first = fwd()
    assert len(used) == 1 and used[0] is not None
    eager = fwd()
    assert len(used) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd()
    assert len(used) == 2 and used[1] is not None
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(first, eager)
    # Another length (3 chunks: another specialisation): its first eager call compiles the copies'
    # variant again, so that capturing it after eager calls needs no compile (the driver forbids
    # module loads during a capture).
    other = make(2, 768, 4, 64, 1, 128, z=False, init=False)
    args = {k: (v.to(torch.bfloat16) if k in ("x", "dt", "B", "C") else v) for k, v in other.items() if v is not None}
    fwd(), fwd()
    assert len(used) == 3 and used[2] is not None
    eager = fwd()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd()
    assert len(used) == 4
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
