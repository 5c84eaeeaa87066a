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

__all__ = ["assemble_covariance", "symmetric_factor", "solve_features", "solve_exact", "select_modes"]


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
    """``Z`` with ``Z^T Z = C`` for a PSD ``C: [D, D]``.

    Cholesky (``C = R R^T``, ``Z = R^T``) when C is numerically positive definite; otherwise (D > n,
    duplicated features, ...) the symmetric square root from ``eigh(C)`` with tiny negative eigenvalues clipped.
    """
    r, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        diag = torch.diagonal(r)
        # Cholesky of a nearly singular matrix succeeds with tiny pivots that lose accuracy; use eigh then.
        eps = torch.finfo(c.dtype).eps
        if bool((diag.square() > eps * c.diagonal().max() * c.shape[0]).all()):
            return r.T
    d, q = torch.linalg.eigh(c)  # [D], [D, D]
    return (q * d.clamp_min(0).sqrt()) @ q.T  # C^{1/2}, symmetric


def select_modes(eigenvalues: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` eigenvalues of largest magnitude, ordered by descending eigenvalue."""
    keep = min(keep, eigenvalues.numel())
    idx = torch.topk(eigenvalues.abs(), keep).indices
    return idx[torch.argsort(eigenvalues[idx], descending=True)]


def _top_k_both_signs(s: torch.Tensor, top_k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest and ``top_k`` smallest eigenpairs of symmetric ``S: [D, D]`` by LOBPCG.

    Falls back to a full eigh when D is too small for LOBPCG (D < 3 k + 1) or it does not converge.
    """
    d = s.shape[0]
    if d < 3 * top_k + 2:
        evals, evecs = torch.linalg.eigh(s)
        idx = torch.cat([torch.arange(d - top_k, d), torch.arange(top_k)]).to(s.device)
        return evals[idx], evecs[:, idx]
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(d, top_k, generator=gen, dtype=s.dtype).to(s.device)  # [D, k]
    vals, vecs = [], []
    for sign in (1.0, -1.0):
        ev, ew = torch.lobpcg(sign * s, k=top_k, X=x0, largest=True, niter=200, tol=1e-10)
        resid = torch.linalg.vector_norm(s @ ew - ew * (sign * ev), dim=0).max()
        scale = torch.linalg.matrix_norm(s, ord="fro")
        if not bool(torch.isfinite(resid)) or resid > 1e-6 * max(float(scale), 1e-30):
            evals, evecs = torch.linalg.eigh(s)
            idx = torch.cat([torch.arange(d - top_k, d), torch.arange(top_k)]).to(s.device)
            return evals[idx], evecs[:, idx]
        vals.append(sign * ev)
        vecs.append(ew)
    return torch.cat(vals), torch.cat(vecs, dim=1)


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
        top_k: if given, only the ``top_k`` strongest modes of each sign, by LOBPCG.
        keep: how many modes of largest magnitude to keep with the full solve (default ``min(n, D)``).

    Returns:
        ``(eigenvalues [K], u [D, K])``: eigenvalues descending; ``u_k = J Z^T w_k`` so that the unit-norm
        sample-space eigenvector is ``v_k = A u_k / |lambda_k|``.
    """
    dx = xx.shape[0]
    c = assemble_covariance(xx, xy, yy, n, eta)  # [D, D]
    z = symmetric_factor(c)  # [D, D], Z^T Z = C
    jz_t = z.T.clone()  # [D, D]: J Z^T, J = diag(I_Dx, -I_Dy) flips the y rows
    jz_t[dx:] *= -1
    s = z @ jz_t  # Z J Z^T  [D, D]
    s = (s + s.T) / 2
    if top_k is not None:
        evals, w = _top_k_both_signs(s, top_k)
        order = torch.argsort(evals, descending=True)
        evals, w = evals[order], w[:, order]
    else:
        evals_all, w_all = torch.linalg.eigh(s)  # ascending
        idx = select_modes(evals_all, keep if keep is not None else min(n, c.shape[0]))
        evals, w = evals_all[idx], w_all[:, idx]
    u = jz_t @ w  # [D, D] @ [D, K] -> [D, K]
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
