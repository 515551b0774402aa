"""Tests of the ViT / V-MoE model family: registry, counts, forward, RNG, routing knobs, FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vmoe
from vmoe import rng
from vmoe.config import ModelConfig, moe_layer_indices
from vmoe.models import (
    flops_breakdown,
    flops_per_image,
    get_config,
    realized_flops_per_image,
    resize_pos_embed,
    routing_overrides,
    set_routing,
)
from vmoe.moe import MoEMlp

# Tiny groups (16px images, batches of 1-4) round capacities far from C: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:capacity rounding:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models run faster on one thread, and do not oversubscribe a shared 2-core box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _randomize_head(model: torch.nn.Module, seed: int = 0) -> None:
    """The head kernel starts at zero (so no gradient reaches the body): give it random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.1)


def _images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- parameter counts
def _analytic_count(cfg: ModelConfig) -> int:
    """Parameters of a config, written out independently of the model code."""
    D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    (ph, pw), (gh, gw) = cfg.patch_hw, cfg.grid
    prefix = 1 if cfg.classifier == "token" else 0
    n = cfg.in_chans * ph * pw * D + D  # patch embedding conv
    n += prefix * D + (prefix + gh * gw) * D  # class token, position embedding
    attn = 4 * D * D + 4 * D  # q, k, v, out with biases
    mlp = 2 * D * M + M + D
    moe_blocks = cfg.moe_block_indices
    for i in range(L):
        n += 2 * 2 * D + attn  # two LayerNorms
        if i in moe_blocks:
            E = cfg.moe.router.num_experts
            n += E * D + E * mlp  # bias-free router + E experts
        else:
            n += mlp
    n += 2 * D  # encoder_norm
    if cfg.classifier == "map":
        n += D + attn + 2 * D + mlp  # probe, attention, LayerNorm, MLP
    F = D
    if cfg.representation_size is not None:
        n += D * cfg.representation_size + cfg.representation_size
        F = cfg.representation_size
    n += F * cfg.num_classes + cfg.num_classes
    return n


# The paper's JFT head: 18291 classes, pre-logits of width D. Millions, rounded to 0.1M.
PAPER_JFT_COUNTS_M = {
    "vmoe_s32": 296.9,
    "vmoe_b32": 980.6,
    "vmoe_b16": 979.0,
    "vmoe_l16": 3446.0,
    "vmoe_h14_last5": 2688.6,
    "vmoe_h14": 7160.8,
    "vit_s32": 36.5,
    "vit_b16": 100.5,
    "vit_l16": 323.1,
    "vit_h14": 655.8,
}
IN1K_COUNTS_M = {"vit_b16": 86.57, "vit_l16": 304.33, "vit_h14": 632.05}  # no pre-logits, 1000 classes


def _meta_count(name: str, **kw) -> tuple[int, torch.nn.Module]:
    with torch.device("meta"):
        model = vmoe.create_model(name, **kw)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize("name", vmoe.list_models())
def test_every_variant_builds_on_meta_with_exact_count(name):
    D = get_config(name).hidden_size
    jft = dict(num_classes=18291, representation_size=D)
    n, model = _meta_count(name, **jft)
    assert n == _analytic_count(model.cfg)
    if name in PAPER_JFT_COUNTS_M:
        assert round(n / 1e6, 1) == PAPER_JFT_COUNTS_M[name]
    if name == "vmoe_15b":
        assert round(n / 1e9, 2) == 14.69
    n1k, model1k = _meta_count(name, num_classes=1000, representation_size=None)
    assert n1k == _analytic_count(model1k.cfg)
    if name in IN1K_COUNTS_M:
        assert round(n1k / 1e6, 2) == IN1K_COUNTS_M[name]


