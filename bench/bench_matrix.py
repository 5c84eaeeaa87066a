"""The SPEC matrix: one joint pass against the pairwise calls, and layer identification on digits MLPs.

    python bench/bench_matrix.py                # n = 20,000, N = 8 sets of 64-d, then the layer check
    python bench/bench_matrix.py --quick        # small sizes, a smoke run
    python bench/bench_matrix.py --device cuda  # on a GPU
    python bench/bench_matrix.py --threads 2    # torch intra-op threads (default 1)

1. Time of one ``st.spec_matrix`` pass for N = 8 feature sets against the 28 pairwise ``st.spec`` calls
   (feature route, float64 sums as in the matrix) on the same data, in one run, with a check that the
   entries agree; the state each holds (the joint ``[D, D]`` matrix vs one pair's blocks) and, on CUDA, the
   peak allocated memory of each; on CPU the process's peak resident memory at the end.
2. Layer identification (Kornblith et al. 2019): MLPs with 4 hidden layers trained on scikit-learn's digits
   from 5 seed pairs; for each layer of one network, is the layer of the other with the smallest SPEC-diff
   (largest linear CKA) at the same depth? Prints both accuracies and chance (1 / L).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

import spec_torch as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _timing import sync
from layer_match import SEED_PAIRS, identification  # noqa: E402


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB peak allocated"
    return "n/a on CPU (see the process peak below)"


def matrix_vs_pairwise(n: int, d: int, nsets: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=g)
    # related sets (mixtures of a shared base and noise) so the spectra are not all alike
    feats = {
        f"set{i}": (base * (i / nsets) + torch.randn(n, d, generator=g)).to(device) for i in range(nsets)
    }
    names = list(feats)
    _peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    m = st.spec_matrix(feats, kernel="cosine", batch_size=4096)
    sync(device)
    t_matrix = time.perf_counter() - t0
    peak_matrix = _peak(device)
    t0 = time.perf_counter()
    st.spec_matrix(feats, kernel="cosine", batch_size=4096, cka=False)
    sync(device)
    t_nocka = time.perf_counter() - t0
    _peak_reset(device)
    t0 = time.perf_counter()
    worst = 0.0
    for i in range(nsets):
        for j in range(i + 1, nsets):
            res = st.spec(
                feats[names[i]],
                feats[names[j]],
                method="features",
                batch_size=4096,
                accumulate_dtype=torch.float64,
            )
            worst = max(worst, abs(res.spec_diff - float(m.spec_diff[i, j])))
    sync(device)
    t_pairs = time.perf_counter() - t0
    peak_pairs = _peak(device)
    pairs = nsets * (nsets - 1) // 2
    big_d = nsets * d
    print(f"1. SPEC matrix, N = {nsets} sets of {d}-d cosine features, n = {n:,}, {device}")
    print(
        f"   one spec_matrix pass (+ CKA): {t_matrix:8.2f} s   joint state {big_d}^2 float64 = "
        f"{big_d**2 * 8 / 2**20:.1f} MiB (+ raw rows for CKA, same size); {peak_matrix}"
    )
    print(
        f"   {pairs} pairwise st.spec calls:  {t_pairs:8.2f} s   per-pair state {(2 * d) ** 2 * 8 / 2**20:.1f} MiB; "
        f"{peak_pairs}"
    )
    print(f"   one spec_matrix pass, cka=False: {t_nocka:8.2f} s")
    print(
        f"   ratio pairwise / matrix: {t_pairs / t_matrix:.2f}x (without CKA {t_pairs / t_nocka:.2f}x)   max |entry difference| = {worst:.2e}"
    )


def layer_identification() -> None:
    t0 = time.perf_counter()
    cos = identification(SEED_PAIRS, kernel="cosine")
    lin = identification(SEED_PAIRS, kernel="linear")
    print(
        f"2. Layer identification, MLPs with {cos['layers']} hidden layers on digits, {len(SEED_PAIRS)} seed pairs "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(
        f"   SPEC-diff (cosine): {cos['spec']:.0%}   SPEC-diff (linear): {lin['spec']:.0%}   "
        f"linear CKA: {cos['cka']:.0%}   chance: {cos['chance']:.0%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (small eighs thrash with 2 on a busy machine)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = 2000 if args.quick else 20_000
    matrix_vs_pairwise(n, 64, 8, device)
    layer_identification()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak resident memory: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
