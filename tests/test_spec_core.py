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


def close_pair(n=600, p=64, noise=1e-4, seed=0):
    """The hard case: y is x plus a tiny perturbation (a checkpoint and its fine-tuned copy), float32 input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    return x, x + noise * torch.randn(n, p, generator=g)


def oracle_spec_diff(x, y, kx="cosine", ky="cosine", eta=1.0):
    lmat = difference(x.double().numpy(), y.double().numpy(), kx, ky, eta)
    return np.abs(np.linalg.eigvalsh(lmat)).max(), lmat


# the float64 default on the close case: eigenvalue errors are eps_64 ||L|| ~ 1e-16 against an answer ~1e-7 of
# ||L||, i.e. ~1e-8 relative; 1e-6 leaves margin yet fails at once for float32 sums (relative error ~0.5)
TOL_CLOSE = 1e-6


def test_float64_default_on_close_embeddings_matches_oracle():
    x, y = close_pair()
    ref, lmat = oracle_spec_diff(x, y)
    res = st.spec(x, y, method="features")
    assert res.method == "features" and res.solver == "eigh"
    acc = st.DiffCovariance("cosine", "cosine")
    assert acc.accumulate_dtype == torch.float64  # the default, for float32 input
    assert res.spec_diff == pytest.approx(ref, rel=TOL_CLOSE)
    ex = st.spec(x, y, method="exact")
    assert ex.spec_diff == pytest.approx(ref, rel=TOL_CLOSE)
    v = res.sample_scores(x, y, modes=[0]).numpy()
    assert abs(np.linalg.norm(v) - 1) < 1e-6
    assert np.abs(lmat @ v - v * float(res.eigenvalues[0])).max() < 1e-6 * ref


def test_float32_accumulation_reports_noise_as_zero():
    x, y = close_pair()
    ref, _ = oracle_spec_diff(x, y)
    r32 = st.spec(x, y, method="features", accumulate_dtype=torch.float32)
    # float32 sums cannot resolve this difference: its eigenvalues fall below the reported noise level
    assert r32.zero_tol > ref
    assert r32.positive_modes(3) == [] and r32.negative_modes(3) == []
    # on an easy case float32 sums agree with float64 to their own tolerance
    x2, y2 = make_xy(n=500, dtype=torch.float32)
    a = st.spec(x2, y2, method="features", accumulate_dtype=torch.float32)
    b = st.spec(x2.double(), y2.double(), method="features")
    assert torch.allclose(a.eigenvalues, b.eigenvalues, atol=TOL32 * b.spec_diff, rtol=0)
    for bad in (torch.int64, torch.float16, "float64"):
        with pytest.raises(st.SpecError, match="accumulate_dtype: expected torch.float32, torch.float64"):
            st.DiffCovariance(accumulate_dtype=bad)


@pytest.mark.slow
def test_close_model_contract_n3000():
    """Issue 8's case: n=3000, p=256, float32 input, defaults: within 1e-3 of the float64 oracle, unit vectors."""
    x, y = close_pair(n=3000, p=256)
    ref, lmat = oracle_spec_diff(x, y)
    res = st.spec(x, y)
    assert res.spec_diff == pytest.approx(ref, rel=1e-3)
    v = res.sample_scores(x, y, modes=[0]).numpy()
    assert abs(np.linalg.norm(v) - 1) < 1e-6


