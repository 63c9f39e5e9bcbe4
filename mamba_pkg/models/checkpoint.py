"""Checkpoint formats: load, save, convert.

Two on-disk formats hold the same language model:

- mamba_ssm (state-spaces/mamba-*, mamba2-*, mamba2attn-*): ``config.json`` with
  MambaConfig fields (d_model, n_layer, ssm_cfg, ...) and ``pytorch_model.bin``;
  parameter names ``backbone.embedding.weight``, ``backbone.layers.{i}.mixer.*``,
  ``backbone.layers.{i}.norm.weight``, ``backbone.norm_f.weight``, ``lm_head.weight``.
- transformers (MambaForCausalLM / Mamba2ForCausalLM, e.g. state-spaces/mamba-130m-hf):
  ``config.json`` with ``model_type`` "mamba" or "mamba2" (hidden_size, state_size,
  ...) and ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
  The names differ only in the embedding: ``backbone.embeddings.weight``.

``save_pretrained`` writes the mamba_ssm config and safetensors weights.

Loading builds the model with its parameters on the meta device (no memory, no
random init), checks every checkpoint key and shape against it, and only then
moves each tensor to the target device and dtype and assigns it. Peak host
memory is therefore about one copy of the checkpoint file, and a bad checkpoint
fails before anything is assigned: nothing loads partially.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from mamba_pkg.models.config import MambaConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# state-spaces/mamba-* repos ship no tokenizer; they were trained with this one.
DEFAULT_TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"
TOKENIZER_NAME = "tokenizer.json"
# Every norm in MixerModel / Mamba2's gated norm uses this epsilon (mamba_ssm's value).
NORM_EPS = 1e-5

_OURS_EMBEDDING = "backbone.embedding."
_HF_EMBEDDING = "backbone.embeddings."
_MAX_NAMES_IN_ERROR = 20

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot become this model: bad file, wrong keys or shapes, unsupported config."""


class CheckpointNotFoundError(FileNotFoundError):
    """Neither a local directory nor a Hub repo (at that revision, in the cache when offline)."""


# ----------------------------------------------------------------------------------------------
# Key maps (mamba_ssm names <-> transformers names)
# ----------------------------------------------------------------------------------------------


def key_to_transformers(key: str) -> str:
    """mamba_ssm parameter name -> transformers MambaForCausalLM / Mamba2ForCausalLM name."""
    if key.startswith(_OURS_EMBEDDING):
        return _HF_EMBEDDING + key[len(_OURS_EMBEDDING):]
    return key


def key_from_transformers(key: str) -> str:
    """transformers parameter name -> mamba_ssm name (mamba_ssm names pass through unchanged)."""
    if key.startswith(_HF_EMBEDDING):
        return _OURS_EMBEDDING + key[len(_HF_EMBEDDING):]
    return key


