"""Intervals on the n x n routes: an exact factor of L turns them into the features route's group sums.

The features route resamples groups of rows through their feature sums (:mod:`spec_torch.uncertainty`). The
n x n routes (exact kernels with no finite feature map, and the dual solve of explicit features when D > n) have
no such sums, but L itself has an exact finite factor on the n compared samples. From its eigendecomposition
``L = V diag(lambda) V^T`` (the eigenvalues at the route's numerical-zero level dropped), with
``F_+ = sqrt(n) V_+ |lambda_+|^1/2`` and ``F_- = sqrt(n) V_- |lambda_-|^1/2`` (positive and negative modes),

    n L = F_+ F_+^T - F_- F_-^T,

which is SPEC of the *linear* kernels on the rows ``f_+(i)``, ``f_-(i)`` with ``eta = 1``. Any data set made of
the compared rows (each row ``i`` taken ``w_i`` times: a bootstrap or a half of the groups) has the difference
matrix ``P L P^T`` (P selects the rows), ``= P F J F^T P^T``: the linear-kernel SPEC of the selected factor rows.
So the group sums of the factor's rows reproduce every row-resampled L exactly (rows and columns resampled
together), each resampled set centred on its own means when ``center=True`` (the factor is of the uncentred L).
:func:`attach_factor_uncertainty` runs the features route's whole uncertainty machinery
(:meth:`DiffCovariance.compute` with ``replicates``) on those sums and transplants its per-mode results onto the
exact result's modes, which stay the exact route's: each factor mode is matched to the exact mode of the same
eigenvalue and sample-space eigenvector (:data:`AGREE_RTOL`, :data:`AGREE_OVERLAP`); a mode that does not
match keeps NaN intervals, with a warning naming it.

Cost (stated in ``SpecResult.uncertainty``): the factor needs every eigenpair of L: the exact solve's own when it
was a full, uncentred one, otherwise one more n x n build and ``eigh`` (``O(n^2 (p + q) + n^3)``). Then
``R + 2S`` replicate solves (S held-out splits) of size ``r`` (the rank kept, ``r <= n``): each a Cholesky or
eigh of ``C`` and an eigh of ``S``, ``O(r^3)`` (a bootstrap holds about 63% of the distinct rows, so with r
near n its C is singular and takes the eigh). Above :data:`FULL_SOLVE_MAX_RANK` the solve of ``S`` keeps the
strongest :data:`CAPPED_TOP_K` modes of each sign (block Krylov, ``O(r^2 k)`` per step) and only those modes
get intervals; the factorisation of each resampled C stays ``O(r^3)``, so the cap about halves the cubic work
and bounds the matching, it does not remove it. Memory: the factor ``n r`` plus ``G + 14`` matrices ``r x r`` (group sums, the solves), float64,
checked before allocation (:class:`SpecError` naming ``replicates``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ._validate import check_fits
from .errors import SpecError
from .result import SpecResult

__all__ = [
    "AGREE_OVERLAP",
    "AGREE_RTOL",
    "CAPPED_TOP_K",
    "FULL_SOLVE_MAX_RANK",
    "PER_MODE_FIELDS",
    "attach_factor_uncertainty",
    "check_replicate_groups",
    "difference_factor",
]

#: a factor mode and an exact mode are the same mode when their eigenvalues differ by at most this fraction of
#: ``scale`` (float64 solves of the same operator agree to about 1e-13 of it) ...
AGREE_RTOL = 1e-9
#: ... and their unit sample-space eigenvectors overlap by at least this (well-separated modes: 1 - 1e-20)
AGREE_OVERLAP = 0.999
#: above this rank the replicate solves keep the strongest :data:`CAPPED_TOP_K` modes of each sign only
FULL_SOLVE_MAX_RANK = 2000
CAPPED_TOP_K = 16
#: per-mode fields of an uncertainty result, indexed like ``eigenvalues`` (tensors with a leading K axis, or
#: lists): transplanted from the factor's modes to the exact modes (NaN / "unknown" where unmatched)
PER_MODE_FIELDS = ("eigenvalue_ci", "heldout_eigenvalues", "stability", "heldout_eigenvalue_ci", "support")
#: whole-result fields copied as they are
WHOLE_FIELDS = ("spec_diff_ci",)


def check_replicate_groups(replicates: Any, groups: Any, n: int) -> int | None:
    """Validate ``replicates`` and ``groups`` for ``n`` samples; the number of groups to use (None: no replicates).

    ``groups=None`` means ``min(DEFAULT_GROUPS, n // 2)``. Fewer than :data:`~spec_torch.uncertainty.MIN_GROUPS`
    groups are refused: with G groups a bootstrap has at most ``binom(2G - 1, G)`` distinct resamples (3 at
    G = 2), and its intervals do not cover. When the default is too few because n is, the message names n.
    """
    from .uncertainty import DEFAULT_GROUPS, MIN_GROUPS

    if replicates is None or replicates is False or (isinstance(replicates, int) and replicates == 0):
        return None  # off (as before: any falsy replicates)
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 2:
        raise SpecError(f"replicates: expected an integer >= 2 (or 0/None to skip), got {replicates!r}")
    need = 2 * MIN_GROUPS
    if n < need:
        raise SpecError(
            f"replicates: too few samples (n={n}) for replicates: need at least {need} "
            f"({MIN_GROUPS} groups of 2 or more)"
        )
    if groups is None:
        return min(DEFAULT_GROUPS, n // 2)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < MIN_GROUPS:
        raise SpecError(
            f"groups: replicates need at least {MIN_GROUPS} groups, got {groups!r} "
            "(with G groups a bootstrap has few distinct resamples and its intervals undercover)"
        )
    return groups


def difference_factor(
    evals: torch.Tensor, vecs: torch.Tensor, n: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor rows ``(F_+ [n, r_+], F_- [n, r_-])`` of ``n L = F_+ F_+^T - F_- F_-^T`` from eigenpairs of L.

    ``evals: [m]``, ``vecs: [n, m]`` must hold every eigenpair with ``|lambda| > tol`` (the others are dropped:
    each resampled L then differs by at most ``max_i w_i tol`` in operator norm). A side without modes gets one
    zero column (it adds nothing; the linear kernel needs a width of at least 1).
    """
    keep = evals.abs() > tol  # [m]
    lam, v = evals[keep].double(), vecs[:, keep].double()  # [r], [n, r]
    cols = v * (lam.abs() * n).sqrt()  # [n, r]: sqrt(n |lambda|) v
    pos, neg = cols[:, lam > 0], cols[:, lam < 0]
    zero = cols.new_zeros(n, 1)
    return (pos if pos.shape[1] else zero), (neg if neg.shape[1] else zero)


def _sample_vectors(res: SpecResult, fx: torch.Tensor, fy: torch.Tensor, center: bool) -> torch.Tensor:
    """Unit sample-space eigenvectors ``[n, K_f]`` of the factor result's modes: ``A u_k / |lambda_k|``."""
    u = res._u  # [D, K_f]
    dx = fx.shape[1]
    au = (fx @ u[:dx] + fy @ u[dx:]) / math.sqrt(fx.shape[0])  # [n, D_x] @ [D_x, K_f] -> [n, K_f]
    if center:
        au = au - au.mean(0, keepdim=True)
    return au / torch.linalg.vector_norm(au, dim=0).clamp_min(1e-300)


def _match_modes(result: SpecResult, feat: SpecResult, v_feat: torch.Tensor) -> tuple[list[int], list[int]]:
    """For each exact mode, the factor mode that is the same mode (or -1), and the exact modes left unmatched."""
    lam, lam_f = result.eigenvalues.double().cpu(), feat.eigenvalues.double().cpu()
    overlap = (result._v.double().T @ v_feat.to(result._v.device)).abs().cpu()  # [K, K_f]
    close = (lam[:, None] - lam_f[None, :]).abs() <= AGREE_RTOL * result.scale
    same_sign = torch.sign(lam)[:, None] == torch.sign(lam_f)[None, :]
    live_f = lam_f.abs() > feat.zero_tol
    score = torch.where(close & same_sign & live_f[None, :], overlap, torch.full_like(overlap, -1.0))
    match, missed, used = [-1] * lam.numel(), [], set()
    for k in range(lam.numel()):
        if abs(float(lam[k])) <= result.zero_tol:
            continue
        j = int(score[k].argmax()) if score.shape[1] else -1
        if j < 0 or float(score[k, j]) < AGREE_OVERLAP or j in used:
            missed.append(k)
            continue
        match[k] = j
        used.add(j)
    return match, missed


def _transplant(result: SpecResult, feat: SpecResult, match: list[int]) -> None:
    """Copy the factor result's uncertainty onto ``result``: per-mode fields re-indexed by ``match``."""
    rows = [k for k, j in enumerate(match) if j >= 0]
    src = torch.tensor([match[k] for k in rows], dtype=torch.long)
    dst = torch.tensor(rows, dtype=torch.long)
    k_all = result.eigenvalues.numel()
    for name in PER_MODE_FIELDS:
        value = getattr(feat, name, None)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            out = torch.full((k_all, *value.shape[1:]), float("nan"), dtype=value.dtype)
            out[dst] = value.cpu()[src]
        else:  # a list of words (verdicts)
            out = ["unknown"] * k_all
            for k in rows:
                out[k] = value[match[k]]
        setattr(result, name, out)
    for name in WHOLE_FIELDS:
        setattr(result, name, getattr(feat, name, None))
    tied = getattr(feat, "tied_modes", None)
    if tied is not None:  # sets of indices into eigenvalues: re-indexed, unmatched members dropped
        back = {j: k for k, j in enumerate(match) if j >= 0}
        sets = [[back[j] for j in members if j in back] for members in tied]
        keep = [i for i, s in enumerate(sets) if s]
        result.tied_modes = [sets[i] for i in keep]
        ci = getattr(feat, "tied_mode_ci", None)
        if ci is not None:
            result.tied_mode_ci = ci[keep]


def attach_factor_uncertainty(
    result: SpecResult,
    eigenpairs: tuple[torch.Tensor, torch.Tensor],
    *,
    route: str,
    replicates: int,
    groups: int,
    level: float,
    seed: int,
    top_k: int | None,
    center: bool,
) -> None:
    """Intervals, held-out values and stability of an n x n route's ``result`` (set on it in place).

    Args:
        result: the exact (or dual) route's result; its eigenvalues and eigenvectors are not changed.
        eigenpairs: ``(evals [m], vecs [n, m])`` of the *uncentred* L, every eigenvalue above
            ``result.zero_tol`` in magnitude among them.
        route: ``"exact"`` or ``"dual"`` (recorded). replicates, groups, level, seed: as in :func:`spec_torch.spec`.
        top_k: the result's ``top_k`` (its modes are the strongest of each sign); None: the whole spectrum.
        center: whether ``result`` is of ``H L H``.

    ``result.uncertainty`` records, beside the features route's settings, ``route``, ``factor_rank`` (r),
    ``replicate_solve`` (``"full"`` or ``"top_k"`` with ``replicate_top_k``), ``eigensolves`` (R + 2S, each of
    size r) and ``unmatched_modes`` (exact modes left without intervals).
    """
    from .covariance import DiffCovariance
    from .uncertainty import solves_needed

    evals, vecs = eigenpairs
    n = vecs.shape[0]
    rank = int((evals.abs() > result.zero_tol).sum())
    capped = top_k is None and rank > FULL_SOLVE_MAX_RANK
    solve_top_k = CAPPED_TOP_K if capped else top_k
    if solve_top_k is not None:
        solve_top_k = min(solve_top_k, max(rank, 1))
    # the factor, the group sums and the solves (DiffCovariance: 6 r x r; estimate: the replicate batch)
    n_bytes = (n * rank + (groups + 14) * rank * rank) * 8
    check_fits(
        n_bytes,
        vecs.device,
        f"intervals on the {route} route with n = {n} (rank {rank}: {groups} group sums of {rank} x {rank})",
        "replicates",
    )
    settings = {
        "route": route,
        "factor_rank": rank,
        "replicate_solve": "top_k" if solve_top_k is not None else "full",
        "replicate_top_k": solve_top_k,
        "eigensolves": solves_needed(replicates),
        "solve_size": rank,
    }
    if rank == 0:  # L is zero to the route's resolution, and so is every resampled L: nothing to resample
        k_all = result.eigenvalues.numel()
        result.eigenvalue_ci = torch.full((k_all, 2), float("nan"), dtype=torch.float64)
        result.heldout_eigenvalues = torch.full((k_all,), float("nan"), dtype=torch.float64)
        result.stability = torch.full((k_all,), float("nan"), dtype=torch.float64)
        result.spec_diff_ci = (0.0, 0.0)
        result.uncertainty = {
            "replicates": replicates,
            "level": float(level),
            "groups": groups,
            "seed": int(seed),
            **settings,
            "unmatched_modes": [],
        }
        return
    fx, fy = difference_factor(evals, vecs, n, result.zero_tol)  # [n, r_+], [n, r_-]
    acc = DiffCovariance("linear", "linear", groups=groups, group_seed=seed)
    acc.update(fx, fy, index=torch.arange(n))
    feat = acc.compute(
        eta=1.0,
        top_k=solve_top_k,
        sync_dist=False,
        center=center,
        replicates=replicates,
        level=level,
        seed=seed,
        reference=False,
    )
    match, missed = _match_modes(result, feat, _sample_vectors(feat, fx, fy, center))
    if capped:  # modes beyond the top CAPPED_TOP_K of each sign were never solved in the replicates
        missed = [
            k for k in missed if k in result.positive_modes(solve_top_k) + result.negative_modes(solve_top_k)
        ]
    if missed:
        warnings.warn(
            f"replicates: the {route} route's modes {missed} did not match a mode of its exact factor (eigenvalue "
            f"within {AGREE_RTOL:g} x scale, eigenvector overlap >= {AGREE_OVERLAP}); they get no intervals",
            stacklevel=3,
        )
    _transplant(result, feat, match)
    result.uncertainty = {**(feat.uncertainty or {}), **settings, "unmatched_modes": missed}
