"""mamba_pkg: Mamba-centric sequence modeling with Triton kernels."""

__version__ = "0.1.0"
