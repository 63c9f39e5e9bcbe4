"""nn.Modules: the mixers, the residual block and the language models."""

from mamba_pkg.models.attention import MHA
from mamba_pkg.models.block import Block
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import CausalLMOutput, MambaLMHeadModel, MixerModel, create_block
from mamba_pkg.models.mamba import Mamba
from mamba_pkg.models.mamba2 import Mamba2
from mamba_pkg.models.mlp import GatedMLP
from mamba_pkg.models.norm import RMSNorm, RMSNormGated

__all__ = [
    "MHA", "Block", "MambaConfig", "CausalLMOutput", "MambaLMHeadModel", "MixerModel", "create_block",
    "Mamba", "Mamba2", "GatedMLP", "RMSNorm", "RMSNormGated",
]