def test_registry_contents_and_placements():
    names = set(vmoe.list_models())
    expected = {
        "vit_s32", "vit_b32", "vit_b16", "vit_l16", "vit_h14", "vit_ti", "vmoe_ti",
        "vmoe_s32", "vmoe_b32", "vmoe_b16", "vmoe_l16", "vmoe_h14_last5", "vmoe_h14", "vmoe_15b",
        "vmoe_s32_last2_e8", "vmoe_b16_e8",
    }  # fmt: skip
    assert expected <= names
    assert vmoe.models.list_models("vit_*") == sorted(n for n in names if n.startswith("vit_"))
    s = get_config("vmoe_s32")
    assert (s.num_layers, s.hidden_size, s.mlp_dim, s.num_heads) == (8, 512, 2048, 8)
    assert s.moe.router.num_experts == 32 and s.moe.router.num_selected == 2 and s.moe.group_size == 8
    assert s.moe_block_indices == (1, 3, 5, 7)
    assert get_config("vmoe_s32_last2_e8").moe_block_indices == (5, 7)
    assert get_config("vmoe_s32_last2_e8").moe.router.num_experts == 8
    assert get_config("vmoe_h14_last5").moe_block_indices == (23, 25, 27, 29, 31)
    assert get_config("vmoe_b16_e8").moe_block_indices == (1, 3, 5, 7, 9, 11)
    b15 = get_config("vmoe_15b")
    assert (b15.num_layers, b15.hidden_size, b15.mlp_dim, b15.num_heads, b15.patch_hw) == (
        48, 1408, 6400, 16, (14, 14),
    )  # fmt: skip
    ti = get_config("vmoe_ti")
    assert (ti.num_layers, ti.hidden_size, ti.mlp_dim, ti.num_heads) == (6, 192, 768, 3)
    assert ti.moe.router.num_experts == 8 and ti.moe_block_indices == (1, 3, 5)
    assert (ti.image_hw, ti.patch_hw, ti.num_classes) == ((32, 32), (4, 4), 10)
    assert get_config("vit_ti").moe is None and get_config("vit_b16").moe_block_indices == ()
    # Placement specs.
    assert moe_layer_indices("every:2", 12) == (1, 3, 5, 7, 9, 11)
    assert moe_layer_indices("every 3", 12) == (2, 5, 8, 11)
    assert moe_layer_indices("last2", 8) == (5, 7)
    assert moe_layer_indices([7, 2], 8) == (2, 7)
    assert moe_layer_indices("none", 8) == ()
    m = vmoe.create_model("vmoe_ti", moe_layers=[0, 4], image_size=16)
    assert [i for i, _ in m.moe_layers()] == [0, 4]
    assert all(isinstance(layer, MoEMlp) for _, layer in m.moe_layers())


def test_overrides_and_init():
    m = vmoe.create_model(
        "vmoe_ti", num_classes=7, image_size=16, patch_size=8, in_chans=1, num_experts=4, num_selected=1,
        capacity_factor=2.0, group_size=3, representation_size=32, classifier="gap", dispatch="einsum",
        dropout=0.1, batch_priority=True, noise_std=0.5, expert_init="independent", act="gelu",
    )  # fmt: skip
    c = m.cfg
    assert (c.num_classes, c.image_hw, c.patch_hw, c.in_chans, c.classifier, c.act) == (
        7, (16, 16), (8, 8), 1, "gap", "gelu",
    )  # fmt: skip
    layer = m.moe_layers()[0][1]
    r = layer.router.cfg
    assert layer.cfg.router is r
    knobs = (r.num_experts, r.num_selected, r.capacity_factor, r.batch_priority, r.noise_std)
    assert knobs == (4, 1, 2.0, True, 0.5)
    assert (layer.cfg.group_size, layer.cfg.dispatch, layer.cfg.expert_init) == (3, "einsum", "independent")
    assert not torch.equal(layer.experts.w1[0], layer.experts.w1[1])  # independent experts
    assert m.cls_token is None and m.pos_embed.shape == (1, 4, 192)
    # Head: zero kernel, bias -log(num_classes); class token zeros; identical experts by default.
    m2 = vmoe.create_model("vmoe_ti")
    assert torch.all(m2.head.weight == 0)
    assert torch.allclose(m2.head.bias, torch.full((10,), -math.log(10)))
    assert torch.all(m2.cls_token == 0)
    w1 = m2.moe_layers()[0][1].experts.w1
    assert torch.equal(w1[0], w1[7])
    assert m2.blocks[0].norm1.eps == 1e-6 and m2.norm.eps == 1e-6
    assert abs(m2.pos_embed.std().item() - 0.02) < 0.002
    assert torch.all(m2.blocks[0].attn.qkv.bias == 0)
    assert get_config("vmoe_b16_e8", num_classes=3).head_bias == -10.0
    # Each layer owns its config objects.
    layers = [layer for _, layer in m2.moe_layers()]
    assert layers[0].cfg is not layers[1].cfg
    # Random streams are unique per module.
    streams = [mod.stream for mod in m2.modules() if hasattr(mod, "stream")]
    assert len(streams) == len(set(streams))


