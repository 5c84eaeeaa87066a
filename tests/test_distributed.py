"""Multi-process runs (torch.distributed, Gloo on CPU, 2 processes started by the tests) equal one process.

- spec_torch.apps.sharding helpers without a process group: shards tile the data, RowConcat reads like
  np.concatenate, the top-k merge, rank-0 writes.
- 2 spawned Gloo processes: DiffCovariance.compute() all-reduces by default (sync_dist=False keeps the
  local sums), top_samples(sync_dist=True) merges the ranks' candidates into the single-process top-k,
  state all-reduce, an error on rank 0 raised on every rank.
- ``torchrun --nproc_per_node=2 scripts/compare.py``: spec.json equals a 1-process run (precomputed features,
  and an image folder extracted per rank with a corrupt image); one run directory, written by rank 0 only.
- ``torchrun --nproc_per_node=2 scripts/matrix.py``: matrix.json equals a 1-process run (a layered encoder
  cut from the sharded cache, an auto-sigma kernel); written by rank 0 only, one cache per rank and encoder.
- A rank that dies mid-extraction leaves a cache that the rerun resumes (only the missing rows are embedded).

SpecAlignLoss over 2 ranks (value and gradient for every norm) is tested in tests/test_loss_dist.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import free_port, gloo_group, spawn_gloo
from PIL import Image, ImageDraw

import spec_torch as st
from spec_torch.apps import sharding as sd
from spec_torch.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _torchrun(script: Path, args: list[str], work: Path) -> tuple[list[str], dict[str, str]]:
    """The command line of ``torchrun --nproc_per_node=WORLD script args`` (a free port) and its environment:
    offline, the feature cache under ``work``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPEC_TORCH_CACHE=str(work / "cache"))
    cmd = [str(TORCHRUN), f"--nproc_per_node={WORLD}", f"--master_port={free_port()}", str(script), *args]
    return cmd, env


def _torchrun_beside_one_process(
    command: str, script: Path, args: list[str], work: Path, run
) -> tuple[str, dict]:
    """``script args`` under torchrun in ``work`` and, meanwhile, ``run`` of the same config composed in this
    process (its own cache and output folder under ``work``): (torchrun's stdout, the one-process result)."""
    from hydra import compose, initialize_config_dir

    cmd, env = _torchrun(script, args, work)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with initialize_config_dir(
        config_dir=str(ROOT / "spec_torch/apps/configs" / command), version_base="1.3"
    ):
        cfg = compose(
            config_name=command,
            overrides=[*args, f"cache_dir={work / 'cache1'}", f"output_dir={work / 'one'}"],
        )
    one = run(cfg)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out, one


WORLD = 2
TIMEOUT_S = 150
#: float64 sums over 2 ranks vs 1 process: only the summation order differs
F64_RTOL = 1e-11
#: float32 features and sums (the compare pipeline): eigenvalues relative to SPEC-diff
F32_RTOL = 2e-5
GAUSS = ["kernel@kernel_y=gaussian", "kernel_y.sigma=auto", "kernel_y.rff_dim=64"]


def _spawn(fn, *args) -> None:
    spawn_gloo(fn, *args, world=WORLD, timeout_s=TIMEOUT_S)


# ------------------------------------------------------------------------------ helpers, one process
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_tile_the_data_in_rank_order(world):
    for n in range(0, 30):
        blocks = [sd.shard_range(n, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))  # none dropped, none repeated, in order
        sizes = [len(b) for b in blocks]
        assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(SpecError, match=r"rank: expected an integer in \[0, 2\)"):
        sd.shard_range(10, 2, 2)
    with pytest.raises(SpecError, match="world_size: expected an integer >= 1"):
        sd.shard_range(10, 0, 0)
    assert sd.shard_range(7) == range(7)  # no process group: one rank holds everything


def test_row_concat_reads_like_concatenate():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(m, 3)).astype(np.float32) for m in (4, 0, 5, 2)]
    full = np.concatenate(parts)
    rc = sd.RowConcat(parts)
    assert rc.shape == (11, 3) and len(rc) == 11
    np.testing.assert_array_equal(rc[2:9], full[2:9])
    np.testing.assert_array_equal(rc[:], full)
    rows = np.array([10, 0, 4, 4, 3, 5, -1])
    np.testing.assert_array_equal(rc[rows], full[rows])
    with pytest.raises(SpecError, match=r"row indices must lie in \[0, 11\)"):
        rc[np.array([11])]
    cols = rc[:, 1:3]  # a layered cache cut into its layers: column views, read later
    assert isinstance(cols, sd.RowConcat) and cols.shape == (11, 2)
    np.testing.assert_array_equal(cols[2:9], full[2:9, 1:3])
    np.testing.assert_array_equal(cols[rows], full[rows, 1:3])
    with pytest.raises(SpecError, match=r"a\[:, i:j\]"):
        rc[1:3, 0]
    with pytest.raises(SpecError, match="same row shape"):
        sd.RowConcat([np.zeros((2, 3)), np.zeros((2, 4))])


