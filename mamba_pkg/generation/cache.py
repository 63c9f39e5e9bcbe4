"""InferenceParams: the per-layer recurrent states and KV caches used while generating.

Same meaning as mamba_ssm's InferenceParams:

- ``key_value_memory_dict[layer_idx]`` holds the tuple returned by that layer's mixer
  ``allocate_inference_cache``: ``(conv_state, ssm_state)`` for Mamba / Mamba2,
  ``(kv_cache (B, max_seqlen, 2, Hkv, P), conv_state or None)`` for MHA.
- ``seqlen_offset`` is the number of tokens already in the cache. At 0, a mixer runs
  its parallel forward and writes its final state (a prefill); above 0 a one-token
  input runs the mixer's ``step``.
- ``lengths_per_sample`` (B,) int32, optional: per-sequence token counts, used by
  attention layers (KV positions and rotary) when sequences in a batch have different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class InferenceParams:
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new generation with the same cache tensors (states are overwritten by the prefill)."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()