# ----------------------------------------------------------------------------- forward / backward
TINY_CASES = [
    ("vit_ti", {}),
    ("vmoe_ti", {}),
    ("vmoe_ti", {"classifier": "gap"}),
    ("vmoe_ti", {"classifier": "map"}),
    ("vmoe_ti", {"representation_size": 64}),
    ("vmoe_ti", {"dispatch": "einsum"}),
]


@pytest.mark.parametrize(("name", "kw"), TINY_CASES, ids=[f"{n}-{k}" for n, k in TINY_CASES])
def test_tiny_forward_backward(name, kw):
    torch.manual_seed(0)
    size = 32 if not kw else 16  # the variants at 16px (17 tokens) to keep the file fast
    model = vmoe.create_model(name, image_size=size, **kw)
    _randomize_head(model)
    model.train()
    x = _images(4, size)
    logits, aux = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    assert aux["aux_loss"].dim() == 0
    if name == "vit_ti":
        assert aux["layers"] == {} and aux["aux_loss"].item() == 0.0
    else:
        assert sorted(aux["layers"]) == [1, 3, 5]
        total = sum(m["aux_loss"] for m in aux["layers"].values())
        assert torch.allclose(aux["aux_loss"], total)
        assert aux["aux_loss"].item() > 0
        for m in aux["layers"].values():
            assert m["assignments_per_image"].shape == (4,)
    (logits.logsumexp(-1).mean() + aux["aux_loss"]).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_batch_of_one_and_feature_api():
    model = vmoe.create_model("vmoe_ti", image_size=16, representation_size=24).eval()
    _randomize_head(model)
    x = _images(3, 16)
    with torch.no_grad():
        logits, aux = model(x)
        tokens, _ = model.forward_features(x)
        feats = model.pre_logits(x)
        one, _ = model(x[:1])
    assert tokens.shape == (3, 17, 192)
    assert feats.shape == (3, 24) and feats.abs().max() <= 1  # tanh pre-logits
    assert torch.allclose(model.forward_head(tokens), logits)
    assert torch.allclose(model.head(feats), logits, atol=1e-6)
    assert one.shape == (1, 10)
    # Dense: aux_loss is a 0-dim zero tensor.
    dense = vmoe.create_model("vit_ti", image_size=16, num_classes=0).eval()
    out, aux = dense(x)
    assert out.shape == (3, 192) and aux["aux_loss"].shape == () and aux["aux_loss"].item() == 0.0


def test_eval_deterministic_training_noisy():
    torch.manual_seed(0)
    model = vmoe.create_model("vmoe_ti", image_size=16)
    _randomize_head(model)
    x = _images(8, 16)
    model.eval()
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, aux_c = model(x)
        d, _ = model(x)
    assert not torch.equal(c, d)  # router noise (no dropout configured)
    assert aux_c["layers"][1]["load_loss"] > 0  # load loss only with noise


