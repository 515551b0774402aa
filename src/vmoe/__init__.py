"""vmoe: sparse Vision Mixture-of-Experts (V-MoE) in PyTorch."""

from vmoe.config import ModelConfig, MoEConfig, RouterConfig
from vmoe.interop import load_official, upcycle
from vmoe.models import (
    VisionTransformer,
    build_model,
    create_model,
    flops_per_image,
    gflops_per_image,
    list_models,
    realized_flops_per_image,
    resize_pos_embed,
    routing_overrides,
    set_routing,
)
from vmoe.moe import MoEMlp, TopKRouter, compute_capacity, top_experts_per_item
from vmoe.train.checkpoint import load

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "MoEMlp",
    "ModelConfig",
    "RouterConfig",
    "TopKRouter",
    "VisionTransformer",
    "__version__",
    "build_model",
    "compute_capacity",
    "create_model",
    "flops_per_image",
    "gflops_per_image",
    "list_models",
    "load",
    "load_official",
    "realized_flops_per_image",
    "resize_pos_embed",
    "routing_overrides",
    "set_routing",
    "top_experts_per_item",
    "upcycle",
]
