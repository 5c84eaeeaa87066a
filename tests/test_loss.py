"""SpecAlignLoss against the dense numpy oracle: values, gradients, invariances, bad input, state, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import difference, gram
from torch import nn

import spec_torch as st
from spec_torch import SpecAlignLoss
from spec_torch.errors import SpecError
from spec_torch.kernels import median_sigma

TOL64 = 1e-10  # float64 value vs the float64 oracle
TOL32 = 2e-5  # float32 internal math vs the float64 oracle (values of order 0.1-1)
FD_STEP = 1e-6  # central finite differences of the oracle
FD_TOL = 1e-6  # directional derivative vs finite differences (relative to the gradient's norm)
ITER_TOL = 1e-3  # the iterative solver's default relative residual


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=24, p=6, q=5, clusters=3, seed=0, noise=0.3):
    """Student and teacher embeddings with different cluster structure, so the top eigenvalue is simple."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % clusters
    cs = torch.randn(clusters, p, generator=g, dtype=torch.float64)
    ct = torch.randn(clusters + 1, q, generator=g, dtype=torch.float64)
    x = cs[lab] + noise * torch.randn(n, p, generator=g, dtype=torch.float64)
    y = ct[(lab + (torch.arange(n) % 2)) % (clusters + 1)] + noise * torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    return x, y


def oracle_objective(lmat: np.ndarray, norm: str, k: int = 3, one_sided: bool = False) -> float:
    w = np.linalg.eigvalsh(lmat)
    if one_sided:
        neg = np.clip(-w, 0, None)
        return {"op": neg.max(), "topk": np.sort(neg)[-k:].sum(), "fro": np.sqrt((neg**2).sum())}[norm]
    return {"op": np.abs(w).max(), "topk": np.sort(np.abs(w))[-k:].sum(), "fro": np.linalg.norm(lmat)}[norm]


OBJECTIVES = [(norm, one_sided) for norm in ("op", "topk", "fro") for one_sided in (False, True)]


# ------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("method", ["exact", "features"])
@pytest.mark.parametrize("kx,ky", [("cosine", "cosine"), ("linear", "cosine"), ("cosine", "linear")])
def test_value_matches_oracle_spectral_radius(kx, ky, method):
    x, y = planted()
    loss = SpecAlignLoss(kx, ky, eta=0.7, method=method, dtype=torch.float64)(x, y)
    ref = np.abs(np.linalg.eigvalsh(difference(x.numpy(), y.numpy(), kx, ky, eta=0.7))).max()
    assert loss.dtype == torch.float64
    assert abs(float(loss) - ref) < TOL64


def test_value_gaussian_exact_kernel_matches_oracle():
    x, y = planted()
    loss = SpecAlignLoss(st.GaussianKernel(sigma=1.5), "cosine", dtype=torch.float64)(x, y)
    ref = np.abs(
        np.linalg.eigvalsh(difference(x.numpy(), y.numpy(), "gaussian", "cosine", sigma_x=1.5))
    ).max()
    assert abs(float(loss) - ref) < TOL64


@pytest.mark.parametrize("method", ["exact", "features"])
def test_value_gaussian_rff_matches_core_kernel_features(method):
    """RFF frequencies and the auto bandwidth follow GaussianKernel.fit: same features as the core."""
    x, y = planted()
    kern = st.GaussianKernel(sigma="auto", rff_dim=16, seed=3)
    fn = SpecAlignLoss(kern, "cosine", method=method, dtype=torch.float64)
    loss = fn(x, y)
    phi = kern.fit(x).features(x).numpy()  # the core's RFF features with the auto sigma of this batch
    lmat = (phi @ phi.T - gram(y.numpy(), "cosine")) / len(x)
    assert abs(float(loss) - np.abs(np.linalg.eigvalsh(lmat)).max()) < TOL64
    assert float(fn.student_sigma) == pytest.approx(median_sigma(x, seed=3), rel=1e-12)
    assert fn.student_omega.shape == (x.shape[1], 16)


@pytest.mark.parametrize("norm,one_sided", OBJECTIVES)
@pytest.mark.parametrize("method", ["exact", "features"])
def test_every_objective_matches_oracle(norm, one_sided, method):
    x, y = planted(n=30)
    lmat = difference(x.numpy(), y.numpy(), "cosine", "cosine")
    fn = SpecAlignLoss(norm=norm, k=3, one_sided=one_sided, method=method, dtype=torch.float64)
    assert abs(float(fn(x, y)) - oracle_objective(lmat, norm, 3, one_sided)) < TOL64


