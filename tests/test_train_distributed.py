"""Multi-process training: ZeRO-1/2/3 over 2 gloo processes under torchrun follow the one-process
loss trajectory, Ray Train's 2 workers train on the one process's shuffled batches, and Ray Train
survives a killed worker (real processes, real Ray)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.train import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from conftest import free_port  # noqa: E402
from test_train import DEBUG_CONFIG, debug_config, logged_losses, new_run  # noqa: E402

BIN = Path(sys.executable).parent
# Same global batches in every launcher (no shuffle) and no dropout: the runs must then agree to
# float rounding (gradient all-reduce and ZeRO partitioning change the summation order only).
SAME_BATCHES = ["train.shuffle=false", "model.embd_dropout=0", "model.attn_dropout=0",
                "train.max_steps=4", "train.log_every=1", "train.torch_threads=1"]
TOLERANCE = 1e-5


def torchrun(run_dir: str, dataset: str, overrides: list[str], tmp_path: Path) -> dict:
    summary = tmp_path / f"summary-{Path(run_dir).name}.json"
    sets = [arg for o in [f"dataset={dataset}", f"run_dir={run_dir}", *overrides] for arg in ("--set", o)]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "rpg_dist.train.torchrun_main", "--config", DEBUG_CONFIG, *sets, "--summary-out", str(summary)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(summary.read_text())


@pytest.mark.slow
def test_torchrun_zero1_2_3_follow_the_single_process_losses(synth_dataset, tmp_path):
    from rpg_dist.train.stage import train

    single = new_run(synth_dataset, str(tmp_path / "single"))
    train(debug_config(synth_dataset, single, *SAME_BATCHES))
    reference = logged_losses(single)
    assert len(reference) == 4
    for stage in (1, 2, 3):
        run_dir = new_run(synth_dataset, str(tmp_path / f"zero{stage}"))
        summary = torchrun(run_dir, synth_dataset, [*SAME_BATCHES, f"train.zero_stage={stage}"], tmp_path)
        assert summary["world_size"] == 2 and summary["zero_stage"] == stage
        np.testing.assert_allclose(logged_losses(run_dir), reference, rtol=0, atol=TOLERANCE)
        if stage >= 2:
            # Partitioned optimizer (and for ZeRO-3 parameter) states resume through the restricted
            # unpickler (train/checkpoint.tensors_only): one more epoch from the committed checkpoint.
            more = torchrun(run_dir, synth_dataset, [*SAME_BATCHES, f"train.zero_stage={stage}", "train.max_steps=6"], tmp_path)
            assert more["resumed_from_step"] == summary["steps"] and more["steps"] > summary["steps"]
        # The exported model is complete even though ZeRO-3 kept parameters partitioned.
        from rpg_dist.model.export import load_model

        assert load_model(run_dir).token_embeddings.abs().sum() > 0


@pytest.mark.slow
def test_ray_train_two_workers_take_the_local_launchers_shuffled_batches(synth_dataset, tmp_path, ray_local):
    """Shuffle on, over an epoch boundary: the two Ray Train workers together train on exactly the
    batches the local launcher draws (each epoch one seeded order of all the windows), so the loss
    trajectories agree to rounding. With Ray Data's 4,096-window shuffle buffer over a fixed file
    order (the old Ray path) they could not."""
    from rpg_dist.train.stage import train

    same = ["model.embd_dropout=0", "model.attn_dropout=0", "train.epochs=2", "train.log_every=1",
            "train.torch_threads=1"]
    local = new_run(synth_dataset, str(tmp_path / "local"))
    train(debug_config(synth_dataset, local, *same))
    ray_run = new_run(synth_dataset, str(tmp_path / "ray"))
    summary = train(debug_config(synth_dataset, ray_run, *same, "train.launcher=ray", "train.num_workers=2",
                                 "train.cpus_per_worker=0.5"))
    assert summary["world_size"] == 2 and summary["steps"] == 14  # 2 epochs x 7 steps (422 windows)
    reference = logged_losses(local)
    assert len(reference) == 14
    np.testing.assert_allclose(logged_losses(ray_run), reference, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_ray_train_two_workers_resume_after_a_worker_is_killed(synth_dataset, tmp_path, ray_local):
    """Rank 1 dies by SIGKILL right after the first checkpoint is complete (an armed crash point,
    no race): Ray Train restarts the group, which resumes from that checkpoint and finishes."""
    from rpg_dist import failpoints
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    cfg = debug_config(synth_dataset, run_dir, "train.launcher=ray", "train.num_workers=2",
                       "train.cpus_per_worker=0.5", "train.epochs=4", "train.log_every=7",
                       "train.max_failures=1")
    failpoints.arm("checkpoint-committed-rank1")
    summary = train(cfg)
    victims = failpoints.fired("checkpoint-committed-rank1")
    assert len(victims) == 1
    steps_per_epoch = 7  # 422 windows: 14 micro-batches of 32 dealt to 2 ranks
    assert summary["stopped"] == "epochs" and summary["steps"] == 4 * steps_per_epoch
    assert summary["resumed_from_step"] == steps_per_epoch  # the checkpoint rank 1 died after
    newest = checkpoint.list_complete(RunPaths(run_dir).checkpoints)[-1][1]
    assert victims[0] not in [w["pid"] for w in checkpoint.read_meta(newest)["workers"]]
    assert io.exists(RunPaths(run_dir).model_weights)


# The CLI in a process that arms a crash point aimed at itself (its pid is known before it starts
# anything): the Ray Train worker that reaches the point signals this driver and waits to be stopped.
# The default Ctrl-C handler first: a suite run as a background job (`make test &`, nohup) starts
# with SIGINT ignored, which every child inherits, and a driver that ignores SIGINT never stops.
_DRIVER = """import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from rpg_dist import failpoints
failpoints.arm(sys.argv[1], signal.Signals[sys.argv[2]], os.getpid())
from rpg_dist.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _wait_exit(pid: int) -> None:
    """Block until process ``pid`` (not our child) has exited: its pidfd becomes readable then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


@pytest.mark.slow
def test_ray_train_driver_interrupted_then_killed_resumes_each_time(synth_dataset, tmp_path, ray_local):
    """Ctrl-C on the driver of a Ray Train run exits 130 with a message (Ray Train's own handler
    exited 1 with none) and stops its workers; kill -9 of the driver at the next checkpoint stops
    them too; each rerun resumes from the newest complete checkpoint, and the three runs together
    train the straight run's batches (the same losses)."""
    from rpg_dist import failpoints
    from rpg_dist.train.stage import train

    same = ["model.embd_dropout=0", "model.attn_dropout=0", "train.log_every=1", "train.torch_threads=1"]
    straight = new_run(synth_dataset, str(tmp_path / "straight"))
    train(debug_config(synth_dataset, straight, *same))
    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    on_ray = [*same, "train.launcher=ray", "train.cpus_per_worker=1", f"ray.address={ray_local.get_runtime_context().gcs_address}"]
    sets = [arg for o in [f"dataset={synth_dataset}", f"run_dir={run_dir}", *on_ray] for arg in ("--set", o)]
    steps_per_epoch = 7
    for sig, exit_code, epoch in ((signal.SIGINT, 130, 1), (signal.SIGKILL, -signal.SIGKILL, 2)):
        out = subprocess.run([sys.executable, "-c", _DRIVER, "checkpoint-committed-rank0", sig.name,
                              "train", "--config", DEBUG_CONFIG, *sets], capture_output=True, text=True, timeout=600)
        assert out.returncode == exit_code, out.stderr[-4000:]
        [worker] = failpoints.fired("checkpoint-committed-rank0")
        _wait_exit(worker)  # stopped by Ray once its driver is gone (the point holds it till then)
        newest = checkpoint.list_complete(RunPaths(run_dir).checkpoints)[-1][1]
        assert checkpoint.read_meta(newest)["state"]["step"] == epoch * steps_per_epoch
        if sig == signal.SIGINT:
            # Our process prints no traceback. Lines Ray forwards from its own actors, prefixed
            # "(ActorName pid=N)", are theirs: under load Ray Train's PlacementGroupCleaner printed
            # one while the cluster shut down.
            own = [line for line in out.stderr.splitlines() if not re.match(r"(\x1b\[[0-9;]*m)?\(\w+ pid=\d+", line)]
            assert own[-1] == "rpg-dist train: interrupted" and not any("Traceback" in line for line in own), own[-40:]
    # The last epoch in this process (checkpoints do not depend on the launcher; one Ray Train
    # start less keeps the suite short).
    summary = train(debug_config(synth_dataset, run_dir, *same))
    assert summary["resumed_from_step"] == 2 * steps_per_epoch and summary["steps"] == 3 * steps_per_epoch
    np.testing.assert_allclose(logged_losses(run_dir), logged_losses(straight), rtol=0, atol=TOLERANCE)
