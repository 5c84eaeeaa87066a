"""The SPEC core against the dense numpy/scipy oracle (tests/oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import difference, spectrum

import spec_torch as st

# float64 end to end: the feature route differs from the oracle by a Cholesky + two eighs of well-conditioned
# D x D matrices, so errors are a few hundred ulps of the spectral radius (~1e-14); 1e-9 leaves wide margin
# and still catches any missing factor (eta, sqrt(eta), 1/n), which shows at 1e-2 or more.
TOL64 = 1e-9
# float32 features and sums: relative error ~ sqrt(n) * 6e-8 for n ~ 1e3, i.e. ~2e-6; 1e-4 of spec_diff.
TOL32 = 1e-4


def make_xy(n=240, p=12, q=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=dtype), torch.randn(n, q, generator=g, dtype=dtype)


def planted(n=400, group=60, seed=0, d=16, swap=False):
    """x holds two tight groups (rows 0..group-1 and group..2group-1) that y scatters; swap exchanges x and y."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d))
    centers = rng.normal(size=(2, d)) * 3
    x[:group] = centers[0] + 0.05 * rng.normal(size=(group, d))
    x[group : 2 * group] = centers[1] + 0.05 * rng.normal(size=(group, d))
    return (y, x) if swap else (x, y)


def match_up_to_sign(a: np.ndarray, b: np.ndarray) -> float:
    """max_k min(||a_k - b_k||_inf, ||a_k + b_k||_inf) over columns."""
    return max(
        min(np.abs(a[:, k] - b[:, k]).max(), np.abs(a[:, k] + b[:, k]).max()) for k in range(a.shape[1])
    )


@pytest.mark.parametrize("kx,ky", [("cosine", "cosine"), ("linear", "linear"), ("cosine", "linear")])
@pytest.mark.parametrize("eta", [1.0, 0.37])
@pytest.mark.parametrize("method", ["features", "exact"])
def test_spectrum_matches_dense_oracle(kx, ky, eta, method):
    x, y = make_xy()
    res = st.spec(x, y, kernel_x=kx, kernel_y=ky, eta=eta, method=method)
    lmat = difference(x.numpy(), y.numpy(), kx, ky, eta)
    k = res.eigenvalues.numel()
    assert k == min(x.shape[0], x.shape[1] + y.shape[1])
    ref, vecs = spectrum(lmat, keep=k)
    scale = np.abs(ref).max()
    assert np.abs(res.eigenvalues.numpy() - ref).max() <= TOL64 * scale
    assert res.spec_diff == pytest.approx(np.abs(np.linalg.eigvalsh(lmat)).max(), rel=TOL64)
    # eigenvectors: unit norm, residual ||L v - lambda v|| small, equal to the oracle's up to sign
    modes = [0, 1, k - 2, k - 1]
    v = res.sample_scores(x, y, modes=modes).numpy()
    lam = res.eigenvalues.numpy()[modes]
    assert np.abs(np.linalg.norm(v, axis=0) - 1).max() < 1e-10
    assert np.abs(lmat @ v - v * lam).max() <= TOL64 * scale
    assert match_up_to_sign(v, vecs[:, modes]) < 1e-6  # eigenvector conditioning: 1/gap ~ 1e2


def test_trace_is_one_minus_eta_for_cosine():
    x, y = make_xy(n=50, p=40, q=30)  # n < D: the exact route keeps all n eigenvalues
    for eta in (1.0, 0.5, 2.0):
        res = st.spec(x, y, eta=eta, method="exact")
        assert float(res.eigenvalues.sum()) == pytest.approx(1 - eta, abs=1e-10)


def test_exact_gaussian_matches_oracle():
    x, y = make_xy(n=150, p=5, q=4)
    kx, ky = st.GaussianKernel(sigma=2.0), st.GaussianKernel(sigma=1.5)
    res = st.spec(x, y, kernel_x=kx, kernel_y=ky, eta=0.8)
    assert res.method == "exact"  # no feature map: auto must pick the exact route
    lmat = difference(x.numpy(), y.numpy(), "gaussian", "gaussian", 0.8, sigma_x=2.0, sigma_y=1.5)
    ref, _ = spectrum(lmat)
    assert np.abs(res.eigenvalues.numpy() - ref).max() <= TOL64 * np.abs(ref).max()
    assert float(res.eigenvalues.sum()) == pytest.approx(1 - 0.8, abs=1e-10)


