"""The compare pipeline: two encoders, one dataset, one SPEC comparison, one run directory.

``run(cfg)`` is what ``scripts/compare.py`` calls with the composed Hydra config (``configs/compare.yaml``):

1. check that the output directory is writable (before any work) and remove a stale ``spec.json``;
2. build the dataset and both encoders, extract and cache features for each (``data=features`` instead
   loads precomputed arrays), and pair the cached rows by sample id: a sample skipped as corrupt by either
   encoder is dropped from both;
3. stream the cached rows through :class:`~spec_torch.DiffCovariance` (and the linear CKA sums) batch by
   batch, never holding all features in memory, and solve;
4. a second streaming pass for the top samples of the strongest modes of each sign;
5. per-mode metrics (tightness under each kernel, KMeans agreement, label composition, purity on planted
   attributes) and mutual k-NN overlap on a subsample;
6. plots and ``report.html``, then ``spec.json`` written atomically, last: a run directory with a
   ``spec.json`` is a finished run.

Bad input raises :class:`~spec_torch.errors.SpecError` with a message naming the setting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed
from ._io import atomic_write_json, prepare_output_dir
from ._validate import resolve_device
from .cli import check_required
from .covariance import DiffCovariance
from .errors import SpecError
from .kernels import resolve_kernel

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
    for key in ("top_k", "samples_per_mode", "batch_size", "stream_batch_size"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{key}: expected a positive integer, got {value!r}")
    eta = cfg.get("eta")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or not math.isfinite(eta):
        raise SpecError(f"eta: expected a positive number, got {eta!r}")
    if cfg.get("accumulate_dtype", "float64") not in _ACCUMULATE:
        raise SpecError(f"accumulate_dtype: expected float32 or float64, got {cfg.accumulate_dtype!r}")
    if cfg.get("method", "auto") not in ("auto", "features", "exact"):
        raise SpecError(f"method: expected 'auto', 'features' or 'exact', got {cfg.method!r}")
    if cfg.get("approx_error", "auto") != "auto" and not isinstance(cfg.get("approx_error"), bool):
        raise SpecError(f"approx_error: expected auto, true or false, got {cfg.approx_error!r}")


# ------------------------------------------------------------------------------------- loading inputs
def _load_precomputed(data_cfg: dict[str, Any]) -> tuple[PairedFeatures, dict[str, Any]]:
    from .data import load_feature_pair

    for key in ("x_path", "y_path"):
        if not data_cfg.get(key):
            raise SpecError(f"data.{key}: required with data=features (a .npy/.npz/.pt/.safetensors file)")
        if not Path(str(data_cfg[key])).expanduser().is_file():
            raise SpecError(f"data.{key}: no such file: {data_cfg[key]}")
    ids_path = data_cfg.get("ids_path")
    if ids_path and not Path(str(ids_path)).expanduser().is_file():
        raise SpecError(f"data.ids_path: no such file: {ids_path}")
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
    info = {
        "name": "features",
        "x_path": str(data_cfg["x_path"]),
        "y_path": str(data_cfg["y_path"]),
        "ids_path": str(ids_path) if ids_path else None,
        "dims": [int(x.shape[1]), int(y.shape[1])],
    }
    return PairedFeatures(x=x, y=y, ids=ids), info


def _build_encoder(enc_cfg: dict[str, Any], which: str):
    from .encoders import build_encoder

    kwargs = dict(enc_cfg)
    family = kwargs.pop("family", None)
    if not family:
        raise SpecError(f"{which}.family: expected an encoder family (e.g. open_clip, timm, minilm)")
    try:
        return build_encoder(family, **kwargs)
    except SpecError as exc:  # "encoder.model: ..." -> "encoder_x.model: ..."
        msg = str(exc)
        raise SpecError(
            which + msg[len("encoder") :] if msg.startswith("encoder") else f"{which}: {msg}"
        ) from None
    except (RuntimeError, KeyError, TypeError, OSError) as exc:  # a library's own "unknown model" etc.
        model = kwargs.get("model", family)
        raise SpecError(f"{which}: could not build the {family} encoder {model!r}: {exc}") from None


def _extract_pair(cfg: DictConfig, device: torch.device):
    """Dataset + both encoders -> cached features, paired by sample id."""
    from .data import build_dataset

    data_cfg = dict(_container(cfg.data))
    name = data_cfg.pop("name")
    dataset = build_dataset(name, **data_cfg)
    if len(dataset) == 0:
        raise SpecError(f"data: the {name} dataset is empty; check its path settings")
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
            dataset,
            enc,
            cache_dir,
            batch_size=int(cfg.batch_size),
            num_workers=int(cfg.num_workers),
            device=str(device),
            progress=bool(cfg.get("progress", True)),
            chunk_rows=int(cfg.get("chunk_rows", 4096)),
            amp=bool(cfg.get("amp", True)),
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
#: batch, which in a class-sorted folder holds one class only
FIT_ROWS = 2000


def _fit_kernels(cfg: DictConfig, paired: PairedFeatures):
    """Both kernels fitted on the same seeded random subset of at most ``FIT_ROWS`` paired rows."""
    kx = resolve_kernel(_container(cfg.kernel_x), "kernel_x")
    ky = resolve_kernel(_container(cfg.kernel_y), "kernel_y")
    if kx.is_fitted and ky.is_fitted:
        return kx, ky
    rows = np.arange(paired.n)
    if paired.n > FIT_ROWS:
        rows = np.sort(np.random.default_rng(int(cfg.seed)).choice(paired.n, size=FIT_ROWS, replace=False))
    xs, ys = paired.gather(rows)  # [m, p], [m, q]
    return kx.fit(xs), ky.fit(ys)


#: dtype of the streamed sums: float64 keeps a million float32 rows summed to full float32 accuracy
_ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}


def _stream_batch(cfg: DictConfig) -> int:
    """Rows per batch when streaming cached features (larger than the extraction batch: one GEMM each)."""
    return int(cfg.get("stream_batch_size") or cfg.batch_size)


def _solve(cfg: DictConfig, paired: PairedFeatures, device: torch.device):
    """Stream every paired batch through the accumulator and the CKA sums; solve. -> (SpecResult, cka)."""
    from . import api
    from .report import metrics

    kx, ky = _fit_kernels(cfg, paired)
    cka = metrics.LinearCKA()
    solve_top_k = cfg.get("solve_top_k")
    method = cfg.get("method", "auto")
    if method == "exact" or (method == "auto" and not (kx.has_features and ky.has_features)):
        # exact route: the n x n kernel matrices; st.spec checks they fit in memory
        x, y = (t.to(device) for t in paired.gather(np.arange(paired.n)))  # [n, p], [n, q]
        cka.update(x, y)
        res = api.spec(x, y, kernel_x=kx, kernel_y=ky, eta=float(cfg.eta), method="exact", top_k=solve_top_k)
        return res, cka.compute()
    acc = DiffCovariance(
        kx, ky, accumulate_dtype=_ACCUMULATE[cfg.get("accumulate_dtype", "float64")], device=device
    )
    for xb, yb in paired.batches(_stream_batch(cfg), rows=_my_rows(paired)):  # torchrun: this rank's block
        xb, yb = xb.to(device), yb.to(device)  # [B, p], [B, q]
        acc.update(xb, yb)
        cka.update(xb, yb)
    if distributed.is_distributed():  # the CKA sums of every rank (compute() all-reduces the covariance)
        cka.load_state_dict(distributed.all_reduce_state(cka.state_dict()))
    return acc.compute(eta=float(cfg.eta), top_k=solve_top_k), cka.compute()


#: rows of the random-feature error estimate (its exact solve is m x m, so its cost is bounded whatever n is)
APPROX_ROWS = 1000


def _approx_error(cfg: DictConfig, res, paired: PairedFeatures) -> dict[str, Any] | None:
    """spec.json ``approximation``: :func:`~spec_torch.approx.rff_error_estimate` on a seeded subsample of
    at most ``APPROX_ROWS`` rows, when asked (``approx_error: true``) or, by default (``auto``), whenever a
    kernel uses random features. None when off."""
    from .approx import rff_error_estimate, uses_random_features

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
    if not distributed.is_distributed():
        return range(paired.n)
    if paired.n < distributed.get_world_size():
        raise SpecError(
            f"data: {paired.n} paired samples cannot be split over {distributed.get_world_size()} ranks; "
            "use fewer processes (--nproc_per_node)"
        )
    return distributed.shard_range(paired.n)


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
        "top_ids": [paired.ids[i] for i in idx],
        "top_scores": [float(s) for s in scores],
        "tightness_x": float(tight_x),
        "tightness_y": float(tight_y),
    }
    labels = attributes = images = texts = composition = majority = None
    if dataset is not None:
        rows = paired.dataset_index[idx]  # [k] dataset positions of the top samples
        labels, attributes = dataset.labels, dataset.attributes
        if distributed.is_main_process():  # only rank 0 writes the report
            shown = [dataset.display(int(i)) for i in rows]
            images, texts = (shown, None) if dataset.modality == "image" else (None, [str(t) for t in shown])
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
    )
    return entry, view


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

    m = min(int(cfg.metrics.mutual_knn_subsample), paired.n)
    k = min(int(cfg.metrics.mutual_knn_k), m - 1)
    rng = np.random.default_rng(int(cfg.seed))
    rows = np.sort(rng.choice(paired.n, size=m, replace=False))
    xs, ys = paired.gather(rows)
    return {"value": float(metrics.mutual_knn_overlap(xs, ys, k=k)), "k": k, "m": m}


# ------------------------------------------------------------------------------------------------ run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one comparison as configured (``configs/compare.yaml``); returns the ``spec.json`` dict.

    Writes into ``cfg.output_dir`` (default: the Hydra run dir): ``plots/``, ``report.html`` (if
    ``cfg.report``) and, last, ``spec.json``.
    """
    _check_settings(cfg)
    out_dir = distributed.run_on_main(
        lambda: prepare_output_dir(cfg)
    )  # torchrun: rank 0 owns the run directory
    spec_path = out_dir / SPEC_JSON
    if distributed.is_main_process() and spec_path.exists():  # a rerun in the same directory: the old
        spec_path.unlink()  # result must not pass for this run's
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

    res, cka = _solve(cfg, paired, device)
    approx = _approx_error(cfg, res, paired) if distributed.is_main_process() else None
    modes, views, clustering = _mode_entries(cfg, res, paired, dataset, device)
    knn = _mutual_knn(cfg, paired)

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
        },
        encoders=enc_info,
        dataset=data_info,
        metrics={"linear_cka": float(cka), "mutual_knn": knn, "kmeans": clustering},
        modes=modes,
    )
    if approx is not None:
        summary["approximation"] = approx
        summary["settings"]["approx_error"] = cfg.get("approx_error", "auto")
    if not distributed.is_main_process():  # torchrun: every rank holds the same result; rank 0 writes it
        return summary
    if cfg.get("report", True):
        from .report import write_report

        extra = {"linear_cka": float(cka), "mutual_knn": knn, "kmeans": clustering}
        if data_info["name"] == "features":
            extra["names"] = {w: Path(data_info[f"{w}_path"]).stem for w in ("x", "y")}
        summary["report"] = str(write_report(out_dir, summary, views, extra=extra).name)
    atomic_write_json(spec_path, summary, default=str)
    _print_summary(summary, spec_path)
    return summary


def _print_summary(summary: dict[str, Any], spec_path: Path) -> None:
    from .report import flags

    m = summary["metrics"]
    print(
        f"SPEC-diff = {summary['spec_diff']:.4g}  n = {summary['n']}  skipped = {summary['skipped']['count']}  "
        f"linear CKA = {m['linear_cka']:.3f}  mutual {m['mutual_knn']['k']}-NN = {m['mutual_knn']['value']:.3f}"
    )
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
            else:
                line += f"  top ids {', '.join(e['top_ids'][:3])}"
            print(line + flags.uniform_tag(e))
    if flags.uniform_modes(summary["modes"]):
        print(f"  UNIFORM modes (uniformity > {flags.UNIFORM_THRESHOLD}): {flags.UNIFORM_MEANING}")
    if "approximation" in summary:
        print(flags.approximation_line(summary["approximation"]))
    print(f"wrote {spec_path}" + (f" and {summary['report']}" if "report" in summary else ""))
