"""The compare pipeline end to end: CLI runs on miniature datasets, the spec.json contract against the core
API and a dense oracle, the demo's planted modes, resume after an interrupted extraction, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from oracle import difference, spectrum
from PIL import Image, ImageDraw

import spec_torch as st
from spec_torch.apps.compare import pair_by_id, run
from spec_torch.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"
CONFIGS = ROOT / "spec_torch" / "apps" / "configs"

#: float32 features, float32 sums: eigenvalues agree with the float64 oracle to this (relative to SPEC-diff)
EIG_RTOL = 1e-5
#: the same data and kernels through run() and through st.spec(): the same float64 sums of float32 features
#: in another batch split (relative to SPEC-diff)
SAME_ROUTE_RTOL = 1e-6


# ----------------------------------------------------------------------------------------------- helpers
def cli(args: list[str], cache_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPEC_TORCH_CACHE=str(cache_dir))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "progress=false"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_many(
    runs: list[list[str]], cache_dir: Path, timeout: float = 240
) -> list[subprocess.CompletedProcess]:
    """Start the runs together (they are mostly imports) and wait for all."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPEC_TORCH_CACHE=str(cache_dir))
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args, "progress=false"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in runs
    ]
    out = []
    for args, p in zip(runs, procs, strict=True):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    return out


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS / "compare"), version_base="1.3"):
        return compose(config_name="compare", overrides=overrides)


def load_spec(out: Path) -> dict:
    return json.loads((out / "spec.json").read_text())


