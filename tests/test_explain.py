"""Modes named in words (spec_torch/apps/explain.py, issue 20): planted texts, the synthetic images' generated
captions through the COCO path, determinism, the matrix job's pairs, and spec.json, report, CLI and
``spec-torch summarize`` showing the same words. All new: on the old code there is no explain module."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import spec_torch as st
from spec_torch.apps.compare import run
from spec_torch.apps.data.synthetic import SHAPES, SyntheticShapes
from spec_torch.apps.explain import NO_WORDS, keywords_phrase, mode_keywords
from spec_torch.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "spec_torch" / "apps" / "configs"
TEMPLATE = "a photo of a"
FILLERS = [
    "apple", "river", "chair", "window", "garden", "bottle", "street", "mountain", "pencil", "cloud",
    "bridge", "kitchen", "forest", "letter", "candle", "market", "island", "ladder", "mirror", "pillow",
]  # fmt: skip
RARE = [["zebra", "quokka"], ["narwhal", "okapi"], ["axolotl", "pangolin"]]  # one pair per planted group


def planted_texts(groups: np.ndarray, seed: int = 0, rare: list[list[str]] | None = RARE) -> list[str]:
    """The shared template, three random filler words, and the rare words of the sample's group (if any)."""
    rng = np.random.default_rng(seed)
    out = []
    for g in groups:
        words = [FILLERS[j] for j in rng.choice(len(FILLERS), 3, replace=False)]
        out.append(" ".join([TEMPLATE, *words, *(rare[g] if rare is not None and g >= 0 else [])]))
    return out


def words_of(terms: list) -> set[str]:
    return {w for term, _ in terms for w in str(term).split()}


# ------------------------------------------------------------------------------------------- the rule
def test_planted_group_is_named_by_its_rare_words_never_the_template():
    n = 300
    groups = np.full(n, -1)
    groups[:40] = 0  # the planted cluster: 40 of 300 share "zebra quokka"
    texts = planted_texts(groups)
    rng = np.random.default_rng(1)
    planted = np.where(groups == 0, 1.0, 0.0) + 0.05 * rng.normal(size=n)  # [n]
    noise = rng.normal(size=n)  # a mode of random texts
    words = mode_keywords(np.stack([planted, noise], 1), texts)
    assert words[0] and words_of(words[0]) <= {"zebra", "quokka"}
    assert {t for t, _ in words[0]} >= {"zebra", "quokka"}
    assert all(z >= 3.0 for _, z in words[0]) and [z for _, z in words[0]] == sorted(
        (z for _, z in words[0]), reverse=True
    )
    assert words[1] == [], "a mode of random texts has no distinctive words"
    assert keywords_phrase({"keywords": words[1]}) == NO_WORDS
    # with a very low min_z every surviving term is listed: the template word is not one (max_df), fillers are
    everything = {
        t for t, _ in mode_keywords(np.stack([planted, noise], 1), texts, top_n=10**4, min_z=-1e9)[0]
    }
    assert "photo" not in everything and set(FILLERS) <= everything


def test_the_positive_side_of_a_spec_mode_is_named(tmp_path):
    """Through a SpecResult: x holds the planted group together, y does not; its mode gets the rare words."""
    rng = np.random.default_rng(0)
    n = 240
    groups = np.where(np.arange(n) < 40, 0, -1)
    x = rng.normal(size=(n, 8)) + 4.0 * (groups == 0)[:, None] * np.eye(8)[0]
    y = rng.normal(size=(n, 8))
    x, y = torch.tensor(x), torch.tensor(y)
    res = st.spec(x, y, kernel_x="linear", kernel_y="linear")
    texts = planted_texts(groups)
    (words,) = mode_keywords(res, texts, x=x, y=y, modes=res.positive_modes(1))
    assert words and words_of(words) <= {"zebra", "quokka"}


def test_deterministic_ties_by_term_and_row_order_free():
    texts = [f"{TEMPLATE} {w}" for w in ["fox"] * 10 + ["cat", "dog", "owl", "bee", "elk"] * 10]
    scores = np.r_[np.ones(10), np.zeros(50)][:, None]
    first = mode_keywords(scores, texts)
    assert first == [[("fox", 3.23), ("photo fox", 3.23)]]  # equal z: alphabetical
    assert mode_keywords(scores, texts) == first
    perm = np.random.default_rng(0).permutation(len(texts))
    assert mode_keywords(scores[perm], [texts[i] for i in perm]) == first
    assert mode_keywords(torch.tensor(scores), texts) == first  # a tensor, the same


