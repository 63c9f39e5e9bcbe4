"""Checkpoint loading, saving and conversion (mamba_pkg/models/checkpoint.py), offline, on CPU.

Hub tests build a local Hub cache (tests/models/hub_fixtures.py) with scaled-down
checkpoints whose config.json mirrors the real repos, and load them with
HF_HUB_OFFLINE=1 through huggingface_hub's own resolution code.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from hub_fixtures import (MAMBA2_130M, MAMBA2ATTN_2_7B, MAMBA_130M, MAMBA_130M_HF, add_snapshot, dir_files,
                          json_bytes, needs_transformers_cpu_path, offline_hub)
from mamba_pkg.models import checkpoint as ckpt
from mamba_pkg.models.checkpoint import CheckpointError, CheckpointNotFoundError
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel

transformers = pytest.importorskip("transformers")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

INPUT_IDS = torch.tensor([[3, 17, 1, 88, 42, 5, 60], [0, 9, 90, 2, 33, 71, 14]])


def make_model(config: dict, seed: int = 0) -> MambaLMHeadModel:
    """Our model with every parameter perturbed, so a tensor that fails to load changes the logits."""
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig.from_dict(config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def logits(model, ids=INPUT_IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def save_mamba_ssm(model: MambaLMHeadModel, directory, config: dict) -> dict:
    """The mamba_ssm repo format: config.json + pytorch_model.bin (tied weights saved under both names)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    return dir_files(str(directory))


def hf_mamba(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with offline_hub(monkeypatch, str(tmp_path / "hf_home")) as cache_dir:
        yield cache_dir


# ---------------------------------------------------------------------------------------------
# Key maps and config conversion
# ---------------------------------------------------------------------------------------------


def test_key_maps_both_ways():
    pairs = [("backbone.embedding.weight", "backbone.embeddings.weight"),
             ("backbone.layers.3.mixer.A_log", "backbone.layers.3.mixer.A_log"),
             ("backbone.layers.0.mixer.norm.weight", "backbone.layers.0.mixer.norm.weight"),
             ("backbone.norm_f.weight", "backbone.norm_f.weight"), ("lm_head.weight", "lm_head.weight")]
    for ours, theirs in pairs:
        assert ckpt.key_to_transformers(ours) == theirs
        assert ckpt.key_from_transformers(theirs) == ours
        assert ckpt.key_from_transformers(ours) == ours
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="backbone.embedding.weight"):
        ckpt.state_dict_from_transformers({"backbone.embedding.weight": t, "backbone.embeddings.weight": t})


def test_model_keys_match_transformers():
    """Every key of our pure-Mamba models maps onto transformers' (names and shapes)."""
    for layer, hf_cls in (("Mamba1", transformers.MambaForCausalLM), ("Mamba2", transformers.Mamba2ForCausalLM)):
        config = MambaConfig(d_model=64, n_layer=2, vocab_size=50, pad_vocab_size_multiple=8,
                             ssm_cfg={"layer": layer, "d_state": 16} | ({"headdim": 16} if layer == "Mamba2" else {}))
        ours = MambaLMHeadModel(config).state_dict()
        hf_kwargs = ckpt.config_to_transformers(config)
        config_cls = transformers.MambaConfig if layer == "Mamba1" else transformers.Mamba2Config
        hf_kwargs.pop("model_type")
        theirs = hf_cls(config_cls(**hf_kwargs)).state_dict()
        mapped = {ckpt.key_to_transformers(k): tuple(v.shape) for k, v in ours.items()}
        assert mapped == {k: tuple(v.shape) for k, v in theirs.items()}