def test_positional_rng_reproducible_and_layout_independent():
    torch.manual_seed(0)
    model = vmoe.create_model("vmoe_ti", image_size=16, dropout=0.1, group_size=2).train()
    _randomize_head(model)
    x = _images(4, 16)
    with torch.no_grad():
        with rng.positional_rng(123):
            a, aux_a = model(x)
        with rng.positional_rng(123):
            b, _ = model(x)
        with rng.positional_rng(124):
            c, _ = model(x)
        with rng.positional_rng(123, image_offset=0):
            h1, aux_h1 = model(x[:2])
        with rng.positional_rng(123, image_offset=2):
            h2, aux_h2 = model(x[2:])
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(torch.cat([h1, h2]), a, atol=1e-5, rtol=1e-5)
    for i in aux_a["layers"]:
        halves = [aux["layers"][i]["assignments_per_image"] for aux in (aux_h1, aux_h2)]
        per_image = torch.cat(halves)
        assert torch.equal(per_image, aux_a["layers"][i]["assignments_per_image"])


def test_compiled_model_trains_like_eager():
    # `vmoe train --compile`: torch.compile of a whole V-MoE in a training step (router noise, expert
    # dropout under the positional RNG, aux losses) gives eager's logits, loss and every gradient. Backend
    # aot_eager: the same dynamo + AOTAutograd tracing as inductor, without its kernel compilation.
    torch.manual_seed(0)
    model = vmoe.create_model("vmoe_ti", image_size=16, dropout=0.1, group_size=2).train()
    _randomize_head(model)
    x, labels = _images(4, 16), torch.tensor([0, 3, 5, 9])
    results = []
    for fn in (torch.compile(model, backend="aot_eager"), model):
        with rng.positional_rng(7):  # router noise and dropout masks by position, as the trainer runs
            logits, aux = fn(x)
        loss = torch.nn.functional.cross_entropy(logits, labels) + aux["aux_loss"]
        loss.backward()
        results.append([logits.detach(), loss.detach(), *(p.grad.clone() for p in model.parameters())])
        model.zero_grad()
    compiled, eager = results
    assert sum(int(bool(g.any())) for g in eager[2:]) > len(eager) // 2  # most gradients are nonzero
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- routing knobs
def _assignments(model, x, block=None):
    with torch.no_grad():
        _, aux = model(x)
    if block is not None:
        return aux["layers"][block]["assignments_per_image"]
    return torch.stack([m["assignments_per_image"] for m in aux["layers"].values()])


