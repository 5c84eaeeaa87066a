"""The permutation reference of SPEC-diff (``spec_diff_null``): its gap to real shuffles, and its cost.

    python bench/bench_permutation.py              # both parts (about 2 minutes on 2 CPU cores)
    python bench/bench_permutation.py --quick      # small sizes, a smoke run

1. Gap: for each case, the real SPEC-diff, the reference, and the mean (and spread) of SPEC-diff over 30 real
   shuffles of the pairing (the features route on ``y[perm]``: exact for these D <= 128), the relative gap
   ``mean / reference - 1`` and the ratio ``spec_diff / reference``. Cosine kernels, eta = 1, uncentred and
   centred. Cases: scikit-learn digits (raw pixels) against an 8-d and a 32-d Gaussian random projection of
   them and against a rotation; independent Gaussians (p = 40; and shifted means, x + 1 with p = 40 vs y + 0.5
   with p = 20).
2. Cost: ``DiffCovariance.compute`` with and without the reference (``reference=False``) on the same sums,
   full solve and ``top_k=10``, uncentred and centred, D = 1,000 and 2,000 (n = 2D); and ``st.spec`` on the
   exact route with and without it (n = 1,000 and 2,000). One thread, CPU seconds of this process, medians of
   interleaved repetitions (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import spec_torch as st

SHUFFLES = 30


def _cputime(fn, *args, **kwargs) -> float:
    """CPU seconds of this process for ``fn(*args, **kwargs)``: the work done, not the waiting (shared machine)."""
    t0 = time.process_time()
    fn(*args, **kwargs)
    return time.process_time() - t0


def cases(quick: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, x, y): digits against projections and a rotation; independent Gaussians."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    digits = load_digits().data
    out = []
    for n in (500,) if quick else (500, 1797):
        x = digits[np.sort(rng.permutation(len(digits))[:n])]
        rot = np.linalg.qr(rng.standard_normal((64, 64)))[0]
        out += [
            (f"digits vs 8-d projection   n={n}", x, x @ rng.standard_normal((64, 8))),
            (f"digits vs 32-d projection  n={n}", x, x @ rng.standard_normal((64, 32))),
            (f"digits vs rotation         n={n}", x, x @ rot),
        ]
    for n in (500,) if quick else (500, 2000):
        g = np.random.default_rng(n)
        out += [
            (f"independent Gaussians p=40 n={n}", g.standard_normal((n, 40)), g.standard_normal((n, 40))),
            (
                f"independent, shifted means n={n}",
                g.standard_normal((n, 40)) + 1,
                g.standard_normal((n, 20)) + 0.5,
            ),
        ]
    return out


def gap_table(quick: bool) -> None:
    print(f"1. reference vs the mean SPEC-diff over {SHUFFLES} real shuffles (cosine, eta = 1)")
    print(
        f"{'case':36s} {'center':>6s} {'spec_diff':>10s} {'reference':>10s} {'shuffled':>18s} {'gap':>7s} {'ratio':>6s}"
    )
    rng = np.random.default_rng(1)
    for name, x, y in cases(quick):
        for center in (False, True):
            res = st.spec(x, y, "cosine", "cosine", center=center)
            ref = res.spec_diff_null
            runs = [
                st.spec(x, y[rng.permutation(len(y))], "cosine", "cosine", center=center).spec_diff
                for _ in range(SHUFFLES)
            ]
            mean, sd = statistics.fmean(runs), statistics.stdev(runs)
            print(
                f"{name:36s} {str(center):>6s} {res.spec_diff:10.5f} {ref:10.5f} {mean:10.5f} +- {sd:.5f} "
                f"{mean / ref - 1:+7.2%} {res.spec_diff_ratio:6.3f}"
            )


def cost_table(quick: bool, reps: int = 3) -> None:
    print("\n2. cost of the reference: with it / without it (reference=False), 1 thread, CPU s, medians")
    torch.set_num_threads(1)  # the CPU time of one thread: the work done, whatever else runs on the machine
    gen = torch.Generator().manual_seed(0)
    for p in (250,) if quick else (500, 1000):
        n = 4 * p
        z = torch.randn(n, 20, generator=gen, dtype=torch.float64)
        x = z @ torch.randn(20, p, generator=gen, dtype=torch.float64)
        x = x + torch.randn(n, p, generator=gen, dtype=torch.float64)
        y = z @ torch.randn(20, p, generator=gen, dtype=torch.float64)
        y = y + 2 * torch.randn(n, p, generator=gen, dtype=torch.float64)
        acc = st.DiffCovariance("cosine", "cosine").update(x, y)
        acc.compute(top_k=10)  # warm-up (first-call allocations)
        for top_k in (None, 10):
            for center in (False, True):
                with_ref, without = [], []
                for _ in range(reps):  # interleaved
                    with_ref.append(_cputime(acc.compute, top_k=top_k, center=center))
                    without.append(_cputime(acc.compute, top_k=top_k, center=center, reference=False))
                a, b = statistics.median(with_ref), statistics.median(without)
                print(
                    f"  features D={2 * p} n={n} top_k={top_k} center={center}: {a:.2f} s / {b:.2f} s = {a / b:.2f}x"
                )
    print("   exact route: st.spec(method='exact') with it / without it (reference=False)")
    for n in (500,) if quick else (1000, 2000):
        z = torch.randn(n, 20, generator=gen, dtype=torch.float64)
        x = z @ torch.randn(20, 300, generator=gen, dtype=torch.float64)
        y = z[:, :10] @ torch.randn(10, 300, generator=gen, dtype=torch.float64)
        x, y = x + torch.randn_like(x), y + torch.randn_like(y)
        for top_k in (None, 10):
            for center in (False, True):
                with_ref, without = [], []
                for _ in range(reps):  # interleaved
                    with_ref.append(_cputime(st.spec, x, y, method="exact", top_k=top_k, center=center))
                    without.append(
                        _cputime(st.spec, x, y, method="exact", top_k=top_k, center=center, reference=False)
                    )
                a, b = statistics.median(with_ref), statistics.median(without)
                print(f"  exact n={n} top_k={top_k} center={center}: {a:.2f} s / {b:.2f} s = {a / b:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["gap", "cost", "all"], default="all")
    args = ap.parse_args()
    if args.part in ("gap", "all"):
        gap_table(args.quick)
    if args.part in ("cost", "all"):
        cost_table(args.quick)


if __name__ == "__main__":
    main()
