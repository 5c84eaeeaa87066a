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

from ._validate import (
    as_matrix,
    check_accumulate_dtype,
    check_fits,
    check_pair,
    check_positive,
    check_seed,
    resolve_device,
)
from .errors import SpecError
from .kernels import Kernel, kernel_from_state, resolve_kernel
from .result import SpecResult
from .solver import check_top_k, feature_route_error, shuffled_spec_diff, solve_features, sum_noise

#: largest eta accepted: eta scales the y sums and sqrt(eta) the scores, both must stay finite in float64
MAX_ETA = 1e100

__all__ = ["DiffCovariance", "distributed_ready"]

_STATE = ("xx", "xy", "yy", "sum_x", "sum_y", "count")
_FORMAT = "spec_torch.DiffCovariance/1"  # tag of state_dict(); bump when the saved entries change


#: rows k of a group's slot in the staging buffer, i.e. of each group GEMM: addmm of [D, k] @ [k, D] costs about
#: 1.8-2.3x one large GEMM at k = 64, 1.3-1.5x at k = 128, 1.04-1.16x at k = 256, 1.0-1.12x from k = 512
#: (CPU, float64, 1 and 2 threads)
STAGE_ROWS_PER_GROUP = 512
#: fewest rows per group GEMM, whatever the memory bound
MIN_STAGE_ROWS_PER_GROUP = 64
#: a batch with this many rows per group on average (or a full slot's k, if fewer) goes straight in while nothing
#: is staged: its group GEMMs are already near full speed and the copy into the slots would cost more
#: (bench_uncertainty.py, D = 400 + 400, G = 32, B = 8,192, 1 thread: straight in 1.02x the plain pass,
#: through the slots 1.16x)
DIRECT_ROWS_PER_GROUP = 256
#: the staging buffer may always use this much, even beyond half the group sums (small D: at d = 200 per side,
#: G = 32, half the group sums allow only k = 150 rows, measured 1.35-1.57x the plain update against 1.26-1.31x
#: at k = 512)
STAGE_MIN_BYTES = 64 * 2**20


def _stage_rows(groups: int, dx: int, dy: int) -> int:
    """Capacity ``S = G k`` of the grouped path's staging buffer, ``k`` rows per group GEMM.

    ``k = clamp(max(k_half, k_64MiB), 64, 512)``: at most 512 (no faster beyond); ``k_half =
    (Dx^2 + Dx Dy + Dy^2) // (2 (Dx + Dy))`` keeps the buffer's ``S (Dx + Dy)`` float64 entries within half the
    group sums' ``G (Dx^2 + Dx Dy + Dy^2)``, ``k_64MiB`` within :data:`STAGE_MIN_BYTES`, whichever allows more;
    at least 64. ``Dx = Dy = d``, G = 32: k = 327 at d = 400 (64 MiB), 512 at d = 200 and d = 2000.
    """
    k_half = (dx * dx + dx * dy + dy * dy) // (2 * (dx + dy))
    k_bytes = STAGE_MIN_BYTES // (groups * (dx + dy) * 8)
    return groups * max(MIN_STAGE_ROWS_PER_GROUP, min(STAGE_ROWS_PER_GROUP, max(k_half, k_bytes)))


def check_state_fits(
    dx: int,
    dy: int,
    itemsize: int,
    device: torch.device,
    groups: int | None = None,
    kernels: tuple = (),
    bound: str = "",
) -> None:
    """Refuse, before anything is allocated, sums of ``D = dx + dy`` features that would not fit on ``device``:
    the blocks in ``itemsize`` bytes plus the float64 solve's C, Z, S and eigenvectors (about 6 D x D matrices);
    with ``groups``, also the G group-wise sums, the staging buffer and the replicates' solves."""
    d = dx + dy
    rff = [
        f"{side}.rff_dim = {k.rff_dim}"
        for side, k in zip(("kernel_x", "kernel_y"), kernels)
        if isinstance(getattr(k, "rff_dim", None), int)
    ]
    check_fits(
        (dx * dx + dx * dy + dy * dy) * itemsize + 6 * d * d * 8,
        device,
        f"{bound}D = {dx} + {dy} = {d} features (D x D matrices{'; ' if rff else ''}{', '.join(rff)})",
        "kernel_x/kernel_y",
    )
    if groups is not None:
        check_fits(
            groups * (dx * dx + dx * dy + dy * dy) * 8  # the group sums
            + _stage_rows(groups, dx, dy)
            * (dx + dy)
            * 8  # the staging buffer (allocated by the first update)
            + 12 * d * d * 8,  # the replicates' solves
            device,
            f"groups = {groups} group-wise sums of {bound}D = {dx} + {dy} features (G x D x D matrices)",
            "groups",
        )


