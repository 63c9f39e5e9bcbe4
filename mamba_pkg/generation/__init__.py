"""Text generation: the recurrent-state cache, sampling, the decode loop and the CLI."""

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.generation.decode import GenerateOutput, decode, free_decode_graphs, generate
from mamba_pkg.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)
from mamba_pkg.generation.streamer import BaseStreamer, TextStreamer

__all__ = [
    "InferenceParams", "GenerateOutput", "decode", "free_decode_graphs", "generate",
    "apply_repetition_penalty", "apply_temperature", "min_p_filter", "process_logits", "sample",
    "top_k_filter", "top_p_filter", "BaseStreamer", "TextStreamer",
]
