"""Scores printed beside SPEC in the report: familiar similarity measures and per-mode diagnostics.

- :class:`LinearCKA` (from :mod:`spec_torch.metrics`, the library): centred linear CKA from streamed sums.
- :func:`mutual_knn_overlap`: mean overlap of the cosine k-nearest-neighbour sets under x and under y.
- :func:`mode_tightness`: mean pairwise kernel value of a mode's top samples under each embedding.
- :func:`kmeans_agreement`: KMeans on the union of the modes' top samples under each embedding, scored
  against mode membership with NMI and AMI.
- :func:`label_composition`, :func:`purity`: what the top samples of a mode are, where labels exist.
- :func:`mode_membership`: turn top-sample indices ``[M, k]`` into the (rows, membership) pair KMeans needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..._validate import as_matrix, check_pair, check_positive
from ...errors import SpecError
from ...kernels import Kernel, resolve_kernel
from ...metrics import LinearCKA  # the library's; re-exported for the report

__all__ = [
    "LinearCKA",
    "mutual_knn_overlap",
    "mode_tightness",
    "kmeans_agreement",
    "mode_membership",
    "label_composition",
    "purity",
]


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # [m, 1]
    if bool((norms == 0).any()):
        raise SpecError(f"{name}: cosine kNN needs non-zero rows, got {int((norms == 0).sum())} zero row(s)")
    return x / norms


def _cosine_knn(xn: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Indices of the k most similar other rows of the unit rows ``xn: [m, p]`` -> ``[m, k]``, in row blocks."""
    out = []
    for start in range(0, xn.shape[0], block):
        sim = xn[start : start + block] @ xn.T  # [b, p] @ [p, m] -> [b, m]
        rows = torch.arange(start, start + sim.shape[0], device=xn.device)
        sim[rows - start, rows] = -torch.inf  # a sample is not its own neighbour
        out.append(sim.topk(k, dim=1).indices)  # [b, k]
    return torch.cat(out)


def mutual_knn_overlap(
    x: Any, y: Any, k: int = 10, *, max_samples: int | None = None, seed: int = 0
) -> float:
    """Mean over samples of ``|kNN_x(i) ∩ kNN_y(i)| / k`` with cosine similarity, self excluded.

    1.0 when the two embeddings order every sample's neighbours alike; about ``k / (m - 1)`` for unrelated
    embeddings. Cost O(m^2 (p + q)) in blocks of rows, so pass a subsample (or set ``max_samples``: a seeded
    random subset of that many rows is used).

    Args:
        x: ``[m, p]`` embeddings; y: ``[m, q]`` embeddings of the same samples.
        k: neighbours per sample, ``1 <= k < m``.
        max_samples: if set and m is larger, score a seeded random subset of this many rows.
        seed: seed of that subset.
    """
    x = as_matrix(x, "x", dtype=torch.float64)
    y = as_matrix(y, "y", dtype=torch.float64).to(x.device)
    check_pair(x, y)
    check_positive(k, "k", integer=True)
    if max_samples is not None:
        check_positive(max_samples, "max_samples", integer=True)
        if x.shape[0] > max_samples:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
            x, y = x[idx.to(x.device)], y[idx.to(x.device)]
    m = x.shape[0]
    if k >= m:
        raise SpecError(f"k: expected fewer neighbours than samples (k < {m}), got k={k}")
    nx = _cosine_knn(_unit_rows(x, "x"), k)  # [m, k]
    ny = _cosine_knn(_unit_rows(y, "y"), k)  # [m, k]
    shared = (nx[:, :, None] == ny[:, None, :]).any(dim=2).sum(dim=1)  # [m, k, k] -> [m]
    return float(shared.double().mean()) / k


def _fitted(kernel: Kernel | str | dict, name: str) -> Kernel:
    kernel = resolve_kernel(kernel, name)
    if not kernel.is_fitted:
        raise SpecError(
            f"{name}: expected the fitted kernel of the comparison (e.g. result.{name}), got an unfitted {kernel!r}"
        )
    return kernel


def _mean_off_diagonal(kernel: Kernel, z: torch.Tensor) -> float:
    g = kernel.gram(z, z)  # [k, k]
    m = g.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (m * (m - 1)))


def mode_tightness(kernel_x: Kernel, kernel_y: Kernel, xs: Any, ys: Any) -> tuple[float, float]:
    """How tightly a mode's top samples sit under each embedding.

    Returns ``(mean_{i != j} k_x(x_i, x_j), mean_{i != j} k_y(y_i, y_j))`` over the top samples
    ``xs: [k, p]``, ``ys: [k, q]``, using the fitted kernels of the comparison (so a Gaussian kernel keeps its
    resolved sigma and random features). A mode that x captures and y does not has the first value high and
    the second low.
    """
    kx, ky = _fitted(kernel_x, "kernel_x"), _fitted(kernel_y, "kernel_y")
    xs = as_matrix(xs, "xs", dtype=torch.float64)
    ys = as_matrix(ys, "ys", dtype=torch.float64)
    check_pair(xs, ys, ("xs", "ys"))
    if xs.shape[0] < 2:
        raise SpecError(f"xs: expected at least 2 top samples to measure tightness, got {xs.shape[0]}")
    kx.check_input(xs, "xs")
    ky.check_input(ys, "ys")
    return _mean_off_diagonal(kx, xs), _mean_off_diagonal(ky, ys)