@pytest.mark.parametrize("method", ["features", "exact"])
def test_rotation_gives_zero_difference(method):
    """y = x Q with Q orthogonal: cosine kernels are equal up to float32 input rounding (oracle ~1e-10)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 64, generator=g)
    q = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    y = (x.double() @ q).float()  # not bit-identical kernels: float32 rounding of the rotated rows
    ref, _ = oracle_spec_diff(x, y)
    res = st.spec(x, y, method=method)
    assert res.method == method
    assert res.spec_diff <= 1e-9  # the contract (absolute, cosine, eta = 1)
    assert abs(res.spec_diff - ref) <= 1e-9
    assert res.positive_modes(3) == [] and res.negative_modes(3) == []  # no noise modes for float32 input


@pytest.mark.parametrize("method", ["features", "exact"])
def test_single_sample_cosine_gives_zero(method):
    x, y = close_pair(n=5, p=7)
    res = st.spec(x[:1], y[:1], method=method)
    assert res.spec_diff == 0.0 or res.spec_diff < 1e-15


def test_numpy_input_accepted():
    x, y = make_xy(n=80)
    a = st.spec(x.numpy(), y.numpy())
    b = st.spec(x, y)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, atol=1e-14, rtol=0)


@pytest.mark.parametrize("method", ["features", "exact"])
def test_top_k_iterative_matches_full(method):
    # D = 260 (features) and n = 400 (exact) are large enough for a Krylov basis (> 4 (k + 8)), and two planted
    # groups on each side separate the spectrum's ends, so the converged Krylov branch must be the one that ran
    x, _ = planted(n=400, d=150, seed=0)
    y, _ = planted(n=400, d=110, seed=1)
    y = np.roll(y, 200, axis=0)  # y's groups on other rows
    full = st.spec(x, y, method=method)
    top = st.spec(x, y, method=method, top_k=2)
    assert top.solver == "krylov" and full.solver == "eigh"
    assert top.eigenvalues.numel() == 4
    ref = torch.cat([full.eigenvalues[:2], full.eigenvalues[-2:]])
    assert torch.allclose(top.eigenvalues, ref, atol=1e-8 * full.spec_diff, rtol=0)
    v_top = top.sample_scores(x, y, modes=[0, 3]).numpy()
    v_full = full.sample_scores(x, y, modes=[0, full.eigenvalues.numel() - 1]).numpy()
    assert np.abs(v_top - v_full).max() < 1e-5


@pytest.mark.parametrize("method", ["features", "exact"])
def test_top_k_never_pads_with_the_other_sign(method):
    """x holds groups y does not, and y is a rank-one copy: only a few negative modes exist."""
    x, _ = planted(n=200, d=16)
    y = np.repeat(x[:, :1], 3, axis=1)  # linear kernel of rank 1: at most one negative mode
    res = st.spec(x, y, kernel_x="linear", kernel_y="linear", method=method, top_k=5)
    full = st.spec(x, y, kernel_x="linear", kernel_y="linear", method=method)
    lam = res.eigenvalues.numpy()
    n_neg = int((full.eigenvalues < -full.zero_tol).sum())
    assert n_neg < 5
    assert int((lam < 0).sum()) == n_neg and int((lam > 0).sum()) == 5
    assert bool((res.eigenvalues.abs() > res.zero_tol).all())  # no numerical zeros
    assert np.allclose(lam[:5], full.eigenvalues.numpy()[:5], rtol=1e-9, atol=0)


def test_top_k_accepts_numpy_and_tensor_scalars_and_bounds():
    x, y = make_xy(n=60, p=4, q=3)
    a = st.spec(x, y, top_k=np.int64(2), eta=np.float32(0.5))
    b = st.spec(x, y, top_k=torch.tensor(2), eta=torch.tensor(0.5))
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    st.spec(x, y, top_k=7, method="features")  # top_k <= min(n, D) = 7 is allowed
    with pytest.raises(st.SpecError, match="top_k: asks for 8 modes"):
        st.spec(x, y, top_k=8, method="features")


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


@pytest.mark.parametrize("method", ["features", "exact"])
def test_identical_embeddings_give_zero_spectrum(method):
    x, _ = make_xy(n=100, dtype=torch.float32)
    y = x * 3.0  # not bit-identical: x scaled and rounded in float32 (cosine ignores the scale)
    assert not torch.equal(y / 3.0, x) or not torch.equal(y, x)
    ref, _ = oracle_spec_diff(x, y)
    res = st.spec(x, y, method=method)
    # exact route: eps_64 ||L||; features route on nearly identical kernels: C is singular to float32 rounding
    # (its small eigenvalues ~1e-14 ||C||), so L's tiny eigenvalues are resolved to ~sqrt(eps_64) * 1e-1 only
    assert abs(res.spec_diff - ref) < (1e-12 if method == "exact" else 1e-8)
    assert res.positive_modes(3) == [] and res.negative_modes(3) == []  # float32 input: no noise modes
    # C is singular (rank p of D = 2p): the rank-revealing factor drops its null space, no sqrt(eps) leak
    top = st.spec(x, y, method=method, top_k=2)
    assert top.spec_diff < 1e-9
    assert top.eigenvalues.numel() == 0 or bool((top.eigenvalues.abs() > top.zero_tol).all())


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


# ---------------------------------------------------------------- bandwidth fitted on the data, not a batch
def class_sorted(n=4000, p=12, classes=4, seed=0):
    """Rows sorted by class, classes far apart: a first batch holds one class only."""
    g = torch.Generator().manual_seed(seed)
    centres = 8 * torch.randn(classes, p, generator=g)
    labels = torch.arange(n) * classes // n  # [n], sorted
    x = centres[labels] + torch.randn(n, p, generator=g)
    y = x[:, : p // 2] + 0.5 * torch.randn(n, p // 2, generator=g)
    return x, y


def test_auto_sigma_independent_of_batch_size_on_class_sorted_rows():
    x, y = class_sorted()
    kern = st.GaussianKernel(sigma="auto", rff_dim=40, seed=0)
    a = st.spec(x, y, kernel_x=kern, kernel_y=kern, method="features", batch_size=1000)
    b = st.spec(x, y, kernel_x=kern, kernel_y=kern, method="features", batch_size=8192)
    assert a.kernel_x.describe() == b.kernel_x.describe()  # the same sigma, exactly
    assert torch.allclose(a.eigenvalues, b.eigenvalues, atol=1e-13, rtol=0)
    # the fit sample is uniform over all rows: sigma spans the classes (a first batch of 1000 would not)
    first = st.GaussianKernel(sigma="auto").fit(x[:1000]).sigma
    assert a.kernel_x.sigma > 3 * first
    # DiffCovariance: fit() on a sample of the whole data gives the same result; a first-batch fit warns
    acc = st.DiffCovariance(kern, kern).fit(x, y)
    for xb, yb in zip(x.split(1000), y.split(1000)):
        acc.update(xb, yb)
    assert torch.allclose(acc.compute().eigenvalues, a.eigenvalues, atol=1e-13, rtol=0)
    with pytest.warns(UserWarning, match="first batch only.*Call acc.fit"):
        st.DiffCovariance(kern, kern).update(x[:1000], y[:1000])


# ------------------------------------------------------------------------- the uniform mode and centring
def level_pair(n=300, seed=0):
    """Cosine x against linear y with a large common offset: the kernels' average levels differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randn(n, 5, generator=g, dtype=torch.float64) * 0.3 + 0.4
    return x, y


