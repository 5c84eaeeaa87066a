"""A newcomer's first hour with ``spec-torch`` (issue 18): a misspelt key gets "did you mean", never Hydra's
``+key`` advice; a ``+key`` nothing reads is warned about; an unknown preset is one ``error:`` line with the
choices; without the ``[apps]`` extra the command says how to install it; ``verbose: false`` keeps other
libraries' INFO lines out; ``summarize --help`` is plain text; the README's install commands work.

Each test fails on the main branch before this change (said per test)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from helpers import ENV, ROOT, run_cli

from spec_torch.apps.config import check_overrides
from spec_torch.apps.logs import quiet_third_party
from spec_torch.errors import SpecError


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (exit 2, nothing else on stderr, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ overrides
def test_misspelt_key_gets_did_you_mean_and_never_the_plus_advice(tmp_path):
    """Main: Hydra's "To append to your config use +top_kk=5" (exit 1), and +top_kk=5 then ran with top_k 3."""
    line = _error_line(run_cli("compare", "top_kk=5", cwd=tmp_path))
    assert "top_kk" in line and "did you mean top_k?" in line and "+top_kk" not in line
    with pytest.raises(SpecError, match=r"data\.nn: .* did you mean data\.n\?"):
        check_overrides("compare", ["data.nn=3"])
    with pytest.raises(SpecError, match="did you mean"):
        check_overrides("align", ["train.stepz=2"])
    with pytest.raises(SpecError, match=r"^zzz: spec-torch compare has no such setting \("):  # nothing close
        check_overrides("compare", ["zzz=1"])
    assert (
        check_overrides("compare", ["top_k=5", "data=features", "data.x_path=a.npy", "-m", "eta=0.5,1"]) == []
    )
    assert check_overrides("compare", ["hydra/job_logging=disabled", "hydra.run.dir=x", "~center"]) == []


