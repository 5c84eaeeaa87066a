"""Fault cases of issue 19, second part (saved state, allocations, odd values, Ctrl-C): each reproduced and handled.

Every test is one case; ``bench/faults.py`` runs this module with ``tests/test_faults.py`` and prints the table.
Each test fails on the main branch before issue 19 (said in its docstring). Ctrl-C is simulated at a known phase,
never by timing: a stage monkeypatched to raise KeyboardInterrupt in-process, or a subprocess that signals
itself (SIGINT) when it reaches the phase (``SPEC_TORCH_TEST_INTERRUPT``, read only by these tests' hooks).
"""

from __future__ import annotations

import io
import time

import pytest
import torch

import spec_torch as st
from spec_torch.errors import SpecError
from spec_torch.kernels import GaussianKernel

pytestmark = pytest.mark.usefixtures("one_thread")


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only=True


# ----------------------------------------------------------------- allocations are checked before they happen
@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: GaussianKernel(sigma=1.0, rff_dim=10**9).fit(x),
        lambda x, y: st.DiffCovariance(GaussianKernel(rff_dim=10**9), "cosine"),
        lambda x, y: st.spec(x, y, GaussianKernel(sigma=1.0, rff_dim=10**9), "cosine"),
        lambda x, y: st.spec(x, y, GaussianKernel(sigma=1.0, rff_dim=10**9), "cosine", method="features"),
        lambda x, y: st.SpecAlignLoss(GaussianKernel(sigma=1.0, rff_dim=10**9), "cosine", method="exact")(
            x, y
        ),
    ],
    ids=["kernel.fit", "DiffCovariance", "spec", "spec-features", "SpecAlignLoss"],
)
def test_rff_dim_of_a_billion_is_refused_before_allocating(make):
    """rff_dim=10**9 is one SpecError naming rff_dim (or the kernels' D) and the GiB it needs, refused from the
    sizes before any allocation (on main: the allocator is asked for 64-256 GB)."""
    x, y = torch.randn(40, 6), torch.randn(40, 4)
    t0 = time.process_time()
    with pytest.raises(SpecError, match=r"(rff_dim|kernel_x/kernel_y|method).* needs about [\d.e+]+ GiB"):
        make(x, y)
    assert time.process_time() - t0 < 5  # nothing big was drawn (CPU time, not a timing claim: 0.01 s here)


def test_rff_dim_of_twenty_million_allocates_nothing_before_failing():
    """rff_dim=2*10**7: refused before 3 GB of frequencies are drawn.

    rff_dim=2*10**7 on 20-d inputs (3.2 GB of frequencies) is refused before the frequencies are drawn: the
    peak memory stays below 1 GB (on main: 3 GB allocated for several seconds before the D x D check)."""
    import resource

    x, y = torch.randn(60, 20), torch.randn(60, 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for method in ("auto", "features", "exact"):
        with pytest.raises(SpecError, match="needs about"):
            st.spec(x, y, GaussianKernel(sigma=1.0, rff_dim=2 * 10**7), "cosine", method=method)
    acc = st.DiffCovariance(GaussianKernel(sigma="auto", rff_dim=8), "cosine")
    acc.kernel_x = GaussianKernel(sigma="auto", rff_dim=2 * 10**7)  # past the constructor's check: update's
    with pytest.raises(SpecError, match="needs about"):
        acc.update(x, y)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2**20, f"peak memory grew by {grown_kib / 2**20:.1f} GiB"


def test_replicates_of_a_billion_are_refused_naming_the_memory():
    """replicates=10**9: one error naming the memory, before any draw.

    replicates=10**9 is one SpecError naming replicates and the GiB needed, before the full-data solve and
    before the [R, G] draws (on main: 256 GB asked of the allocator)."""
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    with pytest.raises(SpecError, match=r"replicates: replicates = 1000000000 .* needs about [\d.e+]+ GiB"):
        st.spec(x, y, GaussianKernel(sigma=1.0, rff_dim=8), "cosine", replicates=10**9)
    acc = st.DiffCovariance("cosine", "cosine", groups=8)
    acc.update(x, y)
    with pytest.raises(SpecError, match=r"replicates: .* needs about"):
        acc.compute(replicates=10**9)
    from spec_torch.uncertainty import estimate

    with pytest.raises(SpecError, match=r"replicates: .* needs about"):
        res = acc.compute()
        d = acc.xx.shape[0] + acc.yy.shape[0]
        estimate(
            acc.group_state,
            torch.eye(d, dtype=torch.float64),
            res.eigenvalues,
            res._u,
            eta=1.0,
            dx=5,
            zero_tol=0.0,
            replicates=10**9,
        )


# ----------------------------------------------------------------- seeds
def _train_settings(**kw):
    from spec_torch.apps.align.train import TrainSettings

    return TrainSettings(**kw)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y, s: st.spec(x, y, seed=s),
        lambda x, y, s: GaussianKernel(rff_dim=4, seed=s),
        lambda x, y, s: st.Nystrom("gaussian", landmarks=8, seed=s),
        lambda x, y, s: st.DiffCovariance(groups=4, group_seed=s),
        lambda x, y, s: st.DiffCovariance(groups=8).update(x, y).compute(replicates=4, seed=s),
        lambda x, y, s: st.spec_matrix({"a": x, "b": x[:, :3]}, seed=s),
        lambda x, y, s: st.rff_error_estimate(
            x, y, GaussianKernel(rff_dim=4), "cosine", seeds=(0, s), subsample=8
        ),
        lambda x, y, s: _train_settings(seed=s).check(),
    ],
    ids=["spec", "GaussianKernel", "Nystrom", "group_seed", "compute", "spec_matrix", "rff_error", "align"],
)
@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_seed_out_of_range_is_refused_and_the_largest_accepted(call, seed):
    """A seed outside 0 <= seed < 2**63 is one SpecError naming it (on main: 2**70 is an overflow traceback
    from torch.Generator, -1 is accepted here and refused there); 2**63 - 1 is accepted everywhere."""
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    with pytest.raises(SpecError, match=r"seeds?: expected an integer (with 0 <= \w*seeds? < 2\*\*63)?, got"):
        call(x, y, seed)
    call(x, y, 2**63 - 1)


