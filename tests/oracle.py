"""Dense numpy/scipy oracle of SPEC: build L = (K_x - eta K_y) / n explicitly and eigh it."""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.spatial.distance import cdist


def gram(a: np.ndarray, kind: str, sigma: float | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if kind == "linear":
        return a @ a.T
    if kind == "cosine":
        b = a / np.linalg.norm(a, axis=1, keepdims=True)
        return b @ b.T
    if kind == "gaussian":
        return np.exp(-cdist(a, a, "sqeuclidean") / (2 * sigma**2))
    raise ValueError(kind)


def difference(x, y, kx="cosine", ky="cosine", eta=1.0, sigma_x=None, sigma_y=None) -> np.ndarray:
    n = len(x)
    return (gram(x, kx, sigma_x) - eta * gram(y, ky, sigma_y)) / n


def spectrum(lmat: np.ndarray, keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of the ``keep`` modes of largest magnitude."""
    w, v = scipy.linalg.eigh(lmat)
    keep = len(w) if keep is None else keep
    idx = np.argsort(-np.abs(w), kind="stable")[:keep]
    idx = idx[np.argsort(-w[idx], kind="stable")]
    return w[idx], v[:, idx]
