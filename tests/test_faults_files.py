"""Fault cases of issue 19, part 1: shared folders that cannot be turned against the user, files spec-torch
did not write left alone, no hang or memory blow-up from an image folder, odd file names skipped.

Every test is one case; ``bench/faults.py`` runs this module beside ``tests/test_faults.py`` and prints the
table. Each docstring says how today's main fails the case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from spec_torch.apps._io import (
    OUTPUTS_MANIFEST,
    atomic_open,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    begin_outputs,
    clear_previous_outputs,
    open_nofollow,
)
from spec_torch.apps.cli import run_guarded
from spec_torch.apps.data import build_dataset
from spec_torch.apps.data.base import MAX_ASPECT_RATIO, CorruptSample, open_image
from spec_torch.apps.encoders import build_encoder
from spec_torch.apps.extract import cache_folder, extract_features
from spec_torch.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PRECIOUS = "the user's own file\n"


def _images(folder: Path, n: int = 4, size: tuple[int, int] = (20, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", size, (40 * k, 90, 200 - 30 * k)).save(folder / f"im{k}.png")
    return folder


def _encoder():
    return build_encoder("offline_colour", image_size=16)


def _guarded(cfg: dict, run, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(run, OmegaConf.create(cfg))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------ writing through a planted link
@pytest.mark.parametrize("name", ["partial.npy", "all_ids.txt", "manifest.json", ".lock.holder"])
def test_a_link_planted_in_a_cache_folder_is_refused_and_the_outside_file_kept(tmp_path, name):
    """Planted link in a cache folder: refused in one line, the file it points to untouched.

    A link planted in a cache folder (``partial.npy`` -> a file elsewhere) is refused naming it. On main the run exits 0 and overwrites that file with features
    (``partial.npy``), or silently replaces the link (the others)."""
    ds, enc = build_dataset("imagefolder", root=str(_images(tmp_path / "img"))), _encoder()
    folder = cache_folder(ds, enc, tmp_path / "cache")
    folder.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    (folder / name).symlink_to(victim)
    with pytest.raises(SpecError, match=rf"cache_dir: .*{name} is a symbolic link.*remove it"):
        extract_features(ds, enc, tmp_path / "cache", progress=False)
    assert victim.read_text() == PRECIOUS


def test_a_linked_lock_file_is_one_error_line(tmp_path, capsys):
    """Planted link as the cache's ``.lock``: one ``error:`` line naming it (main: an ELOOP traceback)."""
    ds, enc = build_dataset("imagefolder", root=str(_images(tmp_path / "img"))), _encoder()
    folder = cache_folder(ds, enc, tmp_path / "cache")
    folder.mkdir(parents=True)
    (folder / ".lock").symlink_to(tmp_path / "elsewhere")

    def extract(cfg):
        extract_features(ds, enc, tmp_path / "cache", progress=False)

    err = _guarded({"output_dir": str(tmp_path / "out"), "seed": 0}, extract, capsys)
    assert ".lock is a symbolic link" in err and not (tmp_path / "elsewhere").exists()


def test_cache_and_output_folders_that_are_links_keep_working(tmp_path):
    """A cache or output folder that is itself a link (``~/.cache`` -> scratch) keeps working.

    Extraction, reuse, recorded outputs. (Main passes this too; it guards the O_NOFOLLOW changes.)"""
    ds, enc = build_dataset("imagefolder", root=str(_images(tmp_path / "img"))), _encoder()
    (tmp_path / "scratch").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "scratch")
    first = extract_features(ds, enc, tmp_path / "cache", progress=False)
    again = extract_features(ds, enc, tmp_path / "cache", progress=False)  # reused, verified
    np.testing.assert_array_equal(first.features, again.features)
    (tmp_path / "real_out").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real_out")
    begin_outputs(tmp_path / "out")
    atomic_write_text(tmp_path / "out" / "plots" / "a.png", "png")
    listed = json.loads((tmp_path / "real_out" / OUTPUTS_MANIFEST).read_text())
    assert listed["outputs"] == ["plots/a.png"]