# ----------------------------------------------------------------- DiffCovariance.load_state_dict
def _grouped(kx="cosine", ky=None, groups=4):
    ky = ky if ky is not None else GaussianKernel(sigma=1.0, rff_dim=6, seed=3)
    gen = torch.Generator().manual_seed(0)
    acc = st.DiffCovariance(kx, ky, groups=groups)
    for _ in range(3):
        acc.update(torch.randn(20, 5, generator=gen), torch.randn(20, 3, generator=gen))
    return acc


def _tamper(state, what):
    s = dict(state)
    if what == "count=0":
        s["count"] = 0
    elif what == "count off by one":
        s["count"] += 1
    elif what == "NaN in group counts":
        s["group_count"] = s["group_count"].clone()
        s["group_count"][1] = float("nan")
    elif what == "negative group count":
        s["group_count"] = s["group_count"].clone()
        s["group_count"][0] -= 100
        s["group_count"][1] += 100
    elif what == "fractional group count":
        s["group_count"] = s["group_count"].clone()
        s["group_count"][0] += 0.5
        s["group_count"][1] -= 0.5
    elif what == "Inf in xy":
        s["xy"] = s["xy"].clone()
        s["xy"][0, 0] = float("inf")
    elif what == "integer sums":
        s["sum_x"] = s["sum_x"].round().long()
    elif what == "cosine trace":
        s["xx"] = s["xx"] * 1.5
    elif what == "not PSD":
        s["yy"] = s["yy"].clone()
        s["yy"][1, 1] += s["yy"][0, 0] + 5.0  # trace kept, so only the PSD check sees it
        s["yy"][0, 0] = -5.0
    elif what == "group sums disagree":
        s["group_xy"] = s["group_xy"] * 1.01
    elif what == "bad group shape":
        s["group_xx"] = s["group_xx"][:2]
    elif what == "bad input_dtype":
        s["input_dtype"] = "int8"
    elif what == "bool dims":
        s["dims"] = [True, 3]
    return s


_BAD_STATES = {
    "count=0": "'count' is 0 but sums are saved",
    "count off by one": "trace of 'xx'|'group_count' sums to",
    "NaN in group counts": "'group_count' holds NaN",
    "negative group count": "'group_count' must hold whole numbers >= 0",
    "fractional group count": "'group_count' must hold whole numbers",
    "Inf in xy": "'xy' holds NaN or Inf",
    "cosine trace": "trace of 'xx' is .* must equal 'count'",
    "not PSD": "not positive semidefinite",
    "group sums disagree": "'group_xy' does not sum to 'xy'",
    "bad input_dtype": "'input_dtype' must be a float dtype name",
    "bool dims": "'dims' must be two integers",
}