def test_config_from_transformers():
    c = ckpt.config_from_transformers(MAMBA_130M_HF)
    assert (c.d_model, c.n_layer, c.vocab_size, c.padded_vocab_size) == (32, 2, 96, 96)
    assert c.ssm_cfg["layer"] == "Mamba1" and c.ssm_cfg["d_state"] == 16 and c.ssm_cfg["dt_rank"] == 2
    assert c.tie_embeddings and c.rms_norm and c.residual_in_fp32
    c2 = ckpt.config_from_transformers({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 3,
                                        "vocab_size": 100, "num_heads": 8, "head_dim": 16, "n_groups": 2,
                                        "state_size": 32, "chunk_size": 64, "time_step_limit": [0.0, 2.0]})
    s = c2.ssm_cfg
    assert (s["layer"], s["headdim"], s["ngroups"], s["d_state"], s["chunk_size"]) == ("Mamba2", 16, 2, 32, 64)
    assert s["dt_limit"] == (0.0, 2.0) and not c2.tie_embeddings


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"intermediate_size": 100}, "intermediate_size"),
])
def test_config_from_transformers_rejects(change, message):
    with pytest.raises(CheckpointError, match=message):
        ckpt.config_from_transformers({**MAMBA_130M_HF, **change})
    with pytest.raises(CheckpointError, match="num_heads"):
        ckpt.config_from_transformers({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1,
                                       "vocab_size": 10, "num_heads": 3, "head_dim": 16})


def test_config_to_transformers_and_back():
    for data in (MAMBA_130M, MAMBA2_130M):
        config = MambaConfig.from_dict(data)
        hf = ckpt.config_to_transformers(config)
        back = ckpt.config_from_transformers(hf)
        assert (back.d_model, back.n_layer, back.padded_vocab_size) == (config.d_model, config.n_layer,
                                                                        config.padded_vocab_size)
        ours, theirs = ckpt._ssm_settings(config), ckpt._ssm_settings(back)
        structural = ["layer", "d_state", "d_conv", "expand", "bias", "conv_bias"]
        structural += ["headdim", "ngroups", "chunk_size", "dt_limit"] if ours["layer"] == "Mamba2" else []
        assert {k: theirs[k] for k in structural} == {k: ours[k] for k in structural}
        if ours["layer"] == "Mamba1":
            assert hf["time_step_rank"] == theirs["dt_rank"] == -(-config.d_model // 16)
    with pytest.raises(CheckpointError, match="attention layers"):
        ckpt.config_to_transformers(MambaConfig.from_dict(MAMBA2ATTN_2_7B))
    with pytest.raises(CheckpointError, match="MLP"):
        ckpt.config_to_transformers(MambaConfig(d_model=32, n_layer=1, d_intermediate=64))
    with pytest.raises(CheckpointError, match="LayerNorm"):
        ckpt.config_to_transformers(MambaConfig(d_model=32, n_layer=1, rms_norm=False))


# ---------------------------------------------------------------------------------------------
# Loading from the (offline) Hub cache: the four repo layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id, config", [("state-spaces/mamba-130m", MAMBA_130M),
                                             ("state-spaces/mamba2-130m", MAMBA2_130M),
                                             ("state-spaces/mamba2attn-2.7b", MAMBA2ATTN_2_7B)])
def test_hub_mamba_ssm_format(hub, tmp_path, repo_id, config):
    model = make_model(config)
    add_snapshot(hub, repo_id, save_mamba_ssm(model, tmp_path / "src", config))
    loaded = MambaLMHeadModel.from_pretrained(repo_id)
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))


@needs_transformers_cpu_path
def test_hub_transformers_format(hub, tmp_path):
    """state-spaces/mamba-130m-hf: model_type mamba, model.safetensors without lm_head (tied)."""
    hf_model = hf_mamba(MAMBA_130M_HF)
    hf_model.save_pretrained(tmp_path / "src")
    files = dir_files(str(tmp_path / "src"))
    files["config.json"] = json_bytes(MAMBA_130M_HF)
    add_snapshot(hub, "state-spaces/mamba-130m-hf", files)
    loaded = ckpt.load_pretrained(MambaLMHeadModel, "state-spaces/mamba-130m-hf")
    with torch.no_grad():
        ref = hf_model(INPUT_IDS).logits
    out = logits(loaded)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_hub_sharded_safetensors(hub, tmp_path):
    model = make_model(MAMBA2_130M)
    model.save_pretrained(tmp_path / "src", max_shard_size=40_000)
    files = dir_files(str(tmp_path / "src"))
    assert "model.safetensors.index.json" in files and len(files) > 3
    add_snapshot(hub, "org/sharded", files)
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained("org/sharded")), logits(model))


