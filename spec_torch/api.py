"""One-call entry point: ``spec(x, y)``, choosing the feature (linear in n) or the exact (n x n) route."""

from __future__ import annotations

from typing import Any

import torch

from ._validate import as_matrix, check_fits, check_pair, check_positive
from .covariance import DiffCovariance
from .errors import SpecError
from .kernels import Kernel, resolve_kernel
from .result import SpecResult
from .solver import check_top_k, solve_exact

__all__ = ["spec", "difference_matrix"]

_METHODS = ("auto", "exact", "features")


def difference_matrix(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel_x: Kernel,
    kernel_y: Kernel,
    eta: float = 1.0,
    block_size: int = 4096,
) -> torch.Tensor:
    """Dense ``L = (K_x - eta K_y) / n``, ``[n, n]``, built in row blocks with fitted kernels."""
    n = x.shape[0]
    out = torch.empty(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        kx = kernel_x.gram(x[start:stop], x)  # [b, n]
        ky = kernel_y.gram(y[start:stop], y)  # [b, n]
        out[start:stop] = (kx.double() - eta * ky.double()) / n
    return (out + out.T) / 2


def _choose(method: str, n: int, p: int, q: int, kx: Kernel, ky: Kernel) -> str:
    if method not in _METHODS:
        raise SpecError(f"method: expected one of {_METHODS}, got {method!r}")
    has_features = kx.has_features and ky.has_features
    if method == "features" and not has_features:
        which = "kernel_x" if not kx.has_features else "kernel_y"
        raise SpecError(f"{which}: method='features' needs a feature map; give GaussianKernel(rff_dim=...)")
    if method != "auto":
        return method
    if not has_features:
        return "exact"
    d = kx.feature_dim(p) + ky.feature_dim(q)
    cost_exact = n * n * (p + q) + n**3
    cost_features = n * d * d + d**3
    return "exact" if cost_exact < cost_features else "features"


def spec(
    x: Any,
    y: Any,
    kernel_x: str | Kernel = "cosine",
    kernel_y: str | Kernel = "cosine",
    eta: float = 1.0,
    method: str = "auto",
    top_k: int | None = None,
    batch_size: int = 8192,
    accumulate_dtype: torch.dtype | None = None,
    replicates: int | None = None,
    seed: int = 0,
    level: float = 0.9,
    groups: int | None = None,
) -> SpecResult:
    """Compare two embeddings of the same samples.

    Args:
        x: ``[n, p]`` first embedding (torch tensor or numpy array).
        y: ``[n, q]`` second embedding of the same samples, same order.
        kernel_x, kernel_y: ``"cosine"``, ``"linear"``, ``"gaussian"`` or a Kernel object.
        eta: weight of the y kernel in ``K_x - eta K_y`` (> 0).
        method: ``"features"`` (streamed ``D x D`` covariance, linear in n), ``"exact"`` (``n x n`` matrix),
            or ``"auto"``: the cheaper of the two (always exact for a Gaussian kernel without ``rff_dim``).
        top_k: ``None`` for the whole spectrum, or the number of strongest modes of each sign (iterative solver).
        batch_size: rows per streamed batch on the feature route.
        accumulate_dtype: e.g. ``torch.float64`` for float64 sums from float32 features.
        replicates: R >= 2 bootstrap replicates for ``eigenvalue_ci``, ``spec_diff_ci``, ``heldout_eigenvalues``
            and ``stability`` (docs/uncertainty.md); ``None``/``0`` skips them. Needs the feature route.
        seed: seeds the group assignment's hash and the resampling (deterministic for a seed).
        level: interval level (default 0.9).
        groups: number of groups the samples are split into for the replicates (default 32 when
            ``replicates`` is given; at most n // 2).

    Returns:
        A :class:`SpecResult`.

    Example:
        >>> import torch, spec_torch as st
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 8, generator=g), torch.randn(200, 6, generator=g)
        >>> res = st.spec(x, y, kernel_x="cosine", kernel_y="cosine")
        >>> round(float(res.eigenvalues.sum()), 6)  # trace(L) = 1 - eta for cosine kernels
        0.0
    """
    x = as_matrix(x, "x")
    y = as_matrix(y, "y", device=x.device)
    check_pair(x, y)
    check_positive(eta, "eta")
    kx = resolve_kernel(kernel_x, "kernel_x")
    ky = resolve_kernel(kernel_y, "kernel_y")
    kx.check_input(x, "x")
    ky.check_input(y, "y")
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if replicates:
        return _spec_with_uncertainty(
            x, y, kx, ky, eta, method, top_k, batch_size, accumulate_dtype, replicates, seed, level, groups
        )
    route = _choose(method, n, p, q, kx, ky)
    if route == "features":
        acc = DiffCovariance(kx, ky, accumulate_dtype=accumulate_dtype)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            acc.update(xb, yb)
        return acc.compute(eta=eta, top_k=top_k, sync_dist=False)
    kx = kx if kx.is_fitted else kx.fit(x)
    ky = ky if ky.is_fitted else ky.fit(y)
    d = (kx.feature_dim(p) + ky.feature_dim(q)) if (kx.has_features and ky.has_features) else n
    check_top_k(top_k, min(n, d))
    # L, eigh's eigenvectors and workspace: about 3 n x n float64 matrices
    check_fits(3 * n * n * 8, x.device, f"the exact route with n = {n} (n x n matrices)", "method")
    lmat = difference_matrix(x, y, kx, ky, float(eta))
    evals, v = solve_exact(lmat, top_k=top_k, keep=min(n, d))
    return SpecResult.from_exact(
        evals,
        v,
        data=(x, y),
        n=n,
        eta=float(eta),
        kernel_x=kx,
        kernel_y=ky,
        dims=(p, q),
        scale=_trace_scale(x, y, kx, ky, float(eta)),
    )


def _trace_scale(x: torch.Tensor, y: torch.Tensor, kx: Kernel, ky: Kernel, eta: float) -> float:
    """``(tr K_x + eta tr K_y) / n``, computed row block by row block from the kernels' diagonals."""
    n = x.shape[0]
    tx = sum(float(torch.diagonal(kx.gram(b, b)).sum()) for b in x.split(1024))
    ty = sum(float(torch.diagonal(ky.gram(b, b)).sum()) for b in y.split(1024))
    return (tx + eta * ty) / n


def _spec_with_uncertainty(
    x, y, kx, ky, eta, method, top_k, batch_size, accumulate_dtype, replicates, seed, level, groups
) -> SpecResult:
    """The feature route with group-wise sums (row positions as sample indices) and ``compute(replicates=R)``."""
    for k, name in ((kx, "kernel_x"), (ky, "kernel_y")):
        if not k.has_features:
            raise SpecError(
                f"{name}: {k!r} has no finite feature map, so replicates (intervals, held-out eigenvalues, "
                "stability) cannot be computed from group sums; use Nystrom features or random Fourier "
                "features (GaussianKernel(rff_dim=...)), or replicates=None"
            )
    if method == "exact":
        raise SpecError("method: replicates need the feature route; use method='features' or 'auto'")
    if method not in _METHODS:
        raise SpecError(f"method: expected one of {_METHODS}, got {method!r}")
    from .uncertainty import DEFAULT_GROUPS

    n = x.shape[0]
    if groups is None:
        groups = min(DEFAULT_GROUPS, n // 2)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"seed: expected a non-negative integer, got {seed!r}")
    acc = DiffCovariance(kx, ky, accumulate_dtype=accumulate_dtype, groups=groups, group_seed=seed)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        acc.update(x[start:stop], y[start:stop], index=torch.arange(start, stop))
    return acc.compute(eta=eta, top_k=top_k, sync_dist=False, replicates=replicates, level=level, seed=seed)
