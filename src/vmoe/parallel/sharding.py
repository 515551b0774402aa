"""Expert sharding of a model, gradient synchronisation, and full (single-process) checkpoints.

Every :class:`vmoe.moe.layer.MoEMlp` in the model is expert-parallel: EP rank j keeps experts
``[j*E/P, (j+1)*E/P)`` of its ``experts`` (stacked params sliced along dim 0) and exchanges
capacity buffers with :class:`~vmoe.parallel.comm.AllToAllExpertComm`. Every other parameter is
replicated (data parallel over the whole world).

Gradient scaling (the global loss is the mean over ranks of each rank's local mean loss):

- non-expert grads: ``all_reduce_sum(world) / W``;
- expert grads: the all-to-all backward already delivers to the holder of an expert the
  gradient of every rank of its EP group, so ``all_reduce_sum(dp group) / W`` (the DP group
  holds the replicas of the same shard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from vmoe.moe.layer import MoEMlp
from vmoe.parallel.comm import AllToAllExpertComm
from vmoe.parallel.layout import Layout, check_consistent

__all__ = [
    "clip_grad_norm_",
    "expert_parameter_names",
    "full_optimizer_state_dict",
    "full_state_dict",
    "full_tensors",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "parallelize",
    "sync_gradients",
]

_BUCKET_BYTES = 32 * 1024 * 1024


def _moe_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMlp)]


def expert_parameter_names(model: nn.Module) -> dict[str, int]:
    """``{parameter name: E (global number of experts)}`` for every expert parameter of the model."""
    out: dict[str, int] = {}
    for prefix, m in _moe_layers(model):
        for n, _ in m.experts.named_parameters():
            out[f"{prefix}.experts.{n}" if prefix else f"experts.{n}"] = m.num_experts
    return out


def _expert_param_ids(model: nn.Module) -> dict[int, int]:
    return {id(p): m.num_experts for _, m in _moe_layers(model) for p in m.experts.parameters()}


def _bucketed(tensors: Iterable[torch.Tensor], fn: Callable[[torch.Tensor], Any]) -> None:
    """Apply the in-place collective ``fn`` to ``tensors`` through flat buffers of ~32 MiB.

    Tensors are grouped by (dtype, device) in order; every rank must pass the same list shapes.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        buckets = groups.setdefault(key, [[]])
        nbytes = t.numel() * t.element_size()
        if buckets[-1] and sizes.get(key, 0) + nbytes > _BUCKET_BYTES:
            buckets.append([])
            sizes[key] = 0
        buckets[-1].append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    for buckets in groups.values():
        for bucket in buckets:
            flat = _flatten_dense_tensors(bucket)
            fn(flat)
            for t, f in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(f)


def parallelize(model: nn.Module, layout: Layout) -> nn.Module:
    """Shard the experts of every MoE layer over the EP group and install the all-to-all.

    Moves the model to ``layout.device``, broadcasts every parameter and buffer from rank 0 (so
    all ranks start from rank 0's model, experts included), then keeps only this rank's expert
    shard (``experts.num_experts`` becomes E/P) and sets ``expert_comm``. Call it once, before
    building the optimizer. Returns the same (modified) module. Raises ValueError, before any
    communication, when a layer's E is not divisible by ``layout.ep_size``.
    """
    P = layout.ep_size
    layers = _moe_layers(model)
    for name, m in layers:
        if m.num_experts % P:
            raise ValueError(
                f"MoE layer {name or '<root>'}: E={m.num_experts} experts are not divisible by the "
                f"expert-parallel size {P}"
            )
        if m.experts.num_experts != m.num_experts or m.expert_comm is not None:
            raise ValueError(f"MoE layer {name or '<root>'} is already parallelized")
    model.to(layout.device)
    if layout.distributed and layout.world_size > 1:
        with torch.no_grad():
            tensors = [p.data for p in model.parameters()] + [b for b in model.buffers()]
            _bucketed(tensors, lambda flat: dist.broadcast(flat, src=0))
    if P == 1:
        return model
    comms: dict[int, AllToAllExpertComm] = {}
    for _, m in layers:
        E = m.num_experts
        El = E // P
        start = layout.ep_rank * El
        for n, p in list(m.experts.named_parameters(recurse=False)):
            shard = nn.Parameter(p.detach()[start : start + El].clone(), requires_grad=p.requires_grad)
            setattr(m.experts, n, shard)
        m.experts.num_experts = El
        if E not in comms:
            comms[E] = AllToAllExpertComm(layout.ep_group, P, E)
        m.expert_comm = comms[E]
    return model


