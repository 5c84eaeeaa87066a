"""The matrix pipeline: many encoders (and their layers) on one dataset -> ``matrix.json`` and ``report.html``.

A recipe of calls (``configs/matrix.yaml``): build the dataset; for each configured encoder extract its features
into the cache (one extraction pass per encoder; with ``layers`` every layer comes from the same pass and is
split into named feature sets ``<encoder>/<layer>``); stream all feature sets through :func:`spec_torch.spec_matrix`
once (``center``: both kernels of every pair centred); for the ``top_pairs`` most different pairs score their
top modes in both directions from the joint sums (:meth:`SpecMatrix.pair`, one scoring pass per pair); flag
each entry and mode (:func:`~spec_torch.apps.report.flags.mode_flag_codes`) and say the finding in words
(:func:`~spec_torch.apps.report.matrix_html.matrix_summary`); where the data has texts (text lines, COCO captions)
name the modes by their distinctive words (:mod:`spec_torch.apps.explain`, one more pass per pair); write
``report.html`` then ``matrix.json``.

The ranking of "most different" pairs never rests on a uniform-led entry (a mode that scores every sample
alike: the kernels' average levels differ, not a group): when some entry is led by one, the pairs are ranked by
:meth:`SpecMatrix.cluster_diff` (the lead of each direction whose mode is not uniform), and ``ranking`` in
``matrix.json`` says which matrix was used.

Under torchrun (``torchrun --nproc_per_node=2 scripts/matrix.py experiment=matrix_demo``, or ``torchrun
--nproc_per_node=2 -m spec_torch matrix ...``) each rank extracts its contiguous block of the dataset into a
cache of its own (:func:`~spec_torch.apps.sharding.extract_sharded`) and streams only its block of the common
rows; the matrix sums are all-reduced and each pair's top samples merged over the ranks, so every rank holds
the one-process result. Rank 0 alone writes ``matrix.json`` and ``report.html``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .._validate import resolve_device
from ..errors import SpecError
from ..matrix import SpecMatrix, spec_matrix
from ..result import UNIFORM_THRESHOLD
from . import sharding as distributed
from ._io import atomic_write_json, prepare_output_dir
from .cli import check_required
from .compare import keywords_config
from .config import ACCUMULATE_DTYPES, check_run_settings, load_config
from .report.flags import mode_flag_codes

__all__ = ["run", "MATRIX_JSON"]

log = logging.getLogger(__name__)
MATRIX_JSON = "matrix.json"


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _check_settings(cfg: DictConfig) -> None:
    check_required(cfg)
    check_run_settings(
        cfg,
        positive=("top_k", "samples_per_mode", "batch_size", "stream_batch_size"),
        non_negative=("top_pairs",),
    )
    if not isinstance(cfg.get("center", False), bool):
        raise SpecError(f"center: expected true or false, got {cfg.center!r}")
    keywords_config(cfg)
    encoders = cfg.get("encoders")
    if not isinstance(encoders, DictConfig) or len(encoders) == 0:
        raise SpecError("encoders: expected a mapping name -> encoder config (family: ..., layers: [...])")


def _build(name: str, enc_cfg: dict[str, Any]):
    from .encoders.layers import build_layer_encoder

    kwargs = dict(enc_cfg)
    family = kwargs.pop("family", None)
    if not family:
        raise SpecError(
            f"encoders.{name}.family: expected an encoder family (e.g. open_clip, timm, offline_colour)"
        )
    try:
        return build_layer_encoder(family, **kwargs)
    except SpecError as exc:  # "encoder.layers: ..." -> "encoders.NAME.layers: ..."
        msg = str(exc)
        raise SpecError(
            f"encoders.{name}" + msg[len("encoder") :] if msg.startswith("encoder") else msg
        ) from None


def _extract_all(cfg: DictConfig, device: torch.device):
    """Dataset + every encoder -> ``({feature set: [n, d] rows}, dataset, ids, info)`` on the common ids."""
    from .data import dataset_from_config
    from .encoders.layers import LayerEncoder, split_layers
    from .extract import extraction_settings

    dataset = dataset_from_config(_container(cfg.data))
    specs = _container(cfg.encoders)
    encoders = {name: _build(name, dict(e)) for name, e in specs.items()}  # all built first: all fail fast
    for name, enc in encoders.items():
        if enc.modality != dataset.modality:
            raise SpecError(
                f"encoders.{name}: a {enc.modality} encoder cannot embed {dataset.modality} samples"
            )
    caches, sets, enc_info = {}, {}, {}
    for name in list(encoders):
        enc = encoders.pop(name)
        cache = distributed.extract_sharded(  # extract_features; under torchrun each rank its block
            dataset, enc, Path(str(cfg.cache_dir)).expanduser(), **extraction_settings(cfg, device)
        )
        caches[name] = cache
        layered = isinstance(enc, LayerEncoder)
        sets[name] = (
            split_layers(cache.features, enc.layer_dims, prefix=name) if layered else {name: cache.features}
        )
        enc_info[name] = {
            **specs[name],
            **enc.describe(),
            "cache_key": enc.cache_key(),
            "sets": list(sets[name]),
        }
        del enc
    common = set.intersection(*(set(c.ids) for c in caches.values()))
    ids = [i for i in caches[next(iter(caches))].ids if i in common]
    if len(ids) < 2:
        raise SpecError(f"data: only {len(ids)} sample(s) readable by every encoder")
    rows = {}
    for name, c in caches.items():
        where = {sid: r for r, sid in enumerate(c.ids)}
        rows[name] = None if c.ids == ids else np.asarray([where[i] for i in ids])
    features = {}
    for name, group in sets.items():
        for key, arr in group.items():
            features[key] = arr if rows[name] is None else _Rows(arr, rows[name])
    pos = {dataset.sample_id(i): i for i in range(len(dataset))}
    data_cfg = _container(cfg.data)
    info = {**data_cfg, "modality": dataset.modality, "size": len(dataset)}
    return features, dataset, ids, np.asarray([pos[s] for s in ids]), info, enc_info


class _Rows:
    """``array[rows]`` read lazily, slice by slice (a cache kept only some of the common ids in other order)."""

    def __init__(self, array: Any, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows
        self.shape = (len(rows), array.shape[1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.array[self.rows[sl]])


class _Batches:
    """Re-iterable batches ``{name: [B, d] float32 tensor}`` of the common rows ``rows`` (a contiguous range;
    the groups route re-reads)."""

    def __init__(self, features: dict[str, Any], rows: range, batch: int, device: torch.device) -> None:
        self.features, self.rows, self.batch, self.device = features, rows, batch, device

    def __iter__(self):
        for s in range(self.rows.start, self.rows.stop, self.batch):
            e = min(s + self.batch, self.rows.stop)
            yield {
                k: torch.from_numpy(np.array(v[s:e], dtype=np.float32)).to(self.device)
                for k, v in self.features.items()
            }


def _my_rows(n: int) -> range:
    """The common rows this process streams: all of them, or under torchrun this rank's contiguous block."""
    return distributed.my_block(n, "common samples")


