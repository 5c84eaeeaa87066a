"""SpecAlignLoss: a differentiable SPEC objective that pulls a student's cluster structure toward a teacher's.

For a batch of B samples (global batch n under torch.distributed), with the student features
``Phi_s = phi_s(student) [n, Ds]`` and the (detached) teacher features ``Phi_t = phi_t(teacher) [n, Dt]``:

    L = (K_s - eta K_t) / n = A J A^T,   A = [Phi_s, sqrt(eta) Phi_t] / sqrt(n),   J = diag(I_Ds, -I_Dt)

With ``center=True`` both kernels are centred (``H K H``, ``H = I - 11^T / n``): the batch means of the features
(global means under torch.distributed) are subtracted first, so the constant direction has eigenvalue 0.

Objectives (all positively homogeneous of degree 1 in the eigenvalues lambda of L):

- ``norm="op"``: ``max_i |lambda_i|`` (SPEC-diff, the spectral radius).
- ``norm="topk"``: ``sum of the k largest |lambda_i|``.
- ``norm="fro"``: ``||L||_F`` (not squared), differentiated directly from the kernel/covariance blocks.
- ``one_sided=True``: only the eigenvalues with the teacher's sign (lambda < 0: clusters the teacher holds and
  the student lacks) count: ``op -> max(0, -lambda_min)``, ``topk -> sum of max(0, -lambda)`` over the k most
  negative, ``fro -> sqrt(sum over lambda < 0 of lambda^2)``.

Gradient (Hellmann-Feynman, DESIGN.md): with the eigenpairs ``(lambda_m, v_m)`` of the selected modes detached and
``w_m = d objective / d lambda_m`` (``sign(lambda_m)``; ``-1``; ``lambda_m / ||L_-||_F``), the returned tensor is

    loss = sum_m w_m v_m^T L v_m,   v^T L v = (||Phi_s^T v||^2 - eta ||Phi_t^T v||^2) / n,

whose value is the objective (Euler's relation for degree-1 homogeneous functions) and whose gradient is the
objective's gradient wherever the selected eigenvalues are simple. No eigenvector is differentiated, so close or
tied eigenvalues give finite gradients (a valid subgradient at ties). The ``n x n`` matrix is never needed
for the gradient: ``Phi_s^T v`` is O(n D).

Numerics: all internal math is float64 by default (``dtype``), whatever the input dtype; the loss is returned in
the student's dtype (float32 for half-precision students). Close embeddings make L a small difference of O(1)
kernels, and the features route's eigenvalues carry errors of order ``eps ||u||^2 / |lambda|``: in float32 a
SPEC-diff of 1e-4 is off by tens of percent there, in float64 by ~1e-8. The float32 fast path guards itself: when
that bound exceeds ``_F32_RTOL`` for a selected mode it solves again in float64 (``last_solve_dtype``). The value
returned is the solved eigenvalue (``v^T L v`` only carries the gradient). Eigenvalues below the rounding level of
the computation (:func:`_rounding_level`) count as zero.

The eigenproblem is solved, detached, in the cheaper space: the ``n x n`` matrix L (``method="exact"``) or
the ``D x D`` covariance ``C = A^T A`` (``method="features"``, symmetric form ``Z J Z^T`` with C's eigenvalues at
rounding level dropped), or with ``solver="iterative"`` by a block-Krylov Rayleigh-Ritz solve warm-started from
the previous call's feature-space eigenvectors (a buffer), accepted only when every Ritz pair of its block has
converged (so a stale warm vector cannot hide a mode that became larger) and otherwise falling back to eigh.

Distributed (``torch.distributed`` initialised, ``sync_dist`` not False): the objective is that of the
global batch (all ranks' rows concatenated). The eigen-solve uses the all-reduced ``C`` (feature route) or the
all-gathered features (exact route), both detached; the differentiable parts are all-reduces of per-rank partial
sums (``Phi_s^T v`` or the covariance blocks). Every rank returns the same value, and every input check (finite
values, zero rows, memory) is agreed by all ranks in one all-gather before any other collective, so all ranks
raise the same :class:`SpecError` together. Scaling convention: the
backward of the all-reduce sums the gradient over ranks, so each rank's gradient of its own samples is
``world_size`` times their share of the global gradient; DDP's averaging over ranks then gives exactly the
gradient of one process on the concatenated batch. Without DDP, divide the summed gradients by ``world_size``.
Kernels without a feature map (``GaussianKernel(rff_dim=None)``) all-gather the inputs (O(n p) communication)
and differentiate this rank's rows of L.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._validate import as_matrix, check_pair, check_positive, memory_available
from .errors import SpecError
from .kernels import CosineKernel, GaussianKernel, Kernel, median_sigma, resolve_kernel, rff_frequencies

__all__ = ["SpecAlignLoss"]

_NORMS = ("op", "topk", "fro")
_SOLVERS = ("eigh", "iterative")
_METHODS = ("auto", "exact", "features")
_SIDES = ("student", "teacher")
_OVERSAMPLE = 4  # extra columns (random probes + spare warm vectors) of the iterative solver's block
_PROBES = 2  # fresh random columns of every iterative solve, for modes the warm start misses
_KRYLOV_STEPS = 10  # at most this many block Krylov steps of the iterative solver before falling back to eigh
#: the iterative solver accepts only when every Ritz pair of its block at least this fraction as strong as the
#: weakest selected mode has converged (not only the selected ones): see SpecAlignLoss._solve_iterative
_GUARD = 0.8
#: cosine features are ``x / max(||x||, floor)`` with ``floor = _COSINE_FLOOR * (largest row norm of the batch)``:
#: a row 1e-20 times smaller than the others gets a near-zero feature and a bounded gradient (<= ~1e6 / norm)
#: instead of a 1e20 one. Rows of norm exactly 0 are refused.
_COSINE_FLOOR = 1e-6
#: the float32 features route re-solves in float64 when the first-order bound on a selected eigenvalue's relative
#: error exceeds this. The bound is pessimistic: measured errors were 40-2000 times below it (B=256, p=32, close
#: and independent embeddings), so 1e-2 keeps the realised error well under 1e-3
_F32_RTOL = 1e-2
#: bytes of dense work per matrix entry: the features route holds about 6 D x D matrices (C, its eigenvectors,
#: the factor, S, its eigenvectors, J Z^T w), the exact route about 4 n x n (L, its symmetrised copy, the
#: eigenvectors, the kernel rows)
_DENSE_COPIES = {"features": 6, "exact": 4}


# ----------------------------------------------------------------------------- collectives
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks; the backward sums the incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _reduce(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Sum of ``x`` over ranks (differentiable when ``x`` requires grad); ``x`` itself when single-process."""
    if not distributed:
        return x
    if x.requires_grad:
        return _AllReduceSum.apply(x)
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out)
    return out