def test_topk_merge_breaks_ties_towards_the_smaller_index():
    values = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, 2.0]])  # [3, M=2]
    indices = torch.tensor([[7, 9], [6, 4], [2, 8]])
    v, i = sd.all_gather_topk(values, indices, k=2)
    assert v.tolist() == [[3.0, 5.0], [3.0, 5.0]] and i.tolist() == [[2, 4], [6, 9]]
    v, i = sd.all_gather_topk(values, indices, k=5, largest=False)  # k > rows: all rows, sorted
    assert v[:, 0].tolist() == [1.0, 3.0, 3.0] and i[:, 0].tolist() == [7, 2, 6]


def test_shard_dataset_is_a_block_with_its_own_fingerprint():
    from spec_torch.apps.data import build_dataset

    ds = build_dataset("synthetic", n=10, image_size=32, seed=0)
    a, b = sd.ShardDataset(ds, range(0, 5)), sd.ShardDataset(ds, range(5, 10))
    assert a.ids + b.ids == ds.ids and len(b) == 5 and b.sample_id(0) == ds.sample_id(5)
    assert np.array_equal(np.asarray(b[1]), np.asarray(ds[6]))
    prints = {ds.fingerprint(), a.fingerprint(), b.fingerprint()}
    assert len(prints) == 3
    assert sd.ShardDataset(ds, range(5, 10)).fingerprint() == b.fingerprint()  # stable: a rerun resumes it
    with pytest.raises(SpecError, match="rows: expected a contiguous range"):
        sd.ShardDataset(ds, range(5, 11))


