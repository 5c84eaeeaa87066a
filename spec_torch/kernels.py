"""Kernels with explicit feature maps: k(a, b) = <phi(a), phi(b)>.

- :class:`CosineKernel`: ``phi(a) = a / ||a||`` (exact, D = p).
- :class:`LinearKernel`: ``phi(a) = a`` (exact, D = p).
- :class:`GaussianKernel`: ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``; with ``rff_dim=m`` random Fourier
  features ``phi(a) = m^-1/2 [cos(w_j^T a), sin(w_j^T a)]_j`` (D = 2m), ``w_j ~ N(0, sigma^-2 I)`` drawn once
  from a seeded :class:`torch.Generator`, so one seed gives the same features run after run and on any device.

A kernel is a small configuration object. Data-dependent choices (``sigma="auto"``, the random frequencies,
which need the input dimension) are made by :meth:`Kernel.fit`, which returns a fitted copy; the copy is what
every batch of one comparison shares.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ._validate import check_positive
from .errors import SpecError

__all__ = [
    "Kernel",
    "CosineKernel",
    "LinearKernel",
    "GaussianKernel",
    "resolve_kernel",
    "median_sigma",
    "rff_frequencies",
]


class Kernel:
    """Base class. Subclasses set ``name`` and implement :meth:`features` (and :meth:`gram` if exact-only)."""

    name: str = "kernel"
    #: True when the kernel has a finite feature map (the linear-in-n route can use it).
    has_features: bool = True

    def fit(self, x: torch.Tensor) -> Kernel:
        """Return a copy with every data-dependent setting resolved from the sample ``x: [N, p]``."""
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    def feature_dim(self, p: int) -> int:
        """Feature dimension D for inputs of dimension ``p``."""
        return p

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, p] -> [B, D]``, in the dtype and on the device of ``x``."""
        raise NotImplementedError

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Kernel matrix ``[Na, p], [Nb, p] -> [Na, Nb]``."""
        return self.features(a) @ self.features(b).T  # [Na, D] @ [D, Nb] -> [Na, Nb]

    def check_input(self, x: torch.Tensor, name: str) -> None:
        """Raise :class:`SpecError` when ``x`` is not valid input for this kernel."""

    def describe(self) -> dict[str, Any]:
        """The resolved settings, JSON-serialisable."""
        return {"name": self.name}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.describe() == other.describe()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(repr(sorted(self.describe().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


class LinearKernel(Kernel):
    """``k(a, b) = a^T b``; the feature map is the identity."""

    name = "linear"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CosineKernel(Kernel):
    """``k(a, b) = a^T b / (||a|| ||b||)``; rows are L2-normalised. Zero rows are refused."""

    name = "cosine"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)  # [B, p]

    def check_input(self, x: torch.Tensor, name: str) -> None:
        norms = torch.linalg.vector_norm(x, dim=1)
        tiny = torch.finfo(x.dtype).tiny
        zero = int((norms <= tiny).sum())
        if zero:
            first = int(torch.nonzero(norms <= tiny)[0, 0])
            raise SpecError(
                f"{name}: the cosine kernel needs non-zero rows, got {zero} zero row(s) (first at row {first})"
            )


def median_sigma(x: torch.Tensor, max_samples: int = 2000, seed: int = 0) -> float:
    """Median heuristic: the median Euclidean distance between distinct rows of ``x: [N, p]``.

    At most ``max_samples`` rows are used (a seeded random subset), so the cost is bounded.
    """
    n = x.shape[0]
    if n < 2:
        raise SpecError(f"sigma='auto': needs at least 2 samples to pick a bandwidth, got {n}")
    if n > max_samples:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[:max_samples].to(x.device)
        x = x[idx]
    d = torch.cdist(x.double(), x.double())  # [m, m]
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1, device=d.device)
    med = float(torch.quantile(d[iu[0], iu[1]], 0.5))  # the midpoint median, as numpy.median
    if not med > 0:
        raise SpecError(
            "sigma='auto': the median pairwise distance is 0 (duplicated rows?); give sigma explicitly"
        )
    return med


def rff_frequencies(p: int, m: int, sigma: float, seed: int) -> torch.Tensor:
    """Random Fourier frequencies ``[p, m]``: columns ``w_j ~ N(0, sigma^-2 I)``, float64, on the CPU.

    Drawn from ``torch.Generator().manual_seed(seed)``, so the same ``(p, m, sigma, seed)`` gives the same
    frequencies in every run and on every device (they are moved to the data's device afterwards).
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, m, generator=gen, dtype=torch.float64) / float(sigma)


