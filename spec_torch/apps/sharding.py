"""The pipelines under ``torchrun`` (DDP), one process per device: process group, shards, rank-0 output.

The collectives the library itself needs (rank queries, reductions, gathers) live in
:mod:`spec_torch.collectives`; they are re-exported here so a pipeline imports one module.

- Process group: :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts NCCL on CUDA, Gloo on CPU;
  :func:`get_rank`, :func:`get_world_size`, :func:`is_main_process` work with or without a group.
- Hydra: :func:`share_config` lets rank 0 alone run Hydra (run folder, ``.hydra/``, log file) and sends its
  composed config to the other ranks (:func:`is_follower`), which skip Hydra.
- Sharding: :func:`shard_range` splits ``n`` samples into contiguous blocks, one per rank, in rank order:
  every sample on exactly one rank, none dropped, none repeated (``DistributedSampler`` pads instead), so
  rank ``r``'s local row ``i`` is global row ``shard_range(n, r).start + i``. :class:`ShardDataset` is
  such a block of a :class:`~spec_torch.apps.data.SampleDataset` with its own fingerprint (its own feature cache);
  :func:`extract_sharded` extracts features block by block and reads them back as one cache
  (:class:`RowConcat`: the row blocks of several memory-mapped arrays read as one ``[sum n_r, d]`` array).
- Training: :func:`wrap_ddp` (DistributedDataParallel, one device per process).
- Output: :func:`run_on_main` / :func:`write_on_main` run on rank 0 only (a file: atomically, temp name then
  rename) and raise rank 0's error on every rank, so no rank waits forever or goes on after a failed write.

Every function that communicates must be called by all ranks, in the same order.

Example (``torchrun --nproc_per_node=2 script.py``)::

    from spec_torch.apps import sharding as sd
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

from ..collectives import (  # the library's collectives, re-exported for the pipelines
    agree,
    all_gather_object,
    all_gather_topk,
    all_gather_with_grad,
    all_reduce_mean,
    all_reduce_state,
    barrier,
    broadcast_object,
    fit_on_main,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
    run_on_main,
)
from ..errors import SpecError
from ._io import atomic_path
from .data.base import SampleDataset

__all__ = [
    "torchrun_env",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "my_block",
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


# ----------------------------------------------------------------------------------------- sharding
def my_block(n: int, what: str) -> range:
    """The rows of ``range(n)`` this process streams: all of them, or under torchrun this rank's contiguous
    block (:func:`shard_range`). ``n`` must be the same on every rank: with fewer rows than ranks every rank
    raises the same :class:`SpecError` (``what`` names the rows, e.g. ``"paired samples"``)."""
    if not is_distributed():
        return range(n)
    if n < get_world_size():
        raise SpecError(
            f"data: {n} {what} cannot be split over {get_world_size()} ranks; use fewer processes (--nproc_per_node)"
        )
    return shard_range(n)


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
    """Samples ``rows`` (a contiguous ``range``) of a :class:`~spec_torch.apps.data.SampleDataset`, as a dataset.

    Its fingerprint is the parent's plus the block, so each rank's features go to a cache folder of their
    own, which a rerun with the same world size resumes.
    """

    def __init__(self, dataset: SampleDataset, rows: range) -> None:
        if not isinstance(dataset, SampleDataset):
            raise SpecError(
                f"dataset: expected a spec_torch.apps.data.SampleDataset, got {type(dataset).__name__}"
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
    """:func:`~spec_torch.apps.extract.extract_features`, split over the ranks of torch.distributed.

    Each rank embeds its contiguous block (:func:`shard_range`) of ``dataset`` into a cache folder of its own
    (a rerun with the same world size resumes every folder where it stopped), then every rank opens all
    blocks' caches as one :class:`~spec_torch.apps.extract.FeatureCache` in dataset order (features: a
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
    array; both return a numpy array and read only the rows asked for. ``a[:, i:j]`` (all rows, a column
    slice) reads nothing: it is the RowConcat of the parts' column views (a layered cache split into layers).
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

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            if len(key) != 2 or key[0] != slice(None) or not isinstance(key[1], slice):
                raise SpecError(f"key: RowConcat supports a[:, i:j] as a 2-D key, got {key!r}")
            return RowConcat([p[:, key[1]] for p in self.parts])  # [N, j - i], lazy on memmaps
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


# ----------------------------------------------------------------------------------------- training
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
