"""st.spec_matrix: every entry against st.spec and the dense oracle, streaming, memory fallback, DDP, layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import gloo_group, spawn_gloo
from oracle import difference

import spec_torch as st
from spec_torch.apps.report.metrics import LinearCKA
from spec_torch.errors import SpecError
from spec_torch.result import UNIFORM_THRESHOLD

pytestmark = pytest.mark.usefixtures("one_thread")

# float64 end to end: each entry is a Cholesky + eigh of a sub-block of the joint sums, st.spec's the same
# solve of the same numbers summed in another order: differences are rounding (~1e-14 of the spectral
# radius); 1e-8 (the tolerance) still catches a wrong block, a missing eta or 1/n (>= 1e-2).
TOL64 = 1e-8
# float32 input: features cast to float64 before the sums, so only the input rounding differs (~1e-7).
TOL32 = 1e-5
#: 2 Gloo ranks vs 1 process: only the summation order of the float64 sums differs
DIST_RTOL = 1e-11


def feature_sets(n=240, seed=0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Hard cases side by side: a, a rotated (population difference 0), a slightly perturbed (close),
    class-sorted planted clusters (rows sorted by group), and independent noise of another width."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 10, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64)).Q
    centres = 3 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    sorted_groups = centres.repeat_interleave(n // 4, 0) + 0.3 * torch.randn(
        n, 7, generator=g, dtype=torch.float64
    )
    out = {
        "a": a,
        "a_rot": a @ q,
        "a_close": a + 0.05 * torch.randn(n, 10, generator=g, dtype=torch.float64),
        "clusters": sorted_groups,
        "noise": torch.randn(n, 6, generator=g, dtype=torch.float64),
    }
    return {k: v.to(dtype) for k, v in out.items()}


def _eig(lmat: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(lmat)


@pytest.mark.parametrize("kernel", ["cosine", "linear"])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_every_entry_equals_spec_on_that_pair_and_the_oracle(kernel, eta):
    f = feature_sets()
    m = st.spec_matrix(f, kernel=kernel, eta=eta, batch_size=70)
    assert m.route == "joint" and m.passes == 1 and m.names == list(f)
    names = list(f)
    for i, a in enumerate(names):
        assert m.spec_diff[i, i] == 0 and m.lead[i, i] == 0
        for j, b in enumerate(names):
            if i == j:
                continue
            ref = st.spec(f[a], f[b], kernel_x=kernel, kernel_y=kernel, eta=eta, method="features")
            ev = _eig(difference(f[a].numpy(), f[b].numpy(), kernel, kernel, eta))
            # relative to (tr K_i + eta tr K_j) / n, a bound on ||L||: the rotated pair's spectrum is ~0
            tol = TOL64 * ref.scale
            assert abs(float(m.spec_diff[i, j]) - ref.spec_diff) <= tol
            assert abs(float(m.spec_diff[i, j]) - np.abs(ev).max()) <= tol
            assert abs(float(m.lead[i, j]) - max(ev.max(), 0.0)) <= tol
    if eta == 1.0:
        assert torch.equal(m.spec_diff, m.spec_diff.T)
    else:  # (K_i - eta K_j) and (K_j - eta K_i) differ
        assert not torch.allclose(m.spec_diff, m.spec_diff.T, rtol=1e-3)


def test_gaussian_rff_kernels_per_set_match_spec_with_the_same_fitted_kernels():
    f = feature_sets()
    kernels = {
        k: st.GaussianKernel(sigma="auto", rff_dim=32, seed=i).fit(v) for i, (k, v) in enumerate(f.items())
    }
    m = st.spec_matrix(f, kernel=kernels)
    ref = st.spec(
        f["a"], f["clusters"], kernel_x=kernels["a"], kernel_y=kernels["clusters"], method="features"
    )
    assert abs(float(m.spec_diff[0, 3]) - ref.spec_diff) <= TOL64 * ref.spec_diff
    assert m.kernels["a"] == kernels["a"]


def test_auto_sigma_on_one_dict_is_fitted_on_a_sample_of_all_rows_as_spec_does():
    """sigma='auto' with all rows at hand: each set's kernel is fitted on a seeded uniform sample of all rows
    (st.spec's rule), so the matrix does not depend on batch_size even on class-sorted rows; the entry equals
    st.spec with the same unfitted kernels and seed. A stream is fitted on its first batch, with a warning."""
    f = feature_sets()  # "clusters": rows sorted by group, so a first batch of 60 rows is one group
    kernel = st.GaussianKernel(sigma="auto", rff_dim=32, seed=3)
    small, whole = (st.spec_matrix(f, kernel=kernel, batch_size=b, seed=5) for b in (60, 10_000))
    assert {k: v.sigma for k, v in small.kernels.items()} == {k: v.sigma for k, v in whole.kernels.items()}
    assert torch.allclose(small.spec_diff, whole.spec_diff, rtol=0, atol=1e-12)
    ref = st.spec(f["a"], f["clusters"], kernel_x=kernel, kernel_y=kernel, method="features", seed=5)
    assert abs(float(whole.spec_diff[0, 3]) - ref.spec_diff) <= TOL64 * ref.spec_diff
    batches = [{k: v[s : s + 60] for k, v in f.items()} for s in range(0, 240, 60)]
    with pytest.warns(UserWarning, match="first batch only"):
        streamed = st.spec_matrix(batches, kernel=kernel)
    assert streamed.kernels["clusters"].sigma != whole.kernels["clusters"].sigma  # one group's bandwidth


def test_pair_is_the_full_result_without_another_pass():
    f = feature_sets()
    m = st.spec_matrix(f, eta=0.8)
    res = m.pair("a", "clusters")
    ref = st.spec(f["a"], f["clusters"], eta=0.8, method="features")
    assert res.method == "features" and res.eta == 0.8 and res.n == 240
    assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=TOL64 * ref.spec_diff)
    modes = [0, 1, res.eigenvalues.numel() - 1]
    v, v_ref = (
        res.sample_scores(f["a"], f["clusters"], modes),
        ref.sample_scores(f["a"], f["clusters"], modes),
    )
    assert torch.allclose(v, v_ref, atol=1e-7)  # both sign-fixed: largest entry positive
    top = res.top_samples((f["a"], f["clusters"]), k=5, modes=[0])
    assert top.indices.shape == (1, 5)
    assert res.scale == pytest.approx(ref.scale, rel=1e-12)
    with pytest.raises(SpecError, match="two different feature sets"):
        m.pair("a", 0)
    with pytest.raises(SpecError, match="no feature set named 'zz'"):
        m.pair("a", "zz")


def test_rotated_copy_gives_zero_and_close_copy_gives_small():
    f = feature_sets()
    m = st.spec_matrix(f)
    i = {k: n for n, k in enumerate(m.names)}
    assert float(m.spec_diff[i["a"], i["a_rot"]]) < 1e-12  # float64 rounding of y = x Q
    assert float(m.spec_diff[i["a"], i["a_close"]]) < 0.1 * float(m.spec_diff[i["a"], i["noise"]])
    assert float(m.cka[i["a"], i["a_rot"]]) == pytest.approx(1.0, abs=1e-12)
    # float32 input: the rotation is exact up to float32 rounding of the input
    f32 = feature_sets(dtype=torch.float32)
    m32 = st.spec_matrix(f32)
    assert float(m32.spec_diff[i["a"], i["a_rot"]]) < 1e-5
    assert torch.allclose(m32.spec_diff, m.spec_diff, atol=TOL32)


def test_streaming_batches_and_merge_give_the_same_matrix():
    f = feature_sets()
    whole = st.spec_matrix(f, batch_size=10_000)
    cuts = [0, 1, 37, 100, 199, 240]
    batches = [{k: v[s:e].numpy() for k, v in f.items()} for s, e in zip(cuts, cuts[1:])]
    streamed = st.spec_matrix(iter(batches))  # a one-shot iterator is fine on the joint route
    assert torch.allclose(streamed.spec_diff, whole.spec_diff, rtol=0, atol=1e-12)
    assert torch.allclose(streamed.lead, whole.lead, rtol=0, atol=1e-12)
    assert torch.allclose(streamed.cka, whole.cka, rtol=0, atol=1e-12)
    left, right = st.MatrixCovariance(), st.MatrixCovariance()
    for b in batches[:2]:
        left.update(b)
    for b in batches[2:]:
        right.update(b)
    merged = left.merge(right).compute()
    assert merged.n == 240
    assert torch.allclose(merged.spec_diff, whole.spec_diff, rtol=0, atol=1e-12)


def test_cka_is_the_library_linear_cka_on_raw_rows():
    f = feature_sets()
    f["shifted"] = f["clusters"] * 5 + 3  # CKA is invariant to isotropic scaling and translation
    for kernel in ("cosine", "linear"):
        m = st.spec_matrix(f, kernel=kernel)
        i = {k: n for n, k in enumerate(m.names)}
        for a, b in [("a", "clusters"), ("a_close", "noise"), ("clusters", "shifted")]:
            ref = LinearCKA()
            ref.update(f[a], f[b])
            assert float(m.cka[i[a], i[b]]) == pytest.approx(ref.compute(), abs=1e-10)
        assert float(m.cka[i["clusters"], i["shifted"]]) == pytest.approx(1.0, abs=1e-10)
        assert torch.equal(m.cka.diagonal(), torch.ones(len(f), dtype=torch.float64))
    assert st.spec_matrix(f, cka=False).cka is None


def test_groups_route_when_the_joint_matrix_does_not_fit():
    f = feature_sets()
    joint = st.spec_matrix(f, eta=0.6)
    batches = [{k: v[s : s + 100] for k, v in f.items()} for s in range(0, 240, 100)]
    # D = 10+10+10+7+6 = 43; max_dim 26 -> groups of <= 13: [a], [a_rot], [a_close], [clusters, noise]
    grouped = st.spec_matrix(batches, eta=0.6, max_dim=26)
    assert grouped.route == "groups" and grouped.passes == 6  # 4 groups: 4 * 3 / 2 passes
    assert torch.allclose(grouped.spec_diff, joint.spec_diff, rtol=0, atol=1e-12)
    assert torch.allclose(grouped.lead, joint.lead, rtol=0, atol=1e-12)
    assert torch.allclose(grouped.cka, joint.cka, rtol=0, atol=1e-12)
    with pytest.raises(SpecError, match="'groups' route"):
        grouped.pair("a", "noise")
    with pytest.raises(SpecError, match="re-iterable"):
        st.spec_matrix(iter(batches), max_dim=26)


def test_groups_route_chosen_by_the_memory_check(monkeypatch):
    import spec_torch.matrix as sm

    f = feature_sets()
    batches = [{k: v[s : s + 100] for k, v in f.items()} for s in range(0, 240, 100)]
    joint = st.spec_matrix(batches)
    # 20 kB "available": max_dim = sqrt(20000 / (2 * 8 + 6 * 8)) = 17 -> groups of <= 8 -> every set alone
    monkeypatch.setattr(sm, "memory_available", lambda device: 20_000)
    grouped = st.spec_matrix(batches)
    assert grouped.route == "groups" and grouped.passes == 10
    assert torch.allclose(grouped.spec_diff, joint.spec_diff, rtol=0, atol=1e-12)


def test_top_k_solve_gives_the_same_entries():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 40, generator=g, dtype=torch.float64)
    f = {f"s{i}": base * i / 3 + torch.randn(300, 40, generator=g, dtype=torch.float64) for i in range(3)}
    full = st.spec_matrix(f, eta=0.7)
    # pairs of D = 80 >= 4 * (top_k + 8): the block Krylov solver, not its small-D fallback to eigh
    top = st.spec_matrix(f, eta=0.7, top_k=2)
    assert torch.allclose(top.spec_diff, full.spec_diff, rtol=1e-9, atol=0)
    assert torch.allclose(top.lead, full.lead, rtol=1e-9, atol=0)
    assert full.pair("s0", "s2", top_k=2).eigenvalues.numel() == 4


def test_bad_input_names_the_argument():
    f = feature_sets(n=20)
    with pytest.raises(SpecError, match="at least 2 feature sets"):
        st.spec_matrix({"a": f["a"]})
    with pytest.raises(SpecError, match="same samples"):
        st.spec_matrix({"a": f["a"], "b": f["noise"][:10]})
    with pytest.raises(SpecError, match="every batch must hold"):
        st.spec_matrix([{"a": f["a"], "b": f["noise"]}, {"a": f["a"]}])
    with pytest.raises(SpecError, match=r"features\['b'\]: contains NaN"):
        st.spec_matrix({"a": f["a"], "b": f["noise"] * float("nan")})
    with pytest.raises(SpecError, match=r"features\['b'\]: expected 6 columns"):
        st.spec_matrix([{"a": f["a"], "b": f["noise"]}, {"a": f["a"], "b": f["a"]}])
    with pytest.raises(SpecError, match="expected a dict"):
        st.spec_matrix(f["a"])
    with pytest.raises(SpecError, match="eta: expected a positive number"):
        st.spec_matrix(f, eta=0)
    with pytest.raises(SpecError, match="no finite feature map"):
        st.spec_matrix(f, kernel=st.GaussianKernel(sigma=1.0))
    with pytest.raises(SpecError, match="constant embedding"):
        st.spec_matrix({"a": f["a"], "b": torch.ones(20, 3)}, kernel="linear")
    with pytest.raises(SpecError, match="missing"):
        st.spec_matrix(f, kernel={"a": "cosine"})


def test_most_different_and_to_dict():
    f = feature_sets()
    m = st.spec_matrix(f)
    top = m.most_different(2)
    sym = torch.maximum(m.spec_diff, m.spec_diff.T)
    assert float(sym[top[0]]) >= float(sym[top[1]]) >= float(sym.triu(1).flatten().sort().values[-2]) - 1e-15
    d = m.to_dict()
    assert d["names"] == m.names and np.asarray(d["spec_diff"]).shape == (5, 5) and d["n"] == 240
    assert d["settings"]["route"] == "joint"


# ------------------------------------------------------------------------------------------- DDP
def _dist_worker(rank: int, port: int, out_path: str) -> None:
    with gloo_group(rank, port, world=2):
        f = feature_sets()
        rows = slice(0, 100) if rank == 0 else slice(100, 240)  # unequal shards
        m = st.spec_matrix({k: v[rows] for k, v in f.items()}, eta=0.6, batch_size=64)
        # rank 1 alone short of memory (20 kB: every set alone): both ranks must take its groups route
        import spec_torch.matrix as sm

        real = sm.memory_available
        sm.memory_available = (lambda device: 20_000) if rank == 1 else real
        try:
            tight = st.spec_matrix({k: v[rows] for k, v in f.items()}, eta=0.6, batch_size=64)
        finally:
            sm.memory_available = real
        if rank == 0:
            torch.save(
                {"spec_diff": m.spec_diff, "lead": m.lead, "cka": m.cka, "n": m.n, "tight": tight.to_dict()},
                out_path,
            )


def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    spawn_gloo(_dist_worker, str(out), world=2, timeout_s=150)
    got = torch.load(out)
    ref = st.spec_matrix(feature_sets(), eta=0.6)
    assert got["n"] == 240
    for key in ("spec_diff", "lead", "cka"):
        assert torch.allclose(got[key], getattr(ref, key), rtol=DIST_RTOL, atol=1e-14)
    tight = got["tight"]  # rank 0 had the memory for the joint route; rank 1's limit decided for both
    assert tight["settings"]["route"] == "groups" and tight["settings"]["passes"] == 10
    assert np.allclose(tight["spec_diff"], ref.spec_diff.numpy(), rtol=DIST_RTOL, atol=1e-14)


# ------------------------------------------------------------------------------ layer correspondence
def test_layer_correspondence_spec_identifies_depth_like_cka():
    """Kornblith et al. (2019) sanity check: MLPs on digits from 5 seed pairs (tests/layer_match.py)."""
    from layer_match import SEED_PAIRS, identification

    acc = identification(SEED_PAIRS)
    print(acc)
    assert acc["spec"] >= 2 * acc["chance"]
    assert acc["spec"] >= acc["cka"] - 0.10


# ------------------------------------------------------------------------------------ centring, uniform modes
def _centred_oracle(x, y, kernel, eta) -> np.ndarray:
    """Eigenvalues of H L H, H = I - 11^T / n: the dense oracle of centred SPEC."""
    lmat = difference(x, y, kernel, kernel, eta)
    n = lmat.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return _eig(h @ lmat @ h)


def _with_offset(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feature sets plus one whose rows share a large common direction: under cosine its kernel is nearly
    constant (every pair about 0.9), so against a zero-mean set the strongest mode is the uniform one."""
    out = dict(f)
    out["offset"] = f["a"][:, :6] * 0.3 + 1.0
    return out


@pytest.mark.parametrize("kernel", ["cosine", "linear"])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_centred_entries_equal_centred_spec_and_the_oracle(kernel, eta):
    """center=True (fails on main: spec_matrix had no center): every entry is st.spec(center=True) on that
    pair and the largest |eigenvalue| of H L H; lead the largest positive one; no mode is uniform."""
    f = _with_offset(feature_sets())
    m = st.spec_matrix(f, kernel=kernel, eta=eta, batch_size=70, center=True)
    assert m.center and m.route == "joint"
    names = list(f)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            ref = st.spec(
                f[a], f[b], kernel_x=kernel, kernel_y=kernel, eta=eta, method="features", center=True
            )
            ev = _centred_oracle(f[a].numpy(), f[b].numpy(), kernel, eta)
            tol = TOL64 * ref.scale
            assert abs(float(m.spec_diff[i, j]) - ref.spec_diff) <= tol
            assert abs(float(m.spec_diff[i, j]) - np.abs(ev).max()) <= tol
            assert abs(float(m.lead[i, j]) - max(ev.max(), 0.0)) <= tol
    assert torch.all(m.uniformity == 0) and torch.all(m.lead_uniformity == 0)
    res = m.pair("offset", "noise")  # the pair's full result is centred too
    ref = st.spec(f["offset"], f["noise"], kernel_x=kernel, kernel_y=kernel, eta=eta, center=True)
    assert res.center and torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=TOL64 * ref.scale)
    assert m.to_dict()["settings"]["center"] is True