def test_routing_overrides_change_and_restore():
    torch.manual_seed(0)
    model = vmoe.create_model("vmoe_ti").eval()
    x = _images(8)
    base = _assignments(model, x)
    originals = [(layer.cfg, layer.router.cfg) for _, layer in model.moe_layers()]
    with routing_overrides(model, capacity_factor=0.5):
        low = _assignments(model, x)
        for _, layer in model.moe_layers():
            assert layer.cfg.router is layer.router.cfg and layer.router.cfg.capacity_factor == 0.5
    with routing_overrides(model, capacity_factor=0.5, batch_priority=True):
        bpr = _assignments(model, x)
    assert (low.sum(-1) < base.sum(-1)).all()  # fewer (token, expert) pairs processed
    # In the first MoE layer (same inputs) BPR keeps as many assignments as vanilla (each expert
    # keeps min(load, capacity)), but other tokens; later layers see different inputs.
    assert torch.equal(bpr[0].sum(), low[0].sum())
    assert not torch.equal(bpr[0], low[0])
    # Restored on exit (same objects), and the outputs are the original ones.
    assert [(layer.cfg, layer.router.cfg) for _, layer in model.moe_layers()] == originals
    assert all(a[0] is layer.cfg for a, (_, layer) in zip(originals, model.moe_layers()))
    assert torch.equal(_assignments(model, x), base)
    # Per-layer override, k = 1, and restoration after an exception.
    with routing_overrides(model, num_selected=1, layers=[3]):
        one = _assignments(model, x)
    assert torch.equal(one[0], base[0])  # block 1 (before block 3) untouched
    assert (one[1] <= 65).all() and one[1].sum() < base[1].sum()
    with pytest.raises(RuntimeError), routing_overrides(model, capacity_factor=0.25):
        raise RuntimeError("boom")
    assert [(layer.cfg, layer.router.cfg) for _, layer in model.moe_layers()] == originals
    # Invalid values / layers raise and change nothing.
    with pytest.raises(ValueError, match="not MoE blocks"):
        set_routing(model, capacity_factor=2.0, layers=[0])
    with pytest.raises(ValueError, match="num_selected"):
        set_routing(model, num_selected=9)
    assert [(layer.cfg, layer.router.cfg) for _, layer in model.moe_layers()] == originals
    # Permanent setting; model.cfg (what checkpoints save) is unchanged.
    set_routing(model, capacity_factor=4.0, priority="sum", layers=[1, 5])
    caps = [layer.router.cfg.capacity_factor for _, layer in model.moe_layers()]
    assert caps == [4.0, 1.05, 4.0] and model.cfg.moe.router.capacity_factor == 1.05
    assert vmoe.set_routing is set_routing and vmoe.routing_overrides is routing_overrides
    # A wrapped model (DDP, a user's module) keeps the block numbering.
    wrapped = torch.nn.Sequential(model)
    set_routing(wrapped, capacity_factor=0.5, layers=[3])
    caps = [layer.router.cfg.capacity_factor for _, layer in model.moe_layers()]
    assert caps == [4.0, 0.5, 4.0]
    with pytest.raises(ValueError, match=r"MoE blocks are \[1, 3, 5\]"):
        set_routing(wrapped, capacity_factor=0.5, layers=[0])


# ----------------------------------------------------------------------------- FLOPs
def test_dense_flops_hand_count():
    # vit_ti: 32px, patch 4 -> P = 64 patches, T = 65 tokens; D 192, M 768, 6 layers, 10 classes.
    patch = 2 * 64 * (3 * 4 * 4) * 192  # = 1_179_648
    qkvo = 2 * 4 * 65 * 192 * 192  # = 19_169_280 per layer
    scores = 2 * 2 * 65 * 65 * 192  # QK^T + AV = 3_244_800 per layer
    mlp = 2 * 2 * 65 * 192 * 768  # = 38_338_560 per layer
    head = 2 * 192 * 10  # = 3_840
    total = patch + 6 * (qkvo + scores + mlp) + head
    assert total == 365_699_328
    model = vmoe.create_model("vit_ti").eval()
    assert flops_per_image(model) == total
    with torch.no_grad():
        _, aux = model(_images(3))
    assert torch.equal(
        realized_flops_per_image(model, aux), torch.full((3,), float(total), dtype=torch.float64)
    )
    assert flops_per_image(model.cfg) == total
    assert vmoe.gflops_per_image(model) == pytest.approx(0.365699328)


def test_map_head_flops_hand_count_and_counter():
    model = vmoe.create_model("vit_ti", classifier="map").eval()
    D, T, M = 192, 64, 768  # a MAP head: no class token, the 64 patches
    # MACs x 2: probe q (D x D), k and v of every token (2 x T x D x D), QK^T and AV (2 x T x D),
    # out (D x D), MLP on the probe row (2 x D x M), classifier (D x 10).
    head = 2 * (D * D + 2 * T * D * D + 2 * T * D + D * D) + 2 * 2 * D * M + 2 * D * 10
    assert flops_breakdown(model)["head"] == head
    from torch.utils.flop_counter import FlopCounterMode

    tokens = torch.randn(1, T, D)
    with FlopCounterMode(display=False) as counter:
        model.forward_head(tokens)
    counted = counter.get_total_flops()
    sdpa = 2 * 2 * T * D  # not counted for the CPU kernel on every torch version
    assert counted in (head, head - sdpa), (counted, head)