def test_hub_revision_pinning(hub, tmp_path):
    old, new = make_model(MAMBA_130M, seed=1), make_model(MAMBA_130M, seed=2)
    old_sha = add_snapshot(hub, "org/pinned", save_mamba_ssm(old, tmp_path / "old", MAMBA_130M), ref=None)
    add_snapshot(hub, "org/pinned", save_mamba_ssm(new, tmp_path / "new", MAMBA_130M))
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained("org/pinned")), logits(new))
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained("org/pinned", revision=old_sha)), logits(old))
    with pytest.raises(CheckpointNotFoundError, match="revision 'v2'"):
        MambaLMHeadModel.from_pretrained("org/pinned", revision="v2")


def test_hub_offline_env_in_fresh_process(tmp_path):
    """HF_HOME / HF_HUB_OFFLINE from the environment, as a user sets them (read at import)."""
    model = make_model(MAMBA_130M)
    hf_home = tmp_path / "home"
    add_snapshot(str(hf_home / "hub"), "state-spaces/mamba-130m", save_mamba_ssm(model, tmp_path / "src", MAMBA_130M))
    script = ("import json, sys, torch; from mamba_pkg.models.lm import MambaLMHeadModel as M; "
              "m = M.from_pretrained('state-spaces/mamba-130m');"
              "torch.save(m(torch.tensor(json.loads(sys.argv[1]))).logits.detach(), sys.argv[2])")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(INPUT_IDS.tolist()), str(out)], env=env, check=True,
                   timeout=120)
    assert torch.equal(torch.load(out), logits(model))


