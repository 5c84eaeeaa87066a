"""Fault cases of issue 9: hostile or unlucky input and environments, each reproduced and handled.

Every test is one case; ``bench/faults.py`` runs this module and prints the table (cases tried / handled).
CI runs as root, so what root bypasses (full disks, unwritable folders) is simulated: ``shutil.disk_usage``
is monkeypatched, and unwritable paths sit under a regular file (ENOTDIR).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gloo_group, spawn_gloo
from omegaconf import OmegaConf
from PIL import Image

import spec_torch as st
from spec_torch.apps import cli
from spec_torch.apps import sharding as sd
from spec_torch.apps._io import atomic_torch_save, atomic_write_text
from spec_torch.apps.cli import run_guarded
from spec_torch.apps.data import build_dataset
from spec_torch.apps.data.base import open_image
from spec_torch.apps.encoders import Encoder, build_encoder
from spec_torch.apps.extract import cache_folder, extract_features
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


# --------------------------------------------------------------------- caches that verify themselves
class _Counting(Encoder):
    """The offline colour encoder (same cache key), counting the rows it embeds."""

    def __init__(self):
        super().__init__()
        self.inner, self.rows = build_encoder("offline_colour", image_size=16), 0
        self.family, self.modality, self.embed_dim = self.inner.family, "image", self.inner.embed_dim

    def preprocess(self, raw):
        return self.inner.preprocess(raw)

    def collate(self, items):
        return self.inner.collate(items)

    def forward(self, batch):
        self.rows += batch.shape[0]
        return self.inner(batch)

    def cache_key(self):
        return self.inner.cache_key()


def _extract(tmp_path, enc=None, **kw):
    ds = build_dataset("synthetic", n=24, image_size=32)
    enc = enc or _Counting()
    kw = {"batch_size": 4, "chunk_rows": 8, "progress": False, **kw}
    return ds, enc, extract_features(ds, enc, tmp_path / "c", **kw)


def _interrupted(tmp_path, after_rows: int):
    """An extraction killed after ``after_rows`` rows (the manifest holds the chunks before)."""
    ds = build_dataset("synthetic", n=24, image_size=32)
    enc = _Counting()
    forward = enc.forward

    def dying(batch):
        if enc.rows >= after_rows:
            raise KeyboardInterrupt
        return forward(batch)

    enc.forward = dying
    with pytest.raises(KeyboardInterrupt):
        extract_features(ds, enc, tmp_path / "c", batch_size=4, chunk_rows=8, progress=False)
    return ds, cache_folder(ds, enc, tmp_path / "c")


def test_cache_with_overwritten_rows_is_refused_on_reuse(tmp_path):
    ds, enc, cache = _extract(tmp_path)
    feats = np.load(cache.path / "features.npy", mmap_mode="r+")
    feats[5] += 0.01  # a silent edit of one row
    feats.flush()
    del feats
    with pytest.raises(SpecError, match=rf"{cache.path.name} was changed after it was written.*rows 0\.\.23"):
        _extract(tmp_path)


def test_cache_resume_re_extracts_a_truncated_or_changed_partial(tmp_path):
    ds, folder = _interrupted(tmp_path, after_rows=20)  # chunks [0, 8), [8, 16) checkpointed
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows_done"] == 16 and len(manifest["chunks"]) == 2
    partial = folder / "partial.npy"
    with open(partial, "r+b") as fh:  # cut the file inside the second chunk
        fh.truncate(partial.stat().st_size - (24 - 12) * 36 * 4)
    enc = _Counting()
    cache = extract_features(ds, enc, tmp_path / "c", batch_size=4, chunk_rows=8, progress=False)
    assert enc.rows == 16  # rows 8..23 again: the cut chunk and the rest; chunk [0, 8) kept
    ref = _Counting()
    np.testing.assert_array_equal(cache.features, _extract(tmp_path / "ref", ref)[2].features)
    assert np.abs(cache.features[8:16]).sum(axis=1).min() > 0  # no zero-padded rows


def test_cache_resume_re_extracts_a_chunk_changed_on_disk(tmp_path):
    ds, folder = _interrupted(tmp_path, after_rows=20)
    src = np.load(folder / "partial.npy", mmap_mode="r+")
    src[2] = 0  # first chunk damaged
    src.flush()
    del src
    enc = _Counting()
    cache = extract_features(ds, enc, tmp_path / "c", batch_size=4, chunk_rows=8, progress=False)
    assert enc.rows == 24
    assert np.abs(cache.features[2]).sum() > 0


@pytest.mark.parametrize(
    "damage, match",
    [
        ("features_empty", "missing, empty or truncated features.npy"),
        ("features_cut", "missing, empty or truncated features.npy"),
        ("complete_json", "broken complete.json"),
        ("ids_missing", "missing or unreadable ids.txt"),
        ("ids_latin1", "missing or unreadable ids.txt"),
    ],
)
def test_broken_cache_files_are_one_error_naming_the_folder(tmp_path, damage, match):
    ds, enc, cache = _extract(tmp_path)
    folder = cache.path
    if damage == "features_empty":
        (folder / "features.npy").write_bytes(b"")
    elif damage == "features_cut":
        data = (folder / "features.npy").read_bytes()
        (folder / "features.npy").write_bytes(data[: len(data) // 2])
    elif damage == "complete_json":
        (folder / "complete.json").write_text("{not json")
    elif damage == "ids_missing":
        (folder / "ids.txt").unlink()
    elif damage == "ids_latin1":
        (folder / "ids.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match=rf"cache_dir: the feature cache .*{folder.name}.*{match}.*delete"):
        _extract(tmp_path)


def test_broken_manifest_is_one_error_naming_the_folder(tmp_path):
    ds, folder = _interrupted(tmp_path, after_rows=12)
    (folder / "manifest.json").write_text("[1, 2")
    with pytest.raises(SpecError, match=rf"{folder.name} has a broken manifest.json"):
        _extract(tmp_path)


# ----------------------------------------------------------------------------------------- full disk
def test_full_disk_is_refused_before_extracting(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(SpecError, match=r"cache_dir: .* GiB free, the 24 x 36 float32 features need"):
        _extract(tmp_path)


def test_disk_full_while_writing_is_one_error_and_stays_resumable(tmp_path, monkeypatch):
    """ENOSPC on a write (what a sparse memory map turned into SIGBUS) -> SpecError; a rerun resumes."""
    real, calls = os.pwrite, {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:  # 3 batches of 4 rows written: the chunk [0, 8) is checkpointed
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(
        SpecError, match=r"writing the feature cache .* failed \(No space left on device\); the 8 of 24"
    ):
        _extract(tmp_path)
    monkeypatch.setattr(os, "pwrite", real)
    enc = _Counting()
    _, _, cache = _extract(tmp_path, enc)
    assert enc.rows == 16 and cache.n == 24  # the checkpointed chunk was kept


def test_fallocate_enospc_is_one_error(tmp_path, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SpecError, match=r"cannot reserve .* GiB for the feature cache .*No space left"):
        _extract(tmp_path)


# ---------------------------------------------------------------------------- run folders and atomic writes
def _guarded(cfg, run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(run, OmegaConf.create(cfg))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_failed_rerun_leaves_no_result_of_the_previous_run(tmp_path, capsys):
    from spec_torch.apps._io import begin_outputs

    begin_outputs(tmp_path)  # the earlier run: its outputs are listed in its manifest
    atomic_write_text(tmp_path / "spec.json", "{}")
    atomic_write_text(tmp_path / "report.html", "old")

    def invalid(cfg):
        raise SpecError("eta: expected a positive number, got -1")

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, invalid, capsys)
    assert "eta" in err and not (tmp_path / "spec.json").exists() and not (tmp_path / "report.html").exists()


def test_seed_abc_is_one_error_line(tmp_path, capsys):
    err = _guarded({"output_dir": str(tmp_path), "seed": "abc"}, lambda cfg: None, capsys)
    assert "seed: expected an integer, got 'abc'" in err


def test_full_output_disk_is_one_error_line_naming_the_file(tmp_path, capsys):
    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.html"))

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, full, capsys)
    assert "report.html: No space left on device" in err
    with pytest.raises(ValueError):  # a bug stays a traceback
        run_guarded(lambda cfg: int("x"), OmegaConf.create({"output_dir": str(tmp_path), "seed": 0}))


def test_unwritable_hydra_run_dir_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli._check_run_dir([f"hydra.run.dir={blocker / 'run'}"])  # ENOTDIR: what root cannot bypass
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: hydra.run.dir: cannot create")
    cli._check_run_dir([f"hydra.run.dir={tmp_path / 'ok' / 'run'}"])  # a writable one passes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == want
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == want


def test_stale_temporaries_of_the_target_are_cleaned(tmp_path):
    import socket
    import subprocess
    import sys

    host = socket.gethostname().replace(".", "_")
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )
    killed = tmp_path / f".last.pt.{host}.{dead}.abc123.tmp"  # a writer killed mid-write
    killed.write_bytes(b"\0" * 1024)
    live = tmp_path / f".last.pt.{host}.{os.getpid()}.zzz.tmp"  # this process: still writing
    live.write_bytes(b"")
    foreign = tmp_path / ".last.pt.otherhost.1.q.tmp"  # another host, recent: maybe still writing
    foreign.write_bytes(b"")
    legacy = tmp_path / ".last.pt.k3j4l5.tmp"  # an old-layout temporary, two hours old
    legacy.write_bytes(b"")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    other = tmp_path / f".other.pt.{host}.{dead}.x.tmp"  # another target: not ours to clean
    other.write_bytes(b"")
    atomic_torch_save({"step": 1}, tmp_path / "last.pt")
    assert not killed.exists() and not legacy.exists()
    assert live.exists() and foreign.exists() and other.exists()


# ----------------------------------------------------------- distributed: errors agreed by every rank
DIST_TIMEOUT_S = 60  # the whole 2-process run; each case finishes in seconds when the ranks agree


def _expect_same_error(rank: int, case: str, fn, pattern: str, out: str) -> None:
    try:
        fn()
    except SpecError as exc:
        assert re.search(pattern, str(exc)), str(exc)
        Path(out, f"{case}.rank{rank}").write_text(str(exc))
    else:
        raise AssertionError(f"rank {rank}: no SpecError in {case}")


def _w_one_rank_fails(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, port, world=2, timeout_s=DIST_TIMEOUT_S):
        _one_rank_fails_cases(rank, out)


def _one_rank_fails_cases(rank: int, out: str) -> None:
    """Each case: a check fails on one rank only; every rank must raise the same SpecError (no hang)."""
    sd.agree(None)  # nobody failed: returns on every rank
    _expect_same_error(
        rank,
        "agree",
        lambda: sd.agree(SpecError("x: bad") if rank == 1 else None),
        r"x: bad \(on rank 1\)",
        out,
    )
    x = torch.randn(1 if rank == 0 else 50, 3)  # rank 0 has one row: sigma='auto' cannot be chosen
    _expect_same_error(
        rank,
        "fit_on_main",
        lambda: sd.fit_on_main(GaussianKernel(rff_dim=4), x),
        r"sigma='auto': needs at least 2",
        out,
    )
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(20, 4, generator=g, dtype=torch.float64),
        torch.randn(20, 3, generator=g, dtype=torch.float64),
    )
    res = st.spec(x, y, kernel_x="linear", kernel_y="linear", method="features")
    mine = (x[:10], y[:10]) if rank == 0 else (x[10:, :2], y[10:])  # rank 1: wrong width
    _expect_same_error(
        rank,
        "top_samples",
        lambda: res.top_samples(mine, k=3, offset=10 * rank, sync_dist=True),
        r"\(on rank 1\)",
        out,
    )
    top = res.top_samples(
        (x[10 * rank : 10 * rank + 10], y[10 * rank : 10 * rank + 10]), k=3, offset=10 * rank, sync_dist=True
    )
    assert top.indices.shape[1] == 3  # the group still works after the agreed errors

    # a DiffCovariance fitting sigma='auto' on each rank's first batch: rank 1's batch has one row. Its update
    # keeps the error and compute() raises it on both ranks (rank 0 would otherwise wait in the collectives)
    acc = st.DiffCovariance(GaussianKernel(rff_dim=4), "cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about fitting on a first batch
        acc.update(*((x, y) if rank == 0 else (x[:1, :], y[:1])))
    _expect_same_error(rank, "first_batch_fit", lambda: acc.compute(), r"sigma='auto'.*\(on rank 1\)", out)


def test_a_check_failing_on_one_rank_raises_on_every_rank(tmp_path):
    """agree(), fit_on_main (sigma='auto' on rank 0's single row), top_samples(sync_dist=True) with a bad
    batch on rank 1, DiffCovariance fitted on a one-row first batch of rank 1: the same SpecError on both
    ranks, within seconds of the failure (one 2-process run)."""
    spawn_gloo(_w_one_rank_fails, str(tmp_path), world=2, timeout_s=DIST_TIMEOUT_S)
    for case in ("agree", "fit_on_main", "top_samples", "first_batch_fit"):
        msgs = [(tmp_path / f"{case}.rank{r}").read_text() for r in (0, 1)]
        assert msgs[0] == msgs[1], case


def test_collective_timeout_is_configurable(monkeypatch):
    assert sd.collective_timeout_s() == 1800.0
    monkeypatch.setenv("SPEC_TORCH_DIST_TIMEOUT_S", "90")
    assert sd.collective_timeout_s() == 90.0
    monkeypatch.setenv("SPEC_TORCH_DIST_TIMEOUT_S", "soon")
    with pytest.raises(SpecError, match="SPEC_TORCH_DIST_TIMEOUT_S: expected a positive number"):
        sd.collective_timeout_s()
    with pytest.raises(SpecError, match="timeout_s: expected a positive number"):
        monkeypatch.setattr(sd, "torchrun_env", lambda: {"rank": 0, "world_size": 1, "local_rank": 0})
        sd.init_distributed(timeout_s=0)


# ------------------------------------------------------------------ bad input: SpecError naming the argument
@pytest.mark.parametrize(
    "value, match",
    [
        (
            np.ones((4, 3), dtype=np.longdouble),
            r"x: numpy dtype float128 has no torch equivalent|x: numpy dtype",
        ),
        (torch.empty(4, 3, device="meta"), r"x: expected a dense tensor with data, got a meta tensor"),
        (torch.eye(4).to_sparse(), r"x: expected a dense tensor with data, got a torch.sparse_coo tensor"),
    ],
    ids=["longdouble", "meta", "sparse"],
)
def test_unusable_arrays_are_refused_naming_the_argument(value, match):
    with pytest.raises(SpecError, match=match):
        st.spec(value, np.ones((4, 2)))


def test_batch_size_zero_and_cuda_without_cuda_are_refused():
    x = torch.randn(8, 3)
    with pytest.raises(SpecError, match="batch_size: expected a positive integer, got 0"):
        st.spec(x, x, method="features", batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="device: 'cuda' was asked for but CUDA is not available"):
            st.DiffCovariance(device="cuda")


# --------------------------------------------------------------------------------- messages of compare
def _compare(tmp_path, x, y, *extra):
    from hydra import compose, initialize_config_dir

    from spec_torch.apps.compare import run

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "ids.txt").write_text("".join(f"img{i:03d}\n" for i in range(len(x))))
    overrides = [
        "data=features",
        f"data.x_path={tmp_path / 'x.npy'}",
        f"data.y_path={tmp_path / 'y.npy'}",
        f"data.ids_path={tmp_path / 'ids.txt'}",
        "report=false",
        "progress=false",
        "top_k=1",
        "samples_per_mode=3",
        f"output_dir={tmp_path / 'out'}",
        *extra,
    ]
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "spec_torch" / "apps" / "configs" / "compare"),
        version_base="1.3",
    ):
        cfg = compose(config_name="compare", overrides=overrides)
    return run(cfg)


def test_compare_errors_name_the_config_key_and_the_sample(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    with pytest.raises(SpecError, match=r"^solve_top_k: asks for 30 modes"):
        _compare(tmp_path, x, y, "solve_top_k=30", "stream_batch_size=16")
    with pytest.raises(SpecError, match=r"^metrics.mutual_knn_k: expected an integer >= 1, got 0"):
        _compare(tmp_path, x, y, "metrics.mutual_knn_k=0")
    x[37] = 0  # a zero row in the third streamed batch (rows 32..39): named by its sample id
    with pytest.raises(SpecError, match=r"first: sample 'img037', paired row 37"):
        _compare(tmp_path, x, y, "stream_batch_size=16", "method=features")


def test_a_nan_written_into_a_cache_names_the_cache(tmp_path):
    _, _, cache = _extract(tmp_path)
    feats = np.load(cache.path / "features.npy", mmap_mode="r+")
    feats[3, 0] = np.nan
    feats.flush()
    del feats
    with pytest.raises(
        SpecError, match=rf"feature cache .*{cache.path.name} was changed after it was written"
    ):
        _extract(tmp_path)


def test_align_demo_writes_a_fresh_folder_per_run():
    """``make align-demo`` must not silently continue an earlier demo run: its run dir is per run."""
    preset = OmegaConf.load(
        Path(__file__).resolve().parents[1]
        / "spec_torch"
        / "apps"
        / "configs"
        / "align"
        / "experiment"
        / "align_tiny.yaml"
    )
    run_dir = OmegaConf.to_container(preset, resolve=False)["hydra"]["run"]["dir"]
    assert run_dir.startswith("outputs/align_tiny/") and "${now:" in run_dir
