import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.ops.decode_linear import decode_linear, decode_linear_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_ref_is_fp32_linear():
    x, w, b = torch.randn(3, 7, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(5)
    out = decode_linear_ref(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5)
    torch.testing.assert_close(out, (x.double() @ w.double().t() + b.double()).to(torch.bfloat16))


@pytest.mark.parametrize("batch,n_in,n_out,bias", [(1, 700, 9, True), (3, 40, 6, False), (8, 600, 5, True)])
def test_triton_matches_ref(batch, n_in, n_out, bias):
    """Odd sizes: a ragged output block, ragged K, several unrolled K chunks (600 at batch 8: chunks
    of 256), a strided x (half of a wider tensor, as in_proj's halves)."""
    x = torch.randn(batch, 2 * n_in, device=DEVICE)[:, n_in:]
    w = torch.randn(n_out, n_in, device=DEVICE)
    b = torch.randn(n_out, device=DEVICE) if bias else None
    out = decode_linear(x, w, b, backend="triton")
    torch.testing.assert_close(out, decode_linear_ref(x, w, b), rtol=1e-4, atol=1e-4)


def test_bf16():
    x = torch.randn(2, 300, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(11, 300, device=DEVICE, dtype=torch.bfloat16)
    out = decode_linear(x, w, backend="triton")
    ref = decode_linear_ref(x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=ref.float().abs().max().item() * 2.0**-7)


def test_errors():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="1 <= B <= 8"):
        decode_linear(torch.randn(9, 4), w)
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


@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_full_size(batch):
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64
    out = decode_linear(x, w)
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=2e-2)
