"""Every Hydra config composes, and every experiment preset builds its parts with tiny settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spec_torch.kernels import CosineKernel, GaussianKernel, LinearKernel, resolve_kernel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the compare presets (configs/experiment/align_* belong to the alignment script, matrix_*/layers_* to the
#: matrix script: tests/test_matrix_job.py)
PRESETS = sorted(
    p.stem
    for p in (CONFIGS / "experiment").glob("*.yaml")
    if not p.stem.startswith(("align", "matrix_", "layers_"))
)
REQUIRED_PRESETS = {
    "imagenet_clip_vs_dinov2",
    "mscoco_images_clip_vs_dinov2",
    "mscoco_captions_text_encoders",
    "demo",
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="compare", overrides=overrides)


def test_required_presets_exist():
    assert REQUIRED_PRESETS <= set(PRESETS)


def test_default_config_is_the_offline_demo_setup():
    cfg = _compose([])
    assert cfg.data.name == "synthetic"
    assert (cfg.encoder_x.family, cfg.encoder_y.family) == ("offline_colour", "offline_shape")
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_every_group(preset):
    cfg = _compose([f"experiment={preset}"])
    for key in ("data", "encoder_x", "encoder_y", "kernel_x", "kernel_y"):
        assert key in cfg, f"{preset}: group {key} missing"
    assert cfg.data.name in {"imagefolder", "imagenet", "mscoco", "textfile", "features", "synthetic"}
    assert cfg.encoder_x.family and cfg.encoder_y.family
    for key in ("kernel_x", "kernel_y"):
        assert resolve_kernel(OmegaConf.to_container(cfg[key]), key).name == cfg[key].name
    for key in (
        "eta",
        "top_k",
        "samples_per_mode",
        "batch_size",
        "num_workers",
        "device",
        "cache_dir",
        "seed",
    ):
        assert cfg[key] is not None, f"{preset}: {key} unset"


EXPECTED = {
    "imagenet_clip_vs_dinov2": ("imagenet", "ViT-B-32", "vit_base_patch14_dinov2.lvd142m"),
    "mscoco_images_clip_vs_dinov2": ("mscoco", "ViT-B-32", "vit_base_patch14_dinov2.lvd142m"),
    "mscoco_captions_text_encoders": ("mscoco", "ViT-B-32", None),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_real_presets_name_the_models_of_the_issue(preset):
    cfg = _compose([f"experiment={preset}"])
    data, model_x, model_y = EXPECTED[preset]
    assert cfg.data.name == data
    assert cfg.encoder_x.model == model_x
    assert cfg.encoder_x.pretrained, "the real presets ask for pretrained weights"
    if model_y is not None:
        assert cfg.encoder_y.model == model_y and cfg.encoder_y.pretrained is True
    assert OmegaConf.missing_keys(cfg), "the real presets need the data location on the command line"


def test_captions_preset_compares_two_text_encoders():
    cfg = _compose(["experiment=mscoco_captions_text_encoders"])
    assert cfg.data.modality == "text"
    assert cfg.encoder_x.tower == "text" and cfg.encoder_y.family == "minilm"


@pytest.mark.parametrize(
    ("name", "cls"), [("cosine", CosineKernel), ("linear", LinearKernel), ("gaussian", GaussianKernel)]
)
def test_kernel_group_resolves_to_the_kernel(name, cls):
    cfg = _compose([f"kernel@kernel_x={name}", "kernel_x.seed=3" if name == "gaussian" else "seed=0"])
    kernel = resolve_kernel(OmegaConf.to_container(cfg.kernel_x), "kernel_x")
    assert type(kernel) is cls
    if name == "gaussian":
        assert kernel.describe()["sigma"] == "auto" and kernel.rff_dim == 2000 and kernel.seed == 3


def test_every_encoder_config_names_a_family():
    for path in sorted((CONFIGS / "encoder").glob("*.yaml")):
        cfg = _compose([f"encoder@encoder_x={path.stem}"])
        assert cfg.encoder_x.family, path.name


def test_unknown_group_option_is_hydras_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["encoder@encoder_x=no_such_encoder"])


# ------------------------------------------------------------------ building every preset, tiny and offline
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Two images in an ImageNet class folder; a COCO captions file for them."""
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    (root / "imagenet" / "n01440764").mkdir(parents=True)
    (root / "coco").mkdir()
    doc = {"images": [], "annotations": []}
    for i, colour in enumerate(["red", "blue"], start=1):
        Image.new("RGB", (40, 40), colour).save(root / "imagenet" / "n01440764" / f"img{i}.JPEG")
        Image.new("RGB", (40, 40), colour).save(root / "coco" / f"{i:012d}.jpg")
        doc["images"].append({"id": i, "file_name": f"{i:012d}.jpg"})
        doc["annotations"].append({"id": 10 + i, "image_id": i, "caption": f"a {colour} square"})
    (root / "captions_val2017.json").write_text(json.dumps(doc))
    return {
        "imagenet": root / "imagenet",
        "coco_root": root / "coco",
        "annotations": root / "captions_val2017.json",
    }