@pytest.mark.parametrize("method", ["features", "exact"])
def test_uniformity_matches_oracle_and_flags_the_level_mode(method):
    x, y = level_pair()
    res = st.spec(x, y, kernel_x="cosine", kernel_y="linear", method=method)
    lmat = difference(x.numpy(), y.numpy(), "cosine", "linear")
    ref, vecs = spectrum(lmat, keep=res.eigenvalues.numel())
    expected = np.abs(vecs.sum(0)) / np.sqrt(len(x))  # |<v_k, 1>| / sqrt(n)
    live = (res.eigenvalues.abs() > res.zero_tol).numpy()
    assert res.uniformity.dtype == torch.float64 and res.uniformity.shape == res.eigenvalues.shape
    assert np.abs(res.uniformity.numpy()[live] - expected[live]).max() < 1e-8
    assert res.uniform_modes() == [int(np.argmin(ref))]  # y's common offset: the most negative mode
    assert res.uniformity[res.uniform_modes()[0]] > st.result.UNIFORM_THRESHOLD
    d = res.to_dict()
    assert d["uniformity"] == pytest.approx(res.uniformity.tolist()) and d["center"] is False


@pytest.mark.parametrize("method", ["features", "exact"])
def test_center_matches_hlh_oracle_and_removes_the_uniform_mode(method):
    x, y = level_pair()
    res = st.spec(x, y, kernel_x="cosine", kernel_y="linear", method=method, center=True)
    n = len(x)
    h = np.eye(n) - 1.0 / n
    lmat = h @ difference(x.numpy(), y.numpy(), "cosine", "linear") @ h
    k = int((res.eigenvalues.abs() > res.zero_tol).sum())
    ref, vecs = spectrum(lmat, keep=k)
    top = res.eigenvalues[res.eigenvalues.abs() > res.zero_tol].numpy()
    assert np.abs(np.sort(top) - np.sort(ref)).max() <= TOL64 * np.abs(ref).max()
    assert res.uniform_modes() == [] and res.center
    modes = [0, res.eigenvalues.numel() - 1]
    v = res.sample_scores(x, y, modes=modes).numpy()  # scores of H L H's eigenvectors
    assert np.abs(lmat @ v - v * res.eigenvalues.numpy()[modes]).max() <= TOL64 * np.abs(ref).max()
    assert np.abs(v.sum(0)).max() < 1e-8