@pytest.mark.parametrize("what", list(_BAD_STATES))
def test_covariance_load_validates_everything_before_assigning(what):
    """A tampered DiffCovariance state is refused naming the entry, and the accumulator is left exactly as it
    was: count, sums, group sums and kernels (on main: count=0 loads and divides by zero in compute, a NaN group
    count gives NaN intervals silently, a bad group entry raises after count and the kernels were replaced)."""
    saved = _roundtrip(_grouped().state_dict())
    target = _grouped(ky=GaussianKernel(sigma=1.0, rff_dim=6, seed=3))
    gen = torch.Generator().manual_seed(9)
    target.update(torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen))
    before = target.state_dict()
    kernels = (target.kernel_x, target.kernel_y)
    with pytest.raises(SpecError, match=_BAD_STATES[what]):
        target.load_state_dict(_tamper(saved, what))
    after = target.state_dict()
    assert (target.kernel_x, target.kernel_y) == kernels and after["count"] == before["count"] == 67
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key


def test_covariance_load_accepts_real_states_of_every_kind():
    """DiffCovariance states that state_dict writes still load.

    The consistency checks accept what state_dict writes: float32 and float64 sums, linear (no trace rule),
    Gaussian random features and cosine, with and without groups, and close embeddings (nearly singular C)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen)
    for kx, ky, dtype, groups in [
        ("cosine", "cosine", torch.float32, None),
        ("cosine", "cosine", None, 8),
        ("linear", GaussianKernel(sigma=2.0, rff_dim=16), None, None),
        ("linear", "linear", torch.float32, 4),
    ]:
        acc = st.DiffCovariance(kx, ky, accumulate_dtype=dtype, groups=groups)
        for xb in (x * 1e3).split(64):  # large magnitudes: rounding in the float32 sums
            acc.update(xb, xb + 1e-3 * torch.randn(xb.shape, generator=gen))
        fresh = st.DiffCovariance(kx, ky, accumulate_dtype=dtype, groups=groups)
        fresh.load_state_dict(_roundtrip(acc.state_dict()))
        assert fresh.n == 300
        assert torch.equal(fresh.compute().eigenvalues, acc.compute().eigenvalues)
    # nearly constant non-negative rows (a strong uniform mode: centring cancels almost all of XX), float32 sums
    # of 400 small batches, class-sorted
    base = torch.rand(4, 50, generator=gen).repeat_interleave(800, 0)  # [3200, 50], 4 classes in order
    rows = 1 + 1e-3 * base + 1e-4 * torch.rand(3200, 50, generator=gen)
    acc = st.DiffCovariance("cosine", "cosine", accumulate_dtype=torch.float32)
    for xb in rows.split(8):
        acc.update(xb, xb.flip(1))
    st.DiffCovariance("cosine", "cosine", accumulate_dtype=torch.float32).load_state_dict(acc.state_dict())


# ----------------------------------------------------------------- alignment checkpoints and train.csv
class _TinyClip(torch.nn.Module):
    """The parts of an open_clip model the trainer touches: a visual tower, a text tower, a logit scale."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
        self.text = torch.nn.Embedding(10, 6)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


class _Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, key):
        k, _ = key
        g = torch.Generator().manual_seed(k)
        return {"id": f"s{k}", "index": k, "image": torch.randn(3, 4, 4, generator=g), "text": ""}


class _Teacher:
    def lookup(self, ids):
        return torch.stack([torch.randn(5, generator=torch.Generator().manual_seed(int(i[1:]))) for i in ids])


