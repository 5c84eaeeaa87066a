"""Are the uncertainty verdicts right? Coverage, tie rule, held-out bias and verdict error rates, measured on
populations whose spectrum is known in closed form (spec_torch.uncertainty; docs/uncertainty.md).

    python bench/verdicts.py                 # the full set: 400 draws per headline figure (minutes, 1 thread)
    python bench/verdicts.py --draws 40      # a smoke run
    python bench/verdicts.py --part coverage # one part: coverage | heldout | rates

Populations (linear kernels, uncentred, so the population operator is J Sigma with Sigma = E[phi phi^T]):
z ~ N(0, I_p); a planted cluster on coordinate j of x is a shift s * eps with eps = +1 or -1 with probability
pi / 2 each and 0 otherwise (a mixture of three Gaussians; shift variance t = s^2 pi). y = z plus its own
shifts on other coordinates. Each coordinate is then an independent 2 x 2 block of J Sigma,
[[1 + t_x, 1], [-1, -(1 + t_y)]], whose eigenvalues are

    lambda = ((t_x - t_y) +- sqrt((t_x - t_y)^2 + 4 ((1 + t_x)(1 + t_y) - 1))) / 2,

and coordinates without shifts give exact zeros. Cases (p = 6, D = 12, n = 1000):

- tie:      x shifts on 0, 1 (t = 2), y on 2, 3 (t = 1.5): 2.732 x2, 0.686 x2, -0.732 x2, -2.186 x2;
- near-tie: the same with the second of each pair 8% weaker (t = 1.813 and 1.355);
- isolated: x shifts t = 2 and 0.5, y shifts t = 1.5 and 0.4: 2.732, 1.0, 0.686, 0.463, -0.5, -0.732, -0.863,
  -2.186 (top and bottom isolated).

Printed: coverage of the 90% intervals (percentile / bc / basic) of the top and bottom eigenvalue, SPEC-diff and
the tied set's sum; the tie rule's merge and split rates; the held-out value's mean against the population
(docs' sampling-fluctuation case m = 200, n = 400, and the isolated case) with its Monte Carlo SE and the
coverage of the held-out interval; false-"supported" rates on isotropic and near-duplicate data and miss rates
on planted clusters over effect size and n. Every figure is a rate over draws with its Monte Carlo SE.
"""

from __future__ import annotations

import argparse
import math

import torch

import spec_torch as st
from spec_torch import uncertainty as unc

LEVEL = 0.9
METHODS = ("percentile", "bc", "basic")


# ---------------------------------------------------------------------------------------------- populations
def block_eigenvalues(t_x: float, t_y: float) -> tuple[float, float]:
    """The two eigenvalues of one coordinate's block [[1 + t_x, 1], [-1, -(1 + t_y)]] of J Sigma."""
    a = t_x - t_y
    root = math.sqrt(a * a + 4 * ((1 + t_x) * (1 + t_y) - 1))
    return (a + root) / 2, (a - root) / 2


def t_for(lam: float) -> float:
    """The x shift variance t whose block (t_y = 0) has top eigenvalue lam (> 0): lambda^2 - t lambda - t = 0."""
    return lam * lam / (lam + 1)


CASES = {
    "tie": {"x": (2.0, 2.0), "y": (1.5, 1.5)},
    "near-tie": {
        "x": (2.0, t_for(block_eigenvalues(2.0, 0)[0] / 1.08)),
        "y": (1.5, t_for(-block_eigenvalues(0, 1.5)[1] / 1.08)),
    },
    "isolated": {"x": (2.0, 0.5), "y": (1.5, 0.4)},
}


def population_spectrum(shifts: dict, p: int = 6) -> torch.Tensor:
    """Closed-form nonzero population eigenvalues (descending) of x shifts on coordinates 0, 1, ... and y shifts
    on the following coordinates."""
    lam = [v for t in shifts["x"] for v in block_eigenvalues(t, 0.0)]
    lam += [v for t in shifts["y"] for v in block_eigenvalues(0.0, t)]
    return torch.tensor(sorted(lam, reverse=True), dtype=torch.float64)