def test_a_link_planted_in_an_output_folder_is_refused(tmp_path):
    """Planted link in an output folder (``report.html``, a plot): refused naming it, its target untouched.

    The write is refused naming it, the file it points to is untouched (main: the link is silently replaced, no refusal)."""
    out = tmp_path / "out"
    begin_outputs(out)
    victim = tmp_path / "victim.html"
    victim.write_text(PRECIOUS)
    out.mkdir(exist_ok=True)
    (out / "report.html").symlink_to(victim)
    with pytest.raises(SpecError, match=r"output_dir: .*report.html is a symbolic link"):
        atomic_write_text(out / "report.html", "<html>")
    (out / "plots").mkdir()
    (out / "plots" / "spectrum.png").symlink_to(victim)
    with (
        pytest.raises(SpecError, match=r"spectrum.png is a symbolic link"),
        atomic_open(out / "plots" / "spectrum.png"),
    ):
        pass
    assert victim.read_text() == PRECIOUS and (out / "report.html").is_symlink()


def test_a_fifo_or_link_opened_in_place_is_refused_without_waiting(tmp_path):
    """A FIFO or link where a file is written in place: refused at once, never waited on or written through.

    Files written in place (the cache's ``partial.npy``, ``train.csv``) open with ``O_NOFOLLOW`` and must be
    regular files: a FIFO would block ``open`` forever, a link would redirect the write (new helper; main
    opens them with plain ``open``)."""
    os.mkfifo(tmp_path / "fifo")
    for mode in ("rb", "ab", "r+b"):
        with pytest.raises(SpecError, match="fifo is not a regular file"):
            open_nofollow(tmp_path / "fifo", mode)
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(SpecError, match="link is a symbolic link"):
        open_nofollow(tmp_path / "link", "ab")
    assert not (tmp_path / "target").exists()


# --------------------------------------------------------------------- deleting files spec-torch did not write
def test_the_users_files_in_an_output_folder_survive_a_failing_run(tmp_path, capsys):
    """The user's own report.html and results.json in the output folder survive a failing run.

    Main deletes both at start."""
    for name in ("report.html", "results.json", "spec.json"):
        (tmp_path / name).write_text(PRECIOUS)

    def invalid(cfg):
        raise SpecError("data.root: no such file or directory: /nowhere")

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, invalid, capsys)
    assert "data.root" in err
    assert all((tmp_path / n).read_text() == PRECIOUS for n in ("report.html", "results.json", "spec.json"))


def test_a_file_of_the_runs_name_that_no_manifest_lists_is_not_overwritten(tmp_path):
    """The user's own spec.json where a run writes its own: refused naming it, kept (main overwrites)."""
    (tmp_path / "spec.json").write_text(PRECIOUS)
    begin_outputs(tmp_path)
    with pytest.raises(SpecError, match=r"spec.json already exists and no spec-torch run .* wrote it"):
        atomic_write_json(tmp_path / "spec.json", {"spec_diff": 1.0})
    assert (tmp_path / "spec.json").read_text() == PRECIOUS
    atomic_write_json(tmp_path / "matrix.json", {"n": 1})  # a new name is fine, and listed
    begin_outputs(tmp_path)  # a rerun removes it, and nothing else
    assert not (tmp_path / "matrix.json").exists() and (tmp_path / "spec.json").read_text() == PRECIOUS
    from spec_torch.apps.compare import run

    with pytest.raises(SpecError, match=r"spec.json already exists"):  # before any work: no data given
        run(
            {
                "output_dir": str(tmp_path),
                "data": "features",
                "data.x_path": "/no.npy",
                "data.y_path": "/no.npy",
            }
        )
    assert (tmp_path / "spec.json").read_text() == PRECIOUS


