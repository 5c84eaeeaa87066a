"""The report layer: metrics against numpy/sklearn oracles, plots, and report.html (also in headless Chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from spec_torch.apps.report import ModeView, metrics, plots, write_report
from spec_torch.errors import SpecError
from spec_torch.kernels import CosineKernel, GaussianKernel, LinearKernel

TOL_F64 = 1e-10  # float64 sums vs a dense float64 oracle
TOL_SPLIT = 1e-12  # the same sums added in another order


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _cka_oracle(x: np.ndarray, y: np.ndarray) -> float:
    """Centred linear CKA from the n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def _correlated(n: int = 240, p: int = 7, q: int = 5, noise: float = 0.7, seed: int = 0):
    rng = _rng(seed)
    x = rng.normal(size=(n, p)) + 3.0  # a large mean, so centring matters
    y = x @ rng.normal(size=(p, q)) + noise * rng.normal(size=(n, q)) - 2.0
    return x, y


# ------------------------------------------------------------------ LinearCKA


def test_linear_cka_matches_gram_oracle():
    x, y = _correlated()
    cka = metrics.LinearCKA()
    cka.update(torch.from_numpy(x), torch.from_numpy(y))
    expected = _cka_oracle(x, y)
    assert 0.2 < expected < 0.99  # a non-trivial case
    assert cka.compute() == pytest.approx(expected, abs=TOL_F64)
    assert cka.n == x.shape[0]


def test_linear_cka_batch_split_and_merge_invariance():
    x, y = _correlated(seed=1)
    whole = metrics.LinearCKA()
    whole.update(x, y)
    split = metrics.LinearCKA()
    for lo, hi in [(0, 1), (1, 50), (50, 173), (173, 240)]:  # uneven batches, one of a single row
        split.update(x[lo:hi], y[lo:hi])
    shard_a, shard_b = metrics.LinearCKA(), metrics.LinearCKA()
    shard_a.update(x[:100], y[:100])
    shard_b.update(x[100:], y[100:])
    merged = metrics.LinearCKA().merge(shard_b).merge(metrics.LinearCKA()).merge(shard_a)  # empty ones too
    assert split.compute() == pytest.approx(whole.compute(), abs=TOL_SPLIT)
    assert merged.compute() == pytest.approx(whole.compute(), abs=TOL_SPLIT)
    assert merged.n == whole.n == 240
    restored = metrics.LinearCKA()
    restored.load_state_dict(whole.state_dict())
    assert restored.compute() == pytest.approx(whole.compute(), abs=TOL_SPLIT)
    # small chunks: rows are pooled and flushed mid-stream; a batch buffer reused in place is no problem
    pooled, buf_x, buf_y = metrics.LinearCKA(chunk_rows=16), torch.empty(10, 7, dtype=torch.float64), None
    for lo in range(0, 240, 10):
        buf_x.copy_(torch.from_numpy(x[lo : lo + 10]))
        buf_y = torch.from_numpy(y[lo : lo + 10])
        pooled.update(buf_x, buf_y)
    assert pooled.compute() == pytest.approx(whole.compute(), abs=TOL_SPLIT)


def test_linear_cka_invariances():
    rng = _rng(2)
    x = rng.normal(size=(120, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    same = metrics.LinearCKA()
    same.update(x, 3.0 * x @ q + 5.0)  # rotation, isotropic scale, shift: CKA 1
    assert same.compute() == pytest.approx(1.0, abs=TOL_F64)
    indep = metrics.LinearCKA()
    indep.update(x, rng.normal(size=(120, 6)))
    assert indep.compute() < 0.2


def test_linear_cka_bad_input():
    cka = metrics.LinearCKA()
    with pytest.raises(SpecError, match="at least 2 samples"):
        cka.compute()
    with pytest.raises(SpecError, match="same samples"):
        cka.update(np.ones((4, 2)), np.ones((5, 2)))
    cka.update(np.ones((4, 2)), _rng().normal(size=(4, 3)))
    with pytest.raises(SpecError, match="constant embedding"):
        cka.compute()
    with pytest.raises(SpecError, match="columns"):
        cka.update(np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(SpecError, match="NaN"):
        metrics.LinearCKA().update(np.full((3, 2), np.nan), np.ones((3, 2)))


# ------------------------------------------------------------------ mutual kNN


def _knn_oracle(x: np.ndarray, y: np.ndarray, k: int) -> float:
    def knn(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        sim = z @ z.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    nx, ny = knn(x), knn(y)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, ny, strict=True)]))


