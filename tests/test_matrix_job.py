"""The matrix job (spec_torch/apps/matrix.py, scripts/matrix.py): the offline demo end to end, its entries against
st.spec on the cached features, the presets composing with real model names, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import spec_torch as st
from spec_torch.apps.matrix import run
from spec_torch.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "spec_torch" / "apps" / "configs"
PRESETS = ["matrix_demo", "matrix_imagenet_models", "layers_clip_vs_dinov2"]
#: float32 cached features, float64 sums in both: only the summation order differs
TOL = 1e-8


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS / "matrix"), version_base="1.3"):
        return compose(config_name="matrix", overrides=overrides)


def _tiny(tmp_path, *extra):
    return _compose(
        [
            "experiment=matrix_demo",
            "data.n=48",
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
            "progress=false",
            "samples_per_mode=6",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix_demo")
    summary = run(_tiny(tmp))
    return tmp, summary


def test_demo_writes_matrix_json_and_report(demo):
    tmp, summary = demo
    out = tmp / "out"
    saved = json.loads((out / "matrix.json").read_text())
    names = ["colour", "shape", "cnn/layer1", "cnn/layer2", "cnn/layer3", "cnn/layer4"]
    assert saved["names"] == names and saved["n"] == 48
    sd, lead, cka = (np.asarray(saved[k]) for k in ("spec_diff", "lead", "cka"))
    assert sd.shape == lead.shape == cka.shape == (6, 6)
    assert np.all(np.diag(sd) == 0) and np.array_equal(sd, sd.T) and np.all(sd[~np.eye(6, dtype=bool)] > 0)
    assert np.allclose(np.diag(cka), 1.0)
    assert saved["settings"]["route"] == "joint" and saved["settings"]["eta"] == 1.0
    assert len(saved["pairs"]) == 3 and all(p["modes"] for p in saved["pairs"])
    for p in saved["pairs"]:
        for m in p["modes"]:
            assert (m["eigenvalue"] > 0) == (m["direction"] == "x") and len(m["top_rows"]) == 6
            assert set(m["purity"]) == {"shape", "colour", "texture", "word"}
    html = (out / "report.html").read_text()
    for part in ("SPEC-diff", "lead", "linear CKA", "dendrogram", "holds together"):
        assert part in html
    assert saved["encoders"]["cnn"]["sets"] == names[2:]


def test_demo_entries_equal_st_spec_on_the_cached_features(demo):
    tmp, summary = demo
    from spec_torch.apps.encoders.layers import build_layer_encoder, split_layers
    from spec_torch.apps.extract import FeatureCache, cache_folder

    cfg = _tiny(tmp)
    enc = build_layer_encoder(**OmegaConf.to_container(cfg.encoders.cnn))
    colour = build_layer_encoder(**OmegaConf.to_container(cfg.encoders.colour))
    from spec_torch.apps.data import build_dataset

    ds = build_dataset(**OmegaConf.to_container(cfg.data))
    layers = split_layers(FeatureCache.load(cache_folder(ds, enc, tmp / "cache")).features, enc.layer_dims)
    col = FeatureCache.load(cache_folder(ds, colour, tmp / "cache")).features
    names = summary["names"]
    for a, b in [("colour", "cnn/layer2"), ("cnn/layer1", "cnn/layer4")]:
        fa = col if a == "colour" else layers[a.split("/")[1]]
        fb = layers[b.split("/")[1]]
        ref = st.spec(
            np.array(fa), np.array(fb), method="features", accumulate_dtype=torch.float64, center=True
        )  # the demo centres both kernels
        got = summary["spec_diff"][names.index(a)][names.index(b)]
        assert abs(got - ref.spec_diff) <= TOL * ref.scale


def test_presets_compose_and_name_real_models():
    import open_clip
    import timm

    for preset in PRESETS:
        cfg = _compose(
            [f"experiment={preset}", "data.root=/nowhere"]
            if preset != "matrix_demo"
            else [f"experiment={preset}"]
        )
        assert len(cfg.encoders) >= 2
        for name, enc in cfg.encoders.items():
            if enc.family == "timm":
                assert timm.is_model(enc.model), (preset, name)
            if enc.family == "open_clip":
                assert enc.pretrained in open_clip.list_pretrained_tags_by_model(enc.model), (preset, name)
    demo = _compose(["experiment=matrix_demo"])
    n_sets = sum(len(e.get("layers") or [1]) for e in demo.encoders.values())
    assert n_sets >= 4


def test_bad_layer_names_the_encoder(tmp_path):
    with pytest.raises(SpecError, match=r"encoders\.cnn\.layers: 'layer9' is not a module"):
        run(_tiny(tmp_path, "encoders.cnn.layers=[layer9]"))
    assert not (tmp_path / "out" / "matrix.json").exists()
    with pytest.raises(SpecError, match="eta: expected a positive number"):
        run(_tiny(tmp_path, "eta=-1"))


def test_script_prints_one_error_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "matrix.py"),
            "experiment=matrix_demo",
            "top_k=0",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "error: top_k: expected a positive integer"
    )


def test_auto_sigma_is_fitted_on_a_sample_of_all_rows_not_the_first_batch(demo):
    """kernel sigma='auto': the job fits each set's kernel on a seeded uniform sample of the common rows (all
    48 here), as compare does, so the fitted kernels and the matrix do not depend on stream_batch_size (on
    the first batch, 16 rows against 48 would give other bandwidths)."""
    tmp, _ = demo
    runs = []
    for batch in (16, 48):
        cfg = _tiny(tmp, "kernel=gaussian", "kernel.sigma=auto", "kernel.rff_dim=64", "report=false")
        cfg.stream_batch_size, cfg.top_pairs = batch, 0
        cfg.output_dir = str(tmp / f"auto{batch}")
        runs.append(run(cfg))
    kernels = [r["settings"]["kernels"] for r in runs]
    assert kernels[0] == kernels[1]
    assert len({str(k) for k in kernels[0].values()}) == len(kernels[0])  # one bandwidth per set, not shared
    a, b = (np.asarray(r["spec_diff"]) for r in runs)
    assert np.allclose(a, b, rtol=TOL, atol=1e-12)


# ------------------------------------------------------------------------------ centring, uniform modes, flags
def _base(tmp_path, *extra):
    """The packaged default matrix job (colour against shape), tiny."""
    return _compose(
        [
            "data.n=48",
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
            "progress=false",
            "samples_per_mode=6",
            *extra,
        ]
    )


def test_center_true_is_a_setting_and_centres_every_entry(tmp_path):
    """`spec-torch matrix center=true` (fails on main: "Key 'center' is not in struct"): the entries are
    st.spec(center=True) on the cached features, matrix.json says so, no entry is uniform-led; a non-boolean
    center is one SpecError naming it."""
    from spec_torch.apps.data import build_dataset
    from spec_torch.apps.encoders.layers import build_layer_encoder
    from spec_torch.apps.extract import FeatureCache, cache_folder

    cfg = _base(tmp_path, "center=true", "report=false")
    summary = run(cfg)
    assert summary["settings"]["center"] is True
    ds = build_dataset(**OmegaConf.to_container(cfg.data))
    feats = {
        k: np.array(
            FeatureCache.load(
                cache_folder(
                    ds, build_layer_encoder(**OmegaConf.to_container(cfg.encoders[k])), tmp_path / "cache"
                )
            ).features
        )
        for k in ("colour", "shape")
    }
    ref = st.spec(
        feats["colour"], feats["shape"], method="features", accumulate_dtype=torch.float64, center=True
    )
    assert abs(summary["spec_diff"][0][1] - ref.spec_diff) <= TOL * ref.scale
    plain = st.spec(feats["colour"], feats["shape"], method="features", accumulate_dtype=torch.float64)
    assert abs(summary["spec_diff"][0][1] - plain.spec_diff) > 1e-3  # centring changed the entry
    assert np.all(np.asarray(summary["uniformity"]) == 0)
    assert summary["ranking"]["matrix"] == "spec_diff" and summary["ranking"]["uniform_entries"] == 0
    with pytest.raises(SpecError, match="center: expected true or false"):
        run(_base(tmp_path, "center=maybe"))


def test_demo_matrix_json_has_uniformity_flags_and_a_summary(demo):
    """The centred demo (fails on main: no uniformity, flags or summary in matrix.json): an [N, N] uniformity
    (all 0: centred), flags on every pair and mode from the closed FLAGS table, a summary in words naming
    the most different pair, which the report opens with."""
    from spec_torch.apps.report.flags import FLAGS, mode_flag_codes

    tmp, summary = demo
    saved = json.loads((tmp / "out" / "matrix.json").read_text())
    assert saved["settings"]["center"] is True
    assert np.asarray(saved["uniformity"]).shape == (6, 6) and np.all(np.asarray(saved["uniformity"]) == 0)
    for p in saved["pairs"]:
        assert p["flags"] == mode_flag_codes(p) and set(p["flags"]) <= set(FLAGS)
        for m in p["modes"]:
            assert "uniformity" in m and m["flags"] == mode_flag_codes(m)
    first = saved["pairs"][0]
    assert saved["summary"].startswith("Most different by SPEC-diff of the centred kernels: ")
    assert first["x"] in saved["summary"] and first["y"] in saved["summary"]
    html = (tmp / "out" / "report.html").read_text()
    assert 'class="finding"' in html and "Most different by SPEC-diff" in html
    for section in ("<h2>Encoders</h2>", "<h2>Settings</h2>", 'class="wide"'):
        assert section in html
    assert "%</td>" in html  # purity as percentages, as compare


def test_uncentred_ranking_and_headline_skip_uniform_led_entries(tmp_path):
    """The demo uncentred (fails on main: its "most different" were lead[cnn/layer*, colour], uniform modes of
    uniformity ~1): the uniform-led entries are flagged, the ranking says it skips them (cluster_diff) and
    neither the ranked pairs nor the headline rest on one."""
    summary = run(_tiny(tmp_path, "center=false", "report=false"))
    names = summary["names"]
    lead = np.asarray(summary["lead"])
    lead_u = np.asarray(summary["lead_uniformity"])
    uniform = lead_u > 0.9
    assert uniform.any(), "the uncentred demo should have uniform-led lead entries"
    assert all(
        bool(c) == u for row_c, row_u in zip(summary["lead_flags"], uniform) for c, u in zip(row_c, row_u)
    )
    assert summary["ranking"]["matrix"] == "cluster_diff" and "skipped" in summary["ranking"]["note"]
    clusters = np.asarray(summary["cluster_diff"])
    kept = np.where(uniform, 0.0, lead)
    assert np.allclose(clusters, np.maximum(kept, kept.T))
    for p in summary["pairs"]:
        i, j = names.index(p["x"]), names.index(p["y"])
        assert p["cluster_diff"] == pytest.approx(clusters[i, j])
    ranked = [p["cluster_diff"] for p in summary["pairs"]]
    assert ranked == sorted(ranked, reverse=True)
    # the largest uniform lead does not head the ranking
    v, i, j = max((lead[a, b], a, b) for a in range(6) for b in range(6) if uniform[a, b])
    assert {summary["pairs"][0]["x"], summary["pairs"][0]["y"]} != {names[i], names[j]} or clusters[i, j] < v
    head = summary["summary"]
    assert head.startswith("Most different by the largest lead that is not a uniform mode: ")
    assert f"{names[i]} over {names[j]}" in head and "uniform mode" in head
    assert f"{names[i]} holds together a group that {names[j]}" not in head


def test_script_writes_the_table_and_the_finding_to_matrix_log(tmp_path):
    """matrix.log (Hydra's run-folder log) holds the finding, the table and the ranked pairs (fails on main:
    one line, the table went to stdout only)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "matrix.py"),
            "data.n=48",
            "report=false",
            "progress=false",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "run" / "matrix.log").read_text()
    assert "SPEC-diff (row i, column j" in text and " 0 colour" in text and " 1 shape" in text
    assert "Most different by" in text and "most different pairs, ranked by" in text


