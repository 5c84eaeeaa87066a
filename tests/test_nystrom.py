"""Nyström feature maps (spec_torch.nystrom): the exact kernel at m = n, convergence in m, the accuracy
against random features on real data (sklearn digits), seeded landmarks, duplicate landmarks, 2 Gloo ranks,
saved state, registration and configs, the compare pipeline end to end, and SpecAlignLoss's teacher side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import gloo_group, spawn_gloo
from hydra import compose, initialize_config_dir
from oracle import gram, spectrum

import spec_torch as st
from spec_torch.apps import compare
from spec_torch.apps import sharding as sd
from spec_torch.errors import SpecError
from spec_torch.kernels import median_sigma, resolve_kernel
from spec_torch.nystrom import nystrom_whitening

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "spec_torch" / "apps" / "configs"

#: m = n landmarks, float64 throughout: phi phi^T = K K^+ K = K up to the dropped eigenvalues
#: (<= s_max m eps ~ 1e-12 here) and their rounding amplified by the whitening (sqrt(cond) eps)
EXACT_ATOL = 1e-8
#: float64 sums over 2 ranks vs 1 process: only the summation order differs (relative to SPEC-diff)
F64_RTOL = 1e-11
#: float32 features (the pipeline's cache) summed in float64: eigenvalues relative to SPEC-diff
F32_RTOL = 2e-5


def _data(n: int = 60, p: int = 5, seed: int = 0) -> torch.Tensor:
    """Two close clusters and a rotated copy's worth of spread: a hard case (near-tied kernel values)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, p, generator=g, dtype=torch.float64) * 0.3
    return centres[torch.arange(n) % 2] + 0.5 * torch.randn(n, p, generator=g, dtype=torch.float64)


def _top_bottom(evals: np.ndarray, k: int = 3) -> np.ndarray:
    e = np.sort(np.asarray(evals, dtype=np.float64))
    return np.concatenate([e[-k:], e[:k]])


def _rel_error(evals: np.ndarray, ref: np.ndarray) -> float:
    """Mean relative error of the top-3 and bottom-3 eigenvalues against the exact ones."""
    return float(np.mean(np.abs(_top_bottom(evals) - _top_bottom(ref)) / np.abs(_top_bottom(ref))))


# ------------------------------------------------------------------------------- against the dense oracle
@pytest.mark.parametrize(("base", "rank"), [("gaussian", 60), ("cosine", 5)])
def test_every_row_a_landmark_gives_the_exact_kernel(base, rank):
    x = _data()
    kern = st.Nystrom(base, landmarks=len(x), seed=0).fit(x)
    sigma = median_sigma(x) if base == "gaussian" else None
    exact = gram(x.numpy(), base, sigma)  # [n, n]
    # Gaussian: K is full rank, nothing dropped; cosine on 5-d rows: rank 5, the cut-off drops the other 55
    assert kern.feature_dim(5) == rank
    phi = kern.features(x).numpy()  # [n, n]
    np.testing.assert_allclose(phi @ phi.T, exact, rtol=0, atol=EXACT_ATOL)
    res = st.spec(x, x[:, :3], kern, "linear", method="features")
    assert res.method == "features"
    ref, _ = spectrum(exact / len(x) - gram(x[:, :3].numpy(), "linear") / len(x))
    both = _top_bottom(res.eigenvalues.numpy())
    np.testing.assert_allclose(both, _top_bottom(ref), rtol=0, atol=EXACT_ATOL)


def test_a_low_rank_base_keeps_only_its_rank():
    """Linear kernel on 5-d rows: K_mm has rank 5, so the cut-off drops m - 5 eigenvalues and the map is exact."""
    x = _data(n=40)
    kern = st.Nystrom("linear", landmarks=40, seed=0).fit(x)
    assert kern.feature_dim(5) == 5  # the dropped-eigenvalue branch ran
    phi = kern.features(x).numpy()  # [n, 5]
    np.testing.assert_allclose(phi @ phi.T, gram(x.numpy(), "linear"), rtol=0, atol=EXACT_ATOL)


def test_whitening_inverts_the_kept_spectrum():
    x = _data(n=30)
    kmm = st.GaussianKernel(sigma=1.0).gram(x, x)  # [m, m]
    w = nystrom_whitening(kmm)  # [m, r]
    np.testing.assert_allclose((w.T @ kmm @ w).numpy(), np.eye(w.shape[1]), rtol=0, atol=1e-8)
    np.testing.assert_allclose((w @ w.T).numpy(), scipy.linalg.pinvh(kmm.numpy()), rtol=1e-6, atol=0)