def test_mutual_knn_matches_oracle():
    x, y = _correlated(n=150, p=6, q=6, noise=1.5, seed=3)
    got = metrics.mutual_knn_overlap(x, y, k=7)
    expected = _knn_oracle(x, y, 7)
    assert 0.05 < expected < 0.95
    assert got == pytest.approx(expected, abs=1e-12)


def test_mutual_knn_extremes():
    rng = _rng(4)
    m, k = 400, 10
    x = rng.normal(size=(m, 16))
    scale = rng.uniform(0.5, 3.0, size=(m, 1))
    assert metrics.mutual_knn_overlap(x, x * scale, k=k) == pytest.approx(1.0)  # cosine ignores row norms
    chance = metrics.mutual_knn_overlap(x, rng.normal(size=(m, 12)), k=k)
    assert abs(chance - k / (m - 1)) < 0.015
    sub = metrics.mutual_knn_overlap(x, x, k=k, max_samples=50)
    assert sub == pytest.approx(1.0)


def test_mutual_knn_bad_input():
    x = _rng().normal(size=(5, 3))
    with pytest.raises(SpecError, match="k < 5"):
        metrics.mutual_knn_overlap(x, x, k=5)
    x[2] = 0
    with pytest.raises(SpecError, match="zero row"):
        metrics.mutual_knn_overlap(x, np.ones((5, 3)), k=2)


# ------------------------------------------------------------------ mode diagnostics


def _mean_off_diag(g: np.ndarray) -> float:
    m = g.shape[0]
    return float((g.sum() - np.trace(g)) / (m * (m - 1)))


def test_mode_tightness_against_numpy():
    rng = _rng(5)
    xs, ys = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    xn = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    d2 = ((ys[:, None, :] - ys[None, :, :]) ** 2).sum(-1)
    tx, ty = metrics.mode_tightness(CosineKernel(), GaussianKernel(sigma=1.5), xs, ys)
    assert tx == pytest.approx(_mean_off_diag(xn @ xn.T), abs=TOL_F64)
    assert ty == pytest.approx(_mean_off_diag(np.exp(-d2 / (2 * 1.5**2))), abs=TOL_F64)
    tl, _ = metrics.mode_tightness(LinearKernel(), CosineKernel(), xs, ys)
    assert tl == pytest.approx(_mean_off_diag(xs @ xs.T), abs=TOL_F64)


def test_mode_tightness_needs_fitted_kernels():
    xs = _rng().normal(size=(4, 3))
    with pytest.raises(SpecError, match="fitted"):
        metrics.mode_tightness(GaussianKernel(sigma="auto"), CosineKernel(), xs, xs)
    with pytest.raises(SpecError, match="at least 2"):
        metrics.mode_tightness(CosineKernel(), CosineKernel(), xs[:1], xs[:1])
    with pytest.raises(SpecError, match="unknown kernel"):
        metrics.mode_tightness("nope", CosineKernel(), xs, xs)


def test_kmeans_agreement_separated_vs_random():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    rng = _rng(6)
    membership = np.repeat(np.arange(3), 20)
    centres = 10.0 * np.eye(3, 5)
    x = centres[membership] + 0.3 * rng.normal(size=(60, 5))  # x separates the modes
    y = rng.normal(size=(60, 4))  # y does not
    out = metrics.kmeans_agreement(x, y, membership, seed=0)
    assert set(out) == {"nmi_x", "ami_x", "nmi_y", "ami_y"}
    assert out["nmi_x"] == pytest.approx(1.0) and out["ami_x"] == pytest.approx(1.0)
    assert out["nmi_y"] < 0.3 and out["ami_y"] < 0.1
    pred = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(y)
    assert out["nmi_y"] == pytest.approx(normalized_mutual_info_score(membership, pred), abs=1e-12)
    assert out["ami_y"] == pytest.approx(adjusted_mutual_info_score(membership, pred), abs=1e-12)
    # On the cosine kernel's features (unit rows), scaling rows changes nothing.
    scaled = metrics.kmeans_agreement(
        x * rng.uniform(1, 5, size=(60, 1)), y, membership, kernel_x=CosineKernel(), kernel_y=CosineKernel()
    )
    assert scaled["nmi_x"] == pytest.approx(1.0)
    with pytest.raises(SpecError, match="distinct modes"):
        metrics.kmeans_agreement(x, y, np.zeros(60, dtype=int))
    with pytest.raises(SpecError, match="one mode per row"):
        metrics.kmeans_agreement(x, y, membership[:10])