def _trainer(out, steps=4):
    from spec_torch.apps.align.train import AlignTrainer, TrainSettings

    torch.manual_seed(0)
    settings = TrainSettings(
        steps=steps,
        batch_size=4,
        lr=1e-2,
        contrastive="off",
        w_clip=0.0,
        ckpt_every=2,
        log_every=1,
        heldout_every=100,
        progress=False,
        amp=False,
        warmup_steps=1,
    )
    loss = st.SpecAlignLoss("cosine", "cosine")
    return AlignTrainer(_TinyClip(), None, loss, _Samples(), _Teacher(), settings, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 2 steps (of 4) with its checkpoint and training log."""
    out = tmp_path_factory.mktemp("align_ckpt")
    trainer = _trainer(out)

    def stop(t):
        if t.step == 2:  # after the step-2 checkpoint
            raise _Stop

    with pytest.raises(_Stop):
        trainer.fit(on_step=stop)
    return out


class _Stop(Exception):
    pass


def _tampered_checkpoint(src, dst, what):
    state = torch.load(src / "checkpoints" / "last.pt", weights_only=True)
    if what == "step=-7":
        state["step"] = -7
    elif what == "step past steps":
        state["step"] = 99
    elif what == "step a string":
        state["step"] = "2"
    elif what == "resized tensor":
        state["model"]["visual.1.weight"] = torch.zeros(7, 48)
    elif what == "missing model tensor":
        del state["model"]["text.weight"]
    elif what == "NaN weight":
        state["model"]["visual.1.bias"][0] = float("nan")
    elif what == "missing optimizer entry":
        del state["optimizer"]["param_groups"]
    elif what == "resized optimizer moment":
        entry = next(iter(state["optimizer"]["state"].values()))
        entry["exp_avg"] = torch.zeros(3)
    elif what == "malformed RNG state":
        state["rng"]["torch"] = torch.zeros(5, dtype=torch.uint8)
    elif what == "numpy RNG keys out of range":
        state["rng"]["numpy"]["keys"] = torch.full((624,), 2**40)
    elif what == "python RNG state short":
        state["rng"]["python"]["state"] = state["rng"]["python"]["state"][:10]
    elif what == "non-integer data position":
        state["data"]["batch"] = 1.5
    elif what == "data position past the epoch":
        state["data"]["batch"] = 40
    elif what == "scheduler off the step":
        state["scheduler"]["last_epoch"] = 7
    elif what == "spec_loss buffer of another dtype":
        key = next(iter(state["spec_loss"]))
        state["spec_loss"][key] = state["spec_loss"][key].to(torch.float16)
    elif what == "world_size not an integer":
        state["world_size"] = "2"
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, dst / "checkpoints" / "last.pt")


_BAD_CHECKPOINTS = {
    "step=-7": r"'step' is -7, expected an integer in 0\.\.train\.steps = 4",
    "step past steps": r"'step' is 99",
    "step a string": r"'step' is '2'",
    "resized tensor": r"'model' 'visual.1.weight' is torch.float32 \[7, 48\], this run's model has .*\[6, 48\]",
    "missing model tensor": r"'model' does not match this run's model \(missing \['text.weight'\]",
    "NaN weight": r"'visual.1.bias' holds NaN",
    "missing optimizer entry": r"'optimizer' has no param_groups",
    "resized optimizer moment": r"'optimizer' state \d+.exp_avg has shape \[3\]",
    "malformed RNG state": r"'rng.torch' must be a uint8 tensor",
    "numpy RNG keys out of range": r"'rng.numpy.keys' must lie in",
    "python RNG state short": r"'rng.python.state' must be 625 integers",
    "non-integer data position": r"'data' is .*1.5",
    "data position past the epoch": r"'data' is .* batch in 0\.\.4",
    "scheduler off the step": r"'scheduler' has last_epoch 7",
    "spec_loss buffer of another dtype": r"'spec_loss\..*' must be a torch\.\w+ tensor",
    "world_size not an integer": r"'world_size' is '2'",
}


@pytest.mark.parametrize("what", list(_BAD_CHECKPOINTS))
def test_align_checkpoint_contents_are_validated_before_loading(trained, tmp_path, what):
    """A tampered alignment checkpoint (loaded with weights_only, so its contents are still untrusted) is refused
    in one SpecError naming train.resume and the field, and the trainer is left untouched (on main: step=-7 is
    accepted and trains 11 steps; resized tensors, a missing optimizer entry, a malformed RNG state or a
    non-integer data position are tracebacks)."""
    _tampered_checkpoint(trained, tmp_path, what)
    trainer = _trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(SpecError, match=r"^train\.resume: .*" + _BAD_CHECKPOINTS[what]):
        trainer.resume()
    assert trainer.step == 0 and all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_align_checkpoint_untampered_resumes(trained, tmp_path):
    """An untampered alignment checkpoint still resumes.

    The checks accept what the trainer writes: the run resumes at step 2 and finishes at 4."""
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    trainer = _trainer(tmp_path / "run")
    assert trainer.resume() and trainer.step == 2
    trainer.fit()
    assert trainer.step == 4


@pytest.mark.parametrize(
    "content",
    [
        b"step,epoch\nx,y\n",
        b"\x00\xff\xfe binary \x00\x00",
        None,  # the right header, a step that is not a number
        "short",  # the right header, a row with too few fields
    ],
    ids=["other columns", "binary", "non-numeric step", "short row"],
)
def test_corrupted_train_csv_on_resume_auto_is_one_error(trained, tmp_path, content):
    """A corrupted logs/train.csv beside a good checkpoint is refused on resume=auto in one SpecError naming
    train.resume and the log (on main: a ValueError/KeyError traceback from the CSV reader)."""
    import shutil

    from spec_torch.apps.align.train import CSV_FIELDS

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    header = ",".join(CSV_FIELDS) + "\n"
    if content is None:
        content = (header + "two," + ",".join(["1"] * (len(CSV_FIELDS) - 1)) + "\n").encode()
    elif content == "short":
        content = (header + "1,0,0.1\n").encode()
    (run / "logs" / "train.csv").write_bytes(content)
    trainer = _trainer(run)
    with pytest.raises(SpecError, match=r"^train\.resume: the training log .*train\.csv is damaged"):
        trainer.resume()
    assert trainer.step == 0


# ----------------------------------------------------------------- the command line: run_guarded and Hydra
def _guarded(cfg, run, capsys, code=2):
    from omegaconf import OmegaConf

    from spec_torch.apps.cli import run_guarded

    with pytest.raises(SystemExit) as exit_info:
        run_guarded(run, OmegaConf.create(cfg))
    err = capsys.readouterr().err
    assert exit_info.value.code == code and err.count("\n") == 1, err
    return err


def test_run_guarded_turns_eloop_and_nul_into_one_line(tmp_path, capsys):
    """ELOOP and an embedded NUL: one error line.

    ELOOP (a symlink loop or a refused link) and the embedded-NUL ValueError are one error: line, exit 2 (on
    main: tracebacks); another ValueError stays a traceback."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")

    def eloop(cfg):
        open(tmp_path / "loop")

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, eloop, capsys)
    assert err.startswith("error: cannot access ") and "loop" in err and "symbolic link" in err

    def nul(cfg):
        open(str(tmp_path / "a\0b"))

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, nul, capsys)
    assert err.startswith("error: a path holds a NUL byte")
    from omegaconf import OmegaConf

    from spec_torch.apps.cli import run_guarded

    with pytest.raises(ValueError, match="invalid literal"):
        run_guarded(lambda cfg: int("x"), OmegaConf.create({"output_dir": str(tmp_path), "seed": 0}))


