"""Datasets (imagefolder, imagenet, mscoco, textfile, synthetic) and precomputed feature loading."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from spec_torch.apps.data import CorruptSample, build_dataset, load_feature_pair
from spec_torch.errors import SpecError

TENCH, GOLDFISH = "n01440764", "n01443537"  # ImageNet classes 0 and 1


def _img(path, colour=(200, 10, 10), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def imagenet_root(tmp_path):
    """A miniature ImageNet: root/val/<wnid>/*, with one truncated JPEG."""
    val = tmp_path / "imagenet" / "val"
    for k in range(3):
        _img(val / TENCH / f"t{k}.JPEG", (10 * k, 0, 0))
        _img(val / GOLDFISH / f"g{k}.png", (0, 10 * k, 0))
    good = (val / TENCH / "t0.JPEG").read_bytes()
    (val / GOLDFISH / "broken.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    return tmp_path / "imagenet"


# ------------------------------------------------------------------------------------------ image folders
def test_imagenet_layout_ids_labels_and_corrupt(imagenet_root):
    ds = build_dataset("imagenet", root=str(imagenet_root))  # the ImageNet root: split "val" is picked
    assert ds.modality == "image"
    assert len(ds) == 7
    assert ds.sample_id(0) == f"{TENCH}/t0.JPEG"
    assert ds.ids == sorted(ds.ids)
    labels = dict(zip(ds.ids, ds.labels, strict=True))
    assert labels[f"{TENCH}/t1.JPEG"] == "tench" and labels[f"{GOLDFISH}/g2.png"] == "goldfish"
    img = ds[ds.ids.index(f"{GOLDFISH}/g1.png")]
    assert img.mode == "RGB" and img.size == (20, 16) and img.getpixel((0, 0)) == (0, 10, 0)
    with pytest.raises(CorruptSample) as err:
        ds[ds.ids.index(f"{GOLDFISH}/broken.JPEG")]
    assert err.value.sample_id == f"{GOLDFISH}/broken.JPEG"
    # the split folder itself works too, and max_per_class keeps the first files of each class
    ds2 = build_dataset("imagenet", root=str(imagenet_root / "val"), max_per_class=2)
    assert ds2.ids == [
        f"{TENCH}/t0.JPEG",
        f"{TENCH}/t1.JPEG",
        f"{GOLDFISH}/broken.JPEG",
        f"{GOLDFISH}/g0.png",
    ]


def test_imagenet_bad_layouts(tmp_path):
    _img(tmp_path / "flat" / "a.jpg")
    with pytest.raises(SpecError, match="class folders"):
        build_dataset("imagenet", root=str(tmp_path / "flat"))
    _img(tmp_path / "named" / "dogs" / "a.jpg")
    with pytest.raises(SpecError, match="wnid"):
        build_dataset("imagenet", root=str(tmp_path / "named"))
    with pytest.raises(SpecError, match="data.root: no such"):
        build_dataset("imagenet", root=str(tmp_path / "nowhere"))


def test_imagefolder_recursive_sorted_and_labels(tmp_path):
    for rel in ("b/z.png", "a/deep/y.jpg", "a/x.bmp", "c.webp"):
        _img(tmp_path / "imgs" / rel)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", root=str(tmp_path / "imgs"), label_from_folder=True)
    assert ds.ids == ["a/deep/y.jpg", "a/x.bmp", "b/z.png", "c.webp"]
    assert ds.labels == ["a", "a", "b", "."]
    assert ds.labels is not None and build_dataset("imagefolder", root=str(tmp_path / "imgs")).labels is None
    thumb = build_dataset("imagefolder", root=str(tmp_path / "imgs")).display(0)
    assert isinstance(thumb, Image.Image)


def test_imagefolder_errors_and_fingerprint(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SpecError, match="no image files"):
        build_dataset("imagefolder", root=str(tmp_path / "empty"))
    with pytest.raises(SpecError, match="no such file"):
        build_dataset("imagefolder", root=str(tmp_path / "missing"))
    _img(tmp_path / "d" / "a.png")
    _img(tmp_path / "d" / "b.png")
    fp = build_dataset("imagefolder", root=str(tmp_path / "d")).fingerprint()
    assert fp == build_dataset("imagefolder", root=str(tmp_path / "d")).fingerprint()
    _img(tmp_path / "d" / "b.png", colour=(1, 2, 3), size=(30, 30))  # same ids, new content
    assert build_dataset("imagefolder", root=str(tmp_path / "d")).fingerprint() != fp
    _img(tmp_path / "d" / "c.png")
    assert len(build_dataset("imagefolder", root=str(tmp_path / "d"))) == 3


def test_missing_image_file_is_a_corrupt_sample(tmp_path):
    _img(tmp_path / "d" / "a.png")
    _img(tmp_path / "d" / "b.png")
    ds = build_dataset("imagefolder", root=str(tmp_path / "d"))
    os.remove(tmp_path / "d" / "b.png")
    with pytest.raises(CorruptSample, match="not found"):
        ds[1]


# ---------------------------------------------------------------------------------------------- MS-COCO
@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "val2017"
    for image_id in (42, 7):
        _img(images / f"{image_id:012d}.jpg")
    doc = {
        "images": [{"id": 42, "file_name": "000000000042.jpg"}, {"id": 7, "file_name": "000000000007.jpg"}],
        "annotations": [
            {"id": 900, "image_id": 42, "caption": "A dog on a sofa."},
            {"id": 901, "image_id": 7, "caption": " Two cats sleeping. "},
            {"id": 5, "image_id": 42, "caption": "A brown dog."},
            {"id": 950, "image_id": 7, "caption": "Cats in the sun."},
        ],
    }
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    return images, ann


def test_mscoco_images_and_captions(coco):
    images, ann = coco
    ds = build_dataset("mscoco", root=str(images), annotations=str(ann), modality="image")
    assert ds.modality == "image" and ds.ids == ["coco:7", "coco:42"] and ds.labels is None
    assert isinstance(ds[0], Image.Image) and isinstance(ds.display(1), Image.Image)
    txt = build_dataset(
        "mscoco", annotations=str(ann.parent), modality="text"
    )  # folder with one captions file
    assert txt.modality == "text"
    assert txt.ids == ["cap:901", "cap:950", "cap:5", "cap:900"]  # by (image id, caption id)
    assert txt[0] == "Two cats sleeping." and txt.display(2) == "A brown dog."
    assert txt.image_ids == [7, 7, 42, 42]
    one = build_dataset("mscoco", annotations=str(ann), modality="text", captions_per_image=1)
    assert one.ids == ["cap:901", "cap:5"]


def test_mscoco_bad_annotations(tmp_path, coco):
    images, ann = coco
    bad = tmp_path / "captions_bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="data.annotations: cannot read"):
        build_dataset("mscoco", root=str(images), annotations=str(bad))
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(SpecError, match="not a COCO captions file"):
        build_dataset("mscoco", root=str(images), annotations=str(bad))
    bad.write_text(
        json.dumps({"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]})
    )
    with pytest.raises(SpecError, match="file_name"):
        build_dataset("mscoco", root=str(images), annotations=str(bad))
    with pytest.raises(SpecError, match="data.root"):
        build_dataset("mscoco", root=str(tmp_path), annotations=str(ann))  # wrong image folder
    with pytest.raises(SpecError, match="data.modality"):
        build_dataset("mscoco", root=str(images), annotations=str(ann), modality="audio")


# -------------------------------------------------------------------------------------------- text files
def test_textfile_lines_and_csv(tmp_path):
    p = tmp_path / "texts.txt"
    p.write_text("first text\n\n  second  \nthird\n")
    ds = build_dataset("textfile", path=str(p))
    assert ds.modality == "text" and ds.ids == ["line:1", "line:3", "line:4"] and ds[1] == "second"
    c = tmp_path / "t.csv"
    c.write_text('id,text,topic\na1,"hello, world",greet\na2,,none\na3,bye,greet\n')
    ds = build_dataset("textfile", path=str(c), column="text")
    assert ds.ids == ["row:0", "row:2"] and ds[0] == "hello, world" and ds.labels is None
    ds = build_dataset("textfile", path=str(c), column="text", id_column="id", label_column="topic")
    assert ds.ids == ["a1", "a3"] and ds.labels == ["greet", "greet"]


def test_textfile_errors(tmp_path):
    c = tmp_path / "t.csv"
    c.write_text("a,b\n1,2\n")
    with pytest.raises(SpecError, match="data.column: .* is a table"):
        build_dataset("textfile", path=str(c))
    with pytest.raises(SpecError, match="data.column: no column 'text'"):
        build_dataset("textfile", path=str(c), column="text")
    e = tmp_path / "empty.txt"
    e.write_text("\n \n")
    with pytest.raises(SpecError, match="no non-empty texts"):
        build_dataset("textfile", path=str(e))
    with pytest.raises(SpecError, match="data.path"):
        build_dataset("textfile", path=str(tmp_path / "none.txt"))


# -------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_with_planted_attributes():
    a = build_dataset("synthetic", n=12, image_size=48, seed=3)
    b = build_dataset("synthetic", n=12, image_size=48, seed=3)
    c = build_dataset("synthetic", n=12, image_size=48, seed=4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    px = [np.asarray(a[i]) for i in range(12)]
    assert all(np.array_equal(px[i], np.asarray(b[i])) for i in range(12))
    assert not np.array_equal(px[5], np.asarray(c[5]))
    assert px[0].shape == (48, 48, 3)
    # any sample renders alone, in any order, the same
    assert np.array_equal(np.asarray(build_dataset("synthetic", n=12, image_size=48, seed=3)[7]), px[7])
    attrs = a.attributes
    assert set(attrs) == {"shape", "colour", "texture", "word"} and all(len(v) == 12 for v in attrs.values())
    assert (
        a.labels[0] == f"{attrs['colour'][0]} {attrs['shape'][0]}, {attrs['texture'][0]}, {attrs['word'][0]}"
    )
    assert a.ids[:2] == ["syn:0", "syn:1"]


def test_synthetic_colour_is_planted():
    """The planted colour is the dominant saturated hue of the image."""
    ds = build_dataset("synthetic", n=40, seed=0)
    hue_of = {"red": 0.0, "yellow": 1 / 6, "green": 1 / 3, "blue": 2 / 3}
    for i in range(40):
        hsv = np.asarray(ds[i].convert("HSV"), dtype=np.float64) / 255.0
        sat = hsv[..., 1] > 0.5
        hue = np.median(hsv[..., 0][sat])
        want = hue_of[ds.attributes["colour"][i]]
        assert min(abs(hue - want), 1 - abs(hue - want)) < 0.05


def test_build_dataset_errors():
    with pytest.raises(SpecError, match="unknown dataset 'imagenett'"):
        build_dataset("imagenett", root="/x")
    with pytest.raises(SpecError, match=r"unknown setting\(s\) \['colour'\]"):
        build_dataset("synthetic", n=4, colour="red")
    with pytest.raises(SpecError, match="data.n"):
        build_dataset("synthetic", n=0)


# ------------------------------------------------------------------------------------ precomputed features
@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return rng.standard_normal((9, 4)).astype(np.float32), rng.standard_normal((9, 3))


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt", "safetensors"])
def test_load_feature_pair_formats(tmp_path, pair, fmt):
    x, y = pair
    xp, yp = tmp_path / f"x.{fmt}", tmp_path / f"y.{fmt}"
    if fmt == "npy":
        np.save(xp, x), np.save(yp, y)
    elif fmt == "npz":
        np.savez(xp, x), np.savez(yp, emb=y)
    elif fmt == "pt":
        torch.save(torch.from_numpy(x), xp), torch.save({"emb": torch.from_numpy(y)}, yp)
    else:
        from safetensors.numpy import save_file

        save_file({"emb": x}, str(xp)), save_file({"emb": y}, str(yp))
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"s{i}\n" for i in range(9)))
    lx, ly, lids = load_feature_pair(xp, yp, ids)
    np.testing.assert_array_equal(np.asarray(lx), x)
    np.testing.assert_array_equal(np.asarray(ly), y)
    assert lids == [f"s{i}" for i in range(9)]
    if fmt == "npy":
        assert isinstance(lx, np.memmap)  # never read whole
    assert load_feature_pair(xp, yp)[2] is None


def test_load_feature_pair_errors(tmp_path, pair):
    x, y = pair
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "short.npy", y[:5])
    np.save(tmp_path / "flat.npy", x[:, 0])
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(SpecError, match="y_path: no such"):
        load_feature_pair(tmp_path / "x.npy", tmp_path / "nope.npy")
    with pytest.raises(SpecError, match="9 rows .* 5 rows"):
        load_feature_pair(tmp_path / "x.npy", tmp_path / "short.npy")
    with pytest.raises(SpecError, match="y_path: expected a 2-D array"):
        load_feature_pair(tmp_path / "x.npy", tmp_path / "flat.npy")
    with pytest.raises(SpecError, match="holds 2 arrays"):
        load_feature_pair(tmp_path / "two.npz", tmp_path / "x.npy")
    assert load_feature_pair(tmp_path / "two.npz", tmp_path / "x.npy", x_key="b")[0].shape == (9, 4)
    (tmp_path / "ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(SpecError, match="ids_path: expected 9 ids"):
        load_feature_pair(tmp_path / "x.npy", tmp_path / "x.npy", tmp_path / "ids.json")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(SpecError, match="unsupported feature file"):
        load_feature_pair(tmp_path / "x.csv", tmp_path / "x.npy")
