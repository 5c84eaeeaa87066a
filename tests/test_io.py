"""Atomic output: a failed write leaves the target as it was and no temporary file behind."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from spec_torch.apps._io import atomic_path, atomic_write_json, atomic_write_text, prepare_output_dir
from spec_torch.errors import SpecError


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "spec.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


def test_json_refuses_nan_without_touching_the_target(tmp_path):
    target = tmp_path / "out" / "a.json"  # the folder is created
    atomic_write_json(target, {"x": 1.5})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert json.loads(target.read_text()) == {"x": 1.5}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_output_dir_must_be_writable(tmp_path):
    assert prepare_output_dir(OmegaConf.create({"output_dir": str(tmp_path / "run")})).is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpecError, match="output_dir: .* is not a writable directory"):
        prepare_output_dir(OmegaConf.create({"output_dir": str(blocker / "run")}))