@pytest.mark.parametrize("norm,one_sided", OBJECTIVES)
def test_every_objective_exact_gaussian_kernel_matches_oracle(norm, one_sided):
    """A kernel without a feature map (the n x n route) for every objective, and its gradient."""
    x, y = planted(n=12, p=4, q=3)
    lmat = difference(x.numpy(), y.numpy(), "gaussian", "cosine", sigma_x=1.5)
    fn = SpecAlignLoss(st.GaussianKernel(sigma=1.5), norm=norm, k=2, one_sided=one_sided, dtype=torch.float64)
    assert abs(float(fn(x, y)) - oracle_objective(lmat, norm, 2, one_sided)) < TOL64
    assert torch.autograd.gradcheck(lambda a: fn(a, y), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_float32_internal_math_close_to_oracle():
    x, y = planted(n=40)
    loss = SpecAlignLoss(dtype=torch.float32)(x.float(), y.float())
    ref = np.abs(np.linalg.eigvalsh(difference(x.numpy(), y.numpy()))).max()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - ref) < TOL32


def test_zero_when_student_equals_teacher():
    x, _ = planted(n=20)
    for norm, one_sided in OBJECTIVES:
        for method in ("exact", "features"):
            xs = x.clone().requires_grad_()
            loss = SpecAlignLoss(norm=norm, one_sided=one_sided, method=method, dtype=torch.float64)(xs, x)
            loss.backward()
            assert abs(float(loss.detach())) < TOL64, (norm, one_sided, method)
            assert torch.isfinite(xs.grad).all() and float(xs.grad.abs().max()) < 1e-6, (
                norm,
                one_sided,
                method,
            )


