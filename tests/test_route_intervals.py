"""Intervals on every route: the exact route (kernels without a feature map) and the dual solve (D > n) resample an
exact factor of L (spec_torch.factor_intervals), and agree with the features route's group sums where both apply.

Every test here fails on the main branch before this change: ``st.spec(..., replicates=R)`` refused the exact route
and exact kernels (SpecError), solved the dual case in the D x D features route, accepted ``groups=2`` and blamed
``groups`` for 3 rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import difference, gram, spectrum

import spec_torch as st
from spec_torch import factor_intervals as fi
from spec_torch import uncertainty as unc

pytestmark = pytest.mark.usefixtures("one_thread")

#: float64 solves of the same resampled operator through two exact factors: eigenvalues (and the interval ends,
#: which are replicate eigenvalues or interpolations of two) agree to about 1e-13 of the scale; held-out values
#: pass through two more products (measured 4e-11 on the Gaussian case)
CI_RTOL = 1e-9
#: the factor's replicate spectra against eigh of the dense resampled L (float64, n <= 200)
ORACLE_RTOL = 1e-10


def planted(n: int, p: int, q: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x holds a 20% cluster (shift along e_0, class-sorted rows); y independent of x: L has full rank min(n, D)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    x[: n // 5, 0] += 4.0
    return x, torch.randn(n, q, generator=g, dtype=torch.float64)


def grouped_features(fx: torch.Tensor, fy: torch.Tensor, kernel: str, seed: int) -> st.DiffCovariance:
    """The features route's group sums of explicit features, groups as st.spec assigns them (row = index)."""
    acc = st.DiffCovariance(kernel, kernel, groups=32, group_seed=seed)
    return acc.update(fx, fy, index=torch.arange(fx.shape[0]))


def assert_same_intervals(a: st.SpecResult, b: st.SpecResult, scale: float) -> None:
    """Per-mode intervals, held-out values and stability of the live modes of two results of the same L."""
    live_a, live_b = a.eigenvalues.abs() > a.zero_tol, b.eigenvalues.abs() > b.zero_tol
    assert int(live_a.sum()) == int(live_b.sum()) > 0
    tol = CI_RTOL * scale
    torch.testing.assert_close(a.eigenvalues[live_a], b.eigenvalues[live_b], atol=tol, rtol=0)
    torch.testing.assert_close(a.eigenvalue_ci[live_a], b.eigenvalue_ci[live_b], atol=tol, rtol=0)
    # NaN (in both) for modes beyond the rank a half of the data can fit: their held-out direction is the half's
    # mode of the same sign and rank, which does not exist there (issue 17, spec_torch.uncertainty)
    torch.testing.assert_close(
        a.heldout_eigenvalues[live_a], b.heldout_eigenvalues[live_b], atol=tol, rtol=0, equal_nan=True
    )
    torch.testing.assert_close(a.stability[live_a], b.stability[live_b], atol=0, rtol=0)
    np.testing.assert_allclose(a.spec_diff_ci, b.spec_diff_ci, atol=tol, rtol=0)
    assert not bool(torch.isnan(b.eigenvalue_ci[live_b]).any())


def empirical_kernel_map(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """Rows of F with F F^T = K (the dense Gaussian gram of tests/oracle.py), eigenvalues below 1e-12 dropped."""
    k = torch.from_numpy(gram(a.numpy(), "gaussian", sigma))
    w, v = torch.linalg.eigh(k)
    keep = w > 1e-12 * w.max()
    return v[:, keep] * w[keep].sqrt()


def test_exact_route_gaussian_intervals_equal_the_features_route_on_its_kernel_map():
    """Gaussian kernels without random features (the exact route) get intervals; they are the features route's
    intervals of the linear kernels on the empirical kernel maps (K = F F^T, a different exact factor)."""
    x, y = planted(200, 3, 3)
    kx, ky = st.GaussianKernel(sigma=1.0), st.GaussianKernel(sigma=1.5)
    res = st.spec(x, y, kx, ky, replicates=30, seed=1)
    assert res.method == "exact" and res.uncertainty["route"] == "exact"
    assert res.uncertainty["replicate_solve"] == "full" and res.uncertainty["factor_rank"] <= 200
    ref = st.spec(x, y, kx, ky, method="exact")  # the point estimates stay the exact route's
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, atol=0, rtol=0)
    acc = grouped_features(empirical_kernel_map(x, 1.0), empirical_kernel_map(y, 1.5), "linear", seed=1)
    assert_same_intervals(acc.compute(replicates=30, seed=1), res, res.scale)
    lo, hi = res.eigenvalue_ci[0].tolist()
    assert lo <= float(res.eigenvalues[0]) <= hi and hi - lo < 0.5 * float(res.eigenvalues[0])