#: docs/matrix.md quotes the centred demo's SPEC-diff to 3 decimals (rounding: 5e-4) and says "0.46-0.48"
#: / "0.998" of the uncentred run; a rerun on another machine sums in another order (~1e-12)
DOC_TOL = 6e-4


def _doc_table() -> tuple[list[str], np.ndarray]:
    """The centred SPEC-diff table of docs/matrix.md (the one after "SPEC-diff, centred:")."""
    text = (ROOT / "docs" / "matrix.md").read_text()
    block = text.split("SPEC-diff, centred:", 1)[1].strip().split("\n\n", 1)[0]
    rows = [r.strip().strip("|").split("|") for r in block.splitlines() if not set(r) <= set("|-: ")]
    names = [c.strip() for c in rows[0][1:]]
    return names, np.asarray([[float(c) for c in r[1:]] for r in rows[1:]])


def test_docs_quote_the_matrix_demo(tmp_path):
    """The figures docs/matrix.md quotes are what the demo prints (fails on main: the docs read the uncentred
    0.46-0.48 as colour's finding): the centred table, the headline, and the uncentred uniform-led entries."""
    base = [
        "experiment=matrix_demo",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        "report=false",
        "top_pairs=1",
    ]
    centred = run(_compose([*base, f"output_dir={tmp_path / 'c'}"]))
    names, table = _doc_table()
    assert names == centred["names"]
    assert np.abs(np.asarray(centred["spec_diff"]) - table).max() <= DOC_TOL
    doc = (ROOT / "docs" / "matrix.md").read_text()
    assert " ".join(centred["summary"].split()) in " ".join(doc.split())
    plain = run(_compose([*base, "center=false", f"output_dir={tmp_path / 'u'}"]))
    lead, lead_u = np.asarray(plain["lead"]), np.asarray(plain["lead_uniformity"])
    c = names.index("colour")
    stages = [names.index(f"cnn/layer{k}") for k in range(1, 5)]
    assert all(0.455 <= lead[s, c] <= 0.485 and lead_u[s, c] > 0.997 for s in stages)  # "0.46-0.48", "0.998"
    assert plain["ranking"]["uniform_entries"] == 13 and "13 lead entries" in doc


