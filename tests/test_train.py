"""Trainer: data shards and batches against brute-force twins, the local launcher end to end,
golden losses, resume (exact at an epoch boundary), refusals, non-finite loss, S3 run dirs."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict, load_config
from rpg_dist.errors import StageError
from rpg_dist.model.rpg import PAD
from rpg_dist.train import windows
from rpg_dist.testing.semantic_ids import write_random_semantic_ids

ASSETS = Path(__file__).parent / "assets"
DEBUG_CONFIG = str(ASSETS / "debug.yaml")
GOLDEN = ASSETS / "losses" / "debug.json"


def debug_config(dataset: str, run_dir: str, *overrides: str):
    return load_config(DEBUG_CONFIG, [f"dataset={dataset}", f"run_dir={run_dir}", *overrides])


def new_run(dataset: str, run_dir: str, storage=None) -> str:
    """A run folder whose tokenizer output is random 8-digit codes (the tokenize stage is not needed)."""
    write_random_semantic_ids(dataset, run_dir, n_digit=8, seed=7, storage=storage)
    return run_dir


def logged_losses(run_dir: str, storage=None) -> list[float]:
    """Per-step losses (log_every=1) recorded in the newest checkpoint's meta.json."""
    from rpg_dist.train import checkpoint

    newest = checkpoint.list_complete(RunPaths(run_dir).checkpoints, storage)[-1][1]
    return [entry["loss"] for entry in checkpoint.read_meta(newest, storage)["state"]["logged"]]


# ---- data: vectorised paths against loops -----------------------------------------------------


def test_right_pad_matches_a_per_row_loop():
    from rpg_dist.model.rpg import right_pad

    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 99, n).tolist() for n in rng.integers(1, 9, 30)]
    padded = right_pad(np.concatenate(rows), [len(r) for r in rows])
    assert padded.shape == (30, max(len(r) for r in rows)) and padded.dtype == np.int64
    for got, row in zip(padded.tolist(), rows):
        assert got == row + [PAD] * (padded.shape[1] - len(row))


def test_collate_windows_matches_per_window_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, 40)
    items = [rng.integers(0, 500, n).tolist() for n in lengths]
    n_targets = [int(rng.integers(1, n)) if rng.random() < 0.5 else n - 1 for n in lengths]
    table = pa.table({"items": pa.array(items, windows.LIST_INT32), "n_targets": pa.array(n_targets, pa.int32())})
    batch = windows.collate_windows(table)
    width = max(lengths) - 1
    for b, (window, n_t) in enumerate(zip(items, n_targets)):
        inputs, labels = window[:-1], window[1:]
        expect_items = inputs + [PAD] * (width - len(inputs))
        expect_targets = [PAD] * (len(inputs) - n_t) + labels[len(labels) - n_t:] + [PAD] * (width - len(inputs))
        assert batch["items"][b].tolist() == expect_items
        assert batch["targets"][b].tolist() == expect_targets
        assert batch["lengths"][b] == len(inputs)


