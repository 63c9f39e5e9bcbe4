import pytest
import torch

import mamba_pkg.ops.greedy_argmax as ga
from mamba_pkg.ops.greedy_argmax import greedy_argmax, greedy_argmax_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_argmax(dtype, monkeypatch):
    """Rows of a padded (strided) logits tensor, V = 300 over blocks of 64 (a ragged last block);
    ties across blocks and inside one (the first index wins), a NaN (wins, the first one), a row of
    -inf (index 0) and a +inf."""
    monkeypatch.setattr(ga, "BLOCK_V", 64)
    torch.manual_seed(0)
    padded = torch.randn(6, 304, device=DEVICE).to(dtype)
    logits = padded[:, :300]
    logits[1, [7, 70, 200, 299]] = 50.0  # tie across blocks: 7
    logits[2, [130, 131]] = 50.0  # tie inside a block: 130
    logits[2, 3] = 49.0
    logits[3, [10, 250]] = float("nan")  # first NaN: 10
    logits[3, 5] = 100.0
    logits[4] = float("-inf")
    logits[5, 299] = float("inf")
    padded[:, 300:] = 1e4  # padding past V is never read
    out = greedy_argmax(logits, backend="triton")
    assert out.dtype == torch.long
    assert out.tolist() == greedy_argmax_ref(logits).tolist()
    assert out[1:].tolist() == [7, 130, 10, 0, 299]


def test_launch_plan_reused_and_dropped_by_a_setting(monkeypatch):
    """Calls with one logits layout share one launch plan (any dtype); a new setting drops it."""
    monkeypatch.setattr(ga, "NUM_WARPS", 4)
    assert not ga._PLANS
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        logits = torch.randn(3, 40, device=DEVICE).to(dtype)
        assert greedy_argmax(logits, backend="triton").tolist() == greedy_argmax_ref(logits).tolist()
    assert len(ga._PLANS) == 1 and next(iter(ga._PLANS.values())).kwargs["num_warps"] == 4
    monkeypatch.setattr(ga, "NUM_WARPS", 2)
    assert not ga._PLANS
    assert greedy_argmax(logits, backend="triton").tolist() == greedy_argmax_ref(logits).tolist()
    assert next(iter(ga._PLANS.values())).kwargs["num_warps"] == 2


def test_errors_and_opcheck():
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        greedy_argmax(torch.randn(3))
    with pytest.raises(ValueError, match=r"\(B, V\) with B >= 1"):
        greedy_argmax(torch.randn(0, 5))
    with pytest.raises(TypeError, match="logits must have dtype"):
        greedy_argmax(torch.ones(2, 5, dtype=torch.long))
    torch.library.opcheck(torch.ops.mamba_pkg.greedy_argmax, (torch.randn(3, 40, device=DEVICE),))


@requires_cuda
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_vocab_size(batch):
    """The vocabulary of the benchmarks (50277 of 50280 padded columns), bf16."""
    logits = torch.randn(batch, 50280, device="cuda", dtype=torch.bfloat16)[:, :50277]
    assert torch.equal(greedy_argmax(logits), logits.float().argmax(dim=-1))