def test_mode_membership_assigns_shared_samples_by_score():
    indices = torch.tensor([[4, 1, 7], [7, 2, 4]])
    scores = torch.tensor([[0.9, 0.5, 0.2], [0.8, 0.6, 0.1]])
    rows, member = metrics.mode_membership(indices, scores)
    assert rows.tolist() == [1, 2, 4, 7]
    assert member.tolist() == [0, 1, 0, 1]  # 7 scores higher in mode 1, 4 in mode 0
    rows, member = metrics.mode_membership(indices)
    assert member.tolist() == [0, 1, 0, 0]  # without scores the first mode wins
    with pytest.raises(SpecError, match="shape of indices"):
        metrics.mode_membership(indices, scores[:1])


def test_label_composition_and_purity():
    comp = metrics.label_composition(["cat", "dog", "cat", "eel", "dog", "cat"])
    assert comp == [("cat", 0.5), ("dog", pytest.approx(1 / 3)), ("eel", pytest.approx(1 / 6))]
    assert metrics.label_composition(["b", "a"], top=1) == [("a", 0.5)]  # ties by label
    attrs = {"shape": ["disc", "star", "disc", "disc"], "colour": ["red", "red", "blue", "red"]}
    assert metrics.purity(attrs, [0, 2, 3]) == {
        "shape": ("disc", 1.0),
        "colour": ("red", pytest.approx(2 / 3)),
    }
    with pytest.raises(SpecError, match="out of range"):
        metrics.purity(attrs, [0, 9])
    with pytest.raises(SpecError, match="non-empty"):
        metrics.label_composition([])


# ------------------------------------------------------------------ plots