class GaussianKernel(Kernel):
    """Gaussian (RBF) kernel ``exp(-||a - b||^2 / (2 sigma^2))``.

    Args:
        sigma: bandwidth > 0, or ``"auto"``: the median pairwise distance of the data the kernel is fitted
            on (:func:`median_sigma`, at most 2,000 rows). The chosen value is in ``describe()["sigma"]``.
        rff_dim: ``None`` for the exact kernel only (the n x n route); an integer m for random Fourier
            features with m frequencies (cos and sin, so 2m features).
        seed: seed of the :class:`torch.Generator` that draws the frequencies (on the CPU, in float64, then
            moved to the data's device), so results repeat exactly across runs and devices.

    Example:
        >>> import torch
        >>> k = GaussianKernel(sigma=1.0, rff_dim=4, seed=0).fit(torch.zeros(3, 2))
        >>> k.features(torch.zeros(3, 2)).shape
        torch.Size([3, 8])
    """

    name = "gaussian"

    def __init__(self, sigma: float | str = "auto", rff_dim: int | None = None, seed: int = 0) -> None:
        if sigma != "auto":
            check_positive(sigma, "sigma")
        if rff_dim is not None:
            check_positive(rff_dim, "rff_dim", integer=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SpecError(f"seed: expected an integer, got {seed!r}")
        self.sigma = sigma
        self.rff_dim = rff_dim
        self.seed = seed
        self.sigma_auto = sigma == "auto"
        self._omega: torch.Tensor | None = None  # [p, m] float64 on CPU, the frequencies w_j as columns
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def has_features(self) -> bool:  # type: ignore[override]
        return self.rff_dim is not None

    @property
    def is_fitted(self) -> bool:
        return self.sigma != "auto" and (self.rff_dim is None or self._omega is not None)

    def fit(self, x: torch.Tensor) -> GaussianKernel:
        out = copy.copy(self)
        out._cache = {}
        if out.sigma == "auto":
            out.sigma = median_sigma(x, seed=self.seed)
        if out.rff_dim is not None:
            p = x.shape[1]
            if out._omega is None or out._omega.shape[0] != p:
                gen = torch.Generator().manual_seed(self.seed)
                # w_j ~ N(0, sigma^-2 I): [p, m]
                out._omega = torch.randn(p, out.rff_dim, generator=gen, dtype=torch.float64) / float(
                    out.sigma
                )
        return out

    def feature_dim(self, p: int) -> int:
        if self.rff_dim is None:
            raise SpecError(
                "kernel: GaussianKernel(rff_dim=None) is exact-only and has no feature map; give rff_dim"
            )
        return 2 * self.rff_dim

    def _frequencies(self, x: torch.Tensor) -> torch.Tensor:
        if self._omega is None:
            raise SpecError("kernel: GaussianKernel must be fitted (kernel.fit(x)) before computing features")
        if self._omega.shape[0] != x.shape[1]:
            raise SpecError(
                f"kernel: GaussianKernel was fitted on {self._omega.shape[0]}-d inputs, got {x.shape[1]}-d"
            )
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self._omega.to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.rff_dim is None:
            raise SpecError(
                "kernel: GaussianKernel(rff_dim=None) is exact-only and has no feature map; give rff_dim"
            )
        proj = x @ self._frequencies(x)  # [B, p] @ [p, m] -> [B, m]
        scale = 1.0 / math.sqrt(self.rff_dim)
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=1).mul_(scale)  # [B, 2m]

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.rff_dim is not None:
            return super().gram(a, b)
        if self.sigma == "auto":
            raise SpecError("kernel: GaussianKernel(sigma='auto') must be fitted (kernel.fit(x)) first")
        d2 = torch.cdist(a, b).square_()  # [Na, Nb]
        return torch.exp(d2.mul_(-0.5 / float(self.sigma) ** 2))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sigma": self.sigma if self.sigma == "auto" else float(self.sigma),
            "sigma_auto": self.sigma_auto,
            "rff_dim": self.rff_dim,
            "seed": self.seed,
        }


# spec_torch.nystrom adds "nystrom" (Nystrom imports this module, so it registers itself there)
_BY_NAME = {"cosine": CosineKernel, "linear": LinearKernel, "gaussian": GaussianKernel, "rbf": GaussianKernel}


def resolve_kernel(kernel: str | Kernel | dict[str, Any], name: str = "kernel") -> Kernel:
    """Turn ``"cosine"``, ``"linear"``, ``"gaussian"``, a dict ``{"name": ..., **kwargs}`` or a Kernel into a Kernel."""
    if isinstance(kernel, Kernel):
        return kernel
    if isinstance(kernel, str):
        key = kernel.lower()
        if key not in _BY_NAME:
            raise SpecError(
                f"{name}: unknown kernel {kernel!r}; expected one of {sorted(set(_BY_NAME) - {'rbf'})}"
            )
        return _BY_NAME[key]()
    if isinstance(kernel, dict):
        kwargs = dict(kernel)
        kind = str(kwargs.pop("name", "")).lower()
        if kind not in _BY_NAME:
            raise SpecError(
                f"{name}: unknown kernel {kind!r}; expected one of {sorted(set(_BY_NAME) - {'rbf'})}"
            )
        kwargs.pop("sigma_auto", None)
        try:
            return _BY_NAME[kind](**kwargs)
        except TypeError as exc:
            raise SpecError(f"{name}: bad settings for the {kind} kernel: {exc}") from None
    raise SpecError(
        f"{name}: expected a kernel name, a dict or a spec_torch Kernel, got {type(kernel).__name__}"
    )
