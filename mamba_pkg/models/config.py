"""MambaConfig: the language model's hyperparameters, as in the Hub's config.json.

Field names are mamba_ssm's, so a mamba_ssm ``config.json`` loads unchanged:

    d_model, d_intermediate, n_layer, vocab_size, ssm_cfg ({"layer": "Mamba1" | "Mamba2", ...Mamba
    constructor args}), attn_layer_idx (layers that are MHA instead of Mamba), attn_cfg (MHA
    constructor args), rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple,
    tie_embeddings.

Unknown keys are an error (a typo must not silently give a different model).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Union

SSM_LAYERS = ("Mamba1", "Mamba2")


@dataclass
class MambaConfig:
    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: Dict[str, Any] = field(default_factory=dict)
    attn_layer_idx: List[int] = field(default_factory=list)
    attn_cfg: Dict[str, Any] = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"MambaConfig.d_intermediate must be an int >= 0, got {self.d_intermediate!r}")
        if self.ssm_cfg is None:
            self.ssm_cfg = {}
        if self.attn_cfg is None:
            self.attn_cfg = {}
        if self.attn_layer_idx is None:
            self.attn_layer_idx = []
        if not isinstance(self.ssm_cfg, dict):
            raise TypeError(f"MambaConfig.ssm_cfg must be a dict, got {type(self.ssm_cfg).__name__}")
        if not isinstance(self.attn_cfg, dict):
            raise TypeError(f"MambaConfig.attn_cfg must be a dict, got {type(self.attn_cfg).__name__}")
        layer = self.ssm_cfg.get("layer", "Mamba1")
        if layer not in SSM_LAYERS:
            raise ValueError(f"MambaConfig.ssm_cfg['layer'] must be one of {SSM_LAYERS}, got {layer!r}")
        self.attn_layer_idx = list(self.attn_layer_idx)
        bad = [i for i in self.attn_layer_idx if not isinstance(i, int) or not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"MambaConfig.attn_layer_idx entries must be layer indices in [0, {self.n_layer}), got {bad}")
        if self.attn_layer_idx and "num_heads" not in self.attn_cfg:
            raise ValueError("MambaConfig.attn_cfg must give 'num_heads' when attn_layer_idx is not empty")

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple (the embedding's row count)."""
        multiple = self.pad_vocab_size_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MambaConfig":
        if not isinstance(data, dict):
            raise TypeError(f"MambaConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MambaConfig key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**copy.deepcopy(data))

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "MambaConfig":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls.from_dict(data)