def distributed_ready() -> bool:
    """True when a torch.distributed process group is initialised with more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


#: tolerances of a loaded state's consistency checks (:meth:`DiffCovariance.load_state_dict`), relative to the
#: largest diagonal entry of the uncentred sums (PSD, group sums) or to the count (traces), per dtype of the sums:
#: float32 sums of a stream of B batches carry up to about B * 1.2e-7 relative rounding per entry (measured: the
#: centred second moment of nearly constant cosine features, 3,200 one-row batches, has eigenvalues down to
#: -8e-4 of the largest diagonal entry), float64 sums about B * 2.2e-16. The tolerance used is the larger of
#: this and ``4 count eps`` (B <= count), so a long float32 stream is never refused for its own rounding.
STATE_RTOL = {torch.float32: 1e-2, torch.float64: 1e-8}
#: kernels whose feature rows all have unit norm (k(a, a) = 1): their sums' traces equal the count
_UNIT_DIAGONAL = ("cosine", "gaussian")


def _check_state(state: Any, acc: DiffCovariance, adopt_kernels: bool) -> dict[str, Any]:
    """Every field of a saved :meth:`DiffCovariance.state_dict` checked against ``acc``, nothing assigned.

    Types, shapes and dtypes against the kernels and dims; every tensor finite; ``count`` an integer, >= 1 with
    sums and 0 without; the group counts non-negative whole numbers summing to ``count`` and the group sums
    summing to the totals; for kernels with unit diagonals (cosine, Gaussian) ``trace(XX) = trace(YY) = count``;
    the centred joint second moment ``[XX XY; XY^T YY] - s s^T / n`` positive semidefinite. Tolerances:
    :data:`STATE_RTOL`. Returns the values to assign (``kernels, dims, count, input_dtype, sums,
    group_state``); a :class:`SpecError` naming the entry otherwise.
    """
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SpecError(f"state: expected a DiffCovariance.state_dict() (format {_FORMAT!r}), got {got!r}")
    missing = [k for k in ("count", "dims", "kernel_x", "kernel_y") if k not in state]
    if missing:
        raise SpecError(f"state: missing entries {missing}")
    count = state["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise SpecError(f"state: 'count' must be an integer >= 0, got {count!r}")
    if adopt_kernels:
        kx = kernel_from_state(state["kernel_x"], "state.kernel_x")
        ky = kernel_from_state(state["kernel_y"], "state.kernel_y")
    else:
        kx = acc.kernel_x.load_state_dict(state["kernel_x"], "state.kernel_x")
        ky = acc.kernel_y.load_state_dict(state["kernel_y"], "state.kernel_y")
    saved_input = state.get("input_dtype")
    if saved_input not in (None, "float16", "bfloat16", "float32", "float64"):
        raise SpecError(f"state: 'input_dtype' must be a float dtype name or None, got {saved_input!r}")
    groups = state.get("groups")
    if (groups, state.get("group_seed", acc.group_seed)) != (acc.groups, acc.group_seed):
        raise SpecError(
            f"state: saved with groups={groups} (group_seed={state.get('group_seed')}), this accumulator has "
            f"groups={acc.groups} (group_seed={acc.group_seed}); construct it with the same groups"
        )
    dims = state["dims"]
    out: dict[str, Any] = {
        "kernels": (kx, ky),
        "dims": None,
        "count": count,
        "input_dtype": None if saved_input is None else getattr(torch, saved_input),
        "sums": {},
        "group_state": None,
    }
    if dims is None:
        if count != 0:
            raise SpecError(f"state: 'count' is {count} but no sums are saved ('dims' is None); expected 0")
        return out
    if not (
        isinstance(dims, (list, tuple))
        and len(dims) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
    ):
        raise SpecError(f"state: 'dims' must be two integers [p, q] >= 1, got {dims!r}")
    if count < 1:
        raise SpecError(
            "state: 'count' is 0 but sums are saved; expected the number of samples summed (>= 1)"
        )
    dx, dy = kx.feature_dim(dims[0]), ky.feature_dim(dims[1])
    shapes = {"xx": (dx, dx), "xy": (dx, dy), "yy": (dy, dy), "sum_x": (dx,), "sum_y": (dy,)}
    sums: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        sums[key] = _checked_tensor(state.get(key), key, shape, (torch.float32, torch.float64))
    dtype = sums["xx"].dtype
    if any(t.dtype != dtype for t in sums.values()) or len({t.device for t in sums.values()}) != 1:
        raise SpecError("state: the saved sums must share one dtype (float32 or float64) and one device")
    rtol = max(STATE_RTOL[dtype], 4 * count * torch.finfo(dtype).eps)
    f64 = torch.float64
    for k, name, block in ((kx, "xx", sums["xx"]), (ky, "yy", sums["yy"])):
        if k.name in _UNIT_DIAGONAL:
            trace = float(block.to(f64).diagonal().sum())
            if abs(trace - count) > rtol * count:
                raise SpecError(
                    f"state: trace of {name!r} is {trace:.6g}, but a {k.name} kernel's features have unit norm, "
                    f"so it must equal 'count' = {count} (relative tolerance {rtol:g}); the state is corrupted"
                )
    _check_psd(sums, count, rtol)
    group_state = None
    if groups is not None:
        group_state = {}
        for key in ("xx", "xy", "yy", "sum_x", "sum_y", "count"):
            shape = (groups, *shapes[key]) if key != "count" else (groups,)
            group_state[key] = _checked_tensor(state.get(f"group_{key}"), f"group_{key}", shape, (f64,))
        gc = group_state["count"]
        if bool((gc < 0).any()) or not bool((gc == gc.round()).all()):
            raise SpecError("state: 'group_count' must hold whole numbers >= 0 (samples per group)")
        if int(gc.sum()) != count:
            raise SpecError(f"state: 'group_count' sums to {int(gc.sum())}, but 'count' is {count}")
        for key in shapes:
            total = sums[key].to(f64)
            parts = group_state[key].sum(0).to(total.device)
            if float((parts - total).abs().max()) > rtol * float(total.abs().max()):
                raise SpecError(f"state: 'group_{key}' does not sum to {key!r} (relative tolerance {rtol:g})")
    out.update(dims=(dims[0], dims[1]), sums=sums, group_state=group_state)
    return out


def _checked_tensor(
    t: Any, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]
) -> torch.Tensor:
    """``t`` must be a finite tensor of ``shape`` in one of ``dtypes``."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype not in dtypes:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise SpecError(
            f"state: {key!r} must be a floating tensor of shape {list(shape)} ({names}), got {got}"
        )
    if t.layout != torch.strided or t.is_meta:
        raise SpecError(f"state: {key!r} must be a dense tensor with data")
    if not bool(torch.isfinite(t).all()):
        raise SpecError(f"state: {key!r} holds NaN or Inf; the state is corrupted")
    return t