def _compare(out: Path, x: Path, y: Path) -> None:
    from spec_torch.apps.compare import run

    run(["data=features", f"data.x_path={x}", f"data.y_path={y}", f"output_dir={out}", "top_k=2"])


def test_a_failed_rerun_removes_the_earlier_runs_outputs_and_only_those(tmp_path, capsys):
    """A failed rerun removes the earlier run's outputs (its manifest) and nothing else.

    A finished compare run, then a rerun in the same folder that fails: the earlier run's ``spec.json``,
    ``report.html`` and plots are gone (main leaves its plots behind, unmarked), the user's files, Hydra's
    ``.hydra/`` and log stay; the manifest lists exactly the files a run wrote."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(40, 5)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.normal(size=(40, 3)).astype(np.float32))
    np.save(tmp_path / "short.npy", rng.normal(size=(30, 3)).astype(np.float32))
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (out / "compare.log").write_text("log\n")
    (out / "notes.txt").write_text(PRECIOUS)
    _compare(out, tmp_path / "x.npy", tmp_path / "y.npy")
    listed = json.loads((out / OUTPUTS_MANIFEST).read_text())["outputs"]
    on_disk = sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    assert sorted(listed) == sorted(set(on_disk) - {".hydra/config.yaml", "compare.log", "notes.txt"})
    assert "spec.json" in listed and any(p.startswith("plots/") for p in listed)
    (out / "plots" / "mine.png").write_text(PRECIOUS)

    def failing(cfg):
        _compare(out, tmp_path / "x.npy", tmp_path / "short.npy")  # rows differ: refused

    _guarded({"output_dir": str(out), "seed": 0}, failing, capsys)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == [".hydra/config.yaml", "compare.log", "notes.txt", "plots/mine.png"], left


def test_a_tampered_manifest_deletes_nothing_outside_the_run(tmp_path):
    """A tampered manifest of outputs deletes nothing outside the run folder.

    A manifest listing ``../victim.txt`` is refused (nothing removed); one listing a file below a folder
    that is a link does not follow that link (new: main has no manifest and deletes by name)."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    (out / "spec.json").write_text("{}")
    doc = {"format": 1, "outputs": ["spec.json", "../victim.txt"], "resume": []}
    (out / OUTPUTS_MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=r"lists '\.\./victim\.txt', which is not a file of a run inside"):
        clear_previous_outputs(out)
    assert (out / "spec.json").exists() and victim.exists()
    (out / "plots").symlink_to(tmp_path)  # a folder link planted in the run folder
    doc = {"format": 1, "outputs": ["spec.json", "plots/victim.txt"], "resume": []}
    (out / OUTPUTS_MANIFEST).write_text(json.dumps(doc))
    assert clear_previous_outputs(out) == [out / "spec.json"]
    assert victim.read_text() == PRECIOUS and not (out / OUTPUTS_MANIFEST).exists()


def test_resume_state_is_kept_by_a_rerun(tmp_path):
    """Resume state (an alignment checkpoint, before.json) is kept by a rerun; its results are removed.

    An alignment checkpoint and ``before.json`` survive a rerun's clearing, and the rerun may overwrite them; the results are removed (main deletes ``results.json`` only, by name)."""
    begin_outputs(tmp_path)
    atomic_torch_save({"step": 3}, tmp_path / "checkpoints" / "last.pt", resume=True)
    atomic_write_json(tmp_path / "before.json", {"metrics": {}}, resume=True)
    atomic_write_json(tmp_path / "results.json", {"steps": 3})
    atomic_write_text(tmp_path / "plots" / "align_metrics.png", "png")
    removed = begin_outputs(tmp_path)
    assert sorted(p.name for p in removed) == ["align_metrics.png", "results.json"]
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "before.json").exists()
    atomic_torch_save({"step": 4}, tmp_path / "checkpoints" / "last.pt", resume=True)  # ours: no refusal
    doc = json.loads((tmp_path / OUTPUTS_MANIFEST).read_text())
    assert doc["outputs"] == [] and sorted(doc["resume"]) == ["before.json", "checkpoints/last.pt"]


