"""Is this mode real? Intervals, held-out eigenvalues and stability from group-wise streamed sums.

Pure functions. Every sample goes to one of G groups by a seeded hash of its global index
(:func:`assign_groups`), so the assignment does not depend on batch size, row order or the number of ranks.
Each group keeps its own sums ``XX_g, XY_g, YY_g, n_g`` (:func:`accumulate_groups`); any weighted
combination ``sum_g w_g (XX_g, XY_g, YY_g) / sum_g w_g n_g`` is the covariance ``C`` of a resampled data set,
solved in feature space without a second pass over the data. From them (:func:`estimate`):

- **intervals**: a bootstrap over groups (``w_g`` = multinomial counts); every full-data mode is matched to the
  replicate mode of the same sign whose sample scores overlap it most (feature-space direction, not rank);
  basic (default), percentile or bias-corrected percentile intervals of the matched eigenvalues and of
  SPEC-diff (widened to the strongest tied set's mean when that mode is tied);
- **tied sets**: adjacent modes of the same sign whose gap is below :data:`TIE_Z` bootstrap standard errors of
  the gap (replicate eigenvalues taken by rank within sign) form one set (:func:`tie_sets`); each set gets an
  interval of its eigenvalue sum and a stability of its span (principal angles);
- **held-out eigenvalue**: modes fitted on a random half of the groups (A), the mode of the same sign and rank
  there (nothing of the evaluation half chooses it), evaluated on the other half (B) by the cross-fitted
  Rayleigh quotient (:func:`heldout_crossfit`); averaged over splits and both directions; its interval from a
  delete-one-group jackknife with the fitted directions held fixed;
- **stability**: the fraction of bootstrap replicates whose matched mode overlaps the full-data mode by at least
  :data:`OVERLAP_CUTOFF` (overlap: ``|<v_k, v'_j>|`` of the unit sample-score vectors on the full data,
  computed as ``|u_k^T C u'_j| / sqrt(u_k^T C u_k u'_j^T C u'_j)``); for a tied set, of its span;
- **verdicts**: :func:`mode_support` on each mode, one of :data:`VERDICTS` (``SpecResult.support``).

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
    "TIE_Z",
    "VERDICTS",
    "INTERVALS",
    "DEFAULT_INTERVAL",
    "assign_groups",
    "accumulate_groups",
    "estimate",
    "heldout_crossfit",
    "heldout_quotient",
    "mode_support",
    "compare_cost",
    "group_bytes",
    "plan_groups",
    "plan_replicates",
    "replicate_solve_cost",
    "solves_needed",
    "tie_sets",
]

#: two modes are "the same mode" when their unit sample-score vectors overlap by at least this
OVERLAP_CUTOFF = 0.9
#: a mode is stable when at least this fraction of bootstrap replicates reproduce it (overlap >= cut-off)
STABLE_FRACTION = 0.5
#: adjacent modes of the same sign are tied when their gap is below this many bootstrap standard errors of
#: the gap (tie_sets; merge / split rates measured in docs/uncertainty.md, "Ties")
TIE_Z = 2.5
#: the verdicts of mode_support, in the order its rules are tried (after "unknown")
VERDICTS = ("supported", "tied", "not a distinct cluster", "not supported by the data", "unknown")
#: bytes of float64 D x D replicate matrices solved at once
_CHUNK_BYTES = 256 * 2**20
#: interval methods: percentile, bias-corrected percentile (Efron), basic (reflected about the point estimate)
INTERVALS = ("percentile", "bc", "basic")
#: the default interval (measured on tie, near-tie and isolated populations: docs/uncertainty.md, "Coverage")
DEFAULT_INTERVAL = "basic"

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
    c_full: torch.Tensor,
    cu: torch.Tensor,
    norm_u: torch.Tensor,
    lam: torch.Tensor,
    evals,
    dirs,
    zero_tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match each full-data mode to one mode of every replicate by sample-score overlap.

    Args:
        c_full: ``[D, D]`` full-data C; ``cu = C u: [D, K]``; ``norm_u = sqrt(u^T C u): [K]``; ``lam: [K]``.
        evals, dirs: per replicate ``[K_r]`` eigenvalues and ``[D, K_r]`` directions.
        zero_tol: replicate modes with ``|eigenvalue| <= zero_tol`` are numerical zeros (their directions are
            arbitrary within the null space) and are never matched.

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
        live = (lr.abs() > zero_tol) & (norm_r > 0)  # [K_r]
        ov = torch.where(same & live[None, :], ov, torch.full_like(ov, -1.0))
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


def _by_rank(lam: torch.Tensor, evals, zero_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each full-data mode's counterpart of the same sign and the same rank within that sign, in every solve.

    Rank within sign: positive modes counted from the largest, negative ones from the most negative
    (``lam`` is descending: positive mode ``k`` has rank ``k``; of ``N`` negative modes the last has rank 0).

    Args:
        lam: ``[K]`` full-data eigenvalues (descending); evals: per solve ``[K_r]`` eigenvalues.
        zero_tol: |eigenvalue| at or below which a mode is zero (it has no rank).

    Returns:
        ``(values [R, K], index [R, K])``: the counterpart's eigenvalue (NaN where the solve has no mode of that
        sign and rank, or the full-data mode is zero) and its column in the solve (-1 there).
    """
    lam_c = lam.detach().cpu().double()
    k_n = lam_c.numel()
    pos, neg = lam_c > zero_tol, lam_c < -zero_tol
    rank = torch.full((k_n,), -1, dtype=torch.long)
    rank[pos] = torch.arange(int(pos.sum()))
    rank[neg] = torch.arange(int(neg.sum()) - 1, -1, -1)
    values = torch.full((len(evals), k_n), float("nan"), dtype=torch.float64)
    index = torch.full((len(evals), k_n), -1, dtype=torch.long)
    for r, lr in enumerate(evals):
        lr = lr.detach().cpu().double()
        order = torch.argsort(lr, descending=True)
        by_sign = (order[lr[order] > zero_tol], order.flip(0)[lr[order.flip(0)] < -zero_tol])
        for mask, idx in zip((pos, neg), by_sign):
            ks = torch.nonzero(mask & (rank < idx.numel())).squeeze(1)
            index[r, ks] = idx[rank[ks]]
            values[r, ks] = lr[idx[rank[ks]]]
    return values, index


