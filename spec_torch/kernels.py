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

from ._validate import check_alloc, check_fits, check_positive, check_seed
from .errors import SpecError

__all__ = [
    "Kernel",
    "CosineKernel",
    "LinearKernel",
    "GaussianKernel",
    "resolve_kernel",
    "median_sigma",
    "rff_frequencies",
    "AUTO_RFF_DIM",
    "kernel_from_state",
]


class Kernel:
    """Base class. Subclasses set ``name`` and implement :meth:`features` (and :meth:`gram` if exact-only).

    Saved state (:meth:`state_dict` / :meth:`load_state_dict` / :func:`kernel_from_state`): the settings are
    :meth:`describe` (plain values), the fitted values are tensors. A kernel whose :meth:`fit` makes tensors
    (random frequencies, landmarks) overrides :meth:`_fitted_tensors` (name -> tensor), :meth:`_with_fitted`
    (a fitted copy from saved settings and tensors, checking their shapes), and, when an unfitted setting
    differs from its fitted value (``sigma="auto"``), :meth:`_accepts` and :meth:`_constructor_args`.
    """

    name: str = "kernel"
    #: True when the kernel has a finite feature map (the linear-in-n route can use it).
    has_features: bool = True

    def fit(self, x: torch.Tensor) -> Kernel:
        """Return a copy with every data-dependent setting resolved from the sample ``x: [N, p]``."""
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    @property
    def fit_uses_data(self) -> bool:
        """True when :meth:`fit` would choose settings from the data's values (not only its width)."""
        return False

    @property
    def fit_rows(self) -> int:
        """The fewest rows :meth:`fit` needs (0: any); the fitting sample is grown to it (Nystrom landmarks)."""
        return 0

    def feature_dim(self, p: int) -> int:
        """Feature dimension D for inputs of dimension ``p``."""
        return p

    def exact_dim(self, p: int) -> int:
        """Width of one kernel evaluation on the exact route (``p`` for an exact kernel, D for random features)."""
        return self.feature_dim(p)

    def for_route(self, route: str) -> Kernel:
        """This kernel as used on ``route`` (``"exact"`` or ``"features"``); only ``rff_dim="auto"`` changes."""
        return self

    def diag(self, a: torch.Tensor) -> torch.Tensor:
        """``k(a_i, a_i): [Na]`` for ``a: [Na, p]``."""
        return self.features(a).square().sum(1)  # [Na, D] -> [Na]

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

    # ------------------------------------------------------------ saved state
    def state_dict(self) -> dict[str, Any]:
        """Settings and fitted tensors, safe to save: ``{"settings": describe(), "tensors": {name: tensor}}``.

        Only plain values (str, int, float, bool, None) and tensors, so ``torch.load(path)`` (the default
        ``weights_only=True``) reads it back. Subclasses with fitted tensors override :meth:`_fitted_tensors`.
        """
        return {"settings": self.describe(), "tensors": self._fitted_tensors()}

    def load_state_dict(self, state: Any, name: str = "kernel") -> Kernel:
        """Return this kernel carrying the fitted values of ``state`` (from :meth:`state_dict`).

        The settings in ``state`` must be this kernel's: an unfitted setting (``sigma="auto"``) matches the
        value it was fitted to, anything else that differs raises :class:`SpecError` naming ``name``. To take
        the saved kernel whatever it is, use :func:`kernel_from_state` instead.
        """
        settings, tensors = _split_state(state, name)
        if settings.get("name") != self.name or not self._accepts(settings):
            raise SpecError(
                f"{name}: the saved kernel {settings} does not match the constructed {self!r}; construct the "
                "same kernel, or adopt the saved one (kernel_from_state / load_state_dict(adopt_kernels=True))"
            )
        return self._with_fitted(settings, tensors, name)

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors resolved by :meth:`fit` (none for a kernel without data-dependent settings)."""
        return {}

    def _accepts(self, settings: dict[str, Any]) -> bool:
        """True when ``settings`` (a saved ``describe()``) is this kernel, fitted or not."""
        return settings == self.describe()

    def _with_fitted(self, settings: dict[str, Any], tensors: dict[str, torch.Tensor], name: str) -> Kernel:
        """A copy of this kernel with the fitted values of a matching saved state."""
        if tensors:
            raise SpecError(f"{name}: unexpected tensors {sorted(tensors)} in a saved {self.name} kernel")
        return self

    @classmethod
    def _constructor_args(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments that construct the (unfitted) kernel a saved ``describe()`` came from."""
        return {k: v for k, v in settings.items() if k != "name"}

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
    """``k(a, b) = a^T b / (||a|| ||b||)``; rows are L2-normalised. Zero rows are refused.

    Each row is first divided by its largest |entry|, so neither huge rows (whose squared norm overflows) nor
    tiny non-zero rows (whose squared norm underflows) lose accuracy: only rows that are exactly zero are refused.
    """

    name = "cosine"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.abs().amax(dim=1, keepdim=True)  # [B, p], largest |entry| 1: the norm cannot overflow
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)  # [B, p]

    def diag(self, a: torch.Tensor) -> torch.Tensor:
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)

    def check_input(self, x: torch.Tensor, name: str) -> None:
        zeros = x.abs().amax(dim=1) == 0  # [N]
        zero = int(zeros.sum())
        if zero:
            first = int(torch.nonzero(zeros)[0, 0])
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
        gen = torch.Generator().manual_seed(check_seed(seed))
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
    check_fits(
        8 * p * m,
        torch.device("cpu"),
        f"rff_dim = {m} random frequencies of {p}-d inputs ([p, m] float64)",
        "rff_dim",
    )
    gen = torch.Generator().manual_seed(check_seed(seed))
    return torch.randn(p, m, generator=gen, dtype=torch.float64) / float(sigma)


