"""Layer correspondence in the spirit of Kornblith et al. (2019): small MLPs trained on scikit-learn's digits
from different seeds; for each layer of one network, is the layer of the other with the smallest SPEC-diff
(largest linear CKA) the one at the same depth? Shared by tests/test_matrix.py and bench/bench_matrix.py."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

import spec_torch as st

#: five seed pairs, each two networks trained from different seeds
SEED_PAIRS = [(s, s + 100) for s in range(5)]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised digits ``[1797, 64]`` float32 and labels ``[1797]``."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, depth: int = 4, width: int = 64, steps: int = 100):
    """An MLP with ``depth`` hidden ReLU layers trained full-batch with Adam for ``steps`` steps from ``seed``."""
    torch.manual_seed(seed)
    layers, d = [], x.shape[1]
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    net = torch.nn.Sequential(*layers, torch.nn.Linear(d, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@torch.no_grad()
def hidden_layers(net: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Pre-activation outputs ``[n, width]`` of every hidden Linear layer (float64)."""
    out, h = [], x
    for module in net[:-1]:
        h = module(h)
        if isinstance(module, torch.nn.Linear):
            out.append(h.double())
    return out


def identification(seed_pairs: list[tuple[int, int]], kernel: str = "cosine", **train_kw) -> dict[str, float]:
    """Fraction of layers whose best match in the other network is at the same depth, for SPEC and CKA."""
    x, y = digits()
    hits_spec = hits_cka = total = 0
    depth = train_kw.get("depth", 4)
    for sa, sb in seed_pairs:
        la = hidden_layers(train_mlp(x, y, sa, **train_kw), x)
        lb = hidden_layers(train_mlp(x, y, sb, **train_kw), x)
        feats = {f"a{i}": f for i, f in enumerate(la)} | {f"b{i}": f for i, f in enumerate(lb)}
        m = st.spec_matrix(feats, kernel=kernel)
        cross_spec = m.spec_diff[:depth, depth:]  # [L, L]: rows layers of a, columns layers of b
        cross_cka = m.cka[:depth, depth:]
        truth = torch.arange(depth)
        hits_spec += int((cross_spec.argmin(1) == truth).sum())
        hits_cka += int((cross_cka.argmax(1) == truth).sum())
        total += depth
    return {"spec": hits_spec / total, "cka": hits_cka / total, "chance": 1 / depth, "layers": depth}


if __name__ == "__main__":
    import sys
    import time

    torch.set_num_threads(1)
    t = time.time()
    print(identification(SEED_PAIRS), time.time() - t, file=sys.stderr)