def _kernels(cfg: DictConfig, features: dict[str, Any], n: int, device: torch.device) -> Any:
    """The ``kernel`` setting, as one kernel (fitted or needing no fit) or, when it is data-dependent
    (``sigma: auto``), a dict feature set -> kernel fitted on that set's rows of one seeded uniform sample of
    the common rows (:func:`~spec_torch.apps.compare.fit_sample_rows`, the compare job's): not on the first
    stream batch, which depends on ``stream_batch_size`` and on the row
    order (a class-sorted dataset's first batch is one class). Under torchrun rank 0 fits and sends the
    kernels: every rank's sums must describe the same kernels, and rank 0's error is raised on every rank.
    """
    from ..kernels import resolve_kernel
    from .compare import fit_sample_rows

    kernel = resolve_kernel(_container(cfg.kernel), "kernel")
    if kernel.is_fitted:
        return kernel
    rows = fit_sample_rows(n, int(cfg.seed), [kernel])

    def fit() -> dict[str, Any]:
        return {
            k: kernel.fit(torch.from_numpy(np.asarray(v[rows], dtype=np.float32)).to(device))
            for k, v in features.items()
        }

    return distributed.run_on_main(fit)


def ranking(m: SpecMatrix) -> dict[str, Any]:
    """Which matrix ranks the "most different" pairs: ``spec_diff`` when no entry is led by a uniform mode
    (always so with centred kernels), else ``cluster_diff`` (uniform-led directions skipped), with a note."""
    uniform = int((m.lead_uniformity > UNIFORM_THRESHOLD).sum())
    if m.center or uniform == 0:
        return {
            "matrix": "spec_diff",
            "skip_uniform": False,
            "uniform_entries": uniform,
            "note": "ranked by SPEC-diff"
            + (
                " of the centred kernels (no uniform mode)"
                if m.center
                else "; no entry is led by a uniform mode"
            ),
        }
    return {
        "matrix": "cluster_diff",
        "skip_uniform": True,
        "uniform_entries": uniform,
        "note": (
            f"ranked by the larger lead of each pair's directions whose mode is not uniform: {uniform} lead "
            f"entries are led by a uniform mode (uniformity > {UNIFORM_THRESHOLD}: kernel levels, not a "
            "group) and skipped; rerun with center=true to remove them"
        ),
    }


