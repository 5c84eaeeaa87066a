"""What the report says it found: the opening sentences, the mode overview, the flags (its own and those
other analyses append), titles on the per-mode image grids, and each sample's file."""

from __future__ import annotations

import html

import numpy as np
from PIL import Image

from spec_torch.apps.report import ModeView, write_report
from spec_torch.apps.report.html import SIZE_RULE, cluster_size, mode_flags, verdict

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
    }


def _modes(tight_y_of_x: float = 0.2) -> list[ModeView]:
    return [
        ModeView("x", 0, 0.3, ["a", "b", "c", "d"], [0.5, 0.4, 0.3, 0.1], tightness_x=0.9,
                 tightness_y=tight_y_of_x, purity={"colour": ("red", 1.0), "shape": ("disc", 0.5)}),
        ModeView("y", 4, -0.25, ["e", "f"], [0.6, 0.5], tightness_x=0.3, tightness_y=0.8,
                 labels=[("circle", 0.75), ("square", 0.25)]),
    ]  # fmt: skip


def test_opening_names_the_encoders_the_groups_and_the_strength():
    text = verdict(_spec(), _modes(), NAMES)
    assert text.startswith(
        "colour-net holds together a group that is 100% colour=red, which shape-net does not"
    )
    assert "shape-net holds together a group that is 75% circle, which colour-net does not" in text
    assert "λ = +0.3" in text and "43%" in text  # 0.3 of |spectrum| 0.7
    assert "SPEC-diff, the largest |λ|, is 0.3" in text
    assert "No mode was reported" in verdict(_spec(), [], NAMES)


def test_cluster_size_rule():
    assert cluster_size(_modes()[0]) == "3"  # 0.5, 0.4, 0.3 >= 0.25; 0.1 is not
    assert cluster_size(_modes()[1]) == "≥ 2"  # every listed sample: at least that large
    assert "half of its best score" in SIZE_RULE


def test_contradictory_mode_is_flagged_and_a_consistent_one_is_not():
    assert mode_flags(_modes()[0], NAMES) == []
    (flag,) = mode_flags(_modes(tight_y_of_x=0.95)[0], NAMES)
    assert flag.startswith("contradictory: captured by colour-net") and "tighter under shape-net" in flag


def test_report_opens_with_findings_overview_flags_and_titles(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    modes = _modes(tight_y_of_x=0.95)
    modes[0].images = images
    modes[0].paths = [f"/data/img/{s}.png" for s in modes[0].sample_ids]
    modes[1].flags.append("uniform: 0.98 overlap with the constant vector")  # appended by another analysis
    same = {"family": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}
    extra = {"flags": ["approximation: RFF error above 5%"]}
    text = html.unescape(write_report(tmp_path, _spec(x=same, y=dict(same)), modes, extra).read_text())
    body = text[text.index("<body>") :]
    assert body.index("holds together") < body.index("Modes at a glance") < body.index("Settings")
    assert "same encoder on both sides" in body and "approximation: RFF error above 5%" in body
    assert "contradictory: captured by" in body and "uniform: 0.98 overlap" in body
    assert "share of |spectrum|" in body and "cluster size" in body and "colour=red 100%" in body
    assert "/data/img/a.png" in body and "sample ids, files and scores" in body
    grid = Image.open(tmp_path / "plots" / "mode_x1.png")  # titled: taller than the untitled grid
    assert grid.size[1] > 112 + 16 + 12