def planted_features(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x separates 3 groups that y merges into one; y separates 3 other groups that x merges."""
    rng = np.random.default_rng(seed)
    gx, gy = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.concatenate([np.eye(3)[gx] * 4, np.ones((n, 1)) * 2], 1) + 0.3 * rng.normal(size=(n, 4))
    y = np.concatenate([np.eye(3)[gy] * 4, np.ones((n, 1)) * 2], 1) + 0.3 * rng.normal(size=(n, 4))
    return x.astype(np.float32), y.astype(np.float32)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def feature_files(work) -> dict[str, Path]:
    x, y = planted_features()
    paths = {
        "x": work / "x.npy",
        "y": work / "y.npy",
        "ids": work / "ids.txt",
        "y_short": work / "y_short.npy",
    }
    np.save(paths["x"], x)
    np.save(paths["y"], y)
    np.save(paths["y_short"], y[:-5])
    paths["ids"].write_text("".join(f"item-{i}\n" for i in range(len(x))))
    return paths


#: three ImageNet classes; their images differ in colour (offline_colour sees it) and shape (offline_shape)
WNIDS = {
    "n01440764": ("red", "ellipse"),
    "n01443537": ("blue", "rectangle"),
    "n01484850": ("green", "ellipse"),
}


def draw(colour: str, shape: str, k: int, size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(img)
    box = (4 + k % 5, 4 + k % 3, size - 5 - k % 4, size - 4 - k % 2)
    getattr(pen, shape)(box, fill=colour, outline="black")
    return img


@pytest.fixture(scope="module")
def mini_imagenet(work) -> Path:
    """root/<wnid>/<file>.JPEG, 6 images a class, plus one corrupt file."""
    root = work / "imagenet_val"
    for wnid, (colour, shape) in WNIDS.items():
        (root / wnid).mkdir(parents=True)
        for k in range(6):
            draw(colour, shape, k).save(
                root / wnid / f"ILSVRC2012_val_{wnid[-3:]}{k:02d}.JPEG", format="JPEG"
            )
    (root / "n01443537" / "ILSVRC2012_val_broken.JPEG").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


CAPTIONS = [
    "a red bus parked on a city street",
    "a double decker bus on the road",
    "two cats sleeping on a sofa",
    "a kitten curled up on a cushion",
    "a plate of pasta with tomato sauce",
    "spaghetti and meatballs on a white plate",
]


@pytest.fixture(scope="module")
def mini_coco(work) -> dict[str, Path]:
    """val2017/ with 6 images and annotations/captions_val2017.json with 2 captions each."""
    images = work / "coco" / "val2017"
    images.mkdir(parents=True)
    doc = {"images": [], "annotations": []}
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for i, colour in enumerate(colours, start=1):
        name = f"{i:012d}.jpg"
        draw(colour, "ellipse" if i % 2 else "rectangle", i).save(images / name, format="JPEG")
        doc["images"].append({"id": i, "file_name": name, "width": 40, "height": 40})
        for j in range(2):
            doc["annotations"].append(
                {"id": 100 * i + j, "image_id": i, "caption": CAPTIONS[(2 * i + j) % 6]}
            )
    ann = work / "coco" / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    return {"root": images, "annotations": ann}


@pytest.fixture(scope="module")
def text_file(work) -> Path:
    path = work / "texts.txt"
    topics = ["the weather is {} today", "my favourite food is {}", "the train to {} is late"]
    words = ["sunny", "pizza", "london", "rainy", "sushi", "paris", "cold", "curry", "berlin", "windy"]
    path.write_text("".join(topics[k % 3].format(words[k % 10]) + "\n" for k in range(24)))
    return path


# ------------------------------------------------------------------------------------- unit: pairing rows
def test_pair_by_id_keeps_x_order_and_reports_one_sided_ids():
    rows_x, rows_y, only_one = pair_by_id(["a", "b", "c", "d"], ["d", "a", "c", "e"])
    assert rows_x.tolist() == [0, 2, 3] and rows_y.tolist() == [1, 2, 0]
    assert only_one == ["b", "e"]


# ------------------------------------------------------------------------------- precomputed features
@pytest.fixture(scope="module")
def features_run(work, feature_files) -> tuple[subprocess.CompletedProcess, Path]:
    out = work / "features_out"
    args = [
        "data=features",
        f"data.x_path={feature_files['x']}",
        f"data.y_path={feature_files['y']}",
        f"data.ids_path={feature_files['ids']}",
        "kernel@kernel_x=cosine",
        "kernel@kernel_y=cosine",
        "top_k=3",
        "samples_per_mode=10",
        "batch_size=32",
        f"hydra.run.dir={out}",
    ]
    return cli(args, work / "cache"), out


def test_features_cli_writes_the_spec_json_contract(features_run, feature_files):
    proc, out = features_run
    assert proc.returncode == 0, proc.stderr
    spec = load_spec(out)
    ev = spec["eigenvalues"]
    assert ev == sorted(ev, reverse=True)
    assert spec["spec_diff"] == pytest.approx(max(abs(v) for v in ev))
    assert spec["n"] == 90 and spec["skipped"] == {"count": 0, "ids": []}
    assert spec["kernel_x"]["name"] == "cosine" and spec["eta"] == 1.0
    ids = set(feature_files["ids"].read_text().split())
    for direction, sign in (("x", 1), ("y", -1)):
        assert len(spec["modes"][direction]) == 3
        for entry in spec["modes"][direction]:
            assert sign * entry["eigenvalue"] > 0
            assert entry["eigenvalue"] == ev[entry["index"]]
            assert len(entry["top_ids"]) == 10 and set(entry["top_ids"]) <= ids
            assert entry["top_scores"] == sorted(entry["top_scores"], reverse=True)
            assert {"tightness_x", "tightness_y"} <= set(entry)
    assert (out / "report.html").is_file() and (out / "plots" / "spectrum.png").is_file()
    # the permutation reference: spec.json, one summary line, the report's words
    assert spec["spec_diff_ratio"] == pytest.approx(spec["spec_diff"] / spec["spec_diff_null"])
    words = f"SPEC-diff is {spec['spec_diff_ratio']:.0%} of the value for unrelated embeddings"
    assert words in proc.stdout + proc.stderr
    assert words in (out / "report.html").read_text(encoding="utf-8")


def test_features_spec_json_matches_core_api_and_dense_oracle(features_run, feature_files):
    _, out = features_run
    spec = load_spec(out)
    x, y = np.load(feature_files["x"]), np.load(feature_files["y"])
    ids = feature_files["ids"].read_text().split()

    res = st.spec(
        torch.from_numpy(x),
        torch.from_numpy(y),
        "cosine",
        "cosine",
        method="features",
        accumulate_dtype=torch.float64,
    )
    np.testing.assert_allclose(
        spec["eigenvalues"], res.eigenvalues.numpy(), rtol=0, atol=SAME_ROUTE_RTOL * res.spec_diff
    )
    assert spec["spec_diff"] == pytest.approx(res.spec_diff, rel=SAME_ROUTE_RTOL)
    assert spec["spec_diff_null"] == pytest.approx(res.spec_diff_null, rel=SAME_ROUTE_RTOL)

    oracle_ev, oracle_v = spectrum(difference(x, y, "cosine", "cosine"), keep=len(spec["eigenvalues"]))
    np.testing.assert_allclose(spec["eigenvalues"], oracle_ev, rtol=0, atol=EIG_RTOL * res.spec_diff)

    modes = res.positive_modes(3) + res.negative_modes(3)
    top = res.top_samples((torch.from_numpy(x), torch.from_numpy(y)), k=10, modes=modes)
    got = spec["modes"]["x"] + spec["modes"]["y"]
    for j, entry in enumerate(got):
        assert entry["index"] == modes[j]
        assert entry["top_ids"] == [ids[i] for i in top.indices[j].tolist()]
        # the same samples lead the oracle's eigenvector (up to sign) for the well-separated top modes
        if j in (0, 3):
            col = np.argsort(-np.abs(oracle_ev - entry["eigenvalue"]))[-1]
            v = oracle_v[:, col] * np.sign(oracle_v[np.abs(oracle_v[:, col]).argmax(), col])
            assert set(entry["top_ids"][:5]) <= {ids[i] for i in np.argsort(-v)[:10]}


def test_planted_groups_show_up_as_modes(features_run):
    _, out = features_run
    spec = load_spec(out)
    # x's 3 groups that y merges: about 3 strong positive modes, and likewise 3 negative
    ev = np.array(spec["eigenvalues"])
    assert (ev > 0.1 * spec["spec_diff"]).sum() >= 2 and (ev < -0.1 * spec["spec_diff"]).sum() >= 2
    for entry in spec["modes"]["x"][:2]:
        assert entry["tightness_x"] > entry["tightness_y"]
    for entry in spec["modes"]["y"][:2]:
        assert entry["tightness_y"] > entry["tightness_x"]


def test_gaussian_auto_sigma_and_rff_seed_are_recorded(work, feature_files):
    out = work / "gauss_out"
    cfg = compose_cfg(
        [
            "data=features",
            f"data.x_path={feature_files['x']}",
            f"data.y_path={feature_files['y']}",
            "kernel@kernel_x=gaussian",
            "kernel_x.rff_dim=64",
            "kernel_x.seed=7",
            "kernel@kernel_y=linear",
            "report=false",
            "top_k=2",
            "samples_per_mode=5",
            f"output_dir={out}",
            "progress=false",
        ]
    )
    spec = run(cfg)
    assert spec == load_spec(out) and not (out / "report.html").exists()
    kx = spec["kernel_x"]
    x, y = np.load(feature_files["x"]), np.load(feature_files["y"])
    sigma = st.kernels.median_sigma(torch.from_numpy(x), seed=7)
    assert kx["sigma"] == pytest.approx(sigma) and kx["sigma_auto"] is True
    assert kx["seed"] == 7 and kx["rff_dim"] == 64
    same = st.spec(
        torch.from_numpy(x),
        torch.from_numpy(y),
        st.GaussianKernel(sigma="auto", rff_dim=64, seed=7),
        "linear",
        method="features",
        accumulate_dtype=torch.float64,  # as the pipeline's default accumulate_dtype
    )
    np.testing.assert_allclose(
        spec["eigenvalues"], same.eigenvalues.numpy(), rtol=0, atol=SAME_ROUTE_RTOL * same.spec_diff
    )
    # the same settings rerun give the same numbers (seeded frequencies)
    again = run(cfg)
    assert again["eigenvalues"] == spec["eigenvalues"]
    assert [m["top_ids"] for m in again["modes"]["x"]] == [m["top_ids"] for m in spec["modes"]["x"]]


def test_exact_gaussian_route_matches_the_dense_oracle(work, feature_files):
    """A Gaussian kernel without random features takes the exact n x n route; sigma resolved on the data."""
    overrides = [
        "data=features",
        f"data.x_path={feature_files['x']}",
        f"data.y_path={feature_files['y']}",
        "kernel@kernel_x=gaussian",
        "kernel_x.rff_dim=null",
        "kernel@kernel_y=cosine",
        "report=false",
        "top_k=2",
        "samples_per_mode=5",
        f"output_dir={work / 'exact_out'}",
        "progress=false",
    ]
    spec = run(compose_cfg(overrides))
    assert spec["method"] == "exact"
    x, y = np.load(feature_files["x"]), np.load(feature_files["y"])
    sigma = spec["kernel_x"]["sigma"]
    assert sigma == pytest.approx(st.kernels.median_sigma(torch.from_numpy(x), seed=0))
    oracle_ev, _ = spectrum(
        difference(x, y, "gaussian", "cosine", sigma_x=sigma), keep=len(spec["eigenvalues"])
    )
    np.testing.assert_allclose(spec["eigenvalues"], oracle_ev, rtol=0, atol=EIG_RTOL * spec["spec_diff"])
    with pytest.raises(SpecError, match="feature map"):
        run(compose_cfg([*overrides, "method=features"]))


# ------------------------------------------------------------------------------------ datasets via the CLI
@pytest.fixture(scope="module")
def dataset_runs(
    work, mini_imagenet, mini_coco, text_file
) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The CLI on each miniature dataset, started together."""
    small = ["top_k=2", "samples_per_mode=4", "batch_size=5"]
    runs = {
        "imagenet": ["data=imagenet", f"data.root={mini_imagenet}", *small],
        "coco_captions": [
            "experiment=mscoco_captions_text_encoders",
            f"data.annotations={mini_coco['annotations']}",
            "encoder_x.pretrained=null",  # random ViT-B-32 text tower: no download in tests
            *small,
        ],
        "textfile": [
            "data=textfile",
            f"data.path={text_file}",
            "encoder@encoder_x=minilm",
            "encoder@encoder_y=minilm",
            "encoder_y.max_length=4",  # y reads only the first words
            *small,
        ],
        "demo": ["experiment=demo", "data.n=160", "samples_per_mode=12"],
    }
    outs = {name: work / f"run_{name}" for name in runs}
    procs = cli_many([[*args, f"hydra.run.dir={outs[name]}"] for name, args in runs.items()], work / "cache")
    return {name: (proc, outs[name]) for name, proc in zip(runs, procs, strict=True)}


def finished(dataset_runs, name: str) -> tuple[dict, subprocess.CompletedProcess, Path]:
    proc, out = dataset_runs[name]
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return load_spec(out), proc, out


def test_imagenet_layout_run_skips_the_corrupt_image_and_names_paths(dataset_runs, mini_imagenet):
    spec, proc, out = finished(dataset_runs, "imagenet")
    assert spec["n"] == 18
    assert spec["skipped"] == {"count": 1, "ids": ["n01443537/ILSVRC2012_val_broken.JPEG"]}
    assert spec["dataset"]["name"] == "imagenet" and spec["dataset"]["modality"] == "image"
    assert spec["encoders"]["x"]["family"] == "offline_colour"
    for direction in ("x", "y"):
        for entry in spec["modes"][direction]:
            assert all((mini_imagenet / sid).is_file() for sid in entry["top_ids"])
            assert entry["labels"] and abs(sum(f for _, f in entry["labels"]) - 1) < 1e-9
    labels = {lab for e in spec["modes"]["x"] + spec["modes"]["y"] for lab, _ in e["labels"]}
    assert labels <= {"tench", "goldfish", "great white shark"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert "skipped" in proc.stderr.lower() or "skipped" in proc.stdout.lower()


def test_coco_images_preset_runs_with_offline_encoders(work, mini_coco):
    out = work / "coco_images"
    cfg = compose_cfg(
        [
            "experiment=mscoco_images_clip_vs_dinov2",
            f"data.root={mini_coco['root']}",
            f"data.annotations={mini_coco['annotations']}",
            "encoder@encoder_x=offline_colour",
            "encoder@encoder_y=offline_shape",
            "kernel_x.rff_dim=16",
            "kernel_y.rff_dim=16",
            "num_workers=0",
            "top_k=2",
            "samples_per_mode=3",
            f"cache_dir={work / 'cache'}",
            f"output_dir={out}",
            "progress=false",
        ]
    )
    spec = run(cfg)
    assert spec["n"] == 6 and spec["dataset"]["modality"] == "image"
    ids = {sid for e in spec["modes"]["x"] + spec["modes"]["y"] for sid in e["top_ids"]}
    assert ids and ids <= {f"coco:{i}" for i in range(1, 7)}
    assert spec["kernel_x"]["name"] == "gaussian" and isinstance(spec["kernel_x"]["sigma"], float)
    assert (out / "report.html").is_file()


def test_coco_captions_run_compares_two_text_encoders(dataset_runs):
    spec, _, out = finished(dataset_runs, "coco_captions")
    assert spec["n"] == 12 and spec["dataset"]["modality"] == "text"
    assert spec["encoders"]["x"]["family"] == "open_clip" and spec["encoders"]["y"]["family"] == "minilm"
    ids = {sid for e in spec["modes"]["x"] + spec["modes"]["y"] for sid in e["top_ids"]}
    assert ids and all(sid.startswith("cap:") for sid in ids)
    assert (
        CAPTIONS[0] in (out / "report.html").read_text() or CAPTIONS[1] in (out / "report.html").read_text()
    )


def test_textfile_run(dataset_runs):
    spec, _, out = finished(dataset_runs, "textfile")
    assert spec["n"] == 24 and spec["dataset"]["modality"] == "text"
    assert spec["encoders"]["y"]["max_length"] == 4
    top = [e for direction in ("x", "y") for e in spec["modes"][direction]]
    assert top and all(sid.startswith("line:") for e in top for sid in e["top_ids"])
    # truncation to 4 tokens merges sentences the full encoder separates: x captures groups y does not
    assert spec["modes"]["x"] and spec["modes"]["x"][0]["eigenvalue"] > 0
    assert "the weather is" in (out / "report.html").read_text()


#: a demo mode counts as matching a planted group when its top samples share one attribute value this often
DEMO_PURITY = 0.9


def test_demo_modes_match_planted_attributes(dataset_runs):
    spec, proc, _ = finished(dataset_runs, "demo")
    assert "purity" in proc.stdout
    for direction in ("x", "y"):
        assert spec["modes"][direction], f"no {direction} modes"
        for entry in spec["modes"][direction]:
            assert set(entry["purity"]) == {"shape", "colour", "texture", "word"}
    # x = the colour encoder: its top modes are single-colour groups; y = the shape encoder: single-shape
    assert spec["modes"]["x"][0]["purity"]["colour"] >= DEMO_PURITY
    assert spec["modes"]["y"][0]["purity"]["shape"] >= DEMO_PURITY


# ------------------------------------------------------------------------------------------------ resume
class Interrupted(Exception):
    pass


def test_interrupted_extraction_resumes_without_recomputing(work, monkeypatch):
    from spec_torch.apps.encoders.offline import ColourHistogramEncoder

    forward = ColourHistogramEncoder.forward
    calls = {"n": 0, "fail_at": 3}

    def counting_forward(self, batch):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise Interrupted("simulated crash in the third batch")
        return forward(self, batch)

    monkeypatch.setattr(ColourHistogramEncoder, "forward", counting_forward)
    common = ["data.n=40", "batch_size=8", "chunk_rows=8", "report=false", "progress=false", "top_k=2"]
    out, cache = work / "resume_out", work / "resume_cache"
    cfg = compose_cfg([*common, f"cache_dir={cache}", f"output_dir={out}"])
    with pytest.raises(Interrupted):
        run(cfg)
    assert not (out / "spec.json").exists()
    (folder,) = [p for p in cache.iterdir() if "offline_colour" in p.name]
    assert not (folder / "complete.json").exists()
    assert json.loads((folder / "manifest.json").read_text())["rows_done"] == 16

    calls.update(n=0, fail_at=None)
    resumed = run(cfg)
    assert calls["n"] == 3, "rows 16..39 only: three batches of 8"
    assert (folder / "complete.json").exists()

    calls["n"] = 0
    fresh = run(
        compose_cfg([*common, f"cache_dir={work / 'fresh_cache'}", f"output_dir={work / 'fresh_out'}"])
    )
    assert calls["n"] == 5
    np.testing.assert_array_equal(resumed["eigenvalues"], fresh["eigenvalues"])
    assert [m["top_ids"] for m in resumed["modes"]["x"]] == [m["top_ids"] for m in fresh["modes"]["x"]]

    calls["n"] = 0
    run(cfg)  # finished caches are reused: the encoder is not called
    assert calls["n"] == 0


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_cli_exits_nonzero_without_spec_json(work, feature_files):
    """Through the script: our errors exit 2 with one line on stderr; Hydra's own error for unknown keys."""
    blocker = work / "a_file"
    blocker.write_text("not a directory")
    feats = ["data=features", f"data.x_path={feature_files['x']}"]
    cases = {
        "missing": ([*feats, f"data.y_path={work / 'nope.npy'}"], "data.y_path"),
        "unwritable": (
            [*feats, f"data.y_path={feature_files['y']}", f"output_dir={blocker / 'sub'}"],
            "output_dir",
        ),
        "key": ([*feats, f"data.y_path={feature_files['y']}", "no_such_key=1"], "no_such_key"),
    }
    outs = {name: work / f"bad_{name}" for name in cases}
    runs = [[*args, f"hydra.run.dir={outs[name]}"] for name, (args, _) in cases.items()]
    for (name, (_, expect)), proc in zip(cases.items(), cli_many(runs, work / "cache"), strict=True):
        assert proc.returncode != 0, f"{name}: exit 0\n{proc.stdout}"
        assert expect in proc.stderr, f"{name}: {proc.stderr[-2000:]}"
        assert not (outs[name] / "spec.json").exists()
        if name != "key":  # ours: one clean line, no traceback wall
            assert proc.returncode == 2, f"{name}: {proc.stderr[-2000:]}"
            assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("rows", r"90 rows.*85 rows"),
        ("model", "ViT-Nope-99"),
        ("root", "data.root"),
        ("empty", "no image files"),
    ],
)
def test_bad_input_raises_spec_error_naming_the_setting(work, feature_files, case, expect):
    empty = work / "empty_folder"
    empty.mkdir(exist_ok=True)
    overrides = {
        "rows": [
            "data=features",
            f"data.x_path={feature_files['x']}",
            f"data.y_path={feature_files['y_short']}",
        ],
        "model": ["data.n=8", "encoder@encoder_x=open_clip_vit_b32", "encoder_x.model=ViT-Nope-99"],
        "root": ["data=imagefolder", f"data.root={work / 'no_such_folder'}"],
        "empty": ["data=imagefolder", f"data.root={empty}"],
    }[case]
    out = work / f"bad_{case}"
    with pytest.raises(SpecError, match=expect):
        run(compose_cfg([*overrides, f"output_dir={out}", f"cache_dir={work / 'cache'}", "progress=false"]))
    assert not (out / "spec.json").exists()


