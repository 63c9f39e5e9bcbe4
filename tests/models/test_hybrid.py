"""Hybrid Mamba + attention language models run, backpropagate and decode like their forward."""

import pytest
import torch

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.models.attention import MHA
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel
from mamba_pkg.models.mamba import Mamba
from mamba_pkg.models.mamba2 import Mamba2

SSM = {
    "Mamba1": {"layer": "Mamba1", "d_state": 8},
    "Mamba2": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8, "ngroups": 2},
}
ATTN = {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "d_conv": 4, "mlp_dim": 16, "causal": True}


def _hybrid(layer):
    torch.manual_seed(0)
    config = MambaConfig(
        d_model=32, n_layer=4, vocab_size=60, d_intermediate=40, ssm_cfg=dict(SSM[layer]),
        attn_layer_idx=[1, 3], attn_cfg=dict(ATTN), pad_vocab_size_multiple=8,
    )
    return MambaLMHeadModel(config)


@pytest.mark.parametrize("layer", list(SSM))
def test_hybrid_runs_and_backpropagates(layer):
    model = _hybrid(layer)
    kinds = [type(block.mixer) for block in model.backbone.layers]
    assert kinds == [Mamba if layer == "Mamba1" else Mamba2, MHA] * 2
    ids = torch.randint(0, 60, (2, 12))
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layer", list(SSM))
@torch.no_grad()
def test_hybrid_decode_equals_forward(layer):
    """Packed prefill of two prompts of different lengths, then per-row decode steps (lengths_per_sample)."""
    model = _hybrid(layer)
    prompts = [torch.randint(0, 60, (1, n)) for n in (5, 3)]
    new = torch.randint(0, 60, (2, 3))
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    prefill = model(torch.cat(prompts, dim=1), inference_params=params, cu_seqlens=cu).logits
    params.lengths_per_sample = torch.tensor([5, 3], dtype=torch.int32)
    steps = []
    for t in range(3):
        params.seqlen_offset = 1 + t
        steps.append(model(new[:, t : t + 1], inference_params=params).logits)
        params.lengths_per_sample += 1
    for b, prompt in enumerate(prompts):
        full = model(torch.cat([prompt, new[b : b + 1]], dim=1)).logits[0]
        n = prompt.shape[1]
        assert torch.allclose(prefill[0, cu[b] : cu[b + 1]], full[:n], atol=1e-5)
        assert torch.allclose(torch.cat([s[b] for s in steps]), full[n:], atol=1e-5)