def test_rff_approaches_exact_gaussian_as_rff_dim_grows():
    x, y = make_xy(n=300, p=6, q=6, seed=1)
    lmat = difference(x.numpy(), y.numpy(), "gaussian", "gaussian", sigma_x=2.0, sigma_y=2.0)
    ref, _ = spectrum(lmat, keep=10)
    errors = []
    for m in (50, 500, 5000):
        kern = st.GaussianKernel(sigma=2.0, rff_dim=m, seed=0)
        res = st.spec(
            x, y, kernel_x=kern, kernel_y=st.GaussianKernel(sigma=2.0, rff_dim=m, seed=1), method="auto"
        )
        assert res.method == ("features" if m == 50 else "exact")  # D = 4m vs n = 300: auto picks the cheaper
        top = res.eigenvalues.numpy()[np.argsort(-np.abs(res.eigenvalues.numpy()))[:10]]
        errors.append(np.abs(np.sort(top) - np.sort(ref)).max())
    # Monte Carlo error ~ m^-1/2: each 10x in m cuts it by ~3x; require a clear, monotone decrease
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < errors[0] / 4
    assert errors[2] < 0.05 * np.abs(ref).max()


def test_rff_trace_and_seed_determinism():
    x, y = make_xy(n=200, p=7, q=5)
    k1 = st.GaussianKernel(sigma=1.0, rff_dim=64, seed=3)
    a = st.spec(x, y, kernel_x=k1, kernel_y="cosine", method="features")
    b = st.spec(
        x, y, kernel_x=st.GaussianKernel(sigma=1.0, rff_dim=64, seed=3), kernel_y="cosine", method="features"
    )
    c = st.spec(
        x, y, kernel_x=st.GaussianKernel(sigma=1.0, rff_dim=64, seed=4), kernel_y="cosine", method="features"
    )
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert not torch.allclose(a.eigenvalues, c.eigenvalues)
    # RFF features have unit norm (cos^2 + sin^2 = 1), so trace(L) = 1 - eta exactly on the features too
    assert float(a.eigenvalues.sum()) == pytest.approx(0.0, abs=1e-10)


def test_features_and_exact_routes_agree_for_rff():
    x, y = make_xy(n=100, p=5, q=5)
    kx = st.GaussianKernel(sigma="auto", rff_dim=30, seed=0)
    a = st.spec(x, y, kernel_x=kx, kernel_y="linear", method="features")
    b = st.spec(x, y, kernel_x=kx, kernel_y="linear", method="exact")
    assert a.kernel_x.describe() == b.kernel_x.describe()
    assert torch.allclose(a.eigenvalues, b.eigenvalues, atol=TOL64 * a.spec_diff, rtol=0)
    va = a.sample_scores(x, y, modes=[0, 1]).numpy()
    vb = b.sample_scores(x, y, modes=[0, 1]).numpy()
    assert np.abs(va - vb).max() < 1e-7  # same sign convention on both routes


def test_auto_sigma_is_median_distance_and_reported():
    from scipy.spatial.distance import pdist

    x, y = make_xy(n=120, p=4, q=4)
    res = st.spec(x, y, kernel_x=st.GaussianKernel(sigma="auto", rff_dim=50), kernel_y="cosine")
    info = res.to_dict()["kernel_x"]
    assert info["sigma_auto"] is True
    assert info["sigma"] == pytest.approx(np.median(pdist(x.numpy())), rel=1e-12)
    assert info["seed"] == 0 and info["rff_dim"] == 50


def test_batch_split_and_merge_invariance():
    x, y = make_xy(n=301)
    whole = st.DiffCovariance("cosine", "linear").update(x, y).compute(eta=0.7)
    split = st.DiffCovariance("cosine", "linear")
    for xb, yb in zip(x.split(17), y.split(17)):
        split.update(xb, yb)
    a, b = st.DiffCovariance("cosine", "linear"), st.DiffCovariance("cosine", "linear")
    a.update(x[:100], y[:100])
    b.update(x[100:], y[100:])
    merged = a.merge(b).compute(eta=0.7)
    for other in (split.compute(eta=0.7), merged):
        assert other.n == 301
        assert torch.allclose(whole.eigenvalues, other.eigenvalues, atol=1e-13, rtol=0)


def test_state_dict_roundtrip_resumes():
    x, y = make_xy(n=90)
    kern = st.GaussianKernel(sigma="auto", rff_dim=20, seed=5)
    full = st.DiffCovariance(kern, "cosine").update(x, y).compute()
    first = st.DiffCovariance(kern, "cosine").update(x[:40], y[:40])
    saved = first.state_dict()
    resumed = st.DiffCovariance(kern, "cosine").load_state_dict(saved).update(x[40:], y[40:])
    # the auto sigma was fixed by the first batch of each run, so compare the resumed run with a run on x[:40] first
    ref = st.DiffCovariance(kern, "cosine").update(x[:40], y[:40]).update(x[40:], y[40:]).compute()
    assert torch.allclose(resumed.compute().eigenvalues, ref.eigenvalues, atol=1e-13, rtol=0)
    assert full.n == resumed.n == 90


