"""What the uncertainty measures say on the reference cases of docs/uncertainty.md (seeds fixed, ~20 s).

    python bench/uncertainty_cases.py

For each case: the in-sample eigenvalue of a mode, its 90% interval, the held-out eigenvalue, the stability and
the plain-words verdict (spec_torch.uncertainty.mode_support); where the population value along the mode is
known in closed form, that too.
"""

from __future__ import annotations

import torch

import spec_torch as st
from spec_torch.uncertainty import mode_support


def line(name: str, res: st.SpecResult, k: int, population: float | None = None) -> None:
    lam, held, stab = float(res.eigenvalues[k]), float(res.heldout_eigenvalues[k]), float(res.stability[k])
    lo, hi = res.eigenvalue_ci[k].tolist()
    pop = "" if population is None else f"  population {population:+.4f}"
    print(
        f"{name:<44} lambda {lam:+.4f}  90% [{lo:+.4f}, {hi:+.4f}]  held-out {held:+.4f}  stability "
        f"{stab:.2f}{pop}  -> {mode_support(lam, held, stab)}"
    )


def main() -> None:
    torch.set_num_threads(1)
    # planted cluster: x shifts the first 20% of the rows (class-sorted) along e_0, y does not; float32
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 10, generator=g)
    x = z.clone()
    x[:200, 0] += 4.0
    line("planted cluster (n=1000, cosine)", st.spec(x, z, replicates=50, seed=0), 0)

    # independent isotropic Gaussians: population +-1/p with multiplicity p
    p = 40
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, p, generator=g), torch.randn(2000, p, generator=g)
    res = st.spec(x, y, "cosine", "cosine", replicates=40, seed=0)
    line("independent isotropic (p=40, n=2000)", res, 0, 1 / p)
    line("", res, -1, -1 / p)

    # near-duplicates: y = x + s noise
    for s in (0.05, 0.3):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1000, 10, generator=g, dtype=torch.float64)
        y = x + s * torch.randn(1000, 10, generator=g, dtype=torch.float64)
        line(
            f"near-duplicates y = x + {s} noise (linear)", st.spec(x, y, "linear", "linear", replicates=50), 0
        )

    # sampling fluctuation: y = [z, e], e per-sample noise in m dimensions (N(0, I/m)); linear kernels.
    # Population -1/m along every noise direction; in-sample about -(1 + sqrt(m/n))^2 / m.
    n = 400
    for m in (50, 200, 800):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, 5, generator=g, dtype=torch.float64)
        e = torch.randn(n, m, generator=g, dtype=torch.float64) / m**0.5
        res = st.spec(z, torch.cat([z, e], 1), "linear", "linear", replicates=20, seed=0, groups=16)
        line(f"noise in m={m} dims, n={n} (linear)", res, -1, -1 / m)


if __name__ == "__main__":
    main()