def test_moe_flops_static_and_realized():
    model = vmoe.create_model("vmoe_ti").eval()
    # Group of 8 images: S = 520 tokens; capacity ceil(520*2/8*1.05) = 137 -> 140 (multiple of 4).
    # Expert rows per image = E * cap / 8 = 140; per MoE layer 140 * 2 * 2 * 192 * 768 FLOPs.
    parts = flops_breakdown(model)
    assert parts["experts"] == 3 * 140 * 4 * 192 * 768
    assert parts["router"] == 3 * 2 * 65 * 192 * 8
    assert parts["mlp"] == 3 * 4 * 65 * 192 * 768
    dense_total = flops_per_image(vmoe.create_model("vit_ti"))
    assert parts["total"] == dense_total - parts["mlp"] + parts["router"] + parts["experts"]
    # C = 0.5: ceil(65) = 65 -> 68 rows per image; k = 1 with C = 1.05: ceil(68.25) = 69 -> 72.
    half = flops_breakdown(model, capacity_factor=0.5)
    assert half["experts"] == 3 * 68 * 4 * 192 * 768
    assert flops_breakdown(model, num_selected=1)["experts"] == 3 * 72 * 4 * 192 * 768
    with routing_overrides(model, capacity_factor=0.5):
        assert flops_per_image(model) == half["total"]
    assert flops_breakdown(model, capacity_factor=None)["experts"] == 3 * 2 * 65 * 4 * 192 * 768  # dropless
    x = _images(8)
    with torch.no_grad(), routing_overrides(model, capacity_factor=0.5, batch_priority=True):
        _, aux = model(x)
        realized = realized_flops_per_image(model, aux)
    assert realized.shape == (8,) and realized.dtype == torch.float64
    kept = sum(m["assignments_per_image"].double() for m in aux["layers"].values())
    base = half["total"] - half["experts"]
    torch.testing.assert_close(realized, base + kept * 4 * 192 * 768)
    assert realized.mean() <= half["total"] + 1e-3
    assert len(set(realized.tolist())) > 1  # BPR at C < 1: compute differs per image


# ----------------------------------------------------------------------------- position embedding
def test_resize_pos_embed():
    pe = torch.randn(1, 1 + 16, 8)
    same = resize_pos_embed(pe, (4, 4))
    assert torch.equal(same, pe)
    big = resize_pos_embed(pe, (6, 8))
    assert big.shape == (1, 1 + 48, 8)
    assert torch.equal(big[:, :1], pe[:, :1])  # class token kept
    const = torch.ones(1, 9, 8)
    assert torch.allclose(resize_pos_embed(const, 5, num_prefix_tokens=0), torch.ones(1, 25, 8))
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


def test_set_image_size_and_load_at_other_size():
    torch.manual_seed(0)
    src = vmoe.create_model("vmoe_ti").eval()
    _randomize_head(src)
    expected = resize_pos_embed(src.pos_embed.data, (6, 6))
    dst = vmoe.create_model("vmoe_ti", image_size=24).eval()
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.pos_embed.data, expected)
    src.set_image_size(24)
    assert src.cfg.image_hw == (24, 24) and torch.equal(src.pos_embed.data, expected)
    x = _images(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(src(x)[0], dst(x)[0])


# ----------------------------------------------------------------------------- config round trip
def test_config_json_round_trip():
    cfg = get_config(
        "vmoe_ti", moe_layers=[1, 2], capacity_factor=None, image_size=(16, 24), classifier="map"
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    back = ModelConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.moe, vmoe.MoEConfig) and isinstance(back.moe.router, vmoe.RouterConfig)
    torch.manual_seed(0)
    m = vmoe.build_model(back)
    m2 = vmoe.build_model(ModelConfig.from_dict(vmoe.create_model("vit_ti").cfg.to_dict()))
    assert m2.cfg.moe is None and m.cfg == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="unknown RouterConfig keys"):
        ModelConfig.from_dict({**d, "moe": {**d["moe"], "router": {"k": 2}}})


