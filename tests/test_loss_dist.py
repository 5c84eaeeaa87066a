"""SpecAlignLoss under torch.distributed (2 Gloo processes on CPU) equals one process on the concatenated batch.

Convention checked: every rank returns the global-batch value, and each rank's gradient of its own rows is
``world_size`` times the single-process gradient of those rows (DDP's averaging then gives the global gradient).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import spawn_gloo

import spec_torch as st
from spec_torch import SpecAlignLoss

WORLD = 2
SIZES = (7, 9)  # unequal per-rank batches: the exact route's all-gather pads
TOL = 1e-10  # float64 value and gradient vs one process
ITER_REL = 1e-3  # the iterative solver's default relative residual
TIMEOUT_S = 120

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
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        results = {}
        for name, kwargs in CONFIGS.items():
            fn = SpecAlignLoss(dtype=torch.float64, **kwargs)
            xs = x[_rows(rank)].clone().requires_grad_()
            loss = fn(xs, y[_rows(rank)])
            loss.backward()
            results[name] = {"loss": float(loss.detach()), "grad": xs.grad, "state": fn.state_dict()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


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
    tol_value = ITER_REL * float(ref.detach()) if "iterative" in name else TOL
    for rank in range(WORLD):
        got = ranks[rank][name]
        assert abs(got["loss"] - float(ref.detach())) < tol_value, (rank, got["loss"], float(ref.detach()))
        expected_grad = WORLD * xs.grad[_rows(rank)]  # DDP averages over ranks -> the single-process gradient
        scale = max(1.0, float(expected_grad.abs().max()))
        tol_grad = 10 * ITER_REL * scale if "iterative" in name else TOL * scale
        torch.testing.assert_close(got["grad"], expected_grad, rtol=0, atol=tol_grad)


def test_ranks_agree_bitwise_on_the_value(ranks):
    for name in CONFIGS:
        assert ranks[0][name]["loss"] == ranks[1][name]["loss"], name