def test_a_plus_key_that_nothing_reads_is_warned_about(tmp_path):
    """Main: +top_kk=5 ran silently with top_k unchanged."""
    proc = run_cli("compare", "+top_kk=5", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and "+top_kk=5" in warn[0] and "did you mean top_k?" in warn[0], proc.stderr
    assert check_overrides("compare", ["++top_k=5"]) == []  # an existing key: read


def test_unknown_preset_is_one_error_line_with_the_choices(tmp_path):
    """Main: about 14 lines of Hydra output (search path, options) and exit 1."""
    line = _error_line(run_cli("compare", "kernel@kernel_x=cosin", cwd=tmp_path))
    assert line == (
        "error: kernel@kernel_x: unknown option 'cosin'; choices: cosine, gaussian, linear, nystrom; "
        "did you mean cosine?"
    )
    with pytest.raises(
        SpecError, match=r"experiment: unknown option 'dmo'; choices: demo, .*did you mean demo"
    ):
        check_overrides("compare", ["experiment=dmo"])
    with pytest.raises(SpecError, match="unknown option 'lnear'"):  # each value of a sweep
        check_overrides("compare", ["-m", "kernel@kernel_x=cosine,lnear"])


# ------------------------------------------------------------------------------------- the apps extra
_BLOCKED = """
    import importlib.abc, runpy, sys

    class Missing(importlib.abc.MetaPathFinder):  # a venv with the library only: no Hydra, no omegaconf
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hydra", "omegaconf", "open_clip"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    sys.argv = ["spec-torch", *sys.argv[1:]]
    runpy.run_module("spec_torch", run_name="__main__")
"""


@pytest.mark.parametrize("args", [[], ["compare", "experiment=demo"]])
def test_without_the_apps_extra_the_command_is_one_error_line(args):
    """Main: a 10-line traceback (spec_torch.apps raised ModuleNotFoundError on import)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BLOCKED), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = _error_line(proc)
    assert "[apps] extra" in line and "hydra-core" in line and 'pip install ".[apps]"' in line
    assert "Traceback" not in proc.stderr


def test_without_the_apps_extra_help_says_how_to_install():
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BLOCKED), "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert 'pip install ".[apps]"' in proc.stdout and ".whl[apps]" in proc.stdout
    assert "open_clip_torch" in proc.stdout


# ------------------------------------------------------------------------------------------------ logs
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append((record.name, record.getMessage()))


def test_verbose_false_keeps_other_libraries_info_out_and_spec_torch_info_in():
    """open_clip logs through the root logger (``logging.info``): main let those lines through."""
    root = logging.getLogger()
    handler, level = _Records(), root.level
    root.addHandler(handler)  # stands for Hydra's console and <command>.log handlers
    root.setLevel(logging.INFO)
    try:
        quiet_third_party(verbose=False)
        logging.info("open_clip: loading weights")  # the root logger, as open_clip does
        logging.getLogger("some_library").info("some library's chatter")
        logging.getLogger("spec_torch.apps.compare").info("our phase line")
        logging.warning("a real warning")
        assert handler.names == [("spec_torch.apps.compare", "our phase line"), ("root", "a real warning")]
        handler.names.clear()
        quiet_third_party(verbose=True)
        logging.info("open_clip: loading weights")
        assert handler.names == [("root", "open_clip: loading weights")]
    finally:
        quiet_third_party(verbose=True)
        root.removeHandler(handler)
        root.setLevel(level)


# ------------------------------------------------------------------------------------------------ help
def test_summarize_help_is_plain_text():
    """Main printed the docstring's rst markup (````spec-torch summarize DIR````)."""
    proc = run_cli("summarize", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout and "::" not in proc.stdout and ":func:" not in proc.stdout
    assert "spec-torch summarize DIR: one table" in proc.stdout
    assert "    spec-torch summarize multirun/eta" in proc.stdout  # the example keeps its lines


# ---------------------------------------------------------------------------------------------- README
def _install_block() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*With pip\*\*.*?```bash\n(.*?)```", text, flags=re.S)
    assert block, "README.md: no install block under **With pip**"
    return block.group(1)


def test_readme_installs_by_path_not_from_an_index():
    """Main: ``pip install spec_torch`` and ``pip install "spec_torch[apps]"``, which fail (not on any index)."""
    commands = [ln.split("#")[0].strip() for ln in _install_block().splitlines() if ln.startswith("pip ")]
    for cmd in commands:
        assert not re.search(r"pip install \"?spec_torch\b", cmd), cmd
    assert 'pip install ".[apps]"' in commands
    version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    wheel = f"dist/spec_torch-{version}-py3-none-any.whl"
    assert f'pip install "{wheel}[apps]"' in commands  # the name the wheel is built under


@pytest.mark.slow
def test_readme_install_commands_work_offline(tmp_path):
    """Run the README's pip commands as printed (offline: no index, no build isolation, dependencies from this
        environment) in a copy of the clone, each into a fresh venv, and from helpers import run_cli

    import spec_torch from there."""
    src = tmp_path / "clone"
    junk = (".git", ".venv", "build", "dist", "outputs", "multirun", ".cache", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*junk, ".*_cache"))
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "-q"]
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    venvs = {}

    def venv(name: str) -> Path:
        path = tmp_path / name
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
        site = next((path / "lib").glob("python3*/site-packages"))
        (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, hydra, ... from here
        return path

    commands = [ln.split("#")[0].strip() for ln in _install_block().splitlines() if ln.startswith("pip ")]
    for i, cmd in enumerate(commands):
        words = cmd.split()[1:]  # after "pip"
        words = [w.strip('"') for w in words]
        if words[0] == "install":
            venvs[i] = venv(f"venv{i}")
            words = [
                "--python",
                str(venvs[i] / "bin" / "python"),
                "install",
                "--ignore-installed",
                *words[1:],
            ]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", *words, *offline],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0 and "build" in proc.stderr and "setuptools" in proc.stderr:
            pytest.skip(f"cannot build offline here: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    for path in venvs.values():
        where = subprocess.run(
            [str(path / "bin" / "python"), "-c", "import spec_torch; print(spec_torch.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert str(path) in where.stdout, where.stdout + where.stderr
