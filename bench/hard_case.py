"""The default path on a hard case, against the dense float64 oracle (tests/oracle.py): sklearn's digits with
the rows sorted by class, float32 input, and y = x + 1e-3 noise (nearly identical embeddings: SPEC-diff about
1e-5 of the kernels' trace), cosine kernels, every setting left at its default.

Prints the branch that ran and SPEC-diff of ``st.spec`` and of ``st.spec_matrix`` next to the oracle's, with
the absolute and relative errors.

Then issue 17's float64 case: x Gaussian, y = x + 1e-6 (and 1e-5) noise, n = 1500, p = 32, cosine. The default
``st.spec`` (``method="auto"``) against the features route forced and the oracle: the route that ran, whether it
re-solved, SPEC-diff's relative error, the top eigenvector's overlap with the oracle's, the number of modes,
the largest eigenvalue error and its estimate (``res.eigenvalue_error``), and how many modes are below resolution.

    PYTHONPATH=. python bench/hard_case.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import spec_torch as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import difference, spectrum  # noqa: E402  (the tests' dense oracle)


def main() -> None:
    digits = load_digits()
    order = np.argsort(digits.target, kind="stable")
    x = digits.data[order].astype(np.float32)  # [1797, 64], class-sorted
    y = (x + 1e-3 * np.random.default_rng(0).normal(size=x.shape)).astype(np.float32)
    oracle = float(np.abs(np.linalg.eigvalsh(difference(x.astype(np.float64), y.astype(np.float64)))).max())
    res = st.spec(x, y)
    m = st.spec_matrix({"x": x, "y": y})
    matrix, pair = float(m.spec_diff[0, 1]), m.pair(0, 1)
    print(f"# digits sorted by class, float32, y = x + 1e-3 noise, cosine; oracle SPEC-diff {oracle:.6e}")
    rows = (
        (f"st.spec ({res.method}, {res.solver})", res.spec_diff, res),
        ("st.spec_matrix (pair)", matrix, pair),
    )
    for label, value, r in rows:
        err = abs(value - oracle)
        print(
            f"{label:<28} SPEC-diff {value:.6e}  abs err {err:.1e}  rel err {err / oracle:.1e}  "
            f"re-solved {r.re_solve is not None}  below resolution {int(r.below_resolution.sum())}/"
            f"{r.eigenvalues.numel()}  top mode's error estimate {float(r.eigenvalue_error[r.eigenvalues.abs().argmax()]):.1e}"
        )

    close_float64()


def close_float64(n: int = 1500, p: int = 32) -> None:
    """Issue 17's case: nearly identical float64 embeddings, default route against the features route."""
    print(f"# float64, x Gaussian, y = x + s noise, n = {n}, p = {p}, cosine; against the dense oracle")
    for noise in (1e-6, 1e-5):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, p, generator=g, dtype=torch.float64)
        y = x + noise * torch.randn(n, p, generator=g, dtype=torch.float64)
        w, v = spectrum(difference(x.numpy(), y.numpy()), keep=2 * p)
        oracle = float(np.abs(w).max())
        for label, res in (("default", st.spec(x, y)), ("features", st.spec(x, y, method="features"))):
            modes = res.eigenvalues.abs() > res.zero_tol
            ev = res.eigenvalues.numpy()
            top = res.sample_scores(x, y, modes=[int(np.argmax(np.abs(ev)))])[:, 0].numpy()
            overlap = abs(top @ v[:, int(np.argmax(np.abs(w)))])
            print(
                f"s={noise:g} {label:<9} route {res.method} ({res.solver}) re-solved {res.re_solve is not None!s:<5} "
                f"SPEC-diff rel err {abs(res.spec_diff - oracle) / oracle:.1e}  top overlap {overlap:.3f}  "
                f"modes {int(modes.sum())}/{2 * p}  max eig err {np.abs(ev - w).max():.1e} "
                f"(estimate {float(res.eigenvalue_error.max()):.1e})  below resolution "
                f"{int(res.below_resolution.sum())}"
            )


if __name__ == "__main__":
    main()