def test_write_on_main_is_atomic_and_cleans_up(tmp_path):
    target = tmp_path / "out.json"
    sd.write_on_main(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sd.write_on_main(tmp_path / "other.json", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file, no half-written target
    assert sd.run_on_main(lambda: 41 + 1) == 42


# --------------------------------------------------------------------------- 2 Gloo processes: library
# ------------------------------------------------------------------ 2 Gloo processes: everything, one spawn
N_LIB = 81  # 41 + 40 rows


def _lib_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lab = torch.arange(N_LIB) % 4
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)[lab] + 0.2 * torch.randn(N_LIB, 6, generator=g)
    y = torch.randn(3, 5, generator=g, dtype=torch.float64)[lab % 3] + 0.2 * torch.randn(
        N_LIB, 5, generator=g
    )
    return x, y


def _kernels():
    return "cosine", st.GaussianKernel(sigma=1.5, rff_dim=16, seed=3)


class _TinyStudent(torch.nn.Module):
    """Image and text "towers" (linear maps) in one module, as the alignment trainer's StudentForward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = torch.nn.Linear(6, 4).double(), torch.nn.Linear(5, 4).double()

    def forward(self, a, b, prompts):
        return self.img(a), self.txt(b), self.txt(prompts)


def _align_batch():
    """A global batch of 16: images [16, 6], captions [16, 5], teacher features [16, 3], 3 class prompts."""
    g = torch.Generator().manual_seed(1)
    lab = torch.arange(16) % 3
    a = torch.randn(16, 6, generator=g, dtype=torch.float64)
    b = torch.randn(16, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 3, generator=g, dtype=torch.float64)[lab] + 0.1 * torch.randn(16, 3, generator=g)
    return a, b, t, torch.randn(3, 5, generator=g, dtype=torch.float64), lab


def _align_losses(model, a, b, t, prompts, owner, rank: int = 0, world: int = 1):
    """SpecAlignLoss + open_clip ClipLoss (gather_with_grad) + the prompt loss on gathered images."""
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from spec_torch import SpecAlignLoss
    from spec_torch.apps.align.train import prompt_contrastive_loss

    img, txt, prm = model(a, b, prompts)  # [B, 4], [B, 4], [3, 4]
    scale = torch.tensor(10.0, dtype=torch.float64)
    spec = SpecAlignLoss(dtype=torch.float64, sync_dist=world > 1)(img, t)
    clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    clip_loss = clip(F.normalize(img, dim=1), F.normalize(txt, dim=1), scale)
    img_all = sd.all_gather_with_grad(F.normalize(img, dim=1))  # [W * B, 4]
    prompt_loss = prompt_contrastive_loss(img_all, F.normalize(prm, dim=1), owner, scale)
    return spec + clip_loss + prompt_loss


def _ddp_grads(rank: int) -> dict[str, torch.Tensor]:
    """One DDP backward over this rank's half of the global batch: the parameters' (averaged) gradients."""
    a, b, t, prompts, lab = _align_batch()
    rows = slice(8 * rank, 8 * rank + 8)
    model = _TinyStudent()
    ddp = sd.wrap_ddp(model, torch.device("cpu"))
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    _align_losses(ddp, a[rows], b[rows], t[rows], prompts, lab, rank, WORLD).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _fail_on_main() -> None:
    raise SpecError("output_dir: not writable (test)")


def _library_checks(rank: int, out_dir: str) -> dict:
    x, y = _lib_data()
    rows = sd.shard_range(N_LIB)
    xs, ys = x[rows.start : rows.stop], y[rows.start : rows.stop]
    acc = st.DiffCovariance(*_kernels())
    for xb, yb in zip(xs.split(16), ys.split(16)):
        acc.update(xb, yb)
    synced = acc.compute(eta=0.7)  # default: all-reduced over the ranks
    local = acc.compute(eta=0.7, sync_dist=False)
    top = synced.top_samples(zip(xs.split(8), ys.split(8)), k=50, offset=rows.start, sync_dist=True)
    # a rank without samples still takes part in the merge
    empty = synced.top_samples([] if rank == 1 else [(x, y)], k=5, modes=[0, 1], sync_dist=True)
    state = sd.all_reduce_state({"a": torch.full((2, 2), rank + 1.0), "n": rank + 3, "name": "kept"})
    # a rank that saw no batch contributes zeros (it takes the kernels from the other rank)
    lonely = st.DiffCovariance(*_kernels())
    if rank == 0:
        lonely.update(xs, ys)
    lonely_evals = lonely.compute(eta=0.7).eigenvalues
    # sigma='auto' fitted on each rank's own rows: incompatible sums, refused on every rank
    per_rank = st.DiffCovariance(st.GaussianKernel(sigma="auto", rff_dim=4, seed=2), "cosine").update(xs, ys)
    try:
        per_rank.compute()
        mismatch = None
    except SpecError as exc:
        mismatch = str(exc)
    try:
        sd.run_on_main(_fail_on_main)
        error = None
    except SpecError as exc:
        error = str(exc)
    written = sd.write_on_main(Path(out_dir) / "shared.txt", lambda tmp: tmp.write_text(f"rank {rank}"))
    from spec_torch.apps.matrix import _my_rows

    try:  # the matrix job with fewer common rows than ranks: the same error on every rank (n is global)
        _my_rows(1)
        matrix_rows = None
    except SpecError as exc:
        matrix_rows = str(exc)
    return {
        "matrix_rows": matrix_rows,
        "matrix_block": _my_rows(5),
        "n_local": acc.n,
        "n_synced": synced.n,
        "evals": synced.eigenvalues,
        "null": synced.spec_diff_null,  # the permutation reference, from the all-reduced sums
        "evals_local": local.eigenvalues,
        "top": top,
        "empty": empty,
        "state": state,
        "lonely_evals": lonely_evals,
        "mismatch": mismatch,
        "error": error,
        "shared": written.read_text(),
        "rank0_obj": sd.broadcast_object({"rank": rank}),
        "gathered": sd.all_gather_object(rank * 10),
        "ddp_grads": _ddp_grads(rank),
        "fitted": sd.fit_on_main(st.GaussianKernel(sigma="auto", rff_dim=4, seed=2), xs),
        "own_fit": st.GaussianKernel(sigma="auto", rff_dim=4, seed=2).fit(xs),
    }


class _Stop(Exception):
    pass


def _compare_resume(rank: int, work: Path) -> dict:
    """compare.run on 2 ranks over caches where rank 1's block was cut short (see ``_cut_short``)."""
    from spec_torch.apps.compare import run
    from spec_torch.apps.encoders.offline import ColourHistogramEncoder

    forward, calls = ColourHistogramEncoder.forward, {"n": 0}

    def counting(self, batch):
        calls["n"] += 1
        return forward(self, batch)

    ColourHistogramEncoder.forward = counting
    try:
        summary = run(_compare_cfg(work, "out"))
    finally:
        ColourHistogramEncoder.forward = forward
    return {"calls": calls["n"], "summary": summary}


def _align_interrupted_then_resumed(rank: int, out: Path) -> dict:
    """align on 2 ranks (batch 8 each): interrupted after step 2, then the same run again resumes it."""
    from spec_torch.apps.align.pipeline import run

    def stop(trainer) -> None:
        if trainer.step == 2:
            raise _Stop("interrupted after step 2")

    try:
        run(_align_cfg(out, batch_size=8), on_step=stop)
        interrupted = None
    except _Stop as exc:  # on both ranks at the same step: the process group stays usable
        interrupted = str(exc)
    left = {
        "checkpoint": (out / "checkpoints" / "last.pt").is_file(),
        "results": (out / "results.json").exists(),
    }
    sd.barrier()
    run(_align_cfg(out, batch_size=8))
    return {"interrupted": interrupted, "left": left}


def _compare_features(work: Path) -> dict:
    """compare.run on precomputed features (Gaussian sigma='auto'), on the feature and the exact route."""
    from spec_torch.apps.compare import run

    return {route: run(_features_cfg(work, route)) for route in ("features", "exact")}


def _extraction_error_on_one_rank(rank: int, work: Path) -> dict:
    """Rank 1's encoder fails: rank 1 raises its own error, rank 0 an error naming rank 1 (no one hangs)."""
    from spec_torch.apps.data import build_dataset
    from spec_torch.apps.encoders import build_encoder
    from spec_torch.apps.encoders.offline import ColourHistogramEncoder

    forward = ColourHistogramEncoder.forward

    def broken(self, batch):
        if rank == 1:
            raise SpecError("encoder: broken on rank 1 (test)")
        return forward(self, batch)

    ColourHistogramEncoder.forward = broken
    try:
        sd.extract_sharded(
            build_dataset("synthetic", n=8, image_size=32), build_encoder("offline_colour"), work
        )
        return {"error": None}
    except SpecError as exc:
        return {"error": str(exc)}
    finally:
        ColourHistogramEncoder.forward = forward


def _worker(rank: int, port: int, work: str) -> None:
    with gloo_group(rank, port, world=WORLD):
        result = {
            "lib": _library_checks(rank, work),
            "features": _compare_features(Path(work) / "features"),
            "extract_error": _extraction_error_on_one_rank(rank, Path(work) / "broken"),
            "compare": _compare_resume(rank, Path(work) / "compare"),
            "align": _align_interrupted_then_resumed(rank, Path(work) / "align" / "two"),
        }
        torch.save(result, os.path.join(work, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One spawn of 2 Gloo processes runs every multi-rank check; their per-rank results."""
    work = tmp_path_factory.mktemp("ranks")
    _cut_short(work / "compare")
    _feature_files(work / "features")
    _spawn(_worker, str(work))
    return work, [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------------- library over 2 ranks
def _reference(rows: range | None = None) -> st.SpecResult:
    x, y = _lib_data()
    if rows is not None:
        x, y = x[rows.start : rows.stop], y[rows.start : rows.stop]
    return st.DiffCovariance(*_kernels()).update(x, y).compute(eta=0.7)


def test_diff_covariance_all_reduces_by_default(ranks):
    ref = _reference()
    for rank, got in enumerate(r["lib"] for r in ranks[1]):
        assert got["n_synced"] == N_LIB and got["n_local"] == len(sd.shard_range(N_LIB, rank, WORLD))
        torch.testing.assert_close(got["evals"], ref.eigenvalues, rtol=0, atol=F64_RTOL * ref.spec_diff)
        assert got["null"] == pytest.approx(ref.spec_diff_null, rel=F64_RTOL)
    assert torch.equal(ranks[1][0]["lib"]["evals"], ranks[1][1]["lib"]["evals"])  # one solve, same everywhere


def test_diff_covariance_rank_without_samples_and_mismatched_kernels(ranks):
    ref = _reference(sd.shard_range(N_LIB, 0, WORLD))  # only rank 0 added its rows
    for got in (r["lib"] for r in ranks[1]):
        torch.testing.assert_close(
            got["lonely_evals"], ref.eigenvalues, rtol=0, atol=F64_RTOL * ref.spec_diff
        )
        assert got["mismatch"] is not None and got["mismatch"].startswith("kernel_x/kernel_y: rank 1 has")
        assert "fit_on_main" in got["mismatch"]


def test_diff_covariance_sync_dist_false_keeps_the_local_sums(ranks):
    for rank, got in enumerate(r["lib"] for r in ranks[1]):
        ref = _reference(sd.shard_range(N_LIB, rank, WORLD))
        torch.testing.assert_close(got["evals_local"], ref.eigenvalues, rtol=0, atol=F64_RTOL * ref.spec_diff)
    assert not torch.allclose(ranks[1][0]["lib"]["evals_local"][:3], ranks[1][1]["lib"]["evals_local"][:3])


def test_top_samples_merged_over_ranks_equal_one_process(ranks):
    ref_res = _reference()
    x, y = _lib_data()
    ref = ref_res.top_samples((x, y), k=50)  # 50 > the 40/41 rows of one rank
    ref_empty = ref_res.top_samples((x, y), k=5, modes=[0, 1])
    for got in (r["lib"] for r in ranks[1]):
        top = got["top"]
        assert top.modes == ref.modes and top.flipped == ref.flipped
        assert torch.equal(top.indices, ref.indices)
        torch.testing.assert_close(top.scores, ref.scores, rtol=0, atol=1e-9)
        assert torch.equal(got["empty"].indices, ref_empty.indices)


def test_collective_helpers(ranks):
    for got in (r["lib"] for r in ranks[1]):
        assert torch.equal(got["state"]["a"], torch.full((2, 2), 3.0))
        assert got["state"]["n"] == 7 and got["state"]["name"] == "kept"
        assert got["error"] == "output_dir: not writable (test)"  # rank 0's error, raised on every rank
        assert got["shared"] == "rank 0"  # written by rank 0 only, complete before any rank read it
        assert got["rank0_obj"] == {"rank": 0} and got["gathered"] == [0, 10]
        assert got["matrix_rows"].startswith("data: 1 common samples cannot be split over 2 ranks")
    assert [r["lib"]["matrix_block"] for r in ranks[1]] == [
        range(0, 3),
        range(3, 5),
    ]  # the blocks tile the rows


def test_an_extraction_error_on_one_rank_is_raised_on_every_rank(ranks):
    errors = [r["extract_error"]["error"] for r in ranks[1]]
    assert errors[1] == "encoder: broken on rank 1 (test)"
    assert errors[0] == (
        "cache_dir: feature extraction failed on another rank: rank 1: SpecError: encoder: broken on rank 1 (test)"
    )


def test_fit_on_main_gives_every_rank_rank_zeros_fitted_kernel(ranks):
    x, _ = _lib_data()
    rows0 = sd.shard_range(N_LIB, 0, WORLD)
    expected = st.GaussianKernel(sigma="auto", rff_dim=4, seed=2).fit(x[rows0.start : rows0.stop])
    for got in (r["lib"] for r in ranks[1]):
        assert got["fitted"] == expected and torch.equal(got["fitted"]._omega, expected._omega)
    # fitted on each rank's own rows, sigma='auto' differs between ranks: why fit_on_main exists
    assert ranks[1][0]["lib"]["own_fit"].sigma != ranks[1][1]["lib"]["own_fit"].sigma


def test_ddp_gradients_equal_one_process_over_the_global_batch(ranks):
    """SpecAlignLoss + ClipLoss(gather_with_grad) + prompt loss on gathered rows, DDP-averaged over 2 ranks,
    give the gradient of one process over the concatenated batch (no world_size factor left over)."""
    a, b, t, prompts, lab = _align_batch()
    model = _TinyStudent()
    _align_losses(model, a, b, t, prompts, lab).backward()
    for got in (r["lib"] for r in ranks[1]):
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["ddp_grads"][name], p.grad, rtol=0, atol=F64_RTOL * 10)


# ------------------------------------------------------------------ compare on precomputed features
def _feature_files(work: Path) -> None:
    rng = np.random.default_rng(1)
    n = 90
    gx, gy = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.eye(3)[gx] * 3 + 0.3 * rng.normal(size=(n, 3))
    y = np.concatenate([np.eye(3)[gy] * 3, np.ones((n, 1))], 1) + 0.3 * rng.normal(size=(n, 4))
    work.mkdir(parents=True)
    np.save(work / "x.npy", x.astype(np.float32))
    np.save(work / "y.npy", y.astype(np.float32))
    words = ["zebra quokka", "narwhal okapi", "axolotl pangolin"]  # each x group's words: the explain stage
    (work / "names.txt").write_text(
        "".join(f"a photo of a {words[g]} number {i}\n" for i, g in enumerate(gx))
    )


def _features_cfg(work: Path, route: str, out: str | None = None):
    from hydra import compose, initialize_config_dir

    data = ["data=features", f"data.x_path={work / 'x.npy'}", f"data.y_path={work / 'y.npy'}"]
    data.append(f"data.names_path={work / 'names.txt'}")
    with initialize_config_dir(config_dir=str(ROOT / "spec_torch/apps/configs/compare"), version_base="1.3"):
        return compose(
            config_name="compare",
            overrides=[
                *data,
                *GAUSS,
                f"method={route}",
                "top_k=2",
                "report=false",
                f"output_dir={work / (out or route)}",
            ],
        )


@pytest.mark.parametrize("route", ["features", "exact"])
def test_compare_on_precomputed_features_two_ranks_equal_one_process(ranks, route):
    from spec_torch.apps.compare import run

    work, results = ranks
    one = run(_features_cfg(work / "features", route, out=f"one-{route}"))
    written = json.loads((work / "features" / route / "spec.json").read_text())
    for two in [written] + [r["features"][route] for r in results]:
        assert two["n"] == one["n"] == 90 and two["kernel_y"] == one["kernel_y"]
        np.testing.assert_allclose(
            two["eigenvalues"], one["eigenvalues"], rtol=0, atol=F32_RTOL * one["spec_diff"]
        )
        assert two["spec_diff_null"] == pytest.approx(one["spec_diff_null"], rel=F32_RTOL)
        for direction in ("x", "y"):
            assert [m["top_ids"] for m in two["modes"][direction]] == [
                m["top_ids"] for m in one["modes"][direction]
            ]
            # the explain stage: rank 0 names the modes and every rank holds its words
            assert [m["keywords"] for m in two["modes"][direction]] == [
                m["keywords"] for m in one["modes"][direction]
            ]
        assert any(m["keywords"] for m in one["modes"]["x"])
        np.testing.assert_allclose(two["metrics"]["linear_cka"], one["metrics"]["linear_cka"], rtol=1e-9)


# ------------------------------------------------------------------ a rank dies mid-extraction, rerun
COMPARE = ["data.n=48", "data.image_size=32", "batch_size=6", "chunk_rows=6", "report=false", "top_k=2"]


def _compare_cfg(work: Path, out: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "spec_torch/apps/configs/compare"), version_base="1.3"):
        return compose(
            config_name="compare",
            overrides=[*COMPARE, "progress=false", f"cache_dir={work}/cache", f"output_dir={work / out}"],
        )


def _cut_short(work: Path) -> Path:
    """Leave rank 1's colour-encoder cache as a rank killed in its second batch leaves it: one chunk of 6
    rows flushed and counted, no completion marker, and the lock of a process that no longer exists."""
    from spec_torch.apps.compare import _build_encoder, _container
    from spec_torch.apps.data import build_dataset
    from spec_torch.apps.encoders.offline import ColourHistogramEncoder
    from spec_torch.apps.extract import extract_features

    cfg = _compare_cfg(work, "out")
    data = dict(_container(cfg.data))
    dataset = build_dataset(data.pop("name"), **data)
    shard = sd.ShardDataset(dataset, sd.shard_range(len(dataset), 1, WORLD))
    encoder = _build_encoder(_container(cfg.encoder_x), "encoder_x")
    forward, calls = ColourHistogramEncoder.forward, {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Stop("killed in the second batch")
        return forward(self, batch)

    ColourHistogramEncoder.forward = dying
    try:
        with pytest.raises(_Stop):
            extract_features(shard, encoder, work / "cache", batch_size=6, chunk_rows=6, progress=False)
    finally:
        ColourHistogramEncoder.forward = forward
    (folder,) = list((work / "cache").iterdir())
    assert json.loads((folder / "manifest.json").read_text())["rows_done"] == 6
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
    return folder


def test_rank_dying_mid_extraction_leaves_caches_that_a_rerun_resumes(ranks, tmp_path):
    from spec_torch.apps.compare import run

    work, results = ranks
    assert results[1]["compare"]["calls"] == 3  # rank 1 embeds rows 6..23 of its block only: 3 batches of 6
    assert results[0]["compare"]["calls"] == 4  # rank 0 its whole block of 24
    spec = json.loads((work / "compare" / "out" / "spec.json").read_text())
    assert results[0]["compare"]["summary"]["eigenvalues"] == results[1]["compare"]["summary"]["eigenvalues"]
    one = run(_compare_cfg(tmp_path, "one"))  # one process, from scratch
    np.testing.assert_allclose(
        spec["eigenvalues"], one["eigenvalues"], rtol=0, atol=F32_RTOL * one["spec_diff"]
    )
    for direction in ("x", "y"):
        assert [m["top_ids"] for m in spec["modes"][direction]] == [
            m["top_ids"] for m in one["modes"][direction]
        ]


# ------------------------------------------------------------------------ alignment: 2 ranks vs 1 process
ALIGN = [
    "experiment=align_tiny",
    "data.n=96",
    "heldout=16",
    "train.steps=4",
    "train.ckpt_every=2",
    "train.heldout_every=4",
    "train.log_every=1",
    "optim.warmup_steps=1",
    "eval.knn_k=3",
    "eval.teacher_clusters=2",
    "progress=false",
]
#: float32 training, 2 ranks vs 1 process (reduction order differs), relative to how far the weights moved
ALIGN_RTOL = 1e-2
#: the logged losses (float32)
ALIGN_LOSS_RTOL = 1e-5


def _align_cfg(out: Path, batch_size: int):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "spec_torch/apps/configs/align"), version_base="1.3"):
        return compose(
            config_name="align",
            overrides=[
                *ALIGN,
                f"train.batch_size={batch_size}",
                f"cache_dir={out.parent / 'cache'}",
                f"output_dir={out}",
            ],
        )


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _initial_weights() -> dict[str, torch.Tensor]:
    """The student's weights before training (the pipeline seeds the random initialisation)."""
    from omegaconf import OmegaConf

    from spec_torch.apps.align.pipeline import build_student

    cfg = _align_cfg(Path("/nonexistent/out"), batch_size=8)
    torch.manual_seed(int(cfg.seed))
    model, _, _ = build_student(OmegaConf.to_container(cfg.student, resolve=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_alignment_two_ranks_interrupted_and_resumed_equal_one_process(ranks, tmp_path):
    from spec_torch.apps.align.pipeline import run
    from spec_torch.apps.align.runtime import Runtime

    work, results = ranks
    two = work / "align" / "two"
    for r in results:
        assert r["align"]["interrupted"] == "interrupted after step 2"
        assert r["align"]["left"] == {"checkpoint": True, "results": False}
    one = tmp_path / "one"
    run(_align_cfg(one, batch_size=16))  # one process, the same global batch of 16

    # the teacher's features: each rank embedded its block of the 96 samples
    shards = [
        json.loads((f / "complete.json").read_text())["dataset"]["shard"]
        for f in (two.parent / "cache").iterdir()
    ]
    assert sorted(shards) == [[0, 48, 96], [48, 96, 96]]
    res_two, res_one = (json.loads((d / "results.json").read_text()) for d in (two, one))
    assert res_two["resumed"] and res_two["steps"] == res_one["steps"] == 4
    rows1, rows2 = _csv(one / "logs" / "train.csv"), _csv(two / "logs" / "train.csv")
    assert [r["step"] for r in rows2] == ["1", "2", "3", "4"]  # rank 0 alone logs, the resume continued them
    for r1, r2 in zip(rows1, rows2):
        for key in ("loss_spec", "loss_clip"):
            assert abs(float(r1[key]) - float(r2[key])) <= ALIGN_LOSS_RTOL * abs(float(r1[key])), (
                key,
                r1,
                r2,
            )
    # weights: 2 ranks vs 1, relative to the change made by training (a wrong gradient scale fails this)
    w1, w2, before = torch.load(one / "student.pt"), torch.load(two / "student.pt"), _initial_weights()
    assert w1.keys() == w2.keys() == before.keys()
    moved = max(float((w1[k] - before[k]).abs().max()) for k in w1)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 0 and diff <= ALIGN_RTOL * moved, (diff, moved)

    # resuming with another number of processes is refused (the data shards would differ)
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(
            Runtime, "detect", classmethod(lambda cls, device="auto": cls(torch.device("cpu"), 0, 2))
        )
        with pytest.raises(SpecError, match=r"written by 1 process\(es\), this run has 2"):
            run(_align_cfg(one, batch_size=16))


# ------------------------------------------------------------------------- torchrun scripts/compare.py
def _draw(colour: str, shape: str, k: int) -> Image.Image:
    img = Image.new("RGB", (32, 32), (235, 235, 235))
    box = (3 + k % 4, 3 + k % 3, 27 - k % 5, 28 - k % 2)
    getattr(ImageDraw.Draw(img), shape)(box, fill=colour, outline="black")
    return img


FOLDER = ["data=imagefolder", "data.label_from_folder=true", "batch_size=8", "top_k=2"]


@pytest.fixture(scope="module")
def torchrun_compare(tmp_path_factory):
    """``torchrun --nproc_per_node=2 scripts/compare.py`` on an image folder with a corrupt image, in the
    default run dir under its working directory, and the same comparison in one process (in-process)."""
    from spec_torch.apps.compare import run

    work = tmp_path_factory.mktemp("torchrun")
    images = work / "images"
    for c, (colour, shape) in enumerate([("red", "ellipse"), ("blue", "rectangle"), ("green", "ellipse")]):
        (images / f"class{c}").mkdir(parents=True)
        for k in range(9):
            _draw(colour, shape, k).save(images / f"class{c}" / f"img{k}.png")
    (images / "class2" / "img_broken.png").write_bytes(b"\x89PNG not really")  # in rank 1's block
    args = [*FOLDER, f"data.root={images}", *GAUSS, "progress=false"]
    out, one = _torchrun_beside_one_process("compare", SCRIPT, args, work, run)
    return work, out, one


def test_torchrun_compare_equals_one_process(torchrun_compare):
    work, _, one = torchrun_compare
    (path,) = list((work / "outputs").rglob("spec.json"))
    two = json.loads(path.read_text())
    assert two["n"] == one["n"] == 27 and two["skipped"] == one["skipped"]
    assert two["skipped"] == {"count": 1, "ids": ["class2/img_broken.png"]}
    assert two["kernel_y"] == one["kernel_y"]  # the same auto sigma: fitted on the same seeded rows
    np.testing.assert_allclose(
        two["eigenvalues"], one["eigenvalues"], rtol=0, atol=F32_RTOL * one["spec_diff"]
    )
    for direction in ("x", "y"):
        assert len(two["modes"][direction]) == len(one["modes"][direction]) > 0
        for a, b in zip(two["modes"][direction], one["modes"][direction]):
            assert a["top_ids"] == b["top_ids"] and a["labels"] == b["labels"]
            np.testing.assert_allclose(a["top_scores"], b["top_scores"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(two["metrics"]["linear_cka"], one["metrics"]["linear_cka"], rtol=1e-9)
    assert two["metrics"]["mutual_knn"] == one["metrics"]["mutual_knn"]


def test_torchrun_run_dir_is_made_and_written_by_rank_zero_only(torchrun_compare):
    work, stdout, _ = torchrun_compare
    (run_dir,) = list((work / "outputs" / "compare").glob("*/*"))  # one dir, though both ranks started
    assert (run_dir / "spec.json").is_file() and (run_dir / "report.html").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["compare.log"]
    assert stdout.count("SPEC-diff =") == 1  # one summary: rank 0's
    assert not list(run_dir.glob(".*.tmp"))


def test_torchrun_extraction_writes_one_cache_per_rank(torchrun_compare):
    work, _, _ = torchrun_compare
    folders = sorted((work / "cache").iterdir())
    assert len(folders) == 4  # 2 encoders x 2 ranks
    shards = sorted(tuple(json.loads((f / "complete.json").read_text())["dataset"]["shard"]) for f in folders)
    assert shards == [(0, 14, 28), (0, 14, 28), (14, 28, 28), (14, 28, 28)]  # no image twice, none dropped


# ------------------------------------------------------------------------- torchrun scripts/matrix.py
MATRIX_SCRIPT = ROOT / "scripts" / "matrix.py"
#: the offline demo, small: 6 feature sets (2 encoders + a CNN's 4 layers, cut from one sharded cache), a
#: Gaussian kernel whose sigma=auto is fitted on a seeded sample of all 48 rows (by rank 0 under torchrun),
#: several batches per rank
MATRIX = [
    "experiment=matrix_demo",
    "data.n=48",
    "samples_per_mode=6",
    "stream_batch_size=16",
    "kernel=gaussian",
    "kernel.sigma=auto",
    "kernel.rff_dim=64",
    "report=false",
    "progress=false",
]


@pytest.fixture(scope="module")
def torchrun_matrix(tmp_path_factory):
    """``torchrun --nproc_per_node=2 scripts/matrix.py`` of the small offline demo, in the preset's run dir
    under its working directory, and the same matrix in one process (in-process)."""
    from spec_torch.apps.matrix import run

    work = tmp_path_factory.mktemp("torchrun_matrix")
    out, one = _torchrun_beside_one_process("matrix", MATRIX_SCRIPT, MATRIX, work, run)
    return work, out, one


def test_torchrun_matrix_equals_one_process(torchrun_matrix):
    work, _, one = torchrun_matrix
    (path,) = list((work / "outputs").rglob("matrix.json"))
    two = json.loads(path.read_text())
    assert two["names"] == one["names"] and len(one["names"]) == 6
    assert two["n"] == one["n"] == 48 and two["settings"]["route"] == "joint"
    assert two["settings"]["kernels"] == one["settings"]["kernels"]  # the same auto sigmas: rank 0's rows
    for key in ("spec_diff", "lead", "cka"):  # float64 sums: only the summation order differs
        np.testing.assert_allclose(two[key], one[key], rtol=F64_RTOL, atol=1e-14)
    assert [(p["x"], p["y"]) for p in two["pairs"]] == [(p["x"], p["y"]) for p in one["pairs"]]
    assert len(one["pairs"]) == 3
    for a, b in zip(two["pairs"], one["pairs"]):
        assert [m["index"] for m in a["modes"]] == [m["index"] for m in b["modes"]] and a["modes"]
        for ma, mb in zip(a["modes"], b["modes"]):
            assert set(ma["top_rows"]) == set(mb["top_rows"])  # merged over ranks, global rows
            np.testing.assert_allclose(sorted(ma["top_scores"]), sorted(mb["top_scores"]), rtol=0, atol=1e-9)


def test_torchrun_matrix_error_is_one_line_on_every_rank(tmp_path):
    """An error found after the sharded extraction (1 sample: nothing to compare) stops both ranks with the
    same one-line error, exit status 2 each (torchrun then fails), and no matrix.json."""
    cmd, env = _torchrun(
        MATRIX_SCRIPT, ["experiment=matrix_demo", "data.n=1", "progress=false", "report=false"], tmp_path
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data: only 1 sample(s) readable by every encoder"] * WORLD, proc.stderr[-2000:]
    # torchrun prints its own traceback of the failed launch; a worker's would name the job's code
    assert "exitcode  : 2" in proc.stderr and "spec_torch/apps/" not in proc.stderr
    assert not list(tmp_path.rglob("matrix.json"))


def test_torchrun_matrix_written_by_rank_zero_with_one_cache_per_rank(torchrun_matrix):
    work, stdout, _ = torchrun_matrix
    run_dir = work / "outputs" / "matrix_demo"  # the preset's hydra.run.dir
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "matrix.json", "matrix.log"]
    assert stdout.count("SPEC matrix:") == 1  # one summary: rank 0's
    folders = sorted((work / "cache").iterdir())
    assert len(folders) == 6  # 3 encoders x 2 ranks
    shards = sorted(tuple(json.loads((f / "complete.json").read_text())["dataset"]["shard"]) for f in folders)
    assert shards == [(0, 24, 48)] * 3 + [(24, 48, 48)] * 3


# -------------------------------------------------------------------------- torchrun scripts/align.py
ALIGN_SCRIPT = ROOT / "scripts" / "align.py"


def test_torchrun_align_script_one_run_dir_written_by_rank_zero(ranks, tmp_path):
    """``torchrun --nproc_per_node=2 scripts/align.py``: one run folder (the preset's, under cwd) with one
    log, the training log written once, and the weights of the same 2-rank run made through the library."""
    cmd, env = _torchrun(ALIGN_SCRIPT, [*ALIGN, "train.batch_size=8"], tmp_path)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("results.json")]  # outputs/align_tiny/<time>
    assert (run_dir / "results.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["align.log"]
    assert [r["step"] for r in _csv(run_dir / "logs" / "train.csv")] == ["1", "2", "3", "4"]
    assert proc.stdout.count("results: ") == 1  # rank 0 prints
    lib = torch.load(ranks[0] / "align" / "two" / "student.pt")  # interrupted at step 2 and resumed there
    cli = torch.load(run_dir / "student.pt")
    assert max(float((lib[k] - cli[k]).abs().max()) for k in lib) <= 1e-5


# ------------------------------------------------------------------------------ process group set-up
def test_outside_torchrun_nothing_is_started(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert sd.torchrun_env() is None and not sd.is_follower()
    assert sd.init_distributed() is False and not dist.is_initialized()
    assert (sd.get_rank(), sd.get_world_size(), sd.is_main_process()) == (0, 1, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert sd.torchrun_env() == {"rank": 1, "world_size": 2, "local_rank": 1} and sd.is_follower()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(SpecError, match="RANK/WORLD_SIZE/LOCAL_RANK: expected integers"):
        sd.torchrun_env()


@pytest.mark.gpu
def test_nccl_torchrun_compare_on_cuda_equals_one_process(tmp_path):
    """The NCCL path: torchrun with one process per visible GPU (at least 1) on CUDA vs one CUDA process."""
    from spec_torch.apps.compare import run

    _feature_files(tmp_path / "features")
    nproc = max(1, min(2, torch.cuda.device_count()))
    cfg = _features_cfg(tmp_path / "features", "features", out="one")
    one = run(cfg)
    out = tmp_path / "features" / "nccl"
    args = [
        "data=features",
        f"data.x_path={tmp_path / 'features' / 'x.npy'}",
        f"data.y_path={tmp_path / 'features' / 'y.npy'}",
        *GAUSS,
        "top_k=2",
        "report=false",
        "device=cuda",
        f"hydra.run.dir={out}",
    ]
    cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", str(SCRIPT), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "spec.json").read_text())
    assert two["settings"]["device"].startswith("cuda")
    np.testing.assert_allclose(
        two["eigenvalues"], one["eigenvalues"], rtol=0, atol=F32_RTOL * one["spec_diff"]
    )
    for direction in ("x", "y"):
        assert [m["top_ids"] for m in two["modes"][direction]] == [
            m["top_ids"] for m in one["modes"][direction]
        ]
