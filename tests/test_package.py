"""The two layers and the command: ``import spec_torch`` stays light, the library runs without the ``[apps]``
extra, ``spec-torch`` dispatches to each command with its own presets, ``run()`` starts from the packaged
defaults, a user's own class is named by ``_target_``, every override the docs print composes, and a wheel
installed in a fresh venv runs the demo from outside the repo."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, ROOT, run_cli
from omegaconf import OmegaConf

from spec_torch.apps.config import compose, config_dir, load_config
from spec_torch.errors import SpecError

#: what the application needs and the library must not load (not tqdm: ``import torch`` itself loads it)
APP_MODULES = (
    "open_clip", "timm", "hydra", "omegaconf", "matplotlib", "sklearn", "tensorboard", "torchvision",
    "scipy", "PIL", "safetensors", "jinja2", "sentence_transformers", "spec_torch.apps",
)  # fmt: skip


def _python(code: str, *, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd or ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- layers
def test_import_spec_torch_loads_no_application_dependency():
    proc = _python(
        f"""
        import sys
        import spec_torch, spec_torch.loss, spec_torch.collectives
        print([m for m in {APP_MODULES!r} if m in sys.modules])
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import spec_torch loaded {proc.stdout.strip()}"


def test_library_runs_without_the_apps_extra_and_apps_name_the_extra():
    """Every application package made unimportable (as in a venv with only torch, numpy, psutil): st.spec and
    SpecAlignLoss (forward and backward) work; importing the application names the extra to install."""
    proc = _python(
        f"""
        import importlib.abc, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {[m for m in APP_MODULES if "." not in m]!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Missing())
        import torch, spec_torch as st
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)
        res = st.spec(x, y, kernel_x="cosine", kernel_y="linear")
        s = torch.randn(32, 6, generator=g, requires_grad=True)
        loss = st.SpecAlignLoss()(s, torch.randn(32, 4, generator=g))
        loss.backward()
        print("library ok", res.spec_diff > 0, bool(s.grad.abs().sum() > 0))
        try:
            import spec_torch.apps.compare
        except ModuleNotFoundError as exc:
            print("apps:", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "library ok True True" in proc.stdout
    assert 'pip install ".[apps]"' in proc.stdout and "hydra-core" in proc.stdout


# --------------------------------------------------------------------------------------------- command


def _presets(command: str) -> set[str]:
    return {p.stem for p in (config_dir(command) / "experiment").glob("*.yaml")}


def test_each_command_help_lists_only_its_own_presets():
    compare, align = _presets("compare"), _presets("align")
    assert "demo" in compare and "align_tiny" in align and not compare & align
    for command, own, other in (("compare", compare, align), ("align", align, compare)):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0, proc.stderr
        listed = re.search(r"experiment: (.*)", proc.stdout).group(1)
        assert set(listed.split(", ")) == own, (command, listed)
        assert not any(p in proc.stdout for p in other)
        # the groups every command shares, under the keys this command chooses them by
        x, y = ("encoder_x", "encoder_y") if command == "compare" else ("student", "teacher")
        for group, keys, member in (
            ("data", "data", "synthetic"),
            ("encoder", f"encoder@{x}, encoder@{y}", "minilm"),
        ):
            listed = re.search(rf"^{re.escape(keys)}: (.*)$", proc.stdout, re.M)
            assert listed, (command, group, proc.stdout[:600])
            options = {p.stem for p in (config_dir() / group).glob("*.yaml")}
            assert set(listed.group(1).split(", ")) == options and member in options, (command, group)


def test_top_level_usage_and_unknown_command():
    proc = run_cli()
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("compare", "align", "summarize"))
    proc = run_cli("comapre")
    assert proc.returncode == 2 and "unknown command 'comapre'" in proc.stderr


@pytest.fixture()
def features(tmp_path) -> dict[str, Path]:
    """Two small embeddings of the same 40 samples: x holds two planted groups (26 and 14), y does not."""
    rng = np.random.default_rng(0)
    group = np.repeat([0, 1], [26, 14])  # unequal sizes: no tie between the two groups' modes
    x = rng.normal(size=(40, 6)) + 5.0 * np.eye(6)[group]  # x separates the groups
    y = rng.normal(size=(40, 4))  # y does not
    paths = {"x": tmp_path / "x.npy", "y": tmp_path / "y.npy"}
    np.save(paths["x"], x.astype(np.float32))
    np.save(paths["y"], y.astype(np.float32))
    return paths


def test_python_m_compare_runs_or_fails_loudly(tmp_path, features):
    out = tmp_path / "run"
    base = ["data=features", f"data.x_path={features['x']}", f"data.y_path={features['y']}"]
    proc = subprocess.run(
        [sys.executable, "-m", "spec_torch.apps.compare", *base, "report=false", f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "spec.json").read_text())["n"] == 40
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spec_torch.apps.compare",
            "data=features",
            f"hydra.run.dir={tmp_path / 'no'}",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "data.x_path" in proc.stderr and "Traceback" not in proc.stderr


def test_user_class_by_target_from_a_user_config_dir(tmp_path, features):
    """``--config-dir`` adds the user's folder to the search path; its kernel names a class by ``_target_``."""
    mine = tmp_path / "my_configs" / "kernel"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("_target_: spec_torch.kernels.LinearKernel\n")
    out = tmp_path / "run"
    proc = run_cli(
        "compare",
        "--config-dir",
        str(tmp_path / "my_configs"),
        "data=features",
        f"data.x_path={features['x']}",
        f"data.y_path={features['y']}",
        "kernel@kernel_x=mine",
        "report=false",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "spec.json").read_text())["kernel_x"]["name"] == "linear"


