"""The compare pipeline: two encoders, one dataset, one SPEC comparison, one run directory.

``run(cfg)`` is what ``spec-torch compare`` calls with the composed Hydra config (``configs/compare/compare.yaml``):

1. check that the output directory is writable (before any work) and remove the outputs an earlier run
   there listed in its manifest (``spec_torch.apps._io``: never a file spec-torch did not write);
2. build the dataset and both encoders, extract and cache features for each (``data=features`` instead
   loads precomputed arrays), and pair the cached rows by sample id: a sample skipped as corrupt by either
   encoder is dropped from both;
3. stream the cached rows through :class:`~spec_torch.DiffCovariance` (and the linear CKA sums) batch by
   batch, never holding all features in memory, and solve;
4. a second streaming pass for the top samples of the strongest modes of each sign;
5. per-mode metrics (tightness under each kernel, KMeans agreement, label composition, purity on planted
   attributes) and mutual k-NN overlap on a subsample;
6. explain: where the data has texts (``data.names_path``, text lines, COCO captions), each reported mode's
   distinctive words (:mod:`spec_torch.apps.explain`), one more scoring pass over every row;
7. the words for every view (:func:`_flags_and_summary`): each mode's ``flags`` and the ``summary``; when
   the strongest mode is uniform, the centred SPEC-diff beside it (``spec_diff_centred``, from step 3's sums);
8. plots and ``report.html``, then ``spec.json`` written atomically, last: a run directory with a
   ``spec.json`` is a finished run.

Bad input raises :class:`~spec_torch.errors.SpecError` with a message naming the setting.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import api
from .._validate import resolve_device
from ..covariance import DiffCovariance
from ..errors import SpecError
from ..kernels import resolve_kernel
from . import sharding as distributed
from ._io import atomic_write_json, prepare_output_dir
from .cli import check_required
from .config import ACCUMULATE_DTYPES, check_run_settings, for_setting, instantiate_target, load_config
from .logs import phase, quiet_third_party

__all__ = ["run"]

log = logging.getLogger(__name__)

SPEC_JSON = "spec.json"


# --------------------------------------------------------------------------------------- paired features
@dataclass
class PairedFeatures:
    """Row-paired embeddings of the same samples, read batch by batch from (memory-mapped) arrays.

    Paired row ``i`` is ``x[rows_x[i]]`` and ``y[rows_y[i]]`` (``rows_* = None``: the identity).
    """

    x: Any  # [Nx, p] np.memmap / np.ndarray / torch.Tensor
    y: Any  # [Ny, q]
    ids: list[str]  # [n] sample id of each paired row
    rows_x: np.ndarray | None = None  # [n] row of x for each paired row
    rows_y: np.ndarray | None = None  # [n]
    skipped: list[str] = field(default_factory=list)  # ids dropped (corrupt under either encoder)
    dataset_index: np.ndarray | None = None  # [n] dataset position of each paired row (labels, display)
    labels: list[str] | None = None  # [n] label of each paired row (data=features: data.labels_path)
    names: list[str] | None = None  # [n] display name of each paired row (data=features: data.names_path)

    @property
    def n(self) -> int:
        return len(self.ids)

    def gather(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (paired positions) of both embeddings: ``([m, p], [m, q])`` float32."""
        idx = np.asarray(idx, dtype=np.int64)
        rx = idx if self.rows_x is None else self.rows_x[idx]
        ry = idx if self.rows_y is None else self.rows_y[idx]
        return _take(self.x, rx), _take(self.y, ry)

    def batches(
        self, batch_size: int, rows: range | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(xb [B, p], yb [B, q])`` in paired order; only one batch is in memory at a time.

        ``rows``: a contiguous block of paired rows (a rank's shard under torchrun); default all rows.
        """
        rows = range(self.n) if rows is None else rows
        for start in range(rows.start, rows.stop, batch_size):
            yield self.gather(np.arange(start, min(start + batch_size, rows.stop)))


def _take(array: Any, rows: np.ndarray) -> torch.Tensor:
    """``array[rows]`` as a float32 CPU tensor; contiguous row ranges are read as one slice."""
    if rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1):
        part = array[int(rows[0]) : int(rows[-1]) + 1]
    else:
        part = array[torch.from_numpy(rows)] if isinstance(array, torch.Tensor) else array[rows]
    if isinstance(part, torch.Tensor):
        return part.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.array(part, dtype=np.float32, copy=True))


def pair_by_id(ids_x: Sequence[str], ids_y: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows of x and y holding the same sample id, in x's order, and the ids present in only one side."""
    pos_y = {sid: j for j, sid in enumerate(ids_y)}
    rows_x = [i for i, sid in enumerate(ids_x) if sid in pos_y]
    rows_y = [pos_y[ids_x[i]] for i in rows_x]
    only_one = sorted(set(ids_x).symmetric_difference(pos_y))
    return np.asarray(rows_x, dtype=np.int64), np.asarray(rows_y, dtype=np.int64), only_one


# ------------------------------------------------------------------------------------------- settings
def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _check_settings(cfg: DictConfig) -> None:
    check_required(cfg)
    check_run_settings(cfg, positive=("top_k", "samples_per_mode", "batch_size", "stream_batch_size"))
    if not isinstance(cfg.get("center", False), bool):
        raise SpecError(f"center: expected true or false, got {cfg.center!r}")
    if cfg.get("method", "auto") not in ("auto", "features", "exact"):
        raise SpecError(f"method: expected 'auto', 'features' or 'exact', got {cfg.method!r}")
    if cfg.get("approx_error", "auto") != "auto" and not isinstance(cfg.get("approx_error"), bool):
        raise SpecError(f"approx_error: expected auto, true or false, got {cfg.approx_error!r}")
    keywords_config(cfg)


def keywords_config(cfg: DictConfig) -> dict[str, Any]:
    """The checked ``explain.keywords`` settings (:func:`spec_torch.apps.explain.keyword_settings`); the
    compare and matrix jobs both read them."""
    from .explain import keyword_settings as check

    explain = _container(cfg.get("explain")) or {}
    if not isinstance(explain, dict):
        raise SpecError(f"explain: expected a mapping with 'keywords', got {explain!r}")
    return check(explain.get("keywords"), name="explain.keywords")


# ------------------------------------------------------------------------------------- loading inputs
def _load_precomputed(data_cfg: dict[str, Any]) -> tuple[PairedFeatures, dict[str, Any]]:
    from .data import load_feature_pair

    for key in ("x_path", "y_path"):
        if not data_cfg.get(key):
            raise SpecError(f"data.{key}: required with data=features (a .npy/.npz/.pt/.safetensors file)")
        if not Path(str(data_cfg[key])).expanduser().is_file():
            raise SpecError(f"data.{key}: no such file: {data_cfg[key]}")
    from .data import load_ids

    ids_path = data_cfg.get("ids_path")
    for key in ("ids_path", "labels_path", "names_path"):
        if data_cfg.get(key) and not Path(str(data_cfg[key])).expanduser().is_file():
            raise SpecError(f"data.{key}: no such file: {data_cfg[key]}")
    x, y, ids = load_feature_pair(
        data_cfg["x_path"],
        data_cfg["y_path"],
        ids_path,
        x_key=data_cfg.get("x_key"),
        y_key=data_cfg.get("y_key"),
    )
    if len(x.shape) != 2 or len(y.shape) != 2:
        raise SpecError(f"data.x_path/y_path: expected 2-D arrays [N, D], got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise SpecError(
            f"data.x_path/y_path: expected the same samples in the same order, got {x.shape[0]} rows in "
            f"{data_cfg['x_path']} and {y.shape[0]} rows in {data_cfg['y_path']}"
        )
    ids = [f"row:{i}" for i in range(x.shape[0])] if ids is None else [str(s) for s in ids]
    if len(ids) != x.shape[0]:
        raise SpecError(f"data.ids_path: expected {x.shape[0]} ids (one per row), got {len(ids)}")
    per_row = {}  # labels and display names: one per row, repeats allowed
    for key in ("labels", "names"):
        path = data_cfg.get(f"{key}_path")
        if path:
            values = load_ids(path, f"data.{key}_path", unique=False)
            if len(values) != x.shape[0]:
                raise SpecError(
                    f"data.{key}_path: expected {x.shape[0]} {key} (one per row), got {len(values)}"
                )
            per_row[key] = values
    info = {
        "name": "features",
        "x_path": str(data_cfg["x_path"]),
        "y_path": str(data_cfg["y_path"]),
        "ids_path": str(ids_path) if ids_path else None,
        **{f"{k}_path": str(data_cfg[f"{k}_path"]) for k in per_row},
        "dims": [int(x.shape[1]), int(y.shape[1])],
    }
    return PairedFeatures(x=x, y=y, ids=ids, **per_row), info


def _build_encoder(enc_cfg: dict[str, Any], which: str):
    from .encoders import Encoder, build_encoder

    if "_target_" in enc_cfg:  # a user's own Encoder class, named by Hydra's _target_
        enc = instantiate_target(enc_cfg, which)
        if not isinstance(enc, Encoder):
            raise SpecError(
                f"{which}._target_: expected a spec_torch.apps.encoders.Encoder, got {type(enc).__name__}"
            )
        return enc
    kwargs = dict(enc_cfg)
    family = kwargs.pop("family", None)
    if not family:
        raise SpecError(f"{which}.family: expected an encoder family (e.g. open_clip, timm, minilm)")
    try:
        return build_encoder(family, **kwargs)
    except (
        SpecError
    ) as exc:  # "encoder.model: ... encoder.checkpoint=" -> "encoder_x.model: ... encoder_x.checkpoint="
        msg = for_setting(str(exc), which)
        raise SpecError(msg if msg.startswith(which) else f"{which}: {msg}") from None
    except (RuntimeError, KeyError, TypeError, OSError) as exc:  # a library's own "unknown model" etc.
        model = kwargs.get("model", family)
        raise SpecError(f"{which}: could not build the {family} encoder {model!r}: {exc}") from None


def _extract_pair(cfg: DictConfig, device: torch.device):
    """Dataset + both encoders -> cached features, paired by sample id."""
    from .data import dataset_from_config
    from .extract import extraction_settings

    data_cfg = dict(_container(cfg.data))
    dataset = dataset_from_config(data_cfg)
    name = data_cfg.pop("name")
    encoders = {w: _build_encoder(_container(cfg[f"encoder_{w}"]), f"encoder_{w}") for w in ("x", "y")}
    for w, enc in encoders.items():
        if enc.modality != dataset.modality:
            raise SpecError(
                f"encoder_{w}: a {enc.modality} encoder cannot embed the {dataset.modality} samples of data={name}"
            )
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    caches, enc_info = {}, {}
    for w in ("x", "y"):  # one encoder on the device at a time; both were built first, so both fail fast
        enc = encoders.pop(w)
        caches[w] = distributed.extract_sharded(  # extract_features; under torchrun each rank its block
            dataset, enc, cache_dir, **extraction_settings(cfg, device)
        )
        enc_info[w] = {**_container(cfg[f"encoder_{w}"]), **enc.describe(), "cache_key": enc.cache_key()}
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cx, cy = caches["x"], caches["y"]
    rows_x, rows_y, only_one = pair_by_id(cx.ids, cy.ids)
    skipped = sorted(set(cx.skipped) | set(cy.skipped) | set(only_one))
    if rows_x.size < 2:
        raise SpecError(f"data: only {rows_x.size} readable sample(s) left after skipping {len(skipped)}")
    pos = {dataset.sample_id(i): i for i in range(len(dataset))}
    ids = [cx.ids[i] for i in rows_x]
    paired = PairedFeatures(
        x=cx.features,
        y=cy.features,
        ids=ids,
        rows_x=rows_x,
        rows_y=rows_y,
        skipped=skipped,
        dataset_index=np.asarray([pos[s] for s in ids], dtype=np.int64),
    )
    info = {
        "name": name,
        **data_cfg,
        "modality": dataset.modality,
        "size": len(dataset),
        "fingerprint": dataset.fingerprint(),
    }
    return paired, dataset, info, enc_info


# ------------------------------------------------------------------------------------------- the solve
#: rows the data-dependent kernel settings (sigma="auto") are fitted on: a seeded random subset, not the first
#: batch, which in a class-sorted folder holds one class only (the library's st.spec number)
FIT_ROWS = api.FIT_ROWS


def _kernel(cfg: DictConfig, which: str):
    """The ``kernel_x``/``kernel_y`` setting as a Kernel (a name, settings, or a user class via ``_target_``)."""
    return resolve_kernel(instantiate_target(_container(cfg[which]), which), which)


def fit_sample_rows(n: int, seed: int, kernels: Sequence[Any]) -> np.ndarray:
    """The rows data-dependent kernels are fitted on, sorted: a seeded random subset of at most ``FIT_ROWS``
    of ``range(n)`` (more when a Nystrom kernel among ``kernels`` needs more for its landmarks); all rows
    when there are no more. The compare and matrix jobs both fit on these."""
    size = max([FIT_ROWS] + [k.fit_rows for k in kernels])  # Nystrom: >= its landmarks
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _fit_sample(cfg: DictConfig, paired: PairedFeatures, *kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' rows of :func:`fit_sample_rows`: ``([m, p], [m, q])``."""
    return paired.gather(fit_sample_rows(paired.n, int(cfg.seed), kernels))


def _fit_kernels(cfg: DictConfig, paired: PairedFeatures, route: str = "exact"):
    """Both kernels resolved for ``route`` (``rff_dim: auto``) and fitted on :func:`_fit_sample`."""
    kx = _kernel(cfg, "kernel_x").for_route(route)
    ky = _kernel(cfg, "kernel_y").for_route(route)
    if kx.is_fitted and ky.is_fitted:
        return kx, ky
    xs, ys = _fit_sample(cfg, paired, kx, ky)
    return kx.fit(xs), ky.fit(ys)


def _stream_batch(cfg: DictConfig) -> int:
    """Rows per batch when streaming cached features (larger than the extraction batch: one GEMM each)."""
    return int(cfg.get("stream_batch_size") or cfg.batch_size)


def _solve(
    cfg: DictConfig, paired: PairedFeatures, device: torch.device, timings: dict[str, float] | None = None
):
    """Stream every paired batch through the accumulator and the CKA sums; solve.
    -> (SpecResult, cka, spec.json ``spec_diff_centred`` or None: :func:`_centred_spec_diff`).

    With ``uncertainty`` on (see :func:`_uncertainty_plan`) the accumulator keeps group sums, each sample's
    group hashed from its dataset row, and the result gets intervals, held-out eigenvalues and stability.
    ``timings``: receives the wall-clock seconds of the solve (``solve_s``), for spec.json ``timings`` only.
    """
    timings = {} if timings is None else timings
    from .report import metrics

    cka = metrics.LinearCKA()
    solve_top_k = cfg.get("solve_top_k")
    center = bool(cfg.get("center", False))
    dtype = ACCUMULATE_DTYPES[cfg.get("accumulate_dtype", "float64")]
    # one route choice for library and pipeline: the cheaper in multiply-adds; the rows are at hand unless
    # they are sharded over torchrun ranks
    at_hand = not distributed.is_distributed()
    p, q = int(paired.x.shape[1]), int(paired.y.shape[1])
    kx0, ky0 = _kernel(cfg, "kernel_x"), _kernel(cfg, "kernel_y")
    route = api.choose_route(cfg.get("method", "auto"), paired.n, p, q, kx0, ky0, rows_at_hand=at_hand)
    kx, ky = kx0.for_route(route), ky0.for_route(route)  # rff_dim: auto -> exact, or AUTO_RFF_DIM features
    d = kx.feature_dim(p) + ky.feature_dim(q) if route == "features" else None
    if route == "exact" or (at_hand and d > paired.n):
        res, centred = _solve_rows(cfg, paired, device, kx, ky, route, cka)
        return res, cka.compute(), centred
    plan = _uncertainty_plan(cfg, kx, ky, paired, device)
    acc = DiffCovariance(
        kx, ky, accumulate_dtype=dtype, device=device, groups=plan["groups"] or None, group_seed=int(cfg.seed)
    )
    if not (kx.is_fitted and ky.is_fitted):
        acc.fit(
            *_fit_sample(cfg, paired, kx, ky)
        )  # sigma="auto" from a seeded sample of all rows, not a batch
    mine = _my_rows(paired)  # torchrun: this rank's block
    start = mine.start
    for (xb, yb), idx in zip(
        paired.batches(_stream_batch(cfg), rows=mine), _batch_rows(paired, _stream_batch(cfg), mine)
    ):
        xb, yb = xb.to(device), yb.to(device)  # [B, p], [B, q]
        with _sample_ids(paired, start):  # "row 3" of a batch -> the sample id
            acc.update(xb, yb, index=idx)  # idx: dataset rows, the groups' hash key (ignored without groups)
        cka.update(xb, yb)
        start += xb.shape[0]
    if distributed.is_distributed():  # the CKA sums of every rank (compute() all-reduces the covariance)
        cka.load_state_dict(distributed.all_reduce_state(cka.state_dict()))
    t_solve = time.perf_counter()
    with _named("top_k", "solve_top_k"):
        if plan["groups"]:  # the solve with the planned replicates (their R and G chosen from sizes)
            res = _with_uncertainty(cfg, acc, plan)
        else:
            res = acc.compute(eta=float(cfg.eta), top_k=solve_top_k, center=center)
            res.uncertainty = plan
    timings["solve_s"] = time.perf_counter() - t_solve
    unresolved, _ = api.unresolved_modes(res)
    if unresolved and at_hand and cfg.get("method", "auto") == "auto" and paired.n <= api.RESOLVE_MAX_N:
        # the D x D solve cannot resolve these modes; the n x n matrix differences the kernels entrywise first
        log.info("%d modes below the features route's resolution: re-solving on the exact route", unresolved)
        reason = api.re_solve_reason(res)
        res, centred = _solve_rows(cfg, paired, device, acc.kernel_x, acc.kernel_y, "exact")
        res.re_solve = reason
        return res, cka.compute(), centred
    centred = _centred_spec_diff(
        cfg,
        res,
        lambda: acc.compute(eta=float(cfg.eta), top_k=solve_top_k, center=True, reference=False),
        "from the same streamed sums: DiffCovariance.compute(center=True), centring needs only the feature means",
    )
    return res, cka.compute(), centred


def _solve_rows(cfg: DictConfig, paired: PairedFeatures, device, kx, ky, route: str, cka=None):
    """The n x n route (exact kernels, or the features route's dual when D > n) on all rows at once; st.spec
    checks memory. -> (SpecResult, spec.json ``spec_diff_centred`` or None). ``cka``: the CKA sums to add
    the rows to (None: already added)."""
    center = bool(cfg.get("center", False))
    solve_top_k = cfg.get("solve_top_k")
    if not (kx.is_fitted and ky.is_fitted):
        kx, ky = _fit_kernels(cfg, paired, route)
    x, y = (t.to(device) for t in paired.gather(np.arange(paired.n)))  # [n, p], [n, q]
    if cka is not None:
        cka.update(x, y)
    plan = _uncertainty_plan(cfg, kx, ky, paired, device, exact=True)
    replicates = {}
    if plan["groups"]:  # intervals from an exact factor of L (spec_torch.factor_intervals)
        replicates = {
            "replicates": int(plan["replicates"]),
            "groups": int(plan["groups"]),
            "level": plan["level"],
            "interval": plan["interval"],
            "seed": int(cfg.seed),
        }
    with _named("top_k", "solve_top_k"), _sample_ids(paired, 0):
        res = api.spec(
            x,
            y,
            kernel_x=kx,
            kernel_y=ky,
            eta=float(cfg.eta),
            method=route,
            top_k=solve_top_k,
            center=center,
            **replicates,
        )
    res.uncertainty = {
        **plan,
        **(res.uncertainty or {}),
        "enabled": bool(replicates),
        "note": plan["note"],
    }
    centred = _centred_spec_diff(
        cfg,
        res,
        lambda: api.spec(x, y, kx, ky, eta=float(cfg.eta), method=route, top_k=solve_top_k, center=True,
                         reference=False),
        f"a second solve on the {res.method} route",
    )  # fmt: skip
    return res, centred


def _centred_spec_diff(cfg: DictConfig, res, solve_centred, how: str) -> dict[str, Any] | None:
    """spec.json ``spec_diff_centred`` when the strongest mode is uniform (uniformity above
    ``UNIFORM_THRESHOLD``) and the kernels were not centred: SPEC-diff with both kernels centred, which the
    summary gives beside the uniform one and says to read. ``solve_centred()`` solves with ``center=True`` (the
    features route from the same sums, the n x n routes a second solve); ``how`` records which. Else None."""
    from ..result import UNIFORM_THRESHOLD

    if bool(cfg.get("center", False)) or res.eigenvalues.numel() == 0:
        return None
    lead = int(res.eigenvalues.abs().argmax())
    if not float(res.uniformity[lead]) > UNIFORM_THRESHOLD:
        return None
    with _named("top_k", "solve_top_k"):
        centred = solve_centred()
    lam = centred.eigenvalues
    return {
        "value": float(centred.spec_diff),
        "top_eigenvalue_x": float(lam.max()) if lam.numel() and float(lam.max()) > 0 else None,
        "top_eigenvalue_y": float(lam.min()) if lam.numel() and float(lam.min()) < 0 else None,
        "method": centred.method,
        "how": how,
    }


@contextmanager
def _named(arg: str, key: str) -> Iterator[None]:
    """A library error about argument ``arg`` renamed after the config key ``key`` that set it."""
    try:
        yield
    except SpecError as exc:
        text = str(exc)
        if text.startswith(f"{arg}:"):
            raise SpecError(f"{key}:{text[len(arg) + 1 :]}") from None
        raise


@contextmanager
def _sample_ids(paired: PairedFeatures, start: int) -> Iterator[None]:
    """Errors naming a row of a streamed batch (``row 3``) name the sample instead."""
    try:
        yield
    except SpecError as exc:
        text = str(exc)
        match = re.search(r"\(first at row (\d+)\)", text)
        if match is None:
            raise
        row = start + int(match.group(1))
        raise SpecError(
            f"{text[: match.start()]}(first: sample {paired.ids[row]!r}, paired row {row}){text[match.end() :]}"
        ) from None


# ------------------------------------------------------------------------------------------ uncertainty
def _batch_rows(paired: PairedFeatures, batch_size: int, rows: range) -> Iterator[torch.Tensor]:
    """The sample index of every row of :meth:`PairedFeatures.batches`: dataset rows when known, else paired
    positions; ``[B]`` long per batch. The same sample has the same index on any rank and batch size."""
    for start in range(rows.start, rows.stop, batch_size):
        pos = np.arange(start, min(start + batch_size, rows.stop))
        idx = pos if paired.dataset_index is None else paired.dataset_index[pos]
        yield torch.from_numpy(np.asarray(idx, dtype=np.int64))


def _uncertainty_plan(cfg, kx, ky, paired: PairedFeatures, device, exact: bool = False) -> dict[str, Any]:
    """Resolve ``cfg.uncertainty`` before streaming: R and G (0 = off) from the problem's sizes, with the reason.

    Nothing here reads the clock or free memory: ``replicates: auto`` takes the most replicates whose modelled
    cost (FLOPs, :func:`spec_torch.uncertainty.plan_replicates`) is at most ``budget`` times the plain compare's,
    and G comes from n and D (:func:`~spec_torch.uncertainty.plan_groups`). Free memory is only checked: a
    shortfall is a :class:`SpecError`, never a different spec.json.
    """
    from .. import uncertainty as unc
    from .._validate import check_fits
    from ..uncertainty import DEFAULT_INTERVAL, INTERVALS

    ucfg = dict(_container(cfg.get("uncertainty")) or {})
    replicates = ucfg.get("replicates", "auto")
    level = ucfg.get("level", 0.9)
    budget = ucfg.get("budget", unc.DEFAULT_BUDGET)
    wanted = ucfg.get("groups", "auto")
    interval = ucfg.get("interval", DEFAULT_INTERVAL)
    if interval not in INTERVALS:
        raise SpecError(f"uncertainty.interval: expected one of {', '.join(INTERVALS)}, got {interval!r}")
    if ucfg.get("max_overhead") is not None:
        raise SpecError(
            "uncertainty.max_overhead: removed; it measured wall time, so spec.json depended on the machine's "
            "load. Use uncertainty.budget (default 1.0: the replicates may cost as much as the plain compare, "
            "in modelled FLOPs; docs/uncertainty.md)"
        )
    if replicates != "auto" and (
        isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 0
    ):
        raise SpecError(
            f"uncertainty.replicates: expected 'auto', 0 (off) or an integer >= 2, got {replicates!r}"
        )
    if replicates == 1:
        raise SpecError("uncertainty.replicates: expected 'auto', 0 (off) or an integer >= 2, got 1")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise SpecError(f"uncertainty.level: expected a number in (0, 1), got {level!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
        raise SpecError(f"uncertainty.budget: expected a finite number > 0, got {budget!r}")
    if wanted != "auto" and (isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 2):
        raise SpecError(f"uncertainty.groups: expected 'auto' or an integer >= 2, got {wanted!r}")
    plan = {
        "enabled": False,
        "replicates": replicates,
        "level": float(level),
        "interval": interval,
        "groups": 0,
        "budget": float(budget),
        "note": "",
    }
    if replicates == 0:
        plan["note"] = "off (uncertainty.replicates = 0)"
        return plan
    n = paired.n
    p, q = (int(paired.x.shape[1]), int(paired.y.shape[1]))
    if exact:  # the n x n route: replicates of an exact factor of L, rank r <= min(n, D) (factor_intervals)
        d = kx.feature_dim(p) + ky.feature_dim(q) if (kx.has_features and ky.has_features) else n
        dx, dy = min(n, d), 0  # the factor's width, at most r (its two signs' blocks cost no more than r^2)
    else:
        dx, dy = kx.feature_dim(p), ky.feature_dim(q)
    groups = unc.plan_groups(n, dx, dy, unc.DEFAULT_GROUPS if wanted == "auto" else int(wanted))
    if not groups:
        per = unc.group_bytes(1, dx, dy)
        plan["note"] = (
            f"off: too few samples (n = {n}) for {unc.MIN_GROUPS} groups of at least 4"
            if n // 4 < unc.MIN_GROUPS
            else f"off: {unc.MIN_GROUPS} group sums of D = {dx + dy} take {unc.MIN_GROUPS * per / 2**30:.1f} GiB, "
            f"more than the {unc.MAX_GROUP_BYTES / 2**30:.0f} GiB cap (spec_torch.uncertainty.MAX_GROUP_BYTES)"
        )
        return plan
    if exact:  # the plain n x n compare: both kernel matrices and one eigh of L
        plain = (
            float(n) * n * (kx.exact_dim(p) + ky.exact_dim(q))
            + unc.EIGH_FLOPS * float(n) ** 3
            + unc.JOB_FLOPS
        )
    else:
        plain = unc.compare_cost(n, dx, dy)
    per_solve = unc.replicate_solve_cost(dx, dy, groups)
    if replicates == "auto":
        replicates = unc.plan_replicates(n, dx, dy, groups, budget, plain=plain)
        if not replicates:
            need = unc.solves_needed(unc.MIN_REPLICATES) * per_solve
            plan["note"] = (
                f"off: {unc.MIN_REPLICATES} replicates of D = {dx + dy} would cost {need / 1e9:.3g} GFLOP, more "
                f"than budget {budget:g} x the plain compare's {plain / 1e9:.3g} GFLOP (modelled); set "
                "uncertainty.replicates or a larger uncertainty.budget to force them"
            )
            plan["cost_gflop"] = {"plain": plain / 1e9, "replicates_min": need / 1e9}
            return plan
        why = (
            f"the most (<= {unc.MAX_REPLICATES}) within budget {budget:g} x the plain compare's modelled cost"
        )
    else:
        why = "uncertainty.replicates"
    check_fits(
        unc.group_bytes(groups, dx, dy), device, f"{groups} group sums of D = {dx + dy}", "uncertainty.groups"
    )
    cost = unc.solves_needed(replicates) * per_solve
    where = " of an exact factor of L (the n x n route)" if exact else ""
    plan.update(
        replicates=int(replicates),
        groups=groups,
        cost_gflop={"plain": plain / 1e9, "replicates": cost / 1e9, "ratio": cost / plain},
        note=f"{replicates} bootstrap replicates over {groups} groups{where} ({why})",
    )
    return plan


def _with_uncertainty(cfg, acc: DiffCovariance, plan: dict[str, Any]):
    """The solve with the planned replicates: the result with intervals, its ``uncertainty`` the plan."""
    out = acc.compute(
        eta=float(cfg.eta),
        top_k=cfg.get("solve_top_k"),
        center=bool(cfg.get("center", False)),
        replicates=int(plan["replicates"]),
        level=plan["level"],
        seed=int(cfg.seed),
        interval=plan["interval"],
    )
    out.uncertainty = {**plan, **out.uncertainty, "enabled": True, "note": plan["note"]}
    return out


#: rows of the random-feature error estimate (its exact solve is m x m, so its cost is bounded whatever n is)
APPROX_ROWS = 1000


def _approx_error(cfg: DictConfig, res, paired: PairedFeatures) -> dict[str, Any] | None:
    """spec.json ``approximation``: :func:`~spec_torch.approx.rff_error_estimate` on a seeded subsample of
    at most ``APPROX_ROWS`` rows, when asked (``approx_error: true``) or, by default (``auto``), whenever a
    kernel uses random features. None when off."""
    from ..approx import rff_error_estimate, uses_random_features

    want = cfg.get("approx_error", "auto")
    uses = uses_random_features(res.kernel_x) or uses_random_features(res.kernel_y)
    if want is False or (want == "auto" and not uses):
        return None
    if not uses:
        raise SpecError("approx_error: true needs a kernel with random features (gaussian with rff_dim)")
    m = min(APPROX_ROWS, paired.n)
    rows = np.sort(np.random.default_rng(int(cfg.seed)).choice(paired.n, size=m, replace=False))
    xs, ys = paired.gather(rows)  # [m, p], [m, q]
    out = rff_error_estimate(xs, ys, res.kernel_x, res.kernel_y, eta=float(cfg.eta), subsample=m)
    return {**out, "n": paired.n}


def _my_rows(paired: PairedFeatures) -> range:
    """The paired rows this process streams: all of them, or under torchrun this rank's contiguous block."""
    return distributed.my_block(paired.n, "paired samples")


# -------------------------------------------------------------------------------------- per-mode facts
def _mode_entries(cfg, res, paired, dataset, device) -> tuple[dict[str, list[dict]], list[Any], dict]:
    """Top samples and metrics of the strongest modes of each sign -> (spec.json modes, ModeViews, clustering)."""
    top_k = int(cfg.top_k)
    chosen = {"x": res.positive_modes(top_k), "y": res.negative_modes(top_k)}
    entries: dict[str, list[dict]] = {"x": [], "y": []}
    views: list[Any] = []
    clustering: dict[str, Any] = {}
    if not chosen["x"] + chosen["y"]:
        return entries, views, clustering
    k = min(int(cfg.samples_per_mode), paired.n)
    mine = _my_rows(paired)  # torchrun: each rank scores its block; the candidates are merged over ranks
    batches = ((xb.to(device), yb.to(device)) for xb, yb in paired.batches(_stream_batch(cfg), rows=mine))
    top = res.top_samples(  # the second streaming pass
        batches,
        k=k,
        modes=chosen["x"] + chosen["y"],
        offset=mine.start,
        sync_dist=distributed.is_distributed(),
    )
    for direction, modes in chosen.items():
        for rank, m in enumerate(modes):
            j = top.modes.index(m)
            idx, scores = top.indices[j].numpy(), top.scores[j].tolist()  # [k], [k]
            entry, view = _describe_mode(res, paired, dataset, direction, m, idx, scores)
            entries[direction].append({"index": int(m), "rank": rank + 1, **entry})
            views.append(view)
        clustering[direction] = _kmeans_agreement(res, paired, top, modes, int(cfg.seed))
    return entries, views, clustering


def _describe_mode(res, paired: PairedFeatures, dataset, direction: str, m: int, idx: np.ndarray, scores):
    """One mode's spec.json entry (without index/rank) and its report view, from its top rows ``idx: [k]``."""
    from .report import ModeView, metrics

    xs, ys = paired.gather(idx)  # [k, p], [k, q]
    tight_x, tight_y = metrics.mode_tightness(res.kernel_x, res.kernel_y, xs, ys)
    entry: dict[str, Any] = {
        "eigenvalue": float(res.eigenvalues[m]),
        "uniformity": float(res.uniformity[m]),  # |<v, 1>| / sqrt(n); near 1: average levels differ
        "eigenvalue_error": float(res.eigenvalue_error[m]),  # the route's estimated absolute error
        "below_resolution": bool(res.below_resolution[m]),  # value or gap below it (docs/numerics.md)
        "top_ids": [paired.ids[i] for i in idx],
        "top_scores": [float(s) for s in scores],
        "tightness_x": float(tight_x),
        "tightness_y": float(tight_y),
        **_mode_uncertainty(res, m),
    }
    labels = attributes = images = texts = composition = majority = paths = None
    if dataset is not None:
        rows = paired.dataset_index[idx]  # [k] dataset positions of the top samples
        labels, attributes = dataset.labels, dataset.attributes
        if distributed.is_main_process():  # only rank 0 writes the report
            paths = _sample_paths(dataset, [paired.ids[i] for i in idx])
            shown = [dataset.display(int(i)) for i in rows]
            images, texts = (shown, None) if dataset.modality == "image" else (None, [str(t) for t in shown])
    elif paired.labels is not None or paired.names is not None:  # data=features: per-row labels and names
        labels, rows = paired.labels, idx
        if paired.names is not None:
            texts = [paired.names[i] for i in idx]
    if texts is not None:  # shortened, for the command line summary
        entry["top_texts"] = [_shorten(t, 200) for t in texts]
    if labels is not None:
        composition = metrics.label_composition([labels[i] for i in rows])
        entry["labels"] = [[str(label), float(f)] for label, f in composition]
    if attributes:
        majority = metrics.purity(attributes, rows)  # attribute -> (majority value, fraction)
        entry["purity"] = {attr: frac for attr, (_, frac) in majority.items()}
        entry["dominant"] = {attr: value for attr, (value, _) in majority.items()}
    view = ModeView(
        direction=direction,
        index=int(m),
        eigenvalue=entry["eigenvalue"],
        sample_ids=entry["top_ids"],
        scores=entry["top_scores"],
        images=images,
        texts=texts,
        tightness_x=entry["tightness_x"],
        tightness_y=entry["tightness_y"],
        labels=composition,
        purity=majority,
        paths=paths,
        ci=entry.get("ci"),
        heldout_eigenvalue=entry.get("heldout_eigenvalue"),
        stability=entry.get("stability"),
        support=entry.get("support"),
    )
    return entry, view


def _sample_paths(dataset, ids: list[str]) -> list[str] | None:
    """The file of each sample id, for datasets whose ids are paths under ``dataset.root``; else None."""
    root = getattr(dataset, "root", None)
    if root is None:
        return None
    files = [Path(root) / sid for sid in ids]
    return [str(f) for f in files] if all(f.is_file() for f in files) else None


def _mode_uncertainty(res, m: int) -> dict[str, Any]:
    """spec.json fields of mode ``m``: ``ci``, ``heldout_eigenvalue``, ``heldout_ci``, ``stability``, its tied set
    (``tied_size``, 1 when isolated; ``tied_set``, its index in the top-level ``tied_modes``, or None) and the
    library's verdict ``support`` (``res.support``, rendered, never recomputed); empty without replicates."""
    if res.eigenvalue_ci is None:
        return {}

    def plain(v: float) -> float | None:
        return None if v != v else float(v)

    lo, hi = (float(v) for v in res.eigenvalue_ci[m].tolist())
    tied_set, tied_size = res.tied_set_of(m)
    held_ci = res.heldout_eigenvalue_ci
    return {
        "ci": [lo, hi],
        "heldout_eigenvalue": float(res.heldout_eigenvalues[m]),
        "heldout_ci": [None, None] if held_ci is None else [plain(v) for v in held_ci[m].tolist()],
        "stability": float(res.stability[m]),
        "tied_size": tied_size,
        "tied_set": tied_set,
        "support": "unknown" if res.support is None else res.support[m],
    }


def _kmeans_agreement(res, paired: PairedFeatures, top, modes: list[int], seed: int) -> dict | None:
    """KMeans (k = #modes) on the union of the modes' top samples, in each kernel's feature space (the
    geometry SPEC compared), against mode membership. A sample in several modes' tops goes to its best."""
    from .report import metrics

    if len(modes) < 2:
        return None
    pick = [top.modes.index(m) for m in modes]
    rows, membership = metrics.mode_membership(top.indices[pick], top.scores[pick])
    if len(rows) <= len(modes):
        return None
    xs, ys = paired.gather(rows)  # [m, p], [m, q]
    kx = res.kernel_x if res.kernel_x.has_features else None  # exact-only kernels: the raw embedding
    ky = res.kernel_y if res.kernel_y.has_features else None
    out = metrics.kmeans_agreement(xs, ys, membership, seed=seed, kernel_x=kx, kernel_y=ky)
    return {key: float(v) for key, v in out.items()}


def _mutual_knn(cfg, paired: PairedFeatures) -> dict[str, Any]:
    from .report import metrics

    for key, low in (("mutual_knn_subsample", 2), ("mutual_knn_k", 1)):
        value = cfg.metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecError(f"metrics.{key}: expected an integer >= {low}, got {value!r}")
    m = min(int(cfg.metrics.mutual_knn_subsample), paired.n)
    k = min(int(cfg.metrics.mutual_knn_k), m - 1)
    rng = np.random.default_rng(int(cfg.seed))
    rows = np.sort(rng.choice(paired.n, size=m, replace=False))
    xs, ys = paired.gather(rows)
    return {"value": float(metrics.mutual_knn_overlap(xs, ys, k=k)), "k": k, "m": m}


# ------------------------------------------------------------------------------------------------ explain
def _texts(paired: PairedFeatures, dataset) -> list[str] | None:
    """The text of each paired row, the explain stage's input: the dataset's ``texts`` (text lines, COCO
    captions), or the ``data.names_path`` names of data=features; None when the data has none."""
    if dataset is not None:
        texts = dataset.texts
        return None if texts is None else [texts[int(i)] for i in paired.dataset_index]
    return paired.names


def _explain(cfg, res, paired: PairedFeatures, dataset, modes: dict[str, list[dict]], views, device) -> dict:
    """The explain stage: each reported mode's ``keywords`` (:func:`spec_torch.apps.explain.mode_keywords`),
    into its spec.json entry and its report view, and the words of each tied set of modes, named once from
    the members of any of its modes (:func:`~spec_torch.apps.explain.set_scores`). Returns ``{tuple(set indices): keywords}`` for spec.json's top-level
    ``tied_modes``; nothing when the data has no texts. Rank 0 scores every row (oriented as the top samples)
    and sends the words to every rank."""
    from .explain import mode_keywords, oriented_scores, set_scores

    texts = _texts(paired, dataset)
    chosen = [(direction, entry) for direction in ("x", "y") for entry in modes[direction]]
    if texts is None or not chosen:
        return {}
    settings = keywords_config(cfg)
    picked = [int(entry["index"]) for _, entry in chosen]
    sets = [list(t) for t in (res.tied_modes or []) if len(t) > 1]
    extra = sorted({k for t in sets for k in t} - set(picked))  # tied modes beyond the reported ones
    top = [paired.ids.index(entry["top_ids"][0]) for _, entry in chosen]  # each mode's top sample
    anchors = paired.gather(top + [0] * len(extra))  # [M, p], [M, q]
    columns = {k: j for j, k in enumerate(picked + extra)}

    def name_modes() -> tuple[list, list]:
        batches = ((xb.to(device), yb.to(device)) for xb, yb in paired.batches(_stream_batch(cfg)))
        scores = oriented_scores(res, batches, picked + extra, (anchors[0].to(device), anchors[1].to(device)))
        for j in range(
            len(picked), scores.shape[1]
        ):  # tied modes beyond the reported ones: the sign that puts
            if (
                scores[np.abs(scores[:, j]).argmax(), j] < 0
            ):  # their largest |score| positive (top_samples' rule)
                scores[:, j] *= -1
        words = mode_keywords(scores[:, : len(picked)], texts, **settings)  # scores: [n, M]
        unions = set_scores(scores, [[columns[k] for k in t] for t in sets])  # [n, S]
        return words, (mode_keywords(unions, texts, **settings) if sets else [])

    with phase(log, f"naming {len(chosen)} modes and {len(sets)} tied sets by the words of {paired.n} texts"):
        words, set_words = distributed.run_on_main(name_modes)
    view_of = {(view.direction, view.index): view for view in views}
    for (direction, entry), terms in zip(chosen, words, strict=True):
        entry["keywords"] = [[term, z] for term, z in terms]
        if (direction, entry["index"]) in view_of:
            view_of[direction, entry["index"]].keywords = entry["keywords"]
    return {tuple(t): [[term, z] for term, z in terms] for t, terms in zip(sets, set_words, strict=True)}


# ------------------------------------------------------------------------------------------------ run
def run(cfg: DictConfig | dict | list[str] | None = None) -> dict[str, Any]:
    """Run one comparison as configured (``configs/compare/compare.yaml``); returns the ``spec.json`` dict.

    Writes into ``cfg.output_dir`` (default: the Hydra run dir, or ``outputs/compare/<date>/<time>``
    outside Hydra): ``plots/``, ``report.html`` (if ``cfg.report``) and, last, ``spec.json``.

    Args:
        cfg: the composed config (from ``spec-torch compare``), or what to change in the packaged defaults:
            Hydra overrides (``["experiment=demo", "top_k=5"]``), a dict (``{"top_k": 5, "data":
            "features", "data.x_path": "x.npy", "data.y_path": "y.npy"}``), a partial DictConfig, or None
            (the defaults: the offline demo). See :func:`spec_torch.apps.config.load_config`.

    Example:
        >>> from spec_torch.apps.compare import run
        >>> summary = run(["experiment=demo", "output_dir=out/demo"])  # doctest: +SKIP
    """
    cfg = load_config("compare", cfg)
    quiet_third_party(bool(cfg.get("verbose", False)))
    t_start = time.perf_counter()  # wall-clock times go to spec.json "timings" only (not reproducible)
    timings: dict[str, float] = {}
    _check_settings(cfg)
    out_dir = distributed.run_on_main(
        lambda: prepare_output_dir(cfg, results=(SPEC_JSON, "report.html"))
    )  # torchrun: rank 0 owns the run directory
    spec_path = out_dir / SPEC_JSON  # an earlier run's, listed in its manifest, is gone (prepare_output_dir)
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.get("device", "auto"))
    data_cfg = _container(cfg.data)

    dataset = None
    if data_cfg.get("name") == "features":
        paired, data_info = _load_precomputed(data_cfg)
        enc_info = {"x": None, "y": None}
    else:
        paired, dataset, data_info, enc_info = _extract_pair(cfg, device)
    log.info("comparing %d paired samples (%d skipped)", paired.n, len(paired.skipped))

    timings["load_s"] = time.perf_counter() - t_start
    t_stream = time.perf_counter()
    with phase(log, f"streaming {paired.n} rows into the covariance sums and solving"):
        res, cka, centred = _solve(cfg, paired, device, timings)
    timings["stream_and_solve_s"] = time.perf_counter() - t_stream
    t_score = time.perf_counter()
    approx = _approx_error(cfg, res, paired) if distributed.is_main_process() else None
    with phase(log, "scoring the top samples of each reported mode"):
        modes, views, clustering = _mode_entries(cfg, res, paired, dataset, device)
    set_words = _explain(cfg, res, paired, dataset, modes, views, device)
    with phase(log, "mutual k-NN overlap"):
        knn = _mutual_knn(cfg, paired)
    timings["score_and_metrics_s"] = time.perf_counter() - t_score

    summary = res.to_dict()
    summary.update(
        skipped={"count": len(paired.skipped), "ids": list(paired.skipped)},
        settings={
            "eta": float(cfg.eta),
            "method": res.method,
            "top_k": int(cfg.top_k),
            "samples_per_mode": int(cfg.samples_per_mode),
            "solve_top_k": cfg.get("solve_top_k"),
            "seed": int(cfg.seed),
            "device": str(device),
            "batch_size": int(cfg.batch_size),
            "stream_batch_size": _stream_batch(cfg),
            "accumulate_dtype": str(cfg.get("accumulate_dtype", "float64")),
            "center": bool(cfg.get("center", False)),
            "explain": {"keywords": keywords_config(cfg)},
        },
        encoders=enc_info,
        dataset=data_info,
        metrics={"linear_cka": float(cka), "mutual_knn": knn, "kmeans": clustering},
        modes=modes,
    )
    for tied in summary.get("tied_modes") or []:  # a tied set's words, named once from its span
        if tuple(tied["indices"]) in set_words:
            tied["keywords"] = set_words[tuple(tied["indices"])]
    if approx is not None:
        summary["approximation"] = approx
        summary["settings"]["approx_error"] = cfg.get("approx_error", "auto")
    if centred is not None:
        summary["spec_diff_centred"] = centred
    _flags_and_summary(summary)
    if not distributed.is_main_process():  # torchrun: every rank holds the same result; rank 0 writes it
        return summary
    if cfg.get("report", True):
        from .report import write_report

        extra = {"linear_cka": float(cka), "mutual_knn": knn, "kmeans": clustering}
        if data_info["name"] == "features":
            extra["names"] = {w: Path(data_info[f"{w}_path"]).stem for w in ("x", "y")}
        t_report = time.perf_counter()
        with phase(log, "writing plots and report.html"):
            summary["report"] = str(write_report(out_dir, summary, views, extra=extra).name)
        timings["report_s"] = time.perf_counter() - t_report
    # wall-clock seconds, the one part of spec.json that is not reproducible (docs/compare.md)
    summary["timings"] = {**timings, "total_s": time.perf_counter() - t_start}
    atomic_write_json(spec_path, summary, default=str)
    _print_summary(summary, spec_path)
    return summary


def _flags_and_summary(summary: dict[str, Any]) -> None:
    """The words stage: every mode entry gets its ``flags`` (:func:`report.flags.mode_flag_codes`, from the
    facts the library decided) and spec.json gets its ``summary`` (:func:`report.summary.build_summary`), the
    finding every view renders."""
    from .report.flags import mode_flag_codes
    from .report.summary import build_summary

    for entries in summary["modes"].values():
        for entry in entries:
            entry["flags"] = mode_flag_codes(entry)
    summary["summary"] = build_summary(summary)


def _shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_summary(summary: dict[str, Any], spec_path: Path) -> None:
    """The result in a few lines, through ``logging``: on the console and in the run folder's log.

    Renders spec.json: the ``summary`` headline first, then one line per mode with its ``flags`` (labels from
    :data:`report.flags.FLAGS`) and its ``keywords``, and what each flag means; it decides nothing itself."""
    import textwrap

    from .explain import keywords_tag
    from .report import flags
    from .report.summary import build_summary

    m = summary["metrics"]
    ci = summary.get("spec_diff_ci")
    finding = summary.get("summary") or build_summary(summary)
    log.info(
        f"SPEC-diff = {summary['spec_diff']:.4g}"
        + (f" ({summary['uncertainty']['level']:.0%} CI {ci[0]:.4g} .. {ci[1]:.4g})" if ci else "")
        + f"  n = {summary['n']}  skipped = {summary['skipped']['count']}  "
        f"linear CKA = {m['linear_cka']:.3f}  mutual {m['mutual_knn']['k']}-NN = {m['mutual_knn']['value']:.3f}"
    )
    centred = finding.get("spec_diff_centred")
    if centred:
        log.info(f"  centred SPEC-diff = {centred['value']:.4g}: read this one ({centred['how']})")
    wrapped = textwrap.wrap(finding["headline"], 108, initial_indent="  ", subsequent_indent="  ",
                            break_long_words=False, break_on_hyphens=False)  # fmt: skip
    log.info("\n".join(wrapped))
    if flags.reference_line(summary):  # the permutation reference, one line
        log.info(f"  {flags.reference_line(summary)}; 0% = the same kernel geometry")
    for direction, what in (("x", "x captures, y does not"), ("y", "y captures, x does not")):
        for e in summary["modes"][direction]:
            line = f"  mode {direction}{e['rank']} ({what}): eigenvalue {e['eigenvalue']:+.4g}"
            line += f"  tightness x {e['tightness_x']:.2f} / y {e['tightness_y']:.2f}"
            if "purity" in e:  # the planted attribute its top samples share most, then the others
                ranked = sorted(e["purity"].items(), key=lambda kv: -kv[1])
                (best, p), rest = ranked[0], ranked[1:]
                line += f"  purity: {best}={e['dominant'][best]} {p:.2f}"
                line += " (" + ", ".join(f"{a} {q:.2f}" for a, q in rest) + ")"
            elif "labels" in e and e["labels"]:
                lab, frac = e["labels"][0]
                line += f"  top label {lab} ({frac:.0%})"
            elif e.get("top_texts"):  # the texts at hand rather than their ids
                line += "  top: " + " | ".join(_shorten(t, 40) for t in e["top_texts"][:3])
            else:
                line += f"  top ids {', '.join(e['top_ids'][:3])}"
            if e.get("ci") is not None:
                line += (
                    f"  CI {e['ci'][0]:+.4g} .. {e['ci'][1]:+.4g}  held-out {e['heldout_eigenvalue']:+.4g}  "
                    f"stability {e['stability']:.2f}"
                )
            if e.get("support"):
                line += f": {e['support']}"
            labels = flags.flag_labels(e)
            log.info(line + keywords_tag(e) + (f"  FLAGS: {'; '.join(labels)}" if labels else ""))
    for note in finding.get("notes") or []:
        log.info(f"  {note}")
    if "approximation" in summary:
        log.info(flags.approximation_line(summary["approximation"]))
    note = (summary.get("uncertainty") or {}).get("note")
    if note:
        log.info(f"uncertainty: {note}")
    log.info(f"wrote {spec_path}" + (f" and {summary['report']}" if "report" in summary else ""))


if __name__ == "__main__":  # python -m spec_torch.apps.compare [overrides]: the same as spec-torch compare
    import sys

    from .cli import main

    sys.exit(main(["compare", *sys.argv[1:]]))