#: random frequencies per side that ``GaussianKernel(rff_dim="auto")`` uses on the features route (D = 2000)
AUTO_RFF_DIM = 1000


class GaussianKernel(Kernel):
    """Gaussian (RBF) kernel ``exp(-||a - b||^2 / (2 sigma^2))``.

    Args:
        sigma: bandwidth > 0, or ``"auto"``: the median pairwise distance of the data the kernel is fitted
            on (:func:`median_sigma`, at most 2,000 rows). The chosen value is in ``describe()["sigma"]``.
        rff_dim: ``None`` for the exact kernel only (the n x n route); an integer m for random Fourier
            features with m frequencies (cos and sin, so 2m features) on both routes (so the route never changes
            the answer); ``"auto"``: the exact kernel when the exact route is chosen, :data:`AUTO_RFF_DIM`
            random frequencies when the features route is (:meth:`for_route`; the default of the Hydra kernel
            config). The class default stays ``None``.
        seed: seed of the :class:`torch.Generator` that draws the frequencies (on the CPU, in float64, then
            moved to the data's device), so results repeat exactly across runs and devices.

    Example:
        >>> import torch
        >>> k = GaussianKernel(sigma=1.0, rff_dim=4, seed=0).fit(torch.zeros(3, 2))
        >>> k.features(torch.zeros(3, 2)).shape
        torch.Size([3, 8])
    """

    name = "gaussian"

    def __init__(self, sigma: float | str = "auto", rff_dim: int | str | None = None, seed: int = 0) -> None:
        if sigma != "auto":
            sigma = check_positive(sigma, "sigma")
        if rff_dim is not None and rff_dim != "auto":
            rff_dim = check_positive(rff_dim, "rff_dim", integer=True)
        seed = check_seed(seed)
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
        return self.sigma != "auto" and (self.rff_dim in (None, "auto") or self._omega is not None)

    @property
    def fit_uses_data(self) -> bool:
        return self.sigma == "auto"

    def for_route(self, route: str) -> GaussianKernel:
        """``rff_dim="auto"`` resolved: exact (``None``) on the exact route, :data:`AUTO_RFF_DIM` on the features route."""
        if self.rff_dim != "auto":
            return self
        out = copy.copy(self)
        out._cache = {}
        out.rff_dim = AUTO_RFF_DIM if route == "features" else None
        return out

    def exact_dim(self, p: int) -> int:
        return p if self.rff_dim in (None, "auto") else 2 * self.rff_dim

    def fit(self, x: torch.Tensor) -> GaussianKernel:
        out = copy.copy(self)
        out._cache = {}
        if out.sigma == "auto":
            out.sigma = median_sigma(x, seed=self.seed)
        if out.rff_dim not in (None, "auto"):
            p = x.shape[1]
            if out._omega is None or out._omega.shape[0] != p:
                out._omega = rff_frequencies(
                    p, out.rff_dim, out.sigma, self.seed
                )  # w_j ~ N(0, sigma^-2 I): [p, m]
        return out

    def feature_dim(self, p: int) -> int:
        if self.rff_dim is None:
            raise SpecError(
                "kernel: GaussianKernel(rff_dim=None) is exact-only and has no feature map; give rff_dim"
            )
        return 2 * (AUTO_RFF_DIM if self.rff_dim == "auto" else self.rff_dim)

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
        if self.rff_dim in (None, "auto"):
            raise SpecError(
                f"kernel: GaussianKernel(rff_dim={self.rff_dim!r}) has no feature map yet; give rff_dim or "
                "resolve it with kernel.for_route('features')"
            )
        m, size = self.rff_dim, x.element_size()
        # the device copy of the frequencies, the projections, their cos and sin, and the [B, 2m] features
        check_alloc(
            (x.shape[1] * m + 5 * x.shape[0] * m) * size,
            x.device,
            f"rff_dim = {m} random features of {x.shape[0]} rows",
            "rff_dim",
        )
        proj = x @ self._frequencies(x)  # [B, p] @ [p, m] -> [B, m]
        scale = 1.0 / math.sqrt(self.rff_dim)
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=1).mul_(scale)  # [B, 2m]

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Random-feature gram, or the exact kernel in float64 from inputs centred on ``b``'s mean.

        Centring before the ``|a|^2 + |b|^2 - 2 a.b`` expansion removes the cancellation that an offset of the
        data (e.g. every coordinate near 1000) causes; squared distances are clamped at 0.
        """
        if self.rff_dim not in (None, "auto"):
            return super().gram(a, b)
        if self.sigma == "auto":
            raise SpecError("kernel: GaussianKernel(sigma='auto') must be fitted (kernel.fit(x)) first")
        same = a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
        a, b = a.double(), b.double()
        mu = b.mean(0, keepdim=True)  # [1, p]
        a, b = a - mu, b - mu
        d2 = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * (a @ b.T)  # [Na, Nb]
        if same:  # k(a, a) = 1 exactly, not 1 - rounding
            d2.fill_diagonal_(0)
        return torch.exp(d2.clamp_(min=0).mul_(-0.5 / float(self.sigma) ** 2))

    def diag(self, a: torch.Tensor) -> torch.Tensor:
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)  # cos^2 + sin^2 = 1 for RFF too

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sigma": self.sigma if self.sigma == "auto" else float(self.sigma),
            "sigma_auto": self.sigma_auto,
            "rff_dim": self.rff_dim,
            "seed": self.seed,
        }

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._omega is None else {"omega": self._omega}

    def _accepts(self, settings: dict[str, Any]) -> bool:
        mine = self.describe()
        same = all(settings.get(k) == mine[k] for k in ("rff_dim", "seed", "sigma_auto"))
        return same and (self.sigma_auto or settings.get("sigma") == mine["sigma"])

    def _with_fitted(
        self, settings: dict[str, Any], tensors: dict[str, torch.Tensor], name: str
    ) -> GaussianKernel:
        extra = sorted(set(tensors) - {"omega"})
        if extra:
            raise SpecError(f"{name}: unexpected tensors {extra} in a saved gaussian kernel")
        out = copy.copy(self)
        out._cache = {}
        sigma = settings.get("sigma")
        if sigma != "auto":
            check_positive(sigma, f"{name}.sigma")
            out.sigma = float(sigma)
        omega = tensors.get("omega")
        if omega is not None:
            if omega.dtype != torch.float64 or omega.ndim != 2 or omega.shape[1] != self.rff_dim:
                raise SpecError(
                    f"{name}: saved frequencies must be float64 [p, {self.rff_dim}], got {omega.dtype} "
                    f"{list(omega.shape)}"
                )
            if self._omega is not None and not torch.equal(self._omega, omega.cpu()):
                raise SpecError(f"{name}: the saved frequencies differ from the constructed kernel's")
            out._omega = omega.detach().to("cpu").clone()
        return out

    @classmethod
    def _constructor_args(cls, settings: dict[str, Any]) -> dict[str, Any]:
        args = {k: v for k, v in settings.items() if k not in ("name", "sigma_auto")}
        if settings.get("sigma_auto"):
            args["sigma"] = "auto"
        return args


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


def _split_state(state: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Check the shape of a saved kernel state and return its ``(settings, tensors)``."""
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise SpecError(
            f"{name}: expected a saved kernel state {{'settings': {{...}}, 'tensors': {{...}}}}, "
            f"got {type(state).__name__}"
        )
    tensors = state.get("tensors", {})
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise SpecError(f"{name}: 'tensors' of a saved kernel state must map names to tensors")
    return state["settings"], tensors


def kernel_from_state(state: Any, name: str = "kernel") -> Kernel:
    """Rebuild the kernel a :meth:`Kernel.state_dict` came from, fitted values included.

    Example:
        >>> import torch
        >>> k = GaussianKernel(rff_dim=4).fit(torch.randn(10, 3))
        >>> kernel_from_state(k.state_dict()) == k
        True
    """
    settings, _ = _split_state(state, name)
    kind = str(settings.get("name", "")).lower()
    if kind not in _BY_NAME:
        raise SpecError(
            f"{name}: unknown saved kernel {kind!r}; expected one of {sorted(set(_BY_NAME) - {'rbf'})}"
        )
    cls = _BY_NAME[kind]
    try:
        fresh = cls(**cls._constructor_args(settings))
    except (TypeError, SpecError) as exc:
        raise SpecError(f"{name}: bad settings in the saved {kind} kernel: {exc}") from None
    return fresh.load_state_dict(state, name)
