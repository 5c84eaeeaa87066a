"""What the library needs from ``torch.distributed``: rank queries and the collectives of the core.

Nothing here knows about torchrun, datasets or files (that is :mod:`spec_torch.apps.sharding`); every function
works without a process group (one process: the identity, rank 0 of 1).

- Ranks: :func:`is_distributed` (a process group of more than one rank), :func:`get_rank`,
  :func:`get_world_size`, :func:`is_main_process`, :func:`barrier`.
- Reductions: :func:`all_reduce_state` sums a dict of tensors/ints over ranks (the streamed sums of
  :class:`~spec_torch.DiffCovariance` or ``LinearCKA``); :func:`all_gather_topk` merges per-rank top-k
  candidates into the global top-k; :func:`broadcast_object` / :func:`all_gather_object` move small objects;
  :func:`fit_on_main` fits a data-dependent kernel once and sends it to every rank.
- Training: :func:`all_gather_with_grad` (rows of every rank, differentiable), with the gradient convention of
  SpecAlignLoss and open_clip: every rank gets ``world_size`` times its rows' gradient, DDP averages;
  :func:`all_reduce_mean` (a logged value averaged over ranks).

Every function that communicates must be called by all ranks, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .covariance import distributed_ready as is_distributed
from .errors import SpecError
from .result import top_rows  # one definition, beside DiffCovariance

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "broadcast_object",
    "all_gather_object",
    "agree",
    "run_on_main",
    "fit_on_main",
    "all_reduce_state",
    "all_gather_topk",
    "all_gather_with_grad",
    "all_reduce_mean",
]


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable; returns ``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(error: BaseException | str | None) -> None:
    """Every rank says whether its local check failed; if any did, every rank raises the same
    :class:`SpecError` (naming the ranks), so none goes on alone into a collective the others never reach.

    Call it on every rank, right after the local checks and before the next collective (a no-op raising
    ``error`` itself without a process group).
    """
    mine = None if error is None else (str(error) or type(error).__name__)
    if not is_distributed():
        if isinstance(error, BaseException):
            raise error
        if error is not None:
            raise SpecError(mine)
        return
    flag = torch.tensor([0 if mine is None else 1], dtype=torch.int64, device=_device())
    dist.all_reduce(flag)  # cheap when nobody failed: one integer
    if int(flag) == 0:
        return
    reports = all_gather_object(mine)
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if len({m for _, m in failed}) == 1:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise SpecError(f"{failed[0][1]} (on rank {ranks})")
    raise SpecError("; ".join(f"rank {r}: {m}" for r, m in failed))


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its (picklable) result returned on every rank.

    An exception on rank 0 is raised on every rank as :class:`SpecError` with the same message (so no rank
    goes on alone into a collective that the others never reach).
    """
    outcome: tuple[str, Any] | None = None
    if is_main_process():
        try:
            outcome = ("ok", fn())
        except SpecError as exc:
            if not is_distributed():
                raise
            outcome = ("error", str(exc))
        except Exception as exc:
            if not is_distributed():
                raise
            outcome = ("error", f"rank 0 failed: {type(exc).__name__}: {exc}")
    status, value = broadcast_object(outcome)
    if status == "error":
        raise SpecError(value)
    return value


def fit_on_main(kernel: Any, x: torch.Tensor) -> Any:
    """``kernel.fit(x)`` computed on rank 0 (from rank 0's ``x``) and the fitted kernel sent to every rank.

    Under torch.distributed, fit data-dependent kernels (``GaussianKernel(sigma="auto")``) once with this
    before streaming: a kernel left unfitted is fitted by each rank on its own first batch, and the ranks'
    sums would then describe different kernels.
    """
    from .kernels import resolve_kernel

    kernel = resolve_kernel(kernel, "kernel")
    return run_on_main(lambda: kernel.fit(x))  # rank 0's error (e.g. sigma='auto' on < 2 rows) on every rank


def all_reduce_state(state: dict[str, Any]) -> dict[str, Any]:
    """Sum every tensor and integer of ``state`` over the ranks; other values are kept. Returns a new dict.

    The tensors are flattened into one buffer per dtype, so a state costs one all-reduce per dtype.
    Every rank must pass the same keys with tensors of the same shapes (``None`` values are kept as they are).
    """
    if not is_distributed():
        return dict(state)
    out = dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    ints = {k: v for k, v in state.items() if isinstance(v, (int, np.integer)) and not isinstance(v, bool)}
    device = _device()
    for dtype in sorted({t.dtype for t in tensors.values()}, key=str):
        keys = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1).to(device) for k in keys])
        dist.all_reduce(flat)
        offset = 0
        for k in keys:
            t = tensors[k]
            out[k] = flat[offset : offset + t.numel()].view_as(t).to(t.device)
            offset += t.numel()
    if ints:
        keys = sorted(ints)
        counts = torch.tensor([int(ints[k]) for k in keys], dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        out.update({k: int(c) for k, c in zip(keys, counts.tolist())})
    return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` per rank -> ``[world_size * B, ...]`` (rank order), differentiable: the backward pass sums
    every rank's gradient of a rank's rows back onto that rank (``x`` itself without a process group).

    Every rank must pass the same shape. If every rank then computes the same loss of the gathered rows,
    each rank's rows receive ``world_size`` times their gradient, which DDP's averaging turns back into the
    gradient of one process over the global batch (open_clip's ``gather_with_grad``).
    """
    if not is_distributed():
        return x
    return _GatherRows.apply(x)


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-shape row blocks; backward: the summed gradient of this rank's block.

    Kept rather than ``torch.distributed.nn.functional.all_gather``: in torch 2.14 that function is deprecated
    (it warns on every call and points to the private ``_functional_collectives``), and off NCCL its backward
    emulates reduce-scatter with an all-to-all of every block; this one is an all-gather forward and one
    all-reduce backward on any backend, tested on Gloo against one process (tests/test_distributed.py).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)  # [W * B, ...]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's gradient of every block, summed
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``x`` (no gradient; e.g. a per-rank loss value for the logs)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().to(_device(), copy=True)
    dist.all_reduce(out)
    return (out / dist.get_world_size()).to(x.device)


def all_gather_topk(
    values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank top-k candidates ``values, indices: [k_r, M]`` (per column) into the global top-k.

    ``indices`` must already be global (e.g. shard offset added). Ranks may hold different numbers of rows
    ``k_r`` (a small shard); the result has ``min(k, sum_r k_r)`` rows, sorted best first, on every rank.
    Ties are broken towards the smaller global index, whatever the number of ranks.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise SpecError(
            f"values/indices: expected two [k, M] tensors of one shape, got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )
    if is_distributed():
        device = _device()
        rows = torch.tensor([values.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, rows)
        sizes_l = [int(s) for s in sizes]
        most = max(sizes_l)
        pad = most - values.shape[0]
        v = torch.nn.functional.pad(values.to(device), (0, 0, 0, pad))  # [most, M]
        i = torch.nn.functional.pad(indices.to(device), (0, 0, 0, pad))
        vs, is_ = [torch.empty_like(v) for _ in sizes_l], [torch.empty_like(i) for _ in sizes_l]
        dist.all_gather(vs, v)
        dist.all_gather(is_, i)
        values = torch.cat([t[:s] for t, s in zip(vs, sizes_l)]).to(values.device)  # [sum k_r, M]
        indices = torch.cat([t[:s] for t, s in zip(is_, sizes_l)]).to(values.device)
    return top_rows(values, indices, k, largest=largest)
