"""Spectral solves of the SPEC difference operator L = (K_x - eta K_y) / n.

Pure functions on tensors. Two routes (DESIGN.md):

- feature route: from the streamed blocks ``Phi_x^T Phi_x``, ``Phi_x^T Phi_y``, ``Phi_y^T Phi_y`` build the
  PSD matrix ``C = A^T A`` (D x D), factor ``C = Z^T Z`` and eigendecompose ``S = Z J Z^T``; its nonzero
  eigenvalues are those of L. Feature-space directions ``u_k = J Z^T w_k`` turn into unit-norm sample-space
  eigenvectors by a second pass: ``v_k = A u_k / |lambda_k|``.
- exact route: eigh of the n x n matrix L itself.

Both return eigenvalues in descending order, keeping the ``min(n, D)`` of largest magnitude (the rest are
exact zeros of a rank-<= min(n, D) operator), or the ``top_k`` strongest of each sign.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._validate import as_scalar
from .errors import SpecError

__all__ = [
    "assemble_covariance",
    "symmetric_factor",
    "symmetric_form",
    "solve_features",
    "solve_exact",
    "select_modes",
    "select_signed",
    "sum_noise",
    "check_top_k",
    "largest_magnitude",
    "shuffled_spec_diff",
    "feature_route_error",
    "exact_route_error",
    "below_resolution",
    "ROUNDING_FACTOR",
]


def assemble_covariance(
    xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor, n: int, eta: float
) -> torch.Tensor:
    """``C = (1/n) [[XX, sqrt(eta) XY], [sqrt(eta) XY^T, eta YY]]``: ``[Dx,Dx],[Dx,Dy],[Dy,Dy] -> [D, D]``."""
    s = math.sqrt(eta)
    top = torch.cat([xx, xy * s], dim=1)  # [Dx, D]
    bottom = torch.cat([xy.T * s, yy * eta], dim=1)  # [Dy, D]
    c = torch.cat([top, bottom], dim=0) / n  # [D, D]
    return (c + c.T) / 2  # exact symmetry despite rounding in the streamed sums


def sum_noise(dtype: torch.dtype, n: int, scale: float) -> float:
    """Rounding error of ``n`` summed outer products in ``dtype``, for sums whose trace is ``scale``: ``eps sqrt(n) scale``.

    Recursive (batch after batch) summation of n terms errs by about ``eps sqrt(n)`` relative to the sum
    (random-walk rounding); ``scale`` = trace(C) bounds ||C||. This is the level below which eigenvalues of the
    assembled ``C`` are indistinguishable from rounding noise in its entries.
    """
    return torch.finfo(dtype).eps * math.sqrt(max(n, 1)) * float(scale)


def symmetric_factor(c: torch.Tensor, noise: float = 0.0, info: dict | None = None) -> torch.Tensor:
    """``Z^T: [D, r]`` with ``Z^T Z = C`` for a PSD ``C: [D, D]`` (r = D, or C's numerical rank).

    ``noise``: the absolute rounding error already present in C's entries (e.g. :func:`sum_noise` of the
    dtype the sums were accumulated in). Eigenvalues of C at or below ``max(noise, D eps_64 ||C||)`` are
    dropped, not square-rooted: on a nearly singular C (an embedding compared with a close copy of itself,
    D > n, duplicated features) the square roots of noise (~sqrt(noise ||C||)) would otherwise leak into every
    eigenvalue of ``S``. Cholesky (``C = R R^T``, ``Z^T = R``) is used when a few steps of inverse iteration
    show C's smallest eigenvalue far (1e3 times) above that level; otherwise ``eigh(C)`` restricted to C's
    numerical range.

    ``info``: a dict that, when given, receives ``"dropped"`` (the largest eigenvalue of C dropped, 0 when
    none; the size of the perturbation the factor makes, for :func:`feature_route_error`) and ``"branch"``
    (``"cholesky"`` or ``"eigh"``).
    """
    info = {} if info is None else info
    info.update(dropped=0.0, branch="cholesky")
    d = c.shape[0]
    eps = torch.finfo(c.dtype).eps
    top = float(c.diagonal().max()) if d else 0.0
    tol = max(float(noise), d * eps * top)
    r, failed = torch.linalg.cholesky_ex(c)
    if int(failed) == 0 and bool((torch.diagonal(r).square() > 1e3 * tol).all()):
        # inverse iteration (4 vectors, 6 steps) for an upper estimate of 1 / lambda_min
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(d, 4, generator=gen, dtype=c.dtype).to(c.device)  # [D, 4]
        for _ in range(6):
            w = torch.cholesky_solve(w, r)  # C^-1 w
            w = w / torch.linalg.vector_norm(w, dim=0)
        inv = torch.cholesky_solve(w, r)  # [D, 4]
        lam_min = 1.0 / float((w * inv).sum(0).max())  # Rayleigh quotient of C^-1: >= lambda_min of C
        if lam_min > 1e3 * tol:
            return r
    g, e = torch.linalg.eigh(c)  # [D], [D, D]
    keep = g > max(tol, d * eps * float(g.abs().max()))
    info.update(branch="eigh", dropped=float(g[~keep].clamp_min(0).max()) if bool((~keep).any()) else 0.0)
    return e[:, keep] * g[keep].sqrt()  # [D, r]


def symmetric_form(
    c: torch.Tensor, jv: torch.Tensor, noise: float = 0.0, info: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = Z J Z^T: [r, r]`` (same nonzero eigenvalues as ``J C``) and ``J Z^T: [D, r]``.

    ``jv: [D]`` is the diagonal of J (+1 on x features, -1 on y features). An eigenpair ``(lambda, w)`` of S
    gives the feature-space direction ``u = J Z^T w``, and ``A u / |lambda|`` is the unit-norm sample-space
    eigenvector of ``L = A J A^T``. ``info``: as in :func:`symmetric_factor`.
    """
    zt = symmetric_factor(c, noise, info)  # [D, r]
    jzt = jv[:, None] * zt  # [D, r]
    s = zt.T @ jzt  # [r, D] @ [D, r] -> [r, r]
    return (s + s.T) / 2, jzt