def test_run_guarded_turns_ctrl_c_into_the_phase_line(tmp_path, capsys):
    """Ctrl-C in run_guarded: the phase's line, exit 130.

    KeyboardInterrupt is one line, the innermost phase's note (or 'interrupted'), exit status 130 (on main: a
    KeyboardInterrupt traceback)."""
    from spec_torch.apps.interrupt import interrupt_note

    def solve(cfg):
        raise KeyboardInterrupt

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, solve, capsys, code=130)
    assert err == "interrupted\n"

    def extracting(cfg):
        with interrupt_note(lambda: "interrupted; a rerun resumes from row 64"):
            raise KeyboardInterrupt

    err = _guarded({"output_dir": str(tmp_path), "seed": 0}, extracting, capsys, code=130)
    assert err == "interrupted; a rerun resumes from row 64\n"


def test_run_guarded_turns_an_unset_env_interpolation_into_one_line(tmp_path, capsys, monkeypatch):
    """An unset ${oc.env:...} in the config: one error line.

    ${oc.env:UNSET} resolved inside the run is one error: line naming the key (on main: an
    InterpolationResolutionError traceback)."""
    monkeypatch.delenv("SPEC_TORCH_SURELY_UNSET", raising=False)
    cfg = {"output_dir": str(tmp_path), "seed": 0, "data": {"root": "${oc.env:SPEC_TORCH_SURELY_UNSET}"}}
    err = _guarded(cfg, lambda c: c.data.root, capsys)
    assert err.startswith("error: data.root: ") and "SPEC_TORCH_SURELY_UNSET" in err


@pytest.mark.parametrize("seed", [2**70, -3])
def test_cli_seed_out_of_range_is_one_line(tmp_path, capsys, seed):
    """seed=2**70 (or -3) on the command line is one error: line (on main: an overflow traceback from
    torch.manual_seed)."""
    err = _guarded({"output_dir": str(tmp_path), "seed": seed}, lambda cfg: None, capsys)
    assert f"seed: expected an integer with 0 <= seed < 2**63, got {seed}" in err