def test_stale_spec_json_is_removed_before_a_failing_rerun(work, feature_files):
    from spec_torch.apps._io import atomic_write_text, begin_outputs

    out = work / "stale"
    begin_outputs(out)  # an earlier run there, its spec.json listed in its manifest of outputs
    atomic_write_text(out / "spec.json", '{"eigenvalues": [1.0]}')
    cfg = compose_cfg(
        [
            "data=features",
            f"data.x_path={feature_files['x']}",
            f"data.y_path={feature_files['y_short']}",
            f"output_dir={out}",
        ]
    )
    with pytest.raises(SpecError, match="rows"):
        run(cfg)
    assert not (out / "spec.json").exists()


def test_spec_json_is_written_last(work, feature_files, monkeypatch):
    """A failure after the comparison (here: the report) leaves no spec.json: its presence means finished."""
    import spec_torch.apps.report

    def broken_report(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(spec_torch.apps.report, "write_report", broken_report)
    out = work / "report_fails"
    cfg = compose_cfg(
        [
            "data=features",
            f"data.x_path={feature_files['x']}",
            f"data.y_path={feature_files['y']}",
            f"output_dir={out}",
        ]
    )
    with pytest.raises(OSError, match="disk full"):
        run(cfg)
    assert out.is_dir() and not (out / "spec.json").exists()
    assert not list(out.glob(".spec.json.*"))  # no temporary left behind either


def test_missing_required_setting_is_named():
    cfg = compose_cfg(["experiment=imagenet_clip_vs_dinov2", "output_dir=/tmp"])
    with pytest.raises(SpecError, match=r"data\.root"):
        run(cfg)


def test_route_rff_auto_center_and_uniformity_in_spec_json(work, feature_files):
    """One route choice (api.choose_route) in the pipeline: rff_dim auto is the exact Gaussian on the exact
    route; every mode entry carries its uniformity; center=true removes the uniform direction."""
    base = [
        "data=features",
        f"data.x_path={feature_files['x']}",
        f"data.y_path={feature_files['y']}",
        "kernel@kernel_x=gaussian",
        "kernel@kernel_y=cosine",
        "report=false",
        "top_k=2",
        "samples_per_mode=5",
        "progress=false",
    ]
    spec = run(compose_cfg([*base, f"output_dir={work / 'route_auto'}"]))
    assert spec["method"] == "exact" and spec["kernel_x"]["rff_dim"] is None  # n = 90: exact is cheaper
    x, y = np.load(feature_files["x"]), np.load(feature_files["y"])
    res = st.spec(x, y, st.GaussianKernel(sigma=spec["kernel_x"]["sigma"]), "cosine", method="exact")
    entries = spec["modes"]["x"] + spec["modes"]["y"]
    assert entries and all(0 <= e["uniformity"] <= 1 for e in entries)
    for e in entries:
        assert e["uniformity"] == pytest.approx(float(res.uniformity[e["index"]]), abs=1e-9)
    assert spec["spec_diff_null"] == pytest.approx(
        res.spec_diff_null, rel=1e-9
    )  # no feature map: kernel values
    feat = run(compose_cfg([*base, "method=features", f"output_dir={work / 'route_dual'}"]))
    assert feat["method"] == "features" and feat["solver"] == "dual"  # D = 2000 + 4 > n = 90
    assert feat["kernel_x"]["rff_dim"] == st.kernels.AUTO_RFF_DIM
    cen = run(compose_cfg([*base, "center=true", f"output_dir={work / 'route_center'}"]))
    assert cen["settings"]["center"] is True and cen["center"] is True
    assert all(e["uniformity"] < 1e-6 for e in cen["modes"]["x"] + cen["modes"]["y"])