def select_modes(eigenvalues: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` eigenvalues of largest magnitude, ordered by descending eigenvalue."""
    keep = min(keep, eigenvalues.numel())
    idx = torch.topk(eigenvalues.abs(), keep).indices
    return idx[torch.argsort(eigenvalues[idx], descending=True)]


def _full_both_signs(
    s: torch.Tensor, top_k: int, vectors: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    d = s.shape[0]
    if vectors:
        evals, evecs = torch.linalg.eigh(s)  # ascending
    else:
        evals, evecs = torch.linalg.eigvalsh(s), None  # no eigenvectors: about 3x cheaper
    if 2 * top_k >= d:  # fewer than 2k eigenvalues: all of them
        return evals, evecs
    idx = torch.cat([torch.arange(d - top_k, d), torch.arange(top_k)]).to(s.device)
    return evals[idx], None if evecs is None else evecs[:, idx]


def _top_k_both_signs(
    s: torch.Tensor,
    top_k: int,
    seed: int = 0,
    rtol: float = 1e-9,
    max_steps: int = 60,
    vectors: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The ``top_k`` largest and ``top_k`` smallest eigenpairs of symmetric ``S: [D, D]``, and the branch.

    Block Krylov (block Lanczos with full reorthogonalisation) and Rayleigh-Ritz: the Krylov space of a
    symmetric matrix converges to both ends of its spectrum at once, so one run finds both signs. It stops
    when every returned pair has residual ``||S w - lambda w|| <= rtol * ||S||`` (branch ``"krylov"``) and falls
    back to a full eigh (branch ``"eigh"``) when D is too small for a Krylov basis to pay off, when the basis
    would grow past D / 2, or when ``max_steps`` blocks did not converge. ``vectors=False``: the eigenvalues
    only (the fallback is then ``eigvalsh``), the eigenvectors returned are None.
    """
    d = s.shape[0]
    block = top_k + 8
    if d < 4 * block:
        return (*_full_both_signs(s, top_k, vectors), "eigh")
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(d, block, generator=gen, dtype=s.dtype).to(s.device)).Q  # [D, b]
    blocks, s_blocks = [x], []  # orthonormal basis blocks X_i and their images S X_i
    for step in range(1, max_steps + 1):
        w = s @ x  # [D, D] @ [D, b] -> [D, b]: the only product with S per step
        s_blocks.append(w)
        basis = torch.cat(blocks, dim=1)  # [D, m]
        if step % 4 == 0 or step == max_steps:
            # Rayleigh-Ritz from the stored images: T = X^T S X and S (X y) = (S X) y, no extra product with S
            s_basis = torch.cat(s_blocks, dim=1)  # [D, m]
            t = basis.T @ s_basis  # [m, m]
            theta, y = torch.linalg.eigh((t + t.T) / 2)
            m = theta.shape[0]
            idx = torch.cat([torch.arange(m - top_k, m), torch.arange(top_k)]).to(s.device)
            vals, vecs = theta[idx], basis @ y[:, idx]  # Ritz pairs [2k], [D, 2k]
            resid = torch.linalg.vector_norm(s_basis @ y[:, idx] - vecs * vals, dim=0).max()
            if float(resid) <= rtol * float(theta.abs().max()):
                return vals, vecs if vectors else None, "krylov"
        if basis.shape[1] + block > d // 2:
            break
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - basis @ (basis.T @ w)  # [D, m] @ [m, b]
        x = torch.linalg.qr(w).Q
        blocks.append(x)
    return (*_full_both_signs(s, top_k, vectors), "eigh")


def largest_magnitude(s: torch.Tensor, iterative: bool = False) -> float:
    """``max |lambda|`` of a symmetric ``s: [m, m]``, eigenvalues only.

    ``iterative=False``: ``eigvalsh``. ``True``: the block Krylov solver for the two ends (the ``top_k``
    solver), with ``eigvalsh`` as its fallback; cheaper for large m when both ends converge, dearer when
    they are clustered and it falls back.
    """
    if s.shape[0] == 0:
        return 0.0
    if iterative:
        evals, _, _ = _top_k_both_signs(s, 1, vectors=False)
    else:
        evals = torch.linalg.eigvalsh(s)
    return float(evals.abs().max())


def select_signed(eigenvalues: torch.Tensor, top_k: int, zero_tol: float) -> torch.Tensor:
    """Indices of at most ``top_k`` positive and ``top_k`` negative eigenvalues beyond ``zero_tol``.

    The strongest of each sign, ordered by descending eigenvalue. Where fewer than ``top_k`` modes of a sign
    exist only those are returned: never padded with the other sign or with numerical zeros.
    """
    order = torch.argsort(eigenvalues, descending=True)
    vals = eigenvalues[order]
    pos = order[vals > zero_tol][:top_k]
    neg = order[vals < -zero_tol]
    neg = neg[max(neg.numel() - top_k, 0) :]
    return torch.cat([pos, neg])


def solve_features(
    xx: torch.Tensor,
    xy: torch.Tensor,
    yy: torch.Tensor,
    n: int,
    eta: float = 1.0,
    top_k: int | None = None,
    keep: int | None = None,
    noise: float = 0.0,
    zero_tol: float = 0.0,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Eigen-solve on the feature side.

    Args:
        xx, xy, yy: the streamed sums ``Phi_x^T Phi_x [Dx,Dx]``, ``Phi_x^T Phi_y [Dx,Dy]``, ``Phi_y^T Phi_y [Dy,Dy]``.
        n: number of samples summed.
        eta: weight of the y kernel (> 0).
        top_k: if given, at most ``top_k`` strongest modes of each sign (:func:`select_signed`), by a block
            Krylov solver.
        keep: how many modes of largest magnitude to keep with the full solve (default ``min(n, D)``).
        noise: absolute rounding error in ``C = A^T A`` (see :func:`sum_noise`); C's eigenvalues below it are
            dropped before the square root (:func:`symmetric_factor`).
        zero_tol: eigenvalues of L with ``|lambda| <= zero_tol`` are numerical zeros (only used with ``top_k``).
        info: a dict that, when given, receives what :func:`feature_route_error` needs: ``"c"`` (the
            assembled ``C: [D, D]``) and the factor's ``"dropped"`` and ``"branch"`` (:func:`symmetric_factor`).

    Returns:
        ``(eigenvalues [K], u [D, K], solver)``: eigenvalues descending; ``u_k = J Z^T w_k`` so that the unit-norm
        sample-space eigenvector is ``v_k = A u_k / |lambda_k|``; ``solver`` the branch that ran
        (``"eigh"`` or ``"krylov"``).
    """
    dx = xx.shape[0]
    c = assemble_covariance(xx, xy, yy, n, eta)  # [D, D]
    jv = torch.ones(c.shape[0], dtype=c.dtype, device=c.device)  # J = diag(I_Dx, -I_Dy)
    jv[dx:] = -1
    info = {} if info is None else info
    s, jz_t = symmetric_form(c, jv, noise / n, info)  # [r, r], [D, r]
    info["c"] = c
    keep = keep if keep is not None else min(n, c.shape[0])
    evals, w, solver = _solve_symmetric(s, top_k, keep, zero_tol)
    u = jz_t @ w  # [D, r] @ [r, K] -> [D, K]
    if top_k is None and evals.numel() < keep:  # C's dropped null space: exact zeros, as on the n x n routes
        pad = keep - evals.numel()
        evals = torch.cat([evals, evals.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
        order = torch.argsort(evals, descending=True, stable=True)
        evals, u = evals[order], u[:, order]
    return evals, u, solver


def shuffled_spec_diff(
    xx: torch.Tensor,
    yy: torch.Tensor,
    sum_x: torch.Tensor,
    sum_y: torch.Tensor,
    n: int,
    eta: float = 1.0,
    center: bool = False,
    noise: float = 0.0,
    top_k: int | None = None,
) -> float:
    """The permutation reference: SPEC-diff with the cross block replaced by its average over shuffles.

    Pairing the rows of y with a uniform random permutation P of the x rows leaves ``XX`` and ``YY``
    unchanged and turns the cross block into ``Phi_x^T P Phi_y``, whose average over P is
    ``s_x s_y^T / n`` (``E[P] = 11^T / n``). This is SPEC-diff of the covariance with that cross block: the
    same two marginals paired independently (docs/uncertainty.md). Centred, the cross block becomes 0, ``J C``
    is block diagonal and the value is ``max(lambda_max(XX_c), eta lambda_max(YY_c)) / n``, an upper bound on
    the centred SPEC-diff of every pairing of these samples.

    Args:
        xx, yy: the uncentred sums ``Phi_x^T Phi_x [Dx, Dx]``, ``Phi_y^T Phi_y [Dy, Dy]``.
        sum_x, sum_y: the feature sums ``s_x [Dx]``, ``s_y [Dy]``.
        n, eta, center, noise: as in :func:`solve_features`.
        top_k: as in the main solve: given, the block Krylov solver finds the two ends of the spectrum;
            ``None``: ``eigvalsh``. Centred, the two PSD blocks' tops always come from ``eigvalsh``
            (Dx and Dy square, cheaper than one D-square solve).

    Cost: one factorisation of a D x D matrix and its eigenvalues (no eigenvectors), measured at 10-35% of
    the main full solve and about one more ``top_k`` solve (docs/uncertainty.md).
    """
    if center:
        xx_c = xx - torch.outer(sum_x, sum_x) / n  # [Dx, Dx]
        yy_c = yy - torch.outer(sum_y, sum_y) / n  # [Dy, Dy]
        top_x = torch.linalg.eigvalsh(xx_c)[-1]  # PSD blocks: the top end only (eigenvalues, no vectors)
        top_y = torch.linalg.eigvalsh(yy_c)[-1]
        return max(float(top_x), eta * float(top_y)) / n
    cross = torch.outer(sum_x, sum_y) / n  # [Dx, Dy]: E_P[Phi_x^T P Phi_y]
    c = assemble_covariance(xx, cross, yy, n, eta)  # [D, D]
    jv = torch.ones(c.shape[0], dtype=c.dtype, device=c.device)
    jv[xx.shape[0] :] = -1
    s, _ = symmetric_form(c, jv, noise / n)  # [r, r]
    return largest_magnitude(s, iterative=top_k is not None)


def _solve_symmetric(
    s: torch.Tensor, top_k: int | None, keep: int, zero_tol: float
) -> tuple[torch.Tensor, torch.Tensor, str]:
    if s.shape[0] == 0:  # C had no numerical range (all features zero to rounding level)
        return s.new_zeros(0), s.new_zeros(0, 0), "eigh"
    if top_k is not None:
        evals, w, solver = _top_k_both_signs(s, top_k)
        idx = select_signed(evals, top_k, zero_tol)
        return evals[idx], w[:, idx], solver
    evals_all, w_all = torch.linalg.eigh(s)  # ascending
    idx = select_modes(evals_all, keep)
    return evals_all[idx], w_all[:, idx], "eigh"


def solve_exact(
    l_matrix: torch.Tensor, top_k: int | None = None, keep: int | None = None, zero_tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Eigen-solve of the dense ``L: [n, n]``: ``(eigenvalues [K] descending, v [n, K] unit columns, solver)``."""
    return _solve_symmetric(l_matrix, top_k, keep if keep is not None else l_matrix.shape[0], zero_tol)


def check_top_k(top_k: Any, spectrum_size: int) -> int | None:
    """``top_k``: None or a positive integer at most ``spectrum_size`` (= min(n, D)); returned as a Python int.

    numpy and 0-d tensor integers are accepted. Fewer than ``top_k`` modes of a sign may exist; then only
    those are returned (see :func:`select_signed`).
    """
    if top_k is None:
        return None
    top_k = as_scalar(top_k, "top_k")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"top_k: expected a positive integer or None, got {top_k!r}")
    if top_k > spectrum_size:
        raise SpecError(
            f"top_k: asks for {top_k} modes of each sign but the spectrum has only {spectrum_size} eigenvalues "
            f"(min(n, D)); use top_k <= {spectrum_size} or top_k=None"
        )
    return top_k


# ------------------------------------------------------------------------------------ each route's error
#: the features route's rounding in C's entries, as a multiple of ``eps(sum dtype) * ||C||`` (measured on
#: nearly identical embeddings, docs/numerics.md "Each route's error")
ROUNDING_FACTOR = 4.0
#: the exact route's rounding, as a multiple of ``eps_64 * (scale / sqrt(n) + ||L||)`` (kernel entries and eigh)
EXACT_FACTOR = 4.0


def _top_eigenvalue(c: torch.Tensor, steps: int = 30) -> float:
    """``||C||`` of a PSD ``c: [D, D]``: block power iteration (4 vectors), an estimate within a few percent."""
    if c.shape[0] == 0:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(c.shape[0], 4, generator=gen, dtype=c.dtype).to(c.device)  # [D, 4]
    for _ in range(steps):
        w = torch.linalg.qr(c @ w).Q
    return float(torch.linalg.eigvalsh(w.T @ c @ w).max().clamp_min(0))


def feature_route_error(
    eigenvalues: torch.Tensor, u: torch.Tensor, c: torch.Tensor, sum_dtype: torch.dtype, dropped: float = 0.0
) -> torch.Tensor:
    """Estimated absolute error ``[K]`` of each eigenvalue of the features route.

    An eigenvalue of ``J C`` with direction ``u`` (``u^T C u = lambda^2``) moves by ``u^T E u / lambda`` when
    C moves by ``E`` (first order), and by at most ``2 sqrt(||E|| ||C||)`` whatever the conditioning (the
    square root's perturbation bound: ``||sqrt(C + E) - sqrt(C)|| <= sqrt(||E||)``). ``||E||`` is the rounding
    of C's entries, :data:`ROUNDING_FACTOR` ``* eps(sum_dtype) * ||C||``, plus the largest eigenvalue the
    factor dropped (:func:`symmetric_factor`). So::

        err_k = min(eps_C ||u_k||^2 / |lambda_k|,  2 sqrt(eps_C ||C||)),   eps_C = 4 eps ||C|| + dropped

    The first term is small for a well-conditioned C (``||u||^2 <= lambda^2 / lambda_min(C)``); on nearly
    identical embeddings the modes live in C's smallest directions and it grows to the second, about
    ``sqrt(tol ||C||)`` once C's smallest eigenvalues reach the factor's drop tolerance. Exact zeros (the
    dropped null space) get the second term.

    Args:
        eigenvalues: ``[K]``; u: ``[D, K]`` the directions of :func:`solve_features`; c: ``[D, D]`` the
            assembled C; sum_dtype: the dtype the sums were accumulated in; dropped: from the factor's ``info``.
    """
    c_norm = _top_eigenvalue(c)
    eps_c = ROUNDING_FACTOR * torch.finfo(sum_dtype).eps * c_norm + float(dropped)
    cap = 2.0 * math.sqrt(eps_c * c_norm)
    lam = eigenvalues.abs().to(torch.float64)
    first = eps_c * u.to(torch.float64).square().sum(0).to(lam.device) / lam.clamp_min(1e-300)  # [K]
    return torch.where(lam > 0, first.clamp(max=cap), torch.full_like(lam, cap))


def exact_route_error(eigenvalues: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """Estimated absolute error ``[K]`` of each eigenvalue of an n x n route (exact, dual).

    Weyl: an eigenvalue moves by at most ``||E||`` for a perturbation ``E`` of L. L's entries are kernel values
    over n, each rounded at about ``eps_64 * scale / n`` (``scale`` = ``(tr K_x + eta tr K_y) / n`` bounds the
    entries), so ``||E|| ~ 2 eps_64 scale / sqrt(n)`` for independent rounding; eigh adds ``eps_64 ||L||``.
    The estimate is :data:`EXACT_FACTOR` ``* eps_64 * (scale / sqrt(n) + ||L||)``, the same for every mode.
    """
    eps = torch.finfo(torch.float64).eps
    top = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
    err = EXACT_FACTOR * eps * (scale / math.sqrt(max(n, 1)) + top)
    return torch.full(eigenvalues.shape, err, dtype=torch.float64, device=eigenvalues.device)


def below_resolution(eigenvalues: torch.Tensor, error: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """Which modes are not resolved: ``[K]`` bool.

    Mode k is below resolution when ``|lambda_k| <= max(error_k, zero_tol)`` (its value, or the cut-off that
    decides whether it is a mode at all) or when its gap to an adjacent eigenvalue of the same sign that is
    itself a mode (``|lambda_j| > zero_tol``) is at most ``error_k + error_j``: two values each known to
    +-error that may be in either order, so neither eigenvector is determined. ``eigenvalues`` descending.
    """
    lam = eigenvalues.to(torch.float64)
    err = error.to(lam.device, torch.float64)
    out = lam.abs() <= err.clamp(min=zero_tol)
    if lam.numel() < 2:
        return out
    gap = (lam[:-1] - lam[1:]).abs()  # [K-1], between k and k+1
    mode = lam.abs() > zero_tol
    same = (torch.sign(lam[:-1]) == torch.sign(lam[1:])) & mode[:-1] & mode[1:]
    close = same & (gap <= err[:-1] + err[1:])  # [K-1]
    out[:-1] |= close
    out[1:] |= close
    return out
