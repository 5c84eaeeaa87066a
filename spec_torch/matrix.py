"""Many embeddings at once: the SPEC matrix of N feature sets from one streaming pass.

Stack the feature maps of all N embeddings of the same samples side by side, ``Phi = [Phi_1, ..., Phi_N]``
(``[n, D]`` with ``D = sum_i D_i``), and accumulate the joint second-moment matrix ``G = Phi^T Phi``
(``[D, D]``, float64 sums, one GEMM per batch). Every pair's three blocks ``Phi_i^T Phi_i``,
``Phi_i^T Phi_j``, ``Phi_j^T Phi_j`` are sub-blocks of ``G`` (DESIGN.md, "Scalable route"), so all
``N (N - 1) / 2`` comparisons come from one pass over the data instead of one pass per pair.

- :class:`MatrixCovariance`: the streaming state (update / merge / synced / compute), all sums, so batches,
  shards and ``torch.distributed`` ranks merge by addition.
- :func:`spec_matrix`: the one-call entry point, with a memory fallback (pair blocks in groups).
- :class:`SpecMatrix`: ``spec_diff``, ``lead`` and linear ``cka`` ``[N, N]`` and :meth:`SpecMatrix.pair`.

Linear CKA convention (the library's, as :class:`spec_torch.report.metrics.LinearCKA`): on the raw rows
(not the kernel features, not unit-normalised), columns centred, the biased HSIC estimator
``HSIC(X, Y) = ||Xc^T Yc||_F^2 / (n - 1)^2`` so that ``CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.
It is computed from a second joint matrix of the raw rows (the same matrix when the kernel is linear).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ._validate import as_matrix, check_fits, check_positive, check_seed, memory_available
from .covariance import DiffCovariance, distributed_ready
from .errors import SpecError
from .kernels import Kernel, resolve_kernel
from .result import SpecResult

__all__ = ["MatrixCovariance", "SpecMatrix", "spec_matrix", "linear_cka_matrix"]

#: the float64 solve of one pair holds C, Z, S, eigenvectors and workspace: about 6 D_pair^2 float64 values
_SOLVE_COPIES = 6


def _resolve_kernels(kernel: Any, names: Sequence[str]) -> dict[str, Kernel]:
    if isinstance(kernel, Mapping) and not ("name" in kernel and isinstance(kernel.get("name"), str)):
        missing = [n for n in names if n not in kernel]
        if missing:
            raise SpecError(f"kernel: expected a kernel for every feature set, missing {missing}")
        out = {n: resolve_kernel(kernel[n], f"kernel[{n!r}]") for n in names}
    else:
        out = {n: resolve_kernel(kernel, "kernel") for n in names}
    for n, k in out.items():
        if not k.has_features:
            raise SpecError(
                f"kernel[{n!r}]: {k!r} has no finite feature map; give GaussianKernel(rff_dim=...) for the matrix"
            )
    return out


def _fit_first_batch(kernels: dict[str, Kernel], batch: Mapping[str, torch.Tensor]) -> dict[str, Kernel]:
    """Unfitted kernels fitted on a stream's first batch (all a stream offers before the sums start), with a
    warning when the fit reads the data's values (``sigma="auto"``): then the result depends on the batch
    size and the row order."""
    if any(not k.is_fitted and k.fit_uses_data for k in kernels.values()):
        warnings.warn(
            "spec_matrix: fitting the kernels (sigma='auto') on the first batch only; the result then depends "
            "on batch_size and row order. Pass one dict of all rows (fitted on a seeded uniform sample), or "
            "kernels fitted on a uniform sample (kernel.fit(sample)).",
            stacklevel=3,
        )
    return {k: v if v.is_fitted else v.fit(batch[k]) for k, v in kernels.items()}


def _fit_on_sample(
    kernels: dict[str, Kernel], full: Mapping[str, torch.Tensor], seed: int
) -> dict[str, Kernel]:
    """Unfitted kernels fitted on their sets' rows of one seeded uniform sample of all ``n`` rows, as
    :func:`spec_torch.spec` does (:data:`spec_torch.api.FIT_ROWS` rows, more for Nystrom landmarks)."""
    from .api import FIT_ROWS, _fit_rows  # api imports this module

    if all(k.is_fitted for k in kernels.values()):
        return kernels
    first = next(iter(full.values()))  # [n, d]
    size = max([FIT_ROWS] + [k.fit_rows for k in kernels.values()])
    rows = _fit_rows(first.shape[0], seed, first.device, size)
    return {k: v if v.is_fitted else v.fit(full[k][rows]) for k, v in kernels.items()}


def _check_batch(batch: Any, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise SpecError(
            f"features: expected a dict name -> [n, d] array per batch, got {type(batch).__name__}"
        )
    keys = list(batch)
    if names is not None and set(keys) != set(names):
        raise SpecError(f"features: every batch must hold the feature sets {list(names)}, got {keys}")
    if len(keys) < 2:
        raise SpecError(f"features: expected at least 2 feature sets to compare, got {len(keys)}")
    for k in keys:
        if not isinstance(k, str) or not k:
            raise SpecError(f"features: expected non-empty string names, got {k!r}")
    out = {k: as_matrix(batch[k], f"features[{k!r}]") for k in (names or keys)}
    rows = {k: v.shape[0] for k, v in out.items()}
    if len(set(rows.values())) != 1:
        raise SpecError(f"features: expected the same samples (rows) in every feature set, got rows {rows}")
    return out


class MatrixCovariance:
    """Joint second-moment matrix of N feature maps of the same samples, accumulated batch by batch.

    State (sums; merge and all-reduce by addition):

    - ``gram = sum_i phi(s_i) phi(s_i)^T`` ``[D, D]`` with ``phi = [phi_1, ..., phi_N]``, ``D = sum D_i``;
    - ``sums = sum_i phi(s_i)`` ``[D]``;
    - with ``cka=True`` and a non-linear kernel: ``raw_gram`` ``[P, P]`` and ``raw_sums`` ``[P]`` of the raw
      rows (``P = sum p_i``), for linear CKA; with linear kernels the raw rows are the features, no extra state;
    - the count ``n``.

    Args:
        kernel: one kernel for every set (``"cosine"``, ``"linear"``, a :class:`Kernel`) or a dict name -> kernel.
            Unfitted kernels are fitted on the first batch of their set.
        accumulate_dtype: dtype of the sums (default float64).
        cka: also accumulate what linear CKA needs.
        device: where the state lives; default the device of the first batch.

    Example:
        >>> import torch, spec_torch as st
        >>> g = torch.Generator().manual_seed(0)
        >>> a, c = torch.randn(300, 6, generator=g), torch.randn(300, 4, generator=g)
        >>> b = a @ torch.linalg.qr(torch.randn(6, 6, generator=g)).Q  # a rotated copy of a
        >>> acc = st.MatrixCovariance("cosine")
        >>> for rows in torch.arange(300).split(128):
        ...     _ = acc.update({"a": a[rows], "b": b[rows], "c": c[rows]})
        >>> m = acc.compute()
        >>> m.names, m.spec_diff.shape
        (['a', 'b', 'c'], torch.Size([3, 3]))
    """

    def __init__(
        self,
        kernel: Any = "cosine",
        accumulate_dtype: torch.dtype = torch.float64,
        cka: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.kernel_spec = kernel
        self.kernels: dict[str, Kernel] | None = None
        self.accumulate_dtype = accumulate_dtype
        self.cka = bool(cka)
        self.device = torch.device(device) if device is not None else None
        self.names: list[str] | None = None
        self.dims: dict[str, int] | None = None  # input dims p_i
        self.gram = self.sums = self.raw_gram = self.raw_sums = None  # type: ignore[assignment]
        self.count = 0

    # ------------------------------------------------------------------ layout
    @property
    def n(self) -> int:
        return int(self.count)

    @property
    def feature_dims(self) -> list[int]:
        """``D_i`` of each set, in ``names`` order."""
        return [self.kernels[k].feature_dim(self.dims[k]) for k in self.names]

    def _offsets(self, sizes: Sequence[int]) -> list[slice]:
        out, start = [], 0
        for d in sizes:
            out.append(slice(start, start + d))
            start += d
        return out

    @property
    def _raw_separate(self) -> bool:
        return self.cka and not all(k.name == "linear" for k in self.kernels.values())

    def state_bytes(self) -> int:
        """Bytes of the sums plus one pair's float64 solve: what :func:`check_fits` is asked about."""
        return _state_bytes(
            self.feature_dims, list(self.dims.values()), self._raw_separate, self.accumulate_dtype
        )

    def _init_state(self, batch: dict[str, torch.Tensor]) -> None:
        self.names = list(batch)
        if self.kernels is None:
            self.kernels = _resolve_kernels(self.kernel_spec, self.names)
        self.kernels = _fit_first_batch(self.kernels, batch)
        self.dims = {k: batch[k].shape[1] for k in self.names}
        self.device = self.device or next(iter(batch.values())).device
        d = sum(self.feature_dims)
        check_fits(
            self.state_bytes(), self.device, f"the joint matrix of D = {d} features ({d} x {d})", "features"
        )
        dt = self.accumulate_dtype
        self.gram = torch.zeros(d, d, dtype=dt, device=self.device)
        self.sums = torch.zeros(d, dtype=dt, device=self.device)
        if self._raw_separate:
            p = sum(self.dims.values())
            self.raw_gram = torch.zeros(p, p, dtype=dt, device=self.device)
            self.raw_sums = torch.zeros(p, dtype=dt, device=self.device)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, batch: Mapping[str, Any]) -> MatrixCovariance:
        """Add a batch: a dict name -> ``[B, p_i]`` (tensors or numpy arrays; the same B samples in every set)."""
        x = _check_batch(batch, self.names)
        x = {k: v.to(self.device) if self.device is not None else v for k, v in x.items()}
        if self.gram is None:
            self._init_state(x)
        for k in self.names:
            if x[k].shape[1] != self.dims[k]:
                raise SpecError(
                    f"features[{k!r}]: expected {self.dims[k]} columns as in the first batch, got {x[k].shape[1]}"
                )
            self.kernels[k].check_input(x[k], f"features[{k!r}]")
        dt = self.accumulate_dtype
        # features computed in the accumulation dtype (as DiffCovariance): float64 sums of float32-rounded
        # features would keep float32's error, above the pair's estimated eigenvalue error
        phi = torch.cat([self.kernels[k].features(x[k].to(dt)) for k in self.names], dim=1)  # [B, D]
        self.gram.addmm_(phi.T, phi)  # [D, B] @ [B, D] -> [D, D]: the one GEMM of the batch
        self.sums.add_(phi.sum(0))
        if self.raw_gram is not None:
            raw = torch.cat([x[k].to(dt) for k in self.names], dim=1)  # [B, P]
            self.raw_gram.addmm_(raw.T, raw)  # [P, B] @ [B, P] -> [P, P]
            self.raw_sums.add_(raw.sum(0))
        self.count += phi.shape[0]
        return self

    # -------------------------------------------------------------- merge/sync
    def _layout(self) -> tuple:
        return (self.names, self.dims, self.kernels, self.accumulate_dtype, self.raw_gram is not None)

    def merge(self, other: MatrixCovariance) -> MatrixCovariance:
        """Add another accumulator's sums (same names, kernels and input dims) into this one."""
        if not isinstance(other, MatrixCovariance):
            raise SpecError(f"other: expected a MatrixCovariance, got {type(other).__name__}")
        if other.gram is None:
            return self
        if self.gram is None:
            self._copy_layout(other)
            for key in ("gram", "sums", "raw_gram", "raw_sums"):
                t = getattr(other, key)
                setattr(self, key, None if t is None else t.clone())
            self.count = other.count
            return self
        if self._layout() != other._layout():
            raise SpecError(
                f"other: cannot merge accumulators with different feature sets, kernels or dims: "
                f"{self._layout()} vs {other._layout()}"
            )
        for key in ("gram", "sums", "raw_gram", "raw_sums"):
            if getattr(self, key) is not None:
                getattr(self, key).add_(getattr(other, key).to(getattr(self, key)))
        self.count += other.count
        return self

    def _copy_layout(self, other: MatrixCovariance) -> None:
        self.names, self.dims, self.kernels = list(other.names), dict(other.dims), dict(other.kernels)
        self.accumulate_dtype, self.cka, self.device = other.accumulate_dtype, other.cka, other.device

    def synced(self) -> MatrixCovariance:
        """A copy whose sums are all-reduced (summed) over the ranks of the default process group.

        A collective: every rank calls it. The ranks first exchange their layouts (names, input dims, fitted
        kernels); different layouts raise :class:`SpecError` on every rank. A rank that saw no batch adds zeros.
        """
        dist = torch.distributed
        mine = None if self.gram is None else self._layout()
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, mine)
        present = [(r, s) for r, s in enumerate(seen) if s is not None]
        if not present:
            raise SpecError("features: no rank accumulated any samples; call update(batch) before compute()")
        ref_rank, ref = present[0]
        for rank, lay in present[1:]:
            if lay != ref:
                raise SpecError(
                    f"features: rank {rank} has feature sets/kernels {lay}, rank {ref_rank} {ref}; fit the kernels "
                    "once and pass the same fitted kernels and feature sets to every rank"
                )
        if self.gram is None:  # no batch here: zeros of the right shapes
            names, dims, kernels, dtype, _ = ref
            dev = self.device or (
                torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            )
            self.kernels, self.accumulate_dtype, self.device = kernels, dtype, dev
            self._init_state({k: torch.zeros(1, dims[k], dtype=dtype, device=dev) for k in names})
        keys = [k for k in ("gram", "sums", "raw_gram", "raw_sums") if getattr(self, k) is not None]
        flat = torch.cat([getattr(self, k).reshape(-1) for k in keys])
        dist.all_reduce(flat)
        out = MatrixCovariance(self.kernel_spec, self.accumulate_dtype, self.cka, self.device)
        out._copy_layout(self)
        offset = 0
        for key in keys:
            t = getattr(self, key)
            setattr(out, key, flat[offset : offset + t.numel()].view_as(t).clone())
            offset += t.numel()
        count = torch.tensor([self.count], dtype=torch.int64, device=self.gram.device)
        dist.all_reduce(count)
        out.count = int(count)
        return out

    # ---------------------------------------------------------------- compute
    def pair(
        self,
        i: int,
        j: int,
        eta: float = 1.0,
        top_k: int | None = None,
        reference: bool = True,
        center: bool = False,
    ) -> SpecResult:
        """The full :class:`SpecResult` of ``(K_i - eta K_j) / n`` from the sums (no pass over the data): the
        pair's sub-blocks solved by :meth:`DiffCovariance.compute`, so each entry is what ``st.spec`` gives.
        ``reference=False`` skips the permutation reference ``spec_diff_null`` (one more solve). ``center``:
        both kernels centred, the pair's feature means subtracted from its blocks (as ``st.spec(center=True)``)."""
        sl = self._offsets(self.feature_dims)
        g, s = self.gram, self.sums
        a, b = self.names[i], self.names[j]
        acc = DiffCovariance.from_sums(
            self.kernels[a],
            self.kernels[b],
            g[sl[i], sl[i]],
            g[sl[i], sl[j]],
            g[sl[j], sl[j]],
            s[sl[i]],
            s[sl[j]],
            count=self.n,
            dims=(self.dims[a], self.dims[b]),
        )
        return acc.compute(eta=eta, top_k=top_k, sync_dist=False, reference=reference, center=center)

    def cka_matrix(self) -> torch.Tensor:
        """Linear CKA ``[N, N]`` from the raw-row sums (module docstring: the convention)."""
        if self.raw_gram is not None:
            g, s, sizes = self.raw_gram, self.raw_sums, [self.dims[k] for k in self.names]
        else:
            g, s, sizes = self.gram, self.sums, self.feature_dims
        return linear_cka_matrix(g.to(torch.float64), s.to(torch.float64), self.n, sizes, self.names)

    def compute(
        self,
        eta: float = 1.0,
        top_k: int | None = None,
        sync_dist: bool | None = None,
        center: bool = False,
    ) -> SpecMatrix:
        """Solve every pair: ``spec_diff``, ``lead``, their modes' ``uniformity`` (and ``cka``) ``[N, N]``.

        Args:
            eta: weight of the second kernel in ``(K_i - eta K_j) / n`` (> 0). At ``eta = 1`` one solve per
                unordered pair gives both directions; otherwise each ordered pair is solved.
            top_k: ``None``: full spectrum per pair (``min(n, D_i + D_j)`` eigenvalues); an integer: only the
                strongest ``top_k`` of each sign (block Krylov), enough for ``spec_diff`` and ``lead``.
            sync_dist: all-reduce the sums first; ``None``: when a process group with > 1 rank is initialised.
            center: centre both kernels of every pair (``H K H``): each pair's feature means are subtracted from
                its blocks of the joint sums (DESIGN.md, second round), which removes the uniform mode. Linear
                CKA is centred either way.
        """
        check_positive(eta, "eta")
        sync = sync_dist if sync_dist is not None else distributed_ready()
        if self.gram is None and not sync:
            raise SpecError("features: no samples were accumulated; call update(batch) before compute()")
        state = self.synced() if sync else self
        if state.n < 2:
            raise SpecError(f"features: expected at least 2 samples, got {state.n}")
        names = state.names
        nn = len(names)
        spec_diff = torch.zeros(nn, nn, dtype=torch.float64)
        lead = torch.zeros(nn, nn, dtype=torch.float64)
        uniformity = torch.zeros(nn, nn, dtype=torch.float64)
        lead_uniformity = torch.zeros(nn, nn, dtype=torch.float64)
        for i, j in _pairs(nn, eta):
            res = state.pair(i, j, eta=eta, top_k=top_k, reference=False, center=center)
            _fill(spec_diff, lead, i, j, res.eigenvalues, symmetric=eta == 1.0)
            _fill_uniformity(uniformity, lead_uniformity, i, j, res, symmetric=eta == 1.0)
        cka = state.cka_matrix() if state.cka else None
        return SpecMatrix(
            names=list(names),
            spec_diff=spec_diff,
            lead=lead,
            uniformity=uniformity,
            lead_uniformity=lead_uniformity,
            center=bool(center),
            cka=cka,
            n=state.n,
            eta=float(eta),
            kernels=dict(state.kernels),
            route="joint",
            passes=1,
            state=state,
        )