def tie_sets(
    lam: torch.Tensor, reps: torch.Tensor, live: torch.Tensor, z: float | None = None
) -> list[list[int]]:
    """Tied sets of modes: adjacent modes of the same sign are tied when their gap is below ``z`` times the
    bootstrap standard error of that gap (replicate eigenvalues taken by rank within sign); ties chain.

    Args:
        lam: ``[K]`` eigenvalues (descending); reps: ``[R, K]`` replicate eigenvalues by rank within sign
            (:func:`_by_rank`); live: ``[K]`` bool, the nonzero modes (a zero mode is a singleton).
        z: multiple of the gap's standard error (default :data:`TIE_Z`).

    Returns:
        A partition of ``range(K)`` into runs of consecutive indices; an isolated mode is a singleton.
    """
    z = TIE_Z if z is None else float(z)
    sets: list[list[int]] = []
    for k in range(lam.numel()):
        if k > 0 and _tied(lam, reps, live, k - 1, z):
            sets[-1].append(k)
        else:
            sets.append([k])
    return sets


def _tied(lam: torch.Tensor, reps: torch.Tensor, live: torch.Tensor, k: int, z: float) -> bool:
    """Modes ``k`` and ``k + 1``: both nonzero, the same sign, and a gap below ``z`` bootstrap SEs of the gap."""
    a, b = float(lam[k]), float(lam[k + 1])
    if not (bool(live[k]) and bool(live[k + 1])) or a * b <= 0:
        return False
    gaps = reps[:, k] - reps[:, k + 1]  # [R]
    gaps = gaps[~torch.isnan(gaps)]
    if gaps.numel() < 2:
        return False
    return abs(a - b) < z * float(gaps.std())


