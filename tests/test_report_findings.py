"""What the report says it found: the opening sentences, the mode overview, the flags (its own and those
other analyses append), titles on the per-mode image grids, and each sample's file."""

from __future__ import annotations

import html

import numpy as np
from PIL import Image

from spec_torch.apps.report import ModeView, write_report
from spec_torch.apps.report.flags import mode_flag_codes
from spec_torch.apps.report.html import SIZE_RULE, cluster_size
from spec_torch.apps.report.summary import build_summary

NAMES = {"x": "colour-net", "y": "shape-net"}


def _spec(**encoders) -> dict:
    return {
        "eigenvalues": [0.3, 0.1, 0.0, -0.05, -0.25],
        "spec_diff": 0.3,
        "n": 100,
        "eta": 1.0,
        "method": "features",
        "kernel_x": {"name": "cosine"},
        "kernel_y": {"name": "cosine"},
        "encoders": encoders or {"x": {"family": "colour-net"}, "y": {"family": "shape-net"}},
        "modes": {
            "x": [{"index": 0, "rank": 1, "eigenvalue": 0.3, "top_ids": ["a", "b", "c", "d"],
                   "tightness_x": 0.9, "tightness_y": 0.2, "purity": {"colour": 1.0, "shape": 0.5},
                   "dominant": {"colour": "red", "shape": "disc"}}],
            "y": [{"index": 4, "rank": 1, "eigenvalue": -0.25, "top_ids": ["e", "f"], "tightness_x": 0.3,
                   "tightness_y": 0.8, "labels": [["circle", 0.75], ["square", 0.25]]}],
        },
    }  # fmt: skip


def _modes(tight_y_of_x: float = 0.2) -> list[ModeView]:
    return [
        ModeView("x", 0, 0.3, ["a", "b", "c", "d"], [0.5, 0.4, 0.3, 0.1], tightness_x=0.9,
                 tightness_y=tight_y_of_x, purity={"colour": ("red", 1.0), "shape": ("disc", 0.5)}),
        ModeView("y", 4, -0.25, ["e", "f"], [0.6, 0.5], tightness_x=0.3, tightness_y=0.8,
                 labels=[("circle", 0.75), ("square", 0.25)]),
    ]  # fmt: skip


def test_opening_names_the_encoders_the_groups_and_the_strength():
    text = build_summary(_spec(), NAMES)["headline"]
    assert text.startswith(
        "colour-net holds together a group that is 100% colour=red, which shape-net does not"
    )
    assert "shape-net holds together a group that is 75% circle, which colour-net does not" in text
    assert "λ = +0.3" in text and "43%" in text  # 0.3 of |spectrum| 0.7
    assert "SPEC-diff, the largest |λ|, is 0.3 (mode x1)" in text
    empty = dict(_spec(), modes={"x": [], "y": []})
    assert build_summary(empty, NAMES)["headline"].startswith("No mode was reported")


def test_cluster_size_rule():
    assert cluster_size(_modes()[0]) == "3"  # 0.5, 0.4, 0.3 >= 0.25; 0.1 is not
    assert cluster_size(_modes()[1]) == "≥ 2"  # every listed sample: at least that large
    assert "half of its best score" in SIZE_RULE


def test_contradictory_mode_is_flagged_and_a_consistent_one_is_not():
    entry = _spec()["modes"]["x"][0]
    assert mode_flag_codes(entry) == []
    assert mode_flag_codes(dict(entry, tightness_y=0.95)) == ["contradictory"]
    assert mode_flag_codes(dict(entry, tightness_y=0.95, uniformity=0.99)) == ["uniform"]  # uniform says it


def test_report_opens_with_findings_overview_flags_and_titles(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    modes = _modes(tight_y_of_x=0.95)
    modes[0].images = images
    modes[0].paths = [f"/data/img/{s}.png" for s in modes[0].sample_ids]
    modes[1].flags.append("uniform: 0.98 overlap with the constant vector")  # appended by another analysis
    same = {"family": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}
    extra = {"flags": ["approximation: RFF error above 5%"]}
    spec = _spec(x=same, y=dict(same))
    spec["modes"]["x"][0]["tightness_y"] = 0.95
    text = html.unescape(write_report(tmp_path, spec, modes, extra).read_text())
    body = text[text.index("<body>") :]
    assert body.index("points to a group") < body.index("Modes at a glance") < body.index("Settings")
    assert body.index("Glossary") < body.index("Settings") == body.rindex("Settings")  # settings at the end
    assert "same encoder on both sides" in body and "approximation: RFF error above 5%" in body
    assert "contradictory: its top samples are tighter" in body and "uniform: 0.98 overlap" in body
    assert "share of |spectrum|" in body and "cluster size" in body and "100% colour=red" in body
    assert "/data/img/a.png" in body and "sample ids, files and scores" in body
    grid = Image.open(tmp_path / "plots" / "mode_x1.png")  # titled: taller than the untitled grid
    assert grid.size[1] > 112 + 16 + 12
