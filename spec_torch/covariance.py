"""Streaming difference-covariance accumulator: update / merge / compute.

State (all sums, so batches, shards and ranks merge by addition):

- ``xx = sum_i phi_x(x_i) phi_x(x_i)^T``  [Dx, Dx]
- ``xy = sum_i phi_x(x_i) phi_y(y_i)^T``  [Dx, Dy]
- ``yy = sum_i phi_y(y_i) phi_y(y_i)^T``  [Dy, Dy]
- ``sum_x``, ``sum_y``: feature sums [Dx], [Dy] (for centred statistics), and the count ``n``.

Memory is O(D^2), independent of n; each batch costs one GEMM per block.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ._validate import as_matrix, check_accumulate_dtype, check_fits, check_pair, check_positive
from .errors import SpecError
from .kernels import Kernel, resolve_kernel
from .result import SpecResult
from .solver import check_top_k, solve_features, sum_noise

#: largest eta accepted: eta scales the y sums and sqrt(eta) the scores, both must stay finite in float64
MAX_ETA = 1e100

__all__ = ["DiffCovariance", "distributed_ready"]

_STATE = ("xx", "xy", "yy", "sum_x", "sum_y", "count")


def distributed_ready() -> bool:
    """True when a torch.distributed process group is initialised with more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class DiffCovariance:
    """Accumulates the blocks of ``C = A^T A`` over batches without storing features.

    Args:
        kernel_x, kernel_y: ``"cosine"``, ``"linear"``, or a :class:`~spec_torch.kernels.Kernel` with a
            feature map (``GaussianKernel`` needs ``rff_dim``; ``"auto"`` means :data:`AUTO_RFF_DIM` here).
            Unfitted kernels (``sigma="auto"``, RFF frequencies) should be fitted on a sample of the whole data
            with :meth:`fit`; otherwise they are fitted on the first batch, with a warning (a first batch of
            class-sorted rows holds one class, and the bandwidth then depends on ``batch_size``).
        accumulate_dtype: dtype of the features and their sums: ``None`` (default) or ``torch.float64``, or
            ``torch.float32``, about twice as fast (and much faster on consumer GPUs) but its rounding error,
            about ``1.2e-7 sqrt(n)`` of the trace, swamps close comparisons (docs/numerics.md); eigenvalues below
            that level are then reported as numerical zeros.
        device: where the state lives; default the device of the first batch.

    Example:
        >>> import torch, spec_torch as st
        >>> acc = st.DiffCovariance("cosine", "linear")
        >>> for xb, yb in zip(torch.randn(100, 5).split(32), torch.randn(100, 3).split(32)):
        ...     acc.update(xb, yb)
        >>> acc.n
        100
        >>> res = acc.compute(eta=1.0)
        >>> res.eigenvalues.shape
        torch.Size([8])
    """

    def __init__(
        self,
        kernel_x: str | Kernel = "cosine",
        kernel_y: str | Kernel = "cosine",
        accumulate_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.kernel_x = resolve_kernel(kernel_x, "kernel_x")
        self.kernel_y = resolve_kernel(kernel_y, "kernel_y")
        for k, name in ((self.kernel_x, "kernel_x"), (self.kernel_y, "kernel_y")):
            if not k.has_features:
                raise SpecError(
                    f"{name}: {k!r} has no finite feature map; give GaussianKernel(rff_dim=...) for the "
                    "streaming route, or use spec(..., method='exact') for small n"
                )
        self.kernel_x = self.kernel_x.for_route("features")  # rff_dim="auto" -> AUTO_RFF_DIM frequencies
        self.kernel_y = self.kernel_y.for_route("features")
        self.accumulate_dtype = check_accumulate_dtype(accumulate_dtype) or torch.float64
        self.input_dtype: torch.dtype | None = None  # widest input dtype seen (sets the zero cut-off)
        self.device = torch.device(device) if device is not None else None
        self.dims: tuple[int, int] | None = None  # input dims (p, q), fixed by the first batch
        self.xx = self.xy = self.yy = self.sum_x = self.sum_y = None  # type: ignore[assignment]
        self.count = 0

    # ------------------------------------------------------------------ state
    @property
    def n(self) -> int:
        """Number of samples accumulated so far (this process)."""
        return int(self.count)

    def fit(self, x_sample: Any, y_sample: Any) -> DiffCovariance:
        """Fit both kernels (``sigma="auto"``, random frequencies) on a sample of the whole data; returns self.

        ``x_sample: [m, p]``, ``y_sample: [m, q]``: e.g. a seeded uniform sample of the rows, the same rows on
        both sides (``median_sigma`` uses at most 2,000 of them). Call it before the first :meth:`update`.
        """
        if self.xx is not None:
            raise SpecError(
                "fit: the accumulator already holds sums; fit the kernels before the first update"
            )
        xs = as_matrix(x_sample, "x_sample")
        ys = as_matrix(y_sample, "y_sample")
        check_pair(xs, ys, ("x_sample", "y_sample"))
        self.kernel_x = self.kernel_x.fit(xs)
        self.kernel_y = self.kernel_y.fit(ys)
        return self

    def _init_state(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if any(not k.is_fitted and k.fit_uses_data for k in (self.kernel_x, self.kernel_y)):
            warnings.warn(
                "DiffCovariance: fitting the kernels (sigma='auto', random frequencies) on the first batch only; "
                "the result then depends on batch_size and row order. Call acc.fit(x_sample, y_sample) on a "
                "uniform sample of the whole data first (st.spec does).",
                stacklevel=4,
            )
        self.kernel_x = self.kernel_x if self.kernel_x.is_fitted else self.kernel_x.fit(x)
        self.kernel_y = self.kernel_y if self.kernel_y.is_fitted else self.kernel_y.fit(y)
        self.dims = (x.shape[1], y.shape[1])
        dx, dy = self.kernel_x.feature_dim(x.shape[1]), self.kernel_y.feature_dim(y.shape[1])
        dtype = self.accumulate_dtype
        device = self.device or x.device
        self.device = device
        itemsize = torch.empty((), dtype=dtype).element_size()
        # the state plus the float64 solve's C, Z, S, eigenvectors: about 6 D x D matrices
        d = dx + dy
        check_fits(
            (dx * dx + dx * dy + dy * dy) * itemsize + 6 * d * d * 8,
            device,
            f"D = {dx} + {dy} = {d} features (D x D matrices)",
            "kernel_x/kernel_y",
        )
        self.xx = torch.zeros(dx, dx, dtype=dtype, device=device)
        self.xy = torch.zeros(dx, dy, dtype=dtype, device=device)
        self.yy = torch.zeros(dy, dy, dtype=dtype, device=device)
        self.sum_x = torch.zeros(dx, dtype=dtype, device=device)
        self.sum_y = torch.zeros(dy, dtype=dtype, device=device)

    def features(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a batch and map it to features ``([B, Dx], [B, Dy])`` with the fitted kernels."""
        x = as_matrix(x, "x", device=self.device)
        y = as_matrix(y, "y", device=self.device)
        check_pair(x, y)
        if self.dims is not None and (x.shape[1], y.shape[1]) != self.dims:
            raise SpecError(
                f"x/y: expected feature dimensions {self.dims} as in the first batch, "
                f"got ({x.shape[1]}, {y.shape[1]})"
            )
        self.kernel_x.check_input(x, "x")
        self.kernel_y.check_input(y, "y")
        if self.xx is None:
            self._init_state(x, y)
        wide = torch.float64 if torch.float64 in (x.dtype, y.dtype) else x.dtype
        self.input_dtype = wide if self.input_dtype in (None, wide) else torch.float64
        dtype = self.xx.dtype
        # features computed in the accumulation dtype: float64 sums of float32-rounded features would keep
        # float32's error (cosine normalisation, cos/sin of the random projections)
        px = self.kernel_x.features(x.to(dtype))  # [B, Dx]; as_matrix put x on self.device
        py = self.kernel_y.features(y.to(dtype))  # [B, Dy]
        return px, py

    @torch.no_grad()
    def update(self, x: Any, y: Any) -> DiffCovariance:
        """Add a batch: ``x: [B, p]``, ``y: [B, q]`` (tensors or numpy arrays, same samples in the same order)."""
        px, py = self.features(x, y)
        self.xx.addmm_(px.T, px)  # [Dx, B] @ [B, Dx] -> [Dx, Dx]
        self.xy.addmm_(px.T, py)  # [Dx, B] @ [B, Dy] -> [Dx, Dy]
        self.yy.addmm_(py.T, py)  # [Dy, B] @ [B, Dy] -> [Dy, Dy]
        self.sum_x.add_(px.sum(0))
        self.sum_y.add_(py.sum(0))
        self.count += px.shape[0]
        return self

    def merge(self, other: DiffCovariance) -> DiffCovariance:
        """Add another accumulator's sums (same kernels, same fitted frequencies) into this one."""
        if not isinstance(other, DiffCovariance):
            raise SpecError(f"other: expected a DiffCovariance, got {type(other).__name__}")
        if other.xx is None:
            return self
        if self.xx is None:
            self.kernel_x, self.kernel_y, self.dims, self.device = (
                other.kernel_x,
                other.kernel_y,
                other.dims,
                other.device,
            )
            for key in _STATE[:-1]:
                setattr(self, key, getattr(other, key).clone())
            self.count = other.count
            self.input_dtype = other.input_dtype
            return self
        if self.kernel_x != other.kernel_x or self.kernel_y != other.kernel_y or self.dims != other.dims:
            raise SpecError(
                "other: cannot merge accumulators with different kernels or input dimensions: "
                f"{self.kernel_x!r}/{self.kernel_y!r} {self.dims} vs {other.kernel_x!r}/{other.kernel_y!r} {other.dims}"
            )
        for key in _STATE[:-1]:
            getattr(self, key).add_(getattr(other, key).to(getattr(self, key)))
        if other.input_dtype != self.input_dtype:
            self.input_dtype = other.input_dtype if self.input_dtype is None else torch.float64
        self.count += other.count
        return self

    def state_dict(self) -> dict[str, Any]:
        """The sums, count and resolved kernels, for checkpoints (``torch.save``) and resumed runs."""
        if self.xx is None:
            return {"count": 0}
        out = {key: getattr(self, key) for key in _STATE}
        out.update(dims=self.dims, kernel_x=self.kernel_x, kernel_y=self.kernel_y)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> DiffCovariance:
        if int(state.get("count", 0)) == 0:
            return self
        self.kernel_x, self.kernel_y, self.dims = state["kernel_x"], state["kernel_y"], tuple(state["dims"])
        for key in _STATE[:-1]:
            setattr(self, key, state[key].clone())
        self.device = self.xx.device
        self.count = int(state["count"])
        return self

    def synced(self) -> DiffCovariance:
        """A copy whose sums are all-reduced (summed) over the ranks of the default process group.

        Every rank must call it (it is a collective). The ranks first exchange their fitted kernels: a rank
        that saw no batch takes them from the others and adds zeros; kernels fitted differently on different
        ranks (e.g. ``sigma="auto"`` fitted on each rank's own first batch) raise :class:`SpecError` on every
        rank rather than summing incompatible features. The count is reduced as int64, exactly.
        """
        dist = torch.distributed
        mine = None if self.xx is None else (self.kernel_x, self.kernel_y, self.dims, self.xx.dtype)
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (mine, self.input_dtype))
        inputs = {d for _, d in seen if d is not None}  # the ranks' input dtypes: the widest wins
        seen = [s for s, _ in seen]
        present = [(rank, s) for rank, s in enumerate(seen) if s is not None]
        if not present:
            raise SpecError("update: no rank accumulated any samples; call update(x, y) before compute()")
        ref_rank, (kx, ky, dims, dtype) = present[0]
        for rank, (okx, oky, odims, odtype) in present[1:]:
            if (okx, oky, odims, odtype) != (kx, ky, dims, dtype):
                raise SpecError(
                    f"kernel_x/kernel_y: rank {rank} has {okx!r}/{oky!r} on inputs {odims} summed in {odtype}, "
                    f"rank {ref_rank} {kx!r}/{ky!r} on {dims} in {dtype}; fit the kernels once and pass the fitted "
                    "kernels (and the same accumulate_dtype) to every rank (kernel.fit(sample), or "
                    "spec_torch.distributed.fit_on_main)"
                )
        if self.xx is None:  # this rank saw no batch: contribute zeros of the right shapes
            dev = self.device or (
                torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            )
            self.kernel_x, self.kernel_y, self.device = kx, ky, dev
            zx = torch.zeros(1, dims[0], dtype=dtype, device=dev)
            self._init_state(zx, torch.zeros(1, dims[1], dtype=dtype, device=dev))
        out = DiffCovariance(self.kernel_x, self.kernel_y, self.accumulate_dtype, self.device)
        out.input_dtype = (torch.float64 if torch.float64 in inputs else inputs.pop()) if inputs else None
        out.kernel_x, out.kernel_y, out.dims, out.device = (
            self.kernel_x,
            self.kernel_y,
            self.dims,
            self.device,
        )
        flat = torch.cat([getattr(self, k).reshape(-1) for k in _STATE[:-1]])
        dist.all_reduce(flat)
        offset = 0
        for key in _STATE[:-1]:
            t = getattr(self, key)
            setattr(out, key, flat[offset : offset + t.numel()].view_as(t).clone())
            offset += t.numel()
        count = torch.tensor([self.count], dtype=torch.int64, device=self.xx.device)
        dist.all_reduce(count)
        out.count = int(count)
        return out

    # ---------------------------------------------------------------- compute
    def compute(
        self,
        eta: float = 1.0,
        top_k: int | None = None,
        sync_dist: bool | None = None,
        center: bool = False,
    ) -> SpecResult:
        """Solve for the spectrum of ``(K_x - eta K_y) / n``.

        Args:
            eta: weight of the y kernel, > 0 (numpy and 0-d tensor scalars accepted).
            top_k: ``None`` for the full spectrum (``min(n, D)`` eigenvalues of largest magnitude), or at most
                ``top_k`` strongest modes of each sign, found with a block Krylov solver (cheaper for large D);
                where fewer than ``top_k`` modes of a sign exist, only those are returned.
            sync_dist: all-reduce the sums over the ranks of ``torch.distributed`` first. ``None`` (default):
                when a process group with more than one rank is initialised.
            center: centre both kernels (``H K H``, ``H = I - 11^T / n``): the feature means are subtracted from
                the sums, which removes the constant (uniform) direction. Default False: the paper's SPEC.
        """
        eta = check_positive(eta, "eta", max_value=MAX_ETA)
        sync = sync_dist if sync_dist is not None else distributed_ready()
        if self.xx is None and not sync:
            raise SpecError("update: no samples were accumulated; call update(x, y) before compute()")
        state = self.synced() if sync else self
        n = state.n
        d = state.xx.shape[0] + state.yy.shape[0]
        top_k = check_top_k(top_k, min(n, d))
        f64 = torch.float64
        xx, xy, yy = state.xx.to(f64), state.xy.to(f64), state.yy.to(f64)
        sx, sy = state.sum_x.to(f64), state.sum_y.to(f64)  # [Dx], [Dy]
        finite = all(bool(torch.isfinite(t).all()) for t in (xx, xy, yy, sx, sy))
        if not finite:
            raise SpecError(
                f"x/y: the feature sums overflowed in {state.xx.dtype}; rescale the embeddings"
                + (" or use accumulate_dtype=torch.float64" if state.xx.dtype != f64 else "")
            )
        trace = float(xx.diagonal().sum()) + eta * float(yy.diagonal().sum())  # n (tr K_x + eta tr K_y) / n
        if not (math.isfinite(trace) and trace > 0):
            raise SpecError(
                f"x/y: the kernel matrices have trace {trace:.3g}; expected a finite positive value "
                "(all-zero features, or magnitudes beyond float64)"
            )
        noise = sum_noise(state.xx.dtype, n, trace)
        if center:  # XX_c = XX - s_x s_x^T / n etc.: H K H on the features route (DESIGN.md, second round)
            xx = xx - torch.outer(sx, sx) / n
            xy = xy - torch.outer(sx, sy) / n
            yy = yy - torch.outer(sy, sy) / n
        scale = trace / n
        in_dtype = state.input_dtype or state.xx.dtype
        zero_rtol = max(torch.finfo(in_dtype).eps, noise / trace)
        evals, u, solver = solve_features(
            xx, xy, yy, n, eta, top_k=top_k, noise=noise, zero_tol=zero_rtol * scale
        )
        dx = xx.shape[0]
        # <v_k, 1> / sqrt(n) = (s_x^T u_kX + sqrt(eta) s_y^T u_kY) / (n |lambda_k|)  (DESIGN.md, second round)
        proj_sum = sx @ u[:dx] + math.sqrt(eta) * (sy @ u[dx:])  # [K]
        shift = proj_sum / n if center else None  # the mean feature's projection, subtracted when scoring
        uniformity = (
            torch.zeros_like(evals) if center else proj_sum.abs() / (n * evals.abs().clamp_min(1e-300))
        )
        return SpecResult.from_features(
            evals,
            u,
            n=n,
            eta=float(eta),
            kernel_x=state.kernel_x,
            kernel_y=state.kernel_y,
            dims=state.dims,
            scale=scale,
            uniformity=uniformity.cpu(),
            solver=solver,
            center=center,
            zero_rtol=zero_rtol,
            shift=shift,
        )