def _state_bytes(feature_dims: Sequence[int], raw_dims: Sequence[int], raw_separate: bool, dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    d = sum(feature_dims)
    p = sum(raw_dims) if raw_separate else 0
    pair = sum(sorted(feature_dims)[-2:])
    return (d * d + p * p) * item + _SOLVE_COPIES * pair * pair * 8


def _pairs(nn: int, eta: float) -> list[tuple[int, int]]:
    if eta == 1.0:
        return [(i, j) for i in range(nn) for j in range(i + 1, nn)]
    return [(i, j) for i in range(nn) for j in range(nn) if i != j]


def _fill(spec_diff, lead, i: int, j: int, evals: torch.Tensor, symmetric: bool) -> None:
    ev = evals.to(torch.float64).cpu()
    top = float(ev.abs().max()) if ev.numel() else 0.0
    spec_diff[i, j] = top
    lead[i, j] = max(float(ev.max()), 0.0) if ev.numel() else 0.0
    if symmetric:  # eta = 1: L_ji = -L_ij, same |spectrum|, lead of j over i = -smallest eigenvalue
        spec_diff[j, i] = top
        lead[j, i] = max(-float(ev.min()), 0.0) if ev.numel() else 0.0


def _fill_uniformity(uniformity, lead_uniformity, i: int, j: int, res: SpecResult, symmetric: bool) -> None:
    """The uniformity of the modes behind ``spec_diff[i, j]`` (the largest |eigenvalue|) and ``lead[i, j]`` (the
    largest positive one); 0 where the entry is 0. At ``eta = 1`` also ``[j, i]`` (``lead[j, i]``: the most
    negative eigenvalue of ``(K_i - K_j) / n``)."""
    ev = res.eigenvalues.to(torch.float64).cpu()
    u = res.uniformity.to(torch.float64).cpu()
    if not ev.numel():
        return
    top, hi, lo = int(ev.abs().argmax()), int(ev.argmax()), int(ev.argmin())
    uniformity[i, j] = u[top]
    lead_uniformity[i, j] = u[hi] if ev[hi] > 0 else 0.0
    if symmetric:
        uniformity[j, i] = u[top]
        lead_uniformity[j, i] = u[lo] if ev[lo] < 0 else 0.0


def linear_cka_matrix(
    gram: torch.Tensor, sums: torch.Tensor, n: int, sizes: Sequence[int], names: Sequence[str] | None = None
) -> torch.Tensor:
    """Linear CKA of every pair from joint raw sums: ``gram = X^T X [P, P]``, ``sums [P]``, blocks ``sizes``.

    Columns are centred (``Xc^T Xc = X^T X - s s^T / n``); ``CKA_ij = ||Xc_i^T Xc_j||_F^2 /
    (||Xc_i^T Xc_i||_F ||Xc_j^T Xc_j||_F)`` (biased HSIC; its ``1/(n-1)^2`` cancels). Diagonal 1.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
    c = gram - torch.outer(sums, sums) / n  # [P, P] centred cross products
    sl, start = [], 0
    for d in sizes:
        sl.append(slice(start, start + d))
        start += d
    nn = len(sizes)
    self_norm = []
    for i in range(nn):
        norm = float(torch.linalg.matrix_norm(c[sl[i], sl[i]]))
        raw = float(torch.linalg.matrix_norm(gram[sl[i], sl[i]]))
        if not norm > 1e-12 * max(raw, 1e-300):
            raise SpecError(
                f"features[{names[i]!r}]: linear CKA is undefined for a constant embedding (all rows equal)"
            )
        self_norm.append(norm)
    out = torch.eye(nn, dtype=torch.float64)
    for i in range(nn):
        for j in range(i + 1, nn):
            v = float(torch.linalg.matrix_norm(c[sl[i], sl[j]]) ** 2) / (self_norm[i] * self_norm[j])
            out[i, j] = out[j, i] = v
    return out


class SpecMatrix:
    """SPEC of every pair of N embeddings of the same samples.

    Attributes:
        names: the N feature sets, in order.
        spec_diff: ``[N, N]`` float64; entry ``[i, j]`` is SPEC-diff ``||(K_i - eta K_j) / n||_op``. Zero diagonal
            (by convention, also for ``eta != 1``); symmetric at ``eta = 1``.
        lead: ``[N, N]`` float64; entry ``[i, j]`` is the largest positive eigenvalue of ``(K_i - eta K_j) / n``
            (0 if none): the strongest cluster structure ``i`` holds and ``j`` lacks. Asymmetric; zero diagonal.
        uniformity: ``[N, N]`` float64; entry ``[i, j]`` is the uniformity ``|<v, 1>| / sqrt(n)`` of the mode behind
            ``spec_diff[i, j]`` (its largest |eigenvalue|). Above :data:`~spec_torch.result.UNIFORM_THRESHOLD`
            the entry is led by a uniform mode: the kernels' average levels differ, it is not a group of samples.
            All 0 with ``center=True`` (centring removes that direction).
        lead_uniformity: ``[N, N]`` float64; the same for the mode behind ``lead[i, j]`` (0 where lead is 0).
        center: whether every pair's kernels were centred (``H K H``).
        cka: ``[N, N]`` linear CKA on the raw rows (module docstring), or None with ``cka=False``.
        n, eta, kernels: the samples summed, the weight, the fitted kernels per name.
        route: ``"joint"`` (one ``[D, D]`` matrix, one pass) or ``"groups"`` (memory fallback: pair blocks of
            groups of sets, one pass per pair of groups); ``passes`` how many passes over the data ran.
    """

    def __init__(
        self,
        *,
        names: list[str],
        spec_diff: torch.Tensor,
        lead: torch.Tensor,
        cka: torch.Tensor | None,
        n: int,
        eta: float,
        kernels: dict[str, Kernel],
        route: str,
        passes: int,
        state: MatrixCovariance | None = None,
        uniformity: torch.Tensor | None = None,
        lead_uniformity: torch.Tensor | None = None,
        center: bool = False,
    ) -> None:
        self.names = names
        self.spec_diff = spec_diff
        self.lead = lead
        zeros = torch.zeros_like(spec_diff)
        self.uniformity = zeros if uniformity is None else uniformity
        self.lead_uniformity = zeros.clone() if lead_uniformity is None else lead_uniformity
        self.center = bool(center)
        self.cka = cka
        self.n = n
        self.eta = eta
        self.kernels = kernels
        self.route = route
        self.passes = passes
        self._state = state

    def index(self, key: int | str) -> int:
        """Position of a feature set given by name or index."""
        if isinstance(key, str):
            if key not in self.names:
                raise SpecError(f"key: no feature set named {key!r}; have {self.names}")
            return self.names.index(key)
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(self.names):
            raise SpecError(f"key: expected a name or an index in [0, {len(self.names)}), got {key!r}")
        return key

    def pair(self, i: int | str, j: int | str, top_k: int | None = None) -> SpecResult:
        """The full :class:`SpecResult` of ``(K_i - eta K_j) / n`` (modes, sample scores), from the joint sums.

        Score samples with ``res.sample_scores(x_i, x_j)`` or ``res.top_samples((x_i, x_j))``.
        Not available on the ``"groups"`` route (the joint sums were not all held): call ``st.spec`` there.
        """
        a, b = self.index(i), self.index(j)
        if a == b:
            raise SpecError(f"j: expected two different feature sets, got {self.names[a]!r} twice")
        if self._state is None:
            raise SpecError(
                "pair: this matrix was computed on the memory-saving 'groups' route, which does not keep the "
                f"joint sums; compare {self.names[a]!r} and {self.names[b]!r} with st.spec instead"
            )
        return self._state.pair(a, b, eta=self.eta, top_k=top_k, center=self.center)

    def most_different(self, k: int, skip_uniform: bool = False) -> list[tuple[int, int]]:
        """The ``k`` unordered pairs ``(i, j)``, ``i < j``, of largest ``max(spec_diff[i,j], spec_diff[j,i])``.

        ``skip_uniform``: rank by :meth:`cluster_diff` instead, so that no pair is ranked on a uniform mode
        (kernel levels, not a group); pairs with no such entry come last.
        """
        nn = len(self.names)
        sym = self.cluster_diff() if skip_uniform else torch.maximum(self.spec_diff, self.spec_diff.T)
        pairs = sorted(((float(sym[i, j]), i, j) for i in range(nn) for j in range(i + 1, nn)), reverse=True)
        return [(i, j) for _, i, j in pairs[:k]]

    def cluster_diff(self, threshold: float | None = None) -> torch.Tensor:
        """``[N, N]`` symmetric: the larger of ``lead[i, j]`` and ``lead[j, i]`` over the directions whose mode is
        not uniform (``lead_uniformity <= threshold``, default
        :data:`~spec_torch.result.UNIFORM_THRESHOLD`), 0 where both are uniform. With centred kernels or
        ``eta = 1`` and no uniform mode it equals ``spec_diff``."""
        from .result import UNIFORM_THRESHOLD

        t = UNIFORM_THRESHOLD if threshold is None else float(threshold)
        kept = torch.where(self.lead_uniformity > t, 0.0, self.lead)  # [N, N]
        return torch.maximum(kept, kept.T)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: names, the three matrices (nested lists), n and the settings."""
        return {
            "names": list(self.names),
            "spec_diff": self.spec_diff.tolist(),
            "lead": self.lead.tolist(),
            "uniformity": self.uniformity.tolist(),
            "lead_uniformity": self.lead_uniformity.tolist(),
            "cka": None if self.cka is None else self.cka.tolist(),
            "n": self.n,
            "settings": {
                "eta": self.eta,
                "center": self.center,
                "kernels": {k: v.describe() for k, v in self.kernels.items()},
                "route": self.route,
                "passes": self.passes,
                "cka": "linear CKA on raw rows, columns centred, biased HSIC",
            },
        }

    def __repr__(self) -> str:
        return (
            f"SpecMatrix(N={len(self.names)}, n={self.n}, eta={self.eta}, center={self.center}, "
            f"route={self.route!r})"
        )


# --------------------------------------------------------------------------------------- one-call entry
def _batches(features: Any, batch_size: int) -> Iterable[Mapping[str, Any]]:
    """One dict of full arrays -> row batches of it; an iterable of dicts as it is."""
    if isinstance(features, Mapping):
        full = _check_batch(features, None)
        n = next(iter(full.values())).shape[0]
        return [{k: v[s : s + batch_size] for k, v in full.items()} for s in range(0, n, batch_size)]
    if isinstance(features, (str, bytes)) or not isinstance(features, Iterable):
        raise SpecError(
            f"features: expected a dict name -> [n, d] array or an iterable of such dicts, got {type(features).__name__}"
        )
    return features


def _groups(dims: Sequence[int], max_dim: int) -> list[list[int]]:
    """Consecutive groups of sets whose feature dims sum to at most ``max_dim // 2`` (at least one set each)."""
    groups: list[list[int]] = [[]]
    width = 0
    for i, d in enumerate(dims):
        if groups[-1] and width + d > max_dim // 2:
            groups.append([])
            width = 0
        groups[-1].append(i)
        width += d
    return groups


def spec_matrix(
    features: Any,
    kernel: Any = "cosine",
    eta: float = 1.0,
    top_k: int | None = None,
    cka: bool = True,
    batch_size: int = 8192,
    accumulate_dtype: torch.dtype = torch.float64,
    max_dim: int | None = None,
    sync_dist: bool | None = None,
    seed: int = 0,
    center: bool = False,
) -> SpecMatrix:
    """SPEC-diff, lead and linear CKA of every pair of N embeddings of the same samples, in one pass.

    Args:
        features: a dict name -> ``[n, d_i]`` (tensors or numpy arrays; rows are the same samples in every set),
            or an iterable of such dicts (batches, in sample order) for streaming. A re-iterable one (a list, a
            DataLoader) is needed if the ``"groups"`` route runs.
        kernel: one kernel for every set, or a dict name -> kernel (``"cosine"``, ``"linear"``, a :class:`Kernel`;
            Gaussian needs ``rff_dim``).
        eta: weight of the second kernel in ``(K_i - eta K_j) / n``.
        top_k: ``None`` for each pair's full spectrum, or the number of strongest modes of each sign.
        cka: also compute linear CKA (raw rows; with a non-linear kernel this holds a second ``[P, P]`` matrix).
        batch_size: rows per batch when ``features`` is one dict.
        accumulate_dtype: dtype of the sums (float64 by default).
        max_dim: the largest joint feature dimension held at once. Default: the whole ``D = sum D_i`` when
            :func:`check_fits` says its matrix fits in memory. Otherwise (or when ``D > max_dim``) the
            ``"groups"`` route: the sets are split into consecutive groups of total dimension ``<= max_dim / 2``
            and each pair of groups gets its own pass accumulating only its joint block (``G (G - 1) / 2``
            passes for ``G`` groups), every pair solved the same way. Kernels are fitted in the first pass
            and reused.
        sync_dist: all-reduce the sums over ``torch.distributed`` ranks (each streaming its own shard);
            ``None``: when a process group with > 1 rank is initialised.
        seed: of the sample that data-dependent kernels (``sigma="auto"``) are fitted on when ``features`` is
            one dict: a seeded uniform sample of all rows (as :func:`spec_torch.spec`), so the result does not
            depend on ``batch_size`` or the row order. A stream offers only its first batch (with a warning);
            fit the kernels on a uniform sample yourself there (``kernel.fit(sample)``).
        center: centre both kernels of every pair (``H K H``, as ``st.spec(center=True)``): the feature means
            are subtracted from the joint sums, which removes the uniform mode (a difference of the kernels'
            average levels, not a group). Default False: the paper's SPEC; then ``uniformity`` says which
            entries a uniform mode leads.

    Returns:
        A :class:`SpecMatrix`.

    Example:
        >>> import torch, spec_torch as st
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(400, 8, generator=g, dtype=torch.float64)
        >>> q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64)).Q
        >>> m = st.spec_matrix({"a": a, "a_rotated": a @ q, "noise": torch.randn(400, 8, generator=g)})
        >>> round(float(m.spec_diff[0, 1]), 8), bool(m.spec_diff[0, 2] > 0.05)
        (0.0, True)
    """
    check_positive(eta, "eta")
    check_positive(batch_size, "batch_size", integer=True)
    seed = check_seed(seed)
    if max_dim is not None:
        check_positive(max_dim, "max_dim", integer=True)
    if isinstance(features, Mapping):  # all rows at hand: fit on a uniform sample of them, not on a batch
        features = _check_batch(features, None)
        kernel = _fit_on_sample(_resolve_kernels(kernel, list(features)), features, seed)
    batches = _batches(features, batch_size)
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise SpecError("features: the iterable yielded no batches") from None
    first = _check_batch(first, None)
    names = list(first)
    kernels = _fit_first_batch(_resolve_kernels(kernel, names), first)
    dims = [kernels[k].feature_dim(first[k].shape[1]) for k in names]
    raw_dims = [first[k].shape[1] for k in names]
    raw_separate = cka and not all(k.name == "linear" for k in kernels.values())
    device = next(iter(first.values())).device
    need = _state_bytes(dims, raw_dims, raw_separate, accumulate_dtype)
    if max_dim is None and need > memory_available(device):
        # what fits: D^2 sums (and as many raw) plus a pair's solve, with D the joint dimension held at once
        item = torch.empty((), dtype=accumulate_dtype).element_size()
        max_dim = int(math.sqrt(memory_available(device) / (2 * item + 8 * _SOLVE_COPIES)))
    if sync_dist or (sync_dist is None and distributed_ready()):
        # the ranks' sums are added up, so every rank must take the same route with the same groups: the
        # tightest rank's limit for all (each rank checks only its own free memory)
        from .collectives import all_gather_object

        limits = [m for m in all_gather_object(max_dim) if m is not None]
        max_dim = min(limits) if limits else None
    fits = max_dim is None or sum(dims) <= max_dim
    if fits:
        acc = MatrixCovariance(kernels, accumulate_dtype=accumulate_dtype, cka=cka)
        acc.update(first)
        for b in it:
            acc.update(b)
        return acc.compute(eta=eta, top_k=top_k, sync_dist=sync_dist, center=center)
    if iter(batches) is batches:
        raise SpecError(
            f"features: the joint matrix of D = {sum(dims)} features does not fit (max_dim = {max_dim}); the "
            "'groups' route needs several passes, so give a re-iterable (a list of batch dicts, a DataLoader), "
            "not a one-shot iterator"
        )
    return _spec_matrix_groups(
        batches, names, kernels, dims, max_dim, eta, top_k, cka, accumulate_dtype, sync_dist, center
    )


def _spec_matrix_groups(
    batches, names, kernels, dims, max_dim, eta, top_k, cka, dtype, sync_dist, center=False
) -> SpecMatrix:
    """The memory fallback of :func:`spec_matrix`: one pass per pair of groups, each holding only its block."""
    groups = _groups(dims, max_dim)
    nn = len(names)
    spec_diff = torch.zeros(nn, nn, dtype=torch.float64)
    lead = torch.zeros(nn, nn, dtype=torch.float64)
    uniformity = torch.zeros(nn, nn, dtype=torch.float64)
    lead_uniformity = torch.zeros(nn, nn, dtype=torch.float64)
    cka_out = torch.eye(nn, dtype=torch.float64) if cka else None
    done: set[tuple[int, int]] = set()
    passes, n = 0, 0
    for ga in range(len(groups)):
        for gb in range(ga + 1, len(groups)):
            members = groups[ga] + groups[gb]
            sub = [names[i] for i in members]
            acc = MatrixCovariance({k: kernels[k] for k in sub}, accumulate_dtype=dtype, cka=cka)
            for b in batches:
                b = _check_batch(b, names)
                acc.update({k: b[k] for k in sub})
            passes += 1
            part = acc.compute(eta=eta, top_k=top_k, sync_dist=sync_dist, center=center)
            n = part.n
            for a_local, a in enumerate(members):
                for b_local, b in enumerate(members):
                    if a == b or (a, b) in done:
                        continue
                    done.add((a, b))
                    spec_diff[a, b] = part.spec_diff[a_local, b_local]
                    lead[a, b] = part.lead[a_local, b_local]
                    uniformity[a, b] = part.uniformity[a_local, b_local]
                    lead_uniformity[a, b] = part.lead_uniformity[a_local, b_local]
                    if cka_out is not None:
                        cka_out[a, b] = part.cka[a_local, b_local]
    return SpecMatrix(
        names=list(names),
        spec_diff=spec_diff,
        lead=lead,
        uniformity=uniformity,
        lead_uniformity=lead_uniformity,
        center=bool(center),
        cka=cka_out,
        n=n,
        eta=float(eta),
        kernels=dict(kernels),
        route="groups",
        passes=passes,
        state=None,
    )