def test_plots_write_png_files(tmp_path):
    lam = np.concatenate([np.linspace(0.3, 0.01, 12), np.zeros(5), -np.linspace(0.01, 0.2, 12)])
    path = plots.plot_spectrum(lam, tmp_path / "sub" / "spectrum.png", spec_diff=0.3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 400
    imgs = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(5)]
    imgs.append(np.zeros((10, 30), dtype=np.uint8))  # a grey-level array, not square
    grid = plots.image_grid(imgs, [f"{i}" for i in range(6)], tmp_path / "grid.png", ncols=4, cell=40)
    with Image.open(grid) as im:
        assert im.size == (4 * 46 + 6, 2 * (40 + 16 + 6) + 6)  # 4 columns, 2 rows of cells with captions
        assert im.getpixel((6 + 20, 6 + 16 + 20)) == (0, 0, 0)  # first cell: the (0, 0, 0) image
    with pytest.raises(SpecError, match="uint8"):
        plots.image_grid([np.zeros((4, 4))], ["a"], tmp_path / "bad.png")
    hist = plots.score_histogram(_rng().normal(size=300), tmp_path / "hist.png", top_k=10)
    assert grid.exists() and hist.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "grid.png",
        "hist.png",
        "spectrum.png",
    ]
    with pytest.raises(SpecError, match="one caption per image"):
        plots.image_grid(imgs[:2], ["a"], tmp_path / "bad.png")
    with pytest.raises(SpecError, match="NaN"):
        plots.plot_spectrum([0.1, float("nan")], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------ report.html


def _shape_image(i: int) -> Image.Image:
    im = Image.new("RGB", (48, 48), (240, 240, 240) if i % 2 else (40, 40, 60))
    draw = ImageDraw.Draw(im)
    colour = [(220, 40, 40), (40, 160, 60), (40, 80, 220)][i % 3]
    if i % 2:
        draw.ellipse((8, 8, 40, 40), fill=colour)
    else:
        draw.rectangle((10, 10, 38, 38), fill=colour)
    return im


def _fake_spec() -> dict:
    """Shaped like the spec.json of spec_torch.apps.compare: SpecResult.to_dict() plus the run's context."""
    lam = [0.2113, 0.0871, 0.0312, 0.0, -0.0021, -0.0455, -0.1534]
    kernel_y = {"name": "gaussian", "sigma": 1.2345, "sigma_auto": True, "rff_dim": 500, "seed": 7}
    return {
        "eigenvalues": lam,
        "spec_diff": 0.2113,
        "n": 600,
        "eta": 1.0,
        "method": "features",
        "kernel_x": {"name": "cosine"},
        "kernel_y": kernel_y,
        "kernels": {"x": {"name": "cosine"}, "y": kernel_y},
        "encoders": {"x": {"family": "offline_colour", "embed_dim": 12}, "y": {"family": "offline_shape"}},
        "dataset": {"name": "synthetic", "size": 601, "fingerprint": "abc123"},
        "skipped": {"count": 1, "ids": ["img_13.png"]},
        "settings": {"eta": 1.0, "method": "features", "top_k": 3, "batch_size": 64},
        "metrics": {"linear_cka": 0.4321},
        "modes": {"x": [], "y": []},
    }


def _image_modes() -> list[ModeView]:
    def view(direction, index, lam, offset):
        ids = [f"synthetic/{offset + i:04d}.png" for i in range(8)]
        return ModeView(
            direction=direction,
            index=index,
            eigenvalue=lam,
            sample_ids=ids,
            scores=list(np.linspace(0.21, 0.12, 8)),
            images=[_shape_image(offset + i) for i in range(8)],
            tightness_x=0.912 if direction == "x" else 0.301,
            tightness_y=0.254 if direction == "x" else 0.877,
            labels=[("red", 0.75), ("green", 0.25)],
            purity={"colour": ("red", 1.0), "shape": ("disc", 0.5)},
        )

    return [view("x", 1, 0.0871, 0), view("x", 0, 0.2113, 8), view("y", 6, -0.1534, 16)]


def _attr_values(path: Path, attr: str) -> list[str]:
    class Collect(HTMLParser):
        values: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.values += [v for k, v in attrs if k == attr and v is not None]

    parser = Collect()
    parser.values = []
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.values


def test_report_with_images(tmp_path):
    extra = {
        "linear_cka": 0.4321,
        "mutual_knn": {"value": 0.1234, "k": 10, "m": 600},
        "kmeans": {"x": {"nmi_x": 0.91, "ami_x": 0.88, "nmi_y": 0.12, "ami_y": 0.05}, "y": None},
        "tightness_baseline": (0.1357, 0.2468),
    }
    (tmp_path / "run" / "plots").mkdir(parents=True)
    (tmp_path / "run" / "plots" / "mode_x9.png").write_bytes(b"from an earlier run")
    path = write_report(tmp_path / "run", _fake_spec(), _image_modes(), extra)
    assert path == tmp_path / "run" / "report.html" and path.exists()
    text = path.read_text(encoding="utf-8")
    for expected in [
        "offline_colour", "offline_shape", "synthetic", "0.2113", "1.234", "rff_dim=500", "seed=7",
        "Modes offline_colour captures and offline_shape does not",
        "Modes offline_shape captures and offline_colour does not",
        "0.4321", "0.1234", "0.912", "0.254", "KMeans agreement", "0.91", "planted attribute", "75%", "SPEC: offline_colour vs offline_shape on synthetic",
        "random pairs", "0.1357", "0.2468",
        "synthetic/0003.png", "1 skipped", "settings.top_k", "embed_dim=12", "mutual k-NN", "k=10",
    ]:  # fmt: skip
        assert expected in text, expected
    assert "<title>SPEC: offline_colour vs offline_shape on synthetic</title>" in text
    assert '<tr style="font-weight:600"><td>colour</td><td>red</td><td>100%</td></tr>' in text  # pure: bold
    assert "<td>shape</td><td>disc</td><td>50%</td>" in text
    # strongest mode of direction x is shown first, as x1
    assert text.index("λ = 0.2113") < text.index("λ = 0.0871")
    srcs = _attr_values(path, "src")
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)  # spectrum + 3 grids
    assert "http://" not in text and "https://" not in text
    assert not _attr_values(path, "href")
    pngs = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert pngs == ["mode_x1.png", "mode_x2.png", "mode_y1.png", "spectrum.png"]
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []  # no temp files


