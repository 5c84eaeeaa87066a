"""What the uncertainty measures say on the reference cases of docs/uncertainty.md (seeds fixed, ~20 s).

    python bench/uncertainty_cases.py

For each case: the in-sample eigenvalue of a mode, its 90% interval, the held-out eigenvalue and its interval,
the stability, the size of its tied set and the library's verdict (``res.support``, spec_torch.uncertainty.
mode_support); where the population value along the mode is known in closed form, that too.
"""

from __future__ import annotations

import torch

import spec_torch as st


def line(name: str, res: st.SpecResult, k: int, population: float | None = None) -> None:
    k = k % res.eigenvalues.numel()
    lam, held, stab = float(res.eigenvalues[k]), float(res.heldout_eigenvalues[k]), float(res.stability[k])
    lo, hi = res.eigenvalue_ci[k].tolist()
    hlo, hhi = res.heldout_eigenvalue_ci[k].tolist()
    tied = res.tied_set_of(k)[1]
    pop = "" if population is None else f"  population {population:+.4f}"
    print(
        f"{name:<44} lambda {lam:+.4f}  90% [{lo:+.4f}, {hi:+.4f}]  held-out {held:+.4f} [{hlo:+.4f}, {hhi:+.4f}]"
        f"  stability {stab:.2f}  tied {tied}{pop}  -> {res.support[k]}"
    )


def heldout_both_ways(
    x: torch.Tensor, y: torch.Tensor, groups: int = 16, splits: int = 10
) -> tuple[float, ...]:
    """The bottom mode's held-out eigenvalue by the plain quotient of the held-out half and by the cross-fitted
    estimate (spec_torch.uncertainty), with the same splits, linear kernels, float64."""
    from spec_torch import uncertainty as unc
    from spec_torch.solver import assemble_covariance

    acc = st.DiffCovariance("linear", "linear", groups=groups).update(x, y)
    res = acc.compute()
    state = acc.group_state
    dx = x.shape[1]
    c_full = assemble_covariance(acc.xx, acc.xy, acc.yy, acc.n, 1.0)
    lam = res.eigenvalues
    halves, parts = unc._split_groups(groups, splits, torch.Generator().manual_seed(0))
    fit_vals, fit_dirs = unc._solve_all(state, halves, 1.0, dx, lam.numel(), None)
    _, index = unc._by_rank(lam, fit_vals, res.zero_tol)  # the same sign and rank on the fitting half
    fitted = torch.stack([d[:, index[e, -1]] for e, d in enumerate(fit_dirs)])[:, :, None]  # [2S, D, 1]
    other = torch.arange(2 * splits) ^ 1
    c_eval = unc._weighted_covariances(state, halves, 1.0)[other]  # [2S, D, D]
    c_parts = unc._weighted_covariances(state, parts[other].reshape(-1, groups), 1.0)
    c_parts = c_parts.reshape(2 * splits, 2, *c_parts.shape[1:])
    jv = torch.ones(c_full.shape[0], dtype=torch.float64)
    jv[dx:] = -1
    quotient = unc.heldout_quotient(c_eval, fitted, jv).mean(0)[-1]
    crossfit = unc.heldout_crossfit(c_parts[:, 0], c_parts[:, 1], c_eval, fitted, jv).mean(0)[-1]
    return float(lam[-1]), float(quotient), float(crossfit)


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
        lam, quotient, crossfit = heldout_both_ways(z, torch.cat([z, e], 1))
        print(
            f"{'':<44} in units of 1/m: in-sample {lam * m:+.2f}, held-out by the plain quotient "
            f"{quotient * m:+.2f}, cross-fitted {crossfit * m:+.2f}, population -1"
        )

    # real data: digits pixels vs an 8-d Gaussian random projection of them, cosine, centred
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().data)
    projected = pixels @ torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = st.spec(pixels, projected, "cosine", "cosine", replicates=100, seed=0, center=True)
    for k in (0, 1, 2, -1, -2, -3):
        line("digits pixels vs 8-d projection (centred)" if k == 0 else "", res, k)


if __name__ == "__main__":
    main()
