"""Linear CKA in the library (spec_torch.metrics): the biased convention the report shows and the unbiased
HSIC estimator, against dense numpy formulas on n x n Gram matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spec_torch as st
from spec_torch.metrics import hsic_unbiased, linear_cka

#: float64 throughout; the dense oracle and the feature-sum formulas differ only by rounding
TOL = 1e-10


def _hsic_dense(k: np.ndarray, m: np.ndarray, unbiased: bool) -> float:
    n = k.shape[0]
    if not unbiased:
        h = np.eye(n) - 1.0 / n
        return float(np.trace(k @ h @ m @ h))
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    one = np.ones(n)
    total = (
        np.trace(k @ m)
        + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ k @ m @ one
    )
    return float(total / (n * (n - 3)))


def _cka_dense(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    k, m = x @ x.T, y @ y.T
    return _hsic_dense(k, m, unbiased) / np.sqrt(_hsic_dense(k, k, unbiased) * _hsic_dense(m, m, unbiased))


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_matches_the_dense_oracle_on_related_embeddings(unbiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7)) + 5.0  # |mean| >> std: centring matters
    y = np.tanh(x @ rng.normal(size=(7, 5))) + 0.3 * rng.normal(size=(60, 5))
    want = _cka_dense(x, y, unbiased)
    assert abs(linear_cka(x, y, unbiased=unbiased) - want) < TOL
    assert (
        abs(
            float(hsic_unbiased(torch.from_numpy(x), torch.from_numpy(y)))
            - _hsic_dense(x @ x.T, y @ y.T, True)
        )
        < 1e-8
    )
    # invariances: isotropic scale, shift, rotation
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert abs(linear_cka(x, 2.5 * y @ q - 7.0, unbiased=unbiased) - want) < 1e-9
    assert abs(linear_cka(np.float32(x), y) - linear_cka(x, y)) < 1e-5  # float32 input, float64 inside


def test_unbiased_estimator_removes_the_small_n_drift_of_the_biased_one():
    """Independent embeddings with n not much larger than p: biased CKA is far from 0, unbiased is near 0."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 40)), rng.normal(size=(50, 40))
    biased, unbiased = linear_cka(x, y), linear_cka(x, y, unbiased=True)
    assert biased > 0.3  # measured 0.42 here: the drift that is the reason to offer the unbiased one
    assert abs(unbiased) < 0.1


def test_streamed_class_and_function_agree_and_are_exported():
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = x[:, :3] ** 2
    acc = st.LinearCKA()
    for a, b in zip(x.split(17), y.split(17)):
        acc.update(a, b)
    assert abs(acc.compute() - st.linear_cka(x, y)) < TOL


def test_bad_input_names_the_argument():
    with pytest.raises(st.SpecError, match="at least 4 samples"):
        linear_cka(np.ones((3, 2)), np.ones((3, 2)), unbiased=True)
    with pytest.raises(st.SpecError, match="x: linear CKA is undefined for a constant embedding"):
        linear_cka(np.ones((6, 2)), np.arange(12.0).reshape(6, 2), unbiased=True)
    with pytest.raises(st.SpecError):
        linear_cka(np.ones((6, 2)), np.ones((5, 2)))


def test_zero_shot_classifier_is_open_clips_with_the_template_mean():
    """apps.align.evaluate.zero_shot_classifier = open_clip.build_zero_shot_classifier, [C, d] unit rows equal to
    the normalised mean of each class's normalised prompt embeddings, computed in eval mode."""
    import open_clip
    import torch.nn.functional as F

    from spec_torch.apps.align.evaluate import zero_shot_classifier

    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-S-32",
        pretrained=None,
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    )
    model.train()
    tokenizer = open_clip.get_tokenizer("ViT-S-32", context_length=16)
    classes, templates = ["cat", "dog", "red car"], [lambda c: f"a photo of a {c}.", lambda c: f"{c}"]
    clf = zero_shot_classifier(model, tokenizer, classes, templates)
    assert clf.shape == (3, 32) and model.training  # train mode restored
    model.eval()
    with torch.no_grad():
        z = F.normalize(model.encode_text(tokenizer([t(c) for c in classes for t in templates])), dim=1)
    want = F.normalize(z.view(3, 2, -1).mean(1), dim=1)
    assert torch.allclose(clf, want, atol=1e-5)  # float32 model