def test_dual_route_cosine_intervals_equal_the_group_sums_of_its_features():
    """Cosine kernels with D = 270 > n = 200: the dual solve resamples the factor of L (rank <= n) and gets the
    intervals of the D x D group sums."""
    x, y = planted(200, 150, 120)
    res = st.spec(x, y, method="features", replicates=30, seed=1)
    assert res.solver == "dual" and res.uncertainty["route"] == "dual"
    assert res.uncertainty["solve_size"] == 200 < 270
    acc = grouped_features(x, y, "cosine", seed=1)
    assert_same_intervals(acc.compute(replicates=30, seed=1), res, res.scale)
    auto = st.spec(x, y, replicates=30, seed=1)  # auto takes the n x n route here (cheaper than D x D)
    assert auto.method == "exact" and auto.uncertainty["route"] == "exact"
    assert_same_intervals(auto, res, res.scale)


@pytest.mark.parametrize(
    ("kernel", "center", "top_k"), [("linear", False, None), ("cosine", True, None), ("cosine", False, 3)]
)
def test_exact_and_features_routes_agree_where_both_apply(kernel, center, top_k):
    """Small p: the exact route's factor and the features route's group sums give the same intervals, centred
    (each resample centred on its own means) and with top_k (the exact solve's modes matched in the full factor)."""
    x, y = planted(300, 6, 5)
    kw = dict(replicates=30, seed=2, center=center, top_k=top_k)
    feat = st.spec(x, y, kernel, kernel, method="features", **kw)
    exact = st.spec(x, y, kernel, kernel, method="exact", **kw)
    assert feat.method == "features" and exact.method == "exact" and exact.uncertainty["route"] == "exact"
    assert exact.uncertainty["unmatched_modes"] == []
    assert feat.uncertainty["route"] == "features" and feat.uncertainty["solve_size"] == 11  # D = 6 + 5
    assert exact.uncertainty["solve_size"] == exact.uncertainty["factor_rank"] <= 11
    assert_same_intervals(feat, exact, exact.scale)


def test_factor_reproduces_every_row_resampled_difference_matrix():
    """Dense oracle: rows taken w_i times (a bootstrap over groups): the factor's weighted C has the spectrum of
    eigh of L built from the resampled rows themselves."""
    x, y = planted(120, 3, 4)
    lmat = torch.from_numpy(difference(x.numpy(), y.numpy(), "gaussian", "cosine", sigma_x=1.2))
    evals, vecs = torch.linalg.eigh(lmat)
    fx, fy = fi.difference_factor(evals, vecs, 120, tol=1e-10 * 2)
    acc = st.DiffCovariance("linear", "linear", groups=8).update(fx, fy, index=torch.arange(120))
    w = torch.tensor([[2.0, 0, 1, 1, 3, 0, 1, 0], [0, 1, 1, 2, 0, 2, 1, 1]], dtype=torch.float64)
    jv = torch.cat([torch.ones(fx.shape[1]), -torch.ones(fy.shape[1])]).double()
    keep = fx.shape[1] + fy.shape[1]
    lam, _ = unc._solve_batch(unc._weighted_covariances(acc.group_state, w, 1.0), jv, keep=keep)
    gid = unc.assign_groups(torch.arange(120), 8, 0).numpy()
    for r in range(2):
        rows = np.concatenate([np.flatnonzero(gid == g) for g in range(8) for _ in range(int(w[r, g]))])
        lw = difference(x.numpy()[rows], y.numpy()[rows], "gaussian", "cosine", sigma_x=1.2)
        want, _ = spectrum(lw)  # [n_w]: duplicated rows add exact zeros
        tol = ORACLE_RTOL * abs(want).max()
        got = lam[r].numpy()
        np.testing.assert_allclose(np.sort(got[abs(got) > tol]), np.sort(want[abs(want) > tol]), atol=tol)


