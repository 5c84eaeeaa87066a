"""How much random Fourier features move the reported eigenvalues: an estimate on a seeded subsample.

A Gaussian kernel with ``rff_dim=m`` replaces ``k(a, b)`` by ``phi(a)^T phi(b)`` with m random frequencies.
The extreme eigenvalues of ``(K_x - eta K_y) / n`` then carry a random error (the seed-to-seed spread,
falling about as ``1/sqrt(m)``) and a bias (RFF inflates ``|lambda|`` at the extremes, falling about as
``1/m``). :func:`rff_error_estimate` measures both where the exact answer can be afforded: on ``subsample``
rows it compares the extreme eigenvalues of the random-feature route, for a few frequency seeds, with those of
the exact kernels (``rff_dim=None`` copies with the same ``sigma``), both solved densely.

Example:
    >>> import torch, spec_torch as st
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(300, 8, generator=g), torch.randn(300, 4, generator=g)
    >>> kx = st.GaussianKernel(sigma="auto", rff_dim=200, seed=0)
    >>> est = st.rff_error_estimate(x, y, kx, "cosine", subsample=200, seeds=(0, 1))
    >>> est["method"], est["subsample"]
    ('rff-vs-exact-subsample', 200)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._validate import as_matrix, check_pair, check_positive, check_seed
from .errors import SpecError
from .kernels import GaussianKernel, Kernel, resolve_kernel

__all__ = ["rff_error_estimate", "uses_random_features", "APPROX_METHOD"]

#: the ``method`` field of the estimate (spec.json ``approximation.method``)
APPROX_METHOD = "rff-vs-exact-subsample"

#: an exact extreme eigenvalue smaller than this fraction of the largest |eigenvalue| has no meaningful
#: relative error (it is at the noise level of the spectrum); it is left out of the summary
_NEGLIGIBLE = 1e-6


def uses_random_features(kernel: Kernel) -> bool:
    """True for a Gaussian kernel with random Fourier features (an integer ``rff_dim``)."""
    rff_dim = getattr(kernel, "rff_dim", None)
    return isinstance(kernel, GaussianKernel) and isinstance(rff_dim, int) and not isinstance(rff_dim, bool)


def _exact_copy(kernel: Kernel) -> Kernel:
    """The same kernel without random features (same fitted sigma); other kernels are returned as they are."""
    if not uses_random_features(kernel):
        return kernel
    return GaussianKernel(sigma=float(kernel.sigma), rff_dim=None, seed=kernel.seed)


def _reseeded(kernel: Kernel, seed: int) -> Kernel:
    """The same random-feature kernel (same sigma and m) with frequencies drawn from ``seed``."""
    if not uses_random_features(kernel):
        return kernel
    return GaussianKernel(sigma=float(kernel.sigma), rff_dim=int(kernel.rff_dim), seed=int(seed))


def _extremes(evals: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` largest and the ``top`` smallest eigenvalues of a descending spectrum ``[K]``."""
    return evals[:top], evals[::-1][:top]