def state_dict_to_transformers(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {key_to_transformers(k): v for k, v in state_dict.items()}


def state_dict_from_transformers(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename to mamba_ssm names; a key given under both spellings is an error."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        new = key_from_transformers(k)
        if new in out:
            raise CheckpointError(f"checkpoint has both {new!r} and its transformers spelling {k!r}")
        out[new] = v
    return out


# ----------------------------------------------------------------------------------------------
# Config conversion (MambaConfig <-> transformers config dict)
# ----------------------------------------------------------------------------------------------


def _mixer_defaults(layer: str) -> Dict[str, Any]:
    """Constructor defaults of our Mamba / Mamba2 mixer (the values an ssm_cfg leaves out)."""
    if layer == "Mamba1":
        from mamba_pkg.models.mamba import Mamba as mixer_cls
    else:
        from mamba_pkg.models.mamba2 import Mamba2 as mixer_cls
    params = inspect.signature(mixer_cls.__init__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _ssm_settings(config: MambaConfig) -> Dict[str, Any]:
    layer = config.ssm_cfg.get("layer", "Mamba1")
    settings = _mixer_defaults(layer)
    settings.update({k: v for k, v in config.ssm_cfg.items() if k != "layer"})
    settings["layer"] = layer
    return settings


def _not_convertible(reason: str) -> CheckpointError:
    return CheckpointError(f"this model has no transformers equivalent: {reason}")


def config_to_transformers(config: MambaConfig) -> Dict[str, Any]:
    """MambaConfig -> kwargs of transformers' MambaConfig / Mamba2Config (with ``model_type``).

    Only pure-Mamba models map: transformers has no attention layers, MLPs or
    LayerNorm in these classes. Anything else is a CheckpointError saying why.
    """
    if config.attn_layer_idx:
        raise _not_convertible(f"attention layers at {config.attn_layer_idx}")
    if config.d_intermediate:
        raise _not_convertible(f"MLP blocks (d_intermediate={config.d_intermediate})")
    if not config.rms_norm:
        raise _not_convertible("LayerNorm blocks (rms_norm=False)")
    s = _ssm_settings(config)
    d_inner = int(s["expand"] * config.d_model)
    out: Dict[str, Any] = {
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "state_size": s["d_state"],
        "expand": s["expand"],
        "conv_kernel": s["d_conv"],
        "use_bias": s["bias"],
        "use_conv_bias": s["conv_bias"],
        "residual_in_fp32": config.residual_in_fp32,
        "layer_norm_epsilon": NORM_EPS,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "time_step_min": s["dt_min"],
        "time_step_max": s["dt_max"],
        "time_step_floor": s["dt_init_floor"],
        # GPT-NeoX tokenizer: <|endoftext|> is id 0.
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    if s["layer"] == "Mamba1":
        dt_rank = math.ceil(config.d_model / 16) if s["dt_rank"] == "auto" else int(s["dt_rank"])
        out.update(model_type="mamba", architectures=["MambaForCausalLM"], time_step_rank=dt_rank,
                   time_step_scale=s["dt_scale"], time_step_init_scheme=s["dt_init"])
        return out
    if not s["rmsnorm"] or s["norm_before_gate"]:
        raise _not_convertible("transformers' Mamba2 always uses a gated RMSNorm with norm_before_gate=False")
    if s["D_has_hdim"]:
        raise _not_convertible("D_has_hdim=True (transformers' Mamba2 has one D per head)")
    if s.get("d_ssm") not in (None, d_inner):
        raise _not_convertible(f"d_ssm={s['d_ssm']} != expand * d_model = {d_inner}")
    if d_inner % s["headdim"]:
        raise CheckpointError(f"expand * d_model = {d_inner} is not a multiple of headdim={s['headdim']}")
    out.update(model_type="mamba2", architectures=["Mamba2ForCausalLM"], num_heads=d_inner // s["headdim"],
               head_dim=s["headdim"], n_groups=s["ngroups"], chunk_size=s["chunk_size"],
               time_step_limit=list(s["dt_limit"]))
    return out


_HF_COMMON_DEFAULTS = {"expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
                       "residual_in_fp32": True, "layer_norm_epsilon": NORM_EPS, "hidden_act": "silu",
                       "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4}
# transformers' own defaults for the fields a config.json may leave out.
_HF_DEFAULTS = {
    "mamba": {**_HF_COMMON_DEFAULTS, "state_size": 16, "time_step_rank": "auto", "time_step_scale": 1.0,
              "time_step_init_scheme": "random", "tie_word_embeddings": True},
    "mamba2": {**_HF_COMMON_DEFAULTS, "state_size": 128, "head_dim": 64, "n_groups": 8, "chunk_size": 256,
               "time_step_limit": (0.0, float("inf")), "tie_word_embeddings": False},
}


def config_from_transformers(hf_config: Dict[str, Any]) -> MambaConfig:
    """transformers config dict (``model_type`` "mamba" / "mamba2") -> MambaConfig."""
    model_type = hf_config.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise CheckpointError(f"unsupported model_type {model_type!r}: expected 'mamba' or 'mamba2' "
                              "(or a mamba_ssm config.json without model_type)")
    c = {**_HF_DEFAULTS[model_type], **hf_config}
    for name in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if name not in hf_config:
            raise CheckpointError(f"{model_type} config.json has no {name!r}")
    if c["hidden_act"] not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act={c['hidden_act']!r} is not supported (only 'silu')")
    if not math.isclose(float(c["layer_norm_epsilon"]), NORM_EPS, rel_tol=1e-6):
        raise CheckpointError(f"layer_norm_epsilon={c['layer_norm_epsilon']} is not supported (only {NORM_EPS})")
    d_model, expand = c["hidden_size"], c["expand"]
    d_inner = int(expand * d_model)
    if "intermediate_size" in hf_config and hf_config["intermediate_size"] != d_inner:
        raise CheckpointError(f"intermediate_size={hf_config['intermediate_size']} != expand * hidden_size = {d_inner}")
    ssm_cfg: Dict[str, Any] = {
        "d_state": c["state_size"], "d_conv": c["conv_kernel"], "expand": expand,
        "bias": c["use_bias"], "conv_bias": c["use_conv_bias"],
        "dt_min": c["time_step_min"], "dt_max": c["time_step_max"], "dt_init_floor": c["time_step_floor"],
    }
    if model_type == "mamba":
        ssm_cfg.update(layer="Mamba1", dt_rank=c["time_step_rank"], dt_scale=c["time_step_scale"],
                       dt_init=c["time_step_init_scheme"])
    else:
        num_heads = c.get("num_heads", d_inner // c["head_dim"])
        if num_heads * c["head_dim"] != d_inner:
            raise CheckpointError(f"num_heads * head_dim = {num_heads} * {c['head_dim']} != "
                                  f"expand * hidden_size = {d_inner}")
        limit = tuple(float(x) for x in c["time_step_limit"])
        ssm_cfg.update(layer="Mamba2", headdim=c["head_dim"], ngroups=c["n_groups"], chunk_size=c["chunk_size"],
                       rmsnorm=True, norm_before_gate=False, D_has_hdim=False)
        if limit != (0.0, float("inf")):
            ssm_cfg["dt_limit"] = limit
    return MambaConfig(d_model=d_model, d_intermediate=0, n_layer=c["num_hidden_layers"],
                       vocab_size=c["vocab_size"], ssm_cfg=ssm_cfg, rms_norm=True,
                       residual_in_fp32=bool(c["residual_in_fp32"]), fused_add_norm=True,
                       pad_vocab_size_multiple=1, tie_embeddings=bool(c["tie_word_embeddings"]))


def config_from_dict(data: Dict[str, Any]) -> MambaConfig:
    """Either format's config.json contents -> MambaConfig (``model_type`` picks the format)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(data).__name__}")
    if "model_type" in data:
        return config_from_transformers(data)
    try:
        return MambaConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json is not a mamba_ssm MambaConfig: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Finding the files (local directory or the Hub through huggingface_hub)
# ----------------------------------------------------------------------------------------------


def _hub_errors():
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.24 keeps them in utils
        from huggingface_hub import utils as errors
    return errors


def _offline(local_files_only: bool) -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return local_files_only or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


class _Source:
    """Where a checkpoint's files are: ``fetch(filename)`` -> local path, or None when absent."""

    def __init__(self, name_or_path: PathLike, *, revision=None, token=None, cache_dir=None,
                 local_files_only=False):
        self.name = os.fspath(name_or_path)
        self.is_dir = os.path.isdir(self.name)
        self.hub_kwargs = dict(revision=revision, token=token, cache_dir=cache_dir,
                               local_files_only=_offline(local_files_only))

    def describe(self) -> str:
        if self.is_dir:
            return f"local directory {self.name!r}"
        rev = self.hub_kwargs["revision"]
        where = " (offline: local cache only)" if self.hub_kwargs["local_files_only"] else ""
        return f"Hub repo {self.name!r}" + (f" at revision {rev!r}" if rev else "") + where

    def fetch(self, filename: str, *, required: bool = False) -> Optional[str]:
        if self.is_dir:
            path = os.path.join(self.name, filename)
            if os.path.isfile(path):
                return path
            if required:
                raise CheckpointNotFoundError(f"{filename} not found in {self.describe()}")
            return None
        from huggingface_hub import hf_hub_download

        errors = _hub_errors()
        try:
            return hf_hub_download(self.name, filename, **self.hub_kwargs)
        except errors.HFValidationError as exc:
            raise CheckpointNotFoundError(
                f"{self.name!r} is neither a local directory nor a valid Hub repo id ({exc})") from exc
        except errors.RepositoryNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{self.describe()} does not exist or is private (pass token=...)") from exc
        except errors.RevisionNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self.describe()}: revision not found") from exc
        except errors.EntryNotFoundError as exc:
            # A missing file is normal while probing formats; an unreachable Hub is not.
            unreachable = isinstance(exc, errors.LocalEntryNotFoundError) and not self.hub_kwargs["local_files_only"]
            if required or unreachable:
                raise CheckpointNotFoundError(f"{filename} not found in {self.describe()}: {exc}") from exc
            return None


def _weight_files(source: _Source) -> Tuple[str, List[str]]:
    """-> ("safetensors" | "torch", local paths). Single files before sharded indexes."""
    for kind, single, index in (("safetensors", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME),
                                ("torch", TORCH_WEIGHTS_NAME, TORCH_WEIGHTS_INDEX_NAME)):
        path = source.fetch(single)
        if path is not None:
            return kind, [path]
        index_path = source.fetch(index)
        if index_path is not None:
            shards = _read_index(index_path)
            return kind, [source.fetch(name, required=True) for name in shards]
    raise CheckpointNotFoundError(
        f"no weights in {source.describe()}: expected one of {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        f"{TORCH_WEIGHTS_NAME}, {TORCH_WEIGHTS_INDEX_NAME}")


def _read_index(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a valid shard index (needs a 'weight_map' object): {exc}") from exc
    for name in shards:
        if not isinstance(name, str) or os.path.isabs(name) or ".." in name.split("/"):
            raise CheckpointError(f"{path}: shard name {name!r} is not a plain file name")
    return shards


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Reading tensors lazily: shapes first (for the checks), data later (one tensor at a time)
# ----------------------------------------------------------------------------------------------


class _TensorReader:
    """name -> (shape, dtype) without reading data, and ``get(name)`` to read one tensor."""

    def __init__(self):
        self.meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self._getters: Dict[str, Callable[[], torch.Tensor]] = {}
        self._data_ptrs: Dict[str, Tuple[int, int]] = {}
        self._handles: List[Any] = []

    def _add(self, key: str, path: str, shape, dtype, getter, data_ptr=None) -> None:
        if key in self.meta:
            raise CheckpointError(f"{path}: key {key!r} appears in more than one weights file")
        self.meta[key] = (tuple(shape), dtype)
        self._getters[key] = getter
        if data_ptr is not None:
            self._data_ptrs[key] = data_ptr

    def add_safetensors(self, path: str, device: torch.device) -> None:
        from safetensors import safe_open

        # safetensors reads straight onto a CUDA device: no host copy of the tensor.
        if device.type == "cuda":
            target = f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
        else:
            target = "cpu"
        try:
            handle = safe_open(path, framework="pt", device=target)
            keys = list(handle.keys())
            infos = [(k, handle.get_slice(k)) for k in keys]
            metas = [(k, s.get_shape(), _safetensors_dtype(s.get_dtype(), path, k)) for k, s in infos]
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or size
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file: {exc}") from exc
        self._handles.append(handle)
        for key, shape, dtype in metas:
            self._add(key, path, shape, dtype, _safetensors_getter(handle, key, path))

    def add_torch(self, path: str, device: torch.device) -> None:
        self.add_state_dict(_torch_load(path, mmap=device.type != "cpu"), path)

    def add_state_dict(self, state_dict: Dict[str, torch.Tensor], where: str, *, copy: bool = False) -> None:
        """In-memory tensors; ``copy`` clones them on read so the model never aliases the source."""
        for key, value in state_dict.items():
            getter = (lambda v=value: v.detach().clone()) if copy else (lambda v=value: v)
            start = value.untyped_storage().data_ptr() + value.storage_offset() * value.element_size()
            self._add(key, where, value.shape, value.dtype, getter, data_ptr=(start, value.numel()))

    def same_data(self, key_a: str, key_b: str) -> bool:
        """True when two torch-format entries are views of one storage (a tied pair saved once)."""
        a, b = self._data_ptrs.get(key_a), self._data_ptrs.get(key_b)
        return a is not None and a == b

    def get(self, key: str) -> torch.Tensor:
        return self._getters[key]()

    def rename(self, fn: Callable[[str], str]) -> None:
        """Apply a key map to every name; two names mapping to one is an error."""
        meta, getters, ptrs = {}, {}, {}
        for key, value in self.meta.items():
            new = fn(key)
            if new in meta:
                raise CheckpointError(f"checkpoint has both {new!r} and another spelling of it, {key!r}")
            meta[new], getters[new] = value, self._getters[key]
            if key in self._data_ptrs:
                ptrs[new] = self._data_ptrs[key]
        self.meta, self._getters, self._data_ptrs = meta, getters, ptrs


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_dtype(name: str, path: str, key: str) -> torch.dtype:
    if name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
    return _SAFETENSORS_DTYPES[name]


def _safetensors_getter(handle, key: str, path: str) -> Callable[[], torch.Tensor]:
    def get() -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc
    return get


def _torch_load(path: str, *, mmap: bool) -> Dict[str, torch.Tensor]:
    """torch.load with weights_only=True; the result must be a flat dict of tensors.

    ``mmap`` (for loads onto an accelerator) reads each tensor from the page cache as it is
    moved, with no heap copy of the file. CPU loads do not map the file: their parameters
    would stay views of it, and rewriting the file later would corrupt a live model.
    """
    import pickle

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            # Files in the pre-1.6 (non-zip) format cannot be mapped.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than plain tensors and containers, "
            f"or is not a torch checkpoint at all (loaded with weights_only=True): {exc}") from exc
    except Exception as exc:  # zip / IO errors come as RuntimeError, OSError, EOFError, ...
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: a state dict must map string names to tensors; bad entries "
                              f"(key (value type)): {_names(bad)}")
    return obj


def _names(items: List[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES_IN_ERROR])
    more = len(items) - _MAX_NAMES_IN_ERROR
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _open_weights(kind: str, paths: List[str], device: torch.device) -> _TensorReader:
    reader = _TensorReader()
    for path in paths:
        if kind == "safetensors":
            reader.add_safetensors(path, device)
        else:
            reader.add_torch(path, device)
    return reader


# ----------------------------------------------------------------------------------------------
# Building the model without memory, then assigning checked tensors
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside lands on the meta device.

    Buffers are left alone (built as usual, they are small) because non-persistent
    ones such as rotary frequencies are not in a checkpoint and must be real.
    """
    register, normal = nn.Module.register_parameter, nn.init.normal_

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)  # keep markers such as _no_weight_decay
            param = meta
        register(module, name, param)

    def normal_unless_meta(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The values of a meta tensor are discarded anyway, and the first normal_ on one
        # imports torch._dynamo (about 2 s, more than loading a small model takes).
        return tensor if tensor.is_meta else normal(tensor, *args, **kwargs)

    nn.Module.register_parameter, nn.init.normal_ = register_on_meta, normal_unless_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.init.normal_ = register, normal


def _as_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise TypeError(f"dtype must be a floating torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def _as_device(device) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as exc:
        raise TypeError(f"device must be a torch.device or a device string, got {device!r}") from exc


def _empty_model(cls, config: MambaConfig, dtype: Optional[torch.dtype]) -> nn.Module:
    with _parameters_on_meta():
        return cls(config, dtype=dtype)


def _tied_groups(model: nn.Module) -> List[List[Tuple[nn.Module, str, str]]]:
    """Persistent tensors grouped by identity: [(owner module, attr name, full key), ...] per tensor.

    A tied pair (lm_head.weight is backbone.embedding.weight) is one group with two keys.
    """
    groups: Dict[int, List[Tuple[nn.Module, str, str]]] = {}
    order: List[int] = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        entries = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for name, tensor in entries:
            if tensor is None:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if id(tensor) not in groups:
                groups[id(tensor)] = []
                order.append(id(tensor))
            if all(k != key for _, _, k in groups[id(tensor)]):
                groups[id(tensor)].append((module, name, key))
    return [groups[i] for i in order]


def _tensor_of(module: nn.Module, name: str) -> torch.Tensor:
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def _check_keys_and_shapes(model: nn.Module, groups, reader: _TensorReader, where: str) -> Dict[int, str]:
    """Every model tensor has a checkpoint entry of its shape, and nothing is left over.

    Returns, per group index, the checkpoint key that supplies it.
    """
    available = reader.meta
    used = set()
    missing, mismatched, wrong_kind = [], [], []
    chosen: Dict[int, str] = {}
    for i, group in enumerate(groups):
        target = _tensor_of(*group[0][:2])
        present = [key for _, _, key in group if key in available]
        used.update(present)
        if not present:
            missing.append(" / ".join(key for _, _, key in group))
            continue
        for key in present:
            shape, dtype = available[key]
            if shape != tuple(target.shape):
                mismatched.append(f"{key}: checkpoint {list(shape)} vs model {list(target.shape)}")
            elif dtype.is_floating_point != target.dtype.is_floating_point:
                wrong_kind.append(f"{key}: checkpoint {dtype} vs model {target.dtype}")
        chosen[i] = present[0]
    unexpected = sorted(set(available) - used)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
    if wrong_kind:
        problems.append(f"dtype kind mismatches ({len(wrong_kind)}): {_names(wrong_kind)}")
    if problems:
        raise CheckpointError(f"checkpoint from {where} does not fit {type(model).__name__}:\n  "
                              + "\n  ".join(problems))
    return chosen


def _assign(model: nn.Module, reader: _TensorReader, device: torch.device, where: str) -> None:
    groups = _tied_groups(model)
    chosen = _check_keys_and_shapes(model, groups, reader, where)
    # Tied keys saved separately must hold the same values, else tying would silently drop one.
    for group in groups:
        present = [key for _, _, key in group if key in reader.meta]
        for other in present[1:]:
            if not reader.same_data(present[0], other) and not torch.equal(reader.get(present[0]),
                                                                          reader.get(other)):
                raise CheckpointError(f"checkpoint from {where}: {present[0]!r} and {other!r} are tied in "
                                      "the model (tie_embeddings=True) but differ in the checkpoint")
    for i, group in enumerate(groups):
        module, name, _ = group[0]
        is_param = name in module._parameters
        old = _tensor_of(module, name)
        value = reader.get(chosen[i]).to(device=device, dtype=old.dtype)
        if is_param:
            new = nn.Parameter(value, requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)
        else:
            new = value
        for owner, attr, _ in group:
            (owner._parameters if is_param else owner._buffers)[attr] = new
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                module._buffers[name] = module._buffers[name].to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left without data after loading from {where}: {_names(left)}")


def _model_class(cls):
    if cls is None:
        from mamba_pkg.models.lm import MambaLMHeadModel as cls
    return cls


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def load_pretrained(cls, name_or_path: PathLike, *, revision: Optional[str] = None, dtype=None, device=None,
                    token: Optional[Union[str, bool]] = None, cache_dir: Optional[PathLike] = None,
                    local_files_only: bool = False) -> nn.Module:
    """Load a pretrained language model from a local directory or a Hub repo.

    Args:
        cls: the model class (MambaLMHeadModel); ``cls(config, dtype=...)`` builds it.
        name_or_path: a local directory, or a Hub repo id such as "state-spaces/mamba-130m".
        revision: branch, tag or commit hash to pin (Hub only).
        dtype: parameter dtype (torch.dtype or name); None keeps the model class's defaults (fp32).
            Parameters the model keeps in fp32 on purpose (A_log, D, dt_bias) stay as the model built them.
        device: where the weights go (default CPU); each tensor is moved there directly.
        token, cache_dir, local_files_only: passed to huggingface_hub. ``HF_HUB_OFFLINE=1`` in the
            environment also means local_files_only.
    Returns the model in eval mode. Raises CheckpointNotFoundError when nothing is found and
    CheckpointError for a bad config, bad file, or keys / shapes that do not fit (nothing is loaded).
    Formats: mamba_ssm (config.json + pytorch_model.bin) and transformers (model_type mamba / mamba2,
    model.safetensors or a sharded index); either embedding key spelling.
    """
    dtype = _as_dtype(dtype)
    device = _as_device(device)
    source = _Source(name_or_path, revision=revision, token=token, cache_dir=cache_dir,
                     local_files_only=local_files_only)
    config_path = source.fetch(CONFIG_NAME, required=True)
    config = config_from_dict(_read_config(config_path))
    kind, paths = _weight_files(source)
    reader = _open_weights(kind, paths, device)
    reader.rename(key_from_transformers)
    model = _empty_model(_model_class(cls), config, dtype)
    _assign(model, reader, device, source.describe())
    return model.eval()


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as '5GB', '500MiB', '20KB'."""
    value = -1
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if match and match.group(2).upper() in _SIZE_UNITS:
            value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '5GB', got {size!r}")
    return value


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; a saved model gets the permissions any new file would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _unique_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Persistent tensors, each tied group once (under its first name: the embedding)."""
    out = {}
    for group in _tied_groups(model):
        module, name, key = group[0]
        out[key] = _tensor_of(module, name)
    return out


def save_pretrained(model: nn.Module, save_directory: PathLike, *, max_shard_size: Union[int, str] = "5GB") -> None:
    """Write ``config.json`` (mamba_ssm fields) and ``model.safetensors`` into ``save_directory``.

    Past ``max_shard_size`` bytes the weights go to ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. Each file is written to a temp name and renamed, and weight
    files of an earlier save that the new one does not use are removed afterwards, so a loader
    never mixes two saves. Tied weights are stored once.
    """
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    config = getattr(model, "config", None)
    if not isinstance(config, MambaConfig):
        raise TypeError(f"model.config must be a MambaConfig, got {type(config).__name__}")
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    tensors = _unique_state_dict(model)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tensor
        sizes[-1] += nbytes
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        # One shard at a time on the host: a GPU model never needs a full CPU copy.
        host = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
        _atomic_write(os.path.join(save_directory, name),
                      lambda tmp, host=host: save_file(host, tmp, metadata={"format": "pt"}))
        del host
    index_path = os.path.join(save_directory, SAFE_WEIGHTS_INDEX_NAME)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        _atomic_write(index_path, lambda tmp: _write_json(tmp, index))
    _atomic_write(os.path.join(save_directory, CONFIG_NAME), lambda tmp: config.to_json_file(tmp))
    stale = [n for n in os.listdir(save_directory)
             if n not in names and (n == SAFE_WEIGHTS_NAME
                                    or (n == SAFE_WEIGHTS_INDEX_NAME and len(shards) == 1)
                                    or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n))]
    for name in stale:
        os.remove(os.path.join(save_directory, name))


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def push_to_hub(model: nn.Module, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                revision: Optional[str] = None, commit_message: str = "Upload model with mamba_pkg",
                max_shard_size: Union[int, str] = "5GB") -> str:
    """save_pretrained into a temp dir and upload it to ``repo_id`` (created if needed). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, max_shard_size=max_shard_size)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def _transformers_classes(model_type: str):
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("conversion to/from transformers needs it: pip install transformers") from exc
    if model_type == "mamba":
        return transformers.MambaConfig, transformers.MambaForCausalLM
    return transformers.Mamba2Config, transformers.Mamba2ForCausalLM


def to_transformers(model: nn.Module) -> nn.Module:
    """Our pure-Mamba MambaLMHeadModel -> transformers MambaForCausalLM / Mamba2ForCausalLM.

    Same device and dtype as the embedding; weights are copied (the two models share nothing).
    """
    hf_kwargs = config_to_transformers(model.config)
    config_cls, model_cls = _transformers_classes(hf_kwargs.pop("model_type"))
    ref = next(iter(_unique_state_dict(model).values()))
    hf_model = model_cls(config_cls(**hf_kwargs)).to(device=ref.device, dtype=ref.dtype)
    state_dict = state_dict_to_transformers(model.state_dict())
    result = hf_model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"key map to transformers failed: missing {_names(sorted(result.missing_keys))}, "
                              f"unexpected {_names(sorted(result.unexpected_keys))}")
    return hf_model.eval()


def from_transformers(hf_model: nn.Module, *, cls=None, dtype=None, device=None) -> nn.Module:
    """transformers MambaForCausalLM / Mamba2ForCausalLM -> our MambaLMHeadModel (weights copied).

    ``dtype`` / ``device`` default to those of the transformers model's embedding.
    """
    hf_config = hf_model.config.to_dict()
    config = config_from_transformers(hf_config)
    state_dict = state_dict_from_transformers(hf_model.state_dict())
    embedding = state_dict.get(_OURS_EMBEDDING + "weight")
    device = _as_device(device if device is not None or embedding is None else embedding.device)
    dtype = _as_dtype(dtype if dtype is not None or embedding is None else embedding.dtype)
    reader = _TensorReader()
    # copy: the new model must not alias the transformers model's storage
    reader.add_state_dict(state_dict, "transformers model", copy=True)
    model = _empty_model(_model_class(cls), config, dtype)
    _assign(model, reader, device, f"{type(hf_model).__name__}")
    return model.eval()


def load_tokenizer(name_or_path: PathLike = DEFAULT_TOKENIZER_REPO, *, revision: Optional[str] = None,
                   token: Optional[Union[str, bool]] = None, cache_dir: Optional[PathLike] = None,
                   local_files_only: bool = False):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file, a directory holding one, or a Hub repo.

    A Hub repo without tokenizer.json (the state-spaces/mamba-* repos) falls back to
    EleutherAI/gpt-neox-20b, the tokenizer those models were trained with.
    """
    from tokenizers import Tokenizer

    name = os.fspath(name_or_path)
    if os.path.isfile(name):
        return _tokenizer_from_file(Tokenizer, name)
    source = _Source(name, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    path = source.fetch(TOKENIZER_NAME, required=source.is_dir)
    if path is None:
        fallback = _Source(DEFAULT_TOKENIZER_REPO, token=token, cache_dir=cache_dir,
                           local_files_only=local_files_only)
        path = fallback.fetch(TOKENIZER_NAME, required=True)
    return _tokenizer_from_file(Tokenizer, path)


def _tokenizer_from_file(tokenizer_cls, path: str):
    try:
        return tokenizer_cls.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise CheckpointError(f"{path}: not a valid tokenizer.json: {exc}") from exc
