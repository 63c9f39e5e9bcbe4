"""MambaConfig: defaults, JSON round trip, mamba_ssm config.json files, errors."""

import json

import pytest

from mamba_pkg.models.config import MambaConfig


def test_defaults_are_mamba_ssm_defaults():
    cfg = MambaConfig()
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_intermediate) == (2560, 64, 50277, 0)
    assert cfg.rms_norm and cfg.residual_in_fp32 and cfg.fused_add_norm and cfg.tie_embeddings
    assert cfg.pad_vocab_size_multiple == 8 and cfg.ssm_cfg == {} and cfg.attn_layer_idx == []


def test_json_round_trip(tmp_path):
    cfg = MambaConfig(
        d_model=64,
        n_layer=4,
        vocab_size=101,
        d_intermediate=96,
        ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16},
        attn_layer_idx=[1, 3],
        attn_cfg={"num_heads": 4, "rotary_emb_dim": 8},
        tie_embeddings=False,
    )
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    assert MambaConfig.from_json_file(path) == cfg
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    # to_dict is a copy: editing it does not change the config
    cfg.to_dict()["ssm_cfg"]["d_state"] = 1
    assert cfg.ssm_cfg["d_state"] == 16


def test_loads_mamba_ssm_config_json(tmp_path):
    """The config.json of state-spaces/mamba-130m (older format, fewer keys) loads unchanged."""
    data = {
        "d_model": 768,
        "n_layer": 24,
        "vocab_size": 50277,
        "ssm_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    cfg = MambaConfig.from_json_file(path)
    assert cfg.d_model == 768 and cfg.n_layer == 24 and cfg.tie_embeddings
    assert cfg.padded_vocab_size == 50280


def test_padded_vocab_size():
    assert MambaConfig(vocab_size=50277, pad_vocab_size_multiple=16).padded_vocab_size == 50288
    assert MambaConfig(vocab_size=64, pad_vocab_size_multiple=8).padded_vocab_size == 64


def test_errors():
    with pytest.raises(ValueError, match=r"unknown MambaConfig key\(s\) \['d_modle'\]"):
        MambaConfig.from_dict({"d_modle": 16})
    with pytest.raises(ValueError, match="ssm_cfg\\['layer'\\]"):
        MambaConfig(ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(ValueError, match="attn_layer_idx"):
        MambaConfig(n_layer=2, attn_layer_idx=[2], attn_cfg={"num_heads": 2})
    with pytest.raises(ValueError, match="num_heads"):
        MambaConfig(n_layer=2, attn_layer_idx=[1])
    with pytest.raises(ValueError, match="d_model"):
        MambaConfig(d_model=0)
    with pytest.raises(TypeError, match="expects a dict"):
        MambaConfig.from_dict([1, 2])
