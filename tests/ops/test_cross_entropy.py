"""ops/cross_entropy.py: per-row loss and in-place gradient, against the fp32 reference."""

import pytest
import torch
from conftest import assert_close_rule

from mamba_pkg.ops.cross_entropy import IGNORE_INDEX, cross_entropy_grad_, cross_entropy_grad_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The small cases run through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 there)
# and natively on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows, vocab, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    targets[::3] = IGNORE_INDEX
    scale = torch.tensor(1.0 / max(1, int((targets != IGNORE_INDEX).sum())), device=device)
    return logits, targets, scale


def _check(rows, vocab, dtype, device="cpu", backend="triton"):
    logits, targets, scale = _case(rows, vocab, dtype, device)
    want_loss, want_grad = cross_entropy_grad_ref(logits.float(), targets, scale)  # fp32 spec
    _, low_grad = cross_entropy_grad_ref(logits, targets, scale)  # torch, rounded like ours
    got = logits.clone()
    loss = cross_entropy_grad_(got, targets, scale, backend=backend)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    assert (loss[::3] == 0).all() and (got[::3] == 0).all()
    atol = 1e-6
    if device == "cpu" and dtype != torch.float32:
        # Triton's interpreter truncates fp32 -> bf16 at the store (the GPU rounds to nearest):
        # up to one ulp of the largest gradient.
        atol += want_grad.abs().max().item() * 2.0**-8
    assert_close_rule(got, want_grad, low_grad, atol=atol, name="dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (5, 300), (3, 5000)])  # 5000: two row pieces
def test_matches_reference_small(rows, vocab, dtype):
    _check(rows, vocab, dtype, device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_target_gives_nan_not_a_bad_read(backend):
    logits, targets, scale = _case(4, 50, torch.float32, DEVICE)
    targets[1] = 50
    targets[2] = -3
    loss = cross_entropy_grad_(logits, targets, scale, backend=backend)
    assert torch.isnan(loss[1:3]).all() and torch.isnan(logits[1:3]).all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(logits[[0, 3]]).all()


def test_bad_input_is_named():
    logits, targets, scale = _case(4, 50, torch.float32)
    with pytest.raises(TypeError, match="targets"):
        cross_entropy_grad_(logits, targets.int(), scale)
    with pytest.raises(ValueError, match="targets"):
        cross_entropy_grad_(logits, targets[:3], scale)
    with pytest.raises(ValueError, match="scale"):
        cross_entropy_grad_(logits, targets, scale[None])
    with pytest.raises(ValueError, match="unit stride"):
        cross_entropy_grad_(logits.t().contiguous().t(), targets, scale)
    with pytest.raises(ValueError, match="require grad"):
        cross_entropy_grad_(logits.requires_grad_(), targets, scale)


def test_opcheck():
    logits, targets, scale = _case(3, 20, torch.float32, DEVICE)
    torch.library.opcheck(torch.ops.mamba_pkg.cross_entropy_grad_, (logits, targets, scale, IGNORE_INDEX))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(2049, 50280), (7, 32000), (3, 4097)])
def test_matches_reference_cuda(rows, vocab, dtype):
    _check(rows, vocab, dtype, device="cuda")
