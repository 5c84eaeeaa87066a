"""Streaming difference-covariance accumulator: update / merge / compute.

State (all sums, so batches, shards and ranks merge by addition):

- ``xx = sum_i phi_x(x_i) phi_x(x_i)^T``  [Dx, Dx]
- ``xy = sum_i phi_x(x_i) phi_y(y_i)^T``  [Dx, Dy]
- ``yy = sum_i phi_y(y_i) phi_y(y_i)^T``  [Dy, Dy]
- ``sum_x``, ``sum_y``: feature sums [Dx], [Dy] (for centred statistics), and the count ``n``.

Memory is O(D^2), independent of n; each batch costs one GEMM per block.
"""

from __future__ import annotations

from typing import Any

import torch

from ._validate import as_matrix, check_fits, check_pair, check_positive
from .errors import SpecError
from .kernels import Kernel, resolve_kernel
from .result import SpecResult
from .solver import check_top_k, solve_features

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
            feature map (``GaussianKernel`` needs ``rff_dim``). Unfitted kernels (``sigma="auto"``, RFF
            frequencies) are fitted on the first batch.
        accumulate_dtype: dtype of the sums; default the input dtype (float32, or float64 for float64 input).
            ``torch.float64`` gives float64 accumulation for float32 features.
        device: where the state lives; default the device of the first batch.
        groups: keep G >= 2 group-wise partial sums beside the totals (float64, G x the memory), for
            ``compute(replicates=R)``: intervals, held-out eigenvalues and stability (spec_torch.uncertainty).
            Each sample's group is a seeded hash of its global index (``update(..., index=)``).
        group_seed: seed of that hash.

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
        groups: int | None = None,
        group_seed: int = 0,
    ) -> None:
        self.kernel_x = resolve_kernel(kernel_x, "kernel_x")
        self.kernel_y = resolve_kernel(kernel_y, "kernel_y")
        for k, name in ((self.kernel_x, "kernel_x"), (self.kernel_y, "kernel_y")):
            if not k.has_features:
                raise SpecError(
                    f"{name}: {k!r} has no finite feature map; give GaussianKernel(rff_dim=...) for the "
                    "streaming route, or use spec(..., method='exact') for small n"
                )
        self.accumulate_dtype = accumulate_dtype
        self.device = torch.device(device) if device is not None else None
        self.dims: tuple[int, int] | None = None  # input dims (p, q), fixed by the first batch
        self.xx = self.xy = self.yy = self.sum_x = self.sum_y = None  # type: ignore[assignment]
        self.count = 0
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 2):
            raise SpecError(f"groups: expected an integer >= 2 or None, got {groups!r}")
        if isinstance(group_seed, bool) or not isinstance(group_seed, int) or group_seed < 0:
            raise SpecError(f"group_seed: expected a non-negative integer, got {group_seed!r}")
        self.groups, self.group_seed = groups, group_seed
        self.group_state: dict[str, torch.Tensor] | None = None  # spec_torch.uncertainty.accumulate_groups
        self._stale = False  # with groups: xx, xy, yy lag the group sums until _settle()

    def _settle(self) -> None:
        """With groups, updates sum into the groups only; set the block totals to their sum (float64 sums)."""
        if self.group_state is not None and self._stale:
            for key in ("xx", "xy", "yy"):
                getattr(self, key).copy_(self.group_state[key].sum(0))
            self._stale = False

    # ------------------------------------------------------------------ state
    @property
    def n(self) -> int:
        """Number of samples accumulated so far (this process)."""
        return int(self.count)

    def _init_state(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.kernel_x = self.kernel_x if self.kernel_x.is_fitted else self.kernel_x.fit(x)
        self.kernel_y = self.kernel_y if self.kernel_y.is_fitted else self.kernel_y.fit(y)
        self.dims = (x.shape[1], y.shape[1])
        dx, dy = self.kernel_x.feature_dim(x.shape[1]), self.kernel_y.feature_dim(y.shape[1])
        dtype = self.accumulate_dtype or x.dtype
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
        if self.groups is not None:
            self._init_groups(dx, dy, device)

    def _init_groups(self, dx: int, dy: int, device: torch.device) -> None:
        """Zero group sums (float64): ``xx [G, Dx, Dx]``, ``xy``, ``yy``, ``sum_x [G, Dx]``, ``sum_y``, ``count [G]``."""
        g, f64 = self.groups, torch.float64
        check_fits(
            g * (dx * dx + dx * dy + dy * dy) * 8 + 12 * (dx + dy) ** 2 * 8,
            device,
            f"groups = {g} group-wise sums of D = {dx} + {dy} features (G x D x D matrices)",
            "groups",
        )
        self.group_state = {
            "xx": torch.zeros(g, dx, dx, dtype=f64, device=device),
            "xy": torch.zeros(g, dx, dy, dtype=f64, device=device),
            "yy": torch.zeros(g, dy, dy, dtype=f64, device=device),
            "sum_x": torch.zeros(g, dx, dtype=f64, device=device),
            "sum_y": torch.zeros(g, dy, dtype=f64, device=device),
            "count": torch.zeros(g, dtype=f64, device=device),
        }

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
        dtype = self.xx.dtype
        px = self.kernel_x.features(x).to(dtype)  # [B, Dx]; as_matrix put x on self.device
        py = self.kernel_y.features(y).to(dtype)  # [B, Dy]
        return px, py

    @torch.no_grad()
    def update(self, x: Any, y: Any, index: Any = None) -> DiffCovariance:
        """Add a batch: ``x: [B, p]``, ``y: [B, q]`` (tensors or numpy arrays, same samples in the same order).

        ``index: [B]`` global sample indices (dataset row numbers), used only with ``groups``: they decide each
        sample's group; default the running count of this accumulator (``n, n+1, ...``), which is global only on
        a single process reading the data in order.
        """
        px, py = self.features(x, y)
        if self.groups is not None:
            return self._update_groups(px, py, index)
        self.xx.addmm_(px.T, px)  # [Dx, B] @ [B, Dx] -> [Dx, Dx]
        self.xy.addmm_(px.T, py)  # [Dx, B] @ [B, Dy] -> [Dx, Dy]
        self.yy.addmm_(py.T, py)  # [Dy, B] @ [B, Dy] -> [Dy, Dy]
        self.sum_x.add_(px.sum(0))
        self.sum_y.add_(py.sum(0))
        self.count += px.shape[0]
        return self

    def _update_groups(self, px: torch.Tensor, py: torch.Tensor, index: Any) -> DiffCovariance:
        """Group-wise update: one sub-GEMM per group and block, the same FLOPs as the plain update."""
        from .uncertainty import accumulate_groups, assign_groups

        b = px.shape[0]
        if index is None:
            index = torch.arange(self.count, self.count + b)
        index = torch.as_tensor(index)
        if index.shape != (b,) or index.is_floating_point() or index.dtype == torch.bool:
            raise SpecError(
                f"index: expected {b} integer sample indices [B], got {index.dtype} {tuple(index.shape)}"
            )
        if b and int(index.min()) < 0:
            raise SpecError(f"index: expected non-negative sample indices, got minimum {int(index.min())}")
        if self.group_state is None:  # totals restored by load_state_dict from a state without group sums
            raise SpecError(
                "groups: this accumulator holds totals but no group sums (restored from a state without them); "
                "start a new DiffCovariance(groups=G) or resume from a state saved with its group sums"
            )
        gid = assign_groups(index, self.groups, self.group_seed).to(px.device)  # [B]
        accumulate_groups(self.group_state, px, py, gid)
        self._stale = True  # the block totals are the group sums' sum, formed once by _settle()
        self.sum_x.add_(px.sum(0))
        self.sum_y.add_(py.sum(0))
        self.count += b
        return self

    def merge(self, other: DiffCovariance) -> DiffCovariance:
        """Add another accumulator's sums (same kernels, same fitted frequencies) into this one."""
        if not isinstance(other, DiffCovariance):
            raise SpecError(f"other: expected a DiffCovariance, got {type(other).__name__}")
        self._settle()
        other._settle()
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
            self._merge_groups(other, first=True)
            return self
        if self.kernel_x != other.kernel_x or self.kernel_y != other.kernel_y or self.dims != other.dims:
            raise SpecError(
                "other: cannot merge accumulators with different kernels or input dimensions: "
                f"{self.kernel_x!r}/{self.kernel_y!r} {self.dims} vs {other.kernel_x!r}/{other.kernel_y!r} {other.dims}"
            )
        self._merge_groups(other, first=False)
        for key in _STATE[:-1]:
            getattr(self, key).add_(getattr(other, key).to(getattr(self, key)))
        self.count += other.count
        return self

    def _merge_groups(self, other: DiffCovariance, first: bool) -> None:
        if (self.groups, self.group_seed) != (other.groups, other.group_seed):
            raise SpecError(
                f"other: cannot merge groups={other.groups} (group_seed={other.group_seed}) into "
                f"groups={self.groups} (group_seed={self.group_seed})"
            )
        if other.group_state is None:
            return
        if first:
            self.group_state = {k: v.clone() for k, v in other.group_state.items()}
        else:
            for k, v in other.group_state.items():
                self.group_state[k].add_(v.to(self.group_state[k]))

    def state_dict(self) -> dict[str, Any]:
        """The sums, count and resolved kernels, for checkpoints (``torch.save``) and resumed runs."""
        self._settle()
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
        self._settle()
        mine = None if self.xx is None else (self.kernel_x, self.kernel_y, self.dims, self.xx.dtype)
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, mine)
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
        out = DiffCovariance(
            self.kernel_x, self.kernel_y, self.accumulate_dtype, self.device, self.groups, self.group_seed
        )
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
        if self.group_state is not None:  # the group sums travel with the totals (float64, one all-reduce)
            gflat = torch.cat([t.reshape(-1) for t in self.group_state.values()])
            dist.all_reduce(gflat)
            out.group_state, offset = {}, 0
            for key, t in self.group_state.items():
                out.group_state[key] = gflat[offset : offset + t.numel()].view_as(t).clone()
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
        replicates: int | None = None,
        level: float = 0.9,
        seed: int = 0,
        interval: str = "percentile",
    ) -> SpecResult:
        """Solve for the spectrum of ``(K_x - eta K_y) / n``.

        Args:
            eta: weight of the y kernel, > 0.
            top_k: ``None`` for the full spectrum (``min(n, D)`` eigenvalues of largest magnitude), or the number
                of strongest modes of each sign, found with a block Krylov solver (cheaper for large D).
            sync_dist: all-reduce the sums over the ranks of ``torch.distributed`` first. ``None`` (default):
                when a process group with more than one rank is initialised.
            replicates: with ``groups``, R >= 2 bootstrap replicates over the groups give ``eigenvalue_ci``,
                ``spec_diff_ci``, ``heldout_eigenvalues`` and ``stability`` (see spec_torch.uncertainty);
                ``0``/``None`` skips them.
            level: level of the intervals (default 0.9). seed: seeds the resampling (deterministic).
            interval: ``"percentile"`` or ``"bc"`` (bias-corrected percentile).
        """
        check_positive(eta, "eta")
        sync = sync_dist if sync_dist is not None else distributed_ready()
        if self.xx is None and not sync:
            raise SpecError("update: no samples were accumulated; call update(x, y) before compute()")
        self._settle()
        state = self.synced() if sync else self
        n = state.n
        d = state.xx.shape[0] + state.yy.shape[0]
        check_top_k(top_k, min(n, d))
        f64 = torch.float64
        evals, u = solve_features(
            state.xx.to(f64), state.xy.to(f64), state.yy.to(f64), n, float(eta), top_k=top_k
        )
        result = SpecResult.from_features(
            evals,
            u,
            n=n,
            eta=float(eta),
            kernel_x=state.kernel_x,
            kernel_y=state.kernel_y,
            dims=state.dims,
            scale=float(state.xx.diagonal().sum() + eta * state.yy.diagonal().sum()) / n,
        )
        if replicates:
            state._attach_uncertainty(result, float(eta), top_k, replicates, level, seed, interval)
        return result

    def _attach_uncertainty(self, result: SpecResult, eta, top_k, replicates, level, seed, interval) -> None:
        """Bootstrap / held-out / stability from the group sums into ``result`` (spec_torch.uncertainty)."""
        from .solver import assemble_covariance
        from .uncertainty import estimate

        if self.group_state is None:
            raise SpecError(
                f"replicates: {replicates} replicates need group-wise sums; create DiffCovariance(..., groups=G)"
            )
        f64 = torch.float64
        c_full = assemble_covariance(self.xx.to(f64), self.xy.to(f64), self.yy.to(f64), self.n, eta)
        out = estimate(
            self.group_state,
            c_full,
            result.eigenvalues,
            result._u,
            eta=eta,
            dx=self.xx.shape[0],
            zero_tol=result._zero_tol(),
            replicates=replicates,
            level=level,
            seed=seed,
            top_k=top_k,
            interval=interval,
        )
        result.eigenvalue_ci = out["eigenvalue_ci"]
        result.spec_diff_ci = out["spec_diff_ci"]
        result.heldout_eigenvalues = out["heldout_eigenvalues"]
        result.stability = out["stability"]
        result.uncertainty = out["settings"]
