"""Text generation: the recurrent-state cache, sampling, the decode loop and the CLI."""

from mamba_pkg.generation.cache import InferenceParams

__all__ = ["InferenceParams"]
