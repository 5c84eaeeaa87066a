"""The random-feature error estimate (spec_torch.approx.rff_error_estimate) against the exact answer, and its
place in the compare pipeline's spec.json, CLI summary and report."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from oracle import difference, spectrum
from sklearn.datasets import load_digits
from test_compare import CONFIGS, planted_features

import spec_torch as st
from spec_torch.approx import APPROX_METHOD, rff_error_estimate, uses_random_features
from spec_torch.apps.compare import run
from spec_torch.errors import SpecError

#: the estimate (on a subsample, mean over frequency seeds) and the error of one full-data run differ by the
#: seed-to-seed spread and by the subsample; the issue's contract is a factor of 3 either way
BRACKET = 3.0
#: the estimate's exact extremes are eigenvalues of a dense float64 solve: they match the scipy oracle to
#: float64 rounding of an n x n eigh (relative to SPEC-diff)
ORACLE_RTOL = 1e-10


def _extremes(evals: np.ndarray, top: int = 3) -> np.ndarray:
    return np.concatenate([evals[:top], evals[::-1][:top]])


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw 64-pixel digits vs an 8-d random projection of them: real data, two different geometries."""
    x = load_digits().data.astype(np.float64)[:1000]  # [1000, 64]
    y = x @ np.random.default_rng(0).standard_normal((64, 8))  # [1000, 8]
    return torch.from_numpy(x), torch.from_numpy(y)


def test_estimate_brackets_the_true_full_data_error_on_digits(digits):
    """Full-data RFF route vs full-data exact route (Gaussian kernels, median sigma): the estimate on a
    400-row subsample is within a factor of 3 of the true mean relative error of the top-3/bottom-3."""
    x, y = digits
    sx = st.GaussianKernel(sigma="auto").fit(x).sigma
    sy = st.GaussianKernel(sigma="auto").fit(y).sigma
    exact = st.spec(x, y, st.GaussianKernel(sigma=sx), st.GaussianKernel(sigma=sy), method="exact")
    assert exact.method == "exact"
    for m in (100, 300):
        kx, ky = (
            st.GaussianKernel(sigma=sx, rff_dim=m, seed=0),
            st.GaussianKernel(sigma=sy, rff_dim=m, seed=0),
        )
        rff = st.spec(x, y, kx, ky, method="exact")  # the RFF kernel matrices, solved densely
        ex, ap = _extremes(exact.eigenvalues.numpy()), _extremes(rff.eigenvalues.numpy())
        true = float(np.mean(np.abs(ap - ex) / np.abs(ex)))
        est = rff_error_estimate(x, y, kx, ky, subsample=400, seeds=(0, 1, 2))
        assert est["method"] == APPROX_METHOD and est["subsample"] == 400 and est["n"] == 1000
        assert est["rff_dim"] == {"x": m, "y": m} and [e["rank"] for e in est["extremes"]] == [
            "+1", "+2", "+3", "-1", "-2", "-3"
        ]  # fmt: skip
        assert true / BRACKET <= est["rel_error_mean"] <= BRACKET * true, (m, true, est["rel_error_mean"])
        assert est["seed_spread"] > 0
        assert est["spec_diff"]["exact"] == pytest.approx(max(abs(e["exact"]) for e in est["extremes"]))


def test_exact_extremes_match_the_dense_oracle_on_the_subsample():
    """The estimate's exact side is the exact Gaussian with the comparison's sigma, on the seeded subsample."""
    x, y = planted_features(n=150, seed=3)  # float32 input: the estimate works in float64
    kx = st.GaussianKernel(sigma=2.5, rff_dim=50, seed=4)
    est = rff_error_estimate(x, y, kx, "cosine", eta=0.7, subsample=90, seeds=(5, 6), sample_seed=11)
    rows = np.sort(np.random.default_rng(11).choice(150, size=90, replace=False))
    ev, _ = spectrum(difference(x[rows], y[rows], "gaussian", "cosine", eta=0.7, sigma_x=2.5))
    want = {"+1": ev[0], "+2": ev[1], "+3": ev[2], "-1": ev[-1], "-2": ev[-2], "-3": ev[-3]}
    got = {e["rank"]: e["exact"] for e in est["extremes"]}
    assert set(got) <= set(want) and "+1" in got and "-1" in got
    for rank, lam in got.items():
        assert lam == pytest.approx(want[rank], abs=ORACLE_RTOL * abs(ev).max())
    assert est["rff_dim"] == {"x": 50, "y": None} and est["seeds"] == [5, 6]


