"""Benchmarks of SPEC's uncertainty (spec_torch.uncertainty), printed as ratios measured side by side in one run.

    python bench/bench_uncertainty.py              # the full set (tens of minutes on 2 CPU cores)
    python bench/bench_uncertainty.py --quick      # small sizes, a smoke run
    python bench/bench_uncertainty.py --part accumulation --dim 400 --threads 2   # one part, size, thread count
    python bench/bench_uncertainty.py --device cuda

1. Accumulation overhead of G groups: a pass of n rows through ``DiffCovariance(groups=G).update`` (the staging
   buffer and its flushes included, ending with a flush) against the same pass through the plain
   ``DiffCovariance.update`` (both float64 sums, the same features, passes interleaved, medians), for user
   batch sizes 1,024, 2,048 and 8,192, 1 thread and all threads, at D = 400 and 2,000 features per side
   (bench_core.py's throughput size; --quick: 200), G = 16, 32 (G = 32 only at D = 2,000).
2. Solve time of R bootstrap replicates plus the held-out splits (``compute(replicates=R)`` minus the plain
   ``compute``) with the full solver and with the top-k solver (top 20 modes of each sign), same sums.
3. Coverage of the 90% intervals for isolated eigenvalues: a fixed population (a planted cluster x holds and
   a different one y holds, cosine kernels, p = 10) whose spectrum is approximated with n = 1,000,000; over
   many draws at n = 400 and n = 1,000 the fraction of intervals containing the population eigenvalue (top and bottom mode),
   percentile and bias-corrected percentile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _timing import timed

import spec_torch as st


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
def _stream_pass(acc: st.DiffCovariance, x: torch.Tensor, y: torch.Tensor, batch: int, n: int) -> None:
    """Stream ``n`` rows in batches of ``batch`` (cycling through ``x: [m, D]``, ``y: [m, D]``), then settle:
    the grouped accumulator flushes its staged rows and forms the totals, as ``compute()`` would."""
    m = x.shape[0]
    for start in range(0, n, batch):
        lo = start % m
        acc.update(x[lo : lo + batch], y[lo : lo + batch])  # [batch, D] each
    acc._settle()


class _Unstaged(st.DiffCovariance):
    """The grouped accumulator without its staging buffer: every batch straight to accumulate_groups, one
    product per group and block of ``B / G`` rows (how it was before the buffer), for comparison."""

    def _stage_or_add(self, px: torch.Tensor, py: torch.Tensor, gid: torch.Tensor) -> None:
        from spec_torch.uncertainty import accumulate_groups

        accumulate_groups(self._group_sums, px, py, gid)


def bench_accumulation(device: torch.device, d: int, groups: int, batch: int, n: int, reps: int) -> None:
    """Wall and CPU time of a pass of ``n`` rows in batches of ``batch``: grouped (staging and its flushes
    included) against plain, the same data, passes interleaved, medians of ``reps`` (times and pair ratios);
    the grouped pass without staging too."""
    from spec_torch.covariance import _stage_rows

    block = 8192  # distinct rows; the pass cycles through them
    assert block % batch == 0 and n % batch == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(block, d, generator=g, dtype=torch.float64).to(device)  # [block, Dx]
    y = torch.randn(block, d, generator=g, dtype=torch.float64).to(device)  # [block, Dy]
    plain = st.DiffCovariance("linear", "linear")
    grouped = st.DiffCovariance("linear", "linear", groups=groups)
    unstaged = _Unstaged("linear", "linear", groups=groups)
    for acc in (plain, grouped, unstaged):  # warm-up, state allocation
        acc.update(x[:batch], y[:batch])
        acc._settle()
    flushes = grouped._flushes
    wall: dict[str, list[float]] = {"plain": [], "groups": [], "unstaged": []}
    cpu: dict[str, list[float]] = {"plain": [], "groups": [], "unstaged": []}
    runs = [("plain", plain), ("groups", grouped), ("unstaged", unstaged)]
    for rep in range(reps):
        for name, acc in runs if rep % 2 == 0 else runs[::-1]:  # alternate the order: load drifts
            c0 = time.process_time()
            wall[name].append(timed(lambda acc=acc: _stream_pass(acc, x, y, batch, n), device))
            cpu[name].append(time.process_time() - c0)

    def ratio(t: dict[str, list[float]], name: str = "groups") -> float:
        """Median over repetitions of ``name`` / plain, each pair run back to back (a shared machine's load
        changes between repetitions more than within one)."""
        return statistics.median(g / p for g, p in zip(t[name], t["plain"]))

    k = _stage_rows(groups, d, d) // groups
    line = (
        f"accumulate  D={d}+{d} G={groups:2d} k={k:3d} batch={batch:5d} n={n} ({torch.get_num_threads()} threads, "
        f"{(grouped._flushes - flushes) / reps:.0f} slot flushes/pass): plain {statistics.median(wall['plain']):6.2f} s"
        f"  groups {statistics.median(wall['groups']):6.2f} s  wall ratio {ratio(wall):5.2f}x"
    )
    if device.type == "cpu":
        line += f"  CPU-time ratio {ratio(cpu):5.2f}x"
    line += f"  (unstaged {ratio(wall, 'unstaged'):4.2f}x)"
    # other processes' load distorts multithreaded timings most (a descheduled thread stalls every product)
    print(line + f"  (target <= 1.3x; load {os.getloadavg()[0]:.1f})", flush=True)


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
    parser.add_argument(
        "--part",
        choices=("all", "accumulation", "replicates", "coverage"),
        default="all",
        help="run one part",
    )
    parser.add_argument("--dim", type=int, help="accumulation: only this D per side")
    parser.add_argument(
        "--threads", type=int, help="accumulation: only this thread count (default 1 and all)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # accumulation: (D per side, groups, batch sizes, rows per pass, repetitions)
    if args.quick:
        accumulation = [(200, g, (1024, 2048, 8192), 16384, 3) for g in (16, 32)]
        n, d_rep, r, draws, n_pop = 8192, 200, 10, 20, 200_000
    else:
        accumulation = [(400, g, (1024, 2048, 8192), 32768, 3) for g in (16, 32)]
        accumulation += [(2000, 32, (1024, 8192), 16384, 3)]  # one pass = 32 slots of 512 rows
        n, d_rep, r, draws, n_pop = 16384, 500, 50, 200, 1_000_000
    if args.dim:
        accumulation = [a for a in accumulation if a[0] == args.dim]
    print(f"# spec_torch uncertainty benchmarks on {device} ({torch.get_num_threads()} threads)")
    threads = torch.get_num_threads()
    if args.part in ("all", "accumulation"):
        counts = (
            [args.threads] if args.threads else sorted({1, threads}) if device.type == "cpu" else [threads]
        )
        for n_threads in counts:
            torch.set_num_threads(n_threads)
            for d, groups, batches, n_rows, reps in accumulation:
                for batch in batches:
                    bench_accumulation(device, d, groups, batch, n_rows, reps)
        torch.set_num_threads(threads)
    if args.part in ("all", "replicates"):
        bench_replicates(device, n, d_rep, 32, r, 20)
    if args.part not in ("all", "coverage"):
        return
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
