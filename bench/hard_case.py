"""The default path on a hard case, against the dense float64 oracle (tests/oracle.py): sklearn's digits with
the rows sorted by class, float32 input, and y = x + 1e-3 noise (nearly identical embeddings: SPEC-diff about
1e-5 of the kernels' trace), cosine kernels, every setting left at its default.

Prints the branch that ran and SPEC-diff of ``st.spec`` and of ``st.spec_matrix`` next to the oracle's, with
the absolute and relative errors.

    PYTHONPATH=. python bench/hard_case.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

import spec_torch as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import difference  # noqa: E402  (the tests' dense oracle)


def main() -> None:
    digits = load_digits()
    order = np.argsort(digits.target, kind="stable")
    x = digits.data[order].astype(np.float32)  # [1797, 64], class-sorted
    y = (x + 1e-3 * np.random.default_rng(0).normal(size=x.shape)).astype(np.float32)
    oracle = float(np.abs(np.linalg.eigvalsh(difference(x.astype(np.float64), y.astype(np.float64)))).max())
    res = st.spec(x, y)
    matrix = float(st.spec_matrix({"x": x, "y": y}).spec_diff[0, 1])
    print(f"# digits sorted by class, float32, y = x + 1e-3 noise, cosine; oracle SPEC-diff {oracle:.6e}")
    for label, value in ((f"st.spec ({res.solver})", res.spec_diff), ("st.spec_matrix", matrix)):
        err = abs(value - oracle)
        print(f"{label:<22} SPEC-diff {value:.6e}  abs err {err:.1e}  rel err {err / oracle:.1e}")


if __name__ == "__main__":
    main()
