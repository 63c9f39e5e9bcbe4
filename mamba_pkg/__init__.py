"""mamba_pkg: Mamba-centric sequence modeling with Triton kernels."""

__version__ = "0.1.0"

from mamba_pkg.generation.cache import InferenceParams  # noqa: E402
from mamba_pkg.models import (  # noqa: E402
    MHA,
    Block,
    GatedMLP,
    Mamba,
    Mamba2,
    MambaConfig,
    MambaLMHeadModel,
    MixerModel,
    RMSNorm,
    RMSNormGated,
)
from mamba_pkg.ops import (  # noqa: E402
    causal_conv1d_fn,
    causal_conv1d_update,
    layer_norm_fn,
    mamba_chunk_scan_combined,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    rms_norm_fn,
    rms_norm_gated_fn,
    selective_scan_fn,
    selective_state_update,
)

__all__ = [
    "__version__",
    "InferenceParams",
    "MHA", "Block", "GatedMLP", "Mamba", "Mamba2", "MambaConfig", "MambaLMHeadModel", "MixerModel",
    "RMSNorm", "RMSNormGated",
    "causal_conv1d_fn", "causal_conv1d_update", "layer_norm_fn", "mamba_chunk_scan_combined", "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined", "rms_norm_fn", "rms_norm_gated_fn", "selective_scan_fn",
    "selective_state_update",
]
