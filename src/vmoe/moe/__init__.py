"""The MoE core: routing math, router, dispatch backends, experts and the MoE layer."""

from vmoe.moe.dispatch import Dispatcher, EinsumDispatcher, IndexDispatcher, make_dispatcher
from vmoe.moe.experts import Experts, Slab, expert_slabs
from vmoe.moe.layer import ExpertComm, MoEMlp, routing_chunks
from vmoe.moe.router import RouterOutput, TopKRouter, effective_capacity
from vmoe.moe.routing import (
    Routing,
    compute_capacity,
    gshard_loss,
    importance_loss,
    load_loss,
    top_experts_per_item,
    z_loss,
)

__all__ = [
    "Dispatcher",
    "EinsumDispatcher",
    "ExpertComm",
    "Experts",
    "IndexDispatcher",
    "MoEMlp",
    "RouterOutput",
    "Routing",
    "Slab",
    "TopKRouter",
    "compute_capacity",
    "effective_capacity",
    "expert_slabs",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "make_dispatcher",
    "routing_chunks",
    "top_experts_per_item",
    "z_loss",
]