def test_local_files_only_flag(monkeypatch, tmp_path):
    """local_files_only=True keeps huggingface_hub off the network even when not in offline mode."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = str(tmp_path / "cache")
    model = make_model(MAMBA_130M)
    add_snapshot(cache, "org/local", save_mamba_ssm(model, tmp_path / "src", MAMBA_130M))
    loaded = MambaLMHeadModel.from_pretrained("org/local", cache_dir=cache, local_files_only=True)
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(CheckpointNotFoundError, match="org/absent"):
        MambaLMHeadModel.from_pretrained("org/absent", cache_dir=cache, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Both embedding spellings, dtype and device, meta init
# ---------------------------------------------------------------------------------------------


def test_both_embedding_spellings(tmp_path):
    model = make_model(MAMBA_130M)
    ref = logits(model)
    state = model.state_dict()
    hf_spelling = ckpt.state_dict_to_transformers(state)
    assert "backbone.embeddings.weight" in hf_spelling
    save_mamba_ssm(model, tmp_path / "a", MAMBA_130M)
    torch.save(hf_spelling, tmp_path / "a" / "pytorch_model.bin")
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained(tmp_path / "a")), ref)

    from safetensors.torch import save_file

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(MAMBA_130M))
    untied = {k: v.clone() for k, v in state.items() if k != "lm_head.weight"}
    save_file(untied, str(tmp_path / "b" / "model.safetensors"))
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained(tmp_path / "b")), ref)


def test_dtype_and_device_honoured(tmp_path):
    model = make_model(MAMBA2_130M)
    model.save_pretrained(tmp_path)
    expected = {k: v.dtype for k, v in MambaLMHeadModel(model.config, dtype=torch.bfloat16).state_dict().items()}
    for dtype in (torch.bfloat16, "bfloat16"):
        loaded = MambaLMHeadModel.from_pretrained(tmp_path, dtype=dtype, device="cpu")
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == expected
        assert all(v.device.type == "cpu" for v in loaded.state_dict().values())
    assert torch.bfloat16 in set(expected.values())
    bf16 = MambaLMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(bf16.backbone.embedding.weight, model.backbone.embedding.weight.to(torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        MambaLMHeadModel.from_pretrained(tmp_path, dtype="int8")
    with pytest.raises(TypeError, match="device"):
        MambaLMHeadModel.from_pretrained(tmp_path, device=3.5)


@requires_cuda
def test_load_onto_cuda(tmp_path):
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path / "bin", MAMBA_130M)
    model.save_pretrained(tmp_path / "safe")
    for path in (tmp_path / "bin", tmp_path / "safe"):
        loaded = MambaLMHeadModel.from_pretrained(path, device="cuda", dtype=torch.float16)
        assert all(v.is_cuda for v in loaded.state_dict().values())
        assert loaded.backbone.embedding.weight.dtype == torch.float16


def test_cpu_load_does_not_alias_the_file(tmp_path):
    """Overwriting the checkpoint after loading must not change (or crash) the loaded model."""
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path, MAMBA_130M)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(loaded), logits(model))


def test_parameters_built_on_meta_and_tying_kept(tmp_path):
    config = MambaConfig.from_dict(MAMBA2ATTN_2_7B)
    register, normal = torch.nn.Module.register_parameter, torch.nn.init.normal_
    with ckpt._parameters_on_meta():
        empty = MambaLMHeadModel(config)
    assert torch.nn.Module.register_parameter is register and torch.nn.init.normal_ is normal
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for b in empty.buffers())
    model = make_model(MAMBA2ATTN_2_7B)
    model.save_pretrained(tmp_path)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in loaded.named_parameters()}


# ---------------------------------------------------------------------------------------------
# save_pretrained: round trips, sharding, atomic writes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [MAMBA_130M, MAMBA2_130M, MAMBA2ATTN_2_7B])
def test_save_load_round_trip(tmp_path, config):
    model = make_model(config)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert MambaConfig.from_json_file(tmp_path / "config.json") == model.config
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained(tmp_path)), logits(model))


def test_save_sharded_then_single_removes_stale_files(tmp_path):
    model = make_model(MAMBA_130M)
    ckpt.save_pretrained(model, tmp_path, max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained(tmp_path)), logits(model))
    other = make_model(MAMBA_130M, seed=5)
    ckpt.save_pretrained(other, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained(tmp_path)), logits(other))


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_model(MAMBA_130M)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_model(MAMBA_130M, seed=3).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_saved_files_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        make_model(MAMBA_130M).save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_save_rejects_bad_arguments(tmp_path):
    model = make_model(MAMBA_130M)
    for bad in (0, "lots", "-3GB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            model.save_pretrained(tmp_path, max_shard_size=bad)
    with pytest.raises(TypeError, match="MambaConfig"):
        ckpt.save_pretrained(torch.nn.Linear(2, 2), tmp_path)


# ---------------------------------------------------------------------------------------------
# Conversion with transformers
# ---------------------------------------------------------------------------------------------


@needs_transformers_cpu_path
def test_transformers_ours_transformers_round_trip():
    hf_model = hf_mamba(MAMBA_130M_HF)
    ours = MambaLMHeadModel.from_transformers(hf_model)
    assert isinstance(ours, MambaLMHeadModel)
    back = ours.to_transformers()
    assert type(back) is type(hf_model)
    with torch.no_grad():
        assert torch.equal(back(INPUT_IDS).logits, hf_model(INPUT_IDS).logits)
    # weights were copied: changing ours does not touch the transformers model
    with torch.no_grad():
        ours.backbone.norm_f.weight.add_(1.0)
    assert not torch.equal(ours.backbone.norm_f.weight, hf_model.backbone.norm_f.weight)


def test_to_transformers_rejects_hybrid():
    with pytest.raises(CheckpointError, match="attention layers"):
        ckpt.to_transformers(make_model(MAMBA2ATTN_2_7B))


# ---------------------------------------------------------------------------------------------
# Bad input: every case is a clear error and nothing half-loads
# ---------------------------------------------------------------------------------------------


def test_unknown_repo_and_paths(hub, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="state-spaces/mamba-999m"):
        MambaLMHeadModel.from_pretrained("state-spaces/mamba-999m")
    with pytest.raises(CheckpointNotFoundError, match="neither a local directory nor a valid Hub repo id"):
        MambaLMHeadModel.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json not found"):
        MambaLMHeadModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(MAMBA_130M))
    with pytest.raises(CheckpointNotFoundError, match="no weights .* model.safetensors"):
        MambaLMHeadModel.from_pretrained(tmp_path / "empty")
    add_snapshot(hub, "org/config-only", {"config.json": json_bytes(MAMBA_130M)})
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        MambaLMHeadModel.from_pretrained("org/config-only")


def test_unknown_model_type_and_bad_config(tmp_path):
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path, {**MAMBA_130M_HF, "model_type": "llama"})
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    save_mamba_ssm(model, tmp_path, {**MAMBA_130M, "d_modle": 32})
    with pytest.raises(CheckpointError, match="d_modle"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_listed(tmp_path):
    model = make_model(MAMBA_130M)
    state = model.state_dict()
    save_mamba_ssm(model, tmp_path, MAMBA_130M)
    del state["backbone.layers.1.mixer.D"], state["backbone.norm_f.weight"]
    state["backbone.layers.7.mixer.extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        MambaLMHeadModel.from_pretrained(tmp_path)
    text = str(info.value)
    assert "missing keys (2)" in text and "backbone.layers.1.mixer.D" in text and "backbone.norm_f.weight" in text
    assert "unexpected keys (1): backbone.layers.7.mixer.extra" in text


def test_shape_and_dtype_mismatch(tmp_path):
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path, MAMBA_130M)
    state = model.state_dict()
    state["backbone.layers.0.mixer.x_proj.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"x_proj.weight: checkpoint \[5, 64\] vs model \[34, 64\]"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    state = model.state_dict()
    state["backbone.norm_f.weight"] = torch.ones(32, dtype=torch.int32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="norm_f.weight: checkpoint torch.int32"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_tied_weights_that_differ(tmp_path):
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path, MAMBA_130M)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1.0
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tied .* differ"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()  # equal values, separate storage
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(MambaLMHeadModel.from_pretrained(tmp_path)), logits(model))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file(tmp_path, fmt, damage):
    model = make_model(MAMBA_130M)
    if fmt == "bin":
        save_mamba_ssm(model, tmp_path, MAMBA_130M)
        path = tmp_path / "pytorch_model.bin"
    else:
        model.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x93NUMPY garbage" * 50)
    with pytest.raises(CheckpointError, match="corrupt|truncated|refused"):
        MambaLMHeadModel.from_pretrained(tmp_path)


class NotATensor:
    """A pickled object that weights_only loading must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_pickle_that_is_not_plain_tensors(tmp_path):
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path, MAMBA_130M)
    path = tmp_path / "pytorch_model.bin"
    torch.save({**model.state_dict(), "evil": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*weights_only"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    torch.save({**model.state_dict(), "step": 1000}, path)
    with pytest.raises(CheckpointError, match="bad entries .*: 'step' \\(int\\)"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    torch.save({0: torch.zeros(1), **model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="bad entries .*: 0 \\(Tensor\\)"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    torch.save([model.state_dict()], path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_bad_shard_index(tmp_path):
    model = make_model(MAMBA_130M)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_both_spellings_in_one_file(tmp_path):
    model = make_model(MAMBA_130M)
    save_mamba_ssm(model, tmp_path, MAMBA_130M)
    state = model.state_dict()
    state["backbone.embeddings.weight"] = state["backbone.embedding.weight"].clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="both"):
        MambaLMHeadModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def test_load_tokenizer(hub, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(_tokenizer_json())
    for where in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        assert ckpt.load_tokenizer(where).encode("hello world zzz").ids == [1, 2, 3]
    add_snapshot(hub, "state-spaces/mamba-130m-hf", {"tokenizer.json": _tokenizer_json()})
    assert ckpt.load_tokenizer("state-spaces/mamba-130m-hf").encode("world").ids == [2]
    # state-spaces/mamba-130m has no tokenizer.json: falls back to EleutherAI/gpt-neox-20b
    add_snapshot(hub, "state-spaces/mamba-130m", {"config.json": json_bytes(MAMBA_130M)})
    with pytest.raises(CheckpointNotFoundError, match="EleutherAI/gpt-neox-20b"):
        ckpt.load_tokenizer("state-spaces/mamba-130m")
    add_snapshot(hub, "EleutherAI/gpt-neox-20b", {"tokenizer.json": _tokenizer_json()})
    assert ckpt.load_tokenizer("state-spaces/mamba-130m").encode("hello").ids == [1]
    (tmp_path / "notok").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer.json"):
        ckpt.load_tokenizer(tmp_path / "notok")
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        ckpt.load_tokenizer(tmp_path / "tok")
