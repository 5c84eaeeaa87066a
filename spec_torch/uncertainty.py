"""Is this mode real? Intervals, held-out eigenvalues and stability from group-wise streamed sums.

Pure functions. Every sample goes to one of G groups by a seeded hash of its global index
(:func:`assign_groups`), so the assignment does not depend on batch size, row order or the number of ranks.
Each group keeps its own sums ``XX_g, XY_g, YY_g, n_g`` (:func:`accumulate_groups`); any weighted
combination ``sum_g w_g (XX_g, XY_g, YY_g) / sum_g w_g n_g`` is the covariance ``C`` of a resampled data set,
solved in feature space without a second pass over the data. From them (:func:`estimate`):

- **intervals**: a bootstrap over groups (``w_g`` = multinomial counts); every full-data mode is matched to the
  replicate mode of the same sign whose sample scores overlap it most (feature-space direction, not rank);
  percentile or bias-corrected percentile intervals of the matched eigenvalues and of SPEC-diff;
- **held-out eigenvalue**: modes fitted on a random half of the groups (A), matched to the full-data modes,
  evaluated on the other half (B) by the Rayleigh quotient ``u^T C_B J C_B u / u^T C_B u`` of
  ``L_B = A_B J A_B^T`` along the sample vector ``A_B u``; averaged over splits and both directions;
- **stability**: the fraction of bootstrap replicates whose matched mode overlaps the full-data mode by at least
  :data:`OVERLAP_CUTOFF` (overlap: ``|<v_k, v'_j>|`` of the unit sample-score vectors on the full data,
  computed as ``|u_k^T C u'_j| / sqrt(u_k^T C u_k u'_j^T C u'_j)``).

See docs/uncertainty.md for the assumptions and how to read the numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._validate import check_fits, check_seed
from .errors import SpecError
from .solver import select_modes, solve_features, sum_noise

__all__ = [
    "OVERLAP_CUTOFF",
    "STABLE_FRACTION",
    "HELDOUT_FRACTION",
    "assign_groups",
    "accumulate_groups",
    "estimate",
    "heldout_crossfit",
    "heldout_quotient",
    "mode_support",
    "plan_groups",
    "plan_replicates",
    "solves_needed",
]

#: two modes are "the same mode" when their unit sample-score vectors overlap by at least this
OVERLAP_CUTOFF = 0.9
#: a mode is stable when at least this fraction of bootstrap replicates reproduce it (overlap >= cut-off)
STABLE_FRACTION = 0.5
#: a mode is supported by held-out data when its held-out eigenvalue keeps at least this fraction of the
#: in-sample value, with the same sign
HELDOUT_FRACTION = 0.25
#: bytes of float64 D x D replicate matrices solved at once
_CHUNK_BYTES = 256 * 2**20
#: interval methods: percentile, bias-corrected percentile (Efron), basic (reflected about the point estimate)
INTERVALS = ("percentile", "bc", "basic")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on ``uint64`` (wrapping arithmetic): a well-mixed hash of each entry."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_groups(index: torch.Tensor, groups: int, seed: int = 0) -> torch.Tensor:
    """Group of each sample, ``[B]`` long in ``[0, groups)``, from a seeded hash of its global index ``[B]``.

    A pure function of ``(index, groups, seed)``: the same sample lands in the same group whatever the batch
    size, the row order, or the rank that reads it.
    """
    idx = index.detach().to("cpu", torch.int64).numpy().astype(np.uint64)
    salt = _splitmix64(np.array([seed], dtype=np.uint64) & _M64)
    h = _splitmix64(idx ^ salt)
    return torch.from_numpy((h % np.uint64(groups)).astype(np.int64)).to(index.device)


def rank_in_group(gid: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's place among the rows of its group, in batch order.

    Returns:
        ``sizes [G]`` rows per group, ``order [B]`` a stable sort of the rows by group (one group's rows
        contiguous), and ``rank [B]`` each row's position within its group (0, 1, ... in batch order).
    """
    sizes = torch.bincount(gid, minlength=groups)  # [G]
    order = torch.argsort(gid, stable=True)  # [B]
    first = torch.cumsum(sizes, 0) - sizes  # [G] first sorted row of each group
    rank = torch.empty_like(order)
    rank[order] = torch.arange(gid.shape[0], device=gid.device) - first[gid[order]]  # [B]
    return sizes, order, rank


