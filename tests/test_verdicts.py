"""Issue 17 items 1-4 on closed-form populations: tied modes, leak-free held-out values with intervals, verdicts
as stated rules, the interval default. The populations (linear kernels on Gaussian mixtures, spectrum in closed
form) are bench/verdicts.py's, whose Monte Carlo study these fixed-seed tests regress (docs/uncertainty.md)."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest
import torch

import spec_torch as st
from spec_torch import uncertainty as unc

pytestmark = pytest.mark.usefixtures("one_thread")

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "verdicts.py"


def _bench():
    if str(_BENCH.parent) not in sys.path:
        sys.path.insert(0, str(_BENCH.parent))
    spec = importlib.util.spec_from_file_location("verdicts", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


V = _bench()


def _live(res: st.SpecResult) -> torch.Tensor:
    return torch.nonzero(res.eigenvalues.abs() > res.zero_tol).squeeze(1)


def _set_of(res: st.SpecResult, k: int) -> list[int]:
    return next(s for s in res.tied_modes if k in s)


# -------------------------------------------------------------------------------------------- populations
def test_population_spectrum_is_the_closed_form():
    """The closed-form blocks against a large-n solve (n = 200,000: sampling error about 1%)."""
    gen = torch.Generator().manual_seed(0)
    x, y = V.draw(V.CASES["isolated"], 200_000, gen)
    lam = st.spec(x, y, "linear", "linear").eigenvalues
    lam = lam[lam.abs() > 1e-6]
    pop = V.population_spectrum(V.CASES["isolated"])
    np.testing.assert_allclose(lam.numpy(), pop.numpy(), rtol=0.03, atol=0.02)
    assert pop.tolist() == sorted(pop.tolist(), reverse=True) and pop[0] == pytest.approx(
        (2 + math.sqrt(12)) / 2
    )


# ----------------------------------------------------------------------------------------------- ties
def test_equal_planted_clusters_are_one_tied_set_with_a_covering_sum_interval():
    """Two equally strong planted clusters per sign (population 2.732 x2, ..., -2.186 x2): each pair is one tied
    set; the interval of its eigenvalue sum holds the population sum; its stability is measured on the span;
    the members are "tied", never "supported" alone. Fails on the old main (no tied_modes / tied_mode_ci /
    support; the bottom pair's verdict was "supported" in 82% of such draws)."""
    gen = torch.Generator().manual_seed(3)
    x, y = V.draw(V.CASES["tie"], 1000, gen)
    res = V.fit(x, y, 100, seed=0)
    pop = V.population_spectrum(V.CASES["tie"])
    live = _live(res)
    top, bottom = _set_of(res, int(live[0])), _set_of(res, int(live[-1]))
    assert top == [int(live[0]), int(live[1])] and bottom == [int(live[-2]), int(live[-1])]
    assert res.tied_mode_ci.shape == (len(res.tied_modes), 2)
    for s, truth in ((top, float(pop[:2].sum())), (bottom, float(pop[-2:].sum()))):
        lo, hi = res.tied_mode_ci[res.tied_modes.index(s)].tolist()
        assert lo <= truth <= hi
        assert all(res.support[k] == "tied" for k in s)
        assert float(res.stability[s[0]]) >= 0.9  # the span is stable though each vector is not
        assert float(res.stability[s[0]]) == float(res.stability[s[1]])
    entries = res.to_dict()["tied_modes"]
    assert [["x", 1], ["x", 2]] in [e["modes"] for e in entries]
    assert res.tied_set_of(top[0])[1] == 2


def test_isolated_modes_are_singletons_and_supported():
    """Isolated top and bottom (2.732 vs 1.0; -2.186 vs -0.863): singleton sets, "supported", held-out interval
    around the population value. Fails on the old main (no tied_modes, support or heldout_eigenvalue_ci)."""
    gen = torch.Generator().manual_seed(4)
    x, y = V.draw(V.CASES["isolated"], 1000, gen)
    res = V.fit(x, y, 100, seed=0)
    pop = V.population_spectrum(V.CASES["isolated"])
    live = _live(res)
    for k, truth in ((int(live[0]), float(pop[0])), (int(live[-1]), float(pop[-1]))):
        assert _set_of(res, k) == [k] and res.tied_set_of(k) == (None, 1)
        assert res.support[k] == "supported"
        lo, hi = res.heldout_eigenvalue_ci[k].tolist()
        assert lo <= truth <= hi and hi - lo < 0.5 * abs(truth)


def test_tie_rule_on_fixed_seeds_merges_ties_and_keeps_isolated_modes_apart():
    """Regression of bench/verdicts.py's tie-rule table (gap < TIE_Z bootstrap SEs of the gap), 10 draws each:
    a true tie is split rarely (bench: about 8% per pair), isolated modes are never merged. Fails on the old main
    (no tied_modes)."""
    together = {}
    for case in ("tie", "isolated"):
        gen = torch.Generator().manual_seed(11)
        hits = 0
        for d in range(10):
            x, y = V.draw(V.CASES[case], 1000, gen)
            res = V.fit(x, y, 60, seed=d)
            live = _live(res)
            hits += int(live[1]) in _set_of(res, int(live[0]))
            hits += int(live[-2]) in _set_of(res, int(live[-1]))
        together[case] = hits / 20
    assert together["tie"] >= 0.75, together
    assert together["isolated"] == 0.0, together


def test_tie_sets_rule_on_hand_made_replicates():
    """The stated rule: adjacent same-sign modes tied when the gap < z bootstrap SEs of the gap; ties chain;
    zero modes and sign changes never tie. Fails on the old main (no tie_sets)."""
    lam = torch.tensor([3.0, 2.9, 1.0, -1.0, -1.05], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    reps = lam + 0.05 * torch.randn(200, 5, generator=gen, dtype=torch.float64)  # gap SE about 0.07
    live = torch.ones(5, dtype=torch.bool)
    assert unc.tie_sets(lam, reps, live) == [[0, 1], [2], [3, 4]]
    assert unc.tie_sets(lam, reps, live, z=1.0) == [[0], [1], [2], [3, 4]]  # gap 0.1 > 1 SE; 0.05 is not
    live[4] = False  # a zero mode is never tied
    assert unc.tie_sets(lam, reps, live) == [[0, 1], [2], [3], [4]]


# ------------------------------------------------------------------------------------------- held-out
def test_heldout_is_not_past_the_population_bound_over_data_sets():
    """docs' sampling-fluctuation case (m = 200, n = 400): no direction has a population value below -1/m, and the
    held-out value of the bottom mode, fitted on half A alone, is unbiased for the value along it: its mean over
    data sets stays above -1/m. On the old main the fitted direction was chosen by overlap with the full-data
    mode, which holds the evaluation half: there these seeds give -1.16, -1.20, -1.24, -1.08 (mean -1.17) in units
    of 1/m; now -1.04, -1.06, -1.07, -0.91 (mean -1.02; bench/verdicts.py: over 200 sets within 2 MC SE of -1/m)."""
    m, vals = 200, []
    for seed in range(4):
        gen = torch.Generator().manual_seed(100 + seed)
        x, y = V.noise_dimensions(400, m, gen)
        res = V.fit(x, y, 10, seed=seed, groups=16)
        vals.append(float(res.heldout_eigenvalues[-1]) * m)
    assert -1.1 < float(np.mean(vals)) < -0.8, vals


def test_heldout_interval_is_a_group_jackknife():
    """The interval is estimate -+ z SE, SE from deleting one group at a time (fitted directions fixed); more
    data, narrower interval; level changes only z. Fails on the old main (no heldout_eigenvalue_ci)."""
    gen = torch.Generator().manual_seed(5)
    x, y = V.draw(V.CASES["isolated"], 1000, gen)
    a = V.fit(x, y, 20, seed=0)
    b = V.fit(x, y, 20, seed=0, level=0.5)
    z90, z50 = (float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64))) for q in (0.95, 0.75))
    wa = a.heldout_eigenvalue_ci[0, 1] - a.heldout_eigenvalue_ci[0, 0]
    wb = b.heldout_eigenvalue_ci[0, 1] - b.heldout_eigenvalue_ci[0, 0]
    assert float(wa / wb) == pytest.approx(z90 / z50, rel=1e-9)
    mid = a.heldout_eigenvalue_ci[0].mean()
    assert float(mid) == pytest.approx(float(a.heldout_eigenvalues[0]), rel=1e-12)
    x4, y4 = V.draw(V.CASES["isolated"], 4000, gen)
    big = V.fit(x4, y4, 20, seed=0)
    assert float(big.heldout_eigenvalue_ci[0, 1] - big.heldout_eigenvalue_ci[0, 0]) < 0.7 * float(wa)