def _span_stability(
    cu: torch.Tensor, norm_u: torch.Tensor, c_full: torch.Tensor, modes: list[int], index, dirs
) -> float:
    """Fraction of replicates whose span of the same ranks is within :data:`OVERLAP_CUTOFF` of the full-data
    span of ``modes``: every principal cosine between the two sample-score spans on the full data at least the
    cut-off (largest principal angle at most acos(0.9) = 25.8 degrees).

    Args:
        cu: ``C u [D, K]``; norm_u: ``[K]`` ``||A u_k||``; c_full: ``[D, D]``; modes: the tied set;
        index: ``[R, K]`` counterparts by rank (:func:`_by_rank`); dirs: per replicate ``[D, K_r]``.
    """
    cols = torch.tensor(modes)
    stable = 0
    for r, ur in enumerate(dirs):
        j = index[r, cols]
        if bool((j < 0).any()):
            continue
        w = ur[:, j.to(ur.device)]  # [D, s] the replicate's directions of the same ranks
        gram = w.T @ (c_full @ w)  # [s, s] = (A w)^T (A w)
        g, e = torch.linalg.eigh((gram + gram.T) / 2)
        if float(g.min()) <= 1e-12 * float(g.max().clamp_min(1e-300)):
            continue
        cross = (cu[:, cols].T @ w) / norm_u[cols, None]  # [s, s] <v_k, A w_j>, v_k unit
        cosines = torch.linalg.svdvals(cross @ (e * g.rsqrt()) @ e.T)  # principal cosines
        stable += bool(cosines.min() >= OVERLAP_CUTOFF)
    return stable / max(len(dirs), 1)


def _stacked_times(
    xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor, u: torch.Tensor, eta: float, dx: int
):
    """``M u: [..., D, K]`` for raw sums ``xx [..., Dx, Dx]``, ``xy [..., Dx, Dy]``, ``yy [..., Dy, Dy]`` stacked as
    ``M = [[XX, sqrt(eta) XY], [sqrt(eta) XY^T, eta YY]]``; ``u: [D, K]``."""
    s = math.sqrt(eta)
    ux, uy = u[:dx], u[dx:]
    top = xx @ ux + s * (xy @ uy)  # [..., Dx, K]
    bottom = s * (xy.mT @ ux) + eta * (yy @ uy)  # [..., Dy, K]
    return torch.cat([top, bottom], -2)