def add_to_group(state: dict[str, torch.Tensor], g: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add rows ``a: [b, Dx]``, ``b: [b, Dy]`` (float64) to group ``g``'s sums, one GEMM per block; not its
    ``count``, which the caller adds."""
    state["xx"][g].addmm_(a.T, a)  # [Dx, b] @ [b, Dx] -> [Dx, Dx]
    state["xy"][g].addmm_(a.T, b)  # [Dx, b] @ [b, Dy] -> [Dx, Dy]
    state["yy"][g].addmm_(b.T, b)  # [Dy, b] @ [b, Dy] -> [Dy, Dy]
    state["sum_x"][g] += a.sum(0)  # [Dx]
    state["sum_y"][g] += b.sum(0)  # [Dy]


@torch.no_grad()
def accumulate_groups(
    state: dict[str, torch.Tensor],
    px: torch.Tensor,
    py: torch.Tensor,
    gid: torch.Tensor,
    batched: bool | None = None,
) -> None:
    """Add a batch to the group sums in place, the FLOPs of the plain update.

    Rows are sorted by group. On the CPU (default) one ``addmm`` per group and block: ``3 G`` products of
    ``b_g = B / G`` rows each, every group's rows copied into one small reused ``[b_max, D]`` buffer the
    products then read from cache (no sorted ``[B, D]`` copy). ``batched`` (default on CUDA, where ``3 G``
    small launches cost more) stacks them into a zero-padded ``[G, b_max, D]`` tensor (``b_max``: the largest
    group in the batch, a few percent above ``B / G`` for batches of thousands) and does one ``baddbmm`` per
    block.

    A group's product runs near the speed of one large GEMM only with hundreds of rows. Measured on an idle
    2-core CPU, float64, ``addmm`` of ``[D, k] @ [k, D]`` against one large GEMM (1 and 2 threads): 1.8-2.3x
    at k = 64, 1.3-1.5x at k = 128, 1.04-1.16x at k = 256, 1.0-1.12x from k = 512. Per update of G = 32 groups
    against the plain update: per group 2.0-2.2x at B = 2048 (64 rows per group), 1.13-1.43x at B = 8192,
    1.09x at D = 2000 + 2000; the padded batched variant 1.34-2.85x (slower on the CPU everywhere). So
    :class:`~spec_torch.DiffCovariance` stages each group's rows until it has k of them
    (``spec_torch.covariance._stage_rows``; k = 327-512 at these sizes) and calls this function only for
    batches of at least ``G min(k, 256)`` rows: a pass in batches of 1,024-8,192 rows then costs 1.01-1.33x the
    plain pass at D = 400 + 400 and 2,000 + 2,000, 1 and 2 threads (docs/uncertainty.md, "Cost").

    Args:
        state: ``xx [G, Dx, Dx]``, ``xy [G, Dx, Dy]``, ``yy [G, Dy, Dy]``, ``sum_x [G, Dx]``, ``sum_y [G, Dy]``,
            ``count [G]`` (float64), updated in place. The block totals are ``state[key].sum(0)``.
        px: ``[B, Dx]`` and ``py: [B, Dy]`` features; ``gid: [B]`` their groups.
    """
    f64 = torch.float64
    groups = state["count"].shape[0]
    px, py = px.to(f64), py.to(f64)
    sizes, order, rank = rank_in_group(gid, groups)
    state["count"] += sizes.to(f64)
    if batched is None:
        batched = px.is_cuda
    if not batched:
        sizes_list, start = sizes.tolist(), 0
        # one group's rows at a time, copied into a small reused buffer the GEMMs then read from cache
        a_buf = px.new_empty(max(sizes_list), px.shape[1])  # [b_max, Dx]
        b_buf = py.new_empty(max(sizes_list), py.shape[1])  # [b_max, Dy]
        for g, size in enumerate(sizes_list):
            rows = order[start : start + size]  # [b_g] group g's rows
            start += size
            if size:
                a = torch.index_select(px, 0, rows, out=a_buf[:size])  # [b_g, Dx]
                b = torch.index_select(py, 0, rows, out=b_buf[:size])  # [b_g, Dy]
                add_to_group(state, g, a, b)
        return
    state["sum_x"].index_add_(0, gid, px)  # [G, Dx]
    state["sum_y"].index_add_(0, gid, py)  # [G, Dy]
    b_max = int(sizes.max())
    stack_x = px.new_zeros(groups, b_max, px.shape[1])  # [G, b_max, Dx]
    stack_y = py.new_zeros(groups, b_max, py.shape[1])  # [G, b_max, Dy]
    stack_x[gid, rank] = px  # row i to its group's row rank[i]
    stack_y[gid, rank] = py
    state["xx"].baddbmm_(stack_x.mT, stack_x)  # [G, Dx, b] @ [G, b, Dx] -> [G, Dx, Dx]
    state["xy"].baddbmm_(stack_x.mT, stack_y)  # [G, Dx, b] @ [G, b, Dy] -> [G, Dx, Dy]
    state["yy"].baddbmm_(stack_y.mT, stack_y)  # [G, Dy, b] @ [G, b, Dy] -> [G, Dy, Dy]


# --------------------------------------------------------------------------- replicate covariances and solves
def _weighted_blocks(
    state: dict[str, torch.Tensor], weights: torch.Tensor, center: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums ``xx [R, Dx, Dx]``, ``xy``, ``yy`` and counts ``n [R]`` of the data sets ``sum_g w_rg (group g)``
    (``weights: [R, G]``, float64); with ``center`` each data set's own feature means are subtracted
    (``XX - s_x s_x^T / n`` ...: its kernels centred, as :meth:`DiffCovariance.compute` does)."""
    n = weights @ state["count"]  # [R]
    if bool((n <= 0).any()):
        raise SpecError(
            "groups: a resampled data set holds no samples; accumulate more samples or fewer groups"
        )
    xx = torch.einsum("rg,gij->rij", weights, state["xx"])  # [R, Dx, Dx]
    xy = torch.einsum("rg,gij->rij", weights, state["xy"])  # [R, Dx, Dy]
    yy = torch.einsum("rg,gij->rij", weights, state["yy"])  # [R, Dy, Dy]
    if center:
        sx = (weights @ state["sum_x"]) / n[:, None].sqrt()  # [R, Dx]: s_x / sqrt(n)
        sy = (weights @ state["sum_y"]) / n[:, None].sqrt()  # [R, Dy]
        xx = xx - sx[:, :, None] * sx[:, None, :]
        xy = xy - sx[:, :, None] * sy[:, None, :]
        yy = yy - sy[:, :, None] * sy[:, None, :]
    return xx, xy, yy, n


def _weighted_covariances(
    state: dict[str, torch.Tensor], weights: torch.Tensor, eta: float, center: bool = False
) -> torch.Tensor:
    """``C_r: [R, D, D]`` of the data sets ``sum_g w_rg (group g)``, ``weights: [R, G]`` (float64)."""
    xx, xy, yy, n = _weighted_blocks(state, weights, center)
    s = math.sqrt(eta)
    top = torch.cat([xx, xy * s], dim=2)  # [R, Dx, D]
    bottom = torch.cat([xy.mT * s, yy * eta], dim=2)  # [R, Dy, D]
    c = torch.cat([top, bottom], dim=1) / n[:, None, None]  # [R, D, D]
    return (c + c.mT) / 2


def _solve_batch(c: torch.Tensor, jv: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full solve of a batch ``c: [R, D, D]``: eigenvalues ``[R, K]`` (descending) and directions ``[R, D, K]``.

    As :func:`spec_torch.solver.solve_features`, batched: ``Z^T`` by a batched Cholesky where C is numerically
    positive definite, else from ``eigh(C)`` with rounding-level eigenvalues set to zero (their columns
    vanish); ``S = Z J Z^T``, ``u = J Z^T w``.
    """
    d = c.shape[-1]
    eps = torch.finfo(c.dtype).eps
    zt, info = torch.linalg.cholesky_ex(c)  # [R, D, D] lower: C = R R^T, Z^T = R
    pivots = torch.diagonal(zt, dim1=-2, dim2=-1).square()  # [R, D]
    scale = torch.diagonal(c, dim1=-2, dim2=-1).amax(-1, keepdim=True)  # [R, 1]
    bad = (info != 0) | (pivots <= d * eps * scale).any(-1)  # [R]: singular or nearly so
    if bool(bad.any()):
        g, e = torch.linalg.eigh(c[bad])  # [r, D], [r, D, D]
        tol = d * eps * g.abs().amax(-1, keepdim=True)
        root = torch.where(g > tol, g.clamp_min(0).sqrt(), torch.zeros_like(g))  # [r, D]
        zt = zt.clone()
        zt[bad] = e * root[:, None, :]
    jzt = jv[None, :, None] * zt  # [R, D, D]
    s = zt.mT @ jzt  # [R, D, D]
    lam, w = torch.linalg.eigh((s + s.mT) / 2)  # [R, D], [R, D, D]
    idx = torch.stack([select_modes(row, keep) for row in lam])  # [R, K]
    lam = lam.gather(1, idx)
    w = w.gather(2, idx[:, None, :].expand(-1, w.shape[1], -1))  # [R, D, K]
    return lam, jzt @ w  # [R, K], [R, D, K]


def _solve_all(
    state: dict[str, torch.Tensor],
    weights: torch.Tensor,
    eta: float,
    dx: int,
    keep: int,
    top_k: int | None,
    center: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Solve every resampled data set (rows of ``weights: [R, G]``): lists of ``[K_r]`` and ``[D, K_r]``."""
    d = state["xx"].shape[1] + state["yy"].shape[1]
    if bool(((weights @ state["count"]) <= 0).any()):
        raise SpecError(
            "groups: a resampled data set holds no samples; accumulate more samples or fewer groups"
        )
    evals: list[torch.Tensor] = []
    dirs: list[torch.Tensor] = []
    if top_k is not None and d >= 8 * (top_k + 8):  # the block Krylov solver is cheaper than two eigh
        for r in range(weights.shape[0]):
            xx, xy, yy, n = _weighted_blocks(state, weights[r : r + 1], center)  # replicate r's sums
            xx, xy, yy = xx[0], xy[0], yy[0]  # [Dx, Dx], [Dx, Dy], [Dy, Dy]
            trace = float(xx.diagonal().sum()) + eta * float(yy.diagonal().sum())
            lam, u, _ = solve_features(
                xx,
                xy,
                yy,
                float(n[0]),
                eta,
                top_k=top_k,
                noise=sum_noise(torch.float64, int(n[0]), trace),  # float64 group sums
            )
            evals.append(lam)
            dirs.append(u)
        return evals, dirs
    jv = torch.ones(d, dtype=torch.float64, device=weights.device)
    jv[dx:] = -1
    chunk = max(1, _CHUNK_BYTES // (4 * d * d * 8))
    keep = keep if top_k is None else min(keep, 2 * top_k)
    for start in range(0, weights.shape[0], chunk):
        c = _weighted_covariances(state, weights[start : start + chunk], eta, center)
        lam, u = _solve_batch(c, jv, keep)
        evals.extend(lam.unbind(0))
        dirs.extend(u.unbind(0))
    return evals, dirs


def _match(
    c_full: torch.Tensor, cu: torch.Tensor, norm_u: torch.Tensor, lam: torch.Tensor, evals, dirs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match each full-data mode to one mode of every replicate by sample-score overlap.

    Args:
        c_full: ``[D, D]`` full-data C; ``cu = C u: [D, K]``; ``norm_u = sqrt(u^T C u): [K]``; ``lam: [K]``.
        evals, dirs: per replicate ``[K_r]`` eigenvalues and ``[D, K_r]`` directions.

    Returns:
        ``(matched eigenvalues [R, K], overlaps [R, K], matched directions [R, D, K])``: for each full mode the
        replicate mode of the same sign with the largest ``|<v_k, v'_j>|`` (NaN when there is none).
    """
    r_n, k_n = len(evals), lam.numel()
    out_val = torch.full((r_n, k_n), float("nan"), dtype=torch.float64, device=lam.device)
    out_ov = torch.zeros(r_n, k_n, dtype=torch.float64, device=lam.device)
    out_dir = torch.zeros(r_n, c_full.shape[0], k_n, dtype=torch.float64, device=lam.device)
    for r, (lr, ur) in enumerate(zip(evals, dirs)):
        norm_r = (ur * (c_full @ ur)).sum(0).clamp_min(0).sqrt()  # [K_r]: ||A u'_j||
        ov = (cu.T @ ur).abs() / (norm_u[:, None] * norm_r[None, :]).clamp_min(1e-300)  # [K, K_r]
        same = torch.sign(lam)[:, None] == torch.sign(lr)[None, :]
        ov = torch.where(same & (norm_r[None, :] > 0), ov, torch.full_like(ov, -1.0))
        best = ov.argmax(1)  # [K]
        found = ov.gather(1, best[:, None]).squeeze(1) >= 0
        out_val[r] = torch.where(found, lr[best], torch.full_like(lam, float("nan")))
        out_ov[r] = ov.gather(1, best[:, None]).squeeze(1).clamp_min(0)
        out_dir[r] = ur[:, best]
    return out_val, out_ov, out_dir


def heldout_quotient(c_b: torch.Tensor, u: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    """Rayleigh quotient of ``L_B = A_B J A_B^T`` along ``A_B u``: ``u^T C_B J C_B u / u^T C_B u``.

    Args:
        c_b: ``[..., D, D]`` held-out covariance; u: ``[..., D, K]`` directions; jv: ``[D]`` diagonal of J.

    Returns:
        ``[..., K]``; 0 where ``A_B u = 0``.
    """
    return heldout_crossfit(c_b, c_b, c_b, u, jv)  # both parts the whole held-out set


def heldout_crossfit(
    c_1: torch.Tensor, c_2: torch.Tensor, c_b: torch.Tensor, u: torch.Tensor, jv: torch.Tensor
) -> torch.Tensor:
    """Held-out eigenvalue of directions ``u`` from two disjoint parts of the held-out data:
    ``u^T C_1 J C_2 u / u^T C_B u`` (``B`` = part 1 + part 2).

    :func:`heldout_quotient` on the held-out half squares that half's own sampling noise (``C_B J C_B``), so it
    overstates the population value ``u^T C J C u / u^T C u`` by about ``1 + D_eff / n_B`` (with ``D_eff`` the
    directions the noise spreads over): negligible when D is far below n, 2-5x when D is comparable to n.
    ``C_1`` and ``C_2`` are independent, so ``E[u^T C_1 J C_2 u] = u^T C J C u`` without that term; the
    denominator is linear in C, hence unbiased too.

    Args:
        c_1, c_2: ``[..., D, D]`` covariances of the two parts; c_b: ``[..., D, D]`` of their union;
        u: ``[..., D, K]`` directions; jv: ``[D]`` diagonal of J.

    Returns:
        ``[..., K]``; 0 where ``A_B u = 0``.
    """
    num = ((c_1 @ u) * (jv[:, None] * (c_2 @ u))).sum(-2)  # u^T C_1 J C_2 u
    den = (u * (c_b @ u)).sum(-2)  # u^T C_B u = ||A_B u||^2
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _split_groups(groups: int, splits: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random half/half splits of the groups, and each half cut in two parts for :func:`heldout_crossfit`.

    Returns:
        ``halves: [2S, G]`` 0/1 weights (rows ``2s`` and ``2s + 1`` are the two halves of split ``s``) and
        ``parts: [2S, 2, G]`` the two parts of each half.
    """
    halves = torch.zeros(2 * splits, groups, dtype=torch.float64)
    parts = torch.zeros(2 * splits, 2, groups, dtype=torch.float64)
    for s in range(splits):
        perm = torch.randperm(groups, generator=gen)
        for h, members in enumerate((perm[: groups // 2], perm[groups // 2 :])):
            halves[2 * s + h, members] = 1
            cut = members.numel() // 2
            parts[2 * s + h, 0, members[:cut]] = 1
            parts[2 * s + h, 1, members[cut:]] = 1
    return halves, parts


def _interval(reps: torch.Tensor, point: torch.Tensor, level: float, method: str) -> torch.Tensor:
    """``[K, 2]`` intervals from replicates ``[R, K]`` (NaNs ignored) around ``point: [K]``."""
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    out = torch.full((reps.shape[1], 2), float("nan"), dtype=torch.float64)
    for k in range(reps.shape[1]):
        col = reps[:, k]
        col = col[~torch.isnan(col)].cpu()
        if col.numel() < 2:
            continue
        qs = torch.tensor([lo_q, hi_q], dtype=torch.float64)
        if method == "bc":  # bias-corrected percentile (Efron): shift the quantiles by z0
            below = float((col < point[k]).double().mean() + 0.5 * (col == point[k]).double().mean())
            below = min(max(below, 1 / (col.numel() + 1)), col.numel() / (col.numel() + 1))
            z0 = torch.special.ndtri(torch.tensor(below, dtype=torch.float64))
            qs = torch.special.ndtr(2 * z0 + torch.special.ndtri(qs))
        if method == "basic":  # reflect the replicates about the point: removes the bootstrap's own bias
            out[k] = 2 * point[k] - torch.quantile(col, qs).flip(0)
        else:
            out[k] = torch.quantile(col, qs)
    return out


def replicate_bytes(replicates: int, groups: int, d: int, k: int) -> int:
    """Bytes :func:`estimate` holds for ``replicates`` R over G groups, D features and K modes: the draws and
    weights ``[R, G]`` (int64, float64), every replicate's directions ``[D, K]`` and their matched copies, the
    matched eigenvalues and overlaps ``[R, K]``, and one chunk of replicate covariances."""
    return replicates * (16 * groups + 16 * d * k + 32 * k) + _CHUNK_BYTES


def check_replicates(replicates: Any, groups: int, d: int, k: int, device: torch.device) -> int:
    """``replicates``: an integer >= 2 whose replicates' state (:func:`replicate_bytes`) fits on ``device``;
    asked before anything is drawn. Returns it."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 2:
        raise SpecError(f"replicates: expected an integer >= 2 (or 0/None to skip), got {replicates!r}")
    check_fits(
        replicate_bytes(replicates, groups, d, k),
        device,
        f"replicates = {replicates} bootstrap replicates of {k} modes over D = {d} features",
        "replicates",
    )
    return replicates


def estimate(
    state: dict[str, torch.Tensor],
    c_full: torch.Tensor,
    eigenvalues: torch.Tensor,
    u: torch.Tensor,
    *,
    eta: float,
    dx: int,
    zero_tol: float,
    replicates: int,
    level: float = 0.9,
    seed: int = 0,
    splits: int | None = None,
    top_k: int | None = None,
    interval: str = "percentile",
    center: bool = False,
) -> dict[str, Any]:
    """Bootstrap intervals, held-out eigenvalues and stability of the full-data modes, from group sums.

    Args:
        state: group sums (see :func:`accumulate_groups`), float64.
        c_full: ``[D, D]`` full-data C (float64); ``eigenvalues: [K]``, ``u: [D, K]`` the full-data solve.
        eta: weight of the y kernel; dx: number of x features; zero_tol: |eigenvalue| below which a mode is zero.
        replicates: bootstrap replicates R (>= 2). level: interval level in (0, 1).
        seed: seeds the resampling and the splits (the result is a function of the sums and the seed).
        splits: random half/half splits of the groups for the held-out eigenvalue (default ``min(R, 10)``):
            fitted on one half, evaluated on the other by :func:`heldout_crossfit` (that half cut in two parts;
            :func:`heldout_quotient` where it cannot be, with fewer than 4 groups).
        top_k: solve replicates for the ``top_k`` modes of each sign (block Krylov where cheaper).
        interval: ``"percentile"`` or ``"bc"`` (bias-corrected percentile).
        center: each resampled (and held-out) data set centred on its own feature means, as the full-data
            solve with ``center=True`` (``c_full``, ``eigenvalues`` and ``u`` must then be the centred ones).

    Returns:
        ``eigenvalue_ci [K, 2]``, ``spec_diff_ci (lo, hi)``, ``heldout_eigenvalues [K]``, ``stability [K]``,
        and the settings used (``replicates, level, groups, splits, interval, seed, overlap_cutoff, heldout``,
        the last ``"crossfit"`` or ``"quotient"``). Zero modes get NaN.
    """
    groups = state["count"].shape[0]
    check_replicates(replicates, groups, c_full.shape[0], eigenvalues.numel(), c_full.device)
    seed = check_seed(seed)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise SpecError(f"level: expected a number in (0, 1), got {level!r}")
    if interval not in INTERVALS:
        raise SpecError(f"interval: expected one of {INTERVALS}, got {interval!r}")
    if int((state["count"] > 0).sum()) < 2:
        raise SpecError("groups: fewer than 2 groups hold samples; accumulate more samples")
    f64 = torch.float64
    lam = eigenvalues.to(f64)
    u = u.to(f64)
    keep = lam.numel()
    gen = torch.Generator().manual_seed(int(seed))
    live = (lam.abs() > zero_tol).to(lam.device)  # [K]
    cu = c_full @ u  # [D, K]
    norm_u = (u * cu).sum(0).clamp_min(0).sqrt()  # [K] = |lambda_k|

    # bootstrap over groups: multinomial counts of G draws with replacement
    draws = torch.randint(groups, (replicates, groups), generator=gen)  # [R, G]
    weights = torch.zeros(replicates, groups, dtype=f64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=f64)
    )
    weights = weights.to(c_full.device)
    evals, dirs = _solve_all(state, weights, eta, dx, keep, top_k, center)
    matched, overlap, _ = _match(c_full, cu, norm_u, lam, evals, dirs)  # [R, K] each
    ci = _interval(matched, lam.cpu(), level, interval)
    ci[~live.cpu()] = float("nan")
    diffs = torch.stack([e.abs().max() for e in evals]).cpu()[:, None]  # [R, 1]
    spec_diff = lam.abs().max().reshape(1).cpu()
    diff_ci = _interval(diffs, spec_diff, level, interval)[0]
    stability = (overlap >= OVERLAP_CUTOFF).to(f64).mean(0).cpu()  # [K]
    stability[~live.cpu()] = float("nan")

    # held-out: fit on half the groups, evaluate on the other half (both ways), cross-fitted (heldout_crossfit)
    splits = min(replicates, 10) if splits is None else splits
    halves, quarters = _split_groups(groups, splits, gen)  # [2S, G], [2S, 2, G]
    halves, quarters = halves.to(c_full.device), quarters.to(c_full.device)
    fit_vals, fit_dirs = _solve_all(state, halves, eta, dx, keep, top_k, center)
    _, _, fitted = _match(c_full, cu, norm_u, lam, fit_vals, fit_dirs)  # [2S, D, K]
    other = torch.arange(2 * splits, device=c_full.device) ^ 1  # evaluate half 2s on 2s+1 and back
    c_eval = _weighted_covariances(state, halves, eta, center)[other]  # [2S, D, D]
    jv = torch.ones(c_full.shape[0], dtype=f64, device=c_full.device)
    jv[dx:] = -1
    quarter_n = quarters[other] @ state["count"]  # [2S, 2] samples in each part of the evaluated half
    crossfit = bool((quarter_n > 0).all())
    if crossfit:
        c_q = _weighted_covariances(state, quarters[other].reshape(-1, groups), eta, center)  # [4S, D, D]
        c_q = c_q.reshape(2 * splits, 2, *c_q.shape[1:])  # [2S, 2, D, D]
        heldout = heldout_crossfit(c_q[:, 0], c_q[:, 1], c_eval, fitted, jv)
    else:  # an evaluated half cannot be split in two non-empty parts (G < 4, or empty groups)
        heldout = heldout_quotient(c_eval, fitted, jv)
    heldout = heldout.mean(0).cpu()  # [2S, K] -> [K]
    heldout[~live.cpu()] = float("nan")
    return {
        "eigenvalue_ci": ci,
        "spec_diff_ci": (float(diff_ci[0]), float(diff_ci[1])),
        "heldout_eigenvalues": heldout,
        "stability": stability,
        "settings": {
            "replicates": replicates,
            "level": float(level),
            "groups": groups,
            "splits": splits,
            "interval": interval,
            "seed": int(seed),
            "overlap_cutoff": OVERLAP_CUTOFF,
            "heldout": "crossfit" if crossfit else "quotient",
        },
    }


def mode_support(eigenvalue: float, heldout: float, stability: float) -> str:
    """Plain-words verdict on one mode, from its held-out eigenvalue and stability.

    - ``"not supported by the data"``: the held-out eigenvalue keeps less than :data:`HELDOUT_FRACTION` of the
      in-sample value, or changes sign: the direction's strength does not carry over to unseen samples;
    - ``"not a distinct cluster"``: the strength carries over but fewer than :data:`STABLE_FRACTION` of the
      bootstrap replicates reproduce the mode (overlap >= :data:`OVERLAP_CUTOFF`): it is one direction of a
      (nearly) degenerate eigenspace, real as a subspace but not as an individual cluster;
    - ``"supported"`` otherwise; ``"unknown"`` when the values are missing (no replicates, a zero mode).
    """
    vals = (eigenvalue, heldout, stability)
    if any(v is None or v != v for v in vals):
        return "unknown"
    if eigenvalue * heldout <= 0 or abs(heldout) < HELDOUT_FRACTION * abs(eigenvalue):
        return "not supported by the data"
    if stability < STABLE_FRACTION:
        return "not a distinct cluster"
    return "supported"


# ------------------------------------------------------------------------- automatic settings under a cap
#: the automatic choice (compare job): at most this many replicates, and off below the minimum
MAX_REPLICATES = 200
MIN_REPLICATES = 20
#: groups by default, and the fewest that still give a usable bootstrap
DEFAULT_GROUPS = 32
MIN_GROUPS = 8


def solves_needed(replicates: int, splits: int | None = None) -> int:
    """Eigen-solves of :func:`estimate`: R bootstrap replicates plus 2 per held-out split."""
    splits = min(replicates, 10) if splits is None else splits
    return replicates + 2 * splits


def plan_replicates(budget_s: float, solve_s: float) -> int:
    """The most replicates (<= :data:`MAX_REPLICATES`) whose solves fit in ``budget_s`` seconds, given one
    solve takes ``solve_s`` (counted 1.5x for matching the modes); 0 when fewer than :data:`MIN_REPLICATES` fit.
    """
    per = 1.5 * max(float(solve_s), 1e-6)
    best = 0
    for r in range(MIN_REPLICATES, MAX_REPLICATES + 1):
        if solves_needed(r) * per > budget_s:
            break
        best = r
    return best


def plan_groups(n: int, dx: int, dy: int, available_bytes: int, wanted: int | None = None) -> int:
    """Groups to keep: ``wanted`` (default :data:`DEFAULT_GROUPS`), fewer when the group sums
    (``G (Dx^2 + Dx Dy + Dy^2)`` float64) would take more than a quarter of ``available_bytes`` or a group would
    hold fewer than 4 samples on average; 0 when fewer than :data:`MIN_GROUPS` remain."""
    g = DEFAULT_GROUPS if wanted is None else int(wanted)
    per_group = (dx * dx + dx * dy + dy * dy) * 8
    g = min(g, available_bytes // (4 * per_group), n // 4)
    return int(g) if g >= MIN_GROUPS else 0
