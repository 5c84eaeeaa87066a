"""Benchmarks of SPEC's uncertainty (spec_torch.uncertainty), printed as ratios measured side by side in one run.

    python bench/bench_uncertainty.py              # the full set (several minutes on 2 CPU cores)
    python bench/bench_uncertainty.py --quick      # small sizes, a smoke run
    python bench/bench_uncertainty.py --device cuda

1. Accumulation overhead of G groups: ``DiffCovariance(groups=G).update`` against the plain
   ``DiffCovariance.update`` (both float64 sums, the same features, repetitions interleaved, medians), at the
   sizes of bench_core.py's throughput test (batch 8,192, 2,000 features per side) and G = 16, 32.
2. Solve time of R bootstrap replicates plus the held-out splits (``compute(replicates=R)`` minus the plain
   ``compute``) with the full solver and with the top-k solver (top 20 modes of each sign), same sums.
3. Coverage of the 90% intervals for isolated eigenvalues: a fixed population (a planted cluster x holds and
   a different one y holds, cosine kernels, p = 10) whose spectrum is approximated with n = 1,000,000; over
   many draws at n = 400 and n = 1,000 the fraction of intervals containing the population eigenvalue (top and bottom mode),
   percentile and bias-corrected percentile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _timing import timed

import spec_torch as st


def _cputimed(fn) -> float:
    """CPU seconds of this process: on a loaded shared machine, the work done rather than the waiting."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


# ----------------------------------------------------------------------------- coverage (also used by tests)
def planted_population(n: int, gen: torch.Generator, p: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of the coverage population: ``x: [n, p]`` separates a 20% cluster along e_0, ``y: [n, p]``
    a 30% cluster along e_1; elsewhere the same isotropic Gaussian. Top and bottom eigenvalues are isolated."""
    z = torch.randn(n, p, generator=gen, dtype=torch.float64)  # [n, p]
    x, y = z.clone(), z.clone()
    x[:, 0] += 3.0 * (torch.rand(n, generator=gen, dtype=torch.float64) < 0.2).double()
    y[:, 1] += 1.5 * (torch.rand(n, generator=gen, dtype=torch.float64) < 0.3).double()
    return x, y


def population_extremes(n_pop: int = 1_000_000, seed: int = 12345) -> tuple[float, float]:
    """Top and bottom eigenvalue of the population, approximated by streaming ``n_pop`` samples."""
    gen = torch.Generator().manual_seed(seed)
    acc = st.DiffCovariance("cosine", "cosine")
    for _ in range(0, n_pop, 50_000):
        acc.update(*planted_population(50_000, gen))
    lam = acc.compute().eigenvalues
    return float(lam[0]), float(lam[-1])


def coverage(
    draws: int, n: int = 400, replicates: int = 100, groups: int = 32, n_pop: int = 1_000_000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Fraction of ``draws`` data sets of size ``n`` whose interval (level 0.9) holds the population top and
    bottom eigenvalue, per interval method: ``{"percentile": (top, bottom), "bc": (top, bottom)}``."""
    top, bottom = population_extremes(n_pop)
    gen = torch.Generator().manual_seed(seed)
    hits = {"percentile": [0, 0], "bc": [0, 0], "basic": [0, 0]}
    for d in range(draws):
        x, y = planted_population(n, gen)
        acc = st.DiffCovariance("cosine", "cosine", groups=groups, group_seed=d).update(x, y)
        for method, h in hits.items():
            res = acc.compute(replicates=replicates, seed=d, interval=method)
            for j, (k, truth) in enumerate(((0, top), (-1, bottom))):
                lo, hi = res.eigenvalue_ci[k].tolist()
                h[j] += lo <= truth <= hi
    return {m: (h[0] / draws, h[1] / draws) for m, h in hits.items()}


# ------------------------------------------------------------------------------------------- benchmarks
def bench_accumulation(device: torch.device, batch: int, d: int, groups: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64).to(device)  # [B, Dx]
    y = torch.randn(batch, d, generator=g, dtype=torch.float64).to(device)  # [B, Dy]
    plain = st.DiffCovariance("linear", "linear")
    grouped = st.DiffCovariance("linear", "linear", groups=groups)
    plain.update(x, y), grouped.update(x, y)  # warm-up, state allocation
    t_plain, t_groups, c_plain, c_groups = [], [], [], []
    for _ in range(reps):
        t_plain.append(timed(lambda: plain.update(x, y), device))
        t_groups.append(timed(lambda: grouped.update(x, y), device))
        if device.type == "cpu":
            c_plain.append(_cputimed(lambda: plain.update(x, y)))
            c_groups.append(_cputimed(lambda: grouped.update(x, y)))
    mp, mg = statistics.median(t_plain), statistics.median(t_groups)
    line = (
        f"accumulate  batch={batch} D={d}+{d} G={groups:3d} ({torch.get_num_threads()} threads): "
        f"plain {mp * 1e3:8.1f} ms  groups {mg * 1e3:8.1f} ms  wall ratio {mg / mp:5.2f}x"
    )
    if c_plain:
        line += f"  CPU-time ratio {statistics.median(c_groups) / statistics.median(c_plain):5.2f}x"
    print(line + "  (target <= 1.3x)")


def bench_replicates(device: torch.device, n: int, d: int, groups: int, replicates: int, top_k: int) -> None:
    g = torch.Generator().manual_seed(1)
    acc = st.DiffCovariance("linear", "linear", groups=groups)
    for _ in range(0, n, 8192):
        acc.update(
            torch.randn(8192, d, generator=g, dtype=torch.float64).to(device),
            torch.randn(8192, d, generator=g, dtype=torch.float64).to(device),
        )
    rows = []
    for label, k in (("full", None), (f"top-{top_k}", top_k)):
        t_plain = timed(lambda k=k: acc.compute(top_k=k), device)
        t_all = timed(lambda k=k: acc.compute(top_k=k, replicates=replicates), device)
        rows.append((label, t_plain, t_all))
    base = rows[0][2] - rows[0][1]
    for label, t_plain, t_all in rows:
        extra = t_all - t_plain
        print(
            f"replicates  D={d}+{d} G={groups} R={replicates} {label:>7}: solve {t_plain:7.2f} s, "
            f"+replicates {extra:7.2f} s ({extra / max(t_plain, 1e-9):5.1f}x the solve; {extra / base:4.2f}x full)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.quick:
        d, batch, reps, n, r, draws, n_pop = 200, 2048, 3, 8192, 10, 20, 200_000
    else:
        d, batch, reps, n, r, draws, n_pop = 2000, 8192, 5, 16384, 50, 200, 1_000_000
    print(f"# spec_torch uncertainty benchmarks on {device} ({torch.get_num_threads()} threads)")
    threads = torch.get_num_threads()
    for n_threads in sorted({1, threads}) if device.type == "cpu" else [threads]:
        torch.set_num_threads(n_threads)
        for groups in (16, 32):
            bench_accumulation(device, batch, d, groups, reps)
    torch.set_num_threads(threads)
    bench_replicates(device, n, d // 4 if not args.quick else d, 32, r, 20)
    for n_draw in (400, 1000):
        t0 = time.perf_counter()
        cov = coverage(draws, n=n_draw, n_pop=n_pop)
        for method, (top, bottom) in cov.items():
            print(
                f"coverage    90% {method:>10} intervals, {draws} draws of n={n_draw}, R=100, G=32: "
                f"top mode {top:.1%}, bottom mode {bottom:.1%}  (target 80-97%)"
            )
        print(f"            ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