def _fake_matrix() -> dict:
    """An uncentred 3-set matrix.json dict: lead[b, a] = 0.5 is uniform-led, the real lead is a over c."""
    from spec_torch.apps.matrix import entry_flags

    lead = np.array([[0, 0.1, 0.3], [0.5, 0, 0.05], [0.02, 0.04, 0]])
    lead_u = np.array([[0, 0.1, 0.2], [0.99, 0, 0.1], [0.1, 0.3, 0]])
    sd = np.maximum(lead, lead.T)
    kept = np.where(lead_u > 0.9, 0, lead)
    return {
        "names": ["a", "b", "c"],
        "n": 10,
        "spec_diff": sd.tolist(),
        "lead": lead.tolist(),
        "lead_uniformity": lead_u.tolist(),
        "uniformity": np.where(sd == lead, lead_u, lead_u.T).tolist(),
        "entry_flags": entry_flags(np.where(sd == lead, lead_u, lead_u.T)),
        "lead_flags": entry_flags(lead_u),
        "cluster_diff": np.maximum(kept, kept.T).tolist(),
        "cka": None,
        "ranking": {
            "matrix": "cluster_diff",
            "skip_uniform": True,
            "uniform_entries": 1,
            "note": "ranked by x",
        },
        "settings": {"eta": 1.0, "center": False, "route": "groups", "kernels": {}},
        "pairs": [],
    }