def test_eigenvalue_error_falls_as_landmarks_grow():
    x = _data(n=120, p=6)
    y = x[:, :2] + 0.1 * _data(n=120, p=2, seed=1)
    sx, sy = median_sigma(x), median_sigma(y)
    ref, _ = spectrum((gram(x.numpy(), "gaussian", sx) - gram(y.numpy(), "gaussian", sy)) / 120)
    errors = []
    for m in (10, 30, 60, 120):
        res = st.spec(
            x, y, st.Nystrom("gaussian", landmarks=m), st.Nystrom("gaussian", landmarks=m), method="features"
        )
        errors.append(_rel_error(res.eigenvalues.numpy(), ref))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-7 < errors[0]  # m = n: the exact kernel


# ------------------------------------------------------------------------ real data: digits vs random features
@pytest.fixture(scope="module")
def digits():
    """sklearn digits: raw pixels [1797, 64] vs an 8-d random projection, Gaussian kernels, median sigma."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float64)  # [n, 64]
    g = torch.Generator().manual_seed(0)
    y = x @ (torch.randn(64, 8, generator=g, dtype=torch.float64) / 8**0.5)  # [n, 8]
    n = x.shape[0]
    lmat = (gram(x.numpy(), "gaussian", median_sigma(x)) - gram(y.numpy(), "gaussian", median_sigma(y))) / n
    return x, y, scipy.linalg.eigvalsh(lmat)


#: the measured mean error ratio RFF / Nyström over seeds 0-2 is about 20x at D=128 and 46x at D=256
#: (RFF 18% and 11%, Nyström 0.9% and 0.24%); asserted with a margin
MIN_RATIO = {128: 8.0, 256: 20.0}


@pytest.mark.parametrize("d", [128, 256])
def test_on_digits_nystrom_error_is_far_below_random_features_at_equal_dimension(digits, d):
    x, y, ref = digits
    nys, rff = [], []
    for seed in range(3):
        kn = [st.Nystrom("gaussian", landmarks=d, seed=seed) for _ in range(2)]
        kr = [
            st.GaussianKernel(sigma="auto", rff_dim=d // 2, seed=seed) for _ in range(2)
        ]  # cos + sin: D = d
        res_n = st.spec(x, y, *kn, method="features")
        res_r = st.spec(x, y, *kr, method="features")
        assert res_n.kernel_x.feature_dim(64) == d == res_r.kernel_x.feature_dim(64)
        nys.append(_rel_error(res_n.eigenvalues.numpy(), ref))
        rff.append(_rel_error(res_r.eigenvalues.numpy(), ref))
    ratio = np.mean(rff) / np.mean(nys)
    assert ratio > MIN_RATIO[d], (d, nys, rff)


# ------------------------------------------------------------------------------------ landmarks and seeds
def test_same_seed_same_landmarks_and_features_other_seed_others():
    x = _data(n=80)
    a = st.Nystrom("gaussian", landmarks=20, seed=3).fit(x)
    b = st.Nystrom("gaussian", landmarks=20, seed=3).fit(x)
    c = st.Nystrom("gaussian", landmarks=20, seed=4).fit(x)
    assert torch.equal(a.state_tensors()["landmarks"], b.state_tensors()["landmarks"])
    assert torch.equal(a.features(x), b.features(x)) and a == b
    assert not torch.equal(a.state_tensors()["landmarks"], c.state_tensors()["landmarks"]) and a != c
    # the landmarks are rows of x, all different ones
    lm = a.state_tensors()["landmarks"]
    rows = [int(torch.nonzero((x == r).all(dim=1))[0, 0]) for r in lm]
    assert len(set(rows)) == 20


def test_duplicate_landmarks_are_dropped_by_the_cut_off():
    """Every row three times: most landmark sets repeat rows; K_mm is singular and the map is still
    K(x, U) K_UU^+ K(U, x) with U the distinct landmarks (the numpy oracle)."""
    base = _data(n=20)
    x = base.repeat(3, 1)  # [60, 5], rows i, i+20, i+40 equal
    kern = st.Nystrom(st.GaussianKernel(sigma=1.0), landmarks=45, seed=0).fit(x)
    lm = kern.state_tensors()["landmarks"].numpy()
    distinct = np.unique(lm, axis=0)
    assert len(distinct) < 45 and kern.feature_dim(5) == len(distinct)  # the dropping branch ran
    phi = kern.features(x)
    assert torch.isfinite(phi).all()
    k_xu = gram(np.concatenate([x.numpy(), distinct]), "gaussian", 1.0)[: len(x), len(x) :]  # [n, |U|]
    k_uu = gram(distinct, "gaussian", 1.0)
    oracle = k_xu @ np.linalg.inv(k_uu) @ k_xu.T
    np.testing.assert_allclose((phi @ phi.T).numpy(), oracle, rtol=0, atol=1e-7)


def test_float32_input_gives_float32_features_computed_in_float64():
    x = _data(n=50)
    kern = st.Nystrom("gaussian", landmarks=50).fit(x)
    f32, f64 = kern.features(x.float()), kern.features(x)
    assert f32.dtype == torch.float32 and f64.dtype == torch.float64
    # the whitening has entries up to (s_max m eps)^-1/2; computed in float64 the float32 result is
    # float64's rounded, not a float32 kernel block amplified by it
    np.testing.assert_allclose(f32.numpy(), f64.float().numpy(), rtol=0, atol=1e-5 * float(f64.abs().max()))


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: st.Nystrom("gaussian", landmarks=0), "landmarks"),
        (lambda: st.Nystrom("gaussian", landmarks=-3), "landmarks"),
        (lambda: st.Nystrom("gaussian", landmarks=2.5), "landmarks"),
        (lambda: st.Nystrom("gaussian", landmarks=True), "landmarks"),
        (lambda: st.Nystrom("gaussian", landmarks=10, seed="0"), "seed"),
        (lambda: st.Nystrom(st.GaussianKernel(rff_dim=8), landmarks=10), "base"),
        (lambda: st.Nystrom(st.Nystrom("linear", landmarks=4), landmarks=10), "base"),
        (lambda: st.Nystrom("laplace", landmarks=10), "base"),
        (lambda: st.Nystrom("cosine", landmarks=10, sigma=1.0), "base"),
        (lambda: st.Nystrom(st.GaussianKernel(), landmarks=10, sigma=1.0), "base"),
        (lambda: st.Nystrom("gaussian", landmarks=10, sigma=-1.0), "sigma"),
        (lambda: st.Nystrom("gaussian", landmarks=61).fit(_data()), "landmarks"),
        (lambda: st.Nystrom("gaussian", landmarks=5).features(_data()), "fitted"),
        (lambda: st.Nystrom("gaussian", landmarks=5).fit(_data()).features(torch.zeros(3, 4)), "5-d"),
        (lambda: st.Nystrom("cosine", landmarks=5).fit(torch.zeros(10, 3)), "non-zero rows"),
    ],
)
def test_bad_settings_raise_spec_error_naming_the_argument(make, arg):
    with pytest.raises(SpecError, match=arg):
        make()


def test_resolve_kernel_and_config_group():
    settings = {"name": "nystrom", "base": {"name": "gaussian", "sigma": 2.0}, "landmarks": 7, "seed": 1}
    a = resolve_kernel(settings)
    b = resolve_kernel({"name": "nystrom", "base": "gaussian", "sigma": 2.0, "landmarks": 7, "seed": 1})
    assert isinstance(a, st.Nystrom) and a == b and a.base.sigma == 2.0 and not a.is_fitted
    assert (
        resolve_kernel({"name": "nystrom", "base": "cosine", "sigma": None, "landmarks": 3}).base.name
        == "cosine"
    )
    with initialize_config_dir(config_dir=str(CONFIGS / "compare"), version_base="1.3"):
        cfg = compose(config_name="compare", overrides=["kernel@kernel_x=nystrom", "kernel_x.landmarks=30"])
    from omegaconf import OmegaConf

    kern = resolve_kernel(OmegaConf.to_container(cfg.kernel_x), "kernel_x")
    assert kern.describe() == {
        "name": "nystrom",
        "base": {"name": "gaussian", "sigma": "auto", "sigma_auto": True, "rff_dim": None, "seed": 0},
        "landmarks": 30,
        "seed": 0,
    }
    assert kern.fit_rows == 30 and kern.feature_dim(5) == 30 and kern.has_features


def test_method_auto_counts_nystrom_like_any_feature_map():
    x = _data(n=300, p=4)
    small = st.spec(x, x[:, :2], st.Nystrom("gaussian", landmarks=8), "linear")  # n^3 >> n D^2
    big = st.spec(x[:20], x[:20, :2], st.Nystrom("gaussian", landmarks=20), "linear")  # n < D
    assert small.method == "features" and big.method == "exact"


# ------------------------------------------------------------------------------------------ state
def test_state_round_trip_with_weights_only(tmp_path):
    x = _data(n=40)
    kern = st.Nystrom("gaussian", landmarks=25, seed=2).fit(x)
    path = tmp_path / "k.pt"
    torch.save({"settings": kern.describe(), "tensors": kern.state_tensors()}, path)
    saved = torch.load(path, weights_only=True)
    back = resolve_kernel(saved["settings"]).load_state_tensors(saved["tensors"])
    assert back.is_fitted and back == kern and back.describe() == kern.describe()
    assert torch.equal(back.features(x), kern.features(x))
    assert float(saved["tensors"]["sigma"]) == kern.base.sigma == back.base.sigma
    # an unfitted kernel has no state; a state of the wrong size is refused
    assert st.Nystrom("gaussian", landmarks=25).state_tensors() == {}
    with pytest.raises(SpecError, match="state"):
        st.Nystrom("gaussian", landmarks=24).load_state_tensors(kern.state_tensors())


# ------------------------------------------------------------------------------------- 2 Gloo ranks
N_DIST = 90


def _dist_data() -> tuple[torch.Tensor, torch.Tensor]:
    x = _data(n=N_DIST, p=6, seed=5)
    return x, x[:, :3] + 0.2 * _data(n=N_DIST, p=3, seed=6)


def _dist_kernels() -> tuple[st.Nystrom, st.Nystrom]:
    return st.Nystrom("gaussian", landmarks=40, seed=1), st.Nystrom("cosine", landmarks=30, seed=2)


def _dist_worker(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, port, world=2):
        x, y = _dist_data()
        if rank == 1:  # a different fitting sample on rank 1: fit_on_main must use rank 0's
            x, y = x.flip(0), y.flip(0)
        kx, ky = (sd.fit_on_main(k, d) for k, d in zip(_dist_kernels(), (x, y)))
        x, y = _dist_data()
        rows = sd.shard_range(N_DIST)
        res = (
            st.DiffCovariance(kx, ky)
            .update(x[rows.start : rows.stop], y[rows.start : rows.stop])
            .compute(eta=0.8)
        )
        torch.save({"eig": res.eigenvalues, "state": kx.state_tensors()}, os.path.join(out, f"rank{rank}.pt"))


def test_two_gloo_ranks_equal_one_process(tmp_path):
    spawn_gloo(_dist_worker, str(tmp_path), world=2, timeout_s=120)
    x, y = _dist_data()
    kx, ky = (k.fit(d) for k, d in zip(_dist_kernels(), (x, y)))
    ref = st.DiffCovariance(kx, ky).update(x, y).compute(eta=0.8)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["state"]["landmarks"], kx.state_tensors()["landmarks"])
        np.testing.assert_allclose(
            got["eig"].numpy(), ref.eigenvalues.numpy(), rtol=0, atol=F64_RTOL * ref.spec_diff
        )


# ------------------------------------------------------------------------------------ compare pipeline
def _planted(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gx, gy = np.arange(n) % 3, (np.arange(n) // 3) % 3
    x = np.eye(8)[gx] * 3 + rng.normal(size=(n, 8))
    y = np.eye(5)[gy] * 3 + rng.normal(size=(n, 5))
    return x.astype(np.float32), y.astype(np.float32)


def test_pipeline_fits_on_at_least_the_landmarks(tmp_path, monkeypatch):
    """With fewer fit rows than landmarks (FIT_ROWS shrunk to 40 here), the fit sample grows to the
    landmarks; the run equals st.spec with the kernels fitted on that seeded sample."""
    x, y = _planted(150)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    monkeypatch.setattr(compare, "FIT_ROWS", 40)
    with initialize_config_dir(config_dir=str(CONFIGS / "compare"), version_base="1.3"):
        cfg = compose(
            config_name="compare",
            overrides=[
                "data=features",
                f"data.x_path={tmp_path / 'x.npy'}",
                f"data.y_path={tmp_path / 'y.npy'}",
                "kernel@kernel_x=nystrom",
                "kernel_x.landmarks=60",
                "kernel@kernel_y=nystrom",
                "kernel_y.base=cosine",
                "kernel_y.sigma=null",
                "kernel_y.landmarks=50",
                "report=false",
                "top_k=2",
                "samples_per_mode=5",
                f"output_dir={tmp_path / 'out'}",
                "progress=false",
            ],
        )
    spec = compare.run(cfg)
    assert spec["method"] == "features" and spec["kernel_x"]["landmarks"] == 60
    rows = np.sort(np.random.default_rng(0).choice(150, size=60, replace=False))  # cfg.seed = 0
    kx = st.Nystrom("gaussian", landmarks=60).fit(torch.from_numpy(x[rows]))
    ky = st.Nystrom("cosine", landmarks=50).fit(torch.from_numpy(y[rows]))
    assert spec["kernel_x"] == kx.describe() and spec["kernel_y"] == ky.describe()
    same = st.spec(
        torch.from_numpy(x), torch.from_numpy(y), kx, ky, method="features", accumulate_dtype=torch.float64
    )
    np.testing.assert_allclose(
        spec["eigenvalues"], same.eigenvalues.numpy(), rtol=0, atol=F32_RTOL * same.spec_diff
    )


def test_demo_cli_runs_with_nystrom_kernels(tmp_path):
    out = tmp_path / "run"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPEC_TORCH_CACHE=str(tmp_path / "cache")
    )
    args = [
        "experiment=demo",
        "kernel@kernel_x=nystrom",
        "kernel@kernel_y=nystrom",
        "data.n=160",  # the demo's 600 images take minutes to render and encode on a shared CPU
        "kernel_x.landmarks=100",
        "kernel_y.landmarks=100",
        "method=features",  # auto would take the cheaper n x n route at this small n
        "report=false",
        "progress=false",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["method"] == "features" and spec["n"] == 160
    for side in ("kernel_x", "kernel_y"):
        assert spec[side]["name"] == "nystrom" and spec[side]["landmarks"] == 100
        assert spec[side]["base"]["sigma_auto"] is True and spec[side]["base"]["sigma"] > 0
    # the demo's planted attributes: x (colour encoder) and y (shape encoder) modes are pure
    top = {side: spec["modes"][side][0]["purity"] for side in ("x", "y")}
    assert max(top["x"].values()) == 1.0 and max(top["y"].values()) == 1.0, top


# ------------------------------------------------------------------------------------ SpecAlignLoss
def test_align_loss_takes_a_fitted_nystrom_teacher():
    g = torch.Generator().manual_seed(0)
    teacher = _data(n=48, p=6).float()
    student = torch.randn(48, 4, generator=g, requires_grad=True)
    kt = st.Nystrom("gaussian", landmarks=32, seed=0).fit(teacher)  # landmarks fixed before training
    loss_fn = st.SpecAlignLoss("cosine", kt, norm="op", dtype=torch.float64, method="exact")
    loss = loss_fn(student, teacher)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # oracle: L = (K_student - K_nystrom) / B with the teacher's Nyström kernel phi phi^T
    phi = kt.features(teacher.double()).numpy()
    lmat = (gram(student.detach().double().numpy(), "cosine") - phi @ phi.T) / 48
    ref, _ = spectrum(lmat)
    # the loss is solved in float64 and returned in the student's dtype (float32): one float32 rounding
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(
        np.abs(ref).max(), rel=2 * float(torch.finfo(torch.float32).eps)
    )
    assert loss_fn._fitted["teacher"] is kt  # used as given: no refit on the batch


def test_diffcovariance_checkpoint_with_nystrom_kernels(tmp_path):
    """DiffCovariance.state_dict carries Nystrom kernels as settings + tensors: torch.load's default
    weights_only=True reads it, the constructed kernels are checked, adopt_kernels rebuilds them."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 6, generator=g), torch.randn(300, 4, generator=g)
    kx, ky = st.Nystrom("gaussian", landmarks=40, seed=1), st.Nystrom("cosine", landmarks=4)
    acc = st.DiffCovariance(kx, ky).fit(x, y)
    for xb, yb in zip(x.split(64), y.split(64)):
        acc.update(xb, yb)
    torch.save(acc.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt")  # weights_only=True by default
    want = acc.compute().eigenvalues
    for other in (
        st.DiffCovariance(kx, ky).load_state_dict(state),
        st.DiffCovariance("cosine", "cosine").load_state_dict(state, adopt_kernels=True),
    ):
        assert other.kernel_x == acc.kernel_x and other.kernel_y == acc.kernel_y
        assert torch.equal(other.compute().eigenvalues, want)
    with pytest.raises(SpecError, match="state.kernel_x: the saved kernel"):
        st.DiffCovariance(st.Nystrom("gaussian", landmarks=41, seed=1), ky).load_state_dict(state)


def test_loss_refuses_a_nystrom_student():
    with pytest.raises(
        SpecError, match="kernel_student: Nystrom features are supported on the teacher side only"
    ):
        st.SpecAlignLoss(kernel_student=st.Nystrom("gaussian", landmarks=8), kernel_teacher="cosine")


def test_spec_fits_on_at_least_the_landmarks():
    """st.spec's fitting sample (2,000 rows) grows to the landmarks, as the compare pipeline's does."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2300, 4, generator=g), torch.randn(2300, 3, generator=g)
    res = st.spec(x, y, st.Nystrom("gaussian", landmarks=2100), "cosine", method="features")
    assert res.kernel_x.fit_rows == 2100 and res.kernel_x.is_fitted
