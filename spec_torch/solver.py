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

import torch

from .errors import SpecError

__all__ = [
    "assemble_covariance",
    "symmetric_factor",
    "symmetric_form",
    "solve_features",
    "solve_exact",
    "select_modes",
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


def symmetric_factor(c: torch.Tensor) -> torch.Tensor:
    """``Z^T: [D, r]`` with ``Z^T Z = C`` for a PSD ``C: [D, D]`` (r = D, or C's numerical rank).

    Cholesky (``C = R R^T``, ``Z^T = R``) when C is numerically positive definite; otherwise (D > n,
    duplicated features, an embedding compared with itself) ``eigh(C)`` restricted to C's numerical range:
    eigenvalues at rounding level (``<= D eps max``) are dropped, not square-rooted, since their square roots
    (~sqrt(eps)) would leak O(sqrt(eps)) errors into every eigenvalue of ``S``.
    """
    d = c.shape[0]
    eps = torch.finfo(c.dtype).eps
    r, info = torch.linalg.cholesky_ex(c)
    # Cholesky of a nearly singular matrix succeeds with tiny pivots that lose accuracy: use eigh then
    if int(info) == 0 and bool((torch.diagonal(r).square() > d * eps * c.diagonal().max()).all()):
        return r
    g, e = torch.linalg.eigh(c)  # [D], [D, D]
    keep = g > d * eps * g.abs().max()
    return e[:, keep] * g[keep].sqrt()  # [D, r]


def symmetric_form(c: torch.Tensor, jv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = Z J Z^T: [r, r]`` (same nonzero eigenvalues as ``J C``) and ``J Z^T: [D, r]``.

    ``jv: [D]`` is the diagonal of J (+1 on x features, -1 on y features). An eigenpair ``(lambda, w)`` of S
    gives the feature-space direction ``u = J Z^T w``, and ``A u / |lambda|`` is the unit-norm sample-space
    eigenvector of ``L = A J A^T``.
    """
    zt = symmetric_factor(c)  # [D, r]
    jzt = jv[:, None] * zt  # [D, r]
    s = zt.T @ jzt  # [r, D] @ [D, r] -> [r, r]
    return (s + s.T) / 2, jzt


def select_modes(eigenvalues: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` eigenvalues of largest magnitude, ordered by descending eigenvalue."""
    keep = min(keep, eigenvalues.numel())
    idx = torch.topk(eigenvalues.abs(), keep).indices
    return idx[torch.argsort(eigenvalues[idx], descending=True)]


def _full_both_signs(s: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = s.shape[0]
    evals, evecs = torch.linalg.eigh(s)  # ascending
    if 2 * top_k >= d:  # a rank-deficient C left fewer than 2k eigenvalues: all of them
        return evals, evecs
    idx = torch.cat([torch.arange(d - top_k, d), torch.arange(top_k)]).to(s.device)
    return evals[idx], evecs[:, idx]


def _top_k_both_signs(
    s: torch.Tensor, top_k: int, seed: int = 0, rtol: float = 1e-9, max_steps: int = 60
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest and ``top_k`` smallest eigenpairs of symmetric ``S: [D, D]``.

    Block Krylov (block Lanczos with full reorthogonalisation) and Rayleigh-Ritz: the Krylov space of a
    symmetric matrix converges to both ends of its spectrum at once, so one run finds both signs. It stops
    when every returned pair has residual ``||S w - lambda w|| <= rtol * ||S||`` and falls back to a full eigh
    when the basis would grow past D / 2 (small D) or ``max_steps`` blocks did not converge.
    """
    d = s.shape[0]
    block = top_k + 8
    if d < 4 * block:
        return _full_both_signs(s, top_k)
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
                return vals, vecs
        if basis.shape[1] + block > d // 2:
            break
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - basis @ (basis.T @ w)  # [D, m] @ [m, b]
        x = torch.linalg.qr(w).Q
        blocks.append(x)
    return _full_both_signs(s, top_k)


def solve_features(
    xx: torch.Tensor,
    xy: torch.Tensor,
    yy: torch.Tensor,
    n: int,
    eta: float = 1.0,
    top_k: int | None = None,
    keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-solve on the feature side.

    Args:
        xx, xy, yy: the streamed sums ``Phi_x^T Phi_x [Dx,Dx]``, ``Phi_x^T Phi_y [Dx,Dy]``, ``Phi_y^T Phi_y [Dy,Dy]``.
        n: number of samples summed.
        eta: weight of the y kernel (> 0).
        top_k: if given, only the ``top_k`` strongest modes of each sign, by a block Krylov solver.
        keep: how many modes of largest magnitude to keep with the full solve (default ``min(n, D)``).

    Returns:
        ``(eigenvalues [K], u [D, K])``: eigenvalues descending; ``u_k = J Z^T w_k`` so that the unit-norm
        sample-space eigenvector is ``v_k = A u_k / |lambda_k|``.
    """
    dx = xx.shape[0]
    c = assemble_covariance(xx, xy, yy, n, eta)  # [D, D]
    jv = torch.ones(c.shape[0], dtype=c.dtype, device=c.device)  # J = diag(I_Dx, -I_Dy)
    jv[dx:] = -1
    s, jz_t = symmetric_form(c, jv)  # [r, r], [D, r]
    if top_k is not None:
        evals, w = _top_k_both_signs(s, top_k)
        order = torch.argsort(evals, descending=True)
        evals, w = evals[order], w[:, order]
    else:
        evals_all, w_all = torch.linalg.eigh(s)  # ascending
        idx = select_modes(evals_all, keep if keep is not None else min(n, c.shape[0]))
        evals, w = evals_all[idx], w_all[:, idx]
    u = jz_t @ w  # [D, r] @ [r, K] -> [D, K]
    return evals, u


def solve_exact(l_matrix: torch.Tensor, top_k: int | None = None, keep: int | None = None):
    """Eigen-solve of the dense ``L: [n, n]``: ``(eigenvalues [K] descending, v [n, K] unit columns)``."""
    if top_k is not None:
        evals, v = _top_k_both_signs(l_matrix, top_k)
        order = torch.argsort(evals, descending=True)
        return evals[order], v[:, order]
    evals_all, v_all = torch.linalg.eigh(l_matrix)
    idx = select_modes(evals_all, keep if keep is not None else l_matrix.shape[0])
    return evals_all[idx], v_all[:, idx]


def check_top_k(top_k: int | None, spectrum_size: int) -> None:
    """``top_k`` modes of each sign must exist in a spectrum of ``spectrum_size`` eigenvalues."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"top_k: expected a positive integer or None, got {top_k!r}")
    if 2 * top_k > spectrum_size:
        raise SpecError(
            f"top_k: asks for {top_k} modes of each sign ({2 * top_k} in all) but the spectrum has only "
            f"{spectrum_size} eigenvalues (min(n, D)); use top_k <= {spectrum_size // 2} or top_k=None"
        )