def test_no_terms_and_no_members_say_no_distinctive_words():
    assert mode_keywords(np.ones((3, 1)), ["a b", "c d", "e f"]) == [[]]  # max_df*3 < min_df: no term
    assert mode_keywords(-np.ones((4, 1)), ["fox den"] * 2 + ["cat"] * 2, max_df=1.0) == [[]]  # no member


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_n": 0}, "mode_keywords.top_n"),
        ({"min_z": float("nan")}, "mode_keywords.min_z"),
        ({"ngram_range": (2, 1)}, "mode_keywords.ngram_range"),
        ({"min_df": 0}, "mode_keywords.min_df"),
        ({"max_df": 1.5}, "mode_keywords.max_df"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(SpecError, match=match):
        mode_keywords(np.ones((4, 1)), ["a"] * 4, **kwargs)


def test_bad_scores_and_texts_name_the_argument():
    with pytest.raises(SpecError, match="texts: expected one text per row"):
        mode_keywords(np.ones((4, 1)), ["a"] * 3)
    with pytest.raises(SpecError, match="scores: expected finite"):
        mode_keywords(np.full((4, 1), np.nan), ["a"] * 4)
    with pytest.raises(SpecError, match=r"scores: expected sample scores \[n, M\]"):
        mode_keywords(np.ones(4), ["a"] * 4)
    with pytest.raises(SpecError, match="x/y"):
        mode_keywords(st.spec(torch.randn(8, 2), torch.randn(8, 2)), ["a"] * 8)


# ------------------------------------------------------------------------------ the compare job, features
def _compose(job: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS / job), version_base="1.3"):
        return compose(config_name=job, overrides=overrides)


@pytest.fixture(scope="module")
def features_run(tmp_path_factory):
    """data=features with names_path: x separates three groups (each with its rare words), y three others."""
    tmp = tmp_path_factory.mktemp("keywords_features")
    rng = np.random.default_rng(0)
    n = 300
    gx, gy = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.concatenate([np.eye(3)[gx] * 4, np.ones((n, 1)) * 2], 1) + 0.3 * rng.normal(size=(n, 4))
    y = np.concatenate([np.eye(3)[gy] * 4, np.ones((n, 1)) * 2], 1) + 0.3 * rng.normal(size=(n, 4))
    np.save(tmp / "x.npy", x.astype(np.float32))
    np.save(tmp / "y.npy", y.astype(np.float32))
    (tmp / "names.txt").write_text("".join(t + "\n" for t in planted_texts(gx)))
    overrides = [
        "data=features", f"data.x_path={tmp / 'x.npy'}", f"data.y_path={tmp / 'y.npy'}",
        f"data.names_path={tmp / 'names.txt'}", "center=true", "top_k=2", "uncertainty.replicates=0",
        f"output_dir={tmp / 'out'}",
    ]  # fmt: skip
    logger = logging.getLogger("spec_torch.apps.compare")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        spec = run(_compose("compare", overrides))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return spec, tmp / "out", records, gx


def test_features_run_names_x_modes_by_their_group_words_and_y_modes_by_none(features_run):
    spec, out, _, _ = features_run
    saved = json.loads((out / "spec.json").read_text())
    assert saved["modes"] == spec["modes"]
    rare = [set(pair) for pair in RARE]
    for entry in saved["modes"]["x"]:  # a group x holds together: one group's rare words only
        assert entry["keywords"], entry
        assert any(words_of(entry["keywords"]) <= r for r in rare), entry["keywords"]
    for entry in saved["modes"]["y"]:  # y's groups are independent of the words
        assert entry["keywords"] == [], entry["keywords"]
    assert saved["settings"]["explain"]["keywords"]["min_z"] == 3.0


def test_spec_json_report_cli_and_summarize_show_the_same_words(features_run, capsys):
    from spec_torch.apps.summarize import main

    spec, out, records, _ = features_run
    html = (out / "report.html").read_text()
    lines = [r for r in records if r.lstrip().startswith("mode ")]
    for direction in ("x", "y"):
        for entry in spec["modes"][direction]:
            phrase = keywords_phrase(entry)
            line = next(ln for ln in lines if ln.lstrip().startswith(f"mode {direction}{entry['rank']} "))
            assert phrase in line
            assert (
                keywords_phrase(entry, with_z=True) if entry["keywords"] else "No distinctive words"
            ) in html
    top = spec["modes"]["x"][0]
    assert f"a group described by {keywords_phrase(top)}" in html  # the opening sentence
    assert main([str(out)]) == 0
    table = capsys.readouterr().out
    assert keywords_phrase(top) in table and NO_WORDS in table