def test_centred_float32_close_embeddings_and_groups_route():
    """float32 input, a close copy (a + 0.05 noise) and class-sorted rows: the centred entries match the
    float64 oracle to the float32 input tolerance, and the memory-saving groups route gives the same."""
    f32 = _with_offset(feature_sets(dtype=torch.float32))
    m = st.spec_matrix(f32, center=True)
    groups = st.spec_matrix(f32, center=True, max_dim=20)
    assert groups.route == "groups" and groups.center
    assert torch.allclose(groups.spec_diff, m.spec_diff, atol=1e-12)
    names = list(f32)
    for a, b in [("a", "a_close"), ("clusters", "noise"), ("offset", "a")]:
        i, j = names.index(a), names.index(b)
        ev = _centred_oracle(f32[a].double().numpy(), f32[b].double().numpy(), "cosine", 1.0)
        assert abs(float(m.spec_diff[i, j]) - np.abs(ev).max()) <= TOL32


def test_uniformity_marks_the_uniform_led_entries_and_ranking_skips_them():
    """Uncentred (fails on main: no uniformity): [i, j] holds the uniformity of the mode behind spec_diff[i, j]
    (lead_uniformity: behind lead[i, j]), each equal to st.spec's for that mode; the offset set's entries are
    led by the uniform mode, so most_different(skip_uniform=True) does not rank on them."""
    f = _with_offset(feature_sets())
    m = st.spec_matrix(f)
    names = list(f)
    o, z = names.index("offset"), names.index("noise")
    for i, j in [(o, z), (z, o), (names.index("a"), names.index("clusters"))]:
        ref = st.spec(f[names[i]], f[names[j]], method="features")
        top = int(ref.eigenvalues.abs().argmax())
        hi = int(ref.eigenvalues.argmax())
        assert float(m.uniformity[i, j]) == pytest.approx(float(ref.uniformity[top]), abs=1e-9)
        assert float(m.lead_uniformity[i, j]) == pytest.approx(float(ref.uniformity[hi]), abs=1e-9)
    assert (
        float(m.uniformity[o, z]) > UNIFORM_THRESHOLD and float(m.lead_uniformity[o, z]) > UNIFORM_THRESHOLD
    )
    assert float(m.uniformity[names.index("a"), names.index("clusters")]) < 0.5
    plain = m.most_different(1)[0]
    assert o in plain  # the raw ranking is headed by the uniform-led entry ...
    clusters = m.cluster_diff()
    for i, j in m.most_different(3, skip_uniform=True):  # ... the cluster ranking is not
        led_by = (i, j) if m.lead[i, j] >= m.lead[j, i] else (j, i)
        assert float(clusters[i, j]) > 0
        assert float(m.lead_uniformity[led_by]) <= UNIFORM_THRESHOLD or float(clusters[i, j]) < float(
            m.lead[led_by]
        )
    assert float(clusters[o, z]) < float(m.spec_diff[o, z])
    d = m.to_dict()
    assert np.asarray(d["uniformity"]).shape == (6, 6) and d["settings"]["center"] is False