# ----------------------------------------------------------------------------- errors
def test_errors():
    model = vmoe.create_model("vmoe_ti").eval()
    with pytest.raises(ValueError, match=r"1 channels.*in_chans=3"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"16x16.*image_size 32x32.*set_image_size"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="30x30 is also not divisible by patch_size 4x4"):
        model(torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="image_size 30x30 is not divisible by patch_size 4x4"):
        vmoe.create_model("vit_ti", image_size=30)
    with pytest.raises(ValueError, match=r"unknown model 'vmoe_b61'.*vmoe_b16"):
        vmoe.create_model("vmoe_b61")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['colour'\].*num_experts"):
        vmoe.create_model("vmoe_ti", colour=3)
    with pytest.raises(ValueError, match="group_size must be a positive integer, got 0"):
        vmoe.create_model("vmoe_ti", group_size=0)
    with pytest.raises(ValueError, match="group_size must be a positive integer, got -2"):
        vmoe.create_model("vmoe_ti", group_size=-2)
    with pytest.raises(ValueError, match="is dense"):
        vmoe.create_model("vit_ti", capacity_factor=2.0)
    # A placement alone turns a dense model into an MoE one; "none" keeps it dense.
    assert get_config("vit_s32", moe_layers="last:2").moe_block_indices == (5, 7)
    assert get_config("vit_s32", moe_layers="none").moe is None
    for bad in ("every:-2", "last=-2"):
        with pytest.raises(ValueError, match="moe_layers must be"):
            moe_layer_indices(bad, 8)
    with pytest.raises(ValueError, match="batch_priority must be true or false, got 'false'"):
        vmoe.create_model("vmoe_ti", batch_priority="false")
    with pytest.raises(ValueError, match="capacity_factor must be a number > 0"):
        vmoe.create_model("vmoe_ti", capacity_factor=True)
    with pytest.raises(
        ValueError, match=r"num_experts must be a positive integer, got 8\.0 \(a float; expected an integer\)"
    ):
        vmoe.create_model("vmoe_ti", num_experts=8.0)
    with pytest.raises(ValueError, match="moe_layers"):
        vmoe.create_model("vmoe_ti", moe_layers="first:2")
    with pytest.raises(ValueError, match=r"block index 6 not in \[0, 6\)"):
        vmoe.create_model("vmoe_ti", moe_layers=[1, 6])
    with pytest.raises(ValueError, match="num_heads"):
        vmoe.create_model("vit_ti", num_heads=5)
    with pytest.raises(ValueError, match="classifier"):
        vmoe.create_model("vit_ti", classifier="cls")
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(3, 32, 32))
    # A dense model gains MoE layers when num_experts or moe_layers is given.
    upcycled = vmoe.create_model("vit_ti", num_experts=4, moe_layers="last:1")
    assert [i for i, _ in upcycled.moe_layers()] == [5]


def test_experts_impl_override_same_function():
    # experts_impl changes how the expert matmuls run, never what they compute.
    torch.manual_seed(0)
    ref = (
        vmoe.create_model("vmoe_ti", image_size=16, patch_size=8, num_classes=5, experts_impl="bmm")
        .double()
        .eval()
    )
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    want = ref.forward_features(x)[0]
    assert want.std() > 0.1
    for impl in ("loop", "packed"):
        other = (
            vmoe.create_model("vmoe_ti", image_size=16, patch_size=8, num_classes=5, experts_impl=impl)
            .double()
            .eval()
        )
        other.load_state_dict(ref.state_dict())
        assert {layer.experts.impl for _, layer in other.moe_layers()} == {impl}
        torch.testing.assert_close(other.forward_features(x)[0], want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="experts_impl must be one of"):
        vmoe.create_model("vmoe_ti", experts_impl="fastest")
