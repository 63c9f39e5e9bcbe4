"""Text generation: the recurrent-state cache, sampling, the decode loop and the CLI."""

from mamba_pkg.generation.cache import InferenceParams
# `decode` (mamba_ssm's call shape) stays in mamba_pkg.generation.decode: re-exported here
# it would shadow the submodule of the same name.
from mamba_pkg.generation.decode import GenerateOutput, free_decode_graphs, generate
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
    "InferenceParams", "GenerateOutput", "free_decode_graphs", "generate",
    "apply_repetition_penalty", "apply_temperature", "min_p_filter", "process_logits", "sample",
    "top_k_filter", "top_p_filter", "BaseStreamer", "TextStreamer",
]