def _cli(args, cwd, env_extra=None, timeout=120):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "spec_torch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("key", ["output_dir", "hydra.run.dir"])
def test_unset_env_interpolation_in_an_override_is_one_line(tmp_path, key):
    """key=${oc.env:UNSET} on the command line is one error: line naming the key and the variable, exit 2 (on
    main: Hydra's InterpolationResolutionError traceback, raised before the command's own guard)."""
    args = ["compare", "experiment=demo", f"{key}=${{oc.env:SPEC_TORCH_SURELY_UNSET}}"]
    if key != "hydra.run.dir":
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {key}: the environment variable 'SPEC_TORCH_SURELY_UNSET'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------- Ctrl-C: a real SIGINT at a known phase
def _sigint():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGINT)  # the default handler raises KeyboardInterrupt in this (main) thread


def test_ctrl_c_during_extraction_names_the_row_a_rerun_resumes_from(tmp_path, capsys):
    """Ctrl-C during extraction: 'a rerun resumes from row N'.

    SIGINT while embedding rows 12..15 (chunks of 8 rows checkpointed): one line 'interrupted; a rerun
    resumes from row 8', exit 130, and the rerun embeds only rows 8..23 (on main: a KeyboardInterrupt
    traceback)."""
    from omegaconf import OmegaConf

    from spec_torch.apps.cli import run_guarded
    from spec_torch.apps.data import build_dataset
    from spec_torch.apps.encoders import build_encoder
    from spec_torch.apps.extract import extract_features

    ds = build_dataset("synthetic", n=24, image_size=32)
    enc = build_encoder("offline_colour", image_size=16)
    rows, forward, fired = [], enc.forward, []

    def counting(batch):
        rows.append(batch.shape[0])
        if sum(rows) == 16 and not fired:  # the 4th batch of 4 rows: 8 rows checkpointed, 4 not yet
            fired.append(True)
            _sigint()
        return forward(batch)

    enc.forward = counting
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "out"), "seed": 0})

    def extract(_):
        extract_features(ds, enc, tmp_path / "c", batch_size=4, chunk_rows=8, progress=False)

    with pytest.raises(SystemExit) as exit_info:
        run_guarded(extract, cfg)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted; a rerun resumes from row 8\n"
    rows.clear()
    run_guarded(extract, cfg)
    assert sum(rows) == 24 - 8


def test_ctrl_c_during_align_training_names_the_checkpoint_step(trained, tmp_path, capsys):
    """Ctrl-C during align training: 'train.resume=auto resumes from step N'.

    SIGINT in step 4 of a run checkpointed every 2 steps: one line 'interrupted; `train.resume=auto` resumes
    from step 2', exit 130; resume=auto then continues from step 2 (on main: a KeyboardInterrupt traceback)."""
    from omegaconf import OmegaConf

    from spec_torch.apps.cli import run_guarded

    trainer = _trainer(tmp_path)
    step = trainer.train_step

    def interrupted_step(batch):
        if trainer.step == 3:  # training step 4: the checkpoint of step 2 is on disk
            _sigint()
        return step(batch)

    trainer.train_step = interrupted_step
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(lambda _: trainer.fit(), OmegaConf.create({"output_dir": str(tmp_path), "seed": 0}))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted; `train.resume=auto` resumes from step 2\n"
    again = _trainer(tmp_path)
    assert again.resume() and again.step == 2