#: per preset: overrides that point it at the tiny data and switch pretrained weights off (random init, seeded)
TINY = {
    "imagenet_clip_vs_dinov2": lambda d: [
        f"data.root={d['imagenet']}",
        "encoder_x.pretrained=null",
        "encoder_y.pretrained=false",
        "encoder_y.img_size=56",
    ],
    "mscoco_images_clip_vs_dinov2": lambda d: [
        f"data.root={d['coco_root']}",
        f"data.annotations={d['annotations']}",
        "encoder_x.pretrained=null",
        "encoder_y.pretrained=false",
        "encoder_y.img_size=56",
    ],
    "mscoco_captions_text_encoders": lambda d: [
        f"data.annotations={d['annotations']}",
        "encoder_x.pretrained=null",
    ],
    "demo": lambda d: ["data.n=2"],
}

_ENCODERS: dict[str, object] = {}


def _encoder(enc_cfg: dict):
    """Build (once per test module) the encoder of a config."""
    import json

    from spec_torch.encoders import build_encoder

    key = json.dumps(enc_cfg, sort_keys=True)
    if key not in _ENCODERS:
        kwargs = dict(enc_cfg)
        _ENCODERS[key] = build_encoder(kwargs.pop("family"), **kwargs)
    return _ENCODERS[key]


@pytest.mark.parametrize("preset", sorted(TINY))
def test_preset_builds_its_dataset_and_encoders_tiny(preset, tiny_data):
    import torch

    from spec_torch.data import build_dataset

    assert set(TINY) == set(PRESETS), "every preset needs tiny settings here"
    cfg = _compose([f"experiment={preset}", *TINY[preset](tiny_data)])
    assert OmegaConf.missing_keys(cfg) == set()
    data = OmegaConf.to_container(cfg.data)
    ds = build_dataset(data.pop("name"), **data)
    assert len(ds) == 2
    for key in ("encoder_x", "encoder_y"):
        enc = _encoder(OmegaConf.to_container(cfg[key]))
        assert enc.modality == ds.modality, f"{preset}: {key} cannot embed {ds.modality} samples"
        with torch.inference_mode():
            z = enc(enc.collate([enc.preprocess(ds[i]) for i in range(len(ds))]))  # [2, d]
        assert z.shape == (2, enc.embed_dim) and bool(torch.isfinite(z).all())


@pytest.mark.parametrize("preset", ["imagenet_clip_vs_dinov2", "mscoco_captions_text_encoders"])
def test_preset_pretrained_weights_fail_fast_offline(preset):
    """As configured the real presets ask for pretrained weights: offline they refuse, naming the model."""
    from spec_torch.encoders import build_encoder
    from spec_torch.errors import SpecError

    cfg = _compose([f"experiment={preset}"])
    kwargs = OmegaConf.to_container(cfg.encoder_x)
    with pytest.raises(SpecError, match=kwargs["model"]):
        build_encoder(kwargs.pop("family"), **kwargs)


def test_resnet50_config_builds_without_weights():
    cfg = _compose(["encoder@encoder_x=torchvision_resnet50", "encoder_x.weights=null"])
    assert _encoder(OmegaConf.to_container(cfg.encoder_x)).embed_dim == 2048
