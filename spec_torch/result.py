"""The result of a SPEC comparison: spectrum, modes, and the streaming pass that scores samples."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ._validate import as_matrix, check_pair
from .errors import SpecError
from .kernels import Kernel

__all__ = ["SpecResult", "TopSamples", "top_rows", "UNIFORM_THRESHOLD", "ZERO_RTOL"]

#: modes whose |eigenvalue| is below this fraction of ``scale`` (= (tr K_x + eta tr K_y) / n, an upper bound
#: on ||L||) are numerical zeros: their eigenvectors are not determined and they are not reported as modes.
#: The fraction is at least the eps of the input dtype (float32 input: 1.2e-7), the resolution of the data.
ZERO_RTOL = 1e-10

#: a mode whose uniformity ``|<v_k, 1>| / sqrt(n)`` exceeds this is close to the constant vector: it measures
#: the difference of the two kernels' *average* similarity levels, not a group of samples (centre to remove it)
UNIFORM_THRESHOLD = 0.9


def top_rows(
    values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the ``min(k, rows)`` best rows of ``values, indices: [rows, M]``, best first.

    Ties are broken towards the smaller sample index, so the result does not depend on how the samples were
    split into batches or ranks.
    """
    kk = min(int(k), values.shape[0])
    by_index = indices.argsort(dim=0)  # sort by index first, then a stable sort by value
    values, indices = values.gather(0, by_index), indices.gather(0, by_index)
    order = values.argsort(dim=0, descending=largest, stable=True)[:kk]  # [kk, M]
    return values.gather(0, order), indices.gather(0, order)


@dataclass
class TopSamples:
    """The highest-scoring samples of each requested mode (sign-fixed: the largest-|score| sample is positive).

    Attributes:
        modes: indices into ``SpecResult.eigenvalues``.
        eigenvalues: the modes' eigenvalues.
        indices: ``[M, k]`` sample indices (positions in the scored data), best first.
        scores: ``[M, k]`` their scores (entries of the unit-norm sample-space eigenvector).
        flipped: ``[M]`` whether the mode's sign was flipped to make its largest-|score| entry positive.
    """

    modes: list[int]
    eigenvalues: list[float]
    indices: torch.Tensor
    scores: torch.Tensor
    flipped: list[bool]