# ----------------------------------------------------------------------- the route and the n x n dual
def test_choose_route_weighs_costs():
    from spec_torch.api import choose_route

    auto = st.GaussianKernel(sigma=1.0, rff_dim="auto")
    assert choose_route("auto", 1000, 384, 384, auto, auto) == "exact"
    assert choose_route("auto", 200_000, 384, 384, auto, auto) == "features"
    big = st.GaussianKernel(
        sigma=1.0, rff_dim=2000
    )  # D = 8000 > n: the features route would solve in the dual
    assert choose_route("auto", 1000, 64, 64, big, big) == "exact"
    cos = st.CosineKernel()
    assert choose_route("auto", 100_000, 768, 512, cos, cos) == "features"
    assert choose_route("auto", 1000, 64, 64, st.GaussianKernel(sigma=1.0), cos) == "exact"
    assert auto.for_route("exact").rff_dim is None
    assert auto.for_route("features").rff_dim == st.kernels.AUTO_RFF_DIM


def test_features_route_solves_in_the_dual_when_d_exceeds_n():
    x, y = make_xy(n=80, p=5, q=4)
    kx = st.GaussianKernel(sigma=2.0, rff_dim=60, seed=0)  # D = 120 + 4 > n = 80
    dual = st.spec(x, y, kernel_x=kx, kernel_y="linear", method="features")
    assert dual.method == "features" and dual.solver == "dual"
    primal = st.DiffCovariance(kx, "linear").update(x, y).compute()  # the D x D solve
    assert primal.solver == "eigh"
    k = min(dual.eigenvalues.numel(), primal.eigenvalues.numel())
    assert torch.allclose(dual.eigenvalues[:k], primal.eigenvalues[:k], atol=TOL64 * dual.spec_diff, rtol=0)
    phi = kx.fit(x).features(x).numpy()
    lmat = (phi @ phi.T - y.numpy() @ y.numpy().T) / len(x)
    ref, _ = spectrum(lmat, keep=dual.eigenvalues.numel())
    assert np.abs(dual.eigenvalues.numpy() - ref).max() <= TOL64 * np.abs(ref).max()


def test_rff_auto_is_exact_on_the_exact_route_and_rff_on_the_features_route():
    x, y = make_xy(n=150, p=5, q=4)
    auto = st.GaussianKernel(sigma=2.0, rff_dim="auto")
    ex = st.spec(x, y, kernel_x=auto, kernel_y=auto)
    assert ex.method == "exact" and ex.kernel_x.rff_dim is None
    lmat = difference(x.numpy(), y.numpy(), "gaussian", "gaussian", sigma_x=2.0, sigma_y=2.0)
    assert ex.spec_diff == pytest.approx(np.abs(np.linalg.eigvalsh(lmat)).max(), rel=TOL64)
    acc = st.DiffCovariance(auto, "cosine")
    assert acc.kernel_x.rff_dim == st.kernels.AUTO_RFF_DIM