# ----------------------------------------------------------------------------------- run(overrides)
def test_load_config_merges_partial_settings_onto_the_packaged_defaults(tmp_path):
    default = load_config("compare")
    assert default.data.name == "synthetic" and default.top_k == 3
    assert str(default.output_dir).startswith("outputs/compare/")  # Hydra's run dir, outside Hydra too
    cfg = load_config("compare", ["experiment=demo", "top_k=5", f"hydra.run.dir={tmp_path}"])
    assert cfg.top_k == 5 and cfg.output_dir == str(tmp_path) and "hydra" not in cfg
    cfg = load_config(
        "compare", {"top_k": 2, "data": "features", "data.x_path": "a.npy", "encoder_x": "minilm"}
    )
    assert (cfg.top_k, cfg.data.name, cfg.data.x_path, cfg.encoder_x.family) == (
        2,
        "features",
        "a.npy",
        "minilm",
    )
    assert "image_size" not in cfg.encoder_x, "a group choice replaces the node, no stale keys"
    partial = OmegaConf.create({"eta": 0.5, "kernel_x": {"name": "gaussian", "sigma": 2.0}})
    cfg = load_config("compare", partial)
    assert (cfg.eta, cfg.kernel_x.name, cfg.kernel_x.sigma, cfg.kernel_y.name) == (
        0.5,
        "gaussian",
        2.0,
        "cosine",
    )
    full = compose("compare", ["top_k=4"])
    assert load_config("compare", full) is full  # a complete config (from @hydra.main) is used as it is
    assert load_config("align", {"train": {"steps": 7}}).train.steps == 7
    with pytest.raises(SpecError, match="overrides: .*no_such_preset"):
        load_config("compare", ["experiment=no_such_preset"])


def test_run_from_a_notebook_with_a_dict(tmp_path, features):
    from spec_torch.apps.compare import run

    summary = run(
        {
            "data": "features",
            "data.x_path": str(features["x"]),
            "data.y_path": str(features["y"]),
            "report": False,
            "output_dir": str(tmp_path / "nb"),
            "top_k": 1,
        }
    )
    assert summary["n"] == 40 and (tmp_path / "nb" / "spec.json").is_file()
    assert len(summary["modes"]["x"]) == 1


# ------------------------------------------------------------------------ every printed override works
_COMMAND = re.compile(
    r"(?:spec-torch|python -m spec_torch|python scripts/|torchrun [^\n]*?scripts/)\s*(compare|align)(?:\.py)?\b"
)


