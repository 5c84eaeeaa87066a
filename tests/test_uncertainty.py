"""Uncertainty of SPEC results: group-wise sums, bootstrap intervals, held-out eigenvalues, stability."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import gloo_group, spawn_gloo
from oracle import difference, spectrum

import spec_torch as st
from spec_torch import uncertainty as unc

pytestmark = pytest.mark.usefixtures("one_thread")

#: float64 sums of the same rows added in a different order agree to rounding (n <= 2000, |phi| <= 1)
SUM_ATOL = 1e-10
#: eigenvalues from the batched replicate solve vs the dense oracle (float64, well-conditioned C)
EIG_ATOL = 1e-10

#: shapes of the group sums of 10 + 10 linear features, without the leading G
_GROUP_SHAPES = {"xx": (10, 10), "xy": (10, 10), "yy": (10, 10), "sum_x": (10,), "sum_y": (10,), "count": ()}

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_uncertainty.py"


def _bench():
    import sys

    if str(_BENCH.parent) not in sys.path:  # the bench scripts import their shared bench/_timing.py
        sys.path.insert(0, str(_BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_uncertainty", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def planted(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x separates a 20% cluster (shift along e_0) that y merges; float32, class-sorted rows."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=g)  # [n, 10]
    members = torch.arange(n) < n // 5  # the cluster is the first rows: class-sorted
    x = z.clone()
    x[members, 0] += 4.0
    return x, z


def grouped(x, y, groups=16, batch=10_000, seed=0, kernel="cosine") -> st.DiffCovariance:
    acc = st.DiffCovariance(kernel, kernel, groups=groups, group_seed=seed)
    for start in range(0, x.shape[0], batch):
        stop = min(start + batch, x.shape[0])
        acc.update(x[start:stop], y[start:stop], index=torch.arange(start, stop))
    return acc


# ------------------------------------------------------------------------------------------ group sums
def test_assign_groups_is_a_function_of_index_and_seed():
    idx = torch.arange(10_000)
    g = unc.assign_groups(idx, 16, seed=3)
    assert g.dtype == torch.long and int(g.min()) >= 0 and int(g.max()) < 16
    counts = torch.bincount(g, minlength=16).double()
    assert float(counts.min()) > 0.8 * 10_000 / 16  # balanced: a hash, not index % G over a sorted block
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unc.assign_groups(idx[perm], 16, seed=3), g[perm])
    assert not torch.equal(unc.assign_groups(idx, 16, seed=4), g)


def test_group_sums_match_a_dense_oracle():
    x, y = planted(300)
    acc = grouped(x, y, groups=5, batch=64, kernel="linear")
    gid = unc.assign_groups(torch.arange(300), 5, 0).numpy()
    xn, yn = x.double().numpy(), y.double().numpy()
    for g in range(5):
        rows = gid == g
        np.testing.assert_allclose(acc.group_state["xx"][g].numpy(), xn[rows].T @ xn[rows], atol=SUM_ATOL)
        np.testing.assert_allclose(acc.group_state["xy"][g].numpy(), xn[rows].T @ yn[rows], atol=SUM_ATOL)
        np.testing.assert_allclose(acc.group_state["yy"][g].numpy(), yn[rows].T @ yn[rows], atol=SUM_ATOL)
        assert float(acc.group_state["count"][g]) == rows.sum()
    plain = st.DiffCovariance("linear", "linear", accumulate_dtype=torch.float64).update(x, y)
    # the totals (formed from the group sums by state_dict/compute/merge) match a plain float64 run
    torch.testing.assert_close(acc.state_dict()["xx"].double(), plain.xx, atol=1e-3, rtol=1e-6)
    assert acc.n == 300


def test_batched_and_per_group_accumulation_agree():
    """The CUDA path (one padded baddbmm per block) and the CPU path (one addmm per group), both run on CPU."""
    x, y = planted(500)
    px, py = x.double(), y.double()  # linear features
    gid = unc.assign_groups(torch.arange(500), 7, 0)
    states = []
    for batched in (False, True):
        state = {
            "xx": torch.zeros(7, 10, 10, dtype=torch.float64),
            "xy": torch.zeros(7, 10, 10, dtype=torch.float64),
            "yy": torch.zeros(7, 10, 10, dtype=torch.float64),
            "sum_x": torch.zeros(7, 10, dtype=torch.float64),
            "sum_y": torch.zeros(7, 10, dtype=torch.float64),
            "count": torch.zeros(7, dtype=torch.float64),
        }
        for chunk in torch.arange(500).split(120):
            unc.accumulate_groups(state, px[chunk], py[chunk], gid[chunk], batched=batched)
        states.append(state)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], atol=SUM_ATOL, rtol=0)
    rows = gid == 3
    torch.testing.assert_close(states[1]["xy"][3], px[rows].T @ py[rows], atol=SUM_ATOL, rtol=0)


def test_per_group_products_are_the_cpu_default_whatever_the_threads(monkeypatch):
    """The padded batched product is slower on the CPU at every size measured: only CUDA defaults to it."""
    from helpers import torch_threads

    def refuse(*args, **kwargs):
        raise AssertionError("baddbmm_ used on the CPU by default")

    monkeypatch.setattr(torch.Tensor, "baddbmm_", refuse)
    x, y = planted(300)
    gid = unc.assign_groups(torch.arange(300), 5, 0)
    state = {k: torch.zeros(5, *shape, dtype=torch.float64) for k, shape in _GROUP_SHAPES.items()}
    with torch_threads(2):
        unc.accumulate_groups(state, x.double(), y.double(), gid)
    rows = (gid == 2).numpy()
    np.testing.assert_allclose(
        state["xy"][2].numpy(), x.double().numpy()[rows].T @ y.double().numpy()[rows], atol=SUM_ATOL
    )


def test_same_groups_and_intervals_for_any_batch_size_and_row_order():
    x, y = planted(600)
    ref = grouped(x, y, batch=600)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(1))
    shuffled = st.DiffCovariance("cosine", "cosine", groups=16)
    for chunk in perm.split(37):  # rows in another order, batches of 37, each with its global index
        shuffled.update(x[chunk], y[chunk], index=chunk)
    for key, t in ref.group_state.items():
        torch.testing.assert_close(shuffled.group_state[key], t, atol=SUM_ATOL, rtol=0)
    r1 = ref.compute(replicates=20, seed=5)
    r2 = shuffled.compute(replicates=20, seed=5)
    torch.testing.assert_close(r1.eigenvalue_ci, r2.eigenvalue_ci, atol=1e-9, rtol=0)
    torch.testing.assert_close(r1.stability, r2.stability)
    torch.testing.assert_close(r1.heldout_eigenvalues, r2.heldout_eigenvalues, atol=1e-9, rtol=0)
    assert r1.spec_diff_ci == pytest.approx(r2.spec_diff_ci, abs=1e-9)


def test_deterministic_for_a_seed_and_different_across_seeds():
    x, y = planted(400)
    acc = grouped(x, y)
    a, b, c = (acc.compute(replicates=15, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.eigenvalue_ci, b.eigenvalue_ci) and a.spec_diff_ci == b.spec_diff_ci
    assert not torch.equal(a.eigenvalue_ci, c.eigenvalue_ci)


def test_merge_adds_group_sums():
    x, y = planted(500)
    whole = grouped(x, y)
    a = st.DiffCovariance("cosine", "cosine", groups=16).update(x[:200], y[:200], index=torch.arange(200))
    b = st.DiffCovariance("cosine", "cosine", groups=16).update(
        x[200:], y[200:], index=torch.arange(200, 500)
    )
    merged = st.DiffCovariance("cosine", "cosine", groups=16).merge(a).merge(b)
    for key, t in whole.group_state.items():
        torch.testing.assert_close(merged.group_state[key], t, atol=SUM_ATOL, rtol=0)
    with pytest.raises(st.SpecError, match="groups=8"):
        a.merge(st.DiffCovariance("cosine", "cosine", groups=8).update(x[:10], y[:10]))


# ------------------------------------------------------------------------------------- the staging buffer
#: float64 sums of the same <= 1,100 rows added in another order (staged, flushed, direct): relative rounding
#: below n eps = 2.4e-13 of the largest term
ORDER_RTOL = 1e-12
#: eigenvalues, intervals and held-out values from those sums: ORDER_RTOL rounding carried through the
#: Cholesky / eigh solves and the bootstrap's weighted sums of a well-conditioned C (p = 10, n = 1,100)
SOLVE_RTOL, SOLVE_ATOL = 1e-9, 1e-12
#: linear kernels on 10 + 10 inputs with G = 4: k = max(64, (3 * 100) // 40) = 64 rows per group slot, S = 256
STAGE_G, STAGE_K = 4, 64
STAGE_S = STAGE_G * STAGE_K


def _slot_path(index: torch.Tensor) -> tuple[int, int]:
    """(full slots flushed, rows left staged) when rows ``index`` all go through the group slots."""
    counts = torch.bincount(unc.assign_groups(index, STAGE_G, 0), minlength=STAGE_G).tolist()
    return sum(n // STAGE_K for n in counts), sum(n % STAGE_K for n in counts)


def _oracle_groups(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict[str, np.ndarray]:
    """Dense numpy group sums of linear features: ``xx [G, p, p]``, ``xy``, ``yy``, ``sum_x``, ``sum_y``, ``count``."""
    gid = unc.assign_groups(index, STAGE_G, 0).numpy()
    xn, yn = x.double().numpy(), y.double().numpy()
    out: dict[str, list] = {k: [] for k in ("xx", "xy", "yy", "sum_x", "sum_y", "count")}
    for g in range(STAGE_G):
        a, b = xn[gid == g], yn[gid == g]  # [n_g, p], [n_g, q]
        for key, value in (("xx", a.T @ a), ("xy", a.T @ b), ("yy", b.T @ b)):
            out[key].append(value)
        out["sum_x"].append(a.sum(0))
        out["sum_y"].append(b.sum(0))
        out["count"].append(float(len(a)))
    return {k: np.array(v) for k, v in out.items()}


def _assert_groups_equal(state: dict[str, torch.Tensor], oracle: dict[str, np.ndarray]) -> None:
    for key, want in oracle.items():
        np.testing.assert_allclose(state[key].numpy(), want, rtol=ORDER_RTOL, atol=SUM_ATOL, err_msg=key)


def _stream(acc: st.DiffCovariance, x, y, sizes, start: int = 0) -> int:
    """Feed rows ``start ...`` in batches of ``sizes`` with their global indices; returns the next row."""
    for b in sizes:
        acc.update(x[start : start + b], y[start : start + b], index=torch.arange(start, start + b))
        start += b
    return start


@pytest.fixture
def slots_of_64(monkeypatch):
    """Slots of STAGE_K = 64 rows (the floor) whatever the memory allowance, so small tests fill them."""
    monkeypatch.setattr("spec_torch.covariance.STAGE_ROWS_PER_GROUP", STAGE_K)


def test_stage_capacity_formula():
    from spec_torch.covariance import STAGE_MIN_BYTES, _stage_rows

    assert _stage_rows(32, 400, 400) == 32 * (STAGE_MIN_BYTES // (32 * 800 * 8))  # 327: the 64 MiB allowance
    assert _stage_rows(8, 2000, 2000) == 8 * 512  # the 512-row cap
    assert _stage_rows(32, 200, 200) == 32 * 512  # small D: 64 MiB hold 512 rows per group
    assert _stage_rows(1024, 80, 80) == 1024 * 64  # the 64-row floor (half the sums allow 60 rows, 64 MiB 51)
    for g, dx, dy in ((32, 400, 400), (16, 300, 900), (8, 2000, 100), (32, 200, 200), (1024, 80, 80)):
        buffer, sums = _stage_rows(g, dx, dy) * (dx + dy) * 8, g * (dx * dx + dx * dy + dy * dy) * 8
        k = _stage_rows(g, dx, dy) // g
        assert buffer <= max(sums / 2, STAGE_MIN_BYTES) or k == 64
        assert 64 <= k <= 512


def test_small_test_slots(slots_of_64):
    from spec_torch.covariance import _stage_rows

    assert _stage_rows(STAGE_G, 10, 10) == STAGE_S


@pytest.mark.parametrize(
    ("sizes", "direct"),
    [
        ([100] * 11, 0),  # below S: through the slots, slots fill within a batch and across batches
        ([STAGE_S] * 4, 4),  # equal to S with nothing staged: straight in
        ([700, 400], 2),  # above S: straight in
        ([100, 300, 50, 600], 0),  # 600 >= S arrives while rows are staged: several slot-fulls in one batch
        ([600, 100, 30], 1),  # straight in, then staged
    ],
)
def test_staged_group_sums_match_a_dense_oracle(sizes, direct, slots_of_64):
    """``direct``: how many leading batches skip the slots (at least S rows, nothing staged)."""
    x, y = planted(sum(sizes), seed=2)
    acc = st.DiffCovariance("linear", "linear", groups=STAGE_G)
    _stream(acc, x, y, sizes)
    assert acc._stage[0].shape == (STAGE_S + 1, 10)
    flushes, staged = _slot_path(torch.arange(sum(sizes[:direct]), len(x)))
    assert (acc._flushes, acc._staged) == (flushes, staged)  # the path the rows took
    _assert_groups_equal(acc.group_state, _oracle_groups(x, y, torch.arange(len(x))))
    assert acc._staged == 0  # reading group_state flushed the partial slots
    xn, yn = x.double().numpy(), y.double().numpy()
    state = acc.state_dict()  # the totals, set from the group sums
    np.testing.assert_allclose(state["xy"].numpy(), xn.T @ yn, rtol=ORDER_RTOL, atol=SUM_ATOL)
    np.testing.assert_allclose(state["sum_x"].numpy(), xn.sum(0), rtol=ORDER_RTOL, atol=SUM_ATOL)
    assert state["count"] == len(x)


def test_batches_with_enough_rows_per_group_skip_the_slots():
    """Slots of k = 512 rows (the 64 MiB allowance at D = 10 + 10, G = 4): a batch of G * 256 rows
    (DIRECT_ROWS_PER_GROUP) with nothing staged goes straight in, one row fewer goes through the slots; both
    equal the dense oracle."""
    from spec_torch.covariance import DIRECT_ROWS_PER_GROUP, _stage_rows

    assert _stage_rows(STAGE_G, 10, 10) // STAGE_G == 512 > DIRECT_ROWS_PER_GROUP
    direct_rows = STAGE_G * DIRECT_ROWS_PER_GROUP
    for rows, staged in ((direct_rows, False), (direct_rows - 1, True)):
        x, y = planted(rows, seed=4)
        acc = st.DiffCovariance("linear", "linear", groups=STAGE_G).update(x, y)
        assert (acc._staged > 0) == staged  # no slot fills (fewer than 512 rows per group)
        _assert_groups_equal(acc.group_state, _oracle_groups(x, y, torch.arange(rows)))


def test_checkpoint_taken_while_rows_are_staged(slots_of_64):
    """state_dict flushes the staged rows (a complete checkpoint); load_state_dict drops rows staged before it."""
    x, y = planted(700, seed=3)
    first = st.DiffCovariance("linear", "linear", groups=STAGE_G)
    _stream(first, x, y, [100, 200])
    assert (first._flushes, first._staged) == _slot_path(torch.arange(300)) and first._staged > 0
    saved = first.state_dict()
    assert first._staged == 0
    oracle = _oracle_groups(x[:300], y[:300], torch.arange(300))
    _assert_groups_equal({k[6:]: v for k, v in saved.items() if k.startswith("group_")}, oracle)
    resumed = st.DiffCovariance("linear", "linear", groups=STAGE_G)
    _stream(resumed, x, y, [120])  # rows staged before the load: dropped with the sums they belonged to
    assert resumed._staged == 120
    resumed.load_state_dict(saved)
    assert resumed._staged == 0
    _stream(resumed, x, y, [150, 250], start=300)
    assert resumed._staged > 0
    _assert_groups_equal(resumed.group_state, _oracle_groups(x, y, torch.arange(700)))
    assert resumed.n == 700


def test_merge_and_compute_with_staged_rows_equal_the_unstaged_run(slots_of_64):
    """merge and compute flush the staged rows; the results equal a run that went straight in, to rounding."""
    x, y = planted(1100, seed=4)
    a = st.DiffCovariance("linear", "linear", groups=STAGE_G)
    b = st.DiffCovariance("linear", "linear", groups=STAGE_G)
    start = _stream(a, x, y, [150, 200])
    _stream(b, x, y, [100] * 7 + [50], start=start)
    assert a._staged and b._staged and a._flushes and b._flushes
    a.merge(b)  # flushes both
    assert (a._staged, b._staged) == (0, 0)
    _assert_groups_equal(a.group_state, _oracle_groups(x, y, torch.arange(1100)))
    direct = st.DiffCovariance("linear", "linear", groups=STAGE_G).update(x, y, index=torch.arange(1100))
    assert (direct._flushes, direct._staged) == (0, 0)  # 1,100 >= S rows at once: the unstaged path
    staged = st.DiffCovariance("linear", "linear", groups=STAGE_G)
    _stream(staged, x, y, [90] * 12 + [20])
    assert (staged._flushes, staged._staged) == _slot_path(torch.arange(1100)) and staged._staged > 0
    r_direct = _replicates(direct, 20, seed=3)  # STAGE_G = 4 groups: below what compute(replicates=) takes
    r_staged = _replicates(staged, 20, seed=3)  # compute() flushes the staged rows first
    assert staged._staged == 0
    torch.testing.assert_close(r_staged.eigenvalues, r_direct.eigenvalues, rtol=SOLVE_RTOL, atol=SOLVE_ATOL)
    assert bool(torch.isfinite(r_direct.eigenvalue_ci[[0, -1]]).all())  # the extreme modes have intervals
    close = {"rtol": SOLVE_RTOL, "atol": SOLVE_ATOL, "equal_nan": True}  # NaN: zero modes (x, y share 9 axes)
    torch.testing.assert_close(r_staged.eigenvalue_ci, r_direct.eigenvalue_ci, **close)
    torch.testing.assert_close(r_staged.heldout_eigenvalues, r_direct.heldout_eigenvalues, **close)
    torch.testing.assert_close(r_staged.stability, r_direct.stability, equal_nan=True)
    r_merged = _replicates(a, 20, seed=3)
    torch.testing.assert_close(r_merged.eigenvalue_ci, r_direct.eigenvalue_ci, **close)


def _replicates(acc: st.DiffCovariance, replicates: int, seed: int) -> SimpleNamespace:
    """The full-data solve with :func:`uncertainty.estimate` on its group sums: what ``compute(replicates=)``
    attaches, for any number of groups (compute refuses fewer than 8)."""
    from spec_torch.solver import assemble_covariance

    res = acc.compute()
    c_full = assemble_covariance(acc.xx.double(), acc.xy.double(), acc.yy.double(), acc.n, 1.0)
    out = unc.estimate(
        acc.group_state,
        c_full,
        res.eigenvalues,
        res._u,
        eta=1.0,
        dx=acc.xx.shape[0],
        zero_tol=res.zero_tol,
        replicates=replicates,
        seed=seed,
    )
    return SimpleNamespace(eigenvalues=res.eigenvalues, **out)


# ------------------------------------------------------------------------------- solves against the oracle
def test_replicate_solve_matches_dense_oracle_on_duplicated_rows():
    """A bootstrap weight w_g = 2 is group g's rows twice: the batched solve equals eigh of that data's L."""
    x, y = planted(120)
    acc = grouped(x, y, groups=4, kernel="linear")
    w = torch.tensor([[2.0, 0.0, 1.0, 1.0], [0.0, 3.0, 1.0, 0.0]], dtype=torch.float64)
    jv = torch.cat([torch.ones(10), -torch.ones(10)]).double()
    lam, u = unc._solve_batch(unc._weighted_covariances(acc.group_state, w, 1.0), jv, keep=20)
    gid = unc.assign_groups(torch.arange(120), 4, 0).numpy()
    for r in range(2):
        rows = np.concatenate([np.flatnonzero(gid == g) for g in range(4) for _ in range(int(w[r, g]))])
        want, _ = spectrum(
            difference(x.double().numpy()[rows], y.double().numpy()[rows], "linear", "linear"), 20
        )
        np.testing.assert_allclose(lam[r].numpy(), want, atol=EIG_ATOL * abs(want).max())


def test_replicate_solve_on_singular_c_uses_the_eigh_factor():
    """D > n (C singular: Cholesky fails or has rounding-level pivots): the eigh factor, same spectrum as dense."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 10, generator=g).double(), torch.randn(12, 10, generator=g).double()
    acc = grouped(x, y, groups=2, kernel="linear")
    jv = torch.cat([torch.ones(10), -torch.ones(10)]).double()
    c = unc._weighted_covariances(acc.group_state, torch.ones(1, 2, dtype=torch.float64), 1.0)  # [1, 20, 20]
    assert int(torch.linalg.cholesky_ex(c)[1][0]) != 0 or bool(
        (torch.linalg.cholesky_ex(c)[0][0].diagonal().square() <= 20 * 2.2e-16 * c[0].diagonal().max()).any()
    )  # the singular branch runs
    lam, _ = unc._solve_batch(c, jv, keep=12)
    want, _ = spectrum(difference(x.numpy(), y.numpy(), "linear", "linear"), 12)
    np.testing.assert_allclose(lam[0].numpy(), want, atol=1e-9 * abs(want).max())