def _flagged(entry: dict[str, Any], res: Any, mode: int) -> dict[str, Any]:
    """``entry`` with the mode's ``uniformity``, ``below_resolution`` (when the result has it) and ``flags``."""
    entry["uniformity"] = float(res.uniformity[mode])
    below = getattr(res, "below_resolution", None)
    if below is not None:
        entry["below_resolution"] = bool(below[mode])
    entry["flags"] = mode_flag_codes(entry)
    return entry


def entry_flags(uniformity: Any) -> list[list[list[str]]]:
    """``[N][N]`` flag codes of the modes behind a matrix's entries, from their ``uniformity``."""
    return [[mode_flag_codes({"uniformity": float(u)}) for u in row] for row in np.asarray(uniformity)]


def _pair_modes(cfg, m, features, n, dataset, index, device, rank_by) -> list[dict[str, Any]]:
    """For the most different pairs: top modes of both signs, their top samples (one scoring pass per pair;
    under torchrun each rank scores its block and the candidates are merged over the ranks)."""
    out = []
    k = min(int(cfg.samples_per_mode), n)
    mine = _my_rows(n)
    clusters = m.cluster_diff()
    counts: dict[str, Any] = {}  # the texts' term counts, made once (rank 0) for every pair
    for i, j in m.most_different(int(cfg.top_pairs), skip_uniform=rank_by["skip_uniform"]):
        a, b = m.names[i], m.names[j]
        res = m.pair(i, j)
        chosen = {"x": res.positive_modes(int(cfg.top_k)), "y": res.negative_modes(int(cfg.top_k))}
        if not chosen["x"] + chosen["y"]:
            continue
        batches = (
            (t[a], t[b])
            for t in _Batches({a: features[a], b: features[b]}, mine, int(cfg.stream_batch_size), device)
        )
        top = res.top_samples(
            batches,
            k=k,
            modes=chosen["x"] + chosen["y"],
            offset=mine.start,
            sync_dist=distributed.is_distributed(),
        )
        modes = []
        for direction, picked in chosen.items():
            for rank, mode in enumerate(picked):
                r = top.modes.index(mode)
                idx = top.indices[r].numpy()
                rows = index[idx]
                entry = {
                    "direction": direction,
                    "rank": rank + 1,
                    "index": int(mode),
                    "eigenvalue": float(res.eigenvalues[mode]),
                    "top_rows": [int(x) for x in idx],
                    "top_scores": [float(s) for s in top.scores[r]],
                }
                _flagged(entry, res, int(mode))
                if dataset.attributes:
                    from .report.metrics import purity

                    entry["purity"] = {
                        att: [str(v), float(f)] for att, (v, f) in purity(dataset.attributes, rows).items()
                    }
                if dataset.labels is not None:
                    from .report.metrics import label_composition

                    entry["labels"] = [
                        [str(lab), float(f)]
                        for lab, f in label_composition([dataset.labels[r_] for r_ in rows])
                    ]
                modes.append(entry)
        _pair_keywords(cfg, res, {a: features[a], b: features[b]}, modes, dataset, index, device, counts)
        pair = {
            "x": a,
            "y": b,
            "spec_diff": float(m.spec_diff[i, j]),
            "lead": [float(m.lead[i, j]), float(m.lead[j, i])],  # x over y, y over x
            "cluster_diff": float(clusters[i, j]),
        }
        _flagged(pair, res, int(res.eigenvalues.abs().argmax()))  # the pair's strongest mode
        pair["modes"] = modes
        out.append(pair)
    return out