def _heldout_jackknife(
    state: dict[str, torch.Tensor],
    fitted: torch.Tensor,
    halves: torch.Tensor,
    parts: torch.Tensor,
    eta: float,
    dx: int,
    jv: torch.Tensor,
    center: bool,
    crossfit: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out eigenvalues averaged over the evaluations, and their group-jackknife standard error.

    Evaluation ``e`` measures the directions ``fitted[e]`` (fitted on ``halves[e]``) on the other half
    (``halves[e ^ 1]``, cut in ``parts[e ^ 1]``) by :func:`heldout_crossfit` (``crossfit``) or
    :func:`heldout_quotient`. The estimate is the mean over evaluations. Its standard error is a delete-one-group
    jackknife over all G groups with the fitted directions held fixed: deleting group g changes every
    evaluation whose held-out half holds g. It measures the evaluation samples' noise around the population
    strength along the fitted directions, the quantity the held-out value estimates.

    Returns:
        ``(heldout [K], se [K])`` on the CPU; NaN where no evaluation has the mode.
    """
    f64 = torch.float64
    n_groups = state["count"].shape[0]
    evals_n, d, k_n = fitted.shape
    s = math.sqrt(eta)
    sums = torch.cat([state["sum_x"], s * state["sum_y"]], 1)  # [G, D] stacked feature sums
    count = state["count"]  # [G]
    values = torch.zeros(evals_n, k_n, dtype=f64, device=fitted.device)
    deleted = torch.zeros(evals_n, n_groups, k_n, dtype=f64, device=fitted.device)

    def cov_times(
        mu, sv, n, u
    ):  # C u of a data set from its M u [.., D, K], stacked sum [.., D] and count [..]
        if center:
            mu = mu - sv[..., :, None] * (sv[..., None, :] @ u) / n[..., None, None]
        return mu / n[..., None, None]

    def value(m1, s1, n1, m2, s2, n2, mb, sb, nb, u):
        num = (cov_times(m1, s1, n1, u) * (jv[:, None] * cov_times(m2, s2, n2, u))).sum(-2)
        den = (u * cov_times(mb, sb, nb, u)).sum(-2)
        ok = (den > 0) & (n1 > 0)[..., None] & (n2 > 0)[..., None]
        return torch.where(ok, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))

    for e in range(evals_n):
        u = fitted[e]  # [D, K]
        held = halves[e ^ 1] > 0  # [G]
        in1, in2 = (parts[e ^ 1, 0] > 0, parts[e ^ 1, 1] > 0) if crossfit else (held, held)
        members = torch.nonzero(held).squeeze(1)
        chunk = max(1, _CHUNK_BYTES // (4 * d * k_n * 8))  # groups whose M_g u are held at once
        w1, w2 = in1[members].to(f64), in2[members].to(f64)  # [g] part of each held-out group
        m1, m2, mb = (
            _stacked_times(
                *(torch.einsum("g,gij->ij", w, state[k][members]) for k in ("xx", "xy", "yy")), u, eta, dx
            )
            for w in (w1, w2, torch.ones_like(w1))
        )  # [D, K] each: M_part u
        s1, s2, sb = (w @ sums[members] for w in (w1, w2, torch.ones_like(w1)))
        n1, n2, nb = (w @ count[members] for w in (w1, w2, torch.ones_like(w1)))
        values[e] = value(m1, s1, n1, m2, s2, n2, mb, sb, nb, u)
        deleted[e] = values[e]  # groups outside the held-out half leave evaluation e unchanged
        for i in range(0, members.numel(), chunk):
            g = members[i : i + chunk]
            p = _stacked_times(state["xx"][g], state["xy"][g], state["yy"][g], u, eta, dx)  # [g, D, K] M_g u
            a1, a2 = w1[i : i + chunk], w2[i : i + chunk]
            sg, ng = sums[g], count[g]
            deleted[e, g] = value(
                m1 - a1[:, None, None] * p,
                s1 - a1[:, None] * sg,
                n1 - a1 * ng,
                m2 - a2[:, None, None] * p,
                s2 - a2[:, None] * sg,
                n2 - a2 * ng,
                mb - p,
                sb - sg,
                nb - ng,
                u,
            )
    heldout = values.nanmean(0).cpu()  # [K]
    jack = deleted.nanmean(0).cpu()[count.cpu() > 0]  # [G', K] the mean with each group deleted
    m = jack.shape[0]
    se = ((m - 1) / m * (jack - jack.nanmean(0)).square().nansum(0)).sqrt()
    return heldout, se


def _spec_diff_interval(
    diffs: torch.Tensor,
    lam: torch.Tensor,
    sets: list[list[int]],
    tied_ci: torch.Tensor,
    level: float,
    method: str,
) -> torch.Tensor:
    """``[2]`` interval of SPEC-diff = max |lambda| from the replicates' maxima ``diffs: [R]``; when the strongest
    mode belongs to a tied set of s > 1 modes, widened to cover the set's mean |eigenvalue| interval
    (``tied_ci`` of its sum, divided by s) too.

    At a tie the in-sample maximum is biased up (the larger of s noisy copies of one value) and the bootstrap
    of the maximum under-corrects that (a replicate sees the sample's gap, not the population's tie); the set's
    mean is not biased, and under a tie it equals the population maximum (docs/uncertainty.md, "Coverage")."""
    point = lam.abs().max().reshape(1)
    out = _interval(diffs[:, None], point, level, method)[0]
    k = int(lam.abs().argmax())
    t = next(i for i, s in enumerate(sets) if k in s)
    if len(sets[t]) > 1 and not bool(torch.isnan(tied_ci[t]).any()):
        mean = tied_ci[t].abs() / len(sets[t])  # [2] |sum| / s, both ends of one sign
        out = torch.stack([torch.minimum(out[0], mean.min()), torch.maximum(out[1], mean.max())])
    return out


def _normal_interval(point: torch.Tensor, se: torch.Tensor, level: float) -> torch.Tensor:
    """``[K, 2]``: ``point -+ z se`` with ``z`` the normal quantile of ``(1 + level) / 2``."""
    z = float(torch.special.ndtri(torch.tensor((1 + level) / 2, dtype=torch.float64)))
    return torch.stack([point - z * se, point + z * se], 1)


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
    interval: str | None = None,
    center: bool = False,
) -> dict[str, Any]:
    """Bootstrap intervals, tied sets, held-out eigenvalues with intervals, stability and verdicts of the
    full-data modes, from group sums.

    Args:
        state: group sums (see :func:`accumulate_groups`), float64.
        c_full: ``[D, D]`` full-data C (float64); ``eigenvalues: [K]``, ``u: [D, K]`` the full-data solve.
        eta: weight of the y kernel; dx: number of x features; zero_tol: |eigenvalue| below which a mode is zero.
        replicates: bootstrap replicates R (>= 2). level: interval level in (0, 1).
        seed: seeds the resampling and the splits (the result is a function of the sums and the seed).
        splits: random half/half splits of the groups for the held-out eigenvalue (default ``min(R, 10)``):
            fitted on one half (the mode of the same sign and rank there), evaluated on the other by
            :func:`heldout_crossfit` (that half cut in two parts; :func:`heldout_quotient` where it cannot
            be, with fewer than 4 groups).
        top_k: solve replicates for the ``top_k`` modes of each sign (block Krylov where cheaper).
        interval: one of :data:`INTERVALS` (default :data:`DEFAULT_INTERVAL`), for the eigenvalues, SPEC-diff
            and the tied sets' sums.
        center: each resampled (and held-out) data set centred on its own feature means, as the full-data
            solve with ``center=True`` (``c_full``, ``eigenvalues`` and ``u`` must then be the centred ones).

    Returns:
        ``eigenvalue_ci [K, 2]``, ``spec_diff_ci (lo, hi)``, ``heldout_eigenvalues [K]``,
        ``heldout_eigenvalue_ci [K, 2]``, ``stability [K]``, ``tied_modes`` (a partition of the K indices),
        ``tied_mode_ci [T, 2]``, ``support`` (K verdicts, :func:`mode_support`), ``draws`` (the bootstrap
        draws: ``by_rank [R, K]``, ``matched [R, K]``, ``spec_diff [R]``) and the settings used
        (``replicates, level, groups, splits, interval, seed, overlap_cutoff, tie_z, heldout``, the last
        ``"crossfit"`` or ``"quotient"``). Zero modes get NaN and ``"unknown"``.
    """
    interval = DEFAULT_INTERVAL if interval is None else interval
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
    live = (lam.abs() > zero_tol).cpu()  # [K]
    lam_cpu = lam.cpu()
    cu = c_full @ u  # [D, K]
    norm_u = (u * cu).sum(0).clamp_min(0).sqrt()  # [K] = |lambda_k|

    # bootstrap over groups: multinomial counts of G draws with replacement
    draws = torch.randint(groups, (replicates, groups), generator=gen)  # [R, G]
    weights = torch.zeros(replicates, groups, dtype=f64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=f64)
    )
    weights = weights.to(c_full.device)
    evals, dirs = _solve_all(state, weights, eta, dx, keep, top_k, center)
    matched, overlap, _ = _match(c_full, cu, norm_u, lam, evals, dirs, zero_tol)  # [R, K] each
    matched = matched.cpu()
    ci = _interval(matched, lam_cpu, level, interval)
    ci[~live] = float("nan")
    diffs = torch.stack([e.abs().max() for e in evals]).cpu()  # [R]

    # ties: replicate eigenvalues by rank within sign; each tied set's sum and span
    by_rank, rank_index = _by_rank(lam, evals, zero_tol)  # [R, K] each
    sets = tie_sets(lam_cpu, by_rank, live)
    set_sums = torch.stack([by_rank[:, s].sum(1) for s in sets], 1)  # [R, T]
    set_point = torch.stack([lam_cpu[s].sum() for s in sets])  # [T]
    tied_ci = _interval(set_sums, set_point, level, interval)  # [T, 2]
    stability = (overlap >= OVERLAP_CUTOFF).to(f64).mean(0).cpu()  # [K] singletons: their own direction
    for t, s in enumerate(sets):
        if not bool(live[s].all()):  # a zero mode: a singleton without an interval
            tied_ci[t] = float("nan")
        elif len(s) > 1:
            stability[s] = _span_stability(cu, norm_u, c_full, s, rank_index, dirs)
    stability[~live] = float("nan")
    diff_ci = _spec_diff_interval(diffs, lam_cpu, sets, tied_ci, level, interval)

    # held-out: fit on half the groups (the mode of the same sign and rank there: nothing of the evaluated half
    # chooses it), evaluate on the other half (both ways), cross-fitted (heldout_crossfit); group jackknife SE
    splits = min(replicates, 10) if splits is None else splits
    halves, quarters = _split_groups(groups, splits, gen)  # [2S, G], [2S, 2, G]
    halves, quarters = halves.to(c_full.device), quarters.to(c_full.device)
    fit_vals, fit_dirs = _solve_all(state, halves, eta, dx, keep, top_k, center)
    _, fit_index = _by_rank(lam, fit_vals, zero_tol)  # [2S, K]
    fitted = torch.zeros(2 * splits, c_full.shape[0], keep, dtype=f64, device=c_full.device)
    for e, ue in enumerate(fit_dirs):
        ok = torch.nonzero(fit_index[e] >= 0).squeeze(1)
        fitted[e][:, ok.to(ue.device)] = ue[:, fit_index[e, ok].to(ue.device)]
    jv = torch.ones(c_full.shape[0], dtype=f64, device=c_full.device)
    jv[dx:] = -1
    quarter_n = quarters @ state["count"]  # [2S, 2] samples in each part of each half
    crossfit = bool((quarter_n > 0).all())
    heldout, held_se = _heldout_jackknife(state, fitted, halves, quarters, eta, dx, jv, center, crossfit)
    heldout[~live] = float("nan")
    held_ci = _normal_interval(heldout, held_se, level)  # [K, 2]

    tied_size = torch.zeros(keep, dtype=torch.long)
    for s in sets:
        tied_size[s] = len(s)
    support = [
        mode_support(float(lam_cpu[k]), held_ci[k].tolist(), float(stability[k]), int(tied_size[k]))
        for k in range(keep)
    ]
    return {
        "eigenvalue_ci": ci,
        "spec_diff_ci": (float(diff_ci[0]), float(diff_ci[1])),
        "heldout_eigenvalues": heldout,
        "heldout_eigenvalue_ci": held_ci,
        "stability": stability,
        "tied_modes": sets,
        "tied_mode_ci": tied_ci,
        "support": support,
        "draws": {"by_rank": by_rank, "matched": matched, "spec_diff": diffs},
        "settings": {
            "replicates": replicates,
            "level": float(level),
            "groups": groups,
            "splits": splits,
            "interval": interval,
            "seed": int(seed),
            "overlap_cutoff": OVERLAP_CUTOFF,
            "tie_z": TIE_Z,
            "heldout": "crossfit" if crossfit else "quotient",
        },
    }


def mode_support(
    eigenvalue: float,
    heldout_ci: tuple[float, float] | list[float] | None,
    stability: float,
    tied_size: int = 1,
) -> str:
    """Plain-words verdict on one mode (one of :data:`VERDICTS`), from its held-out interval, its tied set and
    its stability; the rules, in order:

    - ``"unknown"``: a value is missing (no replicates, a zero mode);
    - ``"not supported by the data"``: the held-out interval (``heldout_eigenvalue_ci``, at the estimate's
      level) reaches 0 or the other sign: the direction's strength is not confirmed on unseen samples;
    - ``"tied"``: the mode belongs to a tied set of more than one mode (``tied_size > 1``, :func:`tie_sets`):
      its gap to a neighbour is within sampling error, so only the set's span and eigenvalue sum are
      identified, never the mode alone;
    - ``"not a distinct cluster"``: an isolated mode that fewer than :data:`STABLE_FRACTION` of the bootstrap
      replicates reproduce (overlap >= :data:`OVERLAP_CUTOFF`);
    - ``"supported"`` otherwise.
    """
    lo, hi = (None, None) if heldout_ci is None else (heldout_ci[0], heldout_ci[1])
    if any(v is None or v != v for v in (eigenvalue, lo, hi, stability)) or eigenvalue == 0:
        return "unknown"
    if (eigenvalue > 0 and lo <= 0) or (eigenvalue < 0 and hi >= 0):
        return "not supported by the data"
    if tied_size > 1:
        return "tied"
    if stability < STABLE_FRACTION:
        return "not a distinct cluster"
    return "supported"


# ------------------------------------------------------------------ automatic settings from a cost model
#: the automatic choice (compare job): at most this many replicates, and off below the minimum
MAX_REPLICATES = 200
MIN_REPLICATES = 20
#: groups by default, and the fewest that still give a usable bootstrap
DEFAULT_GROUPS = 32
MIN_GROUPS = 8

#: The cost model the compare job chooses R and G with (docs/uncertainty.md, "In the compare job"). It counts
#: floating-point operations from the problem's sizes only, never measured time or free memory, so the same
#: data and config always give the same choice (and the same spec.json).
#: an eigh of a D x D matrix: about this many times D^3 (as :func:`spec_torch.api.choose_route`)
EIGH_FLOPS = 4
#: one replicate's solve with the matching of its modes to the full data's
MATCH_FACTOR = 1.5
#: the fixed cost of one replicate solve (calls, bookkeeping), in FLOP-equivalents
SOLVE_OVERHEAD_FLOPS = 1e7
#: the fixed part of every compare job that the model does not size (top-samples pass, metrics, plots, report)
JOB_FLOPS = 2e10
#: ``uncertainty.budget``: the replicates may cost at most this multiple of the plain compare's modelled cost
DEFAULT_BUDGET = 1.0
#: the group sums may take at most this many bytes (a size rule; free memory is only checked, never chosen from)
MAX_GROUP_BYTES = 2 * 2**30


def solves_needed(replicates: int, splits: int | None = None) -> int:
    """Eigen-solves of :func:`estimate`: R bootstrap replicates plus 2 per held-out split."""
    splits = min(replicates, 10) if splits is None else splits
    return replicates + 2 * splits


def compare_cost(n: int, dx: int, dy: int) -> float:
    """Modelled FLOPs of the plain compare job: the sums ``n D^2``, the solve ``4 D^3`` and :data:`JOB_FLOPS`."""
    d = dx + dy
    return float(n) * d * d + EIGH_FLOPS * float(d) ** 3 + JOB_FLOPS


def replicate_solve_cost(dx: int, dy: int, groups: int) -> float:
    """Modelled FLOPs of one replicate solve: its C from ``groups`` group sums (``G D^2``), the solve with the
    matching (``1.5 * 4 D^3``) and :data:`SOLVE_OVERHEAD_FLOPS`."""
    d = dx + dy
    return MATCH_FACTOR * EIGH_FLOPS * float(d) ** 3 + float(groups) * d * d + SOLVE_OVERHEAD_FLOPS


def plan_replicates(
    n: int, dx: int, dy: int, groups: int, budget: float = DEFAULT_BUDGET, plain: float | None = None
) -> int:
    """The most replicates (<= :data:`MAX_REPLICATES`) whose solves cost at most ``budget`` times the plain
    compare (``plain`` FLOPs; default :func:`compare_cost`), each solve costed by :func:`replicate_solve_cost`;
    0 when fewer than :data:`MIN_REPLICATES` fit. A function of the sizes only."""
    allowed = float(budget) * (compare_cost(n, dx, dy) if plain is None else float(plain))
    per = replicate_solve_cost(dx, dy, groups)
    best = 0
    for r in range(MIN_REPLICATES, MAX_REPLICATES + 1):
        if solves_needed(r) * per > allowed:
            break
        best = r
    return best


def group_bytes(groups: int, dx: int, dy: int) -> int:
    """Bytes of ``groups`` float64 group sums (``G (Dx^2 + Dx Dy + Dy^2)``)."""
    return int(groups) * (dx * dx + dx * dy + dy * dy) * 8


def plan_groups(n: int, dx: int, dy: int, wanted: int | None = None) -> int:
    """Groups to keep: ``wanted`` (default :data:`DEFAULT_GROUPS`), fewer when a group would hold fewer than 4
    samples on average or the group sums would pass :data:`MAX_GROUP_BYTES`; 0 when fewer than
    :data:`MIN_GROUPS` remain. A function of the sizes only (the caller checks that the bytes fit)."""
    g = DEFAULT_GROUPS if wanted is None else int(wanted)
    g = min(g, MAX_GROUP_BYTES // max(group_bytes(1, dx, dy), 1), n // 4)
    return int(g) if g >= MIN_GROUPS else 0