def test_invariant_to_batch_order():
    x, y = planted(n=30)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    for norm, one_sided in OBJECTIVES:
        fn = SpecAlignLoss(norm=norm, one_sided=one_sided, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x[perm].clone().requires_grad_()
        la, lb = fn(xa, y), fn(xb, y[perm])
        la.backward()
        lb.backward()
        assert abs(float(la.detach()) - float(lb.detach())) < TOL64
        torch.testing.assert_close(xa.grad[perm], xb.grad, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("norm,one_sided", OBJECTIVES)
@pytest.mark.parametrize("method", ["exact", "features"])
def test_gradcheck_every_objective(norm, one_sided, method):
    """Detached eigenvectors + v^T L v: the gradient of the eigenvalue function itself (finite differences)."""
    x, y = planted(n=12, p=4, q=3)
    fn = SpecAlignLoss(norm=norm, k=2, one_sided=one_sided, method=method, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: fn(a, y), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kernel", ["linear", st.GaussianKernel(sigma=2.0), st.GaussianKernel(sigma=2.0, rff_dim=8, seed=0)]
)
def test_gradcheck_other_kernels(kernel):
    x, y = planted(n=12, p=4, q=3)
    fn = SpecAlignLoss(kernel, "cosine", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: fn(a, y), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["op", "topk", "fro"])
def test_gradient_matches_finite_differences_of_oracle(norm):
    """Directional derivatives of the numpy oracle objective equal <grad, direction>."""
    x, y = planted(n=16)
    fn = SpecAlignLoss(norm=norm, k=3, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    fn(xs, y).backward()
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)

        def f(xx):
            return oracle_objective(difference(xx.numpy(), y.numpy()), norm, 3)

        fd = (f(x + FD_STEP * d) - f(x - FD_STEP * d)) / (2 * FD_STEP)
        assert abs(float((xs.grad * d).sum()) - fd) < FD_TOL * max(1.0, float(xs.grad.norm() * d.norm()))


def test_tied_top_eigenvalues_give_finite_gradients():
    """Two identical teacher clusters the student lacks: lambda_1 = lambda_2 exactly; no NaN."""
    n = 20
    y = torch.zeros(n, 6, dtype=torch.float64)
    y[:8, 0], y[8:16, 1] = 1.0, 1.0  # two clusters of 8
    y[16:, 2:] = torch.eye(4, dtype=torch.float64)  # and 4 singletons
    x = torch.eye(n, dtype=torch.float64)  # the student holds no cluster: K_s = I
    lam = np.linalg.eigvalsh(difference(x.numpy(), y.numpy()))
    assert abs(lam[0] - lam[1]) < 1e-12  # tied
    for norm in ("op", "topk"):
        for method in ("exact", "features"):
            for solver in ("eigh", "iterative"):
                xs = x.clone().requires_grad_()
                loss = SpecAlignLoss(norm=norm, k=2, method=method, solver=solver, dtype=torch.float64)(xs, y)
                loss.backward()
                assert abs(loss.item() - oracle_objective(difference(x.numpy(), y.numpy()), norm, 2)) < 1e-9
                assert torch.isfinite(xs.grad).all()


def test_teacher_carries_no_gradient():
    x, y = planted()
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    SpecAlignLoss(dtype=torch.float64)(xs, ys).backward()
    assert ys.grad is None and xs.grad is not None


# ---------------------------------------------------------------------------------- dtype, autocast
def test_autocast_bf16_inputs_use_float32_math():
    x, y = planted(n=32)
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()
    lin = lin.float()
    fn = SpecAlignLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = lin(x.float())  # bf16 under autocast
        assert s.dtype == torch.bfloat16
        loss = fn(s, y.to(torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32
    ref = SpecAlignLoss(dtype=torch.float64)(s.detach().double(), y.to(torch.bfloat16).double())
    assert abs(float(loss.detach()) - float(ref)) < TOL32
    assert torch.isfinite(lin.weight.grad).all()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "student,teacher,match",
    [
        (torch.randn(8, 4), torch.randn(7, 3), "student and teacher"),
        (torch.randn(1, 4), torch.randn(1, 3), "at least 2 samples"),
        (torch.randn(8), torch.randn(8, 3), "student: expected a 2-D"),
        (torch.randn(8, 4), torch.randn(8, 3, 1), "teacher: expected a 2-D"),
        (
            torch.randn(8, 4).index_fill(0, torch.tensor([2]), float("nan")),
            torch.randn(8, 3),
            "student: contains",
        ),
        (
            torch.randn(8, 4),
            torch.randn(8, 3).index_fill(0, torch.tensor([5]), float("inf")),
            "teacher: contains",
        ),
        (torch.zeros(8, 4), torch.randn(8, 3), "student: the cosine kernel needs non-zero rows"),
    ],
)
def test_bad_input_raises(student, teacher, match):
    with pytest.raises(SpecError, match=match):
        SpecAlignLoss()(student, teacher)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "nuc"}, "norm"),
        ({"eta": 0.0}, "eta"),
        ({"k": 0}, "k"),
        ({"solver": "lanczos"}, "solver"),
        ({"method": "dense"}, "method"),
        ({"dtype": torch.float16}, "dtype"),
        ({"one_sided": 1}, "one_sided"),
        ({"sync_dist": "yes"}, "sync_dist"),
        ({"kernel_student": "poly"}, "kernel_student"),
        ({"kernel_student": st.GaussianKernel(sigma=1.0), "solver": "iterative"}, "kernel_student"),
        ({"norm": "fro", "one_sided": True, "solver": "iterative"}, "solver"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(SpecError, match=match):
        SpecAlignLoss(**kwargs)


def test_sync_dist_true_needs_a_process_group():
    with pytest.raises(SpecError, match="sync_dist"):
        SpecAlignLoss(sync_dist=True)(torch.randn(4, 3), torch.randn(4, 3))


def test_input_dims_fixed_by_first_call():
    fn = SpecAlignLoss()
    fn(torch.randn(8, 4), torch.randn(8, 3))
    with pytest.raises(SpecError, match="feature dimensions"):
        fn(torch.randn(8, 5), torch.randn(8, 3))


# ------------------------------------------------------------------------------------- state, solver
def test_state_dict_keeps_fitted_gaussian_and_warm_start():
    x, y = planted(n=30)
    kern = st.GaussianKernel(sigma="auto", rff_dim=32, seed=5)
    fn = SpecAlignLoss(kern, kern, solver="iterative", dtype=torch.float64)
    fn(x, y)  # fits sigma (auto) and frequencies on this batch
    x2, y2 = planted(n=30, seed=4)
    expected = float(fn(x2 * 3, y2))  # later batches keep the first batch's sigma
    state = fn.state_dict()
    assert {"student_sigma", "student_omega", "teacher_omega", "warm_u", "solver_calls"} <= set(state)
    fresh = SpecAlignLoss(kern, kern, solver="iterative", dtype=torch.float64)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.student_omega, fn.student_omega) and torch.equal(fresh.warm_u, fn.warm_u)
    assert abs(float(fresh(x2 * 3, y2)) - expected) < ITER_TOL * expected
    refit = SpecAlignLoss(kern, kern, dtype=torch.float64)
    assert abs(float(refit(x2 * 3, y2)) - expected) > 1e-3  # a fresh fit on the scaled batch differs


def test_half_precision_module_cast_keeps_float64_kernel_state():
    x, y = planted(n=30)
    fn = SpecAlignLoss(st.GaussianKernel(sigma="auto", rff_dim=32, seed=0), "cosine")
    before = float(fn(x.float(), y.float()))
    fn.half()  # e.g. a container module cast to half: the RFF frequencies must not lose precision
    assert fn.student_omega.dtype == torch.float64 and fn.student_sigma.dtype == torch.float64
    assert float(fn(x.float(), y.float())) == before


def test_iterative_solver_warm_starts_and_matches_eigh():
    g = torch.Generator().manual_seed(0)
    x, y = planted(n=64, p=24, q=20)
    fn = SpecAlignLoss(solver="iterative", dtype=torch.float64)
    used = []
    for step in range(6):  # slowly drifting batches, as in training
        xb = x + 0.01 * step * torch.randn(x.shape, generator=g, dtype=torch.float64)
        value = float(fn(xb, y))
        used.append(fn.last_solver)
        ref = np.abs(np.linalg.eigvalsh(difference(xb.numpy(), y.numpy()))).max()
        assert abs(value - ref) < ITER_TOL * ref
    assert used[1:].count("iterative") >= 4, used
    assert int(fn.solver_calls) == 6


def test_iterative_solver_falls_back_to_eigh():
    x, y = planted(n=64, p=24, q=20)
    fn = SpecAlignLoss(solver="iterative", solver_tol=1e-15, dtype=torch.float32)  # unreachable in float32
    value = float(fn(x.float(), y.float()))
    assert fn.last_solver == "eigh"
    assert abs(value - np.abs(np.linalg.eigvalsh(difference(x.numpy(), y.numpy()))).max()) < TOL32


# ---------------------------------------------------------------------------------------- learning
def _spec_diff(s: torch.Tensor, t: torch.Tensor) -> float:
    return float(SpecAlignLoss(dtype=torch.float64, method="exact")(s.double(), t.double()))


def _knn_accuracy(train, train_labels, test, test_labels, k=5) -> float:
    a, b = nn.functional.normalize(train, dim=1), nn.functional.normalize(test, dim=1)
    idx = (b @ a.T).topk(k, dim=1).indices  # [n_test, k] cosine neighbours
    pred = torch.mode(train_labels[idx], dim=1).values
    return float((pred == test_labels).float().mean())


def _train(x_tr, t_tr, x_te, t_te, lab_tr, lab_te, d_out, steps, norm="op", lr=3e-3, batch=128):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(x_tr.shape[1], 128), nn.GELU(), nn.Linear(128, d_out))
    loss_fn = SpecAlignLoss("cosine", "cosine", norm=norm)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # linear decay to 0
    with torch.no_grad():
        before = _spec_diff(net(x_te), t_te), _knn_accuracy(net(x_tr), lab_tr, net(x_te), lab_te)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (batch,), generator=g)
        loss = loss_fn(net(x_tr[idx]), t_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        after = _spec_diff(net(x_te), t_te), _knn_accuracy(net(x_tr), lab_tr, net(x_te), lab_te)
    return before, after


def test_learning_planted_clusters():
    """A student seeing the latent through a rotated, noisy view learns the teacher's cluster structure."""
    g = torch.Generator().manual_seed(0)
    n, c = 1200, 6
    lab = torch.randint(0, c, (n,), generator=g)
    z = (2 * torch.randn(c, 4, generator=g))[lab] + 0.3 * torch.randn(n, 4, generator=g)  # latent
    teacher = z @ torch.randn(4, 8, generator=g)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    view = torch.cat([0.5 * z @ torch.randn(4, 4, generator=g), 2 * torch.randn(n, 12, generator=g)], 1) @ rot
    (sd0, acc0), (sd1, acc1) = _train(
        view[:800], teacher[:800], view[800:], teacher[800:], lab[:800], lab[800:], 8, steps=1000, norm="topk"
    )
    print(f"SPEC-diff {sd0:.4f} -> {sd1:.4f} ({sd0 / sd1:.1f}x), kNN accuracy {acc0:.3f} -> {acc1:.3f}")
    assert sd0 / sd1 >= 5, (sd0, sd1)
    assert acc1 > acc0 + 0.3, (acc0, acc1)


def test_learning_digits():
    """Student: MLP on permuted pixels; teacher: a fixed LDA projection of the digits (held-out evaluation)."""
    from sklearn.datasets import load_digits
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, labels = load_digits(return_X_y=True)
    x, labels = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(labels)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1300], perm[1300:]
    lda = LinearDiscriminantAnalysis(n_components=9).fit(x[tr].numpy(), labels[tr].numpy())
    teacher = torch.tensor(lda.transform(x.numpy()), dtype=torch.float32)
    view = x[:, torch.randperm(64, generator=g)]  # the student sees permuted pixels
    (sd0, acc0), (sd1, acc1) = _train(
        view[tr], teacher[tr], view[te], teacher[te], labels[tr], labels[te], 16, steps=400
    )
    print(f"SPEC-diff {sd0:.4f} -> {sd1:.4f} ({sd0 / sd1:.1f}x), kNN accuracy {acc0:.3f} -> {acc1:.3f}")
    assert sd0 / sd1 >= 5, (sd0, sd1)
    assert acc1 > acc0, (acc0, acc1)


