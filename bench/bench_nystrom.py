"""Nyström features against random Fourier features and the exact route, measured side by side in one run.

    python bench/bench_nystrom.py                 # the table below, seeds 0-2 (a few minutes on 2 CPU cores)
    python bench/bench_nystrom.py --seeds 1       # one seed per cell, quicker
    python bench/bench_nystrom.py --device cuda   # the throughput part on a GPU

1. Accuracy on scikit-learn's digits (n = 1,797; x = raw pixels [n, 64], y = an 8-d seeded random projection
   of them), Gaussian kernels with median bandwidths on both sides, eta = 1: the mean relative error of the
   top-3 and bottom-3 eigenvalues of K_x - K_y against the exact route (``method="exact"``, the n x n
   matrix), at equal feature dimension D per side: random features with ``rff_dim = D/2`` (cos and sin)
   against ``landmarks = D``, D = 128, 256, 512, 1024 (never more landmarks than rows). Mean over seeds, with
   the worst seed, and the wall time of one ``st.spec`` call (fit + stream + solve) beside the exact route's.
2. Throughput of the Nyström feature map (``k(batch, L) @ W``: the Gaussian kernel block and one GEMM, in
   float64) on a float32 batch, against one float32 matmul of the same shape (``[B, m] @ [m, m]``), one
   float64 matmul of that shape, and the random-feature map of the same D; medians of interleaved repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from _timing import timed
from sklearn.datasets import load_digits

import spec_torch as st

DIMS = (128, 256, 512, 1024)


def digits_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels ``[1797, 64]`` and their 8-d seeded random projection ``[1797, 8]``, float64."""
    x = torch.tensor(load_digits().data, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    return x, x @ (torch.randn(64, 8, generator=g, dtype=torch.float64) / 8**0.5)


def _extremes(evals: torch.Tensor) -> np.ndarray:
    e = np.sort(evals.double().cpu().numpy())
    return np.concatenate([e[-3:], e[:3]])


def rel_error(evals: torch.Tensor, ref: np.ndarray) -> float:
    """Mean relative error of the top-3 and bottom-3 eigenvalues."""
    return float(np.mean(np.abs(_extremes(evals) - ref) / np.abs(ref)))


def bench_accuracy(seeds: int) -> None:
    x, y = digits_pair()
    n = x.shape[0]
    t0 = time.perf_counter()
    exact = st.spec(x, y, st.GaussianKernel(sigma="auto"), st.GaussianKernel(sigma="auto"), method="exact")
    t_exact = time.perf_counter() - t0
    ref = _extremes(exact.eigenvalues)
    print(
        f"[1] digits n={n}, x [n, 64] vs y [n, 8] (random projection), Gaussian, median sigma, eta=1: "
        f"mean relative error of the top-3/bottom-3 eigenvalues vs the exact route ({t_exact:.1f} s), "
        f"mean over seeds 0-{seeds - 1} (worst seed), time of one st.spec call"
    )
    print(
        f"{'D':>6} | {'random features':>22} {'time':>7} | {'Nystrom':>22} {'time':>7} | {'RFF/Nystrom':>11}"
    )
    for d in DIMS:
        if d > n:
            continue  # never more landmarks than rows
        cells = {}
        for kind in ("rff", "nystrom"):
            errs, times = [], []
            for seed in range(seeds):
                if kind == "rff":
                    kx, ky = (st.GaussianKernel(sigma="auto", rff_dim=d // 2, seed=seed) for _ in range(2))
                else:
                    kx, ky = (st.Nystrom("gaussian", landmarks=d, seed=seed) for _ in range(2))
                t0 = time.perf_counter()
                res = st.spec(x, y, kx, ky, method="features")
                times.append(time.perf_counter() - t0)
                errs.append(rel_error(res.eigenvalues, ref))
            cells[kind] = (float(np.mean(errs)), max(errs), statistics.median(times))
        (er, wr, tr), (en, wn, tn) = cells["rff"], cells["nystrom"]
        print(
            f"{d:>6} | {100 * er:>8.2f}% (worst {100 * wr:>6.2f}%) {tr:>6.1f}s | "
            f"{100 * en:>8.3f}% (worst {100 * wn:>6.3f}%) {tn:>6.1f}s | {er / en:>10.0f}x"
        )


def bench_throughput(device: torch.device, batch: int, m: int, reps: int) -> None:
    x, _ = digits_pair()
    kern = st.Nystrom("gaussian", landmarks=m, seed=0).fit(x)
    rff = st.GaussianKernel(sigma="auto", rff_dim=m // 2, seed=0).fit(x)
    g = torch.Generator().manual_seed(1)
    xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)].float().to(device)  # [B, 64] float32
    a32 = torch.randn(batch, m, generator=g).to(device)  # [B, m]
    w32 = torch.randn(m, m, generator=g).to(device)  # [m, m]
    a64, w64 = a32.double(), w32.double()
    runs = {
        "Nystrom features": lambda: kern.features(xb),
        "one float32 matmul [B,m]@[m,m]": lambda: a32 @ w32,
        "one float64 matmul [B,m]@[m,m]": lambda: a64 @ w64,
        "random features (same D)": lambda: rff.features(xb),
    }
    for fn in runs.values():
        fn()  # warm-up (per-device copies of the landmarks, W and the frequencies)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):  # interleaved so every entry sees the same machine load
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["one float32 matmul [B,m]@[m,m]"]
    print(
        f"[2] feature-map throughput, B={batch}, p=64, m=D={m}, float32 input on {device} (medians of {reps})"
    )
    for name, t in med.items():
        print(
            f"    {name:<32} {t * 1e3:8.2f} ms  {batch / t / 1e3:8.1f} k rows/s  {t / base:5.2f}x the float32 matmul"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-accuracy", action="store_true", help="only the throughput part")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also into a pipe
    if not args.skip_accuracy:
        bench_accuracy(args.seeds)
    bench_throughput(torch.device(args.device), args.batch, 1024, args.reps)


if __name__ == "__main__":
    main()