def _documented_command_lines() -> list[tuple[str, str, list[str]]]:
    """``(where, command, overrides)`` of every command line in README, docs/ and the scripts' docstrings."""
    found = []
    for path in [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "scripts").glob("*.py")),
    ]:
        text = path.read_text().replace("\\\\\n", " ").replace("\\\n", " ")
        for line in text.splitlines():
            m = _COMMAND.search(line)
            if not m:
                continue
            rest = line[m.end() :].split("#")[0].split("`")[0]
            try:
                tokens = shlex.split(rest)
            except ValueError:
                continue
            overrides = [t for t in tokens if "=" in t and not t.startswith(("-", "hydra.", "--"))]
            if "-m" in tokens or "--multirun" in tokens:  # a sweep: compose its first run
                overrides = [t.split(",")[0] for t in overrides]
            found.append((f"{path.name}: {line.strip()}", m.group(1), overrides))
    return found


def test_every_documented_override_composes():
    lines = _documented_command_lines()
    assert len(lines) >= 10, lines  # README, docs and scripts show many
    for where, command, overrides in lines:
        try:
            compose(command, overrides)
        except Exception as exc:  # noqa: BLE001 - report which documented line fails
            pytest.fail(f"{where}\n  -> {type(exc).__name__}: {exc}")


@pytest.mark.parametrize(
    "command, overrides",
    [  # the overrides that error messages print (encoders' "give encoder_x.checkpoint=/path/to/weights")
        ("compare", ["encoder@encoder_x=open_clip_vit_b32", "encoder_x.checkpoint=/path/to/weights"]),
        ("compare", ["encoder@encoder_y=torchvision_resnet50", "encoder_y.checkpoint=/path/to/file.pth"]),
        ("align", ["student.checkpoint=/path/to/weights", "teacher.checkpoint=/path/to/weights"]),
        ("compare", ["output_dir=/tmp/x", "data=features", "data.x_path=a.npy", "data.y_path=b.npy"]),
    ],
)
def test_overrides_printed_by_errors_compose(command, overrides):
    compose(command, overrides)


def test_encoder_errors_print_the_override_of_their_config_key(tmp_path):
    from spec_torch.apps.compare import _build_encoder

    with pytest.raises(SpecError) as info:
        _build_encoder({"family": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}, "encoder_y")
    msg = str(info.value)
    assert msg.startswith("encoder_y") and "encoder_y.checkpoint=" in msg and "encoder.checkpoint" not in msg