# --------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_matches_cpu_and_keeps_fitted_state_across_devices():
    x, y = planted(n=64, p=24, q=20)
    kern = st.GaussianKernel(sigma="auto", rff_dim=64, seed=0)
    for kwargs in (dict(), dict(norm="topk", solver="iterative"), dict(norm="fro", method="features")):
        fn = SpecAlignLoss(kern, "cosine", dtype=torch.float64, **kwargs)
        on_cpu = float(fn(x, y))  # fits sigma and the frequencies on the CPU
        fn = fn.cuda()  # the buffers move with the module
        xs = x.cuda().requires_grad_()
        on_gpu = fn(xs, y.cuda())
        on_gpu.backward()
        assert abs(float(on_gpu.detach()) - on_cpu) < 1e-9 * max(1.0, on_cpu) + ITER_TOL * on_cpu * (
            "solver" in kwargs
        )
        assert torch.isfinite(xs.grad).all()


@pytest.mark.gpu
def test_cuda_autocast_bf16_uses_float32_math():
    x, y = planted(n=256, p=64, q=48)
    lin = nn.Linear(64, 64).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s = lin(x.float().cuda())
        loss = SpecAlignLoss()(s, y.cuda().to(torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()
    ref = SpecAlignLoss(dtype=torch.float64)(s.detach().double().cpu(), y.to(torch.bfloat16).double())
    assert abs(float(loss.detach()) - float(ref)) < TOL32


# ------------------------------------------------------------- issue 8: numerics of close embeddings
CLOSE_RTOL = 1e-3  # the contract: relative error vs the dense float64 oracle on close embeddings (B = 256)
F32_OUT = 1e-7  # the float32 result's own rounding (half an ulp is 6e-8 relative)
FRO_RTOL = 1e-6  # the covariance-form Frobenius norm vs the oracle (cancellation-free to float64 rounding)
# SPEC-diff of close(delta) is about 0.054 delta (B=256, p=32): 1e-5, the 2.4e-5 and 1.11e-4
CLOSE_DELTAS = (1.85e-4, 4.4e-4, 2.05e-3)


def close(delta: float, b: int = 256, p: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 student that is its teacher plus ``delta`` noise: a SPEC-diff of about 0.054 delta."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, p, generator=g, dtype=torch.float64)
    s = t + delta * torch.randn(b, p, generator=g, dtype=torch.float64)
    return s.float(), t.float()


def oracle_spec_diff(s: torch.Tensor, t: torch.Tensor, **kw) -> float:
    return float(np.abs(np.linalg.eigvalsh(difference(s.double().numpy(), t.double().numpy(), **kw))).max())


@pytest.mark.parametrize("delta", CLOSE_DELTAS)
@pytest.mark.parametrize("method,solver", [("auto", "eigh"), ("exact", "eigh"), ("features", "eigh")])
def test_close_models_default_loss_matches_float64_oracle(delta, method, solver):
    """Default (float64 internals) on float32 inputs: 1e-3 relative down to SPEC-diff 1e-5 on every route.

    Today's float32 default returned 0 (zero gradient) for the true 2.4e-5 and 3.67e-4 for 1.11e-4.
    """
    s, t = close(delta)
    ref = oracle_spec_diff(s, t)
    assert 0.9e-5 < ref < 1.3e-4
    fn = SpecAlignLoss(method=method, solver=solver)
    xs = s.clone().requires_grad_()
    loss = fn(xs, t)
    loss.backward()
    assert loss.dtype == torch.float32 and fn.last_solver == "eigh"
    assert fn.last_route == ("features" if method == "auto" else method)  # auto: D = 64 < B = 256
    assert abs(float(loss.detach()) - ref) < CLOSE_RTOL * ref
    assert float(xs.grad.abs().max()) > 0


@pytest.mark.parametrize("delta", CLOSE_DELTAS)
def test_close_models_iterative_solver_matches_float64_oracle(delta):
    """Warm-started iterative solver on slowly drifting close batches; its value within its residual tolerance."""
    fn = SpecAlignLoss(solver="iterative")
    used = []
    for seed in range(4):
        s, t = close(delta * (1 + 0.01 * seed))
        ref = oracle_spec_diff(s, t)
        assert abs(float(fn(s, t)) - ref) < ITER_TOL * ref
        used.append(fn.last_solver)
    assert "iterative" in used[1:], used


@pytest.mark.parametrize("delta", CLOSE_DELTAS)
def test_float32_fast_path_exact_route_resolves_small_spec_diff(delta):
    """dtype=float32, exact route: the cut-off follows float32's rounding, not 100 eps trace(C) (= 2.4e-5)."""
    s, t = close(delta)
    ref = oracle_spec_diff(s, t)
    fn = SpecAlignLoss(method="exact", dtype=torch.float32)
    assert abs(float(fn(s, t)) - ref) < CLOSE_RTOL * ref


@pytest.mark.parametrize("delta", CLOSE_DELTAS)
@pytest.mark.parametrize("method,solver", [("features", "eigh"), ("auto", "eigh"), ("auto", "iterative")])
def test_float32_fast_path_features_route_re_solves_in_float64_when_close(delta, method, solver):
    """float32 C loses a small SPEC-diff entirely (0 at 1e-5, 71% off at 1.1e-4): its error bound sends these
    cases to a float64 re-solve (``last_solve_dtype``); the iterative solver gives them to eigh."""
    s, t = close(delta)
    ref = oracle_spec_diff(s, t)
    fn = SpecAlignLoss(method=method, solver=solver, dtype=torch.float32)
    for _ in range(2):  # the iterative solver's second call is warm
        value = float(fn(s, t))
        assert abs(value - ref) < CLOSE_RTOL * ref
        assert (
            fn.last_route == "features" and fn.last_solver == "eigh" and fn.last_solve_dtype == torch.float64
        )


def test_float32_fast_path_stays_float32_on_separated_modes():
    x, y = planted(n=64, p=24, q=20)
    ref = np.abs(np.linalg.eigvalsh(difference(x.numpy(), y.numpy()))).max()
    for solver in ("eigh", "iterative"):
        fn = SpecAlignLoss(method="features", solver=solver, dtype=torch.float32)
        for _ in range(2):
            value = float(fn(x.float(), y.float()))
        assert fn.last_solve_dtype == torch.float32 and fn.last_solver == solver
        assert abs(value - ref) < (TOL32 if solver == "eigh" else ITER_TOL) * ref


@pytest.mark.parametrize("delta", (1e-2, 1e-3, 1e-4))
@pytest.mark.parametrize("center", [False, True])
def test_frobenius_covariance_form_is_accurate_on_float32_input(delta, center):
    """``||C_ss||^2 + ||C_tt||^2 - 2 ||C_st||^2`` cancels: in float32 it was 4.6% off at delta 1e-3 and 0 at 1e-4."""
    s, t = close(delta)
    lmat = difference(s.double().numpy(), t.double().numpy())
    if center:
        h = np.eye(len(s)) - 1.0 / len(s)
        lmat = h @ lmat @ h
    ref = float(np.linalg.norm(lmat))
    loss = SpecAlignLoss(norm="fro", method="features", center=center)(s, t)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - ref) < (FRO_RTOL + F32_OUT) * ref


def test_loss_dtype_follows_student():
    x, y = planted(n=12)
    assert SpecAlignLoss()(x, y).dtype == torch.float64
    assert SpecAlignLoss()(x.float(), y.float()).dtype == torch.float32
    assert SpecAlignLoss(dtype=torch.float32)(x, y).dtype == torch.float64
    assert SpecAlignLoss()(x.to(torch.bfloat16), y).dtype == torch.float32  # half precision: float32
    assert SpecAlignLoss()(x.numpy(), y.numpy()).dtype == torch.float64


def test_student_equal_to_teacher_on_a_large_batch_gives_zero_on_every_route():
    """n >> D: C's null space is rounding noise, which must be dropped, not square-rooted into a mode."""
    g = torch.Generator().manual_seed(0)
    for method, n in (("exact", 512), ("features", 4096)):
        x = torch.randn(n, 8, generator=g)
        xs = x.clone().requires_grad_()
        fn = SpecAlignLoss(method=method)
        loss = fn(xs, x)
        loss.backward()
        assert abs(float(loss.detach())) < TOL64 and float(xs.grad.abs().max()) < 1e-12, method


# ------------------------------------------------------------------------- degenerate input -> SpecError
@pytest.mark.parametrize("method,solver", [("exact", "eigh"), ("features", "eigh"), ("auto", "iterative")])
@pytest.mark.parametrize("norm", ["op", "fro"])
def test_all_zero_features_raise_spec_error(method, solver, norm):
    zeros = torch.zeros(8, 3)
    fn = SpecAlignLoss("linear", "linear", method=method, solver=solver, norm=norm)
    with pytest.raises(SpecError, match="student: the kernel matrix is 0"):
        fn(zeros, zeros)
    with pytest.raises(SpecError, match="teacher: the kernel matrix is 0"):
        SpecAlignLoss("linear", "linear", method=method, solver=solver, norm=norm)(torch.randn(8, 3), zeros)


def test_constant_features_raise_spec_error_when_centred():
    const = torch.ones(8, 3)
    with pytest.raises(SpecError, match="student: the kernel matrix is 0.*constant"):
        SpecAlignLoss("linear", "linear", center=True)(const, torch.randn(8, 3))
    with pytest.raises(SpecError, match="teacher: the kernel matrix is 0.*constant"):
        SpecAlignLoss(st.GaussianKernel(sigma=1.0), "cosine", center=True)(torch.randn(8, 3), const)


def test_overflowing_features_raise_spec_error():
    with pytest.raises(SpecError, match="student: the kernel features overflow"):
        SpecAlignLoss("linear", "linear")(torch.full((4, 3), 1e200, dtype=torch.float64), torch.randn(4, 2))


def test_exact_gaussian_all_zero_linear_teacher_raises():
    with pytest.raises(SpecError, match="teacher: the kernel matrix is 0"):
        SpecAlignLoss(st.GaussianKernel(sigma=1.0), "linear")(torch.randn(6, 3), torch.zeros(6, 2))


def test_features_route_with_huge_d_is_refused_before_allocating():
    """D = 400,000 (D x D float64 matrices, terabytes): refused by the memory check, as in the core."""
    x = torch.randn(4, 200_000)
    with pytest.raises(SpecError, match="method: the features route with D = 200000 \\+ 200000"):
        SpecAlignLoss("linear", "linear", method="features")(x, x)
    with pytest.raises(SpecError, match="method: the exact route with n = 300000"):
        SpecAlignLoss(method="exact")(torch.randn(300_000, 1), torch.randn(300_000, 1))


def test_tiny_cosine_row_has_a_bounded_gradient():
    """A row 1e-20 times shorter than the others: today's gradient was 1e18; the floor bounds it."""
    x, y = planted(n=16, p=5, q=4)
    x[3] *= 1e-20
    xs = x.clone().requires_grad_()
    loss = SpecAlignLoss()(xs, y)
    loss.backward()
    assert torch.isfinite(xs.grad).all() and float(xs.grad.abs().max()) < 1e7
    # the tiny row's feature is x / floor with floor = 1e-6 max ||x_i||: about 1e-14, i.e. K_s = 0 on that row
    floor = 1e-6 * float(x.norm(dim=1).max())
    phi = x / x.norm(dim=1, keepdim=True).clamp_min(floor)
    lmat = (phi @ phi.T).numpy() / 16 - gram(y.numpy(), "cosine") / 16
    assert abs(float(loss.detach()) - np.abs(np.linalg.eigvalsh(lmat)).max()) < TOL64


def test_zero_cosine_row_message_names_the_row():
    x = torch.randn(8, 4)
    x[5] = 0
    with pytest.raises(
        SpecError,
        match=r"student: the cosine kernel needs non-zero rows, got 1 zero row\(s\) \(first at row 5",
    ):
        SpecAlignLoss()(x, torch.randn(8, 3))


# ------------------------------------------------------------------------- iterative solver: mode crossing
def crossing(lam_b: float, n_teacher: int, lo: float, hi: float, n: int = 240):
    """Linear features on disjoint sample groups, so L is known exactly:
    ``L = e_A e_A^T + lam_b e_B e_B^T - sum_j mu_j e_j e_j^T`` (unit indicator vectors, mu_j in [lo, hi])."""
    mus = torch.linspace(lo, hi, n_teacher, dtype=torch.float64)
    s = torch.zeros(n, 2, dtype=torch.float64)
    t = torch.zeros(n, n_teacher, dtype=torch.float64)
    s[0:10, 0] = (n * 1.0 / 10) ** 0.5  # mode A: lambda = 1.0 on samples 0..9
    s[10:20, 1] = (n * lam_b / 10) ** 0.5  # mode B: lambda = lam_b on samples 10..19
    for j in range(n_teacher):
        t[20 + 6 * j : 26 + 6 * j, j] = (n * mus[j] / 6) ** 0.5  # teacher clusters: -mu_j
    return s, t


@pytest.mark.parametrize(
    "n_teacher,lo,hi,branch",
    [
        (
            30,
            0.5,
            0.95,
            "eigh",
        ),  # B's Ritz value lags behind strong teacher modes: Krylov gives up, eigh runs
        (12, 0.3, 0.9, "iterative"),  # Krylov converges to B itself
    ],
)
def test_iterative_solver_never_accepts_a_stale_mode(n_teacher, lo, hi, branch):
    """The warm start holds mode A (lambda 1.0), still an exact eigenvector, when mode B grows to 1.1.

    On the first case today's solver accepted A after one Krylov step (only the selected pair's residual, 0,
    was checked): loss 1.000 instead of 1.100, and the gradient moved mode A's samples instead of B's.
    """
    fn = SpecAlignLoss("linear", "linear", solver="iterative")
    fn(*crossing(0.01, n_teacher, lo, hi))  # A is the top mode; the warm block holds A and teacher modes
    assert fn.last_solver == "iterative"
    s, t = crossing(1.1, n_teacher, lo, hi)
    xs = s.clone().requires_grad_()
    loss = fn(xs, t)
    loss.backward()
    assert fn.last_solver == branch
    assert abs(float(loss.detach()) - 1.1) < ITER_TOL
    assert float(xs.grad[10:20].abs().sum()) > 0.1 and float(xs.grad[0:10].abs().sum()) < 1e-6


# -------------------------------------------------------------------------------------- center=True
def centred_oracle(x, y, kx="cosine", ky="cosine", eta=1.0, sigma_x=None):
    lmat = difference(x.numpy(), y.numpy(), kx, ky, eta=eta, sigma_x=sigma_x)
    h = np.eye(len(x)) - 1.0 / len(x)
    return h @ lmat @ h


@pytest.mark.parametrize("norm,one_sided", OBJECTIVES)
@pytest.mark.parametrize(
    "kx,method", [("cosine", "exact"), ("cosine", "features"), ("linear", "features"), ("gaussian", "exact")]
)
def test_centred_objectives_match_oracle(norm, one_sided, kx, method):
    x, y = planted(n=20, p=5, q=4)
    kern = st.GaussianKernel(sigma=1.5) if kx == "gaussian" else kx
    fn = SpecAlignLoss(
        kern, "cosine", eta=0.8, norm=norm, k=2, one_sided=one_sided, method=method, center=True
    )
    lmat = centred_oracle(x, y, kx, eta=0.8, sigma_x=1.5)
    assert abs(float(fn(x, y)) - oracle_objective(lmat, norm, 2, one_sided)) < TOL64
    assert torch.autograd.gradcheck(lambda a: fn(a, y), (x.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_centring_removes_the_constant_mode():
    """Linear kernels: shifting every student row by one vector changes K but not H K H."""
    x, y = planted(n=24)
    shift = 5 * torch.randn(x.shape[1], dtype=torch.float64)
    plain = [float(SpecAlignLoss("linear", "linear")(x + c, y)) for c in (0, shift)]
    centred = [float(SpecAlignLoss("linear", "linear", center=True)(x + c, y)) for c in (0, shift)]
    assert abs(plain[1] - plain[0]) > 0.1
    assert abs(centred[1] - centred[0]) < TOL64 * 10


def test_centred_iterative_solver_matches_eigh():
    x, y = planted(n=64, p=24, q=20)
    fn = SpecAlignLoss(solver="iterative", center=True)
    ref = np.abs(np.linalg.eigvalsh(centred_oracle(x, y))).max()
    for _ in range(3):
        assert abs(float(fn(x, y)) - ref) < ITER_TOL * ref
    assert fn.last_solver == "iterative"


def test_rff_dim_auto_resolves_by_route():
    """The kernel configs default to rff_dim='auto': exact Gaussian on the B x B route, random features where
    the features route needs a feature map."""
    auto = st.GaussianKernel(sigma=1.0, rff_dim="auto")
    exact = SpecAlignLoss(auto, "cosine")
    assert exact.kernels["student"].rff_dim is None
    feats = SpecAlignLoss(auto, "cosine", method="features")
    assert feats.kernels["student"].rff_dim == st.kernels.AUTO_RFF_DIM
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 5, generator=g, requires_grad=True), torch.randn(64, 3, generator=g)
    ref = SpecAlignLoss(st.GaussianKernel(sigma=1.0), "cosine")(s, t)
    assert float(exact(s, t).detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert torch.isfinite(feats(s, t).detach())