def _check_psd(sums: dict[str, torch.Tensor], count: int, rtol: float) -> None:
    """The centred joint second moment ``M = [XX XY; XY^T YY] - s s^T / n`` (a covariance times n) must be
    positive semidefinite: ``M + rtol * s_max * I`` has a Cholesky factor, ``s_max`` the largest diagonal entry of
    the uncentred sums (the scale of their rounding; centring can cancel most of it)."""
    f64 = torch.float64
    xx, xy, yy = (sums[k].to(f64) for k in ("xx", "xy", "yy"))
    s = torch.cat([sums["sum_x"].to(f64), sums["sum_y"].to(f64)])  # [D]
    m = torch.cat([torch.cat([xx, xy], 1), torch.cat([xy.T, yy], 1)], 0) - torch.outer(s, s) / count  # [D, D]
    m = (m + m.T) / 2
    scale = max(float(xx.diagonal().abs().max()), float(yy.diagonal().abs().max()), 1e-300)
    jitter = rtol * scale
    _, info = torch.linalg.cholesky_ex(m + jitter * torch.eye(m.shape[0], dtype=f64, device=m.device))
    if int(info) != 0:
        raise SpecError(
            "state: the saved sums are not a second moment ([XX XY; XY^T YY] - s s^T / n is not positive "
            f"semidefinite within {rtol:g} of the sums' largest diagonal entry); the state is corrupted"
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
        self.kernel_x = self.kernel_x.for_route("features")  # rff_dim="auto" -> AUTO_RFF_DIM frequencies
        self.kernel_y = self.kernel_y.for_route("features")
        self.accumulate_dtype = check_accumulate_dtype(accumulate_dtype) or torch.float64
        self.input_dtype: torch.dtype | None = None  # widest input dtype seen (sets the zero cut-off)
        self.device = resolve_device(device) if device is not None else None  # cuda without CUDA: SpecError
        self.dims: tuple[int, int] | None = None  # input dims (p, q), fixed by the first batch
        self.xx = self.xy = self.yy = self.sum_x = self.sum_y = None  # type: ignore[assignment]
        self.count = 0
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 2):
            raise SpecError(f"groups: expected an integer >= 2 or None, got {groups!r}")
        group_seed = check_seed(group_seed, "group_seed")
        self.groups, self.group_seed = groups, group_seed
        # the sums' size from the kernels' widths alone (random features: 2 rff_dim whatever the input), so
        # rff_dim=10**9 is refused here, before a frequency or a sum is allocated; checked again with the inputs
        cpu = torch.device("cpu")
        check_state_fits(
            self.kernel_x.feature_dim(1),
            self.kernel_y.feature_dim(1),
            self.accumulate_dtype.itemsize,
            self.device or cpu,
            groups,
            (self.kernel_x, self.kernel_y),
            bound="at least ",
        )
        self._group_sums: dict[str, torch.Tensor] | None = None  # read through group_state (flushes first)
        # with groups, each group's rows wait in its slot of a staging buffer until k of them are there, so
        # every group GEMM sees k rows whatever the batch size (_stage_or_add): features [G k + 1, Dx] and
        # [G k + 1, Dy] (float64; group g's slot is rows g k ... g k + k - 1, the last row a discard row);
        # _fill[g] rows of group g are staged
        self._stage: tuple[torch.Tensor, torch.Tensor] | None = None
        self._slot = 0  # k, rows per group slot (_stage_rows)
        self._fill = [0] * (groups or 0)
        self._flushes = 0  # group slots flushed so far (tests check that the staged path ran)
        self._pending_error: SpecError | None = None  # a failed update under torch.distributed (see update)
        self._stale = False  # with groups: xx, xy, yy, sum_x, sum_y lag the group sums until _settle()

    @property
    def group_state(self) -> dict[str, torch.Tensor] | None:
        """The group-wise sums (see :func:`spec_torch.uncertainty.accumulate_groups`), staged rows added first."""
        self._flush()
        return self._group_sums

    @group_state.setter
    def group_state(self, sums: dict[str, torch.Tensor] | None) -> None:
        """Replace the group sums; rows staged for the old ones are dropped (the next update sizes a new buffer)."""
        self._group_sums, self._stage, self._fill = sums, None, [0] * (self.groups or 0)

    @property
    def _staged(self) -> int:
        """Rows staged and not yet in the group sums."""
        return sum(self._fill)

    def _settle(self) -> None:
        """With groups, updates sum into the groups only: flush the staged rows, then set the totals (blocks and
        feature sums) to the group sums' sum (float64 sums)."""
        self._flush()
        if self._group_sums is not None and self._stale:
            for key in ("xx", "xy", "yy", "sum_x", "sum_y"):
                getattr(self, key).copy_(self._group_sums[key].sum(0))
            self._stale = False

    @classmethod
    def from_sums(
        cls,
        kernel_x: Kernel,
        kernel_y: Kernel,
        xx: torch.Tensor,
        xy: torch.Tensor,
        yy: torch.Tensor,
        sum_x: torch.Tensor,
        sum_y: torch.Tensor,
        count: int,
        dims: tuple[int, int],
    ) -> DiffCovariance:
        """An accumulator holding sums streamed elsewhere (e.g. two sub-blocks of a joint matrix,
        :class:`spec_torch.matrix.MatrixCovariance`), so :meth:`compute` solves them exactly as it solves its own.

        ``xx: [Dx, Dx]``, ``xy: [Dx, Dy]``, ``yy: [Dy, Dy]``, ``sum_x: [Dx]``, ``sum_y: [Dy]`` in the dtype they
        were summed in (it sets the rounding-level cut-off); ``kernel_x``/``kernel_y`` fitted; ``dims`` = (p, q).
        """
        acc = cls(kernel_x, kernel_y, accumulate_dtype=xx.dtype, device=xx.device)
        acc.dims, acc.count = (int(dims[0]), int(dims[1])), int(count)
        acc.xx, acc.xy, acc.yy, acc.sum_x, acc.sum_y = xx, xy, yy, sum_x, sum_y
        return acc

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
        dx, dy = self.kernel_x.feature_dim(xs.shape[1]), self.kernel_y.feature_dim(ys.shape[1])
        check_state_fits(
            dx,
            dy,
            self.accumulate_dtype.itemsize,
            self.device or xs.device,
            self.groups,
            (self.kernel_x, self.kernel_y),
        )
        self.kernel_x = self.kernel_x.fit(xs)
        self.kernel_y = self.kernel_y.fit(ys)
        return self

    def _init_state(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dtype = self.accumulate_dtype
        device = self.device or x.device
        # sizes first: fitting a kernel allocates its random frequencies, the sums come after
        dx, dy = self.kernel_x.feature_dim(x.shape[1]), self.kernel_y.feature_dim(y.shape[1])
        check_state_fits(dx, dy, dtype.itemsize, device, self.groups, (self.kernel_x, self.kernel_y))
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
        dx, dy = self.kernel_x.feature_dim(x.shape[1]), self.kernel_y.feature_dim(y.shape[1])  # fitted widths
        self.device = device
        check_state_fits(dx, dy, dtype.itemsize, device, self.groups, (self.kernel_x, self.kernel_y))
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
        wide = torch.float64 if torch.float64 in (x.dtype, y.dtype) else x.dtype
        self.input_dtype = wide if self.input_dtype in (None, wide) else torch.float64
        dtype = self.xx.dtype
        # features computed in the accumulation dtype: float64 sums of float32-rounded features would keep
        # float32's error (cosine normalisation, cos/sin of the random projections)
        px = self.kernel_x.features(x.to(dtype))  # [B, Dx]; as_matrix put x on self.device
        py = self.kernel_y.features(y.to(dtype))  # [B, Dy]
        return px, py

    @torch.no_grad()
    def update(self, x: Any, y: Any, index: Any = None) -> DiffCovariance:
        """Add a batch: ``x: [B, p]``, ``y: [B, q]`` (tensors or numpy arrays, same samples in the same order).

        ``index: [B]`` global sample indices (dataset row numbers), used only with ``groups``: they decide each
        sample's group; default the running count of this accumulator (``n, n+1, ...``), which is global only on
        a single process reading the data in order.

        Under torch.distributed (more than one rank) a batch that fails validation is not raised here: the
        error is kept and :meth:`compute` raises it on every rank together (no rank waits for one that failed).
        """
        if (
            self._pending_error is not None
        ):  # an earlier batch failed under torch.distributed: compute() raises
            return self
        try:
            px, py = self.features(x, y)
            if self.groups is not None:
                return self._update_groups(px, py, index)
        except SpecError as exc:
            if not distributed_ready():
                raise
            # under torch.distributed a bad batch on one rank (e.g. sigma="auto" fitted on a 1-row first batch)
            # must not leave the other ranks waiting in compute()'s collectives: it is raised there, on every rank
            self._pending_error = exc
            return self
        self.xx.addmm_(px.T, px)  # [Dx, B] @ [B, Dx] -> [Dx, Dx]
        self.xy.addmm_(px.T, py)  # [Dx, B] @ [B, Dy] -> [Dx, Dy]
        self.yy.addmm_(py.T, py)  # [Dy, B] @ [B, Dy] -> [Dy, Dy]
        self.sum_x.add_(px.sum(0))
        self.sum_y.add_(py.sum(0))
        self.count += px.shape[0]
        return self

    def _update_groups(self, px: torch.Tensor, py: torch.Tensor, index: Any) -> DiffCovariance:
        """Group-wise update: one sub-GEMM per group and block, the same FLOPs as the plain update."""
        from .uncertainty import assign_groups

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
        if self._group_sums is None:  # totals restored by load_state_dict from a state without group sums
            raise SpecError(
                "groups: this accumulator holds totals but no group sums (restored from a state without them); "
                "start a new DiffCovariance(groups=G) or resume from a state saved with its group sums"
            )
        gid = assign_groups(index, self.groups, self.group_seed).to(px.device)  # [B]
        self._stage_or_add(px, py, gid)
        self._stale = True  # the totals (blocks, feature sums) are the group sums' sum, formed by _settle()
        self.count += b
        return self

    def _stage_or_add(self, px: torch.Tensor, py: torch.Tensor, gid: torch.Tensor) -> None:
        """Add ``px: [B, Dx]``, ``py: [B, Dy]`` with groups ``gid: [B]`` to the group sums through the staging
        buffer: a group's GEMM with few rows runs far below the speed of a large one (``B / G = 64`` rows per
        group costs about 2x the plain update), so each group's rows are copied into its slot of ``k`` rows and
        added by one GEMM per block when the slot is full. A batch of at least ``G min(k, 256)`` rows
        (:data:`DIRECT_ROWS_PER_GROUP`) arriving while nothing is staged goes straight in: its group GEMMs
        already see enough rows."""
        from .uncertainty import accumulate_groups, rank_in_group

        f64, groups = torch.float64, self.groups
        if self._stage is None:
            self._slot = _stage_rows(groups, px.shape[1], py.shape[1]) // groups
            rows = groups * self._slot + 1  # G k slot rows and the discard row
            dev = self._group_sums["count"].device
            self._stage = (
                torch.empty(rows, px.shape[1], dtype=f64, device=dev),  # [G k + 1, Dx]
                torch.empty(rows, py.shape[1], dtype=f64, device=dev),  # [G k + 1, Dy]
            )
        (stage_x, stage_y), k = self._stage, self._slot
        if self._staged == 0 and px.shape[0] >= groups * min(k, DIRECT_ROWS_PER_GROUP):
            accumulate_groups(self._group_sums, px, py, gid)
            return
        # each row's position in its group's stream since the group's last flush: pos = fill + rank in batch
        sizes, _, rank = rank_in_group(gid, groups)  # [G], [B] rank of each row within its group
        fill = torch.tensor(self._fill, device=gid.device)  # [G]
        pos = fill[gid] + rank  # [B]
        lap, dest = pos // k, gid * k + pos % k  # [B] how many slot-fulls precede the row; its buffer row
        discard = stage_x.shape[0] - 1
        # the rows that fit now, in one copy; the others (a full slot's overflow) go to the discard row
        first_lap = torch.where(lap == 0, dest, discard)  # [B]
        stage_x.index_copy_(0, first_lap, px.to(f64))  # [B, Dx] -> staged rows
        stage_y.index_copy_(0, first_lap, py.to(f64))  # [B, Dy]
        total = [f + n for f, n in zip(self._fill, sizes.tolist())]  # rows of each group, staged + new
        for r in range(1, max(total) // k + 1):
            for g, t in enumerate(total):
                if t >= r * k:  # slot g holds k rows: add them
                    self._flush_group(g, k)
            later = (lap == r).nonzero().squeeze(1)  # [b_r] rows of the next slot-full
            if later.numel():
                stage_x.index_copy_(0, dest[later], px[later].to(f64))  # [b_r, Dx]
                stage_y.index_copy_(0, dest[later], py[later].to(f64))  # [b_r, Dy]
        self._fill = [t % k for t in total]

    def _flush_group(self, g: int, n: int) -> None:
        """Add the ``n`` rows staged in group ``g``'s slot to its sums (one GEMM per block)."""
        from .uncertainty import add_to_group

        (stage_x, stage_y), k = self._stage, self._slot
        add_to_group(
            self._group_sums, g, stage_x[g * k : g * k + n], stage_y[g * k : g * k + n]
        )  # [n, Dx], [n, Dy]
        self._group_sums["count"][g] += n
        self._flushes += 1

    def _flush(self) -> None:
        """Add every group's staged rows to the group sums (fewer than k rows per GEMM) and empty the buffer."""
        for g, fill in enumerate(self._fill):
            if fill:
                self._flush_group(g, fill)
                self._fill[g] = 0

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
            self.input_dtype = other.input_dtype
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
        if other.input_dtype != self.input_dtype:
            self.input_dtype = other.input_dtype if self.input_dtype is None else torch.float64
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
        """The sums, count, input dims and kernels (settings + fitted tensors), for checkpoints.

        Only tensors and plain values (``format``, ``count``, ``dims``, ``accumulate_dtype`` as a string, each
        kernel as :meth:`Kernel.state_dict`), so ``torch.load(path)`` with the default ``weights_only=True``
        reads a saved state. Before the first batch only the settings are saved (``count = 0``). With ``groups``
        the group-wise sums are saved too (``group_xx`` ... ``group_count``), with ``groups`` and ``group_seed``.
        """
        self._settle()
        out: dict[str, Any] = {
            "format": _FORMAT,
            "count": int(self.count),
            "dims": None if self.dims is None else list(self.dims),
            "accumulate_dtype": None if self.accumulate_dtype is None else str(self.accumulate_dtype),
            # the widest input dtype seen: it sets the zero cut-off (float32 input reports no noise modes)
            "input_dtype": None if self.input_dtype is None else str(self.input_dtype).removeprefix("torch."),
            "kernel_x": self.kernel_x.state_dict(),
            "kernel_y": self.kernel_y.state_dict(),
        }
        if self.xx is not None:
            out.update({key: getattr(self, key) for key in _STATE[:-1]})
        out.update(groups=self.groups, group_seed=self.group_seed)
        if self.group_state is not None:
            out.update({f"group_{key}": value for key, value in self.group_state.items()})
        return out

    def load_state_dict(self, state: dict[str, Any], adopt_kernels: bool = False) -> DiffCovariance:
        """Restore a :meth:`state_dict`.

        Args:
            state: a dict from :meth:`state_dict`.
            adopt_kernels: ``False`` (default): the saved kernels must match the kernels this accumulator was
                constructed with (an unfitted ``sigma="auto"`` matches its fitted value; the fitted values are
                taken from the state), otherwise :class:`SpecError`. ``True``: take the saved kernels whatever
                they are.
        """
        loaded = _check_state(state, self, adopt_kernels)  # every field checked; nothing assigned yet
        self.kernel_x, self.kernel_y = loaded["kernels"]
        self.dims, self.count, self.input_dtype = loaded["dims"], loaded["count"], loaded["input_dtype"]
        sums = loaded["sums"]
        if sums:
            for key, t in sums.items():
                setattr(self, key, t.detach().clone())
            self.device = self.xx.device
        else:
            self.xx = self.xy = self.yy = self.sum_x = self.sum_y = None  # type: ignore[assignment]
        # rows staged before the load are dropped with the sums they belonged to (the group_state setter)
        group_state = loaded["group_state"]
        self.group_state = (
            None if group_state is None else {k: t.detach().clone() for k, t in group_state.items()}
        )
        self._stale = False
        return self

    def synced(self) -> DiffCovariance:
        """A copy whose sums are all-reduced (summed) over the ranks of the default process group.

        Every rank must call it (it is a collective). The ranks first exchange their fitted kernels: a rank
        that saw no batch takes them from the others and adds zeros; kernels fitted differently on different
        ranks (e.g. ``sigma="auto"`` fitted on each rank's own first batch) raise :class:`SpecError` on every
        rank rather than summing incompatible features. The count is reduced as int64, exactly.
        """
        from .collectives import agree

        dist = torch.distributed
        agree(self._pending_error)  # a rank whose update failed: the same SpecError on every rank
        self._settle()
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
                    "spec_torch.collectives.fit_on_main)"
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
        center: bool = False,
        replicates: int | None = None,
        level: float = 0.9,
        seed: int = 0,
        interval: str | None = None,
        reference: bool = True,
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
            replicates: with ``groups``, R >= 2 bootstrap replicates over the groups give ``eigenvalue_ci``,
                ``spec_diff_ci``, ``heldout_eigenvalues`` and ``stability`` (see spec_torch.uncertainty);
                ``0``/``None`` skips them.
            level: level of the intervals (default 0.9). seed: seeds the resampling (deterministic).
            interval: ``"basic"`` (the default, :data:`spec_torch.uncertainty.DEFAULT_INTERVAL`: reflected about
                the estimate), ``"percentile"`` or ``"bc"`` (bias-corrected percentile); docs/uncertainty.md.
            reference: compute the permutation reference ``spec_diff_null`` (SPEC-diff with the pairing
                shuffled, docs/uncertainty.md): one more factorisation and eigenvalue solve of size <= D, with
                the ``top_k`` solver when ``top_k`` is given. False skips it (``spec_diff_null`` is None), e.g.
                for the many pairs of a matrix job.
        """
        eta = check_positive(eta, "eta", max_value=MAX_ETA)
        seed = check_seed(seed)
        if replicates and self.xx is not None:  # refused before the full-data solve, not after it
            from .uncertainty import check_replicates

            d = self.xx.shape[0] + self.yy.shape[0]
            k = min(self.n, d) if top_k is None else min(2 * int(top_k), d)  # an upper bound of the modes
            check_replicates(replicates, self.groups or 2, d, max(k, 1), self.device)
        sync = sync_dist if sync_dist is not None else distributed_ready()
        if self._pending_error is not None and not sync:
            raise self._pending_error
        if self.xx is None and not sync:
            raise SpecError("update: no samples were accumulated; call update(x, y) before compute()")
        self._settle()
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
        # the permutation reference (pairing shuffled), from the uncentred sums: one more solve of size <= D
        null = None
        if reference:
            null = shuffled_spec_diff(xx, yy, sx, sy, n, float(eta), center=center, noise=noise, top_k=top_k)
        if center:  # XX_c = XX - s_x s_x^T / n etc.: H K H on the features route (DESIGN.md, second round)
            xx = xx - torch.outer(sx, sx) / n
            xy = xy - torch.outer(sx, sy) / n
            yy = yy - torch.outer(sy, sy) / n
        scale = trace / n
        in_dtype = state.input_dtype or state.xx.dtype
        zero_rtol = max(torch.finfo(in_dtype).eps, noise / trace)
        info: dict = {}
        evals, u, solver = solve_features(
            xx, xy, yy, n, eta, top_k=top_k, noise=noise, zero_tol=zero_rtol * scale, info=info
        )
        error = feature_route_error(evals, u, info["c"], state.xx.dtype, info["dropped"])  # [K]
        dx = xx.shape[0]
        # <v_k, 1> / sqrt(n) = (s_x^T u_kX + sqrt(eta) s_y^T u_kY) / (n |lambda_k|)  (DESIGN.md, second round)
        proj_sum = sx @ u[:dx] + math.sqrt(eta) * (sy @ u[dx:])  # [K]
        shift = proj_sum / n if center else None  # the mean feature's projection, subtracted when scoring
        uniformity = (
            torch.zeros_like(evals) if center else proj_sum.abs() / (n * evals.abs().clamp_min(1e-300))
        )
        result = SpecResult.from_features(
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
            spec_diff_null=null,
            eigenvalue_error=error.cpu(),
        )
        if replicates:
            blocks = (xx, xy, yy)  # float64, centred like the solve
            state._attach_uncertainty(
                result, blocks, float(eta), top_k, replicates, level, seed, interval, center
            )
        return result

    def _attach_uncertainty(
        self, result: SpecResult, blocks, eta, top_k, replicates, level, seed, interval, center=False
    ) -> None:
        """Bootstrap / held-out / stability from the group sums into ``result`` (spec_torch.uncertainty).

        ``blocks``: the ``(XX, XY, YY)`` sums the full-data solve used (float64, centred with ``center``): the
        full-data C the replicates' modes are matched in."""
        from .solver import assemble_covariance
        from .uncertainty import estimate

        if self.group_state is None:
            raise SpecError(
                f"replicates: {replicates} replicates need group-wise sums; create DiffCovariance(..., groups=G)"
            )
        from .uncertainty import MIN_GROUPS

        if self.groups < MIN_GROUPS:  # G groups give at most binom(2G - 1, G) distinct resamples (3 at G = 2)
            raise SpecError(
                f"groups: replicates need at least {MIN_GROUPS} groups, got {self.groups} (with few groups a "
                "bootstrap has few distinct resamples and its intervals undercover: 49% at G = 2); create "
                f"DiffCovariance(..., groups={MIN_GROUPS}) or more"
            )
        c_full = assemble_covariance(*blocks, self.n, eta)
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
            center=center,
        )
        result.eigenvalue_ci = out["eigenvalue_ci"]
        result.spec_diff_ci = out["spec_diff_ci"]
        result.heldout_eigenvalues = out["heldout_eigenvalues"]
        result.heldout_eigenvalue_ci = out["heldout_eigenvalue_ci"]
        result.stability = out["stability"]
        result.tied_modes = out["tied_modes"]
        result.tied_mode_ci = out["tied_mode_ci"]
        result.support = out["support"]
        result._draws = out["draws"]  # the bootstrap draws (by rank, matched, SPEC-diff): bench/verdicts.py
        result.uncertainty = out["settings"]