def mode_membership(indices: Any, scores: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Union of the modes' top samples and the mode each belongs to.

    Args:
        indices: ``[M, k]`` sample indices of the top samples of M modes (e.g. ``TopSamples.indices``).
        scores: optional ``[M, k]`` scores; a sample in the top list of several modes goes to the mode where
            its score is largest (without scores: the first such mode).

    Returns:
        ``(rows, membership)``: the distinct sample indices (ascending) and, for each, its mode position in
        ``0..M-1``.
    """
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 2 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise SpecError(
            f"indices: expected a non-empty integer array [M, k], got shape {idx.shape} ({idx.dtype})"
        )
    if scores is None:
        sc = -np.arange(idx.shape[0], dtype=np.float64)[:, None].repeat(
            idx.shape[1], axis=1
        )  # earlier mode wins
    else:
        sc = np.asarray(
            scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64
        )
        if sc.shape != idx.shape:
            raise SpecError(f"scores: expected the shape of indices {idx.shape}, got {sc.shape}")
    best: dict[int, tuple[float, int]] = {}
    for mode in range(idx.shape[0]):
        for row, score in zip(idx[mode].tolist(), sc[mode].tolist(), strict=True):
            if row not in best or score > best[row][0]:
                best[row] = (score, mode)
    rows = np.array(sorted(best), dtype=np.int64)
    return rows, np.array([best[r][1] for r in rows.tolist()], dtype=np.int64)


def kmeans_agreement(
    x_union: Any,
    y_union: Any,
    membership: Sequence[int] | np.ndarray,
    seed: int = 0,
    *,
    n_init: int = 10,
    kernel_x: Kernel | None = None,
    kernel_y: Kernel | None = None,
) -> dict[str, float]:
    """Does plain clustering under each embedding recover the SPEC modes?

    KMeans with k = number of distinct modes is run on the union of the modes' top samples, once on
    ``x_union: [m, p]`` and once on ``y_union: [m, q]``; each clustering is compared with ``membership``
    (the mode of each row, see :func:`mode_membership`) by normalised and adjusted mutual information.
    Modes that x captures should give high ``nmi_x`` and low ``nmi_y``.

    Args:
        seed, n_init: passed to :class:`sklearn.cluster.KMeans` (``random_state``, ``n_init``).
        kernel_x, kernel_y: optional fitted kernels with a feature map; KMeans then runs on the kernel
            features (e.g. L2-normalised rows for the cosine kernel), the geometry SPEC compared.

    Returns:
        ``{"nmi_x", "ami_x", "nmi_y", "ami_y"}``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    x = as_matrix(x_union, "x_union", dtype=torch.float64)
    y = as_matrix(y_union, "y_union", dtype=torch.float64)
    check_pair(x, y, ("x_union", "y_union"))
    labels = np.asarray(membership)
    if labels.shape != (x.shape[0],):
        raise SpecError(f"membership: expected one mode per row ({x.shape[0]}), got shape {labels.shape}")
    n_clusters = len(np.unique(labels))
    if n_clusters < 2 or n_clusters >= x.shape[0]:
        raise SpecError(
            f"membership: expected between 2 and {x.shape[0] - 1} distinct modes for {x.shape[0]} rows, "
            f"got {n_clusters}"
        )
    check_positive(n_init, "n_init", integer=True)
    out: dict[str, float] = {}
    for side, z, kernel in (("x", x, kernel_x), ("y", y, kernel_y)):
        if kernel is not None:
            kernel = _fitted(kernel, f"kernel_{side}")
            kernel.check_input(z, f"{side}_union")
            z = kernel.features(z)  # [m, D]
        km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
        pred = km.fit_predict(z.cpu().numpy())
        out[f"nmi_{side}"] = float(normalized_mutual_info_score(labels, pred))
        out[f"ami_{side}"] = float(adjusted_mutual_info_score(labels, pred))
    return {key: out[key] for key in ("nmi_x", "ami_x", "nmi_y", "ami_y")}


def label_composition(labels: Sequence[str], top: int | None = None) -> list[tuple[str, float]]:
    """Fraction of each label among a mode's top samples, largest first (ties by label).

    ``top`` keeps only the most frequent labels; the fractions are still of all samples.
    """
    if isinstance(labels, str) or len(labels) == 0:
        raise SpecError(f"labels: expected a non-empty list of labels, got {labels!r}")
    counts = Counter(str(label) for label in labels)
    n = len(labels)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top is not None:
        check_positive(top, "top", integer=True)
        ranked = ranked[:top]
    return [(label, count / n) for label, count in ranked]


def purity(attributes: dict[str, Sequence[str]], members: Sequence[int]) -> dict[str, tuple[str, float]]:
    """For each planted attribute: its majority value among the samples ``members`` and that value's fraction.

    Args:
        attributes: attribute name -> value per sample of the whole dataset (e.g. ``ds.attributes``).
        members: indices of a mode's top samples into that dataset.

    Example:
        >>> purity({"shape": ["disc", "disc", "star"], "colour": ["red", "blue", "red"]}, [0, 1])
        {'shape': ('disc', 1.0), 'colour': ('blue', 0.5)}
    """
    if not isinstance(attributes, dict) or not attributes:
        raise SpecError(
            f"attributes: expected a non-empty dict name -> values per sample, got {attributes!r}"
        )
    members = [int(i) for i in (members.tolist() if hasattr(members, "tolist") else members)]
    if not members:
        raise SpecError("members: expected at least one sample index, got none")
    out: dict[str, tuple[str, float]] = {}
    for name, values in attributes.items():
        bad = [i for i in members if not 0 <= i < len(values)]
        if bad:
            raise SpecError(
                f"members: index {bad[0]} is out of range for attribute {name!r} with {len(values)} values"
            )
        value, fraction = label_composition([values[i] for i in members])[0]
        out[name] = (value, fraction)
    return out