_DRIVER = """
import sys
import spec_torch.api as api
from spec_torch.covariance import DiffCovariance

def interrupting(real):
    def call(*args, **kwargs):
        import os, signal
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return call

api.spec = interrupting(api.spec)  # the solve, on either route of the compare job
DiffCovariance.compute = interrupting(DiffCovariance.compute)
from spec_torch.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_the_solve_of_the_cli_is_one_line_and_status_130(tmp_path):
    """Ctrl-C during the CLI's solve: 'interrupted', exit 130.

    `spec-torch compare` receiving SIGINT when the solve starts prints 'interrupted' as its only stderr line
    (Hydra's log goes to stdout) and exits 130 (on main: a 77-line KeyboardInterrupt traceback)."""
    import os
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = ["compare", "experiment=demo", "data.n=64", f"hydra.run.dir={tmp_path / 'run'}"]
    args += [f"cache_dir={tmp_path / 'cache'}", "progress=false"]
    proc = subprocess.run(
        [sys.executable, str(driver), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == "interrupted", (
        proc.stderr
    )
    assert not (tmp_path / "run" / "spec.json").exists()


def _w_interrupted_rank(rank: int, port: int, out: str) -> None:
    import contextlib
    import datetime
    import io as _io
    from pathlib import Path

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from spec_torch.apps.cli import run_guarded
    from spec_torch.apps.interrupt import interrupt_note

    def extracting(_):
        with interrupt_note(lambda: "interrupted; a rerun resumes from row 32"):
            _sigint()  # every rank gets Ctrl-C (the terminal signals the whole process group)
            raise AssertionError("not interrupted")

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    err, code = _io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:  # run_guarded destroys the process group on the way out
            run_guarded(extracting, OmegaConf.create({"output_dir": str(Path(out) / "run"), "seed": 0}))
        except SystemExit as exc:
            code = exc.code
    Path(out, f"rank{rank}.txt").write_text(f"{code} {dist.is_initialized()}\n{err.getvalue()}")


def test_ctrl_c_under_torch_distributed_every_rank_exits_130_and_rank_0_alone_prints(tmp_path):
    """Ctrl-C under torch.distributed: every rank exits 130, rank 0 prints.

    Two Gloo ranks both interrupted: both exit 130 from run_guarded, rank 0 prints the phase line, rank 1
    prints nothing (on main: a KeyboardInterrupt traceback on every rank)."""
    from helpers import spawn_gloo

    spawn_gloo(_w_interrupted_rank, str(tmp_path), world=2, timeout_s=120)
    rank0 = (tmp_path / "rank0.txt").read_text()
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert rank0 == "130 False\ninterrupted; a rerun resumes from row 32\n"
    assert rank1 == "130 False\n"


# ----------------------------------------------------------------- odd values: empty labels, binary spec.json
@pytest.mark.parametrize("suffix", [".txt", ".npy", ".json", ".csv"])
def test_zero_byte_labels_file_is_one_error_naming_it(tmp_path, suffix):
    """A zero-byte data.labels_path is one SpecError naming the key and saying the file is empty, before any
    solve (on main: an EOFError traceback for .npy, a count mismatch for text)."""
    import numpy as np
    from hydra import compose, initialize_config_dir

    from spec_torch.apps.compare import run

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(30, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.normal(size=(30, 3)).astype(np.float32))
    labels = tmp_path / f"labels{suffix}"
    labels.write_bytes(b"")
    overrides = [
        "data=features",
        f"data.x_path={tmp_path / 'x.npy'}",
        f"data.y_path={tmp_path / 'y.npy'}",
        f"+data.labels_path={labels}",
        "report=false",
        "progress=false",
        f"output_dir={tmp_path / 'out'}",
    ]
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "spec_torch" / "apps" / "configs" / "compare"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name="compare", overrides=overrides)
    with pytest.raises(SpecError, match=r"^data\.labels_path: .*labels\.\w+ is empty \(0 bytes\)"):
        run(cfg)
    assert not (tmp_path / "out" / "spec.json").exists()


def test_summarize_warns_and_skips_a_binary_or_foreign_spec_json(tmp_path, caplog):
    """summarize: a binary or foreign spec.json is warned about and skipped.

    `spec-torch summarize DIR` with a binary spec.json, a JSON list and an object of other shapes among
    the runs: each is warned about and skipped, the good run is tabulated, exit 0 (on main: a
    UnicodeDecodeError / AttributeError traceback)."""
    import json
    import logging

    from spec_torch.apps.summarize import main

    good = {"n": 10, "spec_diff": 0.5, "modes": {"x": [{"eigenvalue": 0.5}], "y": []}, "metrics": {}}
    for name, content in [
        ("good", json.dumps(good).encode()),
        ("binary", bytes(range(256))),
        ("list", b"[1, 2]"),
        ("shape", b'{"modes": [1], "metrics": 3}'),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="spec_torch.apps.summarize"):
        assert main([str(tmp_path)]) == 0
    skipped = sorted(
        r.getMessage().split()[1].rstrip(":") for r in caplog.records if r.getMessage().startswith("skipping")
    )
    assert skipped == [str(tmp_path / d / "spec.json") for d in ("binary", "list", "shape")]
    assert (tmp_path / "summary.csv").read_text().count("\n") == 2  # header and the good run
