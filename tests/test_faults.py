"""Fault cases of issue 9: hostile or unlucky input and environments, each reproduced and handled.

Every test is one case; ``bench/faults.py`` runs this module and prints the table (cases tried / handled).
CI runs as root, so what root bypasses (full disks, unwritable folders) is simulated: ``shutil.disk_usage``
is monkeypatched, and unwritable paths sit under a regular file (ENOTDIR).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import spec_torch as st
from spec_torch.data import build_dataset
from spec_torch.data.base import open_image
from spec_torch.errors import SpecError
from spec_torch.kernels import GaussianKernel, kernel_from_state

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- security: DiffCovariance state
def _filled(kx="cosine", ky=None) -> st.DiffCovariance:
    ky = ky if ky is not None else GaussianKernel(sigma="auto", rff_dim=8, seed=3)
    gen = torch.Generator().manual_seed(0)
    acc = st.DiffCovariance(kx, ky)
    for _ in range(2):
        acc.update(torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen))
    return acc


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # the default: weights_only=True


def test_covariance_state_loads_with_weights_only_and_gives_the_same_result():
    acc = _filled()
    state = _roundtrip(acc.state_dict())
    assert state["kernel_y"]["tensors"]["omega"].shape == (3, 8)
    fresh = st.DiffCovariance("cosine", GaussianKernel(sigma="auto", rff_dim=8, seed=3)).load_state_dict(
        state
    )
    assert fresh.kernel_y == acc.kernel_y and torch.equal(fresh.kernel_y._omega, acc.kernel_y._omega)
    assert fresh.n == acc.n == 32
    a, b = acc.compute(eta=1.0), fresh.compute(eta=1.0)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    # merging after a resume works: the loaded kernels equal the running ones
    fresh.merge(acc)
    assert fresh.n == 64


def test_covariance_state_refuses_other_kernels_unless_adopted():
    state = _roundtrip(_filled().state_dict())
    other = st.DiffCovariance("cosine", GaussianKernel(sigma="auto", rff_dim=8, seed=4))
    with pytest.raises(SpecError, match="state.kernel_y: the saved kernel .* does not match"):
        other.load_state_dict(state)
    assert other.kernel_y.seed == 4 and other.n == 0  # nothing was replaced
    with pytest.raises(SpecError, match="state.kernel_x"):
        st.DiffCovariance("linear", GaussianKernel(rff_dim=8, seed=3)).load_state_dict(state)
    adopted = other.load_state_dict(state, adopt_kernels=True)
    assert adopted.kernel_y.seed == 3 and adopted.n == 32


def test_covariance_state_before_the_first_batch_roundtrips():
    acc = st.DiffCovariance("linear", "cosine")
    fresh = st.DiffCovariance("linear", "cosine").load_state_dict(_roundtrip(acc.state_dict()))
    assert fresh.n == 0 and fresh.xx is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"count": 3}, "expected a DiffCovariance.state_dict"),
        ([1, 2], "expected a DiffCovariance.state_dict"),
        ("count", "missing entries|'count'"),
        ("xx", "'xx' must be a floating tensor of shape"),
        ("dims", "'dims' must be two integers"),
        ("kernel_y", "state.kernel_y: expected a saved kernel state"),
        ("omega", "saved frequencies must be float64"),
    ],
)
def test_covariance_load_of_a_bad_dict_names_the_entry(bad, match):
    if not isinstance(bad, str):
        state = bad
    else:
        state = _filled().state_dict()
        if bad == "count":
            state["count"] = -1
        elif bad == "xx":
            state["xx"] = state["xx"][:2]
        elif bad == "dims":
            state["dims"] = "5x3"
        elif bad == "kernel_y":
            state["kernel_y"] = GaussianKernel(rff_dim=8, seed=3)
        elif bad == "omega":
            state["kernel_y"] = {
                **state["kernel_y"],
                "tensors": {"omega": torch.zeros(3, 8, dtype=torch.float32)},
            }
    acc = st.DiffCovariance("cosine", GaussianKernel(sigma="auto", rff_dim=8, seed=3))
    with pytest.raises(SpecError, match=match):
        acc.load_state_dict(state)
    assert acc.n == 0


def test_kernel_state_roundtrip_every_kernel():
    x = torch.randn(12, 4, dtype=torch.float64)
    for k in (
        st.CosineKernel(),
        st.LinearKernel(),
        GaussianKernel(sigma=0.7),
        GaussianKernel(rff_dim=5).fit(x),
    ):
        back = kernel_from_state(_roundtrip(k.state_dict()))
        assert back == k and torch.allclose(back.gram(x, x), k.gram(x, x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- data: COCO, bit depth
def _coco(tmp_path, names=("000000000042.jpg", "000000000007.jpg")):
    images = tmp_path / "val2017"
    images.mkdir(parents=True, exist_ok=True)
    for name in names:
        if "/" not in name:
            Image.new("RGB", (8, 8), (200, 10, 10)).save(images / name)
    doc = {
        "images": [{"id": 42, "file_name": names[0]}, {"id": 7, "file_name": names[1]}],
        "annotations": [{"id": 1, "image_id": 42, "caption": "a"}, {"id": 2, "image_id": 7, "caption": "b"}],
    }
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps(doc))
    return images, ann


def test_coco_file_names_outside_the_root_are_refused(tmp_path):
    images, ann = _coco(tmp_path, names=("000000000042.jpg", "../../etc/passwd"))
    with pytest.raises(
        SpecError, match=r"data.annotations: .* point outside data.root .*\.\./\.\./etc/passwd"
    ):
        build_dataset("mscoco", root=str(images), annotations=str(ann))
    images, ann = _coco(tmp_path / "abs", names=("000000000042.jpg", "/etc/passwd"))
    with pytest.raises(SpecError, match="outside data.root"):
        build_dataset("mscoco", root=str(images), annotations=str(ann))
    # text samples never open the images: file names are not used, not refused
    assert len(build_dataset("mscoco", annotations=str(ann), modality="text")) == 2


def test_coco_cache_key_covers_the_image_listing(tmp_path):
    images, ann = _coco(tmp_path)
    key = build_dataset("mscoco", root=str(images), annotations=str(ann)).fingerprint()
    moved = tmp_path / "moved.jpg"
    (images / "000000000042.jpg").rename(moved)
    gone = build_dataset("mscoco", root=str(images), annotations=str(ann)).fingerprint()
    moved.rename(images / "000000000042.jpg")  # restored: the key of a listing with the file comes back
    back = build_dataset("mscoco", root=str(images), annotations=str(ann)).fingerprint()
    assert gone != key and back == key
    Image.new("RGB", (9, 9), (0, 0, 0)).save(images / "000000000007.jpg")  # replaced: another key
    assert build_dataset("mscoco", root=str(images), annotations=str(ann)).fingerprint() != key


def test_16_bit_and_float_images_convert_by_bit_depth(tmp_path):
    """A 16-bit copy (8-bit value x 257) and a float copy (value / 255) read as the 8-bit original, never
    stretched per image (a dim image stays dim)."""
    gen = np.random.default_rng(0)
    v8 = gen.integers(0, 60, size=(16, 16), dtype=np.uint8)  # a dark image: a min-max stretch would show
    Image.fromarray(v8, mode="L").save(tmp_path / "a8.png")
    Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / "a16.tiff")
    Image.fromarray(v8.astype(np.float32) / 255).save(tmp_path / "af.tiff")
    ref = np.asarray(open_image(tmp_path / "a8.png", "a8"))
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")  # really a 16-bit file
    for name in ("a16.png", "a16.tiff", "af.tiff"):
        np.testing.assert_array_equal(np.asarray(open_image(tmp_path / name, name)), ref, err_msg=name)
    # pixel-identical RGB, so every encoder gives the same features as for the 8-bit original