def test_no_texts_no_keywords_field(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(40, 3)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.normal(size=(40, 3)).astype(np.float32))
    spec = run(
        _compose(
            "compare",
            [
                "data=features",
                f"data.x_path={tmp_path / 'x.npy'}",
                f"data.y_path={tmp_path / 'y.npy'}",
                "report=false",
                "uncertainty.replicates=0",
                f"output_dir={tmp_path / 'out'}",
            ],
        )  # fmt: skip
    )
    entries = spec["modes"]["x"] + spec["modes"]["y"]
    assert entries and all("keywords" not in e for e in entries)


def test_bad_keyword_setting_fails_before_any_work(tmp_path):
    with pytest.raises(SpecError, match="explain.keywords.top_n: expected a positive integer"):
        run(_compose("compare", ["explain.keywords.top_n=0", f"output_dir={tmp_path}"]))
    with pytest.raises(SpecError, match=r"explain.keywords: unknown setting\(s\) \['topn'\]"):
        run(_compose("compare", ["+explain.keywords.topn=3", f"output_dir={tmp_path}"]))


# ------------------------------------------------------------------ synthetic images, generated captions
def captions(attrs: dict[str, str]) -> list[str]:
    """Two COCO-style captions of a synthetic image, from its planted attributes."""
    return [
        f"a photo of a {attrs['colour']} {attrs['shape']} on a {attrs['texture']} background with the word "
        f"{attrs['word']}",
        f"a {attrs['shape']} drawn in {attrs['colour']}, the word {attrs['word']} written in a corner",
    ]


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory):
    """The demo's 600 synthetic images as PNG files and a captions json generated from their attributes."""
    tmp = tmp_path_factory.mktemp("synthetic_coco")
    ds = SyntheticShapes(n=600, seed=0)
    images = tmp / "images"
    images.mkdir()
    doc = {"images": [], "annotations": []}
    attributes = ds.attributes
    for i in range(len(ds)):
        name = f"{i:06d}.png"
        ds[i].save(images / name)
        doc["images"].append({"id": i, "file_name": name})
        attrs = {k: v[i] for k, v in attributes.items()}
        for j, text in enumerate(captions(attrs)):
            doc["annotations"].append({"id": 10 * i + j, "image_id": i, "caption": text})
    ann = tmp / "captions_synthetic.json"
    ann.write_text(json.dumps(doc))
    return {"root": images, "annotations": ann, "shape": attributes["shape"], "tmp": tmp}


def _captioned_demo(data: dict, replicates: int, out: str) -> dict:
    """The compare demo on the synthetic images read as COCO with their generated captions; spec.json."""
    return run(
        _compose(
            "compare",
            [
                "experiment=demo",
                "data=mscoco",
                f"data.root={data['root']}",
                f"data.annotations={data['annotations']}",
                f"uncertainty.replicates={replicates}",
                "report=false",
                f"cache_dir={data['tmp'] / 'cache'}",
                f"output_dir={data['tmp'] / out}",
                "progress=false",
            ],
        )  # fmt: skip
    )


def majority_shape(ids: list[str], shapes: list[str]) -> str:
    return Counter(shapes[int(sid.split(":")[1])] for sid in ids).most_common(1)[0][0]


def test_synthetic_captions_name_the_shape_modes_by_their_shape(synthetic_coco):
    """The demo (colour vs shape encoder, centred) on the synthetic images read as COCO: the shape modes y1-y3
    get their shape word first; and every image's captions are its text."""
    data = synthetic_coco
    spec = _captioned_demo(data, replicates=0, out="compare")
    assert len(spec["modes"]["y"]) == 3
    for entry in spec["modes"]["y"]:
        assert entry["keywords"], entry
        first = entry["keywords"][0][0]
        assert first in SHAPES and first == majority_shape(entry["top_ids"], data["shape"]), entry["keywords"]


