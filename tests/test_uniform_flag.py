"""Uniform modes (eigenvector close to the constant vector: a difference of kernel levels, not a cluster) are
flagged in plain words by the CLI summary and the report; the README's example comparison has one."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

import spec_torch as st
from spec_torch.apps.compare import _print_summary
from spec_torch.apps.report import write_report
from spec_torch.apps.report.flags import UNIFORM_THRESHOLD, approximation_line, flag_labels, uniform_modes


def _entry(rank: int, lam: float, uniformity: float | None) -> dict:
    out = {
        "index": rank,
        "rank": rank,
        "eigenvalue": lam,
        "top_ids": ["a", "b", "c"],
        "top_scores": [0.3] * 3,
    }
    out.update(tightness_x=0.5, tightness_y=0.4)
    if uniformity is not None:
        out["uniformity"] = uniformity
    return out


def _summary() -> dict:
    """A spec.json-shaped dict: y1 is uniform, x1 is a cluster, x2 has no uniformity (an older spec.json)."""
    return {
        "eigenvalues": [0.06, 0.02, -0.01, -0.6],
        "spec_diff": 0.6,
        "n": 2000,
        "eta": 1.0,
        "method": "features",
        "kernel_x": {"name": "cosine"},
        "kernel_y": {"name": "gaussian", "sigma": 1.0, "rff_dim": 500, "seed": 0},
        "skipped": {"count": 0, "ids": []},
        "metrics": {"linear_cka": 0.1, "mutual_knn": {"value": 0.2, "k": 10, "m": 2000}, "kmeans": {}},
        "modes": {
            "x": [_entry(1, 0.06, 0.05), _entry(2, 0.02, None)],
            "y": [_entry(1, -0.6, 0.998)],
        },
    }


def test_uniform_modes_flags_only_entries_above_the_threshold():
    summary = _summary()
    assert uniform_modes(summary["modes"]) == [("y", 1, -0.6, 0.998)]
    assert flag_labels(summary["modes"]["y"][0]) == ["uniform: kernel levels, not a group"]
    assert "uniform" not in " ".join(
        flag_labels(summary["modes"]["x"][0]) + flag_labels(summary["modes"]["x"][1])
    )
    # the threshold is strict and documented: a cluster of 81% of the samples has uniformity sqrt(0.81) = 0.9
    assert uniform_modes({"x": [_entry(1, 0.1, UNIFORM_THRESHOLD)]}) == []
    assert uniform_modes({"x": [_entry(1, 0.1, math.nextafter(UNIFORM_THRESHOLD, 1.0))]})
    assert uniform_modes(None) == [] and uniform_modes({"x": [], "y": []}) == []


def test_cli_summary_says_what_a_uniform_mode_means(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="spec_torch"):  # the CLI summary goes through logging
        _print_summary(_summary(), tmp_path / "spec.json")
    out = caplog.text
    lines = [r.getMessage() for r in caplog.records]
    y1 = next(line for line in lines if line.startswith("  mode y1"))
    x1 = next(line for line in lines if line.startswith("  mode x1"))
    assert "FLAGS: uniform: kernel levels, not a group" in y1 and "uniform" not in x1  # labels from FLAGS
    assert "average similarity" in out and "center=true" in out
    assert "random features" not in out  # no approximation entry, no line


def test_cli_summary_without_uniform_modes_has_no_flag(caplog, tmp_path):
    summary = _summary()
    summary["modes"]["y"][0]["uniformity"] = 0.2
    with caplog.at_level(logging.INFO, logger="spec_torch"):
        _print_summary(summary, tmp_path / "spec.json")
    assert "uniform" not in caplog.text.lower()


def test_report_flags_uniform_modes_in_words(tmp_path):
    summary = _summary()
    page = write_report(tmp_path / "flagged", summary, []).read_text()
    assert "Uniform modes (uniformity &gt; 0.9)" in page
    assert "average similarity" in page and "center=true" in page and "not a cluster" in page
    plain = copy.deepcopy(summary)
    for entries in plain["modes"].values():
        for e in entries:
            e.pop("uniformity", None)
    page = write_report(tmp_path / "plain", plain, []).read_text()
    assert "Uniform modes" not in page and "Random-feature error" not in page


def test_report_and_line_show_the_approximation_estimate(tmp_path):
    summary = _summary()
    summary["approximation"] = {
        "method": "rff-vs-exact-subsample",
        "subsample": 1000,
        "n": 2000,
        "seeds": [0, 1, 2, 3],
        "top": 3,
        "rff_dim": {"x": None, "y": 500},
        "extremes": [
            {
                "rank": "+1",
                "exact": 0.05,
                "rff_mean": 0.055,
                "rel_error": 0.1,
                "rel_bias": 0.1,
                "seed_spread": 0.02,
            }
        ],
        "rel_error_mean": 0.1,
        "rel_bias_mean": 0.1,
        "seed_spread": 0.02,
        "spec_diff": {"exact": 0.05, "rff_mean": 0.055, "rel_error": 0.1},
    }
    line = approximation_line(summary["approximation"])
    assert line.startswith(
        "random features: extreme eigenvalues off by about 10.0% (magnitude inflated by 10.0%"
    )
    assert "on 1000 rows" in line and approximation_line(None) == ""
    page = write_report(tmp_path, summary, []).read_text()
    assert "Random-feature error (estimate)" in page and "RFF λ (mean)" in page
    assert "approximation.method" not in page  # not repeated as a settings row


def test_report_labels_keep_the_one_over_n(tmp_path):
    page = write_report(tmp_path, _summary(), []).read_text()
    assert "(K_X − η K_Y) / n" in page
    assert "‖K_X − η K_Y‖" not in page and "L = K_X − η K_Y" not in page


def _uniformity(res: st.SpecResult, x: torch.Tensor, y: torch.Tensor, mode: int) -> float:
    """|<v_k, 1>| / sqrt(n) from the unit-norm sample scores (SpecResult.uniformity once it exists)."""
    v = res.sample_scores(x, y, modes=[mode])[:, 0].double()  # [n]
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    return float(v.sum().abs()) / math.sqrt(x.shape[0])


def test_readme_example_top_mode_is_flagged_uniform():
    """README: cosine x vs Gaussian-RFF y. Its largest |eigenvalue| is the difference of the kernels' levels:
    the mode is flagged; the planted cluster (rows < 100) is a different, non-uniform mode."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 64, generator=g), torch.randn(2000, 32, generator=g)
    x[:100] = torch.randn(64, generator=g) * 3 + 0.1 * torch.randn(100, 64, generator=g)
    res = st.spec(
        x, y, kernel_x="cosine", kernel_y=st.GaussianKernel(sigma="auto", rff_dim=500, seed=0), eta=1.0
    )
    top = int(res.eigenvalues.abs().argmax())
    u_top = _uniformity(res, x, y, top)
    assert u_top > UNIFORM_THRESHOLD
    cluster = res.positive_modes(1)[0]
    assert cluster != top and _uniformity(res, x, y, cluster) < UNIFORM_THRESHOLD
    direction = "x" if res.eigenvalues[top] > 0 else "y"
    modes = {"x": [], "y": []}
    modes[direction].append({"rank": 1, "eigenvalue": float(res.eigenvalues[top]), "uniformity": u_top})
    assert uniform_modes(modes) == [(direction, 1, float(res.eigenvalues[top]), u_top)]