# ------------------------------------------------------------------------------ extreme inputs (item 7)
def test_exact_gaussian_is_float64_and_offset_safe():
    x, y = make_xy(n=120, p=5, q=4, dtype=torch.float32)
    x = x + 1000.0  # an offset that costs cdist-in-float32 5e-4 relative error
    kern = st.GaussianKernel(sigma=0.05)  # small sigma: a float32 diagonal would be 0.998
    lmat = st.difference_matrix(x, y, kern, st.GaussianKernel(sigma=1.0), eta=1.0)
    assert bool((torch.diagonal(kern.gram(x, x)) == 1).all())
    assert bool((torch.diagonal(lmat) == 0).all())  # (1 - eta * 1) / n exactly
    ref = difference(
        x.double().numpy(), y.double().numpy(), "gaussian", "gaussian", sigma_x=0.05, sigma_y=1.0
    )
    assert np.abs(lmat.numpy() - ref).max() < 1e-12


def test_cosine_extreme_row_norms():
    x, y = make_xy(n=50, p=6, q=4)
    x[3] *= 1e-200  # tiny but not zero
    x[4] *= 1e200  # its squared norm overflows float64
    res = st.spec(x, y, method="features")
    xs = x.clone()
    xs[3] /= 1e-200
    xs[4] /= 1e200
    assert torch.allclose(res.eigenvalues, st.spec(xs, y, method="features").eigenvalues, atol=1e-14, rtol=0)
    x32 = make_xy(n=50, p=6, q=4, dtype=torch.float32)[0]
    x32[0] = 1e-23  # a tiny float32 row is a valid direction
    st.spec(x32, y.float())
    x32[0] = 0.0
    with pytest.raises(st.SpecError, match="x: the cosine kernel needs non-zero rows.*row 0"):
        st.spec(x32, y.float())


def test_linear_kernel_at_1e20_is_right_or_refused():
    x, y = make_xy(n=60, p=4, q=3, dtype=torch.float32)
    x = x * 1e20  # float32 squares overflow; the float64 default sums them right
    res = st.spec(x, y, kernel_x="linear", kernel_y="linear", method="features")
    ref, _ = spectrum(difference(x.double().numpy(), y.double().numpy(), "linear", "linear"))
    assert res.spec_diff == pytest.approx(np.abs(ref).max(), rel=1e-9)
    with pytest.raises(st.SpecError, match="overflowed in torch.float32.*accumulate_dtype=torch.float64"):
        st.spec(x, y, kernel_x="linear", kernel_y="linear", method="features", accumulate_dtype=torch.float32)


def test_extreme_eta_refused_and_difference_matrix_validates():
    x, y = make_xy(n=30, p=4, q=3)
    with pytest.raises(st.SpecError, match="eta: expected a positive number at most 1e\\+100"):
        st.spec(x, y, eta=1e308)
    kern = st.CosineKernel()
    with pytest.raises(st.SpecError, match="x and y: expected the same samples"):
        st.difference_matrix(x, y[:-1], kern, kern)
    with pytest.raises(st.SpecError, match="eta: expected a positive number"):
        st.difference_matrix(x, y, kern, kern, eta=-1.0)
    with pytest.raises(st.SpecError, match="kernel_x: .* is not fitted"):
        st.difference_matrix(x, y, st.GaussianKernel(sigma="auto"), kern)
    with pytest.raises(st.SpecError, match="x: contains NaN"):
        st.difference_matrix(x.index_fill(0, torch.tensor([1]), float("nan")), y, kern, kern)


def test_state_dict_keeps_the_input_dtype_that_sets_the_zero_cut_off(tmp_path):
    """A resumed accumulator reports the same modes: the input dtype (float32 here) travels in the state."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = x + 1e-4 * torch.randn(300, 8, generator=g)  # close models: small eigenvalues near the cut-off
    acc = st.DiffCovariance()
    acc.update(x, y)
    torch.save(acc.state_dict(), tmp_path / "state.pt")
    back = st.DiffCovariance().load_state_dict(torch.load(tmp_path / "state.pt"))
    assert back.input_dtype == torch.float32
    a, b = acc.compute(), back.compute()
    assert a.zero_tol == b.zero_tol and torch.equal(a.eigenvalues, b.eigenvalues)