def _row_folder(tmp_path, n: int) -> str:
    """Windows 0..n-1 in two parquet files; window ``i`` is items [i, i] and column ``row`` is i."""
    rows = np.arange(n)
    table = pa.table({"row": pa.array(rows), "items": pa.array([[i, i] for i in rows.tolist()], windows.LIST_INT32),
                      "n_targets": pa.array(np.ones(n, np.int32))})
    uri = str(tmp_path / "rows")
    io.write_parquet(table.slice(0, n // 2), f"{uri}/part-00000.parquet")
    io.write_parquet(table.slice(n // 2), f"{uri}/part-00001.parquet")
    return uri


def test_epoch_batches_deal_each_window_once_per_epoch_in_a_new_order(tmp_path):
    n, micro, world = 960, 16, 3  # 60 micro-batches: 20 per rank, no tail
    uri = _row_folder(tmp_path, n)
    n_micro = windows.micro_batches_per_epoch(n, world, micro, 1)
    assert n_micro == 20
    seen = {}
    for epoch in (0, 1):
        ranks = [windows.EpochBatches(uri, None, n, micro, n_micro, seed=5, rank=r, world=world, shuffle=True)
                 for r in range(world)]
        rows = [read_rows_of(rank, epoch) for rank in ranks]
        # The micro-batches a rank trains on are those rows, in that order.
        for rank, got in zip(ranks, rows):
            batches = [b["items"][:, 0].numpy() for b in rank.epoch(epoch)]
            assert len(batches) == n_micro
            np.testing.assert_array_equal(np.concatenate(batches), got)
        # Every window exactly once per epoch, over all ranks.
        assert sorted(np.concatenate(rows).tolist()) == list(range(n))
        # Global step s is the epoch order's positions [s * micro * world, (s + 1) * micro * world).
        order = np.random.default_rng([5, epoch]).permutation(n)
        step3 = np.concatenate([r[3 * micro : 4 * micro] for r in rows])
        assert sorted(step3.tolist()) == sorted(order[3 * micro * world : 4 * micro * world].tolist())
        seen[epoch] = np.concatenate(rows)
    assert not np.array_equal(seen[0], seen[1])  # a new order each epoch
    # Resuming mid-epoch skips exactly the micro-batches already taken.
    rank = windows.EpochBatches(uri, None, n, micro, n_micro, seed=5, rank=1, world=world, shuffle=True)
    assert len(list(rank.epoch(1, skip=7))) == n_micro - 7


def read_rows_of(batches: windows.EpochBatches, epoch: int) -> np.ndarray:
    """The rows a rank reads for ``epoch``, checked against a whole-table read (the brute-force twin)."""
    rows = batches.epoch_rows(epoch)
    got = windows.read_rows(batches.uri, rows).column("row").to_numpy()
    whole = pa.concat_tables([pa.Table.from_batches([b]) for _, b in io.iter_parquet(batches.uri)])
    np.testing.assert_array_equal(got, whole.column("row").to_numpy()[rows])
    return got


def test_epoch_batches_without_shuffle_deal_file_order_and_steps_agree(tmp_path):
    n, micro, world = 1003, 16, 3
    uri = _row_folder(tmp_path, n)
    n_micro = windows.micro_batches_per_epoch(n, world, micro, 1)
    rows = [read_rows_of(windows.EpochBatches(uri, None, n, micro, n_micro, seed=0, rank=r, world=world,
                                              shuffle=False), 0) for r in range(world)]
    assert n_micro == math.ceil(n / micro) // world == 21
    for r, got in enumerate(rows):
        assert ((got // micro) % world == r).all()
    # 63 micro-batches, the last one short (11 rows): all 1003 rows are dealt.
    assert [len(got) for got in rows] == [336, 336, 331]
    # Global step s of a shuffle-free run holds rows [s * micro * world, (s + 1) * micro * world).
    step1 = np.concatenate([r[micro : 2 * micro] for r in rows])
    assert sorted(step1.tolist()) == list(range(micro * world, 2 * micro * world))
    assert windows.micro_batches_per_epoch(n, world, micro, 4) == 20
    val = [windows.read_range_shard(uri, r, world).column("row").to_numpy() for r in range(world)]
    assert np.concatenate(val).tolist() == list(range(n))


# ---- the local launcher end to end -------------------------------------------------------------


def test_local_training_learns_exports_and_logs(synth_dataset, tmp_path):
    from safetensors.torch import load_file

    from rpg_dist.model.export import load_model, read_model_metadata
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    summary = train(debug_config(synth_dataset, run_dir, "train.log_every=3"))
    assert summary["stopped"] == "epochs" and summary["epochs_run"] == 3
    paths = RunPaths(run_dir)
    meta = read_model_metadata(run_dir)
    history = json.loads(Path(glob.glob(f"{paths.checkpoints}/step-*/meta.json")[-1]).read_text())["state"]["history"]
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[0] - 0.5, losses
    # Random ranking of 600 items gives NDCG@10 ~ 0.007.
    assert summary["best_val_ndcg@10"] > 0.03
    assert meta["training"]["best_epoch"] == summary["best_epoch"]
    assert load_file(paths.model_weights)["token_embeddings"].shape == (8, 256, 32)
    assert os.path.getsize(f"{paths.plots}/training.png") > 10_000
    assert glob.glob(f"{paths.tensorboard}/events.out.tfevents.*")
    # The export is the best epoch's weights: re-validating it reproduces the best metric.
    model = load_model(run_dir)
    from rpg_dist.train.validate import metrics_from_sums, validation_sums
    from rpg_dist.train.windows import WindowsPaths, read_range_shard

    cfg = debug_config(synth_dataset, run_dir)
    sums = validation_sums(model, read_range_shard(WindowsPaths(paths.windows).val, 0, 1), cfg.eval,
                           torch.device("cpu"))
    assert metrics_from_sums(sums, [5, 10])["ndcg@10"] == pytest.approx(summary["best_val_ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_golden_losses(synth_dataset, tmp_path, compiled):
    """The debug config's first steps reproduce the checked-in losses (seeded init, data, dropout),
    with the label loss in eager mode and through torch.compile (train.compile)."""
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    train(debug_config(synth_dataset, run_dir, "train.max_steps=8", f"train.compile={str(compiled).lower()}"))
    losses = logged_losses(run_dir)
    if os.environ.get("RPG_UPDATE_GOLDEN") == "1" and not compiled:
        GOLDEN.write_text(json.dumps({"config": "tests/assets/debug.yaml", "max_steps": 8, "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    # Tolerance covers BLAS summation order across CPUs; a changed init, batch or loss moves the
    # first step by far more than 1e-4.
    np.testing.assert_allclose(losses, golden, rtol=1e-4, atol=1e-4)


def test_resume_is_exact_at_an_epoch_boundary(synth_dataset, tmp_path):
    from rpg_dist.train.stage import train

    straight = new_run(synth_dataset, str(tmp_path / "straight"))
    train(debug_config(synth_dataset, straight))
    resumed = new_run(synth_dataset, str(tmp_path / "resumed"))
    first = train(debug_config(synth_dataset, resumed, "train.max_steps=14"))  # 2 of 3 epochs (7 steps each)
    assert first["stopped"] == "max_steps" and first["steps"] == 14
    second = train(debug_config(synth_dataset, resumed))
    assert second["resumed_from_step"] == 14 and second["steps"] == 21
    np.testing.assert_allclose(logged_losses(resumed), logged_losses(straight), rtol=1e-6, atol=1e-6)


def test_resume_refuses_a_different_model_or_layout(synth_dataset, tmp_path):
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    train(debug_config(synth_dataset, run_dir, "train.max_steps=2"))
    with pytest.raises(StageError, match=r"model\.d_model: checkpoint 32, now 48"):
        train(debug_config(synth_dataset, run_dir, "model.d_model=48"))
    with pytest.raises(StageError, match=r"batch_size: checkpoint 64, now 32"):
        train(debug_config(synth_dataset, run_dir, "train.batch_size=32"))
    # New semantic IDs change the tokenizer fingerprint.
    write_random_semantic_ids(synth_dataset, run_dir, n_digit=8, seed=8)
    with pytest.raises(StageError, match="tokenizer_fingerprint"):
        train(debug_config(synth_dataset, run_dir))
    # Starting over is explicit.
    summary = train(debug_config(synth_dataset, run_dir, "train.resume=false", "train.max_steps=2"))
    assert summary["resumed_from_step"] is None


def test_non_finite_loss_names_the_step(synth_dataset, tmp_path):
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    # cos / 1e-40 overflows float32: the logits and the loss become inf/nan at the first step.
    with pytest.raises(FloatingPointError, match="optimizer step 1 "):
        train(debug_config(synth_dataset, run_dir, "model.temperature=1e-40"))


def test_run_dir_on_s3_checkpoints_resumes_and_exports(synth_dataset, s3_bucket):
    from rpg_dist.config import StorageConfig
    from rpg_dist.model.export import load_model
    from rpg_dist.train.stage import train

    endpoint, bucket = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    run_dir = new_run(synth_dataset, f"s3://{bucket}/run", storage)
    extra = [f"storage.endpoint_url={endpoint}"]
    first = train(debug_config(synth_dataset, run_dir, "train.max_steps=7", *extra))
    second = train(debug_config(synth_dataset, run_dir, "train.max_steps=10", *extra))
    assert first["steps"] == 7 and second["resumed_from_step"] == 7 and second["steps"] == 10
    paths = RunPaths(run_dir)
    assert io.exists(f"{paths.plots}/training.png", storage)
    assert io.list_files(paths.tensorboard, storage=storage)
    model = load_model(run_dir, storage)
    assert model.token_embeddings.shape == (8, 256, 32)


def test_train_config_rules_name_the_field():
    from rpg_dist.errors import ConfigError
    from rpg_dist.train.config import TrainConfig

    with pytest.raises(ConfigError, match="batch_size: 256 is not divisible"):
        TrainConfig(batch_size=256, num_workers=3)
    with pytest.raises(ConfigError, match="precision: fp16 needs use_gpu"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="num_workers: launcher 'local'"):
        TrainConfig(launcher="local", num_workers=2)
    assert TrainConfig(batch_size=256, num_workers=2, micro_batch_size=32).grad_accum_steps == 4


def test_ray_resource_request_that_would_hang_is_refused(tmp_path):
    from rpg_dist.train.ray_launcher import _check_resources

    cfg = debug_config("d", str(tmp_path), "train.launcher=ray", "train.num_workers=2", "train.cpus_per_worker=1.5")
    # 2 workers x 1.5 CPU never fit a 2-CPU cluster: Ray would wait for them forever.
    with pytest.raises(StageError, match="train.cpus_per_worker"):
        _check_resources(cfg, {"CPU": 2.0})
    _check_resources(debug_config("d", str(tmp_path), "train.launcher=ray", "train.num_workers=2",
                                  "train.cpus_per_worker=1"), {"CPU": 2.0})


@pytest.mark.parametrize("block", [10_000, 97])
def test_validation_ranks_match_full_ranking_twin(block):
    """Rank counting == the position of the target in full ranking's top-k, and its NDCG."""
    from rpg_dist.decode.scoring import full_ranking_topk, item_scores, target_ranks
    from rpg_dist.evaluation.metrics import ranking_metrics

    gen = torch.Generator().manual_seed(0)
    batch, m, vocab, n_items = 64, 8, 16, 700
    log_probs = torch.randn(batch, m, vocab, generator=gen).log_softmax(-1)
    codes = torch.randint(0, vocab, (n_items, m), generator=gen)
    codes[5] = codes[3]  # colliding items score the same: ties go to the lower row
    codes[400] = codes[3]
    # Targets the model likes (so that many ranks fall inside the top 10), including collisions.
    targets = item_scores(log_probs, codes).topk(3, dim=1).indices[:, torch.randint(0, 3, (1,), generator=gen)].squeeze(1)
    targets[:4] = torch.tensor([3, 5, 400, 0])
    ranks = target_ranks(log_probs, codes, targets, block)
    ranked, _ = full_ranking_topk(log_probs, codes, n_items)
    expected = (ranked == targets[:, None]).int().argmax(1)
    assert torch.equal(ranks, expected)
    assert (ranks < 10).sum() > batch // 2
    ndcg = torch.where(ranks < 10, 1 / torch.log2(ranks + 2.0), 0.0).mean()
    assert float(ndcg) == pytest.approx(ranking_metrics(ranked[:, :10].numpy(), targets.numpy(), [10])["ndcg@10"])


def test_gradient_accumulation_matches_one_big_batch(synth_dataset, tmp_path):
    """batch 64 as 2 micro-batches of 32 (accumulated) takes the same steps as one batch of 64."""
    from rpg_dist.train.stage import train

    same = ["train.shuffle=false", "model.embd_dropout=0", "model.attn_dropout=0", "train.max_steps=4"]
    whole = new_run(synth_dataset, str(tmp_path / "whole"))
    train(debug_config(synth_dataset, whole, *same))
    accumulated = new_run(synth_dataset, str(tmp_path / "accumulated"))
    train(debug_config(synth_dataset, accumulated, *same, "train.micro_batch_size=32"))
    np.testing.assert_allclose(logged_losses(accumulated), logged_losses(whole), rtol=0, atol=1e-5)


def test_early_stopping_after_patience_epochs_without_improvement(synth_dataset, tmp_path):
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    # A learning rate of ~0 leaves the validation metric exactly where epoch 1 put it.
    summary = train(debug_config(synth_dataset, run_dir, "train.lr=1e-12", "train.patience=2", "train.epochs=10"))
    assert summary["stopped"] == "early_stopping"
    assert summary["best_epoch"] == 1 and summary["epochs_run"] == 3


def test_items_without_semantic_ids_name_the_sequence_row(synth_dataset, tmp_path):
    from rpg_dist.data import dataset as ds
    from rpg_dist.errors import DataError
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids, write_semantic_ids
    from rpg_dist.train.stage import prepare

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    paths = RunPaths(run_dir)
    semantic_ids = load_semantic_ids(paths.semantic_ids)
    first_user_item = ds.read_sequences(synth_dataset).column("item_ids")[0][0].as_py()
    keep = semantic_ids.index.item_ids != first_user_item
    write_semantic_ids(paths.semantic_ids, semantic_ids.index.item_ids[keep], semantic_ids.codes[keep])
    with pytest.raises(DataError, match=rf"sequences: row 0 \(user .*item_id {first_user_item}, which has no semantic ID"):
        prepare(debug_config(synth_dataset, run_dir))


def test_heap_reuse_cuts_page_faults_of_repeated_large_allocations():
    """The allocator tuning is real: re-allocating a 64 MB block stops faulting in fresh pages."""
    import resource

    from rpg_dist.train.runtime import HeapReuse

    def faults_of_allocations() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    plain = faults_of_allocations()
    heap = HeapReuse(enabled=True)
    if not heap.active:
        pytest.skip("not glibc")
    try:
        faults_of_allocations()  # first use grows the heap once
        tuned = faults_of_allocations()
    finally:
        heap.restore()
    # Each fresh mapping faults at least once (16k times with 4 KiB pages, 32 with transparent huge
    # pages): no absolute count that depends on the kernel's page size, only the ratio.
    assert plain >= 8
    assert tuned < plain / 10


class _RunsCode:
    """Unpickling this runs a shell command: what an attacker would put into a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_or_truncated_checkpoint_runs_no_code_and_the_previous_one_is_used(synth_dataset, tmp_path):
    """A newest checkpoint whose pickle would run code is refused (nothing runs) and the previous
    complete one resumes instead; a truncated one likewise; when none loads, a clear error."""
    import glob

    import torch

    from rpg_dist.train import checkpoint
    from rpg_dist.train.stage import train

    run_dir = new_run(synth_dataset, str(tmp_path / "run"))
    train(debug_config(synth_dataset, run_dir, "train.max_steps=14"))  # checkpoints at steps 7 and 14
    paths = RunPaths(run_dir)
    newest, older = sorted(glob.glob(f"{paths.checkpoints}/step-*/ds/*model_states.pt"))[::-1][:2]
    assert "step-00000014" in newest and "step-00000007" in older
    marker = tmp_path / "code-ran"
    torch.save({"module": _RunsCode(str(marker))}, newest)
    summary = train(debug_config(synth_dataset, run_dir))
    assert not marker.exists()
    assert summary["resumed_from_step"] == 7 and summary["steps"] == 21
    # Truncate every committed checkpoint's model states: nothing can resume, and the error says so.
    for path in glob.glob(f"{paths.checkpoints}/step-*/ds/*model_states.pt"):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the 2 committed checkpoint\(s\) can be loaded"):
        train(debug_config(synth_dataset, run_dir, "train.epochs=4"))


def test_graph_decoded_validation_equals_full_ranking_when_the_graph_reaches_everything(synth_dataset, tmp_path):
    """train.val_decoding=graph builds the current table's graph and decodes; with every item in every
    neighbour list one step visits the whole catalogue, so the metrics must equal full ranking's."""
    from rpg_dist.train.stage import train

    n_items = len(io.read_parquet(io.join(synth_dataset, "items"), columns=["item_id"]))
    common = ["train.max_steps=7", "decode.num_beams=10", "decode.steps=1", f"graph.n_edges={n_items - 1}"]
    full = train(debug_config(synth_dataset, new_run(synth_dataset, str(tmp_path / "full")), *common))
    graph = train(debug_config(synth_dataset, new_run(synth_dataset, str(tmp_path / "graph")), *common,
                               "train.val_decoding=graph"))
    assert graph["best_val"] == full["best_val"] and full["best_val"]["ndcg@10"] > 0
    # A graph that cannot reach the targets scores lower: one neighbour, one step.
    narrow = train(debug_config(synth_dataset, new_run(synth_dataset, str(tmp_path / "narrow")), "train.max_steps=7",
                                "decode.num_beams=10", "decode.steps=1", "graph.n_edges=1", "train.val_decoding=graph"))
    assert narrow["best_val"]["recall@10"] < full["best_val"]["recall@10"]


def test_ray_train_records_no_credentials_but_workers_get_them(ray_local):
    """Ray Train records train_loop_config (its run state, the dashboard): only a reference to the
    storage section may be in it; the workers resolve it to the credentials."""
    import json

    from rpg_dist.train.ray_launcher import loop_config

    secrets = {"key": "AKIAEXAMPLESECRET1", "secret": "s3cr3t-value-9f2c", "token": "tok-7d1e-secret"}
    cfg = config_from_dict({"dataset": "s3://b/d", "run_dir": "s3://b/r", "storage": {
        "key": secrets["key"], "secret": secrets["secret"], "options": {"token": secrets["token"]}}})
    recorded = loop_config(cfg)
    text = json.dumps(recorded["config"]) + repr(recorded["storage"])
    for value in secrets.values():
        assert value not in text
    storage = ray_local.get(recorded["storage"])
    assert (storage.key, storage.secret, storage.options["token"]) == (secrets["key"], secrets["secret"], secrets["token"])


def test_compile_without_a_compiler_is_refused_before_training(monkeypatch, tmp_path):
    """train.compile on a worker without a C++ compiler: a clear error naming the field, not an
    inductor traceback at the first step."""
    import shutil

    from rpg_dist.errors import StageError
    from rpg_dist.train.engine import check_compile_toolchain

    assert shutil.which("g++") or shutil.which("c++"), "this check needs a compiler on the test machine"
    check_compile_toolchain(torch.device("cpu"))  # found: no error
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on the PATH
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(StageError, match=r"train\.compile: no C\+\+ compiler .*train\.compile=false"):
        check_compile_toolchain(torch.device("cpu"))