class SpecResult:
    """Spectrum of ``L = (K_x - eta K_y) / n`` and what is needed to score samples on its eigenvectors.

    Attributes:
        eigenvalues: float64 ``[K]``, descending. Positive: clusters x holds together and y does not;
            negative: the reverse.
        spec_diff: ``max |eigenvalue|`` = ``||L||_op``.
        n, eta, method ("features" or "exact": the route actually used), kernel_x, kernel_y (fitted kernels).
        scale: ``(tr K_x + eta tr K_y) / n``, an upper bound on SPEC-diff (``1 + eta`` for cosine kernels).
        uniformity: float64 ``[K]``, ``|<v_k, 1>| / sqrt(n)`` in [0, 1] for each mode (1: the constant vector,
            see :data:`UNIFORM_THRESHOLD`; 0 for numerically zero modes).
        solver: the eigen-solver branch that ran: ``"eigh"`` (dense), ``"krylov"`` (block Krylov converged, with
            ``top_k``) or ``"dual"`` (features route solved in the n x n dual because D > n).
        center: whether both kernels were centred (``H K H``).
        zero_tol: eigenvalues with ``|lambda| <= zero_tol`` are numerical zeros (not modes).
        spec_diff_null: the permutation reference, SPEC-diff of the same two marginals paired independently
            (the cross-covariance replaced by its average over shuffles of the pairing); ``None`` where not
            computed. spec_diff_ratio: ``spec_diff / spec_diff_null`` (docs/uncertainty.md).
        eigenvalue_ci: ``[K, 2]`` bootstrap interval of each eigenvalue; spec_diff_ci: ``(lo, hi)``;
            heldout_eigenvalues: ``[K]``; stability: ``[K]`` in [0, 1]; uncertainty: the settings used, with
            (from :func:`spec_torch.spec`) the ``route`` the replicates resampled (``features``: group sums of
            D features; ``exact``/``dual``: an exact factor of L, :mod:`spec_torch.factor_intervals`), and the
            ``eigensolves`` of size ``solve_size`` that cost.
            ``None`` unless computed with ``replicates`` (see spec_torch.uncertainty and docs/uncertainty.md).
    """

    def __init__(
        self,
        eigenvalues: torch.Tensor,
        *,
        n: int,
        eta: float,
        method: str,
        kernel_x: Kernel,
        kernel_y: Kernel,
        dims: tuple[int, int] | None,
        scale: float,
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        uniformity: torch.Tensor | None = None,
        solver: str = "eigh",
        center: bool = False,
        zero_rtol: float = ZERO_RTOL,
        shift: torch.Tensor | None = None,
        spec_diff_null: float | None = None,
    ) -> None:
        self.eigenvalues = eigenvalues
        self.n = n
        self.eta = eta
        self.method = method
        self.kernel_x = kernel_x
        self.kernel_y = kernel_y
        self.dims = dims
        self.scale = scale
        self._u = u  # feature route: [D, K] feature-space directions u_k = J Z^T w_k
        self._v = v  # exact route: [n, K] sample-space eigenvectors
        self._data = data  # exact route: the (x, y) the kernel matrices were built from (Nystrom scoring)
        self._shift = shift  # centred: [K] per-mode constant subtracted from a sample's projection
        self.solver = solver
        self.center = center
        self.zero_tol = max(zero_rtol, ZERO_RTOL) * scale
        self.spec_diff_null = None if spec_diff_null is None else float(spec_diff_null)
        if uniformity is None:
            uniformity = torch.zeros(eigenvalues.numel(), dtype=torch.float64)
        nonzero = eigenvalues.abs().to(uniformity.device) > self.zero_tol
        self.uniformity = torch.where(nonzero, uniformity.double().clamp(0, 1), 0.0)  # [K]
        # uncertainty (spec_torch.uncertainty), set by DiffCovariance.compute(replicates=R)
        self.eigenvalue_ci: torch.Tensor | None = None  # [K, 2]
        self.spec_diff_ci: tuple[float, float] | None = None
        self.heldout_eigenvalues: torch.Tensor | None = None  # [K]
        self.stability: torch.Tensor | None = None  # [K]
        self.uncertainty: dict[str, Any] | None = None

    @classmethod
    def from_features(cls, eigenvalues, u, **kw) -> SpecResult:
        return cls(eigenvalues, method="features", u=u, **kw)

    @classmethod
    def from_exact(cls, eigenvalues, v, data, method="exact", **kw) -> SpecResult:
        n = v.shape[0]
        uniformity = (v.sum(0).abs() / math.sqrt(n)).cpu() if v.numel() else None  # [K]
        return cls(eigenvalues, method=method, v=v, data=data, uniformity=uniformity, **kw)

    # ------------------------------------------------------------ spectrum
    @property
    def spec_diff(self) -> float:
        """SPEC-diff: the largest |eigenvalue|."""
        return float(self.eigenvalues.abs().max()) if self.eigenvalues.numel() else 0.0

    @property
    def spec_diff_ratio(self) -> float | None:
        """SPEC-diff as a fraction of :attr:`spec_diff_null` (about 0: the same kernel geometry; about 1: as
        different as unrelated embeddings with these marginals). ``None`` without a (nonzero) reference."""
        if not self.spec_diff_null:
            return None
        return self.spec_diff / self.spec_diff_null

    def positive_modes(self, k: int) -> list[int]:
        """Indices of the (at most) ``k`` largest positive eigenvalues: clusters x captures and y does not."""
        pos = [i for i, lam in enumerate(self.eigenvalues.tolist()) if lam > self._zero_tol()]
        return pos[:k]

    def negative_modes(self, k: int) -> list[int]:
        """Indices of the (at most) ``k`` most negative eigenvalues: clusters y captures and x does not."""
        neg = [i for i, lam in enumerate(self.eigenvalues.tolist()) if lam < -self._zero_tol()]
        return neg[::-1][:k]

    def _zero_tol(self) -> float:
        return self.zero_tol

    def uniform_modes(self, threshold: float = UNIFORM_THRESHOLD) -> list[int]:
        """Indices of the modes whose uniformity exceeds ``threshold``: near-constant eigenvectors, a difference
        in the kernels' average similarity rather than a cluster (``center=True`` removes them)."""
        return [i for i, u in enumerate(self.uniformity.tolist()) if u > threshold]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: spectrum (with each mode's ``uniformity``) and resolved settings."""
        return {
            "eigenvalues": [float(v) for v in self.eigenvalues.tolist()],
            "uniformity": [float(u) for u in self.uniformity.tolist()],
            "uniform_threshold": UNIFORM_THRESHOLD,
            "spec_diff": self.spec_diff,
            "spec_diff_null": self.spec_diff_null,
            "spec_diff_ratio": self.spec_diff_ratio,
            "n": self.n,
            "eta": self.eta,
            "method": self.method,
            "solver": self.solver,
            "center": self.center,
            "kernel_x": self.kernel_x.describe(),
            "kernel_y": self.kernel_y.describe(),
            **self._uncertainty_dict(),
        }

    def _uncertainty_dict(self) -> dict[str, Any]:
        """The uncertainty fields of :meth:`to_dict` (``None`` when not computed; NaN -> ``None``)."""

        def plain(t: torch.Tensor | None) -> list | None:
            return None if t is None else [None if v != v else float(v) for v in t.reshape(-1).tolist()]

        ci = plain(self.eigenvalue_ci)
        return {
            "eigenvalue_ci": None if ci is None else [ci[i : i + 2] for i in range(0, len(ci), 2)],
            "spec_diff_ci": None if self.spec_diff_ci is None else list(self.spec_diff_ci),
            "heldout_eigenvalues": plain(self.heldout_eigenvalues),
            "stability": plain(self.stability),
            "uncertainty": self.uncertainty,
        }

    def __repr__(self) -> str:
        return (
            f"SpecResult(n={self.n}, K={self.eigenvalues.numel()}, spec_diff={self.spec_diff:.4g}, "
            f"eta={self.eta}, method={self.method!r})"
        )

    # -------------------------------------------------------------- scores
    def _check_modes(self, modes: Iterable[int] | None) -> list[int]:
        k_all = self.eigenvalues.numel()
        if modes is None:
            return [i for i in range(k_all) if abs(float(self.eigenvalues[i])) > self._zero_tol()]
        modes = [int(m) for m in modes]
        for m in modes:
            if not 0 <= m < k_all:
                raise SpecError(f"modes: index {m} out of range for {k_all} eigenvalues")
            if abs(float(self.eigenvalues[m])) <= self._zero_tol():
                raise SpecError(
                    f"modes: mode {m} has eigenvalue {float(self.eigenvalues[m]):.3g}, numerically zero; "
                    "its eigenvector is not determined"
                )
        return modes

    def _batch_scores(self, x: torch.Tensor, y: torch.Tensor, modes: list[int]) -> torch.Tensor:
        """Unoriented scores ``[B, M]`` of a validated batch."""
        lam = self.eigenvalues[modes]  # [M]
        if self._u is not None:  # the D x D features solve (the dual solve keeps v, as the exact route)
            u = self._u[:, modes]  # [D, M]
            dx = u.shape[0] - self.kernel_y.feature_dim(y.shape[1])
            dtype = u.dtype
            px = self.kernel_x.features(x.to(dtype))  # [B, Dx], features in the solve dtype (float64)
            py = self.kernel_y.features(y.to(dtype))  # [B, Dy]
            proj = px @ u[:dx] + math.sqrt(self.eta) * (py @ u[dx:])  # [B, M]
            if self._shift is not None:  # centred features: subtract the mean feature's projection
                proj = proj - self._shift[modes]
            return proj / (math.sqrt(self.n) * lam.abs())
        x_fit, y_fit = self._data
        v = self._v[:, modes]  # [n, M]
        kx = self.kernel_x.gram(x.to(torch.float64), x_fit.to(torch.float64))  # [B, n]
        ky = self.kernel_y.gram(y.to(torch.float64), y_fit.to(torch.float64))  # [B, n]
        lmat = (kx - self.eta * ky).to(v.dtype) / self.n  # [B, n], rows of L (Nystrom extension)
        proj = lmat @ v  # [B, n] @ [n, M] -> [B, M]
        if (
            self._shift is not None
        ):  # centred: (H L H v)_i = (L v)_i - <column means of L, v> as v is orthogonal to 1
            proj = proj - self._shift[modes]
        return proj / lam

    def _prepare(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self._u if self._u is not None else self._v
        x = as_matrix(x, "x", device=ref.device)
        y = as_matrix(y, "y", device=ref.device)
        check_pair(x, y)
        if self.dims is not None and (x.shape[1], y.shape[1]) != tuple(self.dims):
            raise SpecError(
                f"x/y: expected feature dimensions {tuple(self.dims)}, got ({x.shape[1]}, {y.shape[1]})"
            )
        self.kernel_x.check_input(x, "x")
        self.kernel_y.check_input(y, "y")
        return x, y

    @torch.no_grad()
    def sample_scores(
        self, x: Any, y: Any, modes: Iterable[int] | None = None, batch_size: int = 8192
    ) -> torch.Tensor:
        """Sample-space eigenvectors ``[n, M]`` on ``x: [n, p]``, ``y: [n, q]`` (the compared samples).

        On the compared samples the columns are unit-norm eigenvectors of L. Each column's sign is fixed so
        that its largest-magnitude entry is positive. ``modes`` (indices into ``eigenvalues``) gives the columns
        in that order; a numerically zero mode among them is refused (its eigenvector is not determined).
        Default: all ``K`` columns, column ``k`` the mode of ``eigenvalues[k]``, NaN for the zero modes.
        """
        every = modes is None
        live = self._check_modes(modes)
        x, y = self._prepare(x, y)
        out = torch.cat(
            [self._batch_scores(xb, yb, live) for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
        )  # [n, M]
        if out.shape[0]:
            peak = out.gather(0, out.abs().argmax(0, keepdim=True))  # [1, M]
            out = out * torch.where(peak < 0, -1.0, 1.0).to(out.dtype)
        if not every:
            return out
        full = out.new_full((out.shape[0], self.eigenvalues.numel()), float("nan"))  # [n, K]
        full[:, live] = out
        return full

    @torch.no_grad()
    def top_samples(
        self,
        data: Any,
        k: int = 10,
        modes: Iterable[int] | None = None,
        offset: int = 0,
        sync_dist: bool = False,
    ) -> TopSamples:
        """Streaming pass: the ``k`` highest-scoring samples of each mode, never holding an ``[n, M]`` matrix.

        Args:
            data: ``(x, y)`` (tensors or arrays) or an iterable of ``(x_batch, y_batch)`` in sample order.
            k: samples per mode.
            modes: indices into ``eigenvalues``; default every mode with a nonzero eigenvalue (the zero modes
                are skipped: ``TopSamples.modes`` says which modes row ``i`` of ``indices`` belongs to); a
                numerically zero mode asked for is refused.
            offset: index of the first sample of ``data`` (a shard's start, so that indices are global).
            sync_dist: merge the candidates of every rank of ``torch.distributed`` (each scoring its own
                shard, with its ``offset``) into the global top ``k``; the same result on every rank.
                A rank may then hold no samples.
        """
        error, hi_val = None, None
        try:  # the local pass; under sync_dist its errors are agreed on by every rank before the merge
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise SpecError(f"k: expected a positive integer, got {k!r}")
            modes = self._check_modes(modes)
            if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
                data = [data]
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise SpecError(f"offset: expected a non-negative integer, got {offset!r}")
            hi_val = hi_idx = lo_val = lo_idx = None
            for xb, yb in data:
                xb, yb = self._prepare(xb, yb)
                s = self._batch_scores(xb, yb, modes)  # [B, M]
                idx = torch.arange(offset, offset + s.shape[0], device=s.device).unsqueeze(1).expand_as(s)
                offset += s.shape[0]
                if hi_val is not None:
                    s_hi, idx_hi = torch.cat([hi_val, s]), torch.cat([hi_idx, idx])
                    s_lo, idx_lo = torch.cat([lo_val, s]), torch.cat([lo_idx, idx])
                else:
                    s_hi, idx_hi, s_lo, idx_lo = s, idx, s, idx
                hi_val, hi_idx = top_rows(s_hi, idx_hi, k, largest=True)  # running top-k largest, [kk, M]
                lo_val, lo_idx = top_rows(s_lo, idx_lo, k, largest=False)  # running top-k smallest
        except SpecError as exc:
            if not sync_dist:
                raise
            error = exc
        if sync_dist:  # merge the ranks' candidates (torch.distributed; see spec_torch.collectives)
            from .collectives import agree, all_gather_topk

            agree(error)  # one rank's bad batch raises on every rank, not a hang in the merge

            if hi_val is None:  # this rank's shard is empty
                ref = self._u if self._u is not None else self._v
                hi_val = lo_val = ref.new_zeros(0, len(modes))
                hi_idx = lo_idx = torch.zeros(0, len(modes), dtype=torch.long, device=ref.device)
            hi_val, hi_idx = all_gather_topk(hi_val, hi_idx, k, largest=True)
            lo_val, lo_idx = all_gather_topk(lo_val, lo_idx, k, largest=False)
        if hi_val is None or hi_val.shape[0] == 0:
            raise SpecError("data: no samples to score")
        flip = lo_val[0].abs() > hi_val[0].abs()  # [M]: the largest-|score| entry is negative
        vals = torch.where(flip, -lo_val, hi_val)  # [kk, M]
        idxs = torch.where(flip, lo_idx, hi_idx)
        return TopSamples(
            modes=modes,
            eigenvalues=[float(self.eigenvalues[m]) for m in modes],
            indices=idxs.T.cpu(),
            scores=vals.T.cpu(),
            flipped=flip.tolist(),
        )
