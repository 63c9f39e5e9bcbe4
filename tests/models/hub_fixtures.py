"""Build a local Hugging Face Hub cache for offline tests.

The layout is the one huggingface_hub writes and reads:

    <HF_HOME>/hub/models--<org>--<name>/
        blobs/<sha256 of the file>            the file contents
        snapshots/<commit>/<filename>         relative symlink to ../../blobs/<sha256>
        refs/<branch>                         the commit hash the branch points at

so ``from_pretrained("org/name")`` with ``HF_HUB_OFFLINE=1`` goes through the real
huggingface_hub resolution (refs, revision pinning, missing files) without a network.

The configs below are the real repos' config.json with the sizes scaled down
(d_model, n_layer, vocab_size, attention heads): the same keys, the same layer
types, the same spellings.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from typing import Dict, Optional, Union

import pytest

# state-spaces/mamba-130m (real: d_model 768, n_layer 24): mamba_ssm format, Mamba1, no d_intermediate key.
MAMBA_130M = {"d_model": 32, "n_layer": 2, "vocab_size": 91, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
# state-spaces/mamba2-130m (real: d_model 768, n_layer 24, pad multiple 16).
MAMBA2_130M = {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 91,
               "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
               "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
               "tie_embeddings": True}
# state-spaces/mamba2attn-2.7b (real: d_model 2560, n_layer 64, attn at [9, 18, 27, 36, 45, 56],
# 30 heads of 128, rotary 64).
MAMBA2ATTN_2_7B = {"d_model": 64, "d_intermediate": 0, "n_layer": 3, "vocab_size": 91,
                   "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [1],
                   "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 4,
                                "out_proj_bias": False, "qkv_proj_bias": False, "rotary_emb_dim": 8},
                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 16, "tie_embeddings": True}
# state-spaces/mamba-130m-hf (real: hidden_size 768, 24 layers, vocab 50280): transformers format,
# with the extra mamba_ssm keys the real file carries.
MAMBA_130M_HF = {"architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "eos_token_id": 0,
                 "expand": 2, "fused_add_norm": True, "hidden_act": "silu", "hidden_size": 32,
                 "initializer_range": 0.1, "intermediate_size": 64, "layer_norm_epsilon": 1e-05,
                 "model_type": "mamba", "n_layer": 2, "num_hidden_layers": 2, "pad_token_id": 0,
                 "pad_vocab_size_multiple": 8, "rescale_prenorm_residual": False, "residual_in_fp32": True,
                 "rms_norm": True, "state_size": 16, "time_step_floor": 0.0001, "time_step_init_scheme": "random",
                 "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 2, "time_step_scale": 1.0,
                 "torch_dtype": "float32", "use_bias": False, "use_cache": True, "use_conv_bias": True,
                 "vocab_size": 96}


# transformers binds its Mamba mixers to causal_conv1d / mamba_ssm at import when they are installed,
# then sends CPU tensors to their CUDA-only kernels. Tests that run a transformers Mamba model on CPU
# skip on such machines (CI installs neither package, so the parity checks run there).
needs_transformers_cpu_path = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is not None for p in ("causal_conv1d", "mamba_ssm")),
    reason="transformers routes CPU Mamba forwards to the installed CUDA-only causal_conv1d/mamba_ssm kernels")


def repo_folder(cache_dir: str, repo_id: str) -> str:
    return os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))


def add_snapshot(cache_dir: str, repo_id: str, files: Dict[str, Union[bytes, str]], *,
                 commit: Optional[str] = None, ref: Optional[str] = "main") -> str:
    """Put one commit of ``repo_id`` into the cache and point ``ref`` at it. Returns the commit hash.

    ``files`` maps a file name in the repo to its bytes, or to a path whose bytes are copied.
    """
    contents = {}
    for name, data in files.items():
        if isinstance(data, str):
            with open(data, "rb") as f:
                data = f.read()
        contents[name] = data
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(contents):
            digest.update(name.encode() + hashlib.sha256(contents[name]).digest())
        commit = digest.hexdigest()
    folder = repo_folder(cache_dir, repo_id)
    snapshot = os.path.join(folder, "snapshots", commit)
    os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
    for name, data in contents.items():
        blob_name = hashlib.sha256(data).hexdigest()
        blob = os.path.join(folder, "blobs", blob_name)
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(data)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref is not None:
        os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
        with open(os.path.join(folder, "refs", ref), "w") as f:
            f.write(commit)
    return commit


def json_bytes(data: dict) -> bytes:
    return json.dumps(data, indent=2).encode()


def dir_files(directory: str) -> Dict[str, str]:
    """{file name: path} for every file in a directory written by save_pretrained or torch.save."""
    return {name: os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


@contextlib.contextmanager
def offline_hub(monkeypatch, hf_home: str):
    """Point huggingface_hub at ``<hf_home>/hub`` and switch it offline; yields the cache dir.

    huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, at import, so the module
    constants are patched along with the environment.
    """
    import huggingface_hub.constants as constants

    cache_dir = os.path.join(hf_home, "hub")
    os.makedirs(cache_dir, exist_ok=True)
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", hf_home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield cache_dir