def test_replicates_need_16_samples_and_8_groups():
    """groups=2 gave 3 distinct resamples silently; 3 rows blamed ``groups``, which the user never set."""
    x, y = planted(40, 5, 5)
    with pytest.raises(st.SpecError, match=r"too few samples \(n=3\) for replicates: need at least 16"):
        st.spec(x[:3], y[:3], replicates=10)
    with pytest.raises(st.SpecError, match=r"too few samples \(n=15\)"):
        st.spec(x[:15], y[:15], replicates=10)
    with pytest.raises(st.SpecError, match="groups: replicates need at least 8 groups, got 2"):
        st.spec(x, y, replicates=10, groups=2)
    with pytest.raises(st.SpecError, match="replicates: expected an integer >= 2"):
        st.spec(x, y, replicates=1)
    res = st.spec(x[:16], y[:16], replicates=10)  # the least that runs: 8 groups of 2 on average
    assert res.uncertainty["groups"] == 8
    with pytest.raises(st.SpecError, match="groups: replicates need at least 8 groups, got 4"):
        st.DiffCovariance(groups=4).update(x, y).compute(replicates=10)  # on main: a warning, then intervals


def test_memory_is_checked_before_the_factor_is_allocated(monkeypatch):
    """The group sums of the factor (G + 14 matrices r x r) are refused up front, naming replicates and bytes."""
    import spec_torch._validate as validate

    x, y = planted(100, 3, 3)
    kx = st.GaussianKernel(sigma=1.0)
    monkeypatch.setattr(validate, "memory_available", lambda device: 2**20)  # the exact route itself fits
    with pytest.raises(st.SpecError, match=r"replicates: intervals on the exact route with n = 100 .* GiB"):
        st.spec(x, y, kx, kx, replicates=10, reference=False)


def test_above_the_rank_cap_the_replicates_solve_the_strongest_modes(monkeypatch):
    """Rank above FULL_SOLVE_MAX_RANK: top-k replicate solves, said in ``uncertainty``; the strongest modes get
    the full solve's intervals, the others none."""
    x, y = planted(200, 3, 3)
    kx = st.GaussianKernel(sigma=1.0)
    full = st.spec(x, y, kx, "cosine", replicates=20, seed=0)
    monkeypatch.setattr(fi, "FULL_SOLVE_MAX_RANK", 10)
    monkeypatch.setattr(fi, "CAPPED_TOP_K", 2)
    capped = st.spec(x, y, kx, "cosine", replicates=20, seed=0)
    assert capped.uncertainty["replicate_solve"] == "top_k" and capped.uncertainty["replicate_top_k"] == 2
    strongest = capped.positive_modes(2) + capped.negative_modes(2)
    assert not bool(torch.isnan(capped.eigenvalue_ci[strongest]).any())
    rest = [k for k in range(capped.eigenvalues.numel()) if k not in strongest]
    assert bool(torch.isnan(capped.eigenvalue_ci[rest]).all())
    torch.testing.assert_close(
        capped.eigenvalue_ci[0], full.eigenvalue_ci[0], atol=CI_RTOL * full.scale, rtol=0
    )


def test_modes_that_do_not_match_the_factor_are_skipped_loudly(monkeypatch):
    monkeypatch.setattr(fi, "AGREE_OVERLAP", 1.5)  # no factor mode can match
    x, y = planted(100, 3, 3)
    with pytest.warns(UserWarning, match="did not match a mode of its exact factor"):
        res = st.spec(x, y, "cosine", "cosine", method="exact", replicates=10)
    assert bool(torch.isnan(res.eigenvalue_ci).all())
    assert res.uncertainty["unmatched_modes"] == [
        k for k in range(res.eigenvalues.numel()) if abs(float(res.eigenvalues[k])) > res.zero_tol
    ]


