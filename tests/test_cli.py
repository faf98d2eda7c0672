"""The `rpg-dist` console script: every subcommand has --help; prepare/synth work; errors exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RPG = str(Path(sys.executable).parent / "rpg-dist")
SUBCOMMANDS = ["prepare", "synth", "tokenize", "train", "build-graph", "evaluate", "run", "recommend", "add-items", "withdraw-items", "serve", "submit"]


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


def test_a_ray_address_that_cannot_be_joined_is_one_line(tmp_path):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    out = _run("tokenize", "--config", str(cfg), "--set", f"run_dir={tmp_path / 'run'}", "--set",
               "ray.address=not-an-address")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rpg-dist tokenize: error: ray: could not join the Ray cluster at ray.address 'not-an-address'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_override_is_reported(tmp_path):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    out = _run("train", "--config", str(cfg), "--set", "train.lrr=1")
    assert out.returncode == 2
    assert "train has no key 'lrr'; valid keys are" in out.stderr


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """``rpg-dist ARGV`` in this process: (exit code, stderr); argparse's exits included."""
    from rpg_dist.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


BAD_CONFIGS = [
    # (YAML text, the message naming the field)
    ("train:\n  lr: .nan\n", "train.lr: expected a finite number, got nan"),
    ("train:\n  grad_clip: .inf\n", "train.grad_clip: expected a finite number, got inf"),
    ("model:\n  temperature: -.inf\n", "model.temperature: expected a finite number"),
    ("ray:\n  num_cpus: -1\n", "ray.num_cpus: -1 must be >= 1"),
    ("train:\n  warmup_fraction: 1.5\n", "train.warmup_fraction: 1.5 must be in [0, 1)"),
    (b"train:\n  lr: \xff\n", "line 2 (byte 13) is not UTF-8 text"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_config_values_are_one_line_errors(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = _main(["train", "--config", str(path), "--set", f"dataset={tmp_path}", "--set", f"run_dir={tmp_path}"],
                      capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; the config still takes it as the number it is."""
    from rpg_dist.config import load_config

    path = tmp_path / "sci.yaml"
    path.write_text(f"dataset: {tmp_path}\nrun_dir: {tmp_path}\ntrain:\n  lr: 1e-3\n")
    assert load_config(str(path)).train.lr == 1e-3
    assert load_config(str(path), ["train.lr=2e-3"]).train.lr == 2e-3


@pytest.mark.parametrize("argv, message", [
    (["synth", "--items", "0", "--users", "10"], "argument --items: must be >= 1, got 0"),
    (["synth", "--items", "100", "--users", "-5"], "argument --users: must be >= 1, got -5"),
    (["synth", "--items", "ten", "--users", "5"], "argument --items: expected a whole number"),
])
def test_bad_synth_sizes_are_usage_errors(argv, message, tmp_path, capsys):
    code, err = _main([*argv, "--out", str(tmp_path / "ds")], capsys)
    assert code == 2 and message in err and not (tmp_path / "ds").exists()


def test_output_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    code, err = _main(["synth", "--items", "50", "--users", "20", "--out", str(target)], capsys)
    assert code == 2 and "is a file; a dataset is a folder" in err
    assert target.read_text() == "keep me"


def test_a_run_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: {tmp_path / 'ds'}\nrun_dir: {blocker}\n")
    code, err = _main(["train", "--config", str(config)], capsys)
    assert code == 2 and f"{blocker}: cannot be used as a run directory" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_a_locked_run_dir_refuses_a_second_process_until_the_holder_dies(tmp_path, capsys):
    """Two processes on one run directory: the second refuses, naming the holder; a holder killed
    with SIGKILL leaves nothing locked (the kernel drops its flock)."""
    from rpg_dist.runlock import run_dir_lock

    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom rpg_dist.runlock import run_dir_lock\n"
         "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()", run_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = tmp_path / "c.yaml"
        config.write_text(f"dataset: {tmp_path / 'ds'}\nrun_dir: {run_dir}\n")
        for argv in (["train", "--config", str(config)], ["run", "--config", str(config)]):
            code, err = _main(argv, capsys)
            assert code == 2 and f"in use by pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(run_dir):
        with pytest.raises(Exception, match="in use by pid"):
            with run_dir_lock(run_dir):  # a second holder, even in the same process
                pass