# ------------------------------------------------------------------------------ symlink loops in image folders
_SCAN = """
import sys
from spec_torch.apps.data import build_dataset
ds = build_dataset("imagefolder", root=sys.argv[1])
print(len(ds), " ".join(ds.ids))
"""


def _scan(root: Path) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _SCAN, str(root)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, *ids = proc.stdout.split()
    return int(n), ids


def test_symlink_loops_in_an_image_folder_neither_hang_nor_repeat_images(tmp_path):
    """Symlink loops in an image folder: no hang (two loops), no image counted twice (one loop).

    Two loops (``ln -s .. a/l1; ln -s .. a/l2``) scan at once (main: hangs, 2^40 paths, memory growing;
    run here with a timeout); one loop lists each image once (main: 41 times). A linked folder outside the
    root is still followed."""
    root = _images(tmp_path / "root", n=2)
    _images(root / "a", n=2)
    _images(tmp_path / "outside", n=1)
    (root / "linked").symlink_to(tmp_path / "outside")
    (root / "a" / "l1").symlink_to("..")
    want = ["a/im0.png", "a/im1.png", "im0.png", "im1.png", "linked/im0.png"]
    assert _scan(root) == (5, want)
    (root / "a" / "l2").symlink_to("..")
    assert _scan(root) == (5, want)