def test_error_shrinks_with_more_random_features(digits):
    x, y = (t[:300] for t in digits)
    est = {
        m: rff_error_estimate(
            x, y, st.GaussianKernel(rff_dim=m), st.GaussianKernel(rff_dim=m), seeds=(0, 1, 2)
        )
        for m in (20, 2000)
    }
    assert est[2000]["rel_error_mean"] < est[20]["rel_error_mean"] / 3
    assert est[2000]["seed_spread"] < est[20]["seed_spread"] / 3


def test_uses_random_features():
    assert uses_random_features(st.GaussianKernel(rff_dim=8))
    assert not uses_random_features(st.GaussianKernel(rff_dim=None))
    assert not uses_random_features(st.CosineKernel())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_x": "cosine", "kernel_y": "linear"}, "neither uses random features"),
        ({"seeds": (1,)}, "seeds: expected at least 2 distinct"),
        ({"seeds": (1, 1)}, "seeds: expected at least 2 distinct"),
        ({"subsample": 0}, "subsample"),
        ({"top": 0}, "top"),
        ({"eta": -1.0}, "eta"),
    ],
)
def test_bad_input_raises_spec_error(kwargs, match):
    x, y = planted_features(n=40)
    args = {"kernel_x": st.GaussianKernel(rff_dim=8), "kernel_y": "cosine", **kwargs}
    with pytest.raises(SpecError, match=match):
        rff_error_estimate(x, y, **args)
    with pytest.raises(SpecError, match="x"):
        rff_error_estimate(x, y[:-1], st.GaussianKernel(rff_dim=8), "cosine")


# --------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def features(tmp_path_factory):
    work = tmp_path_factory.mktemp("approx")
    x, y = planted_features(n=120)
    np.save(work / "x.npy", x)
    np.save(work / "y.npy", y)
    return work


def _cfg(work, name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS / "compare"), version_base="1.3"):
        return compose(
            config_name="compare",
            overrides=[
                "data=features",
                f"data.x_path={work / 'x.npy'}",
                f"data.y_path={work / 'y.npy'}",
                "top_k=2",
                "samples_per_mode=5",
                "progress=false",
                f"output_dir={work / name}",
                *overrides,
            ],
        )


def test_compare_reports_the_estimate_when_random_features_are_used(features, caplog):
    with caplog.at_level(logging.INFO, logger="spec_torch"):  # the CLI summary goes through logging
        spec = run(
            _cfg(features, "rff", "kernel@kernel_x=gaussian", "kernel_x.rff_dim=64", "kernel_x.seed=3")
        )
    approx = json.loads((features / "rff" / "spec.json").read_text())["approximation"]
    assert approx == spec["approximation"]
    assert approx["method"] == APPROX_METHOD and approx["n"] == 120 and approx["subsample"] == 120
    assert approx["rff_dim"] == {"x": 64, "y": None}
    # the same numbers as the library function on the same rows with the run's fitted kernel
    x, y = planted_features(n=120)
    kx = st.GaussianKernel(sigma=spec["kernel_x"]["sigma"], rff_dim=64, seed=3)
    again = rff_error_estimate(x, y, kx, "cosine", subsample=120)
    assert approx["rel_error_mean"] == pytest.approx(again["rel_error_mean"], rel=1e-9)
    assert "random features: extreme eigenvalues off by about" in caplog.text
    html = (features / "rff" / "report.html").read_text()
    assert "Random-feature error (estimate)" in html and "seed spread" in html


@pytest.mark.parametrize("setting", ["auto", "false"])
def test_no_estimate_without_random_features_or_when_off(features, setting):
    extra = ["kernel@kernel_x=gaussian", "kernel_x.rff_dim=32"] if setting == "false" else []
    spec = run(_cfg(features, f"off_{setting}", f"approx_error={setting}", "report=false", *extra))
    assert "approximation" not in spec


def test_bad_approx_error_setting_is_named(features):
    with pytest.raises(SpecError, match="approx_error"):
        run(_cfg(features, "bad", "approx_error=sometimes"))
    with pytest.raises(SpecError, match="approx_error: true needs"):
        run(_cfg(features, "bad2", "approx_error=true", "report=false"))
