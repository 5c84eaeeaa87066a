"""The permutation reference of SPEC-diff (``SpecResult.spec_diff_null``): SPEC-diff with the pairing shuffled.

Shuffling the pairing (y's rows by a uniform permutation P) changes only the cross block ``Phi_x^T P Phi_y``;
its average over P is ``s_x s_y^T / n``. The reference is SPEC-diff with that cross block. Checked here
against two dense numpy oracles (feature space and sample space), against real shuffles, and on the cases
whose answer is known (a rotation: 0; independent embeddings: about 1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import gram

import spec_torch as st
from spec_torch.kernels import GaussianKernel

pytestmark = pytest.mark.usefixtures("one_thread")

#: the library's routes vs the dense float64 oracles, relative to the reference: eigenvalue solvers are
#: backward stable (error ~ size * eps * ||M||, 1e-13 here); 1e-9 leaves room, a wrong formula is off by > 1e-3
ORACLE_RTOL = 1e-9
#: the block Krylov solver stops at residual <= rtol ||S|| (solver._top_k_both_signs): the extreme Ritz value is
#: then accurate to far better than this
KRYLOV_RTOL = 1e-6
#: mean SPEC-diff over 30 real shuffles vs the reference, relative, at n = 500: gaps of -2.7% .. +1.6% measured by
#: bench_permutation.py (docs/uncertainty.md), -2.5% .. -0.04% on this file's data; the cross block fluctuates by
#: O(1/sqrt n) around its average
GAP_500 = 0.05
#: the same at n = 1797 (digits) and 2000 (Gaussians): -0.85% .. +0.7% in the bench, -0.7% .. -0.02% here
GAP_2000 = 0.015
SHUFFLES = 30


# ---------------------------------------------------------------------------------------------- oracles
def features(a: np.ndarray, kind: str) -> np.ndarray:
    """Explicit feature rows of the cosine and linear kernels."""
    return a / np.linalg.norm(a, axis=1, keepdims=True) if kind == "cosine" else a


def feature_oracle(px: np.ndarray, py: np.ndarray, eta: float, center: bool) -> float:
    """max |eig(J C')| with C' the covariance whose cross block is replaced by s_x s_y^T / n (numpy eigvals)."""
    n = len(px)
    if center:
        px, py = px - px.mean(0), py - py.mean(0)
    cross = np.outer(px.sum(0), py.sum(0)) / n  # the average of Phi_x^T P Phi_y over permutations P
    s = np.sqrt(eta)
    c = np.block([[px.T @ px, s * cross], [s * cross.T, eta * py.T @ py]]) / n
    j = np.r_[np.ones(px.shape[1]), -np.ones(py.shape[1])]
    return float(np.abs(np.linalg.eigvals(j[:, None] * c)).max())


def sample_oracle(kx: np.ndarray, ky: np.ndarray, eta: float, center: bool) -> float:
    """The same from the n x n kernel matrices only, in the 2n-dimensional sample space.

    With B = blockdiag(Phi_x, sqrt(eta) Phi_y) / sqrt(n) the shuffled covariance is ``B^T G_P B``,
    ``G_P = [[I, P], [P^T, I]]``; its average is ``G = [[I, M], [M, I]]``, ``M = 11^T / n``. The nonzero
    eigenvalues of ``J B^T G B`` are those of ``G^1/2 blockdiag(K_x, -eta K_y) G^1/2`` (K = gram / n).
    """
    n = len(kx)
    kx, ky = kx / n, ky / n
    if center:
        h = np.eye(n) - 1.0 / n
        kx, ky = h @ kx @ h, h @ ky @ h
    m = np.full((n, n), 1.0 / n)
    g = np.block([[np.eye(n), m], [m, np.eye(n)]])
    w, v = np.linalg.eigh(g)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # G^1/2 (G's eigenvalues are 0, 1, 2)
    lam = np.block([[kx, np.zeros((n, n))], [np.zeros((n, n)), -eta * ky]])
    return float(np.abs(np.linalg.eigvalsh(root @ lam @ root)).max())


def shuffled(kx: np.ndarray, ky: np.ndarray, eta: float, center: bool, seed: int) -> np.ndarray:
    """SPEC-diff of ``SHUFFLES`` real shuffles of the pairing: ``||K_x - eta P K_y P^T||`` by dense eigvalsh."""
    n = len(kx)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(SHUFFLES):
        perm = rng.permutation(n)
        lmat = (kx - eta * ky[np.ix_(perm, perm)]) / n
        if center:
            col = lmat.mean(0)
            lmat = lmat - col[None, :] - col[:, None] + col.mean()
        out.append(np.abs(np.linalg.eigvalsh(lmat)).max())
    return np.array(out)


def related(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x [n, 12], y [n, 7] sharing a 4-d latent, with nonzero means (so the uncentred border matters)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    x = z @ rng.standard_normal((4, 12)) + rng.standard_normal((n, 12)) + 1.0
    y = z @ rng.standard_normal((4, 7)) + 0.5 * rng.standard_normal((n, 7)) - 0.3
    return x, y


def digits_pair(n: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw digits pixels [n, 64] (a seeded subset) and a ``dim``-d Gaussian random projection of them."""
    from sklearn.datasets import load_digits

    x = load_digits().data
    rng = np.random.default_rng(seed)
    x = x[np.sort(rng.permutation(len(x))[:n])]
    return x, x @ rng.standard_normal((64, dim))


# --------------------------------------------------------------------------------- (a) the dense oracles
@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_reference_matches_dense_oracles(kind, center, eta):
    x, y = related()
    px, py = features(x, kind), features(y, kind)
    want = feature_oracle(px, py, eta, center)
    assert sample_oracle(px @ px.T, py @ py.T, eta, center) == pytest.approx(want, rel=ORACLE_RTOL)
    # the features route streamed in batches, with and without the top-k solver, and the exact route
    acc = st.DiffCovariance(kind, kind)
    for start in range(0, len(x), 64):
        acc.update(x[start : start + 64], y[start : start + 64])
    for res in (
        acc.compute(eta=eta, center=center),
        acc.compute(eta=eta, center=center, top_k=3),
        st.spec(x, y, kind, kind, eta=eta, method="exact", center=center),
        st.spec(x, y, kind, kind, eta=eta, method="exact", center=center, top_k=3),
    ):
        assert res.spec_diff_null == pytest.approx(want, rel=ORACLE_RTOL), (res.method, res.solver)
        assert res.spec_diff_ratio == pytest.approx(res.spec_diff / want, rel=ORACLE_RTOL)


@pytest.mark.parametrize("center", [False, True])
def test_exact_route_reference_converges_in_the_krylov_solver(center, monkeypatch):
    """The n x n routes take the reference's two ends from the block Krylov solver: on class-sorted digits in
    float32 (the default path, a hard case) it converges without its eigvalsh fallback and agrees with the
    dense oracle."""
    from sklearn.datasets import load_digits

    data, labels = load_digits(return_X_y=True)
    order = np.argsort(labels, kind="stable")[:600]  # class-sorted rows
    x = data[order].astype(np.float32)
    y = (data[order] @ np.random.default_rng(0).standard_normal((64, 8))).astype(np.float32)
    want = sample_oracle(*(gram(a.astype(np.float64), "cosine") for a in (x, y)), 1.0, center)

    def no_eigvalsh(*args, **kwargs):  # the Krylov solver's fallback (and a full solve) would call it
        raise AssertionError("the reference was not found by the block Krylov solver")

    monkeypatch.setattr(torch.linalg, "eigvalsh", no_eigvalsh)
    res = st.spec(x, y, "cosine", "cosine", method="exact", center=center)
    assert res.spec_diff_null == pytest.approx(want, rel=KRYLOV_RTOL)


@pytest.mark.parametrize("center", [False, True])
def test_reference_without_feature_map_and_in_the_dual(center):
    """The exact Gaussian kernel has no finite feature map: the reference comes from kernel values alone.
    The features route with D > n (solved in the n x n dual) takes the same sample-space construction."""
    x, y = related(n=120)
    kx, ky = GaussianKernel(sigma=3.0), GaussianKernel(sigma=1.5)
    res = st.spec(x, y, kx, ky, eta=0.8, method="exact", center=center)
    want = sample_oracle(gram(x, "gaussian", 3.0), gram(y, "gaussian", 1.5), 0.8, center)
    assert res.spec_diff_null == pytest.approx(want, rel=ORACLE_RTOL)

    wide_x = np.random.default_rng(1).standard_normal((120, 150)) + 0.2  # D = 150 + 7 > n = 120
    dual = st.spec(wide_x, y, "cosine", "cosine", method="features", center=center)
    assert dual.solver == "dual"
    want = feature_oracle(features(wide_x, "cosine"), features(y, "cosine"), 1.0, center)
    assert dual.spec_diff_null == pytest.approx(want, rel=ORACLE_RTOL)


def test_centred_reference_bounds_every_pairing():
    """Centred, the reference is max(lambda_max(H K_x H), eta lambda_max(H K_y H)), and since
    ``H K_x H - eta P H K_y H P^T`` lies between ``-eta P H K_y H P^T`` and ``H K_x H`` (Loewner order), it
    bounds the centred SPEC-diff of every pairing, the real one and every shuffle."""
    x, y = related()
    px, py = features(x, "cosine"), features(y, "cosine")
    n, h, eta = len(x), np.eye(len(x)) - 1.0 / len(x), 0.7
    kx, ky = h @ px @ px.T @ h / n, h @ py @ py.T @ h / n
    closed = max(np.linalg.eigvalsh(kx)[-1], eta * np.linalg.eigvalsh(ky)[-1])
    res = st.spec(x, y, "cosine", "cosine", eta=eta, center=True)
    assert res.spec_diff_null == pytest.approx(closed, rel=ORACLE_RTOL)
    assert res.spec_diff <= closed * (1 + ORACLE_RTOL)
    assert shuffled(px @ px.T, py @ py.T, eta, True, seed=0).max() <= closed * (1 + ORACLE_RTOL)


def test_streamed_merged_grouped_and_serialised():
    """Batches, a merge of two halves and group-wise sums give the same reference (the all-reduce under DDP is
    the same sum); to_dict carries it; ``reference=False`` skips it."""
    x, y = related(n=300)
    whole = st.spec(x, y, "cosine", "linear", eta=0.5)
    a, b = st.DiffCovariance("cosine", "linear"), st.DiffCovariance("cosine", "linear", groups=4)
    a.update(x[:100], y[:100])
    other = st.DiffCovariance("cosine", "linear").update(x[100:], y[100:])
    a.merge(other)
    for start in range(0, 300, 70):
        b.update(x[start : start + 70], y[start : start + 70])
    for res in (a.compute(eta=0.5), b.compute(eta=0.5)):
        assert res.spec_diff_null == pytest.approx(whole.spec_diff_null, rel=ORACLE_RTOL)
    out = json.loads(json.dumps(whole.to_dict()))
    assert out["spec_diff_null"] == whole.spec_diff_null
    assert out["spec_diff_ratio"] == pytest.approx(whole.spec_diff / whole.spec_diff_null)
    skipped = a.compute(eta=0.5, reference=False)
    assert skipped.spec_diff_null is None and skipped.spec_diff_ratio is None
    assert skipped.to_dict()["spec_diff_ratio"] is None
    for method in ("features", "exact"):
        assert st.spec(x, y, "cosine", "linear", method=method, reference=False).spec_diff_null is None


def test_exact_route_reference_when_it_does_not_fit(monkeypatch):
    """The (2n+1)-square matrix needs twice the memory of the exact solve: by default the reference is then
    skipped with a warning naming ``reference`` (the comparison itself still runs); ``reference=True`` refuses."""
    import spec_torch.api as api

    x, y = related(n=300)
    n, block = 300, 300
    exact_bytes = (4 * n * n + 2 * block * n) * 8  # what the exact solve itself needs (api.spec's estimate)
    monkeypatch.setattr(api, "memory_available", lambda device: exact_bytes + 1)
    monkeypatch.setattr("spec_torch._validate.memory_available", lambda device: exact_bytes + 1)
    with pytest.warns(UserWarning, match="reference"):
        res = st.spec(x, y, "cosine", "linear", method="exact")
    assert res.spec_diff_null is None and res.spec_diff > 0
    with pytest.raises(st.SpecError, match="reference"):
        st.spec(x, y, "cosine", "linear", method="exact", reference=True)
    assert st.spec(x, y, "cosine", "linear", method="features").spec_diff_null is not None  # D x D: no n x n


# ------------------------------------------------------------------------------- (b) real shuffles
def _gap(x, y, center, seed=0):
    """(mean SPEC-diff over real shuffles / reference - 1, the reference), cosine kernels, eta = 1."""
    px, py = features(x, "cosine"), features(y, "cosine")
    ref = st.spec(x, y, "cosine", "cosine", center=center).spec_diff_null
    return shuffled(px @ px.T, py @ py.T, 1.0, center, seed).mean() / ref - 1, ref


@pytest.mark.parametrize("center", [False, True])
def test_real_shuffles_digits_n500(center):
    gap, _ = _gap(*digits_pair(500), center)
    assert abs(gap) <= GAP_500
    if center:  # the reference bounds every centred pairing (above): the shuffles' mean is below it
        assert gap <= ORACLE_RTOL


@pytest.mark.parametrize("center", [False, True])
def test_real_shuffles_independent_gaussians_n500(center):
    g = np.random.default_rng(3)
    gap, _ = _gap(g.standard_normal((500, 40)) + 0.5, g.standard_normal((500, 40)), center)
    assert abs(gap) <= GAP_500


@pytest.mark.slow
@pytest.mark.parametrize("center", [False, True])
def test_real_shuffles_large_n(center):
    """n = 1797 (all of digits) and n = 2000 Gaussians: the gap shrinks as the cross block's O(1/sqrt n)
    fluctuation does."""
    gap, _ = _gap(*digits_pair(1797), center)
    assert abs(gap) <= GAP_2000
    g = np.random.default_rng(3)
    gap, _ = _gap(g.standard_normal((2000, 40)) + 0.5, g.standard_normal((2000, 40)), center)
    assert abs(gap) <= GAP_2000


# ------------------------------------------------------------------------------ (c) calibration sanity
#: SPEC-diff of a rotated copy under cosine kernels: exactly 0 in exact arithmetic, rounding level here
ROTATION_ZERO = 1e-10
#: the ratio of independent embeddings: their real pairing is one shuffle among others, so the ratio is the
#: (one-draw) shuffled SPEC-diff over the reference: measured 0.993 (n = 2000, p = 40, centred or not)
INDEPENDENT_RANGE = (0.9, 1.05)
#: digits pixels vs an 8-d random projection, centred: 0.71 at n = 500 and at n = 1797 on this file's data
#: (0.66 and 0.73 with the bench's projections)
PROJECTION_RANGE = (0.3, 0.9)


@pytest.mark.parametrize("center", [False, True])
def test_ratio_of_a_rotation_is_zero(center):
    x, _ = related(n=500)
    q = np.linalg.qr(np.random.default_rng(5).standard_normal((12, 12)))[0]
    res = st.spec(x, x @ q, "cosine", "cosine", center=center)
    assert res.spec_diff <= ROTATION_ZERO
    assert res.spec_diff_null > 0.01  # the same marginals paired at random do differ
    assert res.spec_diff_ratio <= ROTATION_ZERO / 0.01


@pytest.mark.parametrize("center", [False, True])
def test_ratio_of_independent_embeddings_is_about_one(center):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 40, generator=g), torch.randn(2000, 40, generator=g)
    ratio = st.spec(x, y, "cosine", "cosine", center=center).spec_diff_ratio
    assert INDEPENDENT_RANGE[0] <= ratio <= INDEPENDENT_RANGE[1]
    if center:
        assert ratio <= 1 + ORACLE_RTOL  # the centred reference bounds every pairing


def test_ratio_of_a_random_projection_is_between():
    for n in (500, 1797):
        ratio = st.spec(*digits_pair(n), "cosine", "cosine", center=True).spec_diff_ratio
        assert PROJECTION_RANGE[0] < ratio < PROJECTION_RANGE[1], n