def _gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate the ``[B_r, D]`` rows of every rank (no gradient), ``sizes[r] = B_r``."""
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])  # [n, D]


# ------------------------------------------------------------------------------- pure math
def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` with a zero (not NaN) gradient at 0."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """Overflow- and underflow-safe Euclidean norms of the rows of ``x: [B, p] -> [B]`` (scaled by the row max)."""
    top = x.abs().amax(dim=1, keepdim=True)  # [B, 1]
    unit = x / torch.where(top > 0, top, torch.ones_like(top))  # entries in [-1, 1]
    return torch.linalg.vector_norm(unit, dim=1) * top.squeeze(1)  # [B]


def _cosine_features(x: torch.Tensor, floor: float) -> torch.Tensor:
    """``x / max(||x||, floor)``: ``[B, p] -> [B, p]``; unit rows except those shorter than ``floor``."""
    return x / _row_norms(x).clamp_min(floor)[:, None]  # [B, p]


def _centre(phi: torch.Tensor, n: int, distributed: bool) -> torch.Tensor:
    """Subtract the (global-batch) mean feature: ``Phi H``, so that ``K -> H K H``. Differentiable."""
    mean = _reduce(phi.sum(0), distributed) / n  # [D]
    return phi - mean  # [B, D]


def _gaussian_gram(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact Gaussian kernel matrix ``[Na, p], [Nb, p] -> [Na, Nb]``, finite gradient at zero distance."""
    centre = b.mean(0)  # distances are translation invariant; centring avoids cancellation for offset data
    a, b = a - centre, b - centre
    d2 = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T  # [Na, Nb]
    return torch.exp(d2.clamp_min(0) * (-0.5 / sigma**2))


def _rounding_level(route: str, dtype: torch.dtype, n: int, d: int, scale: float) -> float:
    """Eigenvalues of L with ``|lambda|`` at or below this are rounding noise of the computation in ``dtype``.

    ``scale = trace(C) = (trace K_s + eta trace K_t) / n`` bounds the entries. Exact route: every entry of
    ``L = A J A^T`` is a dot product of length D with a rounding error of about ``eps sqrt(D) scale / n``, and an
    n x n matrix of such errors has operator norm about ``2 sqrt(n)`` times that: ``2 eps sqrt(D / n) scale``.
    Features route (and the iterative solver, which multiplies by ``C`` through ``A``): the entries of
    ``C = A^T A`` are sums over n samples, with errors about ``eps sqrt(n) scale`` (random-walk rounding).
    """
    eps = torch.finfo(dtype).eps
    if route == "exact":
        return 2 * eps * math.sqrt(d / n) * scale
    return 2 * eps * math.sqrt(n) * scale


