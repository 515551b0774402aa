"""ViT / V-MoE models: backbone, registry, test-time routing control, compute accounting."""

from vmoe.config import ModelConfig, moe_layer_indices
from vmoe.models.flops import (
    expert_rows_per_image,
    flops_breakdown,
    flops_per_image,
    gflops_per_image,
    realized_flops_per_image,
    realized_gflops_per_image,
)
from vmoe.models.registry import create_model, get_config, list_models, override_keys, register_model
from vmoe.models.routing import UNSET, routing_overrides, set_routing
from vmoe.models.vit import (
    Attention,
    Block,
    MAPHead,
    PatchEmbed,
    VisionTransformer,
    build_model,
    resize_pos_embed,
)

__all__ = [
    "UNSET",
    "Attention",
    "Block",
    "MAPHead",
    "ModelConfig",
    "PatchEmbed",
    "VisionTransformer",
    "build_model",
    "create_model",
    "expert_rows_per_image",
    "flops_breakdown",
    "flops_per_image",
    "get_config",
    "gflops_per_image",
    "list_models",
    "moe_layer_indices",
    "override_keys",
    "realized_flops_per_image",
    "realized_gflops_per_image",
    "register_model",
    "resize_pos_embed",
    "routing_overrides",
    "set_routing",
]
