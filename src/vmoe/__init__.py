"""vmoe: sparse Vision Mixture-of-Experts (V-MoE) in PyTorch."""

from vmoe.config import MoEConfig, RouterConfig
from vmoe.moe import MoEMlp, TopKRouter, compute_capacity, top_experts_per_item

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "MoEMlp",
    "RouterConfig",
    "TopKRouter",
    "__version__",
    "compute_capacity",
    "top_experts_per_item",
]
