"""Intervals on the n x n routes: the exact factor of L (spec_torch.factor_intervals) against the D x D group sums.

Where both apply (explicit features, D > n: the dual case) the two give the same intervals; this prints, side by
side in one run, the time of each, their ratio and the largest interval difference. The Gaussian rows time the
exact route with replicates against the exact route alone (no features route applies there).

    python bench/bench_route_intervals.py                 # n = 400, D = 600 + 600, R = 40
    python bench/bench_route_intervals.py --n 800 --p 1000 --replicates 100
"""

from __future__ import annotations

import argparse

import torch
from _timing import timed

import spec_torch as st


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--p", type=int, default=600, help="width of x and of y (D = 2p > n: the dual case)")
    ap.add_argument("--replicates", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, p, r = args.n, args.p, args.replicates
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    x[: n // 5, 0] += 6.0
    y = torch.randn(n, p, generator=g, dtype=torch.float64)
    cpu = torch.device("cpu")
    out: dict[str, st.SpecResult] = {}

    def factor() -> None:
        out["factor"] = st.spec(x, y, method="features", replicates=r, seed=1, reference=False)

    def group_sums() -> None:
        acc = st.DiffCovariance("cosine", "cosine", groups=32, group_seed=1)
        acc.update(x, y, index=torch.arange(n))
        out["sums"] = acc.compute(replicates=r, seed=1, reference=False)

    def dual_alone() -> None:
        st.spec(x, y, method="features", reference=False)

    t_factor, t_sums, t_plain = timed(factor, cpu), timed(group_sums, cpu), timed(dual_alone, cpu)
    a, b = out["factor"], out["sums"]
    live_a, live_b = a.eigenvalues.abs() > a.zero_tol, b.eigenvalues.abs() > b.zero_tol
    diff = (a.eigenvalue_ci[live_a] - b.eigenvalue_ci[live_b]).abs().nan_to_num().max().item()
    print(f"cosine, n = {n}, D = {2 * p}, R = {r}, {args.threads} thread(s)")
    print(f"  dual solve alone                 {t_plain:8.2f} s")
    print(f"  dual + factor intervals (rank {a.uncertainty['factor_rank']}) {t_factor:8.2f} s")
    print(
        f"  D x D group sums + intervals     {t_sums:8.2f} s   ratio sums / factor = {t_sums / t_factor:.2f}"
    )
    print(f"  largest interval difference      {diff:.2e} (spec_diff {a.spec_diff:.4f})")

    kx = st.GaussianKernel(sigma="auto")
    xs, ys = x[:, :8].contiguous(), y[:, :8].contiguous()

    def exact_alone() -> None:
        st.spec(xs, ys, kx, kx, method="exact", reference=False)

    def exact_intervals() -> None:
        out["gauss"] = st.spec(xs, ys, kx, kx, method="exact", replicates=r, seed=1, reference=False)

    t_alone, t_int = timed(exact_alone, cpu), timed(exact_intervals, cpu)
    rank = out["gauss"].uncertainty["factor_rank"]
    print(f"Gaussian (exact kernel), n = {n}, p = 8, R = {r}")
    print(f"  exact route alone                {t_alone:8.2f} s")
    print(f"  with factor intervals (rank {rank}) {t_int:8.2f} s   ratio = {t_int / t_alone:.1f}")


if __name__ == "__main__":
    main()