def sync_gradients(model: nn.Module, layout: Layout) -> None:
    """Average gradients after ``backward`` (see the module docstring for the scaling).

    Parameters whose gradient is None on every rank keep None; a gradient that is None on some
    ranks only counts as zeros there. Costs one tiny all-reduce (and a host sync) for that check,
    then bucketed all-reduces: non-expert grads over the world, expert grads over the DP group.
    """
    if not layout.distributed or layout.world_size == 1:
        return
    W = layout.world_size
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=layout.device)
    dist.all_reduce(has, op=dist.ReduceOp.SUM)
    used = has.gt(0).tolist()
    for p, u in zip(params, used):
        if u and p.grad is None:
            p.grad = torch.zeros_like(p)
    expert_ids = _expert_param_ids(model)
    grads = [p.grad for p, u in zip(params, used) if u]
    if layout.ep_size == 1:  # the DP group is the world
        world, experts = grads, []
    else:
        world = [p.grad for p, u in zip(params, used) if u and id(p) not in expert_ids]
        experts = [p.grad for p, u in zip(params, used) if u and id(p) in expert_ids]

    def reduce(group: Any) -> Callable[[torch.Tensor], None]:
        def fn(flat: torch.Tensor) -> None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(W)

        return fn

    _bucketed(world, reduce(None))
    if experts:
        if layout.dp_size > 1:
            _bucketed(experts, reduce(layout.dp_group))
        else:
            for g in experts:
                g.div_(W)


