"""Intermediate layers (spec_torch/encoders/layers.py): tiny random timm / open_clip / torchvision models give the
documented shapes, one forward pass gives every layer, and one feature cache splits into per-layer arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import spec_torch as st
from spec_torch.apps.data import build_dataset
from spec_torch.apps.encoders.layers import LayerEncoder, build_layer_encoder, default_layers, split_layers
from spec_torch.apps.extract import extract_features
from spec_torch.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")

#: float32 forward passes of the same weights: the hooked and the direct computation are the same ops
FLOAT32_TOL = 1e-5
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_VIT = {"model": "vit_small_patch14_dinov2.lvd142m", "img_size": 28, "model_kwargs": {"depth": 3}}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30 + 7 * k, 40, 3), dtype=np.uint8)) for k in range(3)]


def _embed(enc, raws, **kw):
    with torch.inference_mode():
        return enc(enc.collate([enc.preprocess(r) for r in raws]), **kw)


def test_timm_vit_blocks_cls_mean_and_own_pooling(images):
    enc = build_layer_encoder("timm", layers="all", pooling="cls", **TINY_VIT)
    assert enc.layers == ["blocks.0", "blocks.1", "blocks.2", "output"]
    assert enc.layer_dims == {"blocks.0": 384, "blocks.1": 384, "blocks.2": 384, "output": 384}
    z = _embed(enc, images)
    assert z.shape == (3, 4 * 384)
    parts = _embed(enc, images, split=True)
    # the hooked last block's token 0, put through the model's final norm, is the model's own (cls) output
    net = enc.base.model
    own = net.forward_head(net.norm(_tokens(net, enc, images)), pre_logits=True)
    assert torch.allclose(parts["output"], own, atol=FLOAT32_TOL)
    assert torch.allclose(parts["output"], _embed(enc.base, images), atol=FLOAT32_TOL)
    mean = build_layer_encoder("timm", layers=["blocks.1"], pooling="mean", **TINY_VIT)
    own_pool = build_layer_encoder(
        "timm", layers=["blocks.1"], pooling="own", **TINY_VIT
    )  # dinov2: token pool
    tokens = _tokens(net, enc, images, upto=2)  # [B, T, d] after blocks.0, blocks.1
    assert torch.allclose(_embed(mean, images), tokens.mean(1), atol=FLOAT32_TOL)
    assert torch.allclose(_embed(own_pool, images), tokens[:, 0], atol=FLOAT32_TOL)
    assert mean.cache_key() != own_pool.cache_key() != enc.cache_key()


def _tokens(net, enc, images, upto=None):
    with torch.inference_mode():
        x = enc.collate([enc.preprocess(r) for r in images])
        x = net._pos_embed(net.patch_embed(x))
        x = net.norm_pre(net.patch_drop(x))
        for blk in net.blocks[:upto]:
            x = blk(x)
    return x


def test_open_clip_tiny_image_and_text_blocks(images):
    img = build_layer_encoder(
        "open_clip", layers="all", pooling="own", model="ViT-S-32", model_kwargs=TINY_CLIP
    )
    assert img.layers == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1", "output"]
    assert list(img.layer_dims.values()) == [64, 64, 32]
    assert _embed(img, images).shape == (3, 160)
    text = build_layer_encoder(
        "open_clip", layers="all", model="ViT-S-32", tower="text", model_kwargs=TINY_CLIP, context_length=16
    )
    assert text.layers == ["transformer.resblocks.0", "transformer.resblocks.1", "output"]
    captions = ["a red square", "two blue circles", "a cat"]
    z = _embed(text, captions, split=True)
    assert [tuple(v.shape) for v in z.values()] == [(3, 64), (3, 64), (3, 32)]
    # "own" pooling of the last block = open_clip's own text pooling (the end-of-text token) before ln_final
    own = build_layer_encoder(
        "open_clip",
        layers=["transformer.resblocks.1"],
        pooling="own",
        model="ViT-S-32",
        tower="text",
        model_kwargs=TINY_CLIP,
        context_length=16,
    )
    tokens = own.collate([own.preprocess(c) for c in captions])  # [3, 16]
    with torch.inference_mode():
        pooled = own(tokens)  # [3, 64]
        net = own.base.model
        proj = net.ln_final(pooled) @ net.text_projection  # open_clip: ln_final, pool, project
    assert torch.allclose(proj, own.base(tokens), atol=FLOAT32_TOL)


def test_cnn_maps_mean_pooled_and_cls_refused(images):
    tv = build_layer_encoder(
        "torchvision", layers=["layer1", "layer3", "output"], model="resnet18", image_size=32
    )
    assert tv.layer_dims == {"layer1": 64, "layer3": 256, "output": 512}
    tm = build_layer_encoder("timm", layers="all", model="resnet18", img_size=32)
    assert default_layers(tm.base) == ["layer1", "layer2", "layer3", "layer4", "output"]
    assert _embed(tm, images).shape == (3, 64 + 128 + 256 + 512 + 512)
    with pytest.raises(SpecError, match="'cls' needs tokens"):
        build_layer_encoder("timm", layers=["layer2"], pooling="cls", model="resnet18", img_size=32)
    with pytest.raises(SpecError, match="'layer9' is not a module"):
        build_layer_encoder("timm", layers=["layer9"], model="resnet18", img_size=32)
    with pytest.raises(SpecError, match="encoder.pooling"):
        LayerEncoder(tm.base, ["layer1"], pooling="max")


def test_one_extraction_pass_caches_every_layer_and_splits(tmp_path):
    ds = build_dataset("synthetic", n=12, seed=0, image_size=32)
    enc = build_layer_encoder("timm", layers="all", pooling="mean", model="resnet18", img_size=32)
    cache = extract_features(ds, enc, tmp_path, batch_size=5, progress=False)
    assert cache.dim == enc.embed_dim and cache.meta["encoder"]["layers"] == enc.layers
    per_layer = split_layers(cache.features, enc.layer_dims, prefix="resnet18")
    assert list(per_layer) == [f"resnet18/{k}" for k in enc.layers]
    assert [v.shape for v in per_layer.values()] == [(12, d) for d in enc.layer_dims.values()]
    # the same encoder with other layers or pooling is another cache
    other = build_layer_encoder("timm", layers=["layer1"], pooling="mean", model="resnet18", img_size=32)
    assert other.cache_key() != enc.cache_key()
    m = st.spec_matrix({k: np.asarray(v) for k, v in per_layer.items()})
    assert m.spec_diff.shape == (5, 5) and bool((m.spec_diff.triu(1)[m.spec_diff.triu(1) > 0] > 0).all())
    with pytest.raises(SpecError, match="expected 1472 columns"):
        split_layers(cache.features[:, :10], enc.layer_dims)
