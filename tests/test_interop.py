"""Interop: sparse upcycling (vmoe.interop.upcycle)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import vmoe
from vmoe.interop import upcycle, upcycle_checkpoint
from vmoe.train.checkpoint import save_checkpoint

# Most tests upcycle from a bare state dict on purpose; test_act_mismatch_warns checks the warning itself.
pytestmark = pytest.mark.filterwarnings("ignore:the dense weights do not say which activation:UserWarning")

TINY = dict(num_layers=4, hidden_size=32, mlp_dim=64, num_heads=2, image_size=16, patch_size=4, num_classes=5)


def _dense(**kw):
    torch.manual_seed(0)
    m = vmoe.create_model("vit_ti", **{**TINY, **kw}).double()
    with torch.no_grad():  # non-trivial head / biases so the logits comparison means something
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _moe(**kw):
    torch.manual_seed(1)
    return vmoe.create_model("vmoe_ti", **{**TINY, "num_experts": 4, **kw}).double().eval()


def _images(n=3, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _assert_upcycled(dense, moe):
    dsd, msd = dense.state_dict(), moe.state_dict()
    for i, layer in moe.moe_layers():
        E = layer.experts.w1.shape[0]
        for e in range(E):
            assert torch.equal(layer.experts.w1[e], dsd[f"blocks.{i}.mlp.fc1.weight"].t())
            assert torch.equal(layer.experts.b1[e], dsd[f"blocks.{i}.mlp.fc1.bias"])
            assert torch.equal(layer.experts.w2[e], dsd[f"blocks.{i}.mlp.fc2.weight"].t())
            assert torch.equal(layer.experts.b2[e], dsd[f"blocks.{i}.mlp.fc2.bias"])
    for k, v in msd.items():
        if k in dsd and not k.startswith("head."):
            assert torch.equal(v, dsd[k]), k


def test_experts_equal_dense_mlp_and_router_fresh():
    dense, moe = _dense(), _moe()
    router_before = {i: layer.router.weight.detach().clone() for i, layer in moe.moe_layers()}
    out = upcycle(dense, moe)
    assert out is moe
    assert [i for i, _ in moe.moe_layers()] == [1, 3]
    _assert_upcycled(dense, moe)
    for i, layer in moe.moe_layers():
        assert torch.equal(layer.router.weight, router_before[i])


@pytest.mark.parametrize("capacity_factor", [1.0, None])
def test_uniform_router_reproduces_dense_logits(capacity_factor):
    dense, moe = _dense(), _moe()
    upcycle(dense.state_dict(), moe)  # from a state dict this time
    with torch.no_grad():
        for _, layer in moe.moe_layers():
            layer.router.weight.zero_()
    vmoe.set_routing(moe, num_selected=4, capacity_factor=capacity_factor)
    x = _images()
    with torch.no_grad():
        ref, _ = dense(x)
        got, aux = moe(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    assert set(aux["layers"]) == {1, 3}


def test_skip_head_and_head_mismatch():
    dense = _dense()
    moe = _moe(num_classes=7)
    with pytest.raises(ValueError, match=r"head\.weight.*\(5, 32\).*\(7, 32\).*skip_head"):
        upcycle(dense, moe)
    head_before = moe.head.weight.detach().clone(), moe.head.bias.detach().clone()
    upcycle(dense, moe, skip_head=True)
    assert torch.equal(moe.head.weight, head_before[0]) and torch.equal(moe.head.bias, head_before[1])
    _assert_upcycled(dense, moe)


def test_shape_mismatch_names_key_and_shapes():
    dense = _dense()
    moe = _moe(mlp_dim=48)
    with pytest.raises(ValueError, match=r"blocks\.\d+\.mlp\..*\(64.*48"):
        upcycle(dense, moe)
    sd = dense.state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*\(3, 3\).*\(96, 32\)"):
        upcycle(sd, _moe())


def test_missing_and_unused_keys_strict():
    dense, moe = _dense(), _moe(representation_size=32)
    with pytest.raises(ValueError, match="pre_logits_fc"):
        upcycle(dense, moe)
    upcycle(dense, moe, skip=("pre_logits_fc",))  # leaves the fresh pre-logits
    sd = dense.state_dict()
    sd["reg_token"] = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match="reg_token"):
        upcycle(sd, _moe())
    with pytest.warns(UserWarning, match="reg_token"):
        upcycle(sd, _moe(), strict=False)


def test_resize_pos_embed():
    dense = _dense()
    moe = _moe(image_size=24)
    upcycle(dense, moe)
    want = vmoe.resize_pos_embed(dense.pos_embed.detach(), (6, 6), 1)
    torch.testing.assert_close(moe.pos_embed.detach(), want)
    with pytest.raises(ValueError, match=r"pos_embed.*\(1, 17, 32\).*\(1, 37, 32\)"):
        upcycle(dense, _moe(image_size=24), resize_pos_embed=False)


def test_timm_style_names():
    """timm naming quirks: wrapper dict, ``module.`` prefix, ``pre_logits.fc``, ``fc_norm``."""
    dense = _dense(representation_size=32)
    sd = {f"module.{k}": v for k, v in dense.state_dict().items()}
    for s in ("weight", "bias"):
        sd[f"module.pre_logits.fc.{s}"] = sd.pop(f"module.pre_logits_fc.{s}")
    moe = upcycle({"state_dict": sd, "epoch": 3}, _moe(representation_size=32))
    _assert_upcycled(dense, moe)
    assert torch.equal(moe.pre_logits_fc.weight, dense.pre_logits_fc.weight)

    sd = dense.state_dict()
    for s in ("weight", "bias"):
        sd[f"fc_norm.{s}"] = sd.pop(f"norm.{s}")
    sd.pop("pre_logits_fc.weight"), sd.pop("pre_logits_fc.bias")
    with pytest.raises(ValueError, match="fc_norm"):
        upcycle(sd, _moe())
    with pytest.warns(UserWarning, match="fc_norm"):
        moe = upcycle(sd, _moe(), strict=False)
    assert torch.equal(moe.norm.weight, dense.norm.weight)


def test_act_mismatch_warns():
    with pytest.warns(UserWarning, match="act="):
        upcycle(_dense(act="gelu"), _moe())
    # A state dict does not record its activation: a warning says so, unless the caller does.
    with pytest.warns(UserWarning, match="do not say which activation"):
        upcycle(_dense().state_dict(), _moe())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upcycle(_dense().state_dict(), _moe(), source_act="gelu_tanh")
    with pytest.warns(UserWarning, match="uses act='gelu' but the target uses act='gelu_tanh'"):
        upcycle(_dense().state_dict(), _moe(), source_act="gelu")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_from_timm_vit_tiny():
    import timm

    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    moe = vmoe.create_model(
        "vmoe_ti", num_layers=12, image_size=224, patch_size=16, num_classes=10, act="gelu", num_experts=4
    ).eval()
    upcycle(tm.state_dict(), moe)
    with torch.no_grad():
        for _, layer in moe.moe_layers():
            layer.router.weight.zero_()
    vmoe.set_routing(moe, num_selected=4, capacity_factor=None)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], tm(x), atol=1e-4, rtol=1e-4)


def test_upcycle_checkpoint_roundtrip(tmp_path):
    dense = _dense().float()
    save_checkpoint(
        tmp_path / "dense", 5, dense.state_dict(), model_config=dense.cfg.to_dict(), data_info={"classes": 5}
    )
    ck = upcycle_checkpoint(tmp_path / "dense", "vmoe_ti", tmp_path / "moe", **{**TINY, "num_experts": 4})
    assert ck.parent.parent == tmp_path / "moe"
    loaded = vmoe.load(tmp_path / "moe")
    assert isinstance(loaded, vmoe.VisionTransformer) and not loaded.training
    _assert_upcycled(dense, loaded)
    assert (ck / "data_info.json").exists()
    # from a bare safetensors file with a different head
    from safetensors.torch import save_file

    save_file(dense.state_dict(), str(tmp_path / "w.safetensors"))
    ck2 = upcycle_checkpoint(tmp_path / "w.safetensors", "vmoe_ti", tmp_path / "moe2", skip_head=True, **TINY)
    assert vmoe.load(ck2).head.weight.abs().sum() == 0  # zero-init head kept


# ----------------------------------------------------------------------------- official checkpoints
from vmoe.interop import official  # noqa: E402


def _random_moe(**kw):
    torch.manual_seed(3)
    cfg = dict(TINY, num_experts=4, representation_size=24, expert_init="independent")
    m = vmoe.create_model("vmoe_ti", **{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m


def test_flax_layouts_and_in_memory_roundtrip():
    m = _random_moe()
    tree = official.state_dict_to_flax(m.state_dict(), m.cfg)
    blk0, blk1 = tree["Encoder"]["encoderblock_0"], tree["Encoder"]["encoderblock_1"]
    assert tree["embedding"]["kernel"].shape == (4, 4, 3, 32)
    assert tree["cls"].shape == (1, 1, 32)
    assert tree["Encoder"]["posembed_input"]["pos_embedding"].shape == (1, 17, 32)
    assert blk0["SelfAttention"]["query"]["kernel"].shape == (32, 2, 16)
    assert blk0["SelfAttention"]["query"]["bias"].shape == (2, 16)
    assert blk0["SelfAttention"]["out"]["kernel"].shape == (2, 16, 32)
    assert blk0["Mlp"]["Dense_0"]["kernel"].shape == (32, 64)
    assert blk1["Moe"]["Mlp"]["Dense_0"]["kernel"].shape == (4, 32, 64)
    assert blk1["Moe"]["Mlp"]["Dense_1"]["bias"].shape == (4, 32)
    assert blk1["Moe"]["Router"]["dense"]["kernel"].shape == (32, 4)
    assert blk0["LayerNorm_0"]["scale"].shape == (32,)
    assert tree["pre_logits"]["kernel"].shape == (32, 24) and tree["head"]["kernel"].shape == (24, 5)
    sd = official.flax_to_state_dict({"params": tree}, m.cfg)
    ref = m.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_flax_attention_matches_reference_math():
    """Our fused qkv from Flax q/k/v kernels computes the Flax einsum attention projections."""
    m = _random_moe()
    tree = official.state_dict_to_flax(m.state_dict(), m.cfg)
    att = tree["Encoder"]["encoderblock_0"]["SelfAttention"]
    x = torch.randn(2, 5, 32)
    q = torch.einsum("btd,dhk->bthk", x, torch.from_numpy(att["query"]["kernel"])) + torch.from_numpy(
        att["query"]["bias"]
    )
    ours = m.blocks[0].attn.qkv(x)[..., :32].view(2, 5, 2, 16)
    torch.testing.assert_close(ours, q)
    y = torch.randn(2, 5, 2, 16)
    out = torch.einsum("bthk,hkd->btd", y, torch.from_numpy(att["out"]["kernel"])) + torch.from_numpy(
        att["out"]["bias"]
    )
    torch.testing.assert_close(m.blocks[0].attn.proj(y.reshape(2, 5, 32)), out)


def test_flax_conversion_errors():
    m = _random_moe()
    tree = official.state_dict_to_flax(m.state_dict(), m.cfg)
    tree["extra"] = {"kernel": torch.zeros(1).numpy()}
    with pytest.raises(ValueError, match="extra/kernel"):
        official.flax_to_state_dict(tree, m.cfg)
    assert len(official.flax_to_state_dict(tree, m.cfg, strict=False)) == len(m.state_dict())
    del tree["head"]
    with pytest.raises(ValueError, match="head/kernel"):
        official.flax_to_state_dict(tree, m.cfg)
    with pytest.raises(ValueError, match=r"Mlp/Dense_0/kernel.*\(64, 32\).*fc1\.weight.*\(48, 32\)"):
        official.flax_to_state_dict(
            official.state_dict_to_flax(m.state_dict(), m.cfg), _random_moe(mlp_dim=48).cfg
        )


@pytest.mark.parametrize("num_shards", [1, 3])
def test_official_files_roundtrip_logits(tmp_path, num_shards):
    pytest.importorskip("msgpack")
    m = _random_moe()
    tree = official.state_dict_to_flax(m.state_dict(), m.cfg)
    files = official.write_official_checkpoint(tree, tmp_path / "ckpt", num_shards=num_shards)
    assert [f.name for f in files][:2] == ["ckpt.index", f"ckpt.data-00000-of-{num_shards:05d}"]
    restored = official.read_official_checkpoint(tmp_path / "ckpt.index")
    assert sorted(dict(official._flatten(restored))) == sorted(dict(official._flatten(tree)))
    net = official.load_official(tmp_path / "ckpt", m.cfg)
    for k, v in m.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    x = _images().float()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], m(x)[0], atol=0, rtol=0)
    ck = official.convert_official_checkpoint(tmp_path / "ckpt", m.cfg, tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(vmoe.load(ck)(x)[0], m(x)[0], atol=0, rtol=0)


def test_official_gap_and_registry_name(tmp_path):
    pytest.importorskip("msgpack")
    m = _random_moe(classifier="gap", representation_size=None)
    official.write_official_checkpoint(official.state_dict_to_flax(m.state_dict(), m.cfg), tmp_path / "c")
    net = official.load_official(
        tmp_path / "c", "vmoe_ti", **TINY, num_experts=4, classifier="gap", representation_size=None
    )
    x = _images().float()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], m(x)[0], atol=0, rtol=0)


def test_official_missing_or_corrupt_shard(tmp_path):
    pytest.importorskip("msgpack")
    m = _random_moe()
    tree = official.state_dict_to_flax(m.state_dict(), m.cfg)
    files = official.write_official_checkpoint(tree, tmp_path / "ckpt", num_shards=2)
    shard1 = files[2]
    data = shard1.read_bytes()
    shard1.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ckpt\.data-00001-of-00002.*corrupt"):
        official.read_official_checkpoint(tmp_path / "ckpt")
    shard1.unlink()
    with pytest.raises(ValueError, match=r"ckpt\.data-00001-of-00002.*missing"):
        official.read_official_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"nope\.index"):
        official.read_official_checkpoint(tmp_path / "nope")
    # a shard that lacks chunks the index lists
    files = official.write_official_checkpoint(tree, tmp_path / "b", num_shards=2)
    import msgpack

    content = msgpack.unpackb(files[1].read_bytes(), raw=False)
    content.pop(next(k for k in content if k != official._MAGIC))
    files[1].write_bytes(msgpack.packb(content, use_bin_type=True))
    with pytest.raises(ValueError, match=r"b\.data-00000-of-00002.*missing chunks"):
        official.read_official_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("name", ["vmoe_s32_last2_e8", "vmoe_b16_e8"])
def test_released_configs_mapping_covers_state_dict(name):
    from vmoe.models.registry import get_config

    cfg = get_config(name)
    keys = {k for _, k, _ in official._simple_mapping(cfg)}
    keys |= {f"blocks.{i}.attn.qkv.{p}" for i in range(cfg.num_layers) for p in ("weight", "bias")}
    assert keys == set(official._expected_shapes(cfg))


def test_missing_msgpack_message(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "msgpack":
            raise ImportError("no")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install msgpack"):
        official.read_official_checkpoint("x")
