"""Deterministic spec.json (issue 17 item 6): R and G come from a cost model of the problem's sizes, never from
measured time or free memory; wall-clock times live only in the ``timings`` block."""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import pytest
import torch

from spec_torch import uncertainty as unc
from spec_torch.apps import compare
from spec_torch.errors import SpecError


def _without_timings(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "timings"}


def _demo(out: pathlib.Path) -> dict:
    return compare.run(["experiment=demo", f"output_dir={out}", "report=false"])


def test_demo_writes_the_same_spec_json_on_a_loaded_machine(tmp_path, monkeypatch):
    """The demo gets intervals (R = 200 over 32 groups) and the same spec.json, timings aside, when the clock
    runs 1000x slower (a loaded machine) and free memory differs. Fails on main: there R came from a timed
    probe of 2 replicates (here: off, "fewer than 20 replicates fit") and G from free memory."""
    idle = _demo(tmp_path / "idle")
    assert idle["uncertainty"]["enabled"] and idle["uncertainty"]["replicates"] == 200
    assert idle["uncertainty"]["groups"] == 32 and idle["spec_diff_ci"] is not None
    assert {"total_s", "solve_s"} <= set(idle["timings"])

    clock = itertools.count(0.0, 1000.0)  # every reading 1000 s after the last: everything looks slow
    monkeypatch.setattr(compare.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr("spec_torch._validate.memory_available", lambda device: 3 * 2**30)
    loaded = _demo(tmp_path / "loaded")
    assert loaded["timings"]["total_s"] > 1000  # the fake clock was read
    first = json.loads((tmp_path / "idle" / "spec.json").read_text())
    second = json.loads((tmp_path / "loaded" / "spec.json").read_text())
    assert _without_timings(first) == _without_timings(second)
    assert first["timings"] != second["timings"]


def _features(tmp: pathlib.Path, n: int, p: int, *overrides: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=g).numpy()
    y = (x + 0.5 * torch.randn(n, p, generator=g).numpy()).astype(np.float32)
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", y)
    return compare.run(
        [
            "data=features",
            f"data.x_path={tmp / 'x.npy'}",
            f"data.y_path={tmp / 'y.npy'}",
            f"output_dir={tmp / 'out'}",
            "device=cpu",
            "top_k=2",
            "report=false",
            *overrides,
        ]
    )


def test_features_runs_get_intervals_where_the_model_fits(tmp_path):
    """data=features: n = 2000, D = 80 fits 200 replicates; n = 700, D = 600 does not (40 solves of
    6 x 600^3 against a plain compare of about 2e10), and the note says so from the sizes."""
    fits = _features(tmp_path, 2000, 40)
    info = fits["uncertainty"]
    assert info["enabled"] and info["replicates"] == unc.plan_replicates(2000, 40, 40, 32) == 200
    assert fits["spec_diff_ci"] is not None
    big = _features(tmp_path, 700, 300)
    info = big["uncertainty"]
    assert not info["enabled"] and big["spec_diff_ci"] is None
    assert unc.plan_replicates(700, 300, 300, 32) == 0
    assert "GFLOP" in info["note"] and "budget 1" in info["note"]
    forced = _features(tmp_path, 700, 300, "uncertainty.budget=3")
    assert forced["uncertainty"]["replicates"] == unc.plan_replicates(700, 300, 300, 32, 3.0) >= 20


def test_free_memory_shortfall_is_an_error_not_another_output(tmp_path, monkeypatch):
    """Too little free memory for the group sums refuses the run (SpecError naming uncertainty.groups)
    instead of writing a spec.json without intervals. Fails on main: G was cut to fit, or turned off."""
    monkeypatch.setattr("spec_torch._validate.memory_available", lambda device: 1024)
    with pytest.raises(SpecError, match=r"^uncertainty\.groups: .*group sums"):
        _features(tmp_path, 400, 8)
    assert not (tmp_path / "out" / "spec.json").exists()


def test_max_overhead_is_refused_with_its_replacement(tmp_path):
    """The removed setting is an error that names uncertainty.budget (fails on main: it was accepted)."""
    with pytest.raises(SpecError, match=r"uncertainty\.max_overhead: removed.*uncertainty\.budget"):
        _features(tmp_path, 400, 8, "uncertainty.max_overhead=1.5")
    with pytest.raises(SpecError, match=r"uncertainty\.budget: expected a finite number > 0"):
        _features(tmp_path, 400, 8, "uncertainty.budget=0")