def draw(
    shifts: dict, n: int, gen: torch.Generator, p: int = 6, pi: float = 0.5, background: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples ``x, y: [n, p + background]`` of the mixture population (see the module docstring); with
    ``background`` each side also gets that many coordinates of its own independent N(0, BACKGROUND_VAR) noise
    (population eigenvalues +-BACKGROUND_VAR, each ``background`` times: a degenerate bulk)."""
    z = torch.randn(n, p, generator=gen, dtype=torch.float64)
    x, y = z.clone(), z.clone()
    coords = iter(range(p))
    for target, ts in ((x, shifts["x"]), (y, shifts["y"])):
        for t in ts:
            j = next(coords)
            r = torch.rand(n, generator=gen, dtype=torch.float64)
            eps = (r < pi / 2).double() - ((r >= pi / 2) & (r < pi)).double()
            target[:, j] += math.sqrt(t / pi) * eps
    if background:
        scale = math.sqrt(BACKGROUND_VAR)
        x = torch.cat([x, scale * torch.randn(n, background, generator=gen, dtype=torch.float64)], 1)
        y = torch.cat([y, scale * torch.randn(n, background, generator=gen, dtype=torch.float64)], 1)
    return x, y


#: variance of the background noise coordinates of the planted-cluster grid
BACKGROUND_VAR = 0.1


def fit(
    x: torch.Tensor, y: torch.Tensor, replicates: int, seed: int, groups: int = 32, **kw
) -> st.SpecResult:
    return st.spec(
        x, y, "linear", "linear", replicates=replicates, seed=seed, groups=groups, reference=False, **kw
    )


def rate(hits: int, total: int) -> str:
    """``"r% (+-se)"``: a rate and its Monte Carlo standard error."""
    if total == 0:
        return "-"
    r = hits / total
    return f"{100 * r:.1f}% (±{100 * math.sqrt(max(r * (1 - r), 1e-12) / total):.1f})"


def covers(ci: torch.Tensor, truth: float) -> bool:
    lo, hi = ci.tolist()
    return lo <= truth <= hi


# ------------------------------------------------------------------------------------------------- coverage
def coverage(draws: int, n: int = 1000, replicates: int = 100) -> None:
    """Coverage of the 90% intervals per method, and the tie rule's merge / split rates."""
    print(
        f"\n## Coverage of the {LEVEL:.0%} intervals (n = {n}, R = {replicates}, G = 32, {draws} draws per case)"
    )
    print(
        "| case | interval | top eigenvalue | bottom eigenvalue | SPEC-diff | top tied set's sum | bottom set's sum "
        "| SPEC-diff, maxima only |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ties = {}
    for case, shifts in CASES.items():
        pop = population_spectrum(shifts)  # nonzero, descending
        spec_diff = float(pop.abs().max())
        hits = {m: [0, 0, 0, 0, 0, 0] for m in METHODS}
        together = [0, 0]  # top pair / bottom pair in the same tied set
        gen = torch.Generator().manual_seed(1000 + list(CASES).index(case))
        for d in range(draws):
            x, y = draw(shifts, n, gen)
            res = fit(x, y, replicates, seed=d)
            live = torch.nonzero(res.eigenvalues.abs() > res.zero_tol).squeeze(1)
            lam = res.eigenvalues
            k_top, k_bot = int(live[0]), int(live[-1])
            sets = res.tied_modes
            set_top = next(s for s in sets if k_top in s)
            set_bot = next(s for s in sets if k_bot in s)
            together[0] += k_top + 1 in set_top
            together[1] += k_bot - 1 in set_bot
            # the target: the population sum over the same ranks within sign as the set's members
            pos_pop, neg_pop = pop[pop > 0], pop[pop < 0].flip(0)  # largest first / most negative first
            sum_top = (
                float(pos_pop[: len(set_top)].sum()) if len(set_top) <= pos_pop.numel() else float("nan")
            )
            sum_bot = (
                float(neg_pop[: len(set_bot)].sum()) if len(set_bot) <= neg_pop.numel() else float("nan")
            )
            draws_ = res._draws
            lam_c = lam.cpu()
            for m in METHODS:
                ci = unc._interval(draws_["matched"], lam_c, LEVEL, m)
                hits[m][0] += covers(ci[k_top], float(pop[0]))
                hits[m][1] += covers(ci[k_bot], float(pop[-1]))
                set_sums = torch.stack([draws_["by_rank"][:, s].sum(1) for s in sets], 1)  # [R, T]
                set_ci = unc._interval(
                    set_sums, torch.stack([lam_c[s].sum() for s in sets]), LEVEL, m
                )  # [T, 2]
                diff_ci = unc._spec_diff_interval(draws_["spec_diff"], lam_c, sets, set_ci, LEVEL, m)
                hits[m][2] += covers(diff_ci, spec_diff)
                hits[m][3] += covers(set_ci[sets.index(set_top)], sum_top)
                hits[m][4] += covers(set_ci[sets.index(set_bot)], sum_bot)
                diff_plain = unc._interval(
                    draws_["spec_diff"][:, None], lam_c.abs().max().reshape(1), LEVEL, m
                )[0]
                hits[m][5] += covers(diff_plain, spec_diff)
        for m in METHODS:
            print(f"| {case} | {m} | " + " | ".join(rate(h, draws) for h in hits[m]) + " |")
        ties[case] = together
    print(f"\n## Tie rule (gap < {unc.TIE_Z} bootstrap SEs), {draws} draws per case, n = {n}")
    print("| case | population | top two in one set | bottom two in one set |")
    print("|---|---|---|---|")
    what = {
        "tie": "tied (equal)",
        "near-tie": "8% apart",
        "isolated": "isolated (2.73 vs 1.0; -2.19 vs -0.86)",
    }
    for case, (a, b) in ties.items():
        print(f"| {case} | {what[case]} | {rate(a, draws)} | {rate(b, draws)} |")
    print(
        "(tie: 'in one set' is right, its complement the split rate; near-tie and isolated: it is the merge rate)"
    )


# -------------------------------------------------------------------------------------------------- held-out
def noise_dimensions(n: int, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """docs' sampling-fluctuation case: x = z (5-d), y = [z, e], e ~ N(0, I/m): population -1/m, multiplicity m."""
    z = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    e = torch.randn(n, m, generator=gen, dtype=torch.float64) / m**0.5
    return z, torch.cat([z, e], 1)


def heldout(draws: int) -> None:
    """Mean held-out value of the strongest mode of each sign against the population, with its MC SE."""
    print(
        f"\n## Held-out value of the strongest mode of each sign ({draws} data sets each; R = 10, 10 splits)"
    )
    print(
        "| case | mode | population | mean held-out (MC SE) | past the population, in MC SEs (< 0: not past) "
        "| interval covers the population |"
    )
    print("|---|---|---|---|---|---|")
    cases = [("noise m=200, n=400, G=16", -1, -1 / 200)]
    pop = population_spectrum(CASES["isolated"])
    cases += [("isolated, n=1000, G=32", 0, float(pop[0])), ("isolated, n=1000, G=32", -1, float(pop[-1]))]
    for name, k, truth in cases:
        gen = torch.Generator().manual_seed(7 + k)
        vals, cov = [], 0
        for d in range(draws):
            if name.startswith("noise"):
                x, y = noise_dimensions(400, 200, gen)
                res = fit(x, y, 10, seed=d, groups=16)
            else:
                x, y = draw(CASES["isolated"], 1000, gen)
                res = fit(x, y, 10, seed=d)
            live = torch.nonzero(res.eigenvalues.abs() > res.zero_tol).squeeze(1)
            kk = int(live[k])
            vals.append(float(res.heldout_eigenvalues[kk]))
            cov += covers(res.heldout_eigenvalue_ci[kk], truth)
        v = torch.tensor(vals, dtype=torch.float64)
        se = float(v.std()) / math.sqrt(draws)
        print(
            f"| {name} | {'top' if k == 0 else 'bottom'} | {truth:+.5f} | {float(v.mean()):+.5f} ({se:.5f}) | "
            f"{math.copysign(1, truth) * (float(v.mean()) - truth) / se:+.2f} | {rate(cov, draws)} |"
        )


# ------------------------------------------------------------------------------------------- verdict rates
def rates(draws: int) -> None:
    """False-"supported" on isotropic and near-duplicate data; misses on planted clusters (effect size x n)."""
    print(f"\n## False 'supported' (population eigenvalue repeated), {draws} draws per case, R = 50")
    print("| case | n | top mode | bottom mode | any of the nonzero modes | verdicts of the top mode |")
    print("|---|---|---|---|---|---|")
    for name, n in (
        ("isotropic p=10 (cosine)", 500),
        ("isotropic p=10 (cosine)", 2000),
        ("near-duplicate y = x + 0.3 noise, p=10", 500),
        ("near-duplicate y = x + 0.3 noise, p=10", 2000),
    ):
        gen = torch.Generator().manual_seed(n)
        top = bot = anyk = 0
        seen: dict[str, int] = {}
        for d in range(draws):
            x = torch.randn(n, 10, generator=gen, dtype=torch.float64)
            if name.startswith("isotropic"):
                y = torch.randn(n, 10, generator=gen, dtype=torch.float64)
                res = st.spec(x, y, "cosine", "cosine", replicates=50, seed=d, reference=False)
            else:
                y = x + 0.3 * torch.randn(n, 10, generator=gen, dtype=torch.float64)
                res = fit(x, y, 50, seed=d)
            sup = [s == "supported" for s in res.support]
            top += sup[0]
            bot += sup[-1]
            anyk += any(sup)
            seen[res.support[0]] = seen.get(res.support[0], 0) + 1
        words = ", ".join(f"{k} {v / draws:.0%}" for k, v in sorted(seen.items()))
        print(f"| {name} | {n} | {rate(top, draws)} | {rate(bot, draws)} | {rate(anyk, draws)} | {words} |")
    print(f"\n## Missed planted clusters (top mode not 'supported'), {draws} draws per cell, R = 50")
    print(
        "x = z + a cluster shift on one coordinate (shift variance t), y = z (p = 6), and 4 coordinates of "
        f"independent N(0, {BACKGROUND_VAR}) noise each: population top (t + sqrt(t^2 + 4t)) / 2 above a "
        f"bulk of +-{BACKGROUND_VAR} (multiplicity 4)"
    )
    sizes = (200, 500, 1000)
    print("| t (top eigenvalue) | " + " | ".join(f"n = {n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for t in (0.01, 0.02, 0.05, 0.15):
        row = []
        for n in sizes:
            gen = torch.Generator().manual_seed(int(1000 * t) + n)
            miss = 0
            for d in range(draws):
                x, y = draw({"x": (t,), "y": ()}, n, gen, background=4)
                res = fit(x, y, 50, seed=d, groups=min(32, n // 8))
                miss += res.support[0] != "supported"
            row.append(rate(miss, draws))
        print(f"| {t} ({block_eigenvalues(t, 0)[0]:.3f}) | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=400, help="draws per headline figure (rates: a quarter)")
    parser.add_argument("--part", choices=("coverage", "heldout", "rates", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("coverage", "all"):
        coverage(args.draws)
    if args.part in ("heldout", "all"):
        heldout(max(args.draws // 2, 2))
    if args.part in ("rates", "all"):
        rates(max(args.draws // 4, 2))


if __name__ == "__main__":
    main()