def _pair_keywords(cfg, res, pair: dict[str, Any], modes: list[dict], dataset, index, device, counts) -> None:
    """The explain stage of one pair: each mode entry's ``keywords`` (as the compare job's), where the dataset
    has texts. Rank 0 scores every common row of the pair and sends the words to every rank; the texts' term
    counts are made on the first pair and kept in ``counts`` for the others."""
    from .explain import keywords_from_counts, oriented_scores, term_counts

    texts = dataset.texts
    if texts is None or not modes:
        return
    (a, fa), (b, fb) = pair.items()
    n = int(fa.shape[0])
    settings = keywords_config(cfg)

    def row(features: Any, r: int) -> torch.Tensor:
        return torch.from_numpy(np.array(features[r : r + 1], dtype=np.float32)).to(device)  # [1, d]

    def name_modes() -> list[list[tuple[str, float]]]:
        tops = [e["top_rows"][0] for e in modes]  # each mode's top sample: its orientation
        anchors = (torch.cat([row(fa, r) for r in tops]), torch.cat([row(fb, r) for r in tops]))
        batches = ((t[a], t[b]) for t in _Batches(pair, range(n), int(cfg.stream_batch_size), device))
        scores = oriented_scores(res, batches, [e["index"] for e in modes], anchors)  # [n, M]
        if not counts:  # [n, V] sparse, and the terms
            rows = [texts[int(i)] for i in index]
            counts["terms"] = term_counts(
                rows, settings["ngram_range"], settings["min_df"], settings["max_df"]
            )
        return keywords_from_counts(scores, *counts["terms"], settings["top_n"], settings["min_z"])

    for entry, terms in zip(modes, distributed.run_on_main(name_modes), strict=True):
        entry["keywords"] = [[term, z] for term, z in terms]


