"""Bad input raises SpecError (a ValueError) whose message names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spec_torch as st
from spec_torch.errors import SpecError


def xy(n=20, p=4, q=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, p, generator=g), torch.randn(n, q, generator=g)


def test_error_class_is_value_error():
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y: (x, y[:-1]), r"x and y: .*20 rows in x and 19 rows in y"),
        (lambda x, y: (x[0], y), r"x: expected a 2-D array"),
        (lambda x, y: (x, y[:, :, None]), r"y: expected a 2-D array"),
        (lambda x, y: (x[:0], y[:0]), r"x: expected a non-empty array"),
        (
            lambda x, y: (x.index_fill(0, torch.tensor([3]), float("nan")), y),
            r"x: contains NaN or Inf in 1 row",
        ),
        (
            lambda x, y: (x, y.index_fill(0, torch.tensor([2, 5]), float("inf"))),
            r"y: contains NaN or Inf in 2 row",
        ),
        (
            lambda x, y: (x.index_fill(0, torch.tensor([4]), 0.0), y),
            r"x: the cosine kernel needs non-zero rows.*row 4",
        ),
        (lambda x, y: ("abc", y), r"x: expected a torch.Tensor or numpy.ndarray"),
        (lambda x, y: (np.array([["a"]]), y), r"x: expected a numeric array"),
    ],
)
@pytest.mark.parametrize("method", ["features", "exact"])
def test_bad_arrays(make, match, method):
    x, y = make(*xy())
    with pytest.raises(SpecError, match=match):
        st.spec(x, y, method=method)


def test_bad_arrays_in_streaming_update():
    x, y = xy()
    acc = st.DiffCovariance()
    with pytest.raises(SpecError, match="x and y"):
        acc.update(x, y[:5])
    acc.update(x, y)
    with pytest.raises(SpecError, match=r"x/y: expected feature dimensions \(4, 3\)"):
        acc.update(x[:, :3], y)
    with pytest.raises(SpecError, match="update: no samples"):
        st.DiffCovariance().compute()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=0.0), "sigma: expected a positive number"),
        (dict(sigma=-1.0), "sigma: expected a positive number"),
        (dict(sigma=float("nan")), "sigma: expected a positive number"),
        (dict(sigma=1.0, rff_dim=0), "rff_dim: expected a positive integer"),
        (dict(sigma=1.0, rff_dim=2.5), "rff_dim: expected a positive integer"),
        (dict(sigma=1.0, seed="x"), "seed: expected an integer"),
    ],
)
def test_bad_gaussian_settings(kwargs, match):
    with pytest.raises(SpecError, match=match):
        st.GaussianKernel(**kwargs)


def test_bad_options():
    x, y = xy()
    with pytest.raises(SpecError, match="eta: expected a positive number"):
        st.spec(x, y, eta=0.0)
    with pytest.raises(SpecError, match="method: expected one of"):
        st.spec(x, y, method="fast")
    with pytest.raises(SpecError, match="kernel_x: unknown kernel 'cosin'"):
        st.spec(x, y, kernel_x="cosin")
    with pytest.raises(SpecError, match="kernel_y: method='features' needs a feature map"):
        st.spec(x, y, kernel_y=st.GaussianKernel(sigma=1.0), method="features")
    with pytest.raises(SpecError, match="kernel_x: .* no finite feature map"):
        st.DiffCovariance(st.GaussianKernel(sigma=1.0), "cosine")
    with pytest.raises(SpecError, match="sigma='auto': needs at least 2 samples"):
        st.spec(x[:1], y[:1], kernel_x=st.GaussianKernel(rff_dim=4), method="features")


def test_top_k_larger_than_spectrum():
    x, y = xy(n=20, p=4, q=3)  # spectrum: min(20, 7) = 7 eigenvalues
    with pytest.raises(SpecError, match=r"top_k: asks for 8 modes of each sign .* only 7 eigenvalues"):
        st.spec(x, y, top_k=8, method="features")
    with pytest.raises(SpecError, match="top_k: expected a positive integer"):
        st.spec(x, y, top_k=0)
    res = st.spec(x, y)
    with pytest.raises(SpecError, match="modes: index 99 out of range"):
        res.sample_scores(x, y, modes=[99])
    with pytest.raises(SpecError, match="k: expected a positive integer"):
        res.top_samples((x, y), k=0)


def test_feature_dimension_too_large_for_memory():
    x, y = xy()
    huge = st.GaussianKernel(sigma=1.0, rff_dim=5_000_000)  # D = 10M: D x D float64 is 800 TB
    # refused when constructed (issue 19: before any frequency is drawn), from rff_dim alone: D >= 10M + 1
    with pytest.raises(
        SpecError, match=r"kernel_x/kernel_y: (at least )?D = 10000000 \+ \d+ .* needs about .* GiB"
    ):
        st.DiffCovariance(huge, "cosine").update(x, y)


def test_zero_mode_scores_refused():
    x, _ = xy()
    res = st.spec(x, x, method="features")
    with pytest.raises(SpecError, match="numerically zero"):
        res.sample_scores(x, x, modes=[0])