def test_matrix_pairs_are_named_in_words(synthetic_coco):
    """The matrix job's top pairs (colour vs shape, colour vs a second shape encoder) on the same captioned
    images: matrix.json mode entries carry keywords (the texts vectorized once for both pairs), the shape
    encoder's modes led by their shape word; the report shows them."""
    from spec_torch.apps.matrix import run as run_matrix

    data = synthetic_coco
    out = data["tmp"] / "matrix"
    summary = run_matrix(
        _compose(
            "matrix",
            [
                "data=mscoco",
                f"data.root={data['root']}",
                f"data.annotations={data['annotations']}",
                "+encoders.shape_too.family=offline_shape",
                "top_pairs=2",
                "top_k=2",
                f"cache_dir={data['tmp'] / 'cache'}",
                f"output_dir={out}",
                "progress=false",
            ],
        ),  # fmt: skip
    )
    saved = json.loads((out / "matrix.json").read_text())
    pair = saved["pairs"][0]
    assert len(saved["pairs"]) == 2 and saved["pairs"] == json.loads(json.dumps(summary["pairs"]))
    assert all(
        "keywords" in mode for p in saved["pairs"] for mode in p["modes"]
    )  # every pair, one vectorizing
    html = (out / "report.html").read_text()
    shape_side = "x" if pair["x"] == "shape" else "y"
    shape_modes = [m for m in pair["modes"] if m["direction"] == shape_side]
    assert shape_modes
    for mode in pair["modes"]:
        assert "keywords" in mode and keywords_phrase(mode, with_z=True) in html
    for mode in shape_modes:
        assert mode["keywords"][0][0] in SHAPES


def test_dataset_texts_lines_captions_and_none(tmp_path, synthetic_coco):
    """What the explain stage reads: a text file's lines; COCO captions (an image: all its captions, one a
    line); nothing for the synthetic images."""
    from spec_torch.apps.data import CocoDataset, TextFileDataset

    (tmp_path / "t.txt").write_text("first text\n\nsecond text\n")
    assert TextFileDataset(tmp_path / "t.txt").texts == ["first text", "second text"]
    images = CocoDataset(root=synthetic_coco["root"], annotations=synthetic_coco["annotations"])
    assert images.texts[3].split("\n") == captions(
        {k: v[3] for k, v in SyntheticShapes(n=4).attributes.items()}
    )
    lines = CocoDataset(annotations=synthetic_coco["annotations"], modality="text", max_samples=4)
    assert lines.texts == [lines[i] for i in range(4)]
    assert SyntheticShapes(n=4).texts is None


def test_a_tied_set_is_named_by_the_members_of_any_of_its_modes():
    """Two tied centred modes, each holding one planted group: the set is named once by the words of both
    groups (set_scores: a member of any of its modes). The projection norm on the span, which the first
    version used, named nothing here: centred, every sample projects about as much."""
    from spec_torch.apps.explain import set_scores

    n = 300
    groups = np.full(n, -1)
    groups[:40], groups[40:80] = 0, 1
    texts = planted_texts(groups)
    rng = np.random.default_rng(0)
    a, b = (groups == 0).astype(float), (groups == 1).astype(float)  # [n] each
    pair = np.stack([a - a.mean(), b - b.mean()], 1) + 0.01 * rng.normal(size=(n, 2))  # [n, 2] centred
    (words,) = mode_keywords(set_scores(pair, [[0, 1]]), texts)
    first, second = (mode_keywords(pair[:, [j]], texts)[0] for j in (0, 1))
    assert first and second and words_of(first) != words_of(second)
    assert words_of(words) & words_of(first) and words_of(words) & words_of(second)
    assert words_of(words) <= words_of(first) | words_of(second)
    with pytest.raises(SpecError, match="sets"):
        set_scores(pair, [[0, 2]])


def test_a_tied_set_is_named_once_in_spec_json(synthetic_coco):
    """With replicates the demo's colour modes x1-x3 form one tied set (their directions are not identifiable
    one by one); spec.json's top-level ``tied_modes`` entry carries the set's words, named from the samples'
    projections on its span: the colours of its three groups. Absent before the verdicts and words merged."""
    data = synthetic_coco
    spec = _captioned_demo(data, replicates=40, out="compare_tied")
    (colour_set,) = [t for t in spec["tied_modes"] if ["x", 1] in t["modes"]]
    assert colour_set["modes"] == [["x", 1], ["x", 2], ["x", 3]]
    terms = [term for term, _ in colour_set["keywords"]]
    assert {"blue", "green", "yellow"} <= set(terms), colour_set["keywords"]
    assert not set(terms) & set(SHAPES)