def _gather_dim0(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Concatenate the EP shards of ``t`` along dim 0, in EP-rank order."""
    src = t.detach().contiguous()
    if src.device != layout.device:
        src = src.to(layout.device)
    parts = [torch.empty_like(src) for _ in range(layout.ep_size)]
    dist.all_gather(parts, src, group=layout.ep_group)
    return torch.cat(parts, dim=0).to(t.device)


def _is_sharded(layout: Layout) -> bool:
    return layout.distributed and layout.ep_size > 1


def full_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], layout: Layout
) -> dict[str, torch.Tensor]:
    """Gather expert entries of a ``{parameter name: tensor}`` dict (e.g. gradients) along dim 0.

    Collective over the EP group: every rank must call it with the same keys. Non-expert entries
    are returned as they are.
    """
    names = expert_parameter_names(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        out[k] = _gather_dim0(v, layout) if _is_sharded(layout) and k in names else v
    return out


def full_state_dict(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """The single-process state dict: expert params gathered along dim 0 (all E experts).

    Collective (all-gather over each EP group; every rank must call it); the result is valid on
    *every* rank, so any rank (by convention rank 0) can save it. Tensors live on the model's
    device; the checkpoint is the same as one written by a single-process run.
    """
    sd = model.state_dict()
    if not _is_sharded(layout):
        return dict(sd)
    return full_tensors(model, dict(sd), layout)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], layout: Layout) -> None:
    """Load a single-process state dict into a (possibly expert-sharded) model; no communication.

    Expert entries (E, ...) are sliced to this rank's shard ``[ep_rank*E/P, (ep_rank+1)*E/P)``;
    ``load_state_dict`` is strict.
    """
    names = expert_parameter_names(model)
    local: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in names and _is_sharded(layout):
            E = names[k]
            if v.shape[0] != E:
                raise ValueError(f"{k}: expected {E} experts along dim 0, got shape {tuple(v.shape)}")
            El = E // layout.ep_size
            v = v[layout.ep_rank * El : (layout.ep_rank + 1) * El]
        local[k] = v
    model.load_state_dict(local, strict=True)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _is_param_shaped(v: Any, shape: torch.Size) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[1:] == shape[1:]


def _same_shape(v: Any, p: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape


def _model_and_optimizer(a: Any, b: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Accept ``(model, optimizer)`` or ``(optimizer, model)``."""
    if isinstance(a, torch.optim.Optimizer) and isinstance(b, nn.Module):
        a, b = b, a
    if not isinstance(a, nn.Module) or not isinstance(b, torch.optim.Optimizer):
        raise TypeError(f"expected (model, optimizer), got ({type(a).__name__}, {type(b).__name__})")
    return a, b


def full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout
) -> dict[str, Any]:
    """``optimizer.state_dict()`` as a single-process run would have it.

    For every expert parameter, each per-parameter state tensor of the parameter's shape (AdamW's
    ``exp_avg``, ``exp_avg_sq``; SGD's ``momentum_buffer``) is gathered along dim 0 like the
    weights; scalars (``step``) are kept. Collective over the EP group; valid on every rank.
    The optimizer must have been built after :func:`parallelize` over the parameters in the same
    order as in the single-process run (e.g. ``model.parameters()``). ``(optimizer, model, layout)``
    is accepted too.
    """
    model, optimizer = _model_and_optimizer(model, optimizer)
    sd = optimizer.state_dict()
    if not _is_sharded(layout):
        return sd
    expert_ids = _expert_param_ids(model)
    params = _optimizer_params(optimizer)
    plan = {}
    for i in sorted(sd["state"]):
        p = params[i]
        if id(p) in expert_ids:
            keys = sorted(k for k, v in sd["state"][i].items() if _same_shape(v, p))
            plan[str(i)] = [[k, list(sd["state"][i][k].shape)] for k in keys]
    check_consistent({"expert_optimizer_state": plan}, layout)
    state: dict[int, dict[str, Any]] = {}
    for i, s in sd["state"].items():
        p = params[i]
        if id(p) in expert_ids:
            s = {k: _gather_dim0(v, layout) if _same_shape(v, p) else v for k, v in s.items()}
        state[i] = s
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], layout: Layout
) -> None:
    """Load a single-process optimizer state dict (see :func:`full_optimizer_state_dict`) into the
    optimizer of a (possibly sharded) model: expert state tensors are sliced to this rank's shard.
    No communication. ``(optimizer, model, state, layout)`` is accepted too."""
    model, optimizer = _model_and_optimizer(model, optimizer)
    if not _is_sharded(layout):
        optimizer.load_state_dict(state)
        return
    expert_ids = _expert_param_ids(model)
    params = _optimizer_params(optimizer)
    local: dict[int, dict[str, Any]] = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        if id(p) in expert_ids:
            E = expert_ids[id(p)]
            El = E // layout.ep_size
            lo = layout.ep_rank * El
            new = {}
            for k, v in s.items():
                if _is_param_shaped(v, p.shape):
                    if v.shape[0] != E:
                        raise ValueError(
                            f"optimizer state {i}.{k}: expected {E} experts along dim 0, got {tuple(v.shape)}"
                        )
                    v = v[lo : lo + El]
                new[k] = v
            s = new
        local[i] = s
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


def clip_grad_norm_(model: nn.Module, max_norm: float, layout: Layout) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) over the *global* model, after :func:`sync_gradients`.

    Non-expert gradients are equal on every rank; each rank holds only its expert shard, so the
    squared norm of the expert gradients is summed over the EP group. Returns the total norm
    (a 0-dim tensor, the same on every rank). Collective when the experts are sharded.
    """
    expert_ids = _expert_param_ids(model)
    params = [p for p in model.parameters() if p.grad is not None]
    if not _is_sharded(layout):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    device = layout.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    sq_dense = sum(
        (p.grad.detach().float().pow(2).sum().to(device) for p in params if id(p) not in expert_ids), zero
    )
    sq_expert = sum(
        (p.grad.detach().float().pow(2).sum().to(device) for p in params if id(p) in expert_ids), zero
    )
    sq_expert = sq_expert.clone()
    dist.all_reduce(sq_expert, op=dist.ReduceOp.SUM, group=layout.ep_group)
    total = (sq_dense + sq_expert).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