# ------------------------------------------------------------------------------ aligned sample_scores columns
@pytest.mark.parametrize("method", ["features", "exact"])
def test_sample_scores_column_k_is_the_mode_of_eigenvalue_k_with_a_cut_zero(method):
    """x and y share the direction z_0 (linear kernels): L has cut zero eigenvalues between the positive and the
    negative modes. Column k is the eigenvector of ``eigenvalues[k]`` (dense oracle, up to sign), NaN where the
    eigenvalue is zero; top_samples skips those modes and names the modes it scored. Fails on main: the columns
    of the nonzero modes only, so every negative mode's column was another mode's (or out of range)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(150, 5, generator=g, dtype=torch.float64)
    x, y = z[:, :3], torch.cat([z[:, :1], z[:, 3:]], 1)  # z_0 on both sides: its contribution cancels
    res = st.spec(x, y, "linear", "linear", method=method)
    zero = res.eigenvalues.abs() <= res.zero_tol
    assert bool(zero.any()) and bool((res.eigenvalues[~zero] < 0).any())
    assert int(zero.nonzero().min()) < int((res.eigenvalues < -res.zero_tol).nonzero().max())  # a zero before
    scores = res.sample_scores(x, y)
    assert scores.shape == (150, res.eigenvalues.numel())
    assert bool(torch.isnan(scores[:, zero]).all()) and not bool(torch.isnan(scores[:, ~zero]).any())
    want_vals, want_vecs = spectrum(difference(x.numpy(), y.numpy(), "linear", "linear"))
    for k in (~zero).nonzero().flatten().tolist():
        j = int(np.abs(want_vals - float(res.eigenvalues[k])).argmin())
        assert abs(float(want_vals[j] - res.eigenvalues[k])) < 1e-10
        assert abs(float(want_vecs[:, j] @ scores[:, k].numpy())) > 1 - 1e-8  # the same unit vector
    top = res.top_samples((x, y), k=5)
    assert top.modes == (~zero).nonzero().flatten().tolist()
    for row, mode in enumerate(top.modes):
        col = scores[:, mode]
        torch.testing.assert_close(top.scores[row], col[top.indices[row]], atol=1e-10, rtol=0)
    with pytest.raises(st.SpecError, match="numerically zero"):
        res.sample_scores(x, y, modes=[int(zero.nonzero()[0])])


@pytest.mark.parametrize("method", ["exact", "features"])
def test_identical_embeddings_on_the_exact_route_give_a_zero_spec_diff_interval(method):
    """L = 0 (rank 0 at the route's resolution): every resampled L is 0; no mode to give an interval."""
    x, _ = planted(60, 80, 5)  # D = 160 > n: method="features" solves in the dual
    res = st.spec(x, x, replicates=10, method=method)
    assert res.uncertainty["factor_rank"] == 0 and res.spec_diff_ci == (0.0, 0.0)
    assert bool(torch.isnan(res.eigenvalue_ci).all())


def test_close_float32_embeddings_get_the_same_intervals_on_both_routes():
    """The hard case: y = x + 1e-3 noise, float32, class-sorted rows (SPEC-diff about 2e-4): the exact route's
    factor and the features route's group sums agree (measured 4e-14)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    x[:60, 0] += 4.0
    y = x + 1e-3 * torch.randn(300, 6, generator=g)
    feat = st.spec(x, y, replicates=30, seed=2, method="features")
    exact = st.spec(x, y, replicates=30, seed=2, method="exact")
    assert exact.uncertainty["route"] == "exact" and exact.uncertainty["unmatched_modes"] == []
    assert_same_intervals(feat, exact, exact.scale)
    assert exact.eigenvalue_ci[0, 0] <= exact.eigenvalues[0] <= exact.eigenvalue_ci[0, 1]


def test_compare_job_gets_intervals_on_the_exact_route(tmp_path):
    """The compare job on the n x n route (method=exact) plans replicates of an exact factor of L from sizes and
    writes intervals; on main it logged "off: method=exact" and wrote none. The exact route's intervals equal
    the features route's on the same data (the demo's cosine kernels): the same groups and seed resample the
    same rows, and both routes solve the same resampled L."""
    from spec_torch.apps.compare import run

    common = ["experiment=demo", "uncertainty.replicates=40", "report=false"]
    exact = run([*common, "method=exact", f"output_dir={tmp_path / 'exact'}"])
    feats = run([*common, "method=features", f"output_dir={tmp_path / 'features'}"])
    assert exact["method"] == "exact" and feats["method"] == "features"
    plan = exact["uncertainty"]
    assert plan["enabled"] and plan["replicates"] == 40 and "exact factor of L" in plan["note"]
    for direction in ("x", "y"):
        for e, f in zip(exact["modes"][direction], feats["modes"][direction]):
            assert e["ci"][0] <= e["eigenvalue"] <= e["ci"][1]
            assert e["support"] in unc.VERDICTS and e["support"] != "unknown"
            np.testing.assert_allclose(e["eigenvalue"], f["eigenvalue"], rtol=1e-9)
            np.testing.assert_allclose(e["ci"], f["ci"], rtol=1e-6)  # the same resampled L and seed
    lo, hi = exact["spec_diff_ci"]
    assert lo <= exact["spec_diff"] <= hi
