"""The `rpg-dist` console script: every subcommand has --help; prepare/synth work; errors exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RPG = str(Path(sys.executable).parent / "rpg-dist")
SUBCOMMANDS = ["prepare", "synth", "tokenize", "train", "build-graph", "evaluate", "run", "recommend", "submit"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RPG, *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name):
    out = _run(name, "--help")
    assert out.returncode == 0, out.stderr
    assert f"usage: rpg-dist {name}" in out.stdout


def test_prepare_beauty_via_cli(beauty_raw, tmp_path):
    out = _run("prepare", "--format", "s3rec", "--input", str(beauty_raw), "--out", str(tmp_path / "ds"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["n_users"], info["n_items"], info["n_interactions"]) == (22_363, 12_101, 198_502)
    again = _run("prepare", "--format", "s3rec", "--input", str(beauty_raw), "--out", str(tmp_path / "ds"))
    assert again.returncode == 2 and "pass --overwrite" in again.stderr


def test_synth_via_cli(tmp_path):
    out = _run("synth", "--items", "200", "--users", "100", "--out", str(tmp_path / "ds"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n_items"] == 200


def test_errors_are_one_line_without_traceback(tmp_path):
    out = _run("prepare", "--format", "s3rec", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "ds"))
    assert out.returncode == 2
    assert "rpg-dist prepare: error:" in out.stderr and "items.jsonl: file not found" in out.stderr
    assert "Traceback" not in out.stderr
    bad = _run("train", "--config", str(tmp_path / "nope.yaml"))
    assert bad.returncode == 2 and "config file not found" in bad.stderr


def test_bad_override_is_reported(tmp_path):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    out = _run("train", "--config", str(cfg), "--set", "train.lrr=1")
    assert out.returncode == 2
    assert "train has no key 'lrr'; valid keys are" in out.stderr
