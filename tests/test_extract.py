"""Feature extraction and its on-disk cache: equality with direct encoding, reuse, resume, corrupt samples,
refusal of mismatched caches, and nothing that looks complete after a crash."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from spec_torch.apps.data import build_dataset
from spec_torch.apps.data.synthetic import SyntheticShapes
from spec_torch.apps.encoders import Encoder, build_encoder
from spec_torch.apps.extract import FeatureCache, cache_folder, extract_features
from spec_torch.errors import SpecError

N = 40
FLOAT32_TOL = 1e-6  # same float32 ops, possibly different batch grouping


pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(Encoder):
    """Wraps an encoder (same family, same cache key) and counts the rows it embeds."""

    def __init__(self, inner: Encoder, nan_rows: int = 0):
        super().__init__()
        self.inner, self.rows, self.nan_rows = inner, 0, nan_rows
        self.family, self.modality, self.embed_dim = inner.family, inner.modality, inner.embed_dim

    def preprocess(self, raw):
        return self.inner.preprocess(raw)

    def collate(self, items):
        return self.inner.collate(items)

    def forward(self, batch):
        self.rows += batch.shape[0]
        z = self.inner(batch)
        if self.nan_rows:
            z[: self.nan_rows] = float("nan")
        return z

    def cache_key(self):
        return self.inner.cache_key()


class Flaky(SyntheticShapes):
    """The synthetic dataset (same fingerprint) that dies at sample ``fail_at`` while ``armed``."""

    armed = False
    fail_at = 10**9

    def load(self, i):
        if self.armed and i >= self.fail_at:
            raise RuntimeError("simulated crash")
        return super().load(i)


def direct(ds, enc, rows=None):
    """Oracle: the encoder applied to each sample, no cache, no DataLoader."""
    rows = range(len(ds)) if rows is None else rows
    with torch.inference_mode():
        return np.concatenate([enc(enc.collate([enc.preprocess(ds[i])])).numpy() for i in rows])


def test_extract_equals_direct_encoding_and_is_reused(tmp_path):
    ds = build_dataset("synthetic", n=N, seed=1)
    enc = Counting(build_encoder("offline_colour"))
    cache = extract_features(ds, enc, tmp_path, batch_size=8, chunk_rows=16, progress=False)
    assert isinstance(cache, FeatureCache) and isinstance(cache.features, np.memmap)
    assert cache.ids == ds.ids and cache.skipped == [] and (cache.n, cache.dim) == (N, enc.embed_dim)
    assert cache.features.dtype == np.float32
    np.testing.assert_allclose(cache.features, direct(ds, enc.inner), atol=FLOAT32_TOL)
    assert enc.rows == N
    again = extract_features(ds, enc, tmp_path, batch_size=5, progress=False)  # finished: reused as is
    assert enc.rows == N and again.path == cache.path
    np.testing.assert_array_equal(again.features, cache.features)
    # iter_batches: all rows in order, or chosen rows in the given order
    np.testing.assert_array_equal(torch.cat(list(cache.iter_batches(None, 7))).numpy(), cache.features)
    rows = np.array([5, 1, 39, 1])
    got = torch.cat(list(cache.iter_batches(rows, 3)))
    assert got.shape == (4, enc.embed_dim)
    np.testing.assert_array_equal(got.numpy(), cache.features[rows])
    with pytest.raises(SpecError, match="rows: expected indices"):
        next(cache.iter_batches(np.array([N]), 3))


def test_resume_after_interruption_computes_only_the_rest(tmp_path):
    ref = extract_features(
        build_dataset("synthetic", n=N, seed=2),
        build_encoder("offline_shape"),
        tmp_path / "ref",
        progress=False,
    )
    ds = Flaky(n=N, seed=2)
    ds.armed, ds.fail_at = True, 27
    enc = Counting(build_encoder("offline_shape"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(ds, enc, tmp_path / "c", batch_size=4, chunk_rows=8, progress=False)
    folder = cache_folder(ds, enc, tmp_path / "c")
    assert not (folder / "complete.json").exists() and not (folder / "features.npy").exists()
    done = json.loads((folder / "manifest.json").read_text())["rows_done"]
    assert done == 24  # checkpoints at 8, 16, 24; the batch 24..27 died
    ds.armed = False
    enc.rows = 0
    cache = extract_features(ds, enc, tmp_path / "c", batch_size=4, chunk_rows=8, progress=False)
    assert enc.rows == N - done  # only the remaining rows were computed
    assert cache.ids == ref.ids
    np.testing.assert_allclose(cache.features, ref.features, atol=FLOAT32_TOL)
    assert not (folder / "partial.npy").exists()


def _folder_with_corrupt_image(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"im{k}.png")
    (root / "im3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return build_dataset("imagefolder", root=str(root))


def test_corrupt_images_are_skipped_and_recorded(tmp_path):
    ds = _folder_with_corrupt_image(tmp_path)
    enc = build_encoder("offline_colour", image_size=24)
    with pytest.warns(RuntimeWarning, match="skipping corrupt sample 'im3.png'"):
        cache = extract_features(ds, enc, tmp_path / "c", batch_size=4, progress=False)
    assert cache.skipped == ["im3.png"]
    assert cache.ids == ["im0.png", "im1.png", "im2.png", "im4.png", "im5.png"]
    np.testing.assert_allclose(cache.features, direct(ds, enc, [0, 1, 2, 4, 5]), atol=FLOAT32_TOL)
    again = extract_features(ds, enc, tmp_path / "c", progress=False)  # reused, skip list kept
    assert again.skipped == ["im3.png"] and again.n == 5


def test_mismatched_cache_is_refused(tmp_path):
    ds = build_dataset("synthetic", n=12, seed=0)
    enc = build_encoder("offline_colour")
    cache = extract_features(ds, enc, tmp_path, progress=False)
    ids_file = cache.path / "ids.txt"
    ids_file.write_text(ids_file.read_text().replace("syn:3\n", "syn:99\n"))
    with pytest.raises(SpecError, match="does not match the dataset.*delete that folder"):
        extract_features(ds, enc, tmp_path, progress=False)
    # an unfinished cache written for other ids is refused too
    ds2 = Flaky(n=12, seed=5)
    ds2.armed, ds2.fail_at = True, 6
    with pytest.raises(RuntimeError):
        extract_features(ds2, enc, tmp_path, batch_size=2, chunk_rows=2, progress=False)
    folder = cache_folder(ds2, enc, tmp_path)
    (folder / "all_ids.txt").write_text("".join(f"other:{i}\n" for i in range(12)))
    ds2.armed = False
    with pytest.raises(SpecError, match="unfinished feature cache .* refusing to resume"):
        extract_features(ds2, enc, tmp_path, progress=False)


def test_nan_embeddings_fail_and_leave_no_complete_cache(tmp_path):
    ds = build_dataset("synthetic", n=8, seed=0)
    enc = Counting(build_encoder("offline_colour"), nan_rows=1)
    with pytest.raises(SpecError, match=r"NaN/Inf embeddings for sample\(s\) \['syn:0'\]"):
        extract_features(ds, enc, tmp_path, batch_size=4, progress=False)
    assert not (cache_folder(ds, enc, tmp_path) / "complete.json").exists()


def test_bad_arguments(tmp_path):
    ds = build_dataset("synthetic", n=4)
    with pytest.raises(SpecError, match="a text encoder .* cannot embed the image samples"):
        extract_features(ds, build_encoder("minilm"), tmp_path, progress=False)
    enc = build_encoder("offline_shape")
    with pytest.raises(SpecError, match="batch_size: expected an integer >= 1"):
        extract_features(ds, enc, tmp_path, batch_size=0)
    with pytest.raises(SpecError, match="device"):
        extract_features(ds, enc, tmp_path, device="tpu")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpecError, match="cache_dir: cannot create"):
        extract_features(ds, enc, blocker / "sub", progress=False)


def test_workers_give_the_same_features(tmp_path):
    ds = build_dataset("synthetic", n=24, seed=3)
    enc = build_encoder("offline_shape")
    a = extract_features(ds, enc, tmp_path / "a", batch_size=8, num_workers=0, progress=False)
    b = extract_features(ds, enc, tmp_path / "b", batch_size=8, num_workers=2, progress=False)
    np.testing.assert_array_equal(a.features, b.features)


@pytest.mark.gpu
def test_cuda_extraction_matches_cpu(tmp_path):
    ds = build_dataset("synthetic", n=32, seed=0)
    enc = build_encoder(
        "timm", model="vit_small_patch14_dinov2.lvd142m", img_size=28, model_kwargs={"depth": 2}
    )
    cpu = extract_features(ds, enc, tmp_path / "cpu", device="cpu", progress=False)
    gpu = extract_features(ds, enc, tmp_path / "gpu", device="cuda", amp=False, progress=False)
    assert gpu.meta["precision"] == "fp32"
    np.testing.assert_allclose(gpu.features, cpu.features, rtol=1e-3, atol=1e-3)
    amp = extract_features(ds, enc, tmp_path / "gpu", device="cuda", amp=True, progress=False)
    assert amp.meta["precision"].startswith("amp") and amp.path != gpu.path  # one cache per precision
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in (amp.features, cpu.features)]
    assert (unit[0] * unit[1]).sum(1).min() > 0.99


def test_crash_while_finishing_leaves_no_complete_cache_and_rerun_finishes(tmp_path, monkeypatch):
    import spec_torch.apps.extract as ex

    ds = _folder_with_corrupt_image(tmp_path)
    enc = Counting(build_encoder("offline_colour", image_size=24))
    real_write = ex.atomic_write_text

    def dying_write(path, text):
        if path.name == "complete.json":
            raise OSError("disk full")
        real_write(path, text)

    monkeypatch.setattr(ex, "atomic_write_text", dying_write)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(SpecError, match=r"writing the feature cache .* failed \(disk full\)"),
    ):
        extract_features(ds, enc, tmp_path / "c", batch_size=4, progress=False)
    folder = cache_folder(ds, enc, tmp_path / "c")
    assert (folder / "features.npy").exists() and not (folder / "complete.json").exists()
    with pytest.raises(SpecError, match="no finished feature cache"):
        FeatureCache.load(folder)
    monkeypatch.setattr(ex, "atomic_write_text", real_write)
    enc.rows = 0
    cache = extract_features(ds, enc, tmp_path / "c", batch_size=4, progress=False)
    assert enc.rows == 0  # every row was already done: only the finishing steps ran again
    assert cache.skipped == ["im3.png"] and cache.n == 5
    np.testing.assert_allclose(cache.features, direct(ds, enc.inner, [0, 1, 2, 4, 5]), atol=FLOAT32_TOL)


def test_encoder_with_wrong_width_is_reported(tmp_path):
    ds = build_dataset("synthetic", n=4)
    enc = build_encoder("offline_colour")
    enc.embed_dim = 10  # claims 10, returns 36
    with pytest.raises(SpecError, match=r"returned shape \(4, 36\) for a batch of 4, expected \[4, 10\]"):
        extract_features(ds, enc, tmp_path, progress=False)


def test_cache_lock_names_its_holder_times_out_and_dies_with_it(tmp_path):
    """The cache lock is an OS lock: a live holder makes others wait ``lock_timeout`` and then fail naming it
    (host, pid); killed with -9, the kernel releases it; garbage or a live unrelated pid in the lock files
    blocks nobody."""
    import socket
    import subprocess
    import sys

    ds = build_dataset("synthetic", n=6)
    enc = build_encoder("offline_colour")
    folder = cache_folder(ds, enc, tmp_path)
    folder.mkdir(parents=True)
    lock, holder = folder / ".lock", folder / ".lock.holder"
    lock.write_text("garbage \x00")  # content does not matter
    holder.write_text(f"{socket.gethostname()} {os.getpid()}")  # a live pid that does not hold the lock
    cache = extract_features(ds, enc, tmp_path, progress=False, lock_timeout=0.2)
    assert cache.n == 6 and not holder.exists()
    shutil.rmtree(folder)
    folder.mkdir()
    code = (
        "import os, socket, sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
        "open(sys.argv[2], 'w').write(f'{socket.gethostname()} {os.getpid()}'); print('held', flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(lock), str(holder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        pattern = (
            rf"process {proc.pid} on host {socket.gethostname()} has held the lock .* cache_lock_timeout"
        )
        with pytest.raises(SpecError, match=pattern):
            extract_features(ds, enc, tmp_path, progress=False, lock_timeout=0.2)
        assert not (folder / "complete.json").exists()
    finally:
        proc.kill()
        proc.wait()
    cache = extract_features(ds, enc, tmp_path, progress=False, lock_timeout=5)  # the kernel released it
    assert cache.n == 6
