"""The V-MoE MLP layer: group -> route -> dispatch -> experts -> combine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from vmoe import rng
from vmoe.config import MoEConfig
from vmoe.layers import Activation, compute_dtype
from vmoe.moe.dispatch import Dispatcher, IndexDispatcher, make_dispatcher
from vmoe.moe.experts import Experts
from vmoe.moe.router import RouterOutput, TopKRouter
from vmoe.moe.routing import Routing

__all__ = ["ExpertComm", "MoEMlp", "routing_chunks"]


class ExpertComm(Protocol):
    """Moves capacity buffers to the ranks that hold the experts, and back (expert parallelism).

    ``dispatch`` takes the (E, R, D) buffers of this rank and returns the (E_local, R', D)
    buffers of the experts held here (with matching global row ids when given); ``combine``
    is its inverse. Installed on a layer by :mod:`vmoe.parallel`; model code never imports it.
    """

    def dispatch(
        self, buffers: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def combine(self, outputs: torch.Tensor) -> torch.Tensor: ...


def routing_chunks(batch: int, group_size: int) -> list[tuple[int, int, int]]:
    """Split ``batch`` images into routing groups of ``group_size`` images.

    Returns ``(first_image, num_groups, images_per_group)`` chunks: the full groups, then one
    smaller group of the remaining images, if any.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 image, got {group_size}")
    if batch < 1:
        raise ValueError(f"an MoE layer needs a batch of >= 1 image, got {batch}")
    g = min(group_size, batch)
    full = batch // g
    chunks = [(0, full, g)]
    if batch - full * g:
        chunks.append((full * g, 1, batch - full * g))
    return chunks


class MoEMlp(nn.Module):
    """A Mixture-of-Experts MLP that replaces a ViT block's MLP (paper Sec. 2).

    Steps of :meth:`forward` for x (B, T, D):
      1. Routing groups: consecutive ``group_size`` images (their B*T tokens) form a group of
         S = group_size * T tokens; a last partial group is routed on its own.
      2. Route each group (:class:`TopKRouter`): fp32 logits, training noise, softmax, top-k,
         capacity buffers (vanilla or BPR), auxiliary losses per group.
      3. Dispatch tokens into (E, R, D) capacity buffers (backend ``cfg.dispatch``), or, when
         the experts run packed (``cfg.experts_impl``; the CPU default), into (F, D) rows: only
         the F filled slots, in the experts' slabs (same tokens, same slots); for ``grouped_mm``, into a
         fixed ``min(E*R, N*K)`` rows with the filled ones first and device offsets (no sync).
      4. Experts: the expert MLPs over the buffers or rows (:class:`Experts`; optionally via an
         expert-parallel all-to-all, ``self.expert_comm``, which always moves full buffers).
      5. Combine: ``y[token] = sum over kept assignments of gate * expert_e(x[token])``; a token
         with every assignment dropped gets 0 (the residual carries it).

    Returns ``(y (B, T, D), aux)`` with ``aux["aux_loss"]`` the weighted auxiliary loss, mean over
    groups, and detached metrics (see :meth:`forward`).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        cfg: MoEConfig,
        *,
        act: Activation = "gelu_tanh",
        dropout: float = 0.0,
        stream: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(dim, cfg.router, stream=stream)
        self.experts = Experts(
            cfg.router.num_experts,
            dim,
            hidden_dim,
            act=act,
            dropout=dropout,
            init=cfg.expert_init,
            stream=stream + 1,
            impl=cfg.experts_impl,
        )
        self.expert_comm: ExpertComm | None = None
        self.fused = True
        self.record_routing = False
        self.last_routing: dict[str, torch.Tensor] | None = None

    @property
    def fused(self) -> bool:
        """Fused Triton kernels on CUDA (:mod:`vmoe.moe.fused`): the experts' first bias + activation
        (sets ``Experts.fused_bias_act``) and the combine's backward. Stock torch ops when False, and
        always off CUDA. Default True."""
        return getattr(self, "_fused", True)  # (a layer pickled before the switch existed: on)

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        self.experts.fused_bias_act = self._fused

    @property
    def num_experts(self) -> int:
        return self.cfg.router.num_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, T, D) -> ((B, T, D), aux).

        ``aux`` holds ``aux_loss`` (scalar, differentiable) and detached metrics:
        ``importance_loss``, ``load_loss`` (means over groups), ``dropped_fraction`` (share of the
        B*T*k assignments dropped), ``expert_load`` (E,) (share of kept assignments per expert),
        ``assignments_per_image`` (B,) (kept (token, expert) pairs, i.e. expert MLP rows run per
        image), ``selected_per_image`` (int, ``T * k``: the assignments each image asks for),
        ``tokens_per_image`` (B,) (tokens with at least one kept assignment), ``capacity`` (of the
        full groups).
        """
        if x.dim() != 3:
            raise ValueError(f"MoE layer input must be (B, T, D), got {tuple(x.shape)}")
        B, T, D = x.shape
        x_flat = x.reshape(B * T, D)
        routings: list[Routing] = []
        finishers: list[Callable[[], RouterOutput]] = []
        for first, groups, images in routing_chunks(B, self.cfg.group_size):
            xc = x_flat[first * T : (first + groups * images) * T].view(groups, images * T, D)
            routing, finish = self.router.route(xc, first_image=first, tokens_per_image=T)
            routings.append(routing)
            finishers.append(finish)
        # The filled rows alone (no empty capacity slots) when the experts want them and run here.
        buffer_rows = self.num_experts * sum(r.expert_index.shape[0] * r.capacity for r in routings)
        fill = sum(r.expert_index.numel() for r in routings) / buffer_rows  # assignments per buffer row
        here = self.expert_comm is None and self.cfg.dispatch == "index"
        impl = self.experts.resolved_impl(x, fill)
        grouped = here and impl == "grouped_mm"  # front-packed rows of a fixed count, device offsets
        packed = here and impl == "packed"
        # bmm over buffers whose tokens carry a ones column (b1 rides in the matmul), when asked for.
        augmented = here and impl == "bmm" and self.experts.bias_in_matmul
        dispatcher: Dispatcher
        if grouped or packed:
            width = self.experts.slab_width(x.device) if packed else 1
            # Without gradients, pairs of similar counts (fewer leftover rows; strided weights are free to read).
            by_count = width == 2 and not torch.is_grad_enabled()
            dispatcher = IndexDispatcher(
                routings, packed=True, static=grouped, slab_width=width, slab_by_count=by_count
            )
        else:
            dispatcher = make_dispatcher(self.cfg.dispatch, routings)
        if isinstance(dispatcher, IndexDispatcher):
            dispatcher.fused = self.fused
        # Cast before the gather (N rows) rather than in the experts (k*C*N rows); same values.
        tokens = x_flat.to(compute_dtype(x_flat))
        if grouped or augmented:
            tokens = self.experts.grouped_rows_input(tokens)  # (N, D + 8): a ones column carries b1
        buffers = dispatcher.dispatch(tokens)  # (E, R, D) (D + 8 augmented), or (rows, D) packed
        rows = None
        row_experts = dispatcher.row_experts() if grouped else None  # (rows,): b2 by row, dropout ids
        offset = rng.image_offset() if self.training and self.experts.p > 0 else None
        if offset is not None:
            # Global id of each (token, expert) assignment: layout-independent dropout masks.
            if isinstance(dispatcher, IndexDispatcher):
                tok = dispatcher.row_tokens()
                expert = row_experts if row_experts is not None else dispatcher.row_experts()
            else:
                tok = dispatcher.buffer_tokens()  # (E, R), -1 for empty slots
                expert = torch.arange(self.num_experts, device=x.device).view(-1, 1)
            gtok = tok + offset * T
            rows = torch.where(tok >= 0, gtok * self.num_experts + expert, torch.full_like(tok, -1))
            if not (packed or grouped):
                rows = rows.view(self.num_experts, -1)
        if grouped:
            assert isinstance(dispatcher, IndexDispatcher) and dispatcher.offsets is not None
            assert row_experts is not None
            y = self.experts.forward_grouped_rows(buffers, dispatcher.offsets, row_experts, rows)
        elif packed:
            assert isinstance(dispatcher, IndexDispatcher) and dispatcher.counts is not None
            y = self.experts.forward_rows(buffers, dispatcher.counts, rows, dispatcher.slabs)
        elif augmented:
            y = self.experts.forward_augmented(buffers, rows)
        elif self.expert_comm is not None:
            local, local_rows = self.expert_comm.dispatch(buffers, rows)
            y = self.expert_comm.combine(self.experts(local, local_rows))
        else:
            y = self.experts(buffers, rows)
        # The router's losses now: on a GPU their small kernels queue behind the experts' matmuls.
        outs = [finish() for finish in finishers]
        out = dispatcher.combine(y).view(B, T, D)
        return out, self._aux(outs, B, T)

    def _aux(self, outs: list[RouterOutput], B: int, T: int) -> dict[str, Any]:
        E = self.num_experts
        aux_loss = torch.cat([o.aux_loss for o in outs]).mean()
        kept = torch.cat([o.routing.kept.reshape(-1, o.routing.num_selected) for o in outs])  # (N, K)
        expert = torch.cat([o.routing.expert_index.reshape(-1, o.routing.num_selected) for o in outs])
        with torch.no_grad():
            keptf = kept.float()
            load = torch.zeros(E, device=kept.device).scatter_add_(0, expert.reshape(-1), keptf.reshape(-1))
            metrics: dict[str, Any] = {
                "aux_loss": aux_loss,
                "importance_loss": torch.cat([o.metrics["importance_loss"] for o in outs]).mean(),
                "load_loss": torch.cat([o.metrics["load_loss"] for o in outs]).mean(),
                "dropped_fraction": 1.0 - keptf.mean(),
                "expert_load": load / load.sum().clamp(min=1.0),
                "assignments_per_image": keptf.sum(-1).view(B, T).sum(-1),
                "selected_per_image": T * kept.shape[-1],
                "tokens_per_image": kept.any(-1).float().view(B, T).sum(-1),
                "capacity": outs[0].routing.capacity,
            }
            if self.record_routing:
                gates = torch.cat([o.gates.reshape(-1, E) for o in outs]).view(B, T, E)
                self.last_routing = {
                    "expert_index": expert.view(B, T, -1),
                    "kept": kept.view(B, T, -1),
                    "gates": gates.detach(),
                }
        metrics["aux_loss"] = aux_loss
        return metrics

    def extra_repr(self) -> str:
        return f"group_size={self.cfg.group_size}, dispatch={self.cfg.dispatch}"