def run(cfg: Any = None) -> dict[str, Any]:
    """Run the matrix job as configured (``spec_torch/apps/configs/matrix/matrix.yaml``); returns the
    ``matrix.json`` dict. ``cfg``: a composed config, or overrides onto the packaged defaults (a list of
    Hydra overrides, a dict, a partial DictConfig or None), as :func:`spec_torch.apps.config.load_config`.

    Writes into ``cfg.output_dir`` (default: the Hydra run dir): ``report.html`` and its plots (if
    ``cfg.report``) and, last, ``matrix.json``. Under torchrun rank 0 alone writes; every rank returns the
    same dict.
    """
    cfg = load_config("matrix", cfg)
    _check_settings(cfg)
    out_dir = distributed.run_on_main(lambda: prepare_output_dir(cfg))  # torchrun: rank 0 owns the run dir
    path = out_dir / MATRIX_JSON
    if distributed.is_main_process() and path.exists():  # a rerun in the same directory: the old result
        path.unlink()  # must not pass for this run's
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.get("device", "auto"))
    features, dataset, ids, index, data_info, enc_info = _extract_all(cfg, device)
    n = len(ids)
    log.info("SPEC matrix of %d feature sets on %d samples", len(features), n)
    kernel = _kernels(cfg, features, n, device)
    m = spec_matrix(  # under torchrun: this rank's block; the sums are all-reduced over the ranks
        _Batches(features, _my_rows(n), int(cfg.stream_batch_size), device),
        kernel=kernel,
        eta=float(cfg.eta),
        top_k=cfg.get("solve_top_k"),
        accumulate_dtype=ACCUMULATE_DTYPES[str(cfg.get("accumulate_dtype", "float64"))],
        center=bool(cfg.get("center", False)),
    )
    rank_by = ranking(m)
    if m.route == "joint":
        pairs = _pair_modes(cfg, m, features, n, dataset, index, device, rank_by)
    else:  # the memory-saving route keeps no joint sums, so no pair's modes (matrix.json says route: groups)
        log.warning(
            "the joint matrix did not fit (%d passes over pair groups): no modes of the pairs", m.passes
        )
        pairs = []
    summary = m.to_dict()
    summary["settings"].update(
        top_k=int(cfg.top_k),
        top_pairs=int(cfg.top_pairs),
        samples_per_mode=int(cfg.samples_per_mode),
        seed=int(cfg.seed),
        device=str(device),
        kernel_config=_container(cfg.kernel),
    )
    summary.update(
        cluster_diff=m.cluster_diff().tolist(),
        entry_flags=entry_flags(m.uniformity),
        lead_flags=entry_flags(m.lead_uniformity),
        ranking=rank_by,
        dataset=data_info,
        encoders=enc_info,
        pairs=pairs,
        skipped=len(dataset) - n,
    )
    from .report.matrix_html import matrix_summary

    summary["summary"] = matrix_summary(summary)
    if not distributed.is_main_process():  # torchrun: every rank holds the same result; rank 0 writes it
        return summary
    if cfg.get("report", True):
        from .report.matrix_html import write_matrix_report

        summary["report"] = write_matrix_report(out_dir, summary, dataset, index).name
    atomic_write_json(path, summary, default=str)
    _print_summary(summary, path)
    return summary


def _print_summary(summary: dict[str, Any], path: Path) -> None:
    """The finding, the SPEC-diff table and the ranked pairs, through logging: Hydra writes them to the
    console and to the run folder's ``matrix.log``."""
    from .explain import keywords_tag
    from .report.flags import FLAGS

    names, sd = summary["names"], np.asarray(summary["spec_diff"])
    settings = summary["settings"]
    log.info(
        f"SPEC matrix: {len(names)} feature sets, n = {summary['n']}, route {settings['route']}, "
        f"{'centred' if settings.get('center') else 'uncentred'} kernels"
    )
    log.info(summary["summary"])
    width = max(len(s) for s in names)
    lines = [" " * (width + 3) + " ".join(f"{k:>7d}" for k in range(len(names)))]
    flags = summary.get("entry_flags")
    for i, s in enumerate(names):
        cells = [f"{v:7.3f}" + ("u" if flags and flags[i][j] else " ") for j, v in enumerate(sd[i])]
        lines.append(f"{i:>2d} {s:<{width}}" + "".join(cells))
    log.info("SPEC-diff (row i, column j; u: led by a uniform mode):\n" + "\n".join(lines))
    log.info(f"most different pairs, {summary['ranking']['note']}:")
    for p in summary["pairs"]:
        tags = "; ".join(FLAGS[c][0] for c in p.get("flags", []))
        log.info(
            f"  {p['x']} vs {p['y']}: SPEC-diff {p['spec_diff']:.4f}, lead {p['lead'][0]:.4f} / "
            f"{p['lead'][1]:.4f}" + (f"  [{tags}]" if tags else "")
        )
        for e in p["modes"]:  # named in words where the data had texts
            if keywords_tag(e):
                log.info(
                    f"    {e['direction']}{e['rank']} ({p[e['direction']]} holds together):{keywords_tag(e)}"
                )
    log.info(f"wrote {path}" + (f" and {summary['report']}" if "report" in summary else ""))
