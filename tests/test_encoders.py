"""Encoders: every family built tiny and random (or real, for MiniLM), local checkpoints, fail-fast pretrained
weights offline, and the demo encoders seeing what they are meant to see on the synthetic dataset."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from spec_torch.apps.data import build_dataset
from spec_torch.apps.encoders import build_encoder
from spec_torch.apps.encoders.base import random_weights_guard
from spec_torch.errors import SpecError

FLOAT32_TOL = 1e-5
FAIL_FAST_S = 20.0  # "at once": no network timeouts (generous for a loaded 2-core machine)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY_DINO = {"model": "vit_small_patch14_dinov2.lvd142m", "img_size": 28, "model_kwargs": {"depth": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30 + 7 * k, 40, 3), dtype=np.uint8)) for k in range(3)]


def embed(enc, raws):
    with torch.inference_mode():
        return enc(enc.collate([enc.preprocess(r) for r in raws]))


# ---------------------------------------------------------------------------------------- the demo encoders
def _knn_accuracy(z: np.ndarray, labels: list[str]) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(5, metric="cosine"), z, labels, cv=4).mean())


def test_offline_encoders_see_their_planted_attributes():
    """kNN accuracy: the colour encoder knows colour not shape, the shape encoder shape not colour."""
    ds = build_dataset("synthetic", n=240, seed=11)
    raws = [ds[i] for i in range(len(ds))]
    acc = {}
    for family in ("offline_colour", "offline_shape"):
        z = embed(build_encoder(family), raws).numpy()
        acc[family] = {a: _knn_accuracy(z, v) for a, v in ds.attributes.items() if a in ("colour", "shape")}
    chance = 0.25  # 4 colours, 4 shapes
    assert acc["offline_colour"]["colour"] > 0.9 and acc["offline_colour"]["shape"] < chance + 0.15, acc
    assert acc["offline_shape"]["shape"] > 0.9 and acc["offline_shape"]["colour"] < chance + 0.15, acc


def test_offline_encoders_shapes_and_keys(images):
    for family, dim in (("offline_colour", 36), ("offline_shape", 32)):
        enc = build_encoder(family)
        z = embed(enc, images)
        assert z.shape == (3, dim) == (3, enc.embed_dim) and torch.isfinite(z).all()
        assert torch.equal(z, embed(build_encoder(family), images))  # deterministic
        assert (
            enc.cache_key()
            == build_encoder(family).cache_key()
            != build_encoder(family, image_size=32).cache_key()
        )
    with pytest.raises(SpecError, match="encoder.image_size"):
        build_encoder("offline_colour", image_size=4)


# --------------------------------------------------------------------------------------------- open_clip
def test_open_clip_tiny_image_and_text_towers(images):
    img = build_encoder("open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP, seed=1)
    assert img.modality == "image" and img.embed_dim == 32
    z = embed(img, images)
    assert z.shape == (3, 32)
    same = build_encoder("open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP, seed=1)
    other = build_encoder("open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP, seed=2)
    assert torch.equal(z, embed(same, images)) and not torch.allclose(z, embed(other, images))
    assert img.cache_key() == same.cache_key() != other.cache_key()
    txt = build_encoder(
        "open_clip", model="ViT-S-32", tower="text", model_kwargs=TINY_CLIP, context_length=16
    )
    assert txt.modality == "text"
    zt = embed(txt, ["a photo of a cat", "a dog", "a photo of a cat"])
    assert zt.shape == (3, 32) and torch.allclose(zt[0], zt[2]) and not torch.allclose(zt[0], zt[1])


def test_open_clip_local_checkpoint(tmp_path, images):
    src = build_encoder("open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP, seed=1)
    torch.save(src.model.state_dict(), tmp_path / "clip.pt")
    enc = build_encoder(
        "open_clip", model="ViT-S-32", model_kwargs=TINY_CLIP, checkpoint=str(tmp_path / "clip.pt"), seed=9
    )
    torch.testing.assert_close(embed(enc, images), embed(src, images), atol=FLOAT32_TOL, rtol=0)
    assert enc.describe()["weights"].startswith("file:")
    with pytest.raises(SpecError, match="encoder.checkpoint: cannot load"):
        build_encoder(
            "open_clip", model="ViT-S-32", checkpoint=str(tmp_path / "clip.pt")
        )  # other architecture
    with pytest.raises(SpecError, match="no such weights file"):
        build_encoder("open_clip", model="ViT-S-32", checkpoint=str(tmp_path / "none.pt"))


# ---------------------------------------------------------------------------------------- timm, torchvision
def test_timm_dinov2_and_cnn_tiny(images):
    dino = build_encoder("timm", **TINY_DINO)
    assert dino.embed_dim == 384 and embed(dino, images).shape == (3, 384)
    assert dino.data_cfg["input_size"] == (3, 28, 28)
    cnn = build_encoder(
        "timm", model="resnet18", img_size=32
    )  # CNNs take any size: img_size only sets the crop
    assert embed(cnn, images).shape == (3, 512)


def test_timm_local_checkpoint(tmp_path, images):
    import timm

    torch.manual_seed(3)
    full = timm.create_model(
        "vit_small_patch14_dinov2", img_size=28, depth=1
    ).eval()  # with its 1000-way head
    torch.save(full.state_dict(), tmp_path / "dino.pth")
    enc = build_encoder("timm", **TINY_DINO, checkpoint=str(tmp_path / "dino.pth"))
    x = enc.collate([enc.preprocess(im) for im in images])
    with torch.inference_mode():
        want = full.forward_head(full.forward_features(x), pre_logits=True)  # oracle: pooled pre-logits
    torch.testing.assert_close(embed(enc, images), want, atol=FLOAT32_TOL, rtol=0)


def test_torchvision_penultimate_features(tmp_path, images):
    import torchvision

    enc = build_encoder("torchvision", model="resnet18", image_size=32, seed=4)
    assert enc.embed_dim == 512
    torch.manual_seed(5)
    full = torchvision.models.resnet18().eval()
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    enc = build_encoder("torchvision", model="resnet18", image_size=32, checkpoint=str(tmp_path / "r18.pth"))
    x = enc.collate([enc.preprocess(im) for im in images])
    with torch.inference_mode():
        trunk = torch.nn.Sequential(*list(full.children())[:-1])  # everything up to the avgpool
        want = trunk(x).flatten(1)  # [B, 512]
    torch.testing.assert_close(embed(enc, images), want, atol=FLOAT32_TOL, rtol=0)


# ------------------------------------------------------------------------------------------------ MiniLM
def test_minilm_real_encoder():
    enc = build_encoder("minilm")
    texts = [
        "A dog runs on the beach.",
        "A puppy is running along the shore.",
        "The stock market fell today.",
    ]
    z = embed(enc, texts)
    assert enc.modality == "text" and z.shape == (3, 384) == (3, enc.embed_dim)
    want = enc.st.encode(texts, convert_to_tensor=True)  # the library's own pipeline
    torch.testing.assert_close(z, want, atol=1e-4, rtol=0)
    zn = torch.nn.functional.normalize(z, dim=1)
    assert zn[0] @ zn[1] > zn[0] @ zn[2] + 0.3  # paraphrases are close, unrelated texts far


# ----------------------------------------------------------------------------------- weights: fail fast
def _fails_fast(match: str, **kwargs) -> str:
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=match) as err:
        build_encoder(**kwargs)
    assert time.perf_counter() - t0 < FAIL_FAST_S
    return str(err.value)


def test_pretrained_weights_missing_offline_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    msg = _fails_fast(
        "open_clip model 'ViT-B-32'", family="open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k"
    )
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg and "encoder.checkpoint" in msg
    msg = _fails_fast(
        "timm model 'vit_small_patch14_dinov2.lvd142m'", family="timm", **{**TINY_DINO, "pretrained": True}
    )
    assert "timm/vit_small_patch14_dinov2.lvd142m" in msg and "encoder.checkpoint" in msg
    msg = _fails_fast("resnet18", family="torchvision", model="resnet18", weights="IMAGENET1K_V1")
    assert (
        str(tmp_path / "torch_hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
        and "encoder.checkpoint" in msg
    )


def test_pretrained_weights_unreachable_hub_fail_fast(monkeypatch, tmp_path):
    """Hubs not switched off, but unreachable: no minute of download retries."""
    import huggingface_hub.constants

    from spec_torch.apps.encoders import base

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPEC_TORCH_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    for host in ("huggingface.co", "download.pytorch.org"):
        monkeypatch.setitem(base._REACHABLE, host, False)
    msg = _fails_fast("unreachable", family="open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "'laion/CLIP-ViT-B-32-laion2B-s34B-b79K'" in msg
    _fails_fast("unreachable", family="timm", **{**TINY_DINO, "pretrained": True})
    _fails_fast("unreachable", family="torchvision", model="resnet18", weights="DEFAULT")


def test_random_weights_fallback_is_refused():
    with pytest.raises(SpecError, match="refusing to continue with random weights"):
        with random_weights_guard("ViT-X", "open_clip weights"):
            logging.getLogger().warning(
                "No pretrained weights loaded for model 'ViT-X'. Model initialized randomly."
            )
    with random_weights_guard("ViT-X", "open_clip weights"):
        logging.getLogger().warning("something unrelated")


def test_unknown_names_and_settings():
    _fails_fast("unknown open_clip model 'ViT-B-33'.*did you mean", family="open_clip", model="ViT-B-33")
    _fails_fast("is not an open_clip tag", family="open_clip", model="ViT-B-32", pretrained="imagenet")
    _fails_fast(
        "unknown timm model 'vit_smal_patch14_dinov2'", family="timm", model="vit_smal_patch14_dinov2"
    )
    _fails_fast("unknown torchvision classifier 'resnet19'", family="torchvision", model="resnet19")
    _fails_fast("not a weights name", family="torchvision", model="resnet18", weights="IMAGENET")
    _fails_fast("unknown encoder family 'clip'", family="clip")
    _fails_fast(r"unknown setting\(s\) \['pretrained'\]", family="offline_colour", pretrained=True)
    _fails_fast("encoder.tower", family="open_clip", model="ViT-S-32", tower="audio")
