"""Numerical ops: each with a torch reference and a Triton kernel behind one signature."""

from mamba_pkg.ops.attention import attention, attention_kvcache, attention_ref
from mamba_pkg.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from mamba_pkg.ops.cross_entropy import cross_entropy_grad_, cross_entropy_grad_ref
from mamba_pkg.ops.norm import layer_norm_fn, layer_norm_ref, rms_norm_fn, rms_norm_gated_fn, rms_norm_gated_ref
from mamba_pkg.ops.mamba_inner import mamba_inner_fn, mamba_inner_ref
from mamba_pkg.ops.selective_scan import selective_scan_fn, selective_scan_ref
from mamba_pkg.ops.ssd import (
    mamba_chunk_scan_combined,
    mamba_chunk_scan_combined_ref,
    mamba_split_conv1d_scan_combined,
    mamba_split_conv1d_scan_combined_ref,
    ssd_minimal,
)
from mamba_pkg.ops.state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "attention", "attention_kvcache", "attention_ref",
    "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
    "cross_entropy_grad_", "cross_entropy_grad_ref",
    "layer_norm_fn", "layer_norm_ref", "rms_norm_fn", "rms_norm_gated_fn", "rms_norm_gated_ref",
    "mamba_inner_fn", "mamba_inner_ref", "selective_scan_fn", "selective_scan_ref",
    "mamba_chunk_scan_combined", "mamba_chunk_scan_combined_ref",
    "mamba_split_conv1d_scan_combined", "mamba_split_conv1d_scan_combined_ref", "ssd_minimal",
    "selective_state_update", "selective_state_update_ref",
]