# --------------------------------------------------------------------------------------- verdicts
def test_support_is_decided_once_and_deterministic():
    """res.support is mode_support's rule applied once per mode, the same for a seed, never "supported" in a tied
    set of more than one mode, serialised by to_dict. Fails on the old main (no support)."""
    gen = torch.Generator().manual_seed(6)
    x, y = V.draw(V.CASES["tie"], 600, gen)
    a, b = V.fit(x, y, 30, seed=2), V.fit(x, y, 30, seed=2)
    assert a.support == b.support and a.tied_modes == b.tied_modes
    assert set(a.support) <= set(unc.VERDICTS)
    for k, verdict in enumerate(a.support):
        size = len(_set_of(a, k))
        want = unc.mode_support(
            float(a.eigenvalues[k]), a.heldout_eigenvalue_ci[k].tolist(), float(a.stability[k]), size
        )
        assert verdict == want
        assert not (size > 1 and verdict == "supported")
    d = a.to_dict()
    assert d["support"] == a.support and len(d["heldout_eigenvalue_ci"]) == a.eigenvalues.numel()


def test_isotropic_and_near_duplicate_modes_are_never_supported():
    """Repeated population eigenvalues (isotropic +-1/p, near-duplicates y = x + 0.3 noise): no mode is
    "supported" on these fixed seeds (bench/verdicts.py prints the rates). Fails on the old main (no support)."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1000, 10, generator=gen, dtype=torch.float64)
        iso = st.spec(x, torch.randn(1000, 10, generator=gen, dtype=torch.float64), replicates=30, seed=seed)
        dup = V.fit(x, x + 0.3 * torch.randn(1000, 10, generator=gen, dtype=torch.float64), 30, seed=seed)
        for res in (iso, dup):
            assert "supported" not in res.support, res.support


# -------------------------------------------------------------------------------------------- interval
def test_interval_default_and_choice():
    """interval= reaches the bootstrap from st.spec and compute; the default is DEFAULT_INTERVAL ("basic",
    chosen in docs/uncertainty.md); a bad name is a SpecError naming interval. Fails on the old main (st.spec had
    no interval argument and the default was "percentile")."""
    gen = torch.Generator().manual_seed(7)
    x, y = V.draw(V.CASES["tie"], 600, gen)
    default = V.fit(x, y, 30, seed=1)
    basic = V.fit(x, y, 30, seed=1, interval="basic")
    pct = V.fit(x, y, 30, seed=1, interval="percentile")
    assert unc.DEFAULT_INTERVAL == "basic" and default.uncertainty["interval"] == "basic"
    torch.testing.assert_close(default.eigenvalue_ci, basic.eigenvalue_ci, equal_nan=True)
    assert pct.uncertainty["interval"] == "percentile"
    # basic = the percentile interval reflected about the estimate
    lam = float(pct.eigenvalues[0])
    lo, hi = pct.eigenvalue_ci[0].tolist()
    assert basic.eigenvalue_ci[0].tolist() == pytest.approx([2 * lam - hi, 2 * lam - lo], rel=1e-12)
    # SPEC-diff: the reflected interval of the maxima, widened to the strongest tied set's mean (a superset)
    point = pct.eigenvalues.abs().max().reshape(1)
    p_lo, p_hi = unc._interval(pct._draws["spec_diff"][:, None], point, 0.9, "percentile")[0].tolist()
    assert basic.spec_diff_ci[0] <= 2 * pct.spec_diff - p_hi + 1e-12
    assert basic.spec_diff_ci[1] >= 2 * pct.spec_diff - p_lo - 1e-12
    with pytest.raises(st.SpecError, match="interval"):
        V.fit(x, y, 10, seed=1, interval="studentized")


def test_spec_diff_interval_covers_at_a_tie_fixed_seeds():
    """At a tie SPEC-diff is a maximum, biased up in-sample: the percentile interval of the replicates' maxima
    undercovers (review: 67%; bench: 54%), the basic one less, and the default interval (basic, widened to the
    strongest tied set's mean) covers. Regression of bench/verdicts.py on 24 fixed draws; fails on the old main
    (percentile maxima only, no tied sets)."""
    pop = V.population_spectrum(V.CASES["tie"])
    gen = torch.Generator().manual_seed(8)
    hits = {"default": 0, "percentile maxima": 0}
    for d in range(24):
        x, y = V.draw(V.CASES["tie"], 1000, gen)
        res = V.fit(x, y, 60, seed=d)
        lo, hi = res.spec_diff_ci
        hits["default"] += lo <= float(pop[0]) <= hi
        point = res.eigenvalues.abs().max().reshape(1)
        lo, hi = unc._interval(res._draws["spec_diff"][:, None], point, 0.9, "percentile")[0].tolist()
        hits["percentile maxima"] += lo <= float(pop[0]) <= hi
    assert hits["default"] >= 20, hits  # 83%
    assert hits["default"] > hits["percentile maxima"], hits
