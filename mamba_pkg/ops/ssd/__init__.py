"""Mamba-2 SSD: chunked state-space-duality scan (see reference.py for the formula)."""

from mamba_pkg.ops.ssd.combined import (
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    mamba_split_conv1d_scan_combined_ref,
)
from mamba_pkg.ops.ssd.reference import mamba_chunk_scan_combined_ref, ssd_minimal

__all__ = [
    "mamba_chunk_scan_combined",
    "mamba_chunk_scan_combined_ref",
    "mamba_split_conv1d_scan_combined",
    "mamba_split_conv1d_scan_combined_ref",
    "ssd_minimal",
]