# --------------------------------------------------------------------------------------------- wheel
@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_compare_and_align_outside_the_repo(tmp_path):
    """The issue's recipe: build the wheel without isolation (offline), install it with --no-deps into a fresh
    venv that sees the dependencies through a .pth file, and run the command from a folder outside the repo."""
    import shutil

    # built from a copy of the tree: setuptools' build/ (with files of earlier builds) stays out of the repo
    src = tmp_path / "src"
    junk = (
        ".git",
        ".venv",
        "build",
        "outputs",
        "multirun",
        ".cache",
        "__pycache__",
        "*.egg-info",
        ".*_cache",
    )
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*junk))
    wheels = tmp_path / "wheels"
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)]
    build = subprocess.run(
        [sys.executable, "-m", *pip_wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if build.returncode != 0:
        pytest.skip(f"the wheel cannot be built offline here: {build.stderr.strip()[-300:]}")
    with zipfile.ZipFile(next(wheels.glob("spec_torch-*.whl"))) as whl:  # configs ship inside the package
        names = set(whl.namelist())
    for cfg in (
        "compare/compare.yaml",
        "compare/experiment/demo.yaml",
        "align/align.yaml",
        "kernel/cosine.yaml",
    ):
        assert f"spec_torch/apps/configs/{cfg}" in names, cfg
    (wheel,) = wheels.glob("spec_torch-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the dev venv's packages
    py = venv / "bin" / "python"
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    # --ignore-installed: through the .pth the dev venv's own (editable) spec_torch is visible to pip
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--ignore-installed",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    env["SPEC_TORCH_CACHE"] = str(tmp_path / "cache")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(venv / "bin" / "spec-torch"), *args],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    where = subprocess.run(
        [str(py), "-c", "import sys, spec_torch; print(spec_torch.__file__, 'spec_torch.apps' in sys.modules)"],
        cwd=outside, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert str(venv) in where.stdout and where.stdout.strip().endswith("False"), where.stdout + where.stderr
    out = outside / "OUT"
    run("compare", "experiment=demo", f"hydra.run.dir={out}", "data.n=120", "progress=false")
    assert (out / "spec.json").is_file() and (out / "report.html").is_file()
    aligned = outside / "ALIGN"
    run(
        "align", "experiment=align_tiny", f"hydra.run.dir={aligned}", "data.n=96", "heldout=32", "train.steps=2",
        "train.batch_size=16", "train.heldout_every=2", "train.ckpt_every=2", "eval.teacher_clusters=2",
        "progress=false",
    )  # fmt: skip
    assert (aligned / "results.json").is_file()


def test_features_take_labels_and_display_names(tmp_path, features):
    """data=features with data.labels_path / data.names_path: label composition and names per mode; the
    names need not be unique (the row ids stay the unique key)."""
    from spec_torch.apps.compare import run

    group = np.repeat(["planted", "rest"], [26, 14])
    (tmp_path / "labels.txt").write_text("\n".join(group) + "\n")
    (tmp_path / "names.json").write_text(json.dumps([f"photo of {g}" for g in group]))  # repeated names
    summary = run(
        {
            "data": "features",
            "data.x_path": str(features["x"]),
            "data.y_path": str(features["y"]),
            "data.labels_path": str(tmp_path / "labels.txt"),
            "data.names_path": str(tmp_path / "names.json"),
            "top_k": 1,
            "samples_per_mode": 5,
            "output_dir": str(tmp_path / "run"),
        }
    )
    mode = summary["modes"]["x"][0]
    assert mode["labels"][0][1] == 1.0 and mode["labels"][0][0] in {"planted", "rest"}  # one group, pure
    assert mode["top_texts"] == [f"photo of {mode['labels'][0][0]}"] * 5
    assert len(set(mode["top_ids"])) == 5 and all(i.startswith("row:") for i in mode["top_ids"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "photo of" in html and "label" in html
    with pytest.raises(SpecError, match="data.labels_path: expected 40 labels"):
        (tmp_path / "short.txt").write_text("a\nb\n")
        run({"data": "features", "data.x_path": str(features["x"]), "data.y_path": str(features["y"]),
             "data.labels_path": str(tmp_path / "short.txt"), "output_dir": str(tmp_path / "bad")})  # fmt: skip


def test_summarize_one_row_per_finished_run(tmp_path, capsys):
    """spec-torch summarize DIR: a row per spec.json / results.json with the overrides Hydra recorded."""
    from spec_torch.apps.summarize import collect, main

    for i, eta in enumerate((0.5, 1.0)):
        run_dir = tmp_path / str(i)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- eta={eta}\n- top_k=2\n")
        spec = {"n": 40, "spec_diff": 0.1 * (i + 1), "modes": {"x": [{"eigenvalue": 0.1}], "y": []},
                "metrics": {"linear_cka": 0.5, "mutual_knn": {"value": 0.2}}}  # fmt: skip
        (run_dir / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "2").mkdir()  # an unfinished run: no spec.json, no row
    align = {"before": {"heldout": {"spec_diff": 0.5}}, "after": {"heldout": {"spec_diff": 0.1}}, "steps": 3}
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "results.json").write_text(json.dumps(align))
    rows = collect(tmp_path)
    assert [r["run"] for r in rows] == ["0", "1", "3"]
    assert rows[1]["overrides"] == "eta=1.0 top_k=2" and rows[1]["spec_diff"] == 0.2
    assert rows[0]["top_eigenvalue_y"] is None and rows[2]["spec_diff_before"] == 0.5
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eta=0.5 top_k=2" in out and (tmp_path / "summary.csv").read_text().count("\n") == 4
    with pytest.raises(SpecError, match="DIR: no finished run"):
        main([str(tmp_path / "2")])
