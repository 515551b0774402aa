"""Speed of one V-MoE layer against its floor and against a per-expert loop (see shared PERF.md).

The floor is one dense MLP (Linear -> tanh-GELU -> Linear) over ``k * C * N`` rows: the expert matmuls
an MoE layer cannot avoid. Every row of the table is timed in the same run, interleaved (one call of
each variant per round, median over rounds), and reported as a ratio to that floor.

    python benchmarks/moe_layer.py --device cpu --json out.json                 # V-MoE-Ti layer, E=8
    python benchmarks/moe_layer.py --device cpu --json out.json --num-experts 32
    python benchmarks/moe_layer.py --device cpu --small --json out.json          # quick self-test
    PYTHONPATH=src python benchmarks/moe_layer.py --device cuda --json out.json   # B/16 shapes, E=8 and 32

Rows (``*_fwd``: forward only, eval mode, no grad; their ratio is to ``floor_fwd``):
    floor        dense MLP over k*C*N rows, fwd+bwd
    vmoe         MoEMlp, index dispatch (the default fast path), fwd+bwd incl. router and aux loss
    vmoe_einsum  MoEMlp, one-hot einsum dispatch (the reference backend)
    vmoe_bpr     MoEMlp, index dispatch, Batch Prioritized Routing on
    vmoe_<impl>  MoEMlp with the experts' matmuls forced to one implementation (``--impls``; on CUDA
                 by default loop, packed, grouped_mm, bmm_ones and bmm_unfused next to auto's
                 choice, bmm). On CUDA the layer runs fused Triton kernels (``MoEMlp.fused``): bmm's
                 first bias and activation one kernel each way, and every row's combine backward;
                 bmm_unfused: bmm with stock ops only (baddbmm, the activation, index_select and
                 row dots). bmm_ones: bmm with the first bias riding in the
                 matmul as a ones column of the tokens (``Experts.bias_in_matmul``)
    loop         the same router, then a per-expert Python loop: gather by mask, MLP, scatter
    vmoe_experts / vmoe_routing   with --breakdown: where vmoe's time goes. Its experts alone, on the rows
                 the layer gives them (same counts, slabs or buffers), and the layer with identity experts
                 (router with its noise and aux losses, dispatch, combine); their sum is about vmoe
    fairscale / tutel / tutel_bpr   peers, only when importable (never null):
                 ``TUTEL_SRC=<microsoft/tutel checkout> bash scripts/get_peers.sh`` builds both into
                 .peers/, then run with PYTHONPATH=.peers (Tutel: top-2, gate noise 1/E, fp32 gate,
                 the same capacity factor; BPR off / on)

First the fast path, and each ``vmoe_<impl>`` variant, is checked against a float32 reference
(einsum backend, no autocast): relative error <= 1e-2 in the output and every gradient, every output
row of a token with a kept assignment written (nonzero), and inference (no grad) equal to the
training-mode forward. On CUDA at the timed shapes, on the CPU at small ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vmoe.config import MoEConfig, RouterConfig
from vmoe.layers import compute_dtype
from vmoe.moe import MoEMlp, fused, routing_chunks

# ----------------------------------------------------------------------------------------- shapes


@dataclass
class Shapes:
    batch: int
    tokens: int
    dim: int
    hidden: int
    num_experts: int
    k: int = 2
    capacity_factor: float | None = 1.05  # None: dropless
    group_size: int = 8

    @property
    def num_tokens(self) -> int:
        return self.batch * self.tokens

    @property
    def floor_rows(self) -> int:
        """k * C * N, the rows of expert work at the nominal capacity factor (PERF.md); k * N dropless."""
        return round(self.k * (self.capacity_factor or 1.0) * self.num_tokens)


def make_layer(s: Shapes, *, dispatch: str = "index", bpr: bool = False, impl: str = "auto") -> MoEMlp:
    """One layer at shapes ``s``; ``impl`` an experts impl, or ``bmm_ones`` (``bmm`` with
    ``Experts.bias_in_matmul``: the first bias riding in the matmul), or ``bmm_unfused`` (``bmm``
    with ``MoEMlp.fused`` off: no Triton kernels)."""
    cfg = MoEConfig(
        router=RouterConfig(
            num_experts=s.num_experts, num_selected=s.k, capacity_factor=s.capacity_factor, batch_priority=bpr
        ),
        group_size=s.group_size,
        dispatch=dispatch,
        expert_init="independent",
        experts_impl="bmm" if impl in ("bmm_ones", "bmm_unfused") else impl,
    )
    layer = MoEMlp(s.dim, s.hidden, cfg)
    layer.experts.bias_in_matmul = impl == "bmm_ones"
    layer.fused = impl != "bmm_unfused"
    return layer


def fused_status(device: torch.device) -> str:
    """Whether the layers ran the fused Triton kernels here (``MoEMlp.fused``), or why not."""
    if fused._disabled is not None:
        return f"off after a failure: {fused._disabled}"
    probe = torch.empty(1, 1, 8, device=device, dtype=torch.bfloat16)
    return (
        "on (Triton)"
        if fused.fused_bias_act_usable(probe, "gelu_tanh")
        else "off (stock ops: no CUDA or no Triton)"
    )


def buffer_rows(layer: MoEMlp, s: Shapes) -> int:
    """E * R: the rows the experts actually run (capacity rounded up to a multiple of 4)."""
    from vmoe.moe import effective_capacity

    rows = 0
    for _, groups, images in routing_chunks(s.batch, s.group_size):
        rows += groups * effective_capacity(images * s.tokens, layer.cfg.router, warn=False)
    return rows * s.num_experts


# --------------------------------------------------------------------------------------- variants


class DenseMlp(torch.nn.Module):
    """The floor: Linear(D, M) -> tanh-GELU -> Linear(M, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def loop_forward(layer: MoEMlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What most people write: route, then for each expert gather its tokens by mask, MLP, scatter."""
    B, T, D = x.shape
    xf = x.reshape(B * T, D)
    outs = []
    for first, groups, images in routing_chunks(B, layer.cfg.group_size):
        xc = xf[first * T : (first + groups * images) * T].view(groups, images * T, D)
        outs.append(layer.router(xc, first_image=first, tokens_per_image=T))
    K = layer.cfg.router.num_selected
    expert = torch.cat([o.routing.expert_index.reshape(-1, K) for o in outs])  # (N, K)
    kept = torch.cat([o.routing.kept.reshape(-1, K) for o in outs])
    weights = torch.cat([o.routing.weights.reshape(-1, K) for o in outs])
    ex = layer.experts
    # unbind = separate per-expert weights, as a ModuleList of experts would have (no E-sized zero grads)
    w1, b1, w2, b2 = (t.unbind(0) for t in (ex.w1, ex.b1, ex.w2, ex.b2))
    y = torch.zeros(xf.shape, dtype=compute_dtype(xf), device=xf.device)
    for e in range(layer.num_experts):
        tok, kk = torch.nonzero((expert == e) & kept, as_tuple=True)
        h = F.gelu(torch.addmm(b1[e], xf[tok], w1[e]), approximate="tanh")
        o = torch.addmm(b2[e], h, w2[e])
        y = y.index_add(0, tok, o * weights[tok, kk].unsqueeze(-1).to(o.dtype))
    aux = torch.cat([o.aux_loss for o in outs]).mean()
    return y.view(B, T, D), aux


def _peer_step(layer: torch.nn.Module) -> Callable[[torch.Tensor], Any]:
    """A peer layer as ``x -> (y, aux loss)``, with the module attached for its parameters."""

    def run(x: torch.Tensor) -> Any:
        return layer(x), layer.l_aux

    run.module = layer  # type: ignore[attr-defined]
    return run


def _peer_fairscale(s: Shapes, device: torch.device) -> Callable[[torch.Tensor], Any] | None:
    try:
        import torch.distributed as dist
        from fairscale.nn import MOELayer, Top2Gate
    except Exception:
        return None
    try:
        if not dist.is_initialized():
            import tempfile

            fd, store = tempfile.mkstemp()
            os.close(fd)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        gate = Top2Gate(s.dim, s.num_experts)
        experts = torch.nn.ModuleList(DenseMlp(s.dim, s.hidden) for _ in range(s.num_experts))
        layer = MOELayer(gate, experts).to(device)
    except Exception as exc:  # a peer that cannot be built is left out, never reported as null
        print(f"fairscale left out: {exc!r}", file=sys.stderr)
        return None

    return _peer_step(layer)


def _peer_tutel(s: Shapes, device: torch.device, bpr: bool) -> Callable[[torch.Tensor], Any] | None:
    if os.environ.get("VMOE_NO_TUTEL"):  # gpu_check.sh: no Tutel build for this machine
        return None
    try:
        from tutel import moe as tutel_moe
    except ModuleNotFoundError as exc:
        if exc.name != "tutel":  # present, but a part of it is missing (e.g. its extension)
            print(f"tutel left out: {exc!r}", file=sys.stderr)
        return None
    except Exception as exc:  # e.g. an extension built for another Python or machine
        print(f"tutel left out: {exc!r}", file=sys.stderr)
        return None
    try:
        layer = tutel_moe.moe_layer(
            gate_type={
                "type": "top",
                "k": s.k,
                "capacity_factor": s.capacity_factor,
                "fp32_gate": True,
                "gate_noise": 1.0 / s.num_experts,
            },
            model_dim=s.dim,
            experts={
                "type": "ffn",
                "count_per_node": s.num_experts,
                "hidden_size_per_expert": s.hidden,
                "activation_fn": lambda t: F.gelu(t, approximate="tanh"),
            },
            batch_prioritized_routing=bpr,
            scan_expert_func=None,
        ).to(device)
    except Exception as exc:
        print(f"tutel left out: {exc!r}", file=sys.stderr)
        return None

    return _peer_step(layer)


# ------------------------------------------------------------------------------------ correctness


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """True float32 matmuls for the reference (TF32 is off by default; make sure)."""
    try:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    except Exception:  # an API torch may drop: then leave the default (off)
        prev = None
    try:
        yield
    finally:
        if prev is not None:
            torch.backends.cuda.matmul.allow_tf32 = prev


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_correctness(
    s: Shapes, device: torch.device, *, amp: bool, tol: float = 1e-2, seed: int = 0, impl: str = "auto"
) -> dict[str, float]:
    """Check the fast path (index dispatch, ``amp``: bf16 autocast) against a float32 einsum reference
    (dropless: the float32 packed rows).

    Same weights, same input, eval-mode routing (no noise, so both route identically up to the
    router's float32 logits, computed outside autocast). Raises ``AssertionError`` on a relative
    error above ``tol`` in the output or any gradient, a non-finite value, or an output row of a
    token with a kept assignment that was never written (all zeros). Returns the errors.
    """
    torch.manual_seed(seed)
    fast = make_layer(s, dispatch="index", impl=impl).to(device).eval()
    # Dropless: the einsum reference would build (G, S, E, S) tensors; the packed rows are exact too.
    ref_kw: dict[str, str] = {"dispatch": "einsum"} if s.capacity_factor is not None else {"impl": "packed"}
    ref = make_layer(s, **ref_kw).to(device).eval()
    ref.fused = False  # the reference runs stock ops only
    ref.load_state_dict(fast.state_dict())
    ref.record_routing = True
    x = torch.randn(s.batch, s.tokens, s.dim, device=device)
    gy = torch.randn_like(x)
    params = [n for n, _ in fast.named_parameters()]

    def grads(layer: MoEMlp, use_amp: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            y, aux = layer(xi)
        inputs = [xi, *layer.parameters()]
        g = torch.autograd.grad(
            (y, aux["aux_loss"]), inputs, (gy.to(y.dtype), torch.ones_like(aux["aux_loss"]))
        )
        return y.detach().float(), [t.float() for t in g]

    with _no_tf32():
        y_ref, g_ref = grads(ref, False)
    y_fast, g_fast = grads(fast, amp)
    assert ref.last_routing is not None
    any_kept = ref.last_routing["kept"].any(-1).reshape(-1)  # (N,)
    yf = y_fast.reshape(-1, s.dim)
    assert torch.isfinite(yf).all(), "non-finite output"
    unwritten = int((yf[any_kept] == 0).all(-1).sum())
    assert unwritten == 0, f"{unwritten} output rows of kept tokens are all zero (never written)"
    assert bool((yf[~any_kept] == 0).all()), "tokens with every assignment dropped must get 0"
    errors = {"y": _rel(y_fast, y_ref)}
    for name, a, b in zip(["x", *params], g_fast, g_ref):
        assert torch.isfinite(a).all(), f"non-finite gradient of {name}"
        errors[f"grad_{name}"] = _rel(a, b)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        y_inf = fast(x)[0].float()  # the inference path (e.g. cuBLASLt GELU epilogue) vs the reference
    errors["y_inference"] = _rel(y_inf, y_ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"fast path ({impl}) differs from the float32 reference by more than {tol}: {bad}"
    return errors


# ------------------------------------------------------------------------------------------ timing


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


# Where an MoE layer's time goes (--breakdown): its experts alone, on the very rows the layer gives them, and
# the layer with its experts replaced by the identity (router, auxiliary losses, dispatch and combine).
_EXPERT_ENTRIES = ("forward", "forward_rows", "forward_grouped_rows", "forward_augmented")


@contextlib.contextmanager
def experts_replaced(
    layer: MoEMlp, make: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Within the block, the layer's outermost call of its experts, whichever entry point the layer uses
    (``Experts.forward``, ``forward_rows``, ``forward_grouped_rows``, ``forward_augmented``), goes to
    ``make(name, original)`` instead; calls nested in it (``forward`` -> ``forward_rows``) are left alone."""
    experts = layer.experts
    depth = [0]
    before = {name: vars(experts)[name] for name in _EXPERT_ENTRIES if name in vars(experts)}

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        replacement = make(name, original)

        def call(*args: Any, **kw: Any) -> Any:
            if depth[0]:
                return original(*args, **kw)
            depth[0] += 1
            try:
                return replacement(*args, **kw)
            finally:
                depth[0] -= 1

        return call

    try:
        for name in _EXPERT_ENTRIES:
            setattr(experts, name, wrap(name, getattr(experts, name)))
        yield
    finally:
        for name in _EXPERT_ENTRIES:  # what the instance held before: the class's method, or an earlier patch
            if name in before:
                setattr(experts, name, before[name])
            elif name in vars(experts):
                delattr(experts, name)


def _identity_experts(layer: MoEMlp) -> Callable[[str, Callable[..., Any]], Callable[..., Any]]:
    """Experts that return their input rows (the first D columns: grouped rows carry a ones column)."""
    dim = layer.experts.w1.shape[1]
    return lambda name, original: lambda inp, *args, **kw: inp[..., :dim]


def experts_alone(
    layer: MoEMlp, x: torch.Tensor, train: bool, autocast: Callable[[], Any]
) -> Callable[[], Any]:
    """A step that runs only ``layer``'s experts (fwd+bwd if ``train``, else inference), on the input
    the layer gave them in one call on ``x`` (same entry point, rows, counts and slabs)."""
    seen: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def record(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            seen.append((name, args, kw))
            return original(*args, **kw)

        return call

    layer.train(train)
    mode = contextlib.nullcontext() if train else torch.inference_mode()
    with experts_replaced(layer, record), mode, autocast():
        layer(x)
    name, args, kw = seen[0]
    method = getattr(layer.experts, name)
    inp, rest = args[0].detach(), args[1:]  # (not args[0]: its graph would be kept alive)
    # Front-packed rows past offsets[-1] are never computed (arbitrary values): return the computed ones.
    n = int(rest[0][-1]) if name == "forward_grouped_rows" else inp.shape[0]
    seen.clear()  # (drop the captured args: args[0] holds its graph)
    del args
    if not train:

        def infer() -> Any:
            layer.eval()
            with torch.inference_mode(), autocast():
                return method(inp, *rest, **kw)[:n]

        return infer
    leaf = inp.clone().requires_grad_(True)
    with autocast():
        g = torch.randn_like(method(leaf, *rest, **kw))

    def step() -> Any:
        layer.train()
        with autocast():
            out = method(leaf, *rest, **kw)
        torch.autograd.grad(out, [leaf, *layer.experts.parameters()], g.to(out.dtype))
        return out[:n]

    return step


def build_variants(
    s: Shapes,
    device: torch.device,
    amp: bool,
    peers: bool,
    impls: tuple[str, ...] = (),
    breakdown: bool = False,
) -> dict[str, Callable[[], Any]]:
    """name -> a zero-argument step (fwd+bwd, or forward only for ``*_fwd``).

    ``impls``: extra rows ``vmoe_<impl>`` with the experts' matmuls forced to that implementation.
    ``breakdown``: rows ``vmoe_experts`` (the default layer's experts alone, on the rows it gives them) and
    ``vmoe_routing`` (that layer with identity experts: router, aux losses, dispatch, combine), and their ``_fwd``.
    """
    torch.manual_seed(0)
    x = torch.randn(s.batch, s.tokens, s.dim, device=device)
    x_req = x.clone().requires_grad_(True)
    gy = torch.randn_like(x)
    floor_mlp = DenseMlp(s.dim, s.hidden).to(device)
    xr = torch.randn(s.floor_rows, s.dim, device=device)
    xr_req = xr.clone().requires_grad_(True)
    gr = torch.randn_like(xr)
    layers = {
        "vmoe": make_layer(s).to(device),
        "vmoe_einsum": make_layer(s, dispatch="einsum").to(device),
        "vmoe_bpr": make_layer(s, bpr=True).to(device),
        **{f"vmoe_{i}": make_layer(s, impl=i).to(device) for i in impls},
    }
    for lay in layers.values():
        lay.load_state_dict(layers["vmoe"].state_dict())
    loop_layer = make_layer(s).to(device)
    loop_layer.load_state_dict(layers["vmoe"].state_dict())

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def train_step(
        module: torch.nn.Module, fwd: Callable[[torch.Tensor], Any], inp: torch.Tensor, g: torch.Tensor
    ):
        def step() -> Any:
            module.train()
            with autocast():
                out = fwd(inp)
            outs, grads = (
                ((out[0], out[1]), (g, torch.ones_like(out[1]))) if isinstance(out, tuple) else ((out,), (g,))
            )
            outs = tuple(o.reshape(-1) if o.dim() == 0 else o for o in outs)
            grads = tuple(
                gg.reshape(-1).to(o.dtype) if gg.dim() == 0 else gg.to(o.dtype) for gg, o in zip(grads, outs)
            )
            torch.autograd.grad(outs, [inp, *module.parameters()], grads, allow_unused=True)
            return out

        return step

    def fwd_step(module: torch.nn.Module, fwd: Callable[[torch.Tensor], Any], inp: torch.Tensor):
        def step() -> Any:
            module.eval()
            with torch.inference_mode(), autocast():
                return fwd(inp)

        return step

    def moe_call(layer: MoEMlp) -> Callable[[torch.Tensor], Any]:
        def call(inp: torch.Tensor) -> Any:
            y, aux = layer(inp)
            return y, aux["aux_loss"]

        return call

    variants: dict[str, Callable[[], Any]] = {}
    variants["floor"] = train_step(floor_mlp, floor_mlp, xr_req, gr)
    for name, lay in layers.items():
        variants[name] = train_step(lay, moe_call(lay), x_req, gy)
    variants["loop"] = train_step(loop_layer, lambda t: loop_forward(loop_layer, t), x_req, gy)
    variants["floor_fwd"] = fwd_step(floor_mlp, floor_mlp, xr)
    for name, lay in layers.items():
        variants[f"{name}_fwd"] = fwd_step(lay, moe_call(lay), x)
    variants["loop_fwd"] = fwd_step(loop_layer, lambda t: loop_forward(loop_layer, t), x)
    if breakdown:
        try:  # informative rows: a failure here leaves them out, not the run
            # Its own random state: the peers built below get the same weights as in a run without it.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                parts = make_layer(s).to(device)
                parts.load_state_dict(layers["vmoe"].state_dict())
                identity = _identity_experts(parts)

                def routing_only(inp: torch.Tensor) -> Any:
                    with experts_replaced(parts, identity):
                        return moe_call(parts)(inp)

                variants["vmoe_experts"] = experts_alone(parts, x_req, True, autocast)
                variants["vmoe_experts_fwd"] = experts_alone(parts, x, False, autocast)
                variants["vmoe_routing"] = train_step(parts, routing_only, x_req, gy)
                variants["vmoe_routing_fwd"] = fwd_step(parts, routing_only, x)
        except Exception as exc:
            print(f"E={s.num_experts} breakdown rows left out: {exc!r}", file=sys.stderr, flush=True)
            for name in ("vmoe_experts", "vmoe_routing", "vmoe_experts_fwd", "vmoe_routing_fwd"):
                variants.pop(name, None)
    if peers and s.capacity_factor is None:
        print("peers left out: dropless routing (their gates have a capacity)", file=sys.stderr)
    elif peers:
        fs = _peer_fairscale(s, device)
        if fs is not None:
            # fairscale's MOELayer takes (tokens, D); fp32 weights under autocast, as it requires.
            variants["fairscale"] = train_step(fs.module, fs, x_req, gy)  # type: ignore[attr-defined]
        for bpr in (False, True):
            tu = _peer_tutel(s, device, bpr)
            if tu is not None:
                variants["tutel_bpr" if bpr else "tutel"] = train_step(tu.module, tu, x_req, gy)  # type: ignore[attr-defined]
    return variants


def saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes of the distinct tensor storages autograd keeps for the backward during ``step`` (its
    activation memory, parameters excluded): the memory an MoE layer adds to a training step."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _heap_alloc() -> None:
    """glibc: no mmap for large blocks and no trimming, so freed memory is reused without page faults."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        raise SystemExit(f"--heap-alloc needs glibc (libc.so.6): {exc}") from None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)):
        raise SystemExit("--heap-alloc: mallopt failed")


def _written(out: Any) -> None:
    y = out[0] if isinstance(out, tuple) else out
    if not bool(torch.isfinite(y).all()) or not bool((y != 0).any()):
        raise AssertionError("a timed variant produced non-finite or all-zero output")


def bench(
    s: Shapes,
    device: torch.device,
    *,
    amp: bool,
    warmup: int,
    repeats: int,
    peers: bool,
    only: set[str] | None = None,
    impls: tuple[str, ...] = (),
    breakdown: bool = False,
) -> list[dict[str, Any]]:
    variants = build_variants(s, device, amp, peers, impls, breakdown)
    if only:
        variants = {n: f for n, f in variants.items() if n in only or n in ("floor", "floor_fwd")}
    timer = Timer(device)
    dropped: list[str] = []

    def drop(name: str, exc: Exception) -> None:
        # A row that cannot run (e.g. out of memory) is left out; the floors and our default must run.
        if name in ("floor", "floor_fwd", "vmoe", "vmoe_fwd"):
            raise exc
        print(f"E={s.num_experts} {name}: left out of the timing: {exc!r}", file=sys.stderr, flush=True)
        del variants[name]
        dropped.append(name)

    def each(call: Callable[[str, Callable[[], Any]], None]) -> None:
        for name, fn in list(variants.items()):
            try:
                call(name, fn)
            except Exception as exc:
                drop(name, exc)
            if dropped and device.type == "cuda":  # after the except: its traceback no longer holds tensors
                dropped.clear()
                torch.cuda.empty_cache()

    for _ in range(max(warmup, 1)):
        each(lambda name, fn: _written(fn()))
    saved: dict[str, int] = {}
    each(lambda name, fn: saved.__setitem__(name, saved_bytes(fn)) if not name.endswith("_fwd") else None)
    times: dict[str, list[float]] = {n: [] for n in variants}
    peak: dict[str, int] = {}
    for r in range(repeats):

        def timed(name: str, fn: Callable[[], Any], first: bool = r == 0) -> None:
            if device.type == "cuda" and first:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times[name].append(timer(fn))
            if device.type == "cuda" and first:
                peak[name] = torch.cuda.max_memory_allocated() - base

        each(timed)  # interleaved: noise hits every row alike
    times = {n: ts for n, ts in times.items() if n in variants}
    rows = []
    for name, ts in times.items():
        floor = "floor_fwd" if name.endswith("_fwd") else "floor"
        ms = statistics.median(ts)
        # Median over rounds of (this row / the floor in the same round): robust to a shared, noisy CPU.
        ratio = statistics.median(t / f for t, f in zip(ts, times[floor]))
        row: dict[str, Any] = {"name": name, "ms": round(ms, 4), "ratio_to_floor": round(ratio, 4)}
        row["num_experts"] = s.num_experts
        if name in saved:  # activation memory kept for the backward (deterministic, any device)
            row["saved_mib"] = round(saved[name] / 2**20, 2)
            row["saved_ratio_to_floor"] = round(saved[name] / max(saved["floor"], 1), 3)
        if peak:
            row["peak_mem_mib"] = round(peak[name] / 2**20, 1)
            row["mem_ratio_to_floor"] = round(peak[name] / max(peak[floor], 1), 3)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    mem = any("peak_mem_mib" in r for r in rows)
    head = (
        f"{'E':>3} {'name':<20} {'ms':>10} {'ratio_to_floor':>15} {'saved MiB':>10} {'saved ratio':>12}"
        + (f" {'peak MiB':>10} {'mem ratio':>10}" if mem else "")
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['num_experts']:>3} {r['name']:<20} {r['ms']:>10.3f} {r['ratio_to_floor']:>15.3f}"
        line += (
            f" {r.get('saved_mib', float('nan')):>10.2f} {r.get('saved_ratio_to_floor', float('nan')):>12.3f}"
        )
        if mem:
            line += f" {r.get('peak_mem_mib', float('nan')):>10.1f} {r.get('mem_ratio_to_floor', float('nan')):>10.3f}"
        print(line)


def print_breakdown(rows: list[dict[str, Any]]) -> None:
    """One line per mode: the experts' and the rest's shares of the floor next to the whole layer's."""
    ratio = {r["name"]: r["ratio_to_floor"] for r in rows}
    for suffix, mode in (("", "fwd+bwd"), ("_fwd", "forward")):
        experts, routing, whole = (
            ratio.get(f"{n}{suffix}") for n in ("vmoe_experts", "vmoe_routing", "vmoe")
        )
        if experts is None or routing is None or whole is None:
            continue
        print(
            f"breakdown E={rows[0]['num_experts']} {mode}: experts {experts:.3f} + router/losses/dispatch/combine "
            f"{routing:.3f} = {experts + routing:.3f} of the floor; the whole layer {whole:.3f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--num-experts", type=int, nargs="+", default=None, help="default: 8 on CPU, 8 32 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (median); default 10 CPU, 20 CUDA")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--small", action="store_true", help="tiny shapes: a quick self-test of the whole script")
    p.add_argument(
        "--shape",
        metavar="B,T,D,M",
        help="other layer shapes: images, tokens per image, model dim, expert hidden dim (e.g. 64,65,384,1536)",
    )
    p.add_argument(
        "--capacity-factor",
        default="1.05",
        help="C of every MoE row and of the floor's k*C*N rows; 'none': dropless (floor k*N rows, no peers)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--no-peers", action="store_true", help="leave out fairscale/tutel even if importable")
    p.add_argument("--only", default=None, help="comma-separated rows to time (floors are always kept)")
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated experts implementations to time as extra rows vmoe_<impl> "
        "(bmm, loop, packed, grouped_mm; bmm_ones: bmm with the first bias in the matmul; bmm_unfused: "
        "bmm without the fused Triton kernels (MoEMlp.fused off); default on CUDA: loop, packed, grouped_mm, "
        "bmm_ones, bmm_unfused; none on CPU)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time where the layer's time goes: vmoe_experts (its experts alone, on the rows the layer "
        "gives them) and vmoe_routing (the layer with identity experts: router, aux losses, dispatch, combine)",
    )
    p.add_argument(
        "--heap-alloc",
        action="store_true",
        help="CPU/glibc: serve large allocations from the heap (mallopt), so no row pays the kernel's "
        "page zeroing for fresh mmap'd memory; measures compute only (see benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--amp", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    amp = a.amp == "bf16" or (a.amp == "auto" and cuda)
    if not cuda:
        torch.set_num_threads(a.threads)
    if a.heap_alloc:
        _heap_alloc()
    if a.impls is not None:
        impls = tuple(i for i in a.impls.split(",") if i)
    elif cuda:
        impls = (
            ("loop", "packed")
            + (("grouped_mm",) if hasattr(torch, "_grouped_mm") else ())
            + ("bmm_ones", "bmm_unfused")
        )
    else:
        impls = ()
    if a.shape:
        try:
            b, t, d, m = (int(v) for v in a.shape.split(","))
            if min(b, t, d, m) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--shape expects four positive integers B,T,D,M, got {a.shape!r}")
        base: dict[str, Any] = dict(batch=b, tokens=t, dim=d, hidden=m)
    elif a.small:
        base = dict(batch=12, tokens=17, dim=32, hidden=64, group_size=8)  # 12 = a full group + a partial one
    elif cuda:
        base = dict(batch=256, tokens=197, dim=768, hidden=3072)  # V-MoE-B/16
    else:
        base = dict(batch=64, tokens=65, dim=192, hidden=768)  # V-MoE-Ti layer
    try:
        capacity = None if a.capacity_factor.lower() in ("none", "dropless") else float(a.capacity_factor)
        if capacity is not None and not capacity > 0:
            raise ValueError
    except ValueError:
        p.error(f"--capacity-factor expects a number > 0 or 'none', got {a.capacity_factor!r}")
    base["capacity_factor"] = capacity
    experts = a.num_experts or ([8, 32] if cuda else [8])
    repeats = a.repeats or (3 if a.small else 20 if cuda else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.small else 5 if cuda else 2)

    config: dict[str, Any] = {
        **base,
        "k": 2,
        "num_experts": experts,
        "dtype": "bf16 autocast" if amp else "fp32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "timing": "cuda events" if cuda else "perf_counter",
        "fwd_rows": "eval mode, inference_mode",
        "floor": "dense MLP (Linear, tanh-GELU, Linear) over round(k*C*N) rows (k*N dropless)",
        "ratio": "median over rounds of row_ms / floor_ms in the same round (rows interleaved)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "heap_alloc": a.heap_alloc,
        "breakdown": a.breakdown,
        "impls": list(impls),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if cuda:
        config["gpu"] = torch.cuda.get_device_name(device)
        config["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    failed: set[str] = set()
    check_failed = False
    for E in experts:
        s = Shapes(num_experts=E, **base)
        config[f"buffer_rows_E{E}"] = buffer_rows(make_layer(s), s)
        config["floor_rows"] = s.floor_rows
        if not a.no_check:
            # On CUDA at the timed shapes; on CPU at small shapes (same code path as far as CPU allows).
            cs = (
                s
                if (cuda or a.small)
                else Shapes(num_experts=E, batch=12, tokens=17, dim=32, hidden=64, capacity_factor=capacity)
            )
            for impl in ("auto", *impls):
                key = f"E{E}" if impl == "auto" else f"E{E}_{impl}"
                try:
                    errs = check_correctness(cs, device, amp=amp, impl=impl)
                except Exception as exc:  # an extra implementation that fails is reported and not timed
                    checks[key] = {"failed": repr(exc)[:500], "shapes": cs.__dict__}
                    if impl == "auto":  # still timed (the table says it failed), exit status 1
                        check_failed = True
                        print(f"E={E} auto: CHECK FAILED: {exc!r}", file=sys.stderr, flush=True)
                        continue
                    failed.add(impl)
                    print(
                        f"E={E} {impl}: FAILED, left out of the timing: {exc!r}", file=sys.stderr, flush=True
                    )
                    continue
                checks[key] = {"max_rel_err": max(errs.values()), "shapes": cs.__dict__}
                print(
                    f"E={E} {impl}: correctness ok, max relative error {max(errs.values()):.2e}", flush=True
                )
        if cuda:
            torch.cuda.empty_cache()
        rows += bench(
            s,
            device,
            amp=amp,
            warmup=warmup,
            repeats=repeats,
            peers=not a.no_peers,
            only=set(a.only.split(",")) if a.only else None,
            impls=tuple(i for i in impls if i not in failed),
            breakdown=a.breakdown,
        )
        config["checks"] = checks
        config["fused_kernels"] = fused_status(device)
        if hasattr(os, "getloadavg"):
            config["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        result = {"device": str(device), "config": config, "results": rows}
        if a.json:  # after every E: a run cut short keeps what it measured
            with open(f"{a.json}.tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(f"{a.json}.tmp", a.json)
        print_table([r for r in rows if r["num_experts"] == E])
        print_breakdown([r for r in rows if r["num_experts"] == E])
    _close_peers()
    if check_failed:
        raise SystemExit("the fast path failed its correctness check (see above and checks in the JSON)")
    return result


def _close_peers() -> None:
    """Tear down the one-process group made for fairscale, so that the interpreter exits cleanly."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    main()