def test_float32_default_and_float64_accumulation():
    x, y = make_xy(n=500, dtype=torch.float32)
    r32 = st.spec(x, y, method="features")
    assert r32.eigenvalues.dtype == torch.float64  # the solve is always float64
    acc = st.DiffCovariance("cosine", "cosine", accumulate_dtype=torch.float64).update(x, y)
    assert acc.xx.dtype == torch.float64
    r64 = st.spec(x.double(), y.double(), method="features")
    assert torch.allclose(r32.eigenvalues, r64.eigenvalues, atol=TOL32 * r64.spec_diff, rtol=0)
    assert torch.allclose(acc.compute().eigenvalues, r64.eigenvalues, atol=TOL32 * r64.spec_diff, rtol=0)


def test_numpy_input_accepted():
    x, y = make_xy(n=80)
    a = st.spec(x.numpy(), y.numpy())
    b = st.spec(x, y)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, atol=1e-14, rtol=0)


@pytest.mark.parametrize("method", ["features", "exact"])
def test_top_k_iterative_matches_full(method):
    x, y = make_xy(n=400, p=30, q=25)
    full = st.spec(x, y, method=method)
    top = st.spec(x, y, method=method, top_k=4)
    assert top.eigenvalues.numel() == 8
    ref = torch.cat([full.eigenvalues[:4], full.eigenvalues[-4:]])
    assert torch.allclose(top.eigenvalues, ref, atol=1e-8 * full.spec_diff, rtol=0)
    v_top = top.sample_scores(x, y, modes=[0, 7]).numpy()
    v_full = full.sample_scores(x, y, modes=[0, full.eigenvalues.numel() - 1]).numpy()
    assert np.abs(v_top - v_full).max() < 1e-5


@pytest.mark.parametrize("swap", [False, True])
def test_planted_clusters_found_with_the_right_sign(swap):
    x, y = planted(swap=swap)
    res = st.spec(x, y, kernel_x="cosine", kernel_y="cosine", method="features")
    modes = res.negative_modes(2) if swap else res.positive_modes(2)
    assert len(modes) == 2
    lam = res.eigenvalues[modes]
    assert bool(((lam < 0) if swap else (lam > 0)).all())
    # the two planted groups give the two strongest modes of that sign, far above everything else
    assert res.spec_diff == pytest.approx(abs(float(lam[0])))
    top = res.top_samples((x, y), k=30, modes=modes)
    groups = [set(range(0, 60)), set(range(60, 120))]
    found = [next(i for i, g in enumerate(groups) if set(row.tolist()) <= g) for row in top.indices]
    assert sorted(found) == [0, 1]
    assert bool((top.scores > 0).all())


def test_top_samples_streaming_equals_dense_scores_and_sign_is_deterministic():
    x, y = planted(n=300)
    res = st.spec(x, y, method="features")
    modes = res.positive_modes(3) + res.negative_modes(3)
    dense = res.sample_scores(x, y, modes=modes).numpy()
    batches = [(x[i : i + 37], y[i : i + 37]) for i in range(0, 300, 37)]
    top = res.top_samples(batches, k=8, modes=modes)
    for j in range(len(modes)):
        col = dense[:, j]
        assert np.abs(col).argmax() == col.argmax()  # largest-|entry| positive
        assert top.indices[j].tolist() == np.argsort(-col, kind="stable")[:8].tolist()
        assert np.allclose(top.scores[j].numpy(), np.sort(col)[::-1][:8], atol=1e-12)


def test_identical_embeddings_give_zero_spectrum():
    x, _ = make_xy(n=100)
    res = st.spec(x, x, method="features")
    assert res.spec_diff < 1e-12
    assert res.positive_modes(3) == [] and res.negative_modes(3) == []
    # C is singular (rank p of D = 2p): the rank-revealing factor drops its null space, no sqrt(eps) leak
    top = st.spec(x, x, method="features", top_k=2)
    assert top.spec_diff < 1e-12


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x, y = make_xy(n=2000, p=64, q=48, dtype=torch.float32)
    kern = st.GaussianKernel(sigma="auto", rff_dim=256, seed=0)
    cpu = st.spec(x, y, kernel_x=kern, kernel_y="cosine", method="features")
    gpu = st.spec(x.cuda(), y.cuda(), kernel_x=kern, kernel_y="cosine", method="features")
    assert torch.allclose(cpu.eigenvalues, gpu.eigenvalues.cpu(), atol=TOL32 * cpu.spec_diff, rtol=0)
    top_c = cpu.top_samples((x, y), k=5, modes=[0])
    top_g = gpu.top_samples((x.cuda(), y.cuda()), k=5, modes=[0])
    assert top_c.indices.tolist() == top_g.indices.tolist()
