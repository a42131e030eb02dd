"""nn.Modules that own parameters and call hope_kernels ops: attention (RoPE, SDPA, sliding window),
norms, SwiGLU, causal conv, the Titans memory layer, self-modifying Titans and the CMS chain."""
from hope.layers.attention import Attention
from hope.layers.cms import CMSChain, CMSLevel, CMSLevelState
from hope.layers.conv import CausalDepthwiseConv
from hope.layers.mlp import SwiGLU
from hope.layers.norms import RMSNorm
from hope.layers.self_modifying import SelfModifyingTitans
from hope.layers.titan_memory import TitanMemory

__all__ = ["Attention", "CMSChain", "CMSLevel", "CMSLevelState", "CausalDepthwiseConv", "SwiGLU", "RMSNorm",
           "SelfModifyingTitans", "TitanMemory"]
