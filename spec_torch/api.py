"""One-call entry point ``spec(x, y)`` and the one route choice (:func:`choose_route`) every caller shares."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ._validate import (
    as_matrix,
    check_accumulate_dtype,
    check_fits,
    check_pair,
    check_positive,
    check_seed,
    memory_available,
)
from .covariance import MAX_ETA, DiffCovariance
from .errors import SpecError
from .factor_intervals import attach_factor_uncertainty, check_replicate_groups
from .kernels import Kernel, resolve_kernel
from .result import SpecResult
from .solver import check_top_k, largest_magnitude, solve_exact

__all__ = ["spec", "difference_matrix", "choose_route", "shuffled_spec_diff_dense"]

_METHODS = ("auto", "exact", "features")

#: eigh of an n x n (or D x D) matrix costs about this many times n^3 multiply-adds of a GEMM
_EIGH_FACTOR = 4


def choose_route(
    method: str,
    n: int,
    p: int,
    q: int,
    kernel_x: Kernel,
    kernel_y: Kernel,
    *,
    rows_at_hand: bool = True,
) -> str:
    """The route of one comparison: ``"exact"`` (the n x n matrix) or ``"features"`` (the D x D covariance).

    ``method="auto"`` takes the cheaper in multiply-adds. Exact: ``n^2 (p' + q')`` for the kernel matrices
    (``p'`` = the input width for exact kernels, the feature width D for explicit random features) plus the
    eigh, ``n^3``. Features: ``n D^2`` for the sums plus the eigh of ``min(n, D)^3`` when the rows are at hand
    (with D > n the features route solves in the n x n dual), ``D^3`` when they are streamed only.
    A Gaussian kernel with ``rff_dim="auto"`` counts as exact on the exact route and as
    :data:`~spec_torch.kernels.AUTO_RFF_DIM` random frequencies on the features route (:meth:`Kernel.for_route`).

    Args:
        method: ``"auto"``, ``"exact"`` or ``"features"``.
        n: number of samples; p, q: input widths.
        kernel_x, kernel_y: the (possibly unfitted) kernels.
        rows_at_hand: whether all n rows can be held at once (False: streamed from disk or sharded over ranks).
    """
    if method not in _METHODS:
        raise SpecError(f"method: expected one of {_METHODS}, got {method!r}")
    has_features = kernel_x.has_features and kernel_y.has_features
    if method == "features" and not has_features:
        which = "kernel_x" if not kernel_x.has_features else "kernel_y"
        raise SpecError(f"{which}: method='features' needs a feature map; give GaussianKernel(rff_dim=...)")
    if method != "auto":
        return method
    if not has_features:
        return "exact"
    d = kernel_x.feature_dim(p) + kernel_y.feature_dim(q)
    cost_exact = n * n * (kernel_x.exact_dim(p) + kernel_y.exact_dim(q)) + _EIGH_FACTOR * n**3
    solve = min(n, d) if rows_at_hand else d
    cost_features = n * d * d + _EIGH_FACTOR * solve**3
    return "exact" if cost_exact < cost_features else "features"


def _check_kernels_fitted(kx: Kernel, ky: Kernel) -> None:
    for k, name in ((kx, "kernel_x"), (ky, "kernel_y")):
        if not k.is_fitted:
            raise SpecError(f"{name}: {k!r} is not fitted; call kernel.fit(sample) first")


def difference_matrix(
    x: Any,
    y: Any,
    kernel_x: Kernel,
    kernel_y: Kernel,
    eta: float = 1.0,
    block_size: int = 4096,
    center: bool = False,
) -> torch.Tensor:
    """Dense ``L = (K_x - eta K_y) / n``, ``[n, n]`` float64, built in row blocks with fitted kernels.

    The inputs are validated as in :func:`spec` and the kernels evaluated in float64 (the Gaussian on inputs
    centred on their mean); the diagonal is the kernels' own (exactly 1 for cosine and Gaussian kernels).
    ``center=True`` returns ``H L H`` with ``H = I - 11^T / n``.
    """
    x = as_matrix(x, "x")
    y = as_matrix(y, "y", device=x.device)
    check_pair(x, y)
    eta = check_positive(eta, "eta", max_value=MAX_ETA)
    kx, ky = resolve_kernel(kernel_x, "kernel_x"), resolve_kernel(kernel_y, "kernel_y")
    _check_kernels_fitted(kx, ky)
    kx.check_input(x, "x")
    ky.check_input(y, "y")
    n = x.shape[0]
    x64, y64 = x.double(), y.double()
    out = torch.empty(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        kxb = kx.gram(x64[start:stop], x64).double()  # [b, n]
        kyb = ky.gram(y64[start:stop], y64).double()  # [b, n]
        out[start:stop] = (kxb - eta * kyb) / n
    out = (out + out.T) / 2
    out.diagonal().copy_((kx.diag(x64).double() - eta * ky.diag(y64).double()) / n)
    if not bool(torch.isfinite(out).all()):
        raise SpecError("x/y: the kernel matrices overflow float64; rescale the embeddings")
    if center:
        col = out.mean(0)  # [n], = row means (L is symmetric)
        out = out - col[None, :] - col[:, None] + col.mean()
    return out


def shuffled_spec_diff_dense(
    x: Any,
    y: Any,
    kernel_x: Kernel,
    kernel_y: Kernel,
    eta: float = 1.0,
    center: bool = False,
    block_size: int = 4096,
) -> float:
    """The permutation reference of :func:`spec_torch.solver.shuffled_spec_diff` from kernel values alone.

    Write each feature as its mean plus a centred part, ``phi = mu + phi^c``. The covariance with the cross
    block averaged over shuffles is ``C' = blockdiag(XX_c, eta YY_c) / n + m m^T``, ``m = [mu_x; sqrt(eta) mu_y]``:
    the covariance of 2n + 1 rows (n centred x rows, n centred y rows, and m). Its sample-space operator has
    the same nonzero eigenvalues as ``J C'`` and needs kernel values only (``K = [k(s_i, s_j)] / n``)::

        [[H K_x H,    0,             a],     a = H K_x 1 / sqrt(n)
         [0,         -eta H K_y H,   b],     b = -eta H K_y 1 / sqrt(n)
         [a^T,        b^T,           c]]     c = 1^T (K_x - eta K_y) 1 / n

    Centred, the border vanishes and the value is ``max(lambda_max(H K_x H), eta lambda_max(H K_y H))``.
    ``x: [n, p]``, ``y: [n, q]`` validated, kernels fitted; float64, in row blocks of ``block_size``.
    The two ends of the spectrum come from the block Krylov solver (:func:`~spec_torch.solver.largest_magnitude`,
    ``eigvalsh`` its fallback).
    """
    n = x.shape[0]
    out = torch.zeros(2 * n + 1, 2 * n + 1, dtype=torch.float64, device=x.device)
    border = out[-1, :-1]  # [2n]: a, then b
    parts = ((kernel_x, x, 1.0, slice(0, n)), (kernel_y, y, -eta, slice(n, 2 * n)))
    for kernel, data, sign, rows in parts:
        k = out[rows, rows]  # [n, n] view, filled with K = [k(s_i, s_j)] / n
        data = data.double()
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            k[start:stop] = kernel.gram(data[start:stop], data).double() / n  # [b, n]
        k.diagonal().copy_(kernel.diag(data).double() / n)
        row = k.mean(1)  # [n]: K 1 / n
        grand = row.mean()  # 1^T K 1 / n^2
        k.sub_(row[None, :]).sub_(row[:, None]).add_(grand).mul_(sign)  # sign * H K H (K symmetric)
        border[rows] = sign * math.sqrt(n) * (row - grand)  # H K 1 / sqrt(n)
        out[-1, -1] += sign * n * grand  # 1^T K 1 / n
    # only max |lambda| is needed: the block Krylov solver for the two ends (measured, cosine, 2 threads, the same
    # value: n = 1,000 and 3,000, 0.20 s and 1.5 s against eigvalsh's 0.76 s and 4.6 s)
    if center:  # no border: blockdiag(H K_x H, -eta H K_y H), whose two ends are the blocks' tops
        return largest_magnitude(out[:-1, :-1], iterative=True)
    out[:-1, -1] = border
    return largest_magnitude(out, iterative=True)


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
    center: bool = False,
    replicates: int | None = None,
    seed: int = 0,
    level: float = 0.9,
    groups: int | None = None,
    reference: bool | None = None,
    interval: str | None = None,
) -> SpecResult:
    """Compare two embeddings of the same samples.

    Args:
        x: ``[n, p]`` first embedding (torch tensor or numpy array).
        y: ``[n, q]`` second embedding of the same samples, same order.
        kernel_x, kernel_y: ``"cosine"``, ``"linear"``, ``"gaussian"`` or a Kernel object.
        eta: weight of the y kernel in ``K_x - eta K_y`` (> 0).
        method: ``"features"`` (streamed ``D x D`` covariance, linear in n; solved in the n x n dual when
            D > n), ``"exact"`` (``n x n`` matrix), or ``"auto"``: the cheaper (:func:`choose_route`); when that
            is the features route and it leaves a mode below resolution (``res.below_resolution``: a value or
            gap under its estimated error, e.g. nearly identical embeddings), the exact route is solved instead
            for ``n <= RESOLVE_MAX_N`` and ``res.re_solve`` says why (docs/numerics.md).
        top_k: ``None`` for the whole spectrum, or at most this many strongest modes of each sign (iterative
            solver); fewer where fewer modes of a sign exist, never padded with the other sign or zeros.
        batch_size: rows per streamed batch on the feature route (the result does not depend on it).
        accumulate_dtype: ``None``/``torch.float64`` (default: float64 features and sums) or
            ``torch.float32`` (faster, its error documented in docs/numerics.md).
        center: centre both kernels (``H K H``), removing the uniform mode; default False (the paper's SPEC).
        replicates: R >= 2 bootstrap replicates for ``eigenvalue_ci``, ``spec_diff_ci``, ``heldout_eigenvalues``
            and ``stability`` (docs/uncertainty.md); ``None``/``0`` skips them. On every route, resampling groups
            of rows (rows and columns of L together); the route is chosen as without them. The features route
            with ``D <= n`` resamples its group sums: ``R + 2S`` solves of ``D x D`` (S = min(R, 10) held-out
            splits), ``G D^2`` float64 sums. The n x n routes (exact kernels; the dual solve when ``D > n``)
            resample an exact factor of L of rank ``r <= min(n, D)`` (:mod:`spec_torch.factor_intervals`):
            every eigenpair of L (the exact solve's own; one more n x n build and eigh with ``center`` or
            ``top_k``), then ``R + 2S`` solves of ``r x r`` (``O(r^3)`` each: a factorisation of C and an eigh of
            S; above rank :data:`~spec_torch.factor_intervals.FULL_SOLVE_MAX_RANK` the S solve keeps the strongest
            :data:`~spec_torch.factor_intervals.CAPPED_TOP_K` modes of each sign, and only they get intervals)
            and ``n r + (G + 14) r^2`` float64 of memory, checked before allocation. ``uncertainty`` records
            which ran and its size. Refused with fewer than 16 samples or 8 groups.
        seed: seed of the uniform row sample that ``sigma="auto"`` is fitted on, and of the replicates' group
            assignment hash and resampling (deterministic for a seed).
        level: interval level (default 0.9).
        groups: number of groups the samples are split into for the replicates (default ``min(32, n // 2)``
            when ``replicates`` is given; at least 8).
        interval: the bootstrap interval, one of ``spec_torch.uncertainty.INTERVALS`` (default ``"basic"``,
            chosen from coverage measurements in docs/uncertainty.md).
        reference: compute the permutation reference ``spec_diff_null`` (SPEC-diff with the pairing shuffled)
            and ``spec_diff_ratio`` (docs/uncertainty.md). Its cost: about one more solve on the feature route;
            on the n x n routes an eigenvalue solve of a (2n+1)-square matrix (centred: two n x n), measured at
            1.3-1.5x the full n x n solve. ``None`` (default): computed, except on the n x n routes when that matrix
            does not fit in memory (then skipped with a warning); True: required (SpecError when it does not
            fit); False: skipped.

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
    eta = check_positive(eta, "eta", max_value=MAX_ETA)
    check_positive(batch_size, "batch_size", integer=True)
    check_accumulate_dtype(accumulate_dtype)
    seed = check_seed(seed)
    kx = resolve_kernel(kernel_x, "kernel_x")
    ky = resolve_kernel(kernel_y, "kernel_y")
    kx.check_input(x, "x")
    ky.check_input(y, "y")
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    groups = check_replicate_groups(replicates, groups, n)  # None: no replicates
    route = choose_route(method, n, p, q, kx, ky)
    kx, ky = kx.for_route(route), ky.for_route(route)
    _check_route_fits(route, n, p, q, kx, ky, accumulate_dtype, x.device)  # before a kernel is fitted
    if not (kx.is_fitted and ky.is_fitted):  # sigma="auto": a seeded uniform sample of all rows, not a batch
        rows = _fit_rows(n, seed, x.device, size=max(FIT_ROWS, kx.fit_rows, ky.fit_rows))
        kx, ky = kx.fit(x[rows]), ky.fit(y[rows])
    d = (kx.feature_dim(p) + ky.feature_dim(q)) if route == "features" else None
    if groups is not None and route == "features" and d <= n:  # replicate solves of D <= n: the group sums
        return _spec_with_uncertainty(
            x,
            y,
            kx,
            ky,
            eta,
            method,
            top_k,
            batch_size,
            accumulate_dtype,
            replicates,
            seed,
            level,
            groups,
            center,
            reference,
            interval=interval,
        )
    if route == "features" and d <= n:
        acc = DiffCovariance(kx, ky, accumulate_dtype=accumulate_dtype)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            acc.update(xb, yb)
        res = acc.compute(
            eta=eta, top_k=top_k, sync_dist=False, center=center, reference=reference is not False
        )
        return _resolve_auto(res, x, y, kx, ky, eta, top_k, center) if method == "auto" else res
    uncertainty = None
    if groups is not None:  # replicates on the n x n route: from an exact factor of L
        uncertainty = {
            "replicates": replicates,
            "groups": groups,
            "level": level,
            "seed": seed,
            "interval": interval,
        }
    return _solve_dense(x, y, kx, ky, eta, route, top_k, center, reference, uncertainty)


#: ``method="auto"`` re-solves a features-route result with modes below resolution on the exact route up to
#: this many samples (an n x n eigh: about 4 n^3 multiply-adds, 2 GiB of float64 matrices at this n); above,
#: the modes keep their ``below_resolution`` flag. A size rule, so the result never depends on free memory.
RESOLVE_MAX_N = 8192


def _resolve_auto(res: SpecResult, x, y, kx, ky, eta, top_k, center) -> SpecResult:
    """``method="auto"``: the exact route's result when the features route left a mode unresolved.

    A mode (``|lambda| > zero_tol``) whose value or gap is below its estimated error
    (:attr:`SpecResult.below_resolution`) is not determined by the D x D solve; with the rows at hand and
    ``n <= RESOLVE_MAX_N`` the same kernels are solved on the n x n matrix (their differences taken
    entrywise, error about ``eps * scale / sqrt(n)``) and ``re_solve`` says why. The features route's
    permutation reference (a large value, resolved there) is kept.
    """
    unresolved, modes = unresolved_modes(res)
    if not unresolved:
        return res
    n = res.n
    if n > RESOLVE_MAX_N:
        warnings.warn(
            f"method: {unresolved} of {modes} modes are below the features route's resolution "
            f"(estimated error up to {float(res.eigenvalue_error.max()):.1e}) and n = {n} is above "
            f"RESOLVE_MAX_N = {RESOLVE_MAX_N} for an exact re-solve; they carry below_resolution "
            "(method='exact' solves the n x n matrix)",
            stacklevel=3,
        )
        return res
    out = _solve_dense(x, y, kx, ky, eta, "exact", top_k, center, reference=False)
    out.spec_diff_null = res.spec_diff_null
    out.re_solve = re_solve_reason(res)
    return out


def unresolved_modes(res: SpecResult) -> tuple[int, int]:
    """``(unresolved, modes)``: how many of ``res``'s modes (``|lambda| > zero_tol``) are below resolution."""
    modes = res.eigenvalues.abs().cpu() > res.zero_tol
    return int((res.below_resolution & modes).sum()), int(modes.sum())


def re_solve_reason(res: SpecResult) -> str:
    """``re_solve`` of the exact-route result that replaces the features-route result ``res``."""
    unresolved, modes = unresolved_modes(res)
    return (
        f"the features route left {unresolved} of {modes} modes below resolution (a value or gap under its "
        f"estimated error, up to {float(res.eigenvalue_error.max()):.1e}); solved on the exact route"
    )


def _solve_dense(x, y, kx, ky, eta, route, top_k, center, reference, uncertainty=None) -> SpecResult:
    """The n x n route: the exact kernels, or the features route's dual ``A J A^T`` when D > n.

    ``uncertainty``: ``replicates, groups, level, seed, interval`` for intervals from an exact factor of L
    (:func:`~spec_torch.factor_intervals.attach_factor_uncertainty`), or None."""
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    d = (kx.feature_dim(p) + ky.feature_dim(q)) if route == "features" else None
    if d is None:
        d = (kx.feature_dim(p) + ky.feature_dim(q)) if (kx.has_features and ky.has_features) else n
    keep = min(n, d)
    top_k = check_top_k(top_k, keep)
    block = min(n, 4096)
    # after L is freed, the permutation reference's (2n + 1)-square matrix and eigvalsh's copy: 8 n x n
    reference = _reference_fits(reference, (8 * n * n + 2 * block * n) * 8, x.device, n)
    lmat = difference_matrix(x, y, kx, ky, eta, block_size=block)  # [n, n]
    shift = None
    if center:  # H L H; the column means are kept for scoring: (H L H v)_i = (L v)_i - <means, v>
        col = lmat.mean(0)  # [n]
        lmat.sub_(col[None, :]).sub_(col[:, None]).add_(col.mean())
    scale = _trace_scale(x, y, kx, ky, eta)
    zero_rtol = torch.finfo(x.dtype).eps
    evals, v, solver = solve_exact(lmat, top_k=top_k, keep=keep, zero_tol=zero_rtol * scale)
    if center:
        shift = col @ v  # [n] @ [n, K] -> [K]
    del lmat
    null = None
    if reference:
        null = shuffled_spec_diff_dense(x, y, kx, ky, eta, center=center, block_size=block)
    result = SpecResult.from_exact(
        evals,
        v,
        data=(x, y),
        method=route,
        n=n,
        eta=eta,
        kernel_x=kx,
        kernel_y=ky,
        dims=(p, q),
        scale=scale,
        solver="dual" if route == "features" else solver,
        center=center,
        zero_rtol=zero_rtol,
        shift=shift,
        spec_diff_null=null,
    )
    if uncertainty is not None:  # intervals from an exact factor of L (spec_torch.factor_intervals)
        if center or top_k is not None:  # the factor needs every eigenpair of the uncentred L: one more solve
            lmat = difference_matrix(x, y, kx, ky, eta, block_size=block)  # [n, n]
            evals, v = torch.linalg.eigh(lmat)  # [n], [n, n]
            del lmat
        attach_factor_uncertainty(
            result,
            (evals, v),
            route="dual" if route == "features" else "exact",
            top_k=top_k,
            center=center,
            **uncertainty,
        )
    return result


#: rows of the seeded uniform sample that data-dependent kernel settings (sigma="auto") are fitted on, or more
#: where a kernel needs more (:attr:`Kernel.fit_rows`, e.g. Nystrom's landmarks)
FIT_ROWS = 2000


def _fit_rows(n: int, seed: int, device: torch.device, size: int = FIT_ROWS) -> torch.Tensor:
    """A seeded uniform sample of ``min(n, size)`` row indices (sorted), the rows kernels are fitted on."""
    if n <= size:
        return torch.arange(n, device=device)
    gen = torch.Generator().manual_seed(check_seed(seed))
    return torch.randperm(n, generator=gen)[:size].sort().values.to(device)


def _check_route_fits(
    route: str, n: int, p: int, q: int, kx: Kernel, ky: Kernel, accumulate_dtype: Any, device: torch.device
) -> None:
    """Refuse from the sizes alone, before any kernel is fitted or matrix allocated, a comparison whose
    matrices would not fit on ``device``: the D x D sums on the features route (D <= n), otherwise the n x n
    matrices plus, for kernels evaluated through features (random Fourier features), the feature blocks."""
    from .covariance import check_state_fits

    if route == "features":
        if not (kx.has_features and ky.has_features):
            return  # refused with its own message (replicates need feature maps)
        dx, dy = kx.feature_dim(p), ky.feature_dim(q)
        if dx + dy <= n:
            check_state_fits(dx, dy, (accumulate_dtype or torch.float64).itemsize, device, kernels=(kx, ky))
            return
    block = min(n, 4096)
    # L, eigh's copy, eigenvectors and workspace, H L H: 4 n x n float64 matrices, plus two [b, n] blocks
    need = (4 * n * n + 2 * block * n) * 8
    what = f"the exact route with n = {n} (n x n matrices)"
    # a kernel evaluated through its features holds both sides' features and their projections (float64)
    width = max(kx.exact_dim(p), ky.exact_dim(q))
    if width > max(p, q):
        need += 3 * (block + n) * width * 8
        what += f" with {width} features per row"
    rff = any(isinstance(getattr(k, "rff_dim", None), int) for k in (kx, ky))
    check_fits(need, device, what, "rff_dim" if rff and width > max(p, q) else "method")


def _reference_fits(reference: bool | None, n_bytes: int, device: torch.device, n: int) -> bool:
    """Whether the n x n routes compute the permutation reference (see :func:`spec`'s ``reference``)."""
    if reference is False:
        return False
    what = f"the permutation reference on the exact route with n = {n} ((2n+1)-square matrix)"
    if reference is True:
        check_fits(n_bytes, device, what, "reference")
        return True
    if n_bytes > memory_available(device):
        warnings.warn(
            f"reference: {what} needs about {n_bytes / 2**30:.1f} GiB on {device}, more than is available; "
            "spec_diff_null is left None (reference=False skips it without this warning)",
            stacklevel=3,
        )
        return False
    return True


def _trace_scale(x: torch.Tensor, y: torch.Tensor, kx: Kernel, ky: Kernel, eta: float) -> float:
    """``(tr K_x + eta tr K_y) / n`` from the kernels' diagonals."""
    tx = float(kx.diag(x.double()).sum())
    ty = float(ky.diag(y.double()).sum())
    out = (tx + eta * ty) / x.shape[0]
    if not (math.isfinite(out) and out > 0):
        raise SpecError(f"x/y: the kernel matrices have trace {out:.3g}; expected a finite positive value")
    return out


def _spec_with_uncertainty(
    x,
    y,
    kx,
    ky,
    eta,
    method,
    top_k,
    batch_size,
    accumulate_dtype,
    replicates,
    seed,
    level,
    groups,
    center,
    reference,
    interval=None,
) -> SpecResult:
    """The feature route with group-wise sums (row positions as sample indices) and ``compute(replicates=R)``.

    ``groups`` validated (:func:`~spec_torch.factor_intervals.check_replicate_groups`), ``D <= n``."""
    n = x.shape[0]
    acc = DiffCovariance(kx, ky, accumulate_dtype=accumulate_dtype, groups=groups, group_seed=seed)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        acc.update(x[start:stop], y[start:stop], index=torch.arange(start, stop))
    res = acc.compute(
        eta=eta,
        top_k=top_k,
        sync_dist=False,
        replicates=replicates,
        level=level,
        seed=seed,
        center=center,
        reference=reference is not False,
        interval=interval,
    )
    from .uncertainty import solves_needed

    d = acc.xx.shape[0] + acc.yy.shape[0]  # each replicate solves D x D (the n x n routes record their rank)
    res.uncertainty = {
        **res.uncertainty,
        "route": "features",
        "eigensolves": solves_needed(replicates),
        "solve_size": d,
    }
    return res
