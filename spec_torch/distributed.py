"""torch.distributed helpers for spec_torch runs started by ``torchrun`` (DDP): one process per device.

- Process group: :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts NCCL on CUDA, Gloo on CPU;
  :func:`get_rank`, :func:`get_world_size`, :func:`is_main_process` work with or without a group.
- Hydra: :func:`share_config` lets rank 0 alone run Hydra (run folder, ``.hydra/``, log file) and sends its
  composed config to the other ranks (:func:`is_follower`), which skip Hydra.
- Sharding: :func:`shard_range` splits ``n`` samples into contiguous blocks, one per rank, in rank order:
  every sample on exactly one rank, none dropped, none repeated (``DistributedSampler`` pads instead), so
  rank ``r``'s local row ``i`` is global row ``shard_range(n, r).start + i``. :class:`ShardDataset` is
  such a block of a :class:`~spec_torch.data.SampleDataset` with its own fingerprint (its own feature cache);
  :func:`extract_sharded` extracts features block by block and reads them back as one cache
  (:class:`RowConcat`: the row blocks of several memory-mapped arrays read as one ``[sum n_r, d]`` array).
- Reductions: :func:`all_reduce_state` sums a dict of tensors/ints over ranks (the streamed sums of
  :class:`~spec_torch.DiffCovariance` or ``LinearCKA``); :func:`all_gather_topk` merges per-rank top-k
  candidates into the global top-k; :func:`broadcast_object` / :func:`all_gather_object` move small objects;
  :func:`fit_on_main` fits a data-dependent kernel once and sends it to every rank.
- Training: :func:`wrap_ddp` (DistributedDataParallel, one device per process) and
  :func:`all_gather_with_grad` (rows of every rank, differentiable), with the gradient convention of
  SpecAlignLoss and open_clip: every rank gets ``world_size`` times its rows' gradient, DDP averages.
- Output: :func:`run_on_main` / :func:`write_on_main` run on rank 0 only (a file: atomically, temp name then
  rename) and raise rank 0's error on every rank, so no rank waits forever or goes on after a failed write.

Every function that communicates must be called by all ranks, in the same order.

Example (``torchrun --nproc_per_node=2 script.py``)::

    from spec_torch import distributed as sd
    sd.init_distributed()
    rows = sd.shard_range(len(x))                     # this rank's contiguous block of samples
    acc = st.DiffCovariance("cosine", "cosine")
    for b in torch.arange(rows.start, rows.stop).split(4096):
        acc.update(x[b], y[b])
    res = acc.compute()                               # sums all-reduced: the same result on every rank
    top = res.top_samples((x[rows.start:rows.stop], y[rows.start:rows.stop]), k=10,
                          offset=rows.start, sync_dist=True)   # global indices, merged over ranks
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._io import atomic_path
from .covariance import distributed_ready as is_distributed
from .data.base import SampleDataset
from .errors import SpecError
from .result import top_rows  # one definition, beside DiffCovariance

__all__ = [
    "torchrun_env",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "shard_range",
    "ShardDataset",
    "extract_sharded",
    "RowConcat",
    "broadcast_object",
    "all_gather_object",
    "fit_on_main",
    "agree",
    "collective_timeout_s",
    "all_reduce_state",
    "all_gather_topk",
    "all_gather_with_grad",
    "wrap_ddp",
    "all_reduce_mean",
    "is_follower",
    "share_config",
    "run_on_main",
    "write_on_main",
]

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------ process group
def torchrun_env() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun's environment variables, or None outside torchrun."""
    if not all(k in os.environ for k in _TORCHRUN_KEYS):
        return None
    try:
        return {k.lower(): int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    except ValueError:
        raise SpecError(
            "RANK/WORLD_SIZE/LOCAL_RANK: expected integers from torchrun, got "
            + ", ".join(f"{k}={os.environ.get(k)!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        ) from None


#: collective timeout of the default process group (seconds): how long a rank waits in a collective that
#: another rank never reaches. Checks that can fail on one rank are agreed on by every rank first (:func:`agree`),
#: so a failed library call raises at once; this bounds what is left (a rank that crashes hard). Environment
#: variable ``SPEC_TORCH_DIST_TIMEOUT_S`` overrides it.
DEFAULT_TIMEOUT_S = 1800.0
#: how long ranks wait for each other's feature extraction in :func:`extract_sharded` (seconds; a rerun's
#: other ranks reuse their finished caches at once and wait for the rank that resumes its block). On a side
#: Gloo group of its own, so the short collective timeout above does not cut a long extraction. Environment
#: variable ``SPEC_TORCH_EXTRACT_WAIT_S`` overrides it.
EXTRACT_WAIT_S = 24 * 3600.0


def _seconds(env_key: str, default: float) -> float:
    value = os.environ.get(env_key)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SpecError(f"{env_key}: expected a positive number of seconds, got {value!r}")
    return seconds


def collective_timeout_s() -> float:
    """The collective timeout :func:`init_distributed` uses by default (``SPEC_TORCH_DIST_TIMEOUT_S`` or 1800)."""
    return _seconds("SPEC_TORCH_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Start the default process group from torchrun's environment; True when one is initialised.

    A no-op returning False outside torchrun, and returning True when a group already exists. The backend
    defaults to NCCL when CUDA is available (each process takes the GPU ``LOCAL_RANK``) and Gloo otherwise.
    ``timeout_s``: the collective timeout; default :func:`collective_timeout_s` (30 minutes, or the
    environment variable ``SPEC_TORCH_DIST_TIMEOUT_S``).
    """
    if timeout_s is None:
        timeout_s = collective_timeout_s()
    elif isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise SpecError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    if dist.is_available() and dist.is_initialized():
        return True
    env = torchrun_env()
    if env is None:
        return False
    if not dist.is_available():
        raise SpecError("torchrun: this PyTorch build has no torch.distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if env["local_rank"] >= torch.cuda.device_count():
            raise SpecError(
                f"LOCAL_RANK: rank {env['rank']} wants GPU {env['local_rank']} but only "
                f"{torch.cuda.device_count()} are visible; use --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(env["local_rank"])
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def destroy_distributed() -> None:
    """Tear the default process group down (when one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


# ----------------------------------------------------------------------------------------- sharding
def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Rank ``rank``'s contiguous block of ``range(n)``; blocks differ in size by at most one.

    The blocks of ranks ``0..world_size-1`` tile ``range(n)`` in order: no sample is dropped or repeated.

    >>> [list(shard_range(5, r, 2)) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    for name, value, low in (("n", n, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise SpecError(f"{name}: expected an integer >= {low}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise SpecError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class ShardDataset(SampleDataset):
    """Samples ``rows`` (a contiguous ``range``) of a :class:`~spec_torch.data.SampleDataset`, as a dataset.

    Its fingerprint is the parent's plus the block, so each rank's features go to a cache folder of their
    own, which a rerun with the same world size resumes.
    """

    def __init__(self, dataset: SampleDataset, rows: range) -> None:
        if not isinstance(dataset, SampleDataset):
            raise SpecError(
                f"dataset: expected a spec_torch.data.SampleDataset, got {type(dataset).__name__}"
            )
        if not isinstance(rows, range) or rows.step != 1 or rows.start < 0 or rows.stop > len(dataset):
            raise SpecError(f"rows: expected a contiguous range inside [0, {len(dataset)}], got {rows!r}")
        super().__init__()
        self.name, self.modality = dataset.name, dataset.modality
        self.parent, self.rows = dataset, rows
        self._ids = dataset.ids[rows.start : rows.stop]

    def load(self, i: int) -> Any:
        return self.parent.load(self.rows.start + i)

    def display(self, i: int) -> Any:
        return self.parent.display(self.rows.start + i)

    def settings(self) -> dict[str, Any]:
        return {**self.parent.settings(), "shard": [self.rows.start, self.rows.stop, len(self.parent)]}

    def fingerprint(self) -> str:
        text = f"{self.parent.fingerprint()}|shard {self.rows.start}:{self.rows.stop}/{len(self.parent)}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def __repr__(self) -> str:
        return f"ShardDataset({self.parent!r}, rows={self.rows.start}:{self.rows.stop})"


def extract_sharded(dataset: SampleDataset, encoder: Any, cache_dir: Any, **kwargs: Any) -> Any:
    """:func:`~spec_torch.extract.extract_features`, split over the ranks of torch.distributed.

    Each rank embeds its contiguous block (:func:`shard_range`) of ``dataset`` into a cache folder of its own
    (a rerun with the same world size resumes every folder where it stopped), then every rank opens all
    blocks' caches as one :class:`~spec_torch.extract.FeatureCache` in dataset order (features: a
    :class:`RowConcat` of the blocks' memory maps). ``cache_dir`` must be visible to every rank (one node, or
    a shared file system). Without a process group of several ranks: plain ``extract_features``. An error on
    one rank is raised on every rank. ``kwargs`` go to ``extract_features`` (the progress bar: rank 0's only).
    """
    from .extract import FeatureCache, extract_features

    if not is_distributed():
        return extract_features(dataset, encoder, cache_dir, **kwargs)
    shard = ShardDataset(dataset, shard_range(len(dataset)))
    kwargs["progress"] = kwargs.get("progress", True) and is_main_process()
    mine, error = None, None
    try:
        mine = extract_features(shard, encoder, cache_dir, **kwargs) if len(shard) else None
    except Exception as exc:  # told to every rank below, so that none waits for the others forever
        failed = exc
        error = f"{type(exc).__name__}: {exc}"
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(
        reports, (str(mine.path) if mine is not None else None, error), group=_wait_group()
    )
    if error is not None:
        raise failed
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(reports) if e is not None]
    if errors:
        raise SpecError(f"cache_dir: feature extraction failed on another rank: {'; '.join(errors)}")
    # every block, in rank order; each was verified against its checksums by the rank that extracted it
    parts = [FeatureCache.load(p, verify=False) for p, _ in reports if p is not None]
    return FeatureCache(
        path=parts[0].path,
        ids=[i for c in parts for i in c.ids],
        skipped=[i for c in parts for i in c.skipped],
        features=RowConcat([c.features for c in parts]),  # [n, d], read block by block
        meta={**parts[0].meta, "n": sum(c.n for c in parts), "shards": [str(c.path) for c in parts]},
    )


_WAIT_GROUP: Any = None


def _wait_group() -> Any:
    """A Gloo group over every rank with the long :data:`EXTRACT_WAIT_S` timeout (made once, by all ranks)."""
    global _WAIT_GROUP
    if _WAIT_GROUP is None or _WAIT_GROUP[0] is not dist.group.WORLD:
        wait = datetime.timedelta(seconds=_seconds("SPEC_TORCH_EXTRACT_WAIT_S", EXTRACT_WAIT_S))
        _WAIT_GROUP = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=wait))
    return _WAIT_GROUP[1]


class RowConcat:
    """Row blocks ``[n_r, d]`` of several arrays (e.g. per-rank ``np.memmap`` caches) read as one ``[N, d]``.

    Supports ``len``, ``shape``, ``a[i:j]`` (a contiguous slice, ``step`` 1) and ``a[rows]`` with an integer
    array; both return a numpy array and read only the rows asked for.
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise SpecError("parts: expected at least one array")
        dims = {tuple(p.shape[1:]) for p in parts}
        if len(dims) != 1:
            raise SpecError(f"parts: expected arrays with the same row shape, got {sorted(dims)}")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [int(p.shape[0]) for p in parts])  # [P + 1]
        self.shape = (int(self.starts[-1]), *dims.pop())
        self.dtype = np.result_type(*[np.dtype(p.dtype) for p in parts])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise SpecError(f"key: RowConcat supports slices with step 1, got {key!r}")
            return self[np.arange(start, stop)]
        rows = np.asarray(key, dtype=np.int64)
        if rows.ndim != 1:
            raise SpecError(f"key: expected a slice or a 1-D array of row indices, got shape {rows.shape}")
        if rows.size and (rows.min() < -self.shape[0] or rows.max() >= self.shape[0]):
            raise SpecError(
                f"key: row indices must lie in [0, {self.shape[0]}), got {rows.min()}..{rows.max()}"
            )
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        out = np.empty((rows.size, *self.shape[1:]), dtype=self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1  # [m] block of each row
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            local = rows[sel] - self.starts[p]
            lo, hi = int(local.min()), int(local.max())
            if hi - lo + 1 == local.size and np.all(np.diff(local) == 1):
                out[sel] = self.parts[p][lo : hi + 1]  # one sequential read
            else:
                out[sel] = self.parts[p][local]
        return out


# -------------------------------------------------------------------------------------- collectives
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
    """all_gather of equal-shape row blocks; backward: the summed gradient of this rank's block."""

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


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under a process group of more than one rank, else ``module``.

    One device per process: ``device_ids=[device]`` on CUDA, none on the CPU (Gloo). DDP averages the
    gradients over ranks; losses that gather rows with their gradient (SpecAlignLoss, open_clip's ClipLoss
    with ``gather_with_grad``, :func:`all_gather_with_grad`) give each rank ``world_size`` times its rows'
    gradient, so the average is the gradient of one process over the global batch.
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(module, device_ids=[index])
    return DistributedDataParallel(module)


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


# ------------------------------------------------------------------------------------------- output
def is_follower() -> bool:
    """True in a torchrun process of rank > 0 (before or after the process group starts)."""
    env = torchrun_env()
    return env is not None and env["rank"] != 0


def share_config(cfg: Any = None) -> Any:
    """Hydra under torchrun: rank 0 composes the config, every other rank receives it.

    Call it on rank 0 inside the ``@hydra.main`` function with the composed ``cfg``, and on the other ranks
    (:func:`is_follower`) *instead of* the Hydra entry point, with no argument: so only rank 0 makes the run
    directory, its ``.hydra/`` record and the log file, and every rank gets the same settings, with
    ``output_dir`` set to rank 0's run directory and every interpolation resolved there. Starts the process
    group (:func:`init_distributed`). Outside torchrun it returns ``cfg`` unchanged.
    """
    from omegaconf import OmegaConf

    if not init_distributed():
        return cfg
    if is_main_process():
        if cfg is None:
            raise SpecError("cfg: rank 0 must pass the composed Hydra config to share_config")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if "output_dir" in resolved and resolved["output_dir"] is None:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                resolved["output_dir"] = HydraConfig.get().runtime.output_dir
    else:
        resolved = None
    return OmegaConf.create(broadcast_object(resolved))


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


def write_on_main(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` on rank 0 only, atomically; every rank returns once it is in place.

    ``write(tmp)`` writes the content to the temporary path ``tmp`` (same folder, so the rename is atomic);
    then ``tmp`` is renamed to ``path``: a reader never sees a half-written file. Rank 0 then tells every
    rank whether it worked (:func:`run_on_main`): an error on rank 0 is raised on every rank, so no rank
    waits forever at a barrier or goes on without the file.
    """
    path = Path(path)

    def _write() -> None:
        with atomic_path(path) as tmp:
            write(tmp)

    run_on_main(_write)
    return path