def test_topk_replicate_route_agrees_with_full_route():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(800, 48, generator=g), torch.randn(800, 48, generator=g)
    acc = grouped(x, y, groups=8)
    w = torch.ones(2, 8, dtype=torch.float64)
    w[1, 0] = 0
    full_vals, _ = unc._solve_all(acc.group_state, w, 1.0, 48, keep=96, top_k=None)
    topk_vals, topk_dirs = unc._solve_all(acc.group_state, w, 1.0, 48, keep=96, top_k=2)
    assert topk_vals[0].numel() == 4 and full_vals[0].numel() == 96  # the Krylov route ran (D = 96 >= 80)
    for f, t in zip(full_vals, topk_vals):
        torch.testing.assert_close(t, torch.cat([f[:2], f[-2:]]), atol=1e-9, rtol=0)


def test_heldout_quotient_is_the_rayleigh_quotient_of_dense_l_b():
    x, y = planted(200)
    xb, yb = x.double().numpy()[100:], y.double().numpy()[100:]
    acc = st.DiffCovariance("linear", "linear", accumulate_dtype=torch.float64).update(x[100:], y[100:])
    from spec_torch.solver import assemble_covariance

    c_b = assemble_covariance(acc.xx, acc.xy, acc.yy, 100, 0.5)
    u = torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jv = torch.cat([torch.ones(10), -torch.ones(10)]).double()
    got = unc.heldout_quotient(c_b, u, jv)
    a_b = np.hstack([xb, np.sqrt(0.5) * yb]) / np.sqrt(100)  # [n_B, D]
    l_b = difference(xb, yb, "linear", "linear", eta=0.5)
    v = a_b @ u.numpy()  # [n_B, 3]
    want = np.einsum("ik,ij,jk->k", v, l_b, v) / (v * v).sum(0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_heldout_crossfit_is_the_cross_part_kernel_difference():
    """u^T C_1 J C_2 u = (A_1 u)^T L_12 (A_2 u), L_12 = (K_x - eta K_y)(part 1, part 2) / sqrt(n_1 n_2): the
    numerator pairs samples of two disjoint parts only, so neither part's own noise is squared."""
    from spec_torch.solver import assemble_covariance

    x, y = planted(300)
    xs, ys = x.double().numpy(), y.double().numpy()
    eta, parts = 0.5, (slice(100, 180), slice(180, 300))  # n_1 = 80, n_2 = 120, B = rows 100..299
    covs = []
    for rows in (*parts, slice(100, 300)):
        acc = st.DiffCovariance("cosine", "cosine", accumulate_dtype=torch.float64).update(x[rows], y[rows])
        covs.append(assemble_covariance(acc.xx, acc.xy, acc.yy, acc.n, eta))
    u = torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jv = torch.cat([torch.ones(10), -torch.ones(10)]).double()
    got = unc.heldout_crossfit(*covs, u, jv)

    def feats(rows):  # A rows of a part, unnormalised: [phi_x, sqrt(eta) phi_y]
        fx = xs[rows] / np.linalg.norm(xs[rows], axis=1, keepdims=True)
        fy = ys[rows] / np.linalg.norm(ys[rows], axis=1, keepdims=True)
        return fx, fy, np.hstack([fx, np.sqrt(eta) * fy])

    (fx1, fy1, a1), (fx2, fy2, a2), (_, _, ab) = feats(parts[0]), feats(parts[1]), feats(slice(100, 300))
    l_12 = (fx1 @ fx2.T - eta * fy1 @ fy2.T) / np.sqrt(80 * 120)  # cosine kernels between the two parts
    v1, v2, vb = a1 @ u.numpy() / np.sqrt(80), a2 @ u.numpy() / np.sqrt(120), ab @ u.numpy() / np.sqrt(200)
    want = np.einsum("ik,ij,jk->k", v1, l_12, v2) / (vb * vb).sum(0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def noise_dimensions(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x = z (5-d); y = [z, e] with per-sample noise e in m dimensions (N(0, I / m)). Linear kernels: the z parts
    cancel exactly, and the population spectrum is -1/m with multiplicity m (y's noise directions)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64)
    e = torch.randn(n, m, generator=g, dtype=torch.float64) / m**0.5
    return z, torch.cat([z, e], 1)


@pytest.mark.parametrize("m", [200, 800])
def test_a_mode_made_of_sampling_fluctuation_is_tied(m):
    """With the noise spread over m >= n / 2 dimensions the in-sample extreme is mostly sampling fluctuation:
    about (1 + sqrt(m / n))^2 / m against the population -1/m along any direction. The cross-fitted held-out
    eigenvalue of the direction chosen on the fitting half lands near -1/m, never past it by more than its
    interval (a strict bound: no direction has a population value below -1/m); the mode is one of m equal
    directions, so its verdict is "tied" (issue 17).

    Updated from the old version (verdict "not a distinct cluster" at m = 200 and "not supported by the data"
    at m = 800 by the 25% rule, held-out -1.13/m and -1.17/m: past the bound, the leak through the full-data
    mode). Fails on the old main: no ``support``, ``tied_modes`` or ``heldout_eigenvalue_ci``."""
    n = 400
    x, y = noise_dimensions(n, m)
    res = st.spec(x, y, "linear", "linear", replicates=20, seed=0, groups=16)
    assert res.uncertainty["heldout"] == "crossfit"
    lam, held = float(res.eigenvalues[-1]), float(res.heldout_eigenvalues[-1])
    lo, hi = res.heldout_eigenvalue_ci[-1].tolist()
    assert lam * m < -2.5  # in-sample inflated: measured -2.86/m (m = 200), -5.64/m (m = 800)
    assert -1.0 < held * m < -0.6  # population -1/m at most; measured -0.84/m and -0.87/m
    assert lo < -1 / m < hi or lo * m > -1  # the interval does not place the value past the bound
    assert hi < 0  # the strength carries over: not "not supported"
    k_last = res.eigenvalues.numel() - 1
    tied = next(s for s in res.tied_modes if k_last in s)
    assert len(tied) > 1
    assert res.support[-1] == "tied"
    assert res.stability[-1] < 0.5 or len(tied) > 1


def test_heldout_falls_back_to_the_quotient_with_fewer_than_4_groups():
    """The public entry points refuse fewer than 8 groups (tests/test_route_intervals.py); the pure estimate
    still takes 3, and then cannot cut an evaluated half in two parts."""
    from spec_torch.solver import assemble_covariance

    x, y = planted(400)
    acc = grouped(x, y, groups=3)
    res = acc.compute()
    c_full = assemble_covariance(acc.xx.double(), acc.xy.double(), acc.yy.double(), acc.n, 1.0)
    out = unc.estimate(
        acc.group_state, c_full, res.eigenvalues, res._u, eta=1.0, dx=10, zero_tol=res.zero_tol, replicates=10
    )
    assert out["settings"]["heldout"] == "quotient"
    assert float(out["heldout_eigenvalues"][0]) > 0.5 * float(res.eigenvalues[0])


# ------------------------------------------------------------------------------------- what the numbers say
def test_planted_cluster_is_supported():
    x, y = planted(1000)
    res = st.spec(x, y, replicates=50, seed=0)
    assert res.method == "features" and res.uncertainty["groups"] == 32
    lam = float(res.eigenvalues[0])
    lo, hi = res.eigenvalue_ci[0].tolist()
    assert lo <= lam <= hi
    assert float(res.stability[0]) >= 0.9
    assert float(res.heldout_eigenvalues[0]) >= 0.5 * lam
    assert res.spec_diff_ci[0] <= res.spec_diff <= res.spec_diff_ci[1]
    assert res.support[0] == "supported" and res.tied_modes[0] == [0]
    held_lo, held_hi = res.heldout_eigenvalue_ci[0].tolist()
    assert 0 < held_lo <= float(res.heldout_eigenvalues[0]) <= held_hi
    assert res.eigenvalue_ci.shape == (res.eigenvalues.numel(), 2)
    json.dumps(res.to_dict())


def test_independent_isotropic_embeddings_are_tied():
    """DESIGN.md: population spectrum +-1/p (multiplicity p); in-sample top inflated; held-out near 1/p.
    The extremes belong to a tied set (a degenerate eigenspace): verdict "tied" (was "not a distinct cluster"
    before tied sets existed, issue 17)."""
    p = 40
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, p, generator=g), torch.randn(2000, p, generator=g)
    res = st.spec(x, y, "cosine", "cosine", replicates=40, seed=0)
    top, held = float(res.eigenvalues[0]), float(res.heldout_eigenvalues[0])
    assert top > 1.15 / p  # measured 0.032 vs 1/p = 0.025
    assert abs(held - 1 / p) < abs(top - 1 / p)
    assert abs(held - 1 / p) < 0.15 / p
    assert len(res.tied_modes[0]) > 1 and len(res.tied_modes[-1]) > 1
    assert res.support[0] == "tied" and res.support[-1] == "tied"


def test_mode_support_words():
    assert unc.mode_support(0.1, (-0.01, 0.03), 1.0) == "not supported by the data"  # held-out reaches 0
    assert unc.mode_support(0.1, (-0.08, -0.02), 1.0) == "not supported by the data"  # sign flips
    assert unc.mode_support(-0.1, (-0.09, -0.07), 0.95, tied_size=2) == "tied"  # never supported alone
    assert unc.mode_support(-0.1, (-0.09, -0.07), 0.2) == "not a distinct cluster"
    assert unc.mode_support(-0.1, (-0.09, -0.07), 0.95) == "supported"
    assert unc.mode_support(0.1, (float("nan"), 0.1), 0.9) == "unknown"
    assert unc.mode_support(0.1, None, 0.9) == "unknown"
    assert set(unc.VERDICTS) == {
        "supported",
        "tied",
        "not a distinct cluster",
        "not supported by the data",
        "unknown",
    }


def test_coverage_fast():
    """Fast version of bench/bench_uncertainty.py's coverage study (200 draws there). With 60 draws the rate
    of a 90% interval has sd 0.039: we accept 0.78..1 here, the 80-97% target is checked on the full study."""
    cov = _bench().coverage(draws=60, n=400, replicates=60, groups=32, n_pop=200_000)
    for method in ("percentile", "bc"):
        for rate in cov[method]:
            assert 0.78 <= rate <= 1.0, (method, cov)


# --------------------------------------------------------------------------------------------- contract
def test_skipped_without_replicates_and_serialised():
    x, y = planted(300)
    res = st.spec(x, y)
    assert res.eigenvalue_ci is None and res.stability is None
    d = res.to_dict()
    assert d["eigenvalue_ci"] is None and d["spec_diff_ci"] is None
    res0 = grouped(x, y).compute(replicates=0)
    assert res0.heldout_eigenvalues is None


def test_bad_input_raises_named_errors():
    x, y = planted(300)
    # exact kernels and method="exact" have intervals now (tests/test_route_intervals.py)
    with pytest.raises(st.SpecError, match="replicates.*groups"):
        st.DiffCovariance().update(x, y).compute(replicates=10)
    with pytest.raises(st.SpecError, match="groups"):
        st.DiffCovariance(groups=1)
    with pytest.raises(st.SpecError, match="index"):
        st.DiffCovariance(groups=4).update(x, y, index=torch.arange(3))
    with pytest.raises(st.SpecError, match="index"):
        st.DiffCovariance(groups=4).update(x, y, index=torch.arange(300) - 1)
    acc = grouped(x, y)
    with pytest.raises(st.SpecError, match="replicates"):
        acc.compute(replicates=1)
    with pytest.raises(st.SpecError, match="level"):
        acc.compute(replicates=5, level=1.5)


# ----------------------------------------------------------------------------------------- 2 Gloo ranks
def _rank_worker(rank: int, port: int, path: str) -> None:
    with gloo_group(rank, port, world=2):
        x, y = planted(600)
        shard = torch.arange(rank, 600, 2)  # interleaved shards: rank r reads rows r, r+2, ...
        acc = st.DiffCovariance("cosine", "cosine", groups=16)
        for chunk in shard.split(50):
            acc.update(x[chunk], y[chunk], index=chunk)
        res = acc.compute(replicates=20, seed=5)
        if rank == 0:
            torch.save(
                {"ci": res.eigenvalue_ci, "held": res.heldout_eigenvalues, "stab": res.stability}, path
            )


def test_one_vs_two_gloo_ranks():
    x, y = planted(600)
    ref = grouped(x, y).compute(replicates=20, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.pt")
        spawn_gloo(_rank_worker, path, world=2, timeout_s=120)
        got = torch.load(path)
    torch.testing.assert_close(got["ci"], ref.eigenvalue_ci, atol=1e-9, rtol=0)
    torch.testing.assert_close(got["held"], ref.heldout_eigenvalues, atol=1e-9, rtol=0)
    torch.testing.assert_close(got["stab"], ref.stability)


# ------------------------------------------------------------------------------------------ compare job
def _compare(tmp: pathlib.Path, x: np.ndarray, y: np.ndarray, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from spec_torch.apps import compare

    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", y)
    configs = pathlib.Path(__file__).resolve().parents[1] / "spec_torch" / "apps" / "configs" / "compare"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(
            config_name="compare",
            overrides=[
                "data=features",
                f"data.x_path={tmp / 'x.npy'}",
                f"data.y_path={tmp / 'y.npy'}",
                f"output_dir={tmp / 'out'}",
                "device=cpu",
                "top_k=2",
                *overrides,
            ],
        )
    compare.run(cfg)
    return json.loads((tmp / "out" / "spec.json").read_text())


def test_compare_writes_intervals_and_flags(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1500, 40, generator=g).numpy(), torch.randn(1500, 40, generator=g).numpy()
    with caplog.at_level(logging.INFO, logger="spec_torch"):  # the summary goes through logging
        spec = _compare(tmp_path, x, y, "uncertainty.replicates=30")
    lo, hi = spec["spec_diff_ci"]
    assert lo < hi  # (not around spec_diff here: the maximum of a degenerate spectrum, docs/uncertainty.md)
    assert spec["uncertainty"]["enabled"] and spec["uncertainty"]["replicates"] == 30
    for entry in spec["modes"]["x"] + spec["modes"]["y"]:
        assert {"ci", "heldout_eigenvalue", "heldout_ci", "stability", "support", "tied_size"} <= set(entry)
        assert entry["support"] == "tied"  # isotropic: a degenerate eigenspace (was "not a distinct cluster")
        assert entry["tied_size"] > 1
        tied = spec["tied_modes"][entry["tied_set"]]  # the top-level set this mode belongs to
        assert [
            entry["direction"] if "direction" in entry else ("x" if entry["eigenvalue"] > 0 else "y"),
            entry["rank"],
        ] in tied["modes"]
        assert tied["ci"][0] <= tied["eigenvalue_sum"] + 1e-12 or tied["ci"][0] < tied["ci"][1]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Is each mode real?" in page and "tied" in page
    assert (tmp_path / "out" / "plots" / "intervals.png").is_file()
    assert "tied" in caplog.text


def test_compare_auto_records_its_choice_and_off_has_a_note(tmp_path):
    """replicates: auto chooses R from the cost model (sizes only): n = 800, D = 16 fits 200 replicates."""
    x, y = (t.numpy() for t in planted(800))
    spec = _compare(tmp_path, x, y)  # replicates: auto under budget 1.0
    info = spec["uncertainty"]
    assert info["budget"] == 1.0 and info["note"] and "max_overhead" not in info
    assert info["enabled"] and info["replicates"] == unc.MAX_REPLICATES and info["groups"] == 32
    assert info["cost_gflop"]["ratio"] <= 1.0
    assert spec["modes"]["x"][0]["support"] == "supported"
    off = _compare(tmp_path, x, y, "uncertainty.replicates=0")
    assert off["uncertainty"]["enabled"] is False and "off" in off["uncertainty"]["note"]
    assert off["spec_diff_ci"] is None and "ci" not in off["modes"]["x"][0]


def test_plan_replicates_and_groups():
    """R and G from sizes only (no time, no free memory)."""
    assert unc.plan_replicates(10_000, 50, 50, 32) == unc.MAX_REPLICATES
    assert unc.plan_replicates(10_000, 2000, 2000, 32) == 0  # D = 4000: not even 20 fit: off
    r = unc.plan_replicates(300_000, 400, 400, 32, budget=1.0)
    allowed, per = unc.compare_cost(300_000, 400, 400), unc.replicate_solve_cost(400, 400, 32)
    assert unc.MIN_REPLICATES <= r < unc.MAX_REPLICATES
    assert unc.solves_needed(r) * per <= allowed < unc.solves_needed(r + 1) * per
    assert unc.plan_replicates(300_000, 400, 400, 32, budget=2.0) > r
    assert unc.plan_groups(10_000, 100, 100) == 32
    assert unc.plan_groups(60, 100, 100) == 15  # n // 4
    assert unc.plan_groups(10_000, 6000, 6000) == 0  # 8 group sums of D = 12,000 pass MAX_GROUP_BYTES: off


def test_align_logs_the_strongest_modes_heldout_eigenvalue():
    from spec_torch.apps.align.evaluate import strongest_mode_heldout

    x, y = planted(400)
    out = strongest_mode_heldout(x, y, "cosine", "cosine", seed=0)
    lam = float(st.spec(x, y).eigenvalues[0])  # the planted mode is the strongest
    assert out["mode_eigenvalue"] == pytest.approx(lam, rel=1e-6)
    assert out["mode_heldout_eigenvalue"] >= 0.5 * lam and out["mode_stability"] >= 0.9
    assert strongest_mode_heldout(x[:32], y[:32]) == {}  # too few samples for groups
    assert strongest_mode_heldout(x, y, st.GaussianKernel(sigma=1.0), "cosine") == {}  # no feature map


def test_group_sums_survive_a_checkpoint(tmp_path):
    """state_dict saves the group sums (weights_only-loadable): resuming gives the same intervals as one run."""
    x, y = planted(400)
    whole = st.DiffCovariance("cosine", "cosine", groups=8, group_seed=3)
    whole.update(x, y, index=torch.arange(400))
    first = st.DiffCovariance("cosine", "cosine", groups=8, group_seed=3)
    first.update(x[:250], y[:250], index=torch.arange(250))
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = st.DiffCovariance("cosine", "cosine", groups=8, group_seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    resumed.update(x[250:], y[250:], index=torch.arange(250, 400))
    a = whole.compute(replicates=20, seed=1)
    b = resumed.compute(replicates=20, seed=1)
    assert torch.allclose(a.eigenvalue_ci, b.eigenvalue_ci, rtol=1e-10, atol=1e-14)
    with pytest.raises(st.SpecError, match="state: saved with groups=8"):
        st.DiffCovariance("cosine", "cosine", groups=4, group_seed=3).load_state_dict(
            torch.load(tmp_path / "state.pt")
        )


def test_centred_replicates_match_the_centred_solve():
    """center=True with replicates: a replicate holding every group once is the full centred solve (dense
    H L H oracle), and the planted cluster keeps its interval, held-out value and stability."""
    from spec_torch.uncertainty import _weighted_covariances

    x, y = planted(600)
    res = st.spec(x, y, replicates=40, seed=0, center=True)
    ref = st.spec(x, y, center=True, method="exact")  # the dense H L H
    torch.testing.assert_close(res.eigenvalues[:3], ref.eigenvalues[:3], rtol=1e-9, atol=1e-12)
    assert res.eigenvalue_ci[0, 0] <= res.eigenvalues[0] <= res.eigenvalue_ci[0, 1]
    assert res.heldout_eigenvalues[0] >= 0.5 * res.eigenvalues[0] and res.stability[0] >= 0.9
    acc = st.DiffCovariance("cosine", "cosine", groups=8)
    acc.update(x, y, index=torch.arange(600))
    acc.compute()  # settles the totals
    c_all = _weighted_covariances(acc.group_state, torch.ones(1, 8, dtype=torch.float64), 1.0, center=True)[0]
    xx, xy, yy = (getattr(acc, k).double() for k in ("xx", "xy", "yy"))
    sx, sy = acc.sum_x.double(), acc.sum_y.double()
    top = torch.cat([xx - torch.outer(sx, sx) / 600, xy - torch.outer(sx, sy) / 600], 1)
    bottom = torch.cat([(xy - torch.outer(sx, sy) / 600).T, yy - torch.outer(sy, sy) / 600], 1)
    torch.testing.assert_close(c_all, torch.cat([top, bottom], 0) / 600, rtol=1e-10, atol=1e-13)


def test_compare_interval_setting_and_mode_fields(tmp_path):
    """uncertainty.interval reaches the bootstrap (issue 17 item 4; the old config had no such key); a planted
    isolated mode's entry renders the library's verdict with its held-out interval and tied-set fields."""
    x, y = (t.numpy() for t in planted(800))
    spec = _compare(tmp_path, x, y, "uncertainty.replicates=20", "uncertainty.interval=percentile")
    assert spec["uncertainty"]["interval"] == "percentile"
    top = spec["modes"]["x"][0]
    assert top["support"] == "supported" and top["tied_size"] == 1 and top["tied_set"] is None
    lo, hi = top["heldout_ci"]
    assert 0 < lo <= top["heldout_eigenvalue"] <= hi
    assert spec["support"][top["index"]] == top["support"]  # one source: res.support
    assert isinstance(spec["tied_modes"], list)
    with pytest.raises(st.SpecError, match="uncertainty.interval"):
        _compare(tmp_path, x, y, "uncertainty.replicates=20", "uncertainty.interval=studentized")


@pytest.mark.parametrize("center", [False, True])
def test_heldout_jackknife_matches_brute_force_deletion(center):
    """The held-out value and its jackknife SE from the per-group projections equal recomputing the cross-fitted
    value (heldout_crossfit on _weighted_covariances) with each group's weight set to 0, centred or not."""
    x, y = planted(400)
    acc = grouped(x.double(), y.double(), groups=8, kernel="linear")
    state, dx, eta = acc.group_state, 10, 0.7
    gen = torch.Generator().manual_seed(0)
    halves, parts = unc._split_groups(8, 3, gen)
    fitted = torch.randn(6, 20, 3, generator=gen, dtype=torch.float64)
    jv = torch.cat([torch.ones(dx), -torch.ones(10)]).double()
    held, se = unc._heldout_jackknife(state, fitted, halves, parts, eta, dx, jv, center, crossfit=True)

    def mean_value(keep: torch.Tensor) -> torch.Tensor:  # keep: [G] 0/1 weights
        vals = []
        for e in range(6):
            w1, w2 = parts[e ^ 1, 0] * keep, parts[e ^ 1, 1] * keep
            c1, c2, cb = unc._weighted_covariances(state, torch.stack([w1, w2, w1 + w2]), eta, center)
            vals.append(unc.heldout_crossfit(c1, c2, cb, fitted[e], jv))
        return torch.stack(vals).mean(0)

    torch.testing.assert_close(held, mean_value(torch.ones(8, dtype=torch.float64)), rtol=1e-9, atol=1e-12)
    jack = torch.stack([mean_value((torch.arange(8) != g).double()) for g in range(8)])  # [G, K]
    want = (7 / 8 * (jack - jack.mean(0)).square().sum(0)).sqrt()
    torch.testing.assert_close(se, want, rtol=1e-8, atol=1e-12)


def test_a_replicate_mode_at_rounding_level_is_never_matched():
    """A replicate mode whose eigenvalue is a numerical zero has an arbitrary direction in the null space, so it
    can overlap a live mode more than the live mode's true counterpart does. On main such a mode was matched
    (an interval value of -1.2e-15 among -0.2s, found with linear kernels sharing directions); now it is not."""
    from spec_torch.uncertainty import _match

    f64 = torch.float64
    c_full = torch.eye(2, dtype=f64)
    u = torch.tensor([[1.0], [0.0]], dtype=f64)  # one full-data mode, eigenvalue -0.2
    lam = torch.tensor([-0.2], dtype=f64)
    rep_vals = [torch.tensor([-1e-15, -0.19], dtype=f64)]
    rep_dirs = [torch.tensor([[1.0, 0.6], [0.0, 0.8]], dtype=f64)]  # the zero mode overlaps 1.0, the live 0.6
    matched, overlap, _ = _match(c_full, c_full @ u, torch.ones(1, dtype=f64), lam, rep_vals, rep_dirs, 1e-12)
    assert float(matched[0, 0]) == -0.19
    assert abs(float(overlap[0, 0]) - 0.6) < 1e-12
