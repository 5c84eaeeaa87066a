"""SpecAlignLoss under torch.distributed (2 Gloo processes on CPU) equals one process on the concatenated batch.

Convention checked: every rank returns the global-batch value, and each rank's gradient of its own rows is
``world_size`` times the single-process gradient of those rows (DDP's averaging then gives the global gradient).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import gloo_group, spawn_gloo

import spec_torch as st
from spec_torch import SpecAlignLoss

WORLD = 2
SIZES = (7, 9)  # unequal per-rank batches: the exact route's all-gather pads
TOL = 1e-10  # float64 value and gradient vs one process
# The iterative solver is compared with one process running the *same* iterative solve: both start from the same
# seeded probes (and no warm start), so they build the same Krylov space and differ by rounding only (the
# Rayleigh-Ritz whitening keeps Gram eigenvalues down to 100 eps, amplifying rounding at most ~1e6-fold: 1e-10).
# Its distance to eigh is the single-process test's business (tests/test_loss.py, ITER_TOL).
ITER_SAME_REL = 1e-8
TIMEOUT_S = 120
ERROR_TIMEOUT_S = 60  # the error cases must end in seconds, not at the collective timeout

CONFIGS = {
    f"{norm}-{'one' if one_sided else 'two'}-{method}": dict(
        norm=norm, k=2, one_sided=one_sided, method=method
    )
    for norm in ("op", "topk", "fro")
    for one_sided in (False, True)
    for method in ("exact", "features")
}
CONFIGS["iterative-op"] = dict(norm="op", solver="iterative")
CONFIGS["iterative-topk-one-sided"] = dict(norm="topk", k=2, one_sided=True, solver="iterative")
CONFIGS["gaussian-rff-auto"] = dict(
    kernel_student=st.GaussianKernel(sigma="auto", rff_dim=8, seed=1), kernel_teacher="linear"
)
# kernels without a feature map: rows of the n x n matrix per rank
for norm, one_sided in (("op", False), ("topk", True), ("fro", False), ("fro", True)):
    CONFIGS[f"gaussian-exact-{norm}-{one_sided}"] = dict(
        kernel_student=st.GaussianKernel(sigma=2.0), norm=norm, k=2, one_sided=one_sided
    )
CONFIGS["gaussian-exact-teacher-auto"] = dict(
    kernel_teacher=st.GaussianKernel(sigma="auto"), norm="topk", k=2
)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    lab = torch.arange(n) % 3
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)[lab] + 0.3 * torch.randn(
        n, 6, generator=g, dtype=torch.float64
    )
    y = torch.randn(4, 5, generator=g, dtype=torch.float64)[(lab + torch.arange(n) % 2) % 4]
    return x, y + 0.3 * torch.randn(n, 5, generator=g, dtype=torch.float64)


def _rows(rank: int) -> slice:
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, world=WORLD):
        x, y = _data()
        results = {}
        for name, kwargs in CONFIGS.items():
            fn = SpecAlignLoss(dtype=torch.float64, **kwargs)
            xs = x[_rows(rank)].clone().requires_grad_()
            loss = fn(xs, y[_rows(rank)])
            loss.backward()
            results[name] = {
                "loss": float(loss.detach()),
                "grad": xs.grad,
                "state": fn.state_dict(),
                "solver": fn.last_solver,
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every config once in 2 Gloo processes; the per-rank results."""
    out = tmp_path_factory.mktemp("dist")
    spawn_gloo(_worker, str(out), world=WORLD, timeout_s=TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_equal_one_process_on_concatenated_batch(ranks, name):
    x, y = _data()
    ref_fn = SpecAlignLoss(dtype=torch.float64, sync_dist=False, **CONFIGS[name])
    if "gaussian" in name:  # the bandwidth was fitted on rank 0's first batch: use the same fitted state
        ref_fn.load_state_dict(ranks[0][name]["state"])
    xs = x.clone().requires_grad_()
    ref = ref_fn(xs, y)
    ref.backward()
    if "iterative" in name:  # the same Krylov space on both sides, converged on both (not an eigh fallback)
        assert ref_fn.last_solver == "iterative" and all(r[name]["solver"] == "iterative" for r in ranks)
    rel = ITER_SAME_REL if "iterative" in name else TOL
    for rank in range(WORLD):
        got = ranks[rank][name]
        assert abs(got["loss"] - float(ref.detach())) < rel * max(1.0, float(ref.detach())), (
            rank,
            got["loss"],
        )
        expected_grad = WORLD * xs.grad[_rows(rank)]  # DDP averages over ranks -> the single-process gradient
        # relative to the gradient's size (entries here are ~0.01-0.1, so an absolute 1e-2 would pass anything)
        torch.testing.assert_close(
            got["grad"], expected_grad, rtol=0, atol=rel * float(expected_grad.abs().max())
        )


def test_ranks_agree_bitwise_on_the_value(ranks):
    for name in CONFIGS:
        assert ranks[0][name]["loss"] == ranks[1][name]["loss"], name


# ------------------------------------------------------------- checks that fail on one rank only (issue 9)
def _error_cases(rank: int) -> dict:
    """Per case: (loss kwargs, this rank's student, this rank's teacher), bad on one rank only."""
    g = torch.Generator().manual_seed(rank)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    zero_row = s.clone()
    if rank == 1:
        zero_row[2] = 0  # global row 4 + 2 = 6
    nan = t.clone()
    if rank == 0:
        nan[1, 1] = float("nan")
    one_row = s[:1] if rank == 0 else s  # sigma='auto' is fitted on rank 0 only, which has 1 row
    return {
        "zero-row": ({}, zero_row, t),
        "nan": ({}, s, nan),
        "shape": ({}, s[:, 0] if rank == 1 else s, t),
        "sigma-auto": (
            {"kernel_student": st.GaussianKernel(sigma="auto", rff_dim=4)},
            one_row,
            t[: one_row.shape[0]],
        ),
        "memory": ({"method": "features"}, s, t),  # rank 1 reports no free memory
    }


def _error_worker(rank: int, port: int, out_dir: str) -> None:
    import spec_torch.loss as loss_module

    real = loss_module.memory_available
    with gloo_group(rank, port, world=WORLD):
        try:
            messages = {}
            for name, (kwargs, s, t) in _error_cases(rank).items():
                loss_module.memory_available = (lambda device: 0) if name == "memory" and rank == 1 else real
                try:
                    SpecAlignLoss(**kwargs)(s, t)
                    messages[name] = None
                except st.SpecError as exc:
                    messages[name] = str(exc)
            torch.save(messages, os.path.join(out_dir, f"errors{rank}.pt"))
        finally:
            loss_module.memory_available = real


@pytest.fixture(scope="module")
def error_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_errors")
    spawn_gloo(_error_worker, str(out), world=WORLD, timeout_s=ERROR_TIMEOUT_S)
    return [torch.load(out / f"errors{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize(
    "name,match0,match1",
    [
        (
            "zero-row",
            r"student: the cosine kernel needs non-zero rows, got 1 zero row\(s\).*row 6 of the global",
            None,
        ),
        ("nan", r"teacher: contains 1 NaN or Inf value\(s\) \(summed over ranks\)", None),
        ("shape", r"rank 1 refused its batch", r"student: expected a 2-D array"),
        (
            "sigma-auto",
            r"kernel_student: sigma='auto': needs at least 2 samples",
            r"could not be fitted on rank 0",
        ),
        ("memory", r"method: the features route .* on some rank", None),
    ],
)
def test_a_check_failing_on_one_rank_raises_on_every_rank(error_ranks, name, match0, match1):
    """Every rank raises a SpecError together (one all-gather of the checks), none waits in a collective."""
    import re

    for rank, pattern in ((0, match0), (1, match1 or match0)):
        message = error_ranks[rank][name]
        assert message is not None and re.search(pattern, message), (rank, message)
