"""Parity with a peer: random-weight transformers MambaForCausalLM / Mamba2ForCausalLM, converted
into our MambaLMHeadModel by the state-dict key map, give the same logits (CPU, fp32, 1e-4 relative).
"""

import pytest
import torch
from hub_fixtures import needs_transformers_cpu_path

from mamba_pkg.models import checkpoint as ckpt
from mamba_pkg.models.lm import MambaLMHeadModel

transformers = pytest.importorskip("transformers")

TOL = 1e-4

pytestmark = needs_transformers_cpu_path


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_weights(model, seed):
    """Perturb every parameter so that a wrongly mapped or unused tensor changes the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


MAMBA1_CASES = {
    "default": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8),
    "bias, no conv bias, dt_rank 3, fp32 residual off": dict(
        hidden_size=24, num_hidden_layers=3, vocab_size=50, state_size=4, use_bias=True, use_conv_bias=False,
        time_step_rank=3, residual_in_fp32=False, conv_kernel=3, expand=3),
    "untied": dict(hidden_size=16, num_hidden_layers=1, vocab_size=40, state_size=16, tie_word_embeddings=False),
}
MAMBA2_CASES = {
    "1 group": dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8, num_heads=8, head_dim=8,
                    n_groups=1, chunk_size=16),
    "2 groups, tied, bias": dict(hidden_size=32, num_hidden_layers=2, vocab_size=48, state_size=16, num_heads=4,
                                 head_dim=16, n_groups=2, chunk_size=8, tie_word_embeddings=True, use_bias=True,
                                 conv_kernel=3),
    "dt limit": dict(hidden_size=16, num_hidden_layers=1, vocab_size=32, state_size=8, num_heads=2, head_dim=16,
                     n_groups=1, chunk_size=32, time_step_limit=(0.0, 0.05), expand=2),
}


def _hf(config_cls, model_cls, kwargs, seed):
    torch.manual_seed(seed)
    return random_weights(model_cls(config_cls(**kwargs)), seed)


def _ids(vocab, batch, length, seed):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _check(hf_model, vocab):
    ours = ckpt.from_transformers(hf_model)
    for length in (1, 7, 63):
        ids = _ids(vocab, 2, length, length)
        with torch.no_grad():
            ref = hf_model(ids).logits
            out = ours(ids).logits
        assert out.shape == ref.shape
        assert rel_err(out, ref) < TOL, f"L={length}: rel err {rel_err(out, ref):.2e}"
    return ours


@pytest.mark.parametrize("case", list(MAMBA1_CASES))
def test_mamba1_parity(case):
    kwargs = MAMBA1_CASES[case]
    hf_model = _hf(transformers.MambaConfig, transformers.MambaForCausalLM, kwargs, seed=1)
    _check(hf_model, kwargs["vocab_size"])


@pytest.mark.parametrize("case", list(MAMBA2_CASES))
def test_mamba2_parity(case):
    kwargs = MAMBA2_CASES[case]
    hf_model = _hf(transformers.Mamba2Config, transformers.Mamba2ForCausalLM, kwargs, seed=2)
    _check(hf_model, kwargs["vocab_size"])


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_parity_by_plain_load_state_dict(family):
    """The key map alone: build our model from the converted config, load_state_dict(strict=True)."""
    if family == "mamba":
        kwargs = MAMBA1_CASES["default"]
        hf_model = _hf(transformers.MambaConfig, transformers.MambaForCausalLM, kwargs, seed=3)
    else:
        kwargs = MAMBA2_CASES["1 group"]
        hf_model = _hf(transformers.Mamba2Config, transformers.Mamba2ForCausalLM, kwargs, seed=3)
    ours = MambaLMHeadModel(ckpt.config_from_transformers(hf_model.config.to_dict())).eval()
    ours.load_state_dict(ckpt.state_dict_from_transformers(hf_model.state_dict()), strict=True)
    ids = _ids(kwargs["vocab_size"], 3, 20, 0)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf_model(ids).logits) < TOL


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_ours_to_transformers_parity(family):
    """The other direction: our random model, converted to transformers, gives our logits."""
    from mamba_pkg.models.config import MambaConfig

    ssm_cfg = {"layer": "Mamba1", "d_state": 8} if family == "mamba" else {
        "layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16}
    torch.manual_seed(4)
    ours = random_weights(MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg=ssm_cfg)), 4)
    theirs = ckpt.to_transformers(ours)
    assert theirs.config.vocab_size == ours.config.padded_vocab_size == 64
    ids = _ids(61, 2, 33, 1)
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, ours(ids).logits) < TOL
    back = ckpt.from_transformers(theirs)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours(ids).logits)