def rff_error_estimate(
    x: Any,
    y: Any,
    kernel_x: str | Kernel,
    kernel_y: str | Kernel,
    eta: float = 1.0,
    subsample: int = 1000,
    seeds: Sequence[int] = (0, 1, 2, 3),
    top: int = 3,
    sample_seed: int = 0,
) -> dict[str, Any]:
    """Estimate the error random Fourier features cause in the extreme eigenvalues of ``(K_x - eta K_y) / n``.

    On ``m = min(subsample, n)`` rows (a seeded uniform sample), the spectrum of the exact kernels is compared
    with that of the random-feature kernels under each frequency seed in ``seeds`` (same ``sigma``, same
    ``rff_dim``; a kernel without random features is used as it is). Both are dense ``m x m`` solves
    (:func:`spec_torch.spec` with ``method="exact"``), so the cost is ``O(m^3)`` per seed, whatever n is.

    The ``top`` largest and ``top`` most negative eigenvalues are compared rank by rank (``+1`` is the largest,
    ``-1`` the most negative). For each, with exact value ``l`` and random-feature values ``l_s``:

    - ``rel_error``: mean over seeds of ``|l_s - l| / |l|``;
    - ``rel_bias``: ``(mean_s |l_s| - |l|) / |l|``; positive = magnitude inflated by the random features;
    - ``seed_spread``: the standard deviation of ``l_s`` over seeds, divided by ``|l|``.

    Args:
        x: ``[n, p]`` first embedding (tensor or numpy array).
        y: ``[n, q]`` second embedding of the same samples.
        kernel_x, kernel_y: the kernels of the comparison (names, dicts or Kernel objects). Fitted kernels keep
            their ``sigma``; ``sigma="auto"`` is fitted on the whole ``x``/``y`` first, as :func:`spec` would.
            At least one must be a :class:`GaussianKernel` with an integer ``rff_dim``.
        eta: weight of the y kernel (> 0).
        subsample: rows the estimate is computed on (the ``m x m`` exact solve bounds its cost).
        seeds: frequency seeds of the random-feature copies (at least 2, for a spread).
        top: extreme eigenvalues compared on each side.
        sample_seed: seed of the row subsample.

    Returns:
        A JSON-serialisable dict: ``method`` (``"rff-vs-exact-subsample"``), ``subsample`` (m), ``n``,
        ``seeds``, ``top``, ``rff_dim`` (``{"x", "y"}``), ``extremes`` (one dict per compared eigenvalue: ``rank``,
        ``exact``, ``rff_mean``, ``rel_error``, ``rel_bias``, ``seed_spread``), the summaries ``rel_error_mean``,
        ``rel_bias_mean``, ``seed_spread`` (means over the extremes), and ``spec_diff``
        (``{"exact", "rff_mean", "rel_error"}`` of the largest |eigenvalue| on the subsample).

    Raises:
        SpecError: when neither kernel uses random features, or on bad input (shapes, seeds, sizes).
    """
    from .api import spec

    x = as_matrix(x, "x")
    y = as_matrix(y, "y", device=x.device)
    check_pair(x, y)
    check_positive(eta, "eta")
    check_positive(subsample, "subsample", integer=True)
    check_positive(top, "top", integer=True)
    seeds = [check_seed(s, "seeds") for s in seeds]
    sample_seed = check_seed(sample_seed, "sample_seed")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds: expected at least 2 distinct integer seeds, got {seeds!r}")
    kx = resolve_kernel(kernel_x, "kernel_x")
    ky = resolve_kernel(kernel_y, "kernel_y")
    if not (uses_random_features(kx) or uses_random_features(ky)):
        raise SpecError(
            "kernel_x/kernel_y: neither uses random features (GaussianKernel with an integer rff_dim); "
            "there is no approximation error to estimate"
        )
    n = x.shape[0]
    kx = kx if kx.is_fitted else kx.fit(x)  # sigma from the whole data, as the comparison itself
    ky = ky if ky.is_fitted else ky.fit(y)
    m = min(int(subsample), n)
    rows = np.arange(n)
    if m < n:
        rows = np.sort(np.random.default_rng(int(sample_seed)).choice(n, size=m, replace=False))
    idx = torch.from_numpy(rows).to(x.device)
    xs, ys = (
        x[idx].double(),
        y[idx].double(),
    )  # [m, p], [m, q]; float64: the estimate must not add its own error

    def extremes(kernel_x: Kernel, kernel_y: Kernel) -> tuple[np.ndarray, np.ndarray]:
        res = spec(xs, ys, kernel_x=kernel_x, kernel_y=kernel_y, eta=float(eta), method="exact")
        if res.method != "exact":  # the estimate is defined by dense solves only
            raise SpecError(f"internal: expected the exact route, got {res.method!r}")
        return _extremes(res.eigenvalues.double().cpu().numpy(), top)

    ex_pos, ex_neg = extremes(_exact_copy(kx), _exact_copy(ky))  # [t], [t]
    runs = [extremes(_reseeded(kx, s).fit(xs), _reseeded(ky, s).fit(ys)) for s in seeds]
    t_pos = min(len(ex_pos), *(len(p) for p, _ in runs))
    t_neg = min(len(ex_neg), *(len(q) for _, q in runs))
    exact = np.concatenate([ex_pos[:t_pos], ex_neg[:t_neg]])  # [T]
    approx = np.stack([np.concatenate([p[:t_pos], q[:t_neg]]) for p, q in runs])  # [S, T]
    ranks = [f"+{i + 1}" for i in range(t_pos)] + [f"-{i + 1}" for i in range(t_neg)]
    spec_diff = float(np.abs(exact).max()) if exact.size else 0.0
    # an extreme of the wrong sign (e.g. eta != 1 and no negative mode) or at the noise level is left out
    keep = [
        j
        for j, r in enumerate(ranks)
        if abs(exact[j]) > _NEGLIGIBLE * spec_diff and (exact[j] > 0) == r.startswith("+")
    ]
    if not keep:
        raise SpecError("x/y: the exact spectrum on the subsample is zero; nothing to compare")
    extremes_out = []
    for j in keep:
        lam, lam_s = exact[j], approx[:, j]  # scalar, [S]
        extremes_out.append(
            {
                "rank": ranks[j],
                "exact": float(lam),
                "rff_mean": float(lam_s.mean()),
                "rel_error": float(np.mean(np.abs(lam_s - lam)) / abs(lam)),
                "rel_bias": float((np.mean(np.abs(lam_s)) - abs(lam)) / abs(lam)),
                "seed_spread": float(np.std(lam_s, ddof=1) / abs(lam)),
            }
        )
    rff_spec_diff = np.abs(approx).max(axis=1)  # [S] SPEC-diff of each seed (over the compared extremes)
    return {
        "method": APPROX_METHOD,
        "subsample": int(m),
        "n": int(n),
        "seeds": seeds,
        "top": int(top),
        "rff_dim": {
            "x": int(kx.rff_dim) if uses_random_features(kx) else None,
            "y": int(ky.rff_dim) if uses_random_features(ky) else None,
        },
        "extremes": extremes_out,
        "rel_error_mean": _mean(e["rel_error"] for e in extremes_out),
        "rel_bias_mean": _mean(e["rel_bias"] for e in extremes_out),
        "seed_spread": _mean(e["seed_spread"] for e in extremes_out),
        "spec_diff": {
            "exact": spec_diff,
            "rff_mean": float(rff_spec_diff.mean()),
            "rel_error": float(np.mean(np.abs(rff_spec_diff - spec_diff)) / spec_diff),
        },
    }


def _mean(values) -> float:
    values = list(values)
    return float(math.fsum(values) / len(values))