def _objective_weights(
    lam: torch.Tensor, norm: str, k: int, one_sided: bool, zero: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which eigenvalues the objective uses and its derivative ``w = d objective / d lambda`` there.

    Args:
        lam: ``[K]`` eigenvalues (any order).
        zero: eigenvalues with ``|lambda| <= zero`` are treated as 0 (they get weight 0).

    Returns:
        ``(idx [M], w [M])`` with ``objective = sum_m w_m lam[idx_m]``.
    """
    nonzero = lam.abs() > zero
    if not one_sided:
        m = 1 if norm == "op" else min(k, lam.numel())
        idx = torch.topk(lam.abs(), m).indices
        return idx, torch.sign(lam[idx]) * nonzero[idx]
    negative = (lam < 0) & nonzero
    if norm == "fro":
        idx = torch.nonzero(negative).flatten()
        if idx.numel() == 0:  # nothing negative: objective 0; one mode with weight 0 keeps shapes non-empty
            return torch.argmin(lam)[None], torch.zeros(1, dtype=lam.dtype, device=lam.device)
        sel = lam[idx]
        return idx, sel / sel.square().sum().sqrt()
    m = 1 if norm == "op" else min(k, lam.numel())
    idx = torch.topk(-lam, m).indices  # the m most negative
    return idx, -negative[idx].to(lam.dtype)


def _solve_covariance(c: torch.Tensor, jv: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``L = A J A^T`` from ``C = A^T A: [D, D]`` by the symmetric form ``S = Z J Z^T``.

    ``C = Z^T Z`` with ``Z^T = E_+ sqrt(g_+)`` from ``eigh(C)``, keeping only C's eigenvalues above ``noise`` (the
    rounding error of C's entries): square roots of rounding noise (~sqrt(noise ||C||)) would otherwise leak into
    every eigenvalue of S, which for close embeddings is larger than the SPEC-diff itself. (The same rule as
    :func:`spec_torch.solver.symmetric_factor` with a ``noise`` level, kept here so the loss does not depend on
    the core solver's branch choice.)

    Returns:
        ``(lam [r], u [D, r])`` with ``u = J Z^T w``, so that ``v = A u / |lam|`` is unit-norm.
    """
    g, e = torch.linalg.eigh(c)  # [D], [D, D]
    keep = g > max(noise, c.shape[0] * torch.finfo(c.dtype).eps * float(g.abs().max()))
    zt = e[:, keep] * g[keep].sqrt()  # [D, r]
    jzt = jv[:, None] * zt  # J Z^T  [D, r]
    s = zt.T @ jzt  # [r, D] @ [D, r] -> [r, r]
    lam, w = torch.linalg.eigh((s + s.T) / 2)
    return lam, jzt @ w  # [r], J Z^T w  [D, r]


def _wanted_order(lam: torch.Tensor, one_sided: bool) -> torch.Tensor:
    """Indices of ``lam`` from most to least relevant to the objective (for the warm start)."""
    return torch.argsort(lam if one_sided else -lam.abs())


def _rayleigh_ritz(
    x: torch.Tensor, h: torch.Tensor, jv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz approximations of eigenpairs of ``L = A J A^T`` on the sample-space subspace ``A X``.

    Only feature-space quantities are needed: with ``H = C X`` (``C = A^T A``) the Gram matrix of ``A X`` is
    ``X^T H`` and the projection of L is ``(A X)^T L (A X) = H^T J H``. Nearly dependent directions of the
    basis (Gram eigenvalues below ``100 eps`` of the largest) are dropped.

    Args:
        x: ``[D, q]`` basis in feature space; ``h``: ``[D, q]`` = ``C x``; ``jv``: ``[D]`` the diagonal of J.

    Returns:
        ``(theta [r], u [D, r], cu [D, r])``: Ritz values (ascending), feature-space Ritz vectors with
        ``A u`` the unit-norm sample-space vectors, and ``C u``.
    """
    gram = x.T @ h  # (A X)^T (A X)  [q, q]
    t = h.T @ (jv[:, None] * h)  # (A X)^T L (A X)  [q, q]
    g, e = torch.linalg.eigh((gram + gram.T) / 2)
    keep = g > g.max() * (100 * torch.finfo(g.dtype).eps)
    white = e[:, keep] / g[keep].sqrt()  # [q, r]: white^T gram white = I
    tw = white.T @ t @ white
    theta, y = torch.linalg.eigh((tw + tw.T) / 2)
    coef = white @ y  # [q, r]
    return theta, x @ coef, h @ coef


# --------------------------------------------------------------------------------- module
class SpecAlignLoss(nn.Module):
    """SPEC alignment loss: SPEC-diff of ``(K_student - eta K_teacher) / B`` with Hellmann-Feynman gradients.

    Args:
        kernel_student, kernel_teacher: ``"cosine"`` (the paper's choice), ``"linear"``, ``"gaussian"``, a dict
            or a :class:`~spec_torch.kernels.Kernel`. A :class:`GaussianKernel` is fitted on the first call
            (``sigma="auto"``: median heuristic of that batch; ``rff_dim``: seeded random frequencies) and kept
            in buffers (``{side}_sigma``, ``{side}_omega``), so the loss is a fixed function saved with
            ``state_dict``. ``GaussianKernel(rff_dim=None)`` is the exact kernel (B x B route only). Cosine
            features are ``x / max(||x||, 1e-6 max_i ||x_i||)`` (bounded gradients for near-zero rows).
        eta: weight of the teacher kernel (> 0).
        norm: ``"op"`` (spectral radius, default), ``"topk"`` (sum of the ``k`` largest |eigenvalues|) or
            ``"fro"`` (Frobenius norm ``||L||_F``, not squared; the KUEA / similarity-preserving baseline).
        k: number of modes of ``norm="topk"``.
        one_sided: count only eigenvalues lambda < 0 (clusters the teacher holds and the student lacks); see
            the module docstring for each norm.
        solver: ``"eigh"`` (dense, exact) or ``"iterative"`` (warm-started block Krylov in feature space, falls
            back to eigh unless its whole block converged; state in the ``warm_u`` buffer). Not for one-sided
            ``"fro"``.
        method: space of the eigh solve: ``"exact"`` (B x B), ``"features"`` (D x D) or ``"auto"`` (cheaper).
            The dense matrices of the chosen route must fit in memory (else :class:`SpecError`).
        dtype: ``torch.float64`` (default) or ``torch.float32``: the dtype of all internal math (inputs are cast
            up, also from bf16/fp16 under autocast). The loss is returned in the student's dtype (float32 for
            half-precision students). float32 is faster but, for close student and teacher, the features route
            loses most digits of a small SPEC-diff (see the module docstring and docs/align.md).
        sync_dist: ``None``: global-batch objective when a process group with more than one rank is
            initialised; ``True``: require one; ``False``: this rank's batch only.
        solver_tol: relative residual ``||L v - lambda v|| / max|lambda|`` the iterative solver must reach.
        center: centre both kernels (``H K H``: subtract the batch's mean feature on both sides). The paper's
            uncentred SPEC (``False``) is the default; centring removes the constant mode, i.e. a difference of
            the two kernels' *average* similarity that is not a cluster.

    Shapes: ``forward(student: [B, ds], teacher: [B, dt]) -> []`` (row i of both = the same sample).

    Example:
        >>> import torch
        >>> loss_fn = SpecAlignLoss("cosine", "cosine", norm="op")
        >>> student = torch.randn(32, 8, requires_grad=True)
        >>> loss = loss_fn(student, torch.randn(32, 4))
        >>> loss.backward()
        >>> bool(loss > 0), loss.dtype, student.grad.shape
        (True, torch.float32, torch.Size([32, 8]))
    """

    def __init__(
        self,
        kernel_student: str | Kernel | dict[str, Any] = "cosine",
        kernel_teacher: str | Kernel | dict[str, Any] = "cosine",
        eta: float = 1.0,
        norm: str = "op",
        k: int = 5,
        one_sided: bool = False,
        solver: str = "eigh",
        method: str = "auto",
        dtype: torch.dtype = torch.float64,
        sync_dist: bool | None = None,
        solver_tol: float = 1e-3,
        center: bool = False,
    ) -> None:
        super().__init__()
        self.kernels = {
            "student": resolve_kernel(kernel_student, "kernel_student"),
            "teacher": resolve_kernel(kernel_teacher, "kernel_teacher"),
        }
        if self.kernels["student"].name == "nystrom":  # its landmarks live in the moving student space
            raise SpecError(
                "kernel_student: Nystrom features are supported on the teacher side only (the student's "
                "embedding space moves during training, so fixed landmarks go stale); use 'cosine', 'linear' "
                "or GaussianKernel(rff_dim=...) for the student"
            )
        check_positive(eta, "eta")
        check_positive(k, "k", integer=True)
        check_positive(solver_tol, "solver_tol")
        for value, name, allowed in (
            (norm, "norm", _NORMS),
            (solver, "solver", _SOLVERS),
            (method, "method", _METHODS),
        ):
            if value not in allowed:
                raise SpecError(f"{name}: expected one of {allowed}, got {value!r}")
        for value, name in ((one_sided, "one_sided"), (center, "center")):
            if not isinstance(value, bool):
                raise SpecError(f"{name}: expected True or False, got {value!r}")
        if dtype not in (torch.float32, torch.float64):
            raise SpecError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
        if sync_dist not in (None, True, False):
            raise SpecError(f"sync_dist: expected None, True or False, got {sync_dist!r}")
        # rff_dim="auto" (the kernel configs' default): random features where the features route or the
        # iterative solver needs them, otherwise the exact kernel (the B x B route handles it under DDP too)
        route = "features" if method == "features" or solver == "iterative" else "exact"
        self.kernels = {side: kern.for_route(route) for side, kern in self.kernels.items()}
        exact_only = [f"kernel_{s}" for s in _SIDES if not self.kernels[s].has_features]
        if exact_only and (method == "features" or solver == "iterative"):
            raise SpecError(
                f"{exact_only[0]}: method='features' and solver='iterative' need a feature map; "
                "give GaussianKernel(rff_dim=...)"
            )
        if solver == "iterative" and norm == "fro" and one_sided:
            raise SpecError(
                "solver: the one-sided 'fro' norm needs every negative eigenvalue; use solver='eigh'"
            )
        self.eta, self.norm, self.k, self.one_sided = float(eta), norm, k, one_sided
        self.solver, self.method, self.dtype, self.sync_dist = solver, method, dtype, sync_dist
        self.solver_tol, self.center = float(solver_tol), center
        for side in _SIDES:
            if isinstance(self.kernels[side], GaussianKernel):
                self.register_buffer(f"{side}_sigma", torch.empty(0, dtype=torch.float64))
                self.register_buffer(f"{side}_omega", torch.empty(0, dtype=torch.float64))
        self.register_buffer("input_dims", torch.zeros(2, dtype=torch.int64))  # (ds, dt); 0 = not fitted yet
        self.register_buffer("warm_u", torch.empty(0, dtype=dtype))  # [D, m] iterative solver's start block
        self.register_buffer("solver_calls", torch.zeros((), dtype=torch.int64))
        self._dims: tuple[int, int] | None = None  # python mirror of input_dims (no device sync)
        self._calls = 0  # python mirror of solver_calls
        self._fitted: dict[str, Kernel] = {}
        #: ``"eigh"`` or ``"iterative"``: which solver produced the last forward's eigenpairs (``None`` for the
        #: two-sided ``"fro"`` norm, which needs no eigen-solve).
        self.last_solver: str | None = None
        #: ``"exact"`` (B x B) or ``"features"`` (D x D): the route of the last forward.
        self.last_route: str | None = None
        self.last_krylov_steps = 0  # Krylov steps the iterative solver ran in the last call
        #: dtype of the last eigen-solve: ``dtype``, or float64 when the float32 features route was not accurate
        self.last_solve_dtype: torch.dtype | None = None
        #: eigenvalues of the modes the last forward used (detached), for logging; ``None`` for two-sided "fro".
        self.last_eigenvalues: torch.Tensor | None = None

    # ---------------------------------------------------------------- state
    _DYNAMIC = ("student_sigma", "student_omega", "teacher_sigma", "teacher_omega", "warm_u")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for name in self._DYNAMIC:
            key = prefix + name
            if key in state_dict and name in self._buffers:
                mine = self._buffers[name]
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=mine.dtype, device=mine.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        dims = tuple(int(d) for d in self.input_dims.tolist())
        self._dims = dims if dims[0] > 0 else None
        self._calls = int(self.solver_calls)
        self._fitted = {}

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(), ...: kernel state stays float64
        kept = {n: b for n, b in self._buffers.items() if n.endswith(("_sigma", "_omega"))}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            self._buffers[name] = old.to(device=self._buffers[name].device)
        return out

    def extra_repr(self) -> str:
        ks, kt = self.kernels["student"], self.kernels["teacher"]
        return (
            f"kernel_student={ks!r}, kernel_teacher={kt!r}, eta={self.eta}, norm={self.norm!r}, k={self.k}, "
            f"one_sided={self.one_sided}, solver={self.solver!r}, method={self.method!r}, dtype={self.dtype}, "
            f"center={self.center}"
        )

    def _distributed(self) -> bool:
        ready = dist.is_available() and dist.is_initialized()
        if self.sync_dist is True and not ready:
            raise SpecError("sync_dist: True needs an initialised torch.distributed process group")
        if self.sync_dist is False or not ready:
            return False
        return dist.get_world_size() > 1

    def _fit(self, s: torch.Tensor, t: torch.Tensor, distributed: bool) -> None:
        """Fix the kernels' data-dependent settings from the first batch (rank 0's under torch.distributed).

        Only rank 0 fits ``sigma="auto"``; its result (or NaN if it failed) is broadcast, so a failure on rank 0
        (e.g. fewer than 2 rows there) raises the same :class:`SpecError` on every rank.
        """
        for side, x in (("student", s), ("teacher", t)):
            kern = self.kernels[side]
            if not isinstance(kern, GaussianKernel):
                continue
            sigma, error = (
                math.nan,
                f"kernel_{side}: sigma='auto' could not be fitted on rank 0 (see its error)",
            )
            if kern.sigma != "auto":
                sigma = float(kern.sigma)
            elif not distributed or dist.get_rank() == 0:
                try:
                    sigma = median_sigma(x.detach(), seed=kern.seed)
                except SpecError as exc:
                    error = f"kernel_{side}: {exc}"
            sigma_t = torch.tensor(sigma, dtype=torch.float64, device=x.device)
            if distributed:
                dist.broadcast(sigma_t, src=0)
            sigma = float(sigma_t)
            if not math.isfinite(sigma):
                raise SpecError(error)
            self._buffers[f"{side}_sigma"] = sigma_t
            if kern.rff_dim is not None:
                omega = rff_frequencies(
                    x.shape[1], kern.rff_dim, sigma, kern.seed
                )  # [p, m], as GaussianKernel.fit
                self._buffers[f"{side}_omega"] = omega.to(x.device)
        self._dims = (s.shape[1], t.shape[1])
        self.input_dims.copy_(torch.tensor(self._dims))

    def _features(self, side: str, x: torch.Tensor, floor: float) -> torch.Tensor | None:
        """``x: [B, p] -> [B, D]`` with the fitted kernel; ``None`` for an exact-only kernel."""
        kern = self.kernels[side]
        if isinstance(kern, GaussianKernel):
            if kern.rff_dim is None:
                return None
            omega = self._buffers[f"{side}_omega"].to(device=x.device, dtype=x.dtype)  # [p, m]
            proj = x @ omega  # [B, p] @ [p, m] -> [B, m]
            return torch.cat([proj.cos(), proj.sin()], dim=1) / math.sqrt(kern.rff_dim)  # [B, 2m]
        if isinstance(kern, CosineKernel):
            return _cosine_features(x, floor)  # [B, p]
        if side not in self._fitted:
            self._fitted[side] = kern if kern.is_fitted else kern.fit(x.detach())
        return self._fitted[side].features(x)

    def _cross_gram(self, side: str, x: torch.Tensor, x_all: torch.Tensor, floor: float) -> torch.Tensor:
        """Kernel rows ``k(x_i, x_all_j)``: ``[B, p], [n, p] -> [B, n]``, differentiable in ``x`` only."""
        kern = self.kernels[side]
        if isinstance(kern, GaussianKernel) and kern.rff_dim is None:
            return _gaussian_gram(x, x_all.detach(), float(self._buffers[f"{side}_sigma"]))
        return (
            self._features(side, x, floor) @ self._features(side, x_all.detach(), floor).T
        )  # [B, D] @ [D, n]

    def _feature_dim(self, side: str, p: int) -> int | None:
        kern = self.kernels[side]
        return kern.feature_dim(p) if kern.has_features else None

    # -------------------------------------------------------------- forward
    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The objective for ``student: [B, ds]`` (differentiable) and ``teacher: [B, dt]`` (detached).

        Returned in the student's dtype (float64 or float32; float32 for half-precision or integer input).
        """
        device_type = student.device.type if isinstance(student, torch.Tensor) else "cpu"
        double = str(getattr(student, "dtype", "")) in ("torch.float64", "float64")  # tensor or numpy array
        with torch.autocast(device_type=device_type, enabled=False):
            loss = self._forward(student, teacher)
        return loss.to(torch.float64 if double else torch.float32)

    def _check(
        self, student: Any, teacher: Any, distributed: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, float], str]:
        """Validate the inputs; under torch.distributed every check is agreed by all ranks (one all-gather).

        Returns:
            ``(s [B, ds], t [B, dt], sizes, floors, route)``: the inputs in the internal dtype, every rank's batch
            size, the cosine floor of each side (:data:`_COSINE_FLOOR` times the largest row norm of the global
            batch) and the route of the eigen-solve.
        """
        local_error, s, t = None, None, None
        try:
            s = as_matrix(student, "student", dtype=self.dtype, check_finite=False)
            t = as_matrix(teacher, "teacher", dtype=self.dtype, check_finite=False).detach()
            check_pair(s, t, ("student", "teacher"))
            if t.device != s.device:
                raise SpecError(f"teacher: expected the device of student ({s.device}), got {t.device}")
            if self._dims is not None and (s.shape[1], t.shape[1]) != self._dims:
                raise SpecError(
                    f"student/teacher: expected feature dimensions {self._dims} as in the first batch, "
                    f"got ({s.shape[1]}, {t.shape[1]})"
                )
        except SpecError as exc:
            if not distributed:
                raise
            local_error = exc
        device = s.device if s is not None else _collective_device(student)
        # one row per rank: error, non-finite counts, batch size, zero-row counts, first zero rows, largest norms,
        # free memory. Only the agreed table decides, so every rank raises the same error together.
        row = torch.zeros(11, dtype=torch.float64, device=device)
        row[6:8] = -1
        if local_error is None:
            sd, td = s.detach(), t
            row[1], row[2], row[3] = (~torch.isfinite(sd)).sum(), (~torch.isfinite(td)).sum(), sd.shape[0]
            for i, (side, x) in enumerate((("student", sd), ("teacher", td))):
                if isinstance(self.kernels[side], CosineKernel):
                    norms = _row_norms(x)  # [B]
                    zero = norms == 0
                    row[4 + i] = zero.sum()
                    row[6 + i] = torch.where(zero.any(), zero.int().argmax(), -1)
                    row[8 + i] = norms.max()
            row[10] = memory_available(device)
        else:
            row[0] = 1
        if distributed:
            parts = [torch.empty_like(row) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, row)
            table = torch.stack(parts).cpu()  # [world, 11]
        else:
            table = row[None].cpu()
        failed = [r for r in range(table.shape[0]) if table[r, 0] > 0]
        if failed:
            if local_error is not None:
                raise local_error
            raise SpecError(f"student/teacher: rank {failed[0]} refused its batch (see that rank's error)")
        sizes = [int(b) for b in table[:, 3]]
        offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        where = " (summed over ranks)" if distributed else ""
        for i, side in enumerate(_SIDES):
            count = int(table[:, 1 + i].sum())
            if count:
                raise SpecError(
                    f"{side}: contains {count} NaN or Inf value(s){where}; refusing to compute a loss"
                )
        for i, side in enumerate(_SIDES):
            count = int(table[:, 4 + i].sum())
            if count:
                first = min(
                    offsets[r] + int(table[r, 6 + i]) for r in range(len(sizes)) if table[r, 6 + i] >= 0
                )
                raise SpecError(
                    f"{side}: the cosine kernel needs non-zero rows, got {count} zero row(s){where} "
                    f"(first at row {first} of the {'global ' if distributed else ''}batch)"
                )
        n = sum(sizes)
        if n < 2:
            raise SpecError(f"student: expected a batch of at least 2 samples, got {n}")
        floors = {side: _COSINE_FLOOR * float(table[:, 8 + i].max()) for i, side in enumerate(_SIDES)}
        dims = [self._feature_dim(side, x.shape[1]) for side, x in (("student", s), ("teacher", t))]
        d = None if None in dims else sum(dims)
        route = self._route(n, d)
        size = n if route == "exact" else d
        need = _DENSE_COPIES[route] * size * size * torch.finfo(self.dtype).bits // 8
        if d is not None:  # the batch's features (and their cos/sin projections) on either route
            need += 3 * n * d * torch.finfo(self.dtype).bits // 8
        avail = float(table[:, 10].min())
        if need > avail:
            what = (
                f"n = {n} (n x n matrices)"
                if route == "exact"
                else f"D = {dims[0]} + {dims[1]} = {d} (D x D)"
            )
            if d is not None:
                what += f" and {d} features per row"
            raise SpecError(
                f"method: the {route} route with {what} needs about {need / 2**30:.1f} GiB on {device}, but only "
                f"{avail / 2**30:.1f} GiB is available{' on some rank' if distributed else ''}; use a smaller "
                "batch, fewer features or the other method"
            )
        return s, t, sizes, floors, route

    def _forward(self, student: Any, teacher: Any) -> torch.Tensor:
        distributed = self._distributed()
        s, t, sizes, floors, route = self._check(student, teacher, distributed)
        rank = dist.get_rank() if distributed else 0
        n, offset = sum(sizes), sum(sizes[:rank])
        if self._dims is None:
            self._fit(s, t, distributed)
        self.last_route, self.last_solver, self.last_eigenvalues = route, None, None
        self.last_solve_dtype = self.dtype
        phi_s = self._features("student", s, floors["student"])  # [B, Ds] or None
        phi_t = self._features("teacher", t, floors["teacher"])  # [B, Dt] or None
        if phi_s is None or phi_t is None:
            return self._forward_kernel_rows(s, t, sizes, offset, distributed, floors)
        raw = None  # uncentred traces, to tell a centred trace of 0 from rounding
        if self.center:  # Phi H on both sides: one all-reduce of both sums of features (and of their squares)
            ds = phi_s.shape[1]
            squares = torch.stack([phi_s.detach().square().sum(), phi_t.square().sum()])
            both = _reduce(torch.cat([phi_s.sum(0), phi_t.sum(0), squares]), distributed)
            mean, raw = both[:-2] / n, both[-2:].tolist()  # [Ds + Dt], uncentred traces of K_s, K_t
            phi_s, phi_t = phi_s - mean[:ds], phi_t - mean[ds:]  # [B, Ds], [B, Dt]
        sums = _reduce(torch.stack([phi_s.detach().square().sum(), phi_t.square().sum()]), distributed)
        scale = self._check_scale(sums.tolist(), n, raw)
        if self.norm == "fro" and not self.one_sided:
            return self._frobenius(phi_s, phi_t, n, route, distributed)
        lam, v, w = self._solve(phi_s, phi_t, sizes, offset, route, distributed, scale)
        self.last_eigenvalues = lam  # the selected modes' eigenvalues, for logging
        gs = phi_s.T @ v  # [Ds, B] @ [B, M] -> [Ds, M], differentiable
        gt = phi_t.T @ v  # [Dt, M]
        g = _reduce(torch.cat([gs, gt]), distributed)  # sum of per-rank partial sums
        gs, gt = g[: gs.shape[0]], g[gs.shape[0] :]
        quad = (gs.square().sum(0) - self.eta * gt.square().sum(0)) / n  # [M] v^T L v
        # value: the solved eigenvalues (v^T L v equals them, but in float32 it is a difference of O(1) terms);
        # gradient: that of v^T L v. A selection with all weights 0 (one-sided, nothing negative) gives 0.
        return (w * (lam + quad - quad.detach())).sum()

    def _check_scale(self, sums: list[float], n: int, raw: list[float] | None = None) -> float:
        """``trace(C) = (trace K_s + eta trace K_t) / n`` from the traces ``sums`` of both kernel matrices.

        A side whose kernel matrix is 0 (all-zero features; with ``center=True`` constant features, i.e. a
        centred trace at the rounding level of the uncentred one, ``raw``) or whose features overflow makes SPEC
        meaningless: :class:`SpecError` (the sums are global, so all ranks agree).
        """
        eps = torch.finfo(self.dtype).eps
        for i, (side, total) in enumerate(zip(_SIDES, sums)):
            if not (math.isfinite(total) and (raw is None or math.isfinite(raw[i]))):
                raise SpecError(
                    f"{side}: the kernel features overflow (sum of squares {total}); rescale the input"
                )
            if total <= (0.0 if raw is None else 16 * n * eps * eps * raw[i]):
                what = "constant (the centred features are 0)" if self.center else "all zero"
                raise SpecError(
                    f"{side}: the kernel matrix is 0: its features are {what}; check the embeddings"
                )
        return (sums[0] + self.eta * sums[1]) / n

    def _forward_kernel_rows(self, s, t, sizes, offset, distributed, floors) -> torch.Tensor:
        """Kernels without a feature map (exact Gaussian): this rank's rows of the n x n matrix L.

        With ``R = L[rows of this rank, :]`` (columns from the gathered, detached inputs), a per-rank partial
        sum ``P`` (``sum_i v_i (R v)_i`` or ``sum R^2``) has half the gradient of the full sum with respect to this
        rank's inputs (the symmetric other half comes from the columns), so ``2 P - P.detach()`` carries the
        right gradient and value; summed over ranks, it is the global objective. Centred (``H L H``): the
        eigenvectors of ``H L H`` with nonzero eigenvalue satisfy ``H v = v``, so ``v^T H L H v = v^T L v``; the
        centred Frobenius norm ``F = ||H L H||^2`` has ``dF = 2 <H L H, dL>``, carried by ``4 <H L H, R>``.
        """
        n, b = sum(sizes), s.shape[0]
        s_all = _gather_rows(s.detach(), sizes) if distributed else s.detach()  # [n, ds]
        t_all = _gather_rows(t, sizes) if distributed else t  # [n, dt]
        ks = self._cross_gram("student", s, s_all, floors["student"])  # [B, n]
        kt = self._cross_gram("teacher", t, t_all, floors["teacher"])  # [B, n]
        rows = (ks - self.eta * kt) / n  # [B, n] this rank's rows of L
        diag = torch.arange(b, device=s.device)
        parts = [ks.detach()[diag, offset + diag].sum(), kt[diag, offset + diag].sum()]  # traces of K_s, K_t
        parts += [ks.detach().sum(), kt.sum()]  # sums of this rank's rows
        traces = _reduce(torch.stack(parts), distributed).tolist()  # [4], global
        raw = None
        if self.center:  # trace(H K H) = trace K - 1^T K 1 / n
            raw, traces = traces[:2], [traces[0] - traces[2] / n, traces[1] - traces[3] / n]
        scale = self._check_scale(traces[:2], n, raw)
        if self.norm == "fro" and not self.one_sided and not self.center:
            part = rows.square().sum()
            return _safe_sqrt(_reduce(2 * part - part.detach(), distributed))
        with torch.no_grad():
            lmat = _gather_rows(rows.detach(), sizes) if distributed else rows.detach()  # [n, n]
            lmat = (lmat + lmat.T) / 2
            if self.center:
                lmat = lmat - lmat.mean(0, keepdim=True)
                lmat = lmat - lmat.mean(1, keepdim=True)  # H L H  [n, n]
        if self.norm == "fro" and not self.one_sided:  # centred
            part = (lmat[offset : offset + b] * rows).sum()  # <H L H, R>
            return _safe_sqrt(lmat.square().sum() + _reduce(4 * (part - part.detach()), distributed))
        with torch.no_grad():
            lam, vecs = torch.linalg.eigh(lmat)
            zero = _rounding_level("exact", self.dtype, n, s.shape[1] + t.shape[1], scale)
            idx, w = _objective_weights(lam, self.norm, self.k, self.one_sided, zero)
        self.last_solver, self.last_eigenvalues = "eigh", lam[idx]
        v_all = vecs[:, idx]  # [n, M]
        if self.center:
            v_all = v_all - v_all.mean(0, keepdim=True)  # exactly in the range of H
        part = (v_all[offset : offset + b] * (rows @ v_all)).sum(0)  # [M] this rank's part of v^T L v
        quad = _reduce(2 * part - part.detach(), distributed)  # [M] v^T L v
        return (w * (lam[idx] + quad - quad.detach())).sum()  # value: the eigenvalues; gradient: v^T L v

    def _route(self, n: int, d: int | None) -> str:
        """``"exact"`` (B x B) or ``"features"`` (D x D; ``d=None``: no feature map, exact only)."""
        if d is None or self.method == "exact":
            return "exact"
        if self.method == "features":
            return "features"
        return "exact" if n * n * d + n**3 < n * d * d + d**3 else "features"

    def _frobenius(self, phi_s, phi_t, n: int, route: str, distributed: bool) -> torch.Tensor:
        """``||L||_F``, differentiable directly (no eigen-solve), on the B x B or the D x D side."""
        if route == "exact" and not distributed:
            lmat = (phi_s @ phi_s.T - self.eta * phi_t @ phi_t.T) / n  # [B, B]
            return _safe_sqrt(lmat.square().sum())
        # ||L||_F^2 = (||Phi_s^T Phi_s||^2 + eta^2 ||Phi_t^T Phi_t||^2 - 2 eta ||Phi_s^T Phi_t||^2) / n^2
        ds = phi_s.shape[1]
        blocks = torch.cat([phi_s.T @ phi_s, phi_s.T @ phi_t], dim=1)  # [Ds, Ds + Dt], differentiable
        blocks = _reduce(blocks, distributed)
        yy = _reduce(phi_t.T @ phi_t, distributed)  # [Dt, Dt]
        total = blocks[:, :ds].square().sum() + self.eta**2 * yy.square().sum()
        total = total - 2 * self.eta * blocks[:, ds:].square().sum()
        return _safe_sqrt(total / n**2)

    # ----------------------------------------------------------------- solve
    @torch.no_grad()
    def _solve(self, phi_s, phi_t, sizes, offset, route, distributed, scale):
        """Detached eigenpairs of the objective's modes: ``(lam [M], v [B, M] this rank's rows, w [M])``."""
        n, b = sum(sizes), phi_s.shape[0]
        ds = phi_s.shape[1]
        a = torch.cat([phi_s.detach(), math.sqrt(self.eta) * phi_t], dim=1) / math.sqrt(n)  # [B, D] rows of A
        d = a.shape[1]
        jv = torch.ones(d, dtype=a.dtype, device=a.device)
        jv[ds:] = -1  # the diagonal of J
        if self.solver == "iterative":
            zero = _rounding_level("features", a.dtype, n, d, scale)
            out = self._solve_iterative(a, jv, zero, distributed, (n, scale))
            if out is not None:
                return out
        zero = _rounding_level(route, a.dtype, n, d, scale)
        if route == "exact":
            a_all = _gather_rows(a, sizes) if distributed else a  # [n, D]
            lmat = (a_all * jv) @ a_all.T  # A J A^T  [n, n]
            lam, vecs = torch.linalg.eigh((lmat + lmat.T) / 2)
            idx, w = _objective_weights(lam, self.norm, self.k, self.one_sided, zero)
            v = vecs[offset : offset + b, idx]  # [B, M] this rank's rows
            if self.solver == "iterative":  # feature-space directions u = J A^T v / lambda for the warm start
                order = _wanted_order(lam, self.one_sided)[: self._block_size()]
                u = jv[:, None] * _reduce(a.T @ vecs[offset : offset + b, order], distributed)  # [D, m]
                self._store_warm(u)
        else:
            c = _reduce(a.T @ a, distributed)  # C = A^T A  [D, D], summed over ranks
            lam, u, idx, w = self._solve_features(c, jv, n, scale, zero)
            if self.dtype == torch.float32 and self._needs_float64(lam, u, idx, w, (n, scale)):
                c = _reduce(a.double().T @ a.double(), distributed)  # [D, D] again, summed in float64
                zero64 = _rounding_level(route, torch.float64, n, d, scale)
                lam, u, idx, w = self._solve_features(c, jv.double(), n, scale, zero64)
                lam, u, w = lam.float(), u.float(), w.float()
                self.last_solve_dtype = torch.float64
            v = (a @ u[:, idx]) / lam[idx].abs().clamp_min(max(zero, torch.finfo(a.dtype).tiny))  # [B, M]
            if self.solver == "iterative":
                self._store_warm(u[:, _wanted_order(lam, self.one_sided)[: self._block_size()]])
        self.last_solver = "eigh"
        return lam[idx], v, w

    def _solve_features(self, c, jv, n, scale, zero):
        """``eigh`` on the D x D side: ``(lam [r], u [D, r], idx [M], w [M])``, C's rounding noise dropped."""
        noise = torch.finfo(c.dtype).eps * math.sqrt(n) * scale  # rounding error of C's entries
        lam, u = _solve_covariance((c + c.T) / 2, jv, noise)
        if lam.numel() == 0:  # C is at rounding level: L = 0 to working precision
            lam, u = lam.new_zeros(1), u.new_zeros(c.shape[0], 1)
        idx, w = _objective_weights(lam, self.norm, self.k, self.one_sided, zero)
        return lam, u, idx, w

    def _needs_float64(self, lam, u, idx, w, scale_n: tuple[int, float]) -> bool:
        """Could the float32 features route's selected eigenvalues be off by more than ``_F32_RTOL`` (relative)?

        A perturbation ``dC`` of ``C`` moves an eigenvalue of ``J C`` by ``u^T dC u / lambda`` (left eigenvector
        ``C u``, and ``u^T C u = lambda^2``), so with C's rounding noise ``eps sqrt(n) scale`` the error is about
        ``noise ||u||^2 / |lambda|``: large for close embeddings (small lambda, and u nearly in C's null space).
        Also when no selected mode is above the float32 zero level: a tiny SPEC-diff float64 can still resolve.
        """
        live = w != 0
        if not bool(live.any()):
            return True
        n, scale = scale_n
        noise = torch.finfo(torch.float32).eps * math.sqrt(n) * scale
        sel, norms2 = lam[idx][live].abs(), u[:, idx][:, live].square().sum(0)  # [M'], ||u_m||^2
        return bool((noise * norms2 > _F32_RTOL * sel.square()).any())

    def _store_warm(self, u: torch.Tensor) -> None:
        """Keep feature-space directions ``u: [D, m]`` (most relevant first) as the next call's start block."""
        norms = torch.linalg.vector_norm(u, dim=0, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
        self._buffers["warm_u"] = (u / norms).to(self.dtype)

    def _block_size(self) -> int:
        return (1 if self.norm == "op" else self.k) + _OVERSAMPLE

    def _solve_iterative(self, a, jv, zero, distributed, scale_n):
        """Warm-started block Krylov with Rayleigh-Ritz after every step; ``None`` if not converged.

        The sample-space Krylov basis is ``A X`` with ``X = [X0, J C X0, (J C)^2 X0, ...]`` (since
        ``L A u = A J C u``): each step is one product ``C X = A^T (A X)``, O(B D m), and no D x D or B x B
        matrix is formed. ``X0`` = the previous call's eigenvectors (the ``warm_u`` buffer, at most
        ``m - _PROBES`` of them) plus fresh random probes.

        Acceptance: not only the selected Ritz pairs but every pair of the block (the ``m`` most wanted) that is at
        least ``_GUARD`` (0.8) as strong as the weakest selected mode must have a relative residual below
        ``solver_tol``. At most ``m - _PROBES`` of the block's pairs come from the warm vectors; the others come
        from the Krylov space of the random probes, whose extreme Ritz values move toward the extreme
        eigenvalues outside the warm span. A larger mode that the warm vectors miss shows there as a strong but
        unconverged Ritz pair, so a warm vector that is still an exact eigenvector (residual 0) is not accepted
        while such a mode is converging: the mode is selected once it has converged, or eigh runs. (A heuristic,
        not a certificate: a mode whose Ritz value is still below 0.8 of the selected one is not waited for.)
        """
        d, m = a.shape[1], self._block_size()
        warm = self.warm_u if self.warm_u.dim() == 2 and self.warm_u.shape[0] == d else a.new_zeros(d, 0)
        warm = warm[:, : m - _PROBES].to(a)
        gen = torch.Generator().manual_seed(self._calls)  # the same probes on every rank; resumable
        probes = torch.randn(d, m - warm.shape[1], generator=gen, dtype=a.dtype).to(a.device)
        self._calls += 1
        self.solver_calls.fill_(self._calls)
        xs, hs, x = [], [], torch.cat([warm, probes], 1)  # [D, m]
        for step in range(_KRYLOV_STEPS + 1):
            x = x / torch.linalg.vector_norm(x, dim=0, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            h = _reduce(a.T @ (a @ x), distributed)  # C X: [D, B] @ [B, m] -> [D, m]
            xs.append(x)
            hs.append(h)
            x = jv[:, None] * h  # next block J C X
            if step == 0:
                continue
            theta, u, cu = _rayleigh_ritz(torch.cat(xs, 1), torch.cat(hs, 1), jv)
            idx, w = _objective_weights(theta, self.norm, self.k, self.one_sided, zero)
            block = _wanted_order(theta, self.one_sided)[:m]  # the block's Ritz pairs, most wanted first
            strength = -theta if self.one_sided else theta.abs()  # how much a mode counts for the objective
            weakest = float(strength[idx].min())
            guarded = block[strength[block] >= _GUARD * weakest] if weakest > zero else block
            check = torch.unique(torch.cat([idx, guarded]))  # the selected pairs and the guarded block
            resid = jv[:, None] * cu[:, check] - u[:, check] * theta[check]  # [D, c]: A r = L v - theta v
            res2 = _reduce((a @ resid).square().sum(0), distributed)  # [c] ||L v - theta v||^2
            self.last_krylov_steps = step
            if float(res2.max().sqrt()) <= max(self.solver_tol * float(theta.abs().max()), zero):
                if a.dtype == torch.float32 and self._needs_float64(theta, u * theta.abs(), idx, w, scale_n):
                    return None  # float32 cannot resolve these modes: eigh, re-solved in float64 there
                self._store_warm(u[:, block])
                self.last_solver = "iterative"
                return (
                    theta[idx],
                    a @ u[:, idx],
                    w,
                )  # A u: unit-norm sample-space Ritz vectors, this rank's rows
        return None


def _collective_device(x: Any) -> torch.device:
    """Device for this rank's part of a collective when its own input could not be read."""
    if isinstance(x, torch.Tensor):
        return x.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