# ----------------------------------------------------------------------------------------------- pixel bombs
def test_pixel_bombs_are_skipped_with_the_reason(tmp_path, monkeypatch):
    """Pixel bombs (a 1,000,000 x 1 PNG; over MAX_IMAGE_PIXELS) are skipped as corrupt with the reason.

    A 1,000,000 x 1 PNG (3 KB; 37 x 37,000,000 after resize-shorter-side) and an image over PIL's
    ``MAX_IMAGE_PIXELS`` (PIL only warns up to twice that) are corrupt samples with the reason (main decodes
    both: the first then resizes past 3 GB)."""
    Image.new("L", (1_000_000, 1)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 10_000
    with pytest.raises(
        CorruptSample, match=rf"1000000 x 1 pixels: an aspect ratio over {MAX_ASPECT_RATIO}:1"
    ):
        open_image(tmp_path / "bomb.png", "bomb.png")
    Image.new("RGB", (MAX_ASPECT_RATIO, 1)).save(tmp_path / "wide.png")  # at the cap: fine
    assert open_image(tmp_path / "wide.png", "wide.png").size == (MAX_ASPECT_RATIO, 1)
    Image.new("RGB", (120, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 12,000 pixels: over the limit, under twice it
    with pytest.raises(
        CorruptSample, match=r"120 x 100 pixels is more than PIL's MAX_IMAGE_PIXELS \(10000\)"
    ):
        open_image(tmp_path / "big.png", "big.png")


_PEAK = """
import resource, sys, warnings
from spec_torch.apps.data import build_dataset
from spec_torch.apps.encoders import build_encoder
from spec_torch.apps.extract import extract_features
warnings.simplefilter("ignore")
ds = build_dataset("imagefolder", root=sys.argv[1])
enc = build_encoder("torchvision", model="resnet18", image_size=32)  # Resize(37): the issue's case
cache = extract_features(ds, enc, sys.argv[2], batch_size=4, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(cache.skipped))
"""


def _peak_kib(root: Path, cache: Path) -> tuple[int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(root), str(cache)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, skipped = proc.stdout.split()
    return int(peak), int(skipped)


def test_an_image_folder_with_a_pixel_bomb_stays_within_1_5x_the_ordinary_peak(tmp_path):
    """An image folder with a pixel bomb peaks within 1.5x the memory of the same run on ordinary images.

    The same extraction (torchvision resnet18 at image size 32) on ordinary images and on the same images
    plus a 1,000,000 x 1 PNG: peak memory (maxrss) within 1.5x, the bomb skipped (main: past 3 GB)."""
    plain = _images(tmp_path / "plain", n=6, size=(64, 48))
    bombed = _images(tmp_path / "bombed", n=6, size=(64, 48))
    Image.new("L", (1_000_000, 1)).save(bombed / "bomb.png")
    base, skipped_plain = _peak_kib(plain, tmp_path / "c1")
    peak, skipped = _peak_kib(bombed, tmp_path / "c2")
    assert (skipped_plain, skipped) == (0, 1)
    assert peak <= 1.5 * base, (peak, base)


# ------------------------------------------------------------------------------------------------ odd names
def test_odd_file_names_in_an_image_folder_are_skipped_with_the_reason(tmp_path):
    """Odd file names in an image folder (newline, not UTF-8, DEL) are skipped with the reason.

    The samples are listed in ``skipped`` (escaped); the cache is reused, and rebuilt after deleting it (main: a UnicodeEncodeError
    traceback, or a cache "inconsistent ... delete that folder", again after deleting it)."""
    root = _images(tmp_path / "img", n=3)
    Image.new("RGB", (8, 8)).save(root / "new\nline.png")
    Image.new("RGB", (8, 8)).save(os.fsdecode(bytes(root) + b"/caf\xe9.png"))  # Latin-1, not UTF-8
    (root / "sub\x7fdir").mkdir()
    Image.new("RGB", (8, 8)).save(root / "sub\x7fdir" / "x.png")
    ds, enc = build_dataset("imagefolder", root=str(root)), _encoder()
    for _ in range(2):  # extract, then delete the cache and extract again
        with pytest.warns(RuntimeWarning) as caught:
            cache = extract_features(ds, enc, tmp_path / "cache", progress=False)
        assert sorted(cache.skipped) == ["caf\\xe9.png", "new\\nline.png", "sub\\x7fdir/x.png"]
        text = " ".join(str(w.message) for w in caught)
        assert "not valid UTF-8" in text and "control character (\\n)" in text
        assert cache.ids == ["im0.png", "im1.png", "im2.png"]
        again = extract_features(ds, enc, tmp_path / "cache", progress=False)  # reused
        assert again.skipped == cache.skipped
        import shutil

        shutil.rmtree(cache.path)


def test_odd_coco_file_names_are_skipped_with_the_reason(tmp_path):
    """Odd COCO file_name entries (NUL, newline, lone surrogate) are skipped with the reason.

    Those images are skipped, the others extracted (main: ``ValueError: embedded null byte`` / UnicodeEncodeError tracebacks)."""
    images = tmp_path / "val"
    images.mkdir()
    names = ["a.jpg", "b\x00.jpg", "c\n.jpg", "d\ud800.jpg", "e.jpg"]
    for k, name in enumerate(names):
        if k in (0, 4):
            Image.new("RGB", (9, 9), (50 * k, 0, 0)).save(images / name)
    doc = {
        "images": [{"id": k + 1, "file_name": f} for k, f in enumerate(names)],
        "annotations": [{"id": 10 + k, "image_id": k + 1, "caption": f"c{k}"} for k in range(len(names))],
    }
    ann = tmp_path / "captions_val.json"
    ann.write_text(json.dumps(doc))  # ensure_ascii: "\\u0000", "\\ud800" escapes, valid JSON
    ds = build_dataset("mscoco", root=str(images), annotations=str(ann))
    with pytest.warns(RuntimeWarning) as caught:
        cache = extract_features(ds, _encoder(), tmp_path / "cache", progress=False)
    assert cache.ids == ["coco:1", "coco:5"] and cache.skipped == ["coco:2", "coco:3", "coco:4"]
    text = " ".join(str(w.message) for w in caught)
    assert "NUL byte" in text and "not valid UTF-8" in text and "control character" in text


def test_faults_bench_lists_these_cases():
    """bench/faults.py runs this module (its table prints every case here)."""
    text = (ROOT / "bench" / "faults.py").read_text()
    assert "tests/test_faults_files.py" in text