def test_report_with_texts_escapes_everything(tmp_path):
    texts = ["a <b>bold</b> claim & more", "<script>alert(1)</script>", 12345]  # not all str
    modes = [
        ModeView("x", 0, 0.2113, ["cap:1", "cap:2", "cap:3"], [0.5, 0.4, 0.3], texts=texts),
        ModeView("y", 6, -0.1534, ["cap:<9>", "cap:8", "cap:7"], [0.6, 0.2, 0.1], texts=["x", "y", "z"]),
    ]
    spec = dict(_fake_spec(), encoder_x="MiniLM <v2>", encoder_y="bag-of-words", skipped=["a", "b"])
    path = write_report(tmp_path, spec, modes)
    text = path.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "cap:&lt;9&gt;" in text
    assert "MiniLM &lt;v2&gt;" in text and "12345" in text and "2 skipped" in text
    assert "Context scores" not in text and "KMeans agreement" not in text  # nothing given
    assert "random pairs" not in text
    assert len(_attr_values(path, "src")) == 1  # only the spectrum


def test_report_names_same_model_by_weights(tmp_path):
    spec = dict(_fake_spec())
    spec["encoders"] = {
        "x": {"family": "open_clip", "model": "ViT-B-32", "pretrained": "openai"},
        "y": {"family": "open_clip", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
    }
    text = write_report(tmp_path / "a", spec, []).read_text(encoding="utf-8")
    assert "Modes ViT-B-32 (openai) captures and ViT-B-32 (laion2b_s34b_b79k) does not" in text
    spec["encoders"] = {"x": {"model": "resnet50"}, "y": {"model": "resnet50"}}
    text = write_report(tmp_path / "b", spec, []).read_text(encoding="utf-8")
    assert "Modes resnet50 (y) captures and resnet50 (x) does not" in text
    assert text.count("No mode reported in this direction") == 2


def test_report_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(SpecError, match="eigenvalues"):
        write_report(tmp_path, {"spec_diff": 1.0}, [])
    with pytest.raises(SpecError, match="NaN"):
        write_report(tmp_path, dict(_fake_spec(), eigenvalues=[0.1, float("nan")]), [])
    with pytest.raises(SpecError, match="ModeView"):
        write_report(tmp_path, _fake_spec(), [{"direction": "x"}])
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(SpecError, match="expected > 0"):
        ModeView("x", 0, -0.1, ["a"], [1.0])
    with pytest.raises(SpecError, match="one score per sample id"):
        ModeView("y", 0, -0.1, ["a", "b"], [1.0])
    with pytest.raises(SpecError, match="images"):
        ModeView("y", 0, -0.1, ["a"], [1.0], images=[])


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    path = write_report(tmp_path / "run", _fake_spec(), _image_modes(), {"linear_cka": 0.4321})
    shot = tmp_path / "shot.png"
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
        path.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20.0  # text, tables and plots, not a blank page
    dark = (pixels < 100).mean()
    assert 0.01 < dark < 0.6  # some dark ink (text, images), mostly light background
    if os.environ.get("SPEC_TORCH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SPEC_TORCH_KEEP_SCREENSHOT"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu():
    x, y = _correlated(n=300, p=6, q=6, noise=1.0, seed=7)
    xc, yc = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    on_gpu, on_cpu = metrics.LinearCKA(chunk_rows=64), metrics.LinearCKA()
    for lo in range(0, 300, 50):
        on_gpu.update(xc[lo : lo + 50], yc[lo : lo + 50])
    on_cpu.update(x, y)
    assert on_gpu.compute() == pytest.approx(on_cpu.compute(), abs=TOL_F64)
    assert metrics.mutual_knn_overlap(xc, yc, k=8) == pytest.approx(_knn_oracle(x, y, 8), abs=1e-12)
    tx, ty = metrics.mode_tightness(CosineKernel(), CosineKernel(), xc[:10], yc[:10])
    assert (tx, ty) == pytest.approx(metrics.mode_tightness(CosineKernel(), CosineKernel(), x[:10], y[:10]))