def test_summary_without_pairs_names_the_ranked_matrix_not_the_uniform_entry(tmp_path):
    """No pair scored (the groups route): the finding names the largest cluster_diff entry (a vs c, 0.3), not the
    uniform-led SPEC-diff 0.5 of a vs b, and says that b over a is uniform; the report renders it."""
    from spec_torch.apps.report.matrix_html import matrix_summary, write_matrix_report

    result = _fake_matrix()
    text = matrix_summary(result)
    assert text.startswith("Most different by the largest lead that is not a uniform mode: a vs c (0.300)")
    assert "1 lead entries are led by a uniform mode, the largest b over a (0.500, uniformity 0.990)" in text
    result["summary"] = text
    html = write_matrix_report(tmp_path, result).read_text()
    assert f'<p class="finding">{escape(text)}</p>' in html and "<h2>Settings</h2>" in html


def test_heatmap_text_is_at_least_10pt_and_the_colour_bar_is_labelled(tmp_path, monkeypatch):
    """Every text of a heatmap (cell values, tick labels, colour bar) is at least 10 pt and the colour bar has
    a label (fails on main: 7 pt cells, 8 pt ticks, an unlabelled bar); marked cells end in "u"."""
    from spec_torch.apps.report import matrix_html

    saved = {}
    monkeypatch.setattr(matrix_html.plots, "_save", lambda fig, path, dpi: saved.setdefault("fig", fig))
    values = np.array([[0, 0.48, 0.1], [0.48, 0, 0.2], [0.1, 0.2, 0]])
    marks = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    matrix_html.plot_heatmap(
        values,
        ["colour", "cnn/layer1", "shape"],
        tmp_path / "h.png",
        title="t",
        colorbar="SPEC-diff",
        marks=marks,
    )
    fig = saved["fig"]
    fig.canvas.draw()  # tick labels exist once drawn
    texts = [
        t
        for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
        if t.get_text()
    ]
    assert texts and min(t.get_fontsize() for t in texts) >= matrix_html.CELL_FONT_PT >= 10
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert cells.count("0.480u") == 2 and "0.100" in cells
    assert fig.axes[1].get_ylabel() == "SPEC-diff"  # the colour bar's axis
