"""The one train loop: DeepSpeed steps, validation, early stopping, checkpoints, export.

It runs unchanged under Ray Train, torchrun and plain pytest; ``Runtime`` says where it runs.
Collectives (label counts, loss-finiteness, logged losses, validation sums) are called by every rank
at the same points, so the schedule never diverges between ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rpg_dist import failpoints, io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import Config
from rpg_dist.errors import StageError
from rpg_dist.model.export import model_metadata, read_weights, save_model, save_weights, semantic_ids_fingerprint
from rpg_dist.model.rpg import PAD, RPG
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids
from rpg_dist.train import checkpoint, engine as engine_lib, windows
from rpg_dist.train.runtime import HeapReuse, Runtime, set_threads
from rpg_dist.train.sinks import MetricSinks, write_training_plot
from rpg_dist.train.validate import metrics_from_sums, validation_sums

log = logging.getLogger("rpg_dist.train")

VAL_METRIC = "ndcg@10"


@dataclass
class TrainState:
    """Progress restored from a checkpoint's meta.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based); epochs completed when batch_in_epoch == 0
    batch_in_epoch: int = 0  # optimizer steps done inside the current epoch
    best_epoch: int = 0
    best_ndcg: float = -1.0
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    logged: list[dict[str, Any]] = field(default_factory=list)  # rank-0 log lines (step, loss)
    resumed_from: int | None = None
    stopped: str = ""


class ModelParts(NamedTuple):
    """What ``build_models`` returns: the model to train, its plain twin for validation (under
    ZeRO-3 the engine's own parameters are shards), the identity checkpoints are checked against,
    and the windows manifest (counts the schedule depends on)."""

    model: RPG
    eval_model: RPG
    identity: dict[str, Any]
    manifest: dict[str, Any]


def build_models(cfg: Config, device: torch.device, storage) -> ModelParts:
    """The seeded model and its validation copy over the run's semantic IDs, with the windows
    manifest (checked against those IDs and the config)."""
    paths = RunPaths(cfg.run_dir)
    semantic_ids = load_semantic_ids(paths.semantic_ids, storage)
    fingerprint = semantic_ids_fingerprint(semantic_ids)
    manifest = _read_manifest(paths.windows, fingerprint, cfg, storage)
    codes = torch.from_numpy(semantic_ids.codes)  # (n_items, m) int16, shared by both models
    torch.manual_seed(cfg.seed)
    model = RPG(cfg.model, semantic_ids.n_digit, cfg.tokenize.codebook_size, codes)
    eval_model = RPG(cfg.model, semantic_ids.n_digit, cfg.tokenize.codebook_size, codes).to(device)
    return ModelParts(model, eval_model, model_metadata(model, fingerprint), manifest)


class Trainer:
    """Builds the model, engine and data shard for this rank, then ``run()`` trains to the end."""

    def __init__(self, runtime: Runtime, cfg: Config) -> None:
        self.rt, self.cfg, self.tc = runtime, cfg, cfg.train
        self.paths = RunPaths(cfg.run_dir)
        self.storage = cfg.storage
        self.threads = set_threads(self.tc.torch_threads, runtime.local_world_size)
        self.heap = HeapReuse(self.tc.reuse_freed_memory)
        self._check_world()
        model, self.eval_model, self.identity, self.manifest = build_models(cfg, runtime.device, self.storage)
        self.micro_per_epoch = windows.micro_batches_per_epoch(
            self.manifest["n_windows"], runtime.world_size, self.tc.micro_batch,
            self.tc.grad_accum_steps,
        )
        if self.micro_per_epoch < 1:
            raise StageError(f"train.batch_size: {self.tc.batch_size} leaves no full step per epoch "
                             f"for {self.manifest['n_windows']} windows")
        self.steps_per_epoch = self.micro_per_epoch // self.tc.grad_accum_steps
        if self.tc.compile:
            engine_lib.check_compile_toolchain(runtime.device)
            model.compile_label_loss()
        self.engine = engine_lib.build_engine(model.to(runtime.device), self.tc, self.steps_per_epoch * self.tc.epochs)
        self.autocast = engine_lib.autocast(self.tc, runtime.device)
        self.train_batches = self._train_source()
        val_uri = windows.WindowsPaths(self.paths.windows).val
        self.val_examples = windows.read_range_shard(val_uri, runtime.rank, runtime.world_size, self.storage)
        self.workers = _gather_objects({"rank": runtime.rank, "pid": os.getpid(), "host": socket.gethostname(),
                                        "node_id": runtime.node_id}, runtime.world_size)
        self.sinks = MetricSinks(runtime.is_main, self.paths.tensorboard, self.storage)
        self.train_seconds = 0.0
        self.first_step_seconds: float | None = None
        self._grad_norm_before_step: torch.Tensor | None = None
        self.state = self._resume_or_start()

    # ---- setup ---------------------------------------------------------------------------------

    def _check_world(self) -> None:
        if self.rt.world_size != self.tc.num_workers:
            raise StageError(
                f"train.num_workers: {self.tc.num_workers}, but the launcher started "
                f"{self.rt.world_size} processes; pass --set train.num_workers={self.rt.world_size}"
            )

    def _train_source(self) -> windows.EpochBatches:
        """This rank's micro-batches, read from the run's windows under every launcher."""
        return windows.EpochBatches(
            windows.WindowsPaths(self.paths.windows).train, self.storage, self.manifest["n_windows"],
            micro=self.tc.micro_batch, n_micro=self.micro_per_epoch, seed=self.cfg.seed,
            rank=self.rt.rank, world=self.rt.world_size, shuffle=self.tc.shuffle,
        )

    def layout(self) -> dict[str, Any]:
        """What a checkpoint's optimizer partitioning and data position depend on."""
        return {
            "world_size": self.rt.world_size, "zero_stage": self.tc.zero_stage,
            "batch_size": self.tc.batch_size, "micro_batch": self.tc.micro_batch,
            # bf16-autocast keeps fp32 weights: it may resume an fp32 run and the other way round.
            "weights": {"bf16": "bf16", "fp16": "fp16"}.get(engine_lib.resolved_precision(self.tc), "fp32"),
            "n_windows": self.manifest["n_windows"], "seed": self.cfg.seed,
        }

    def _resume_or_start(self) -> TrainState:
        root = self.paths.checkpoints
        if not self.tc.resume:
            if self.rt.is_main:
                checkpoint.remove_all(root, self.storage)
            self.barrier()
            return TrainState()
        complete = checkpoint.list_complete(root, self.storage) if self.rt.is_main else None
        candidates = _broadcast_object([uri for _, uri in reversed(complete or [])])  # newest first
        for uri in candidates:
            meta = checkpoint.read_meta(uri, self.storage)
            checkpoint.check_compatible(uri, meta, self.identity, self.layout())
            failure = None
            try:
                checkpoint.load(self.engine, uri, self.storage)
            except checkpoint.CheckpointError as err:
                failure = str(err)
            # Every rank must resume from the same checkpoint: one rank's broken file rejects it for all.
            failures = [f for f in _gather_objects(failure, self.rt.world_size) if f]
            if failures:
                if self.rt.is_main:
                    log.warning("checkpoint %s cannot be loaded (%s); trying the previous one", uri, failures[0])
                continue
            state = TrainState(**meta["state"])
            state.resumed_from = state.step
            if self.rt.is_main:
                log.info("resumed from %s (step %d, epoch %d)", uri, state.step, state.epoch)
            return state
        if candidates:
            raise checkpoint.CheckpointError(
                f"{root}: none of the {len(candidates)} committed checkpoint(s) can be loaded; "
                "--set train.resume=false starts over (and deletes them)")
        return TrainState()

    # ---- training ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train until the epochs, max_steps or patience run out; export the best model."""
        started = time.perf_counter()
        start_step = self.state.step
        self._stop_if_done()
        while not self.state.stopped:
            self._train_epoch()
            finished_epoch = self.state.batch_in_epoch == 0
            at_end = self._out_of_budget()
            epoch_done = self.state.epoch  # epochs completed so far
            if at_end or (finished_epoch and epoch_done % self.tc.eval_every == 0):
                self._validate()
            if at_end or (finished_epoch and epoch_done % self.tc.checkpoint_every == 0) or self.state.stopped:
                self._checkpoint()
        elapsed = time.perf_counter() - started
        summary = self._summary(elapsed, (self.state.step - start_step) * self.tc.batch_size)
        summary["peak_rss_mb"] = round(float(self.all_reduce(torch.tensor(_peak_rss_mb(), dtype=torch.float64), dist.ReduceOp.MAX)), 1)
        self.sinks.flush()
        if self.rt.is_main:
            self._export(summary)
        self.barrier()
        return summary

    def _stop_if_done(self) -> None:
        """On resume: stop at once if the restored run already used its budget or its patience."""
        self.state.stopped = ""
        if self._out_of_budget():
            return
        last_val = max((h["epoch"] for h in self.state.history if f"val/{VAL_METRIC}" in h), default=0)
        if self.tc.patience and last_val and last_val - self.state.best_epoch >= self.tc.patience:
            self.state.stopped = "early_stopping"

    def _out_of_budget(self) -> bool:
        """Set ``stopped`` when the epochs or max_steps are used up."""
        if self.tc.max_steps is not None and self.state.step >= self.tc.max_steps:
            self.state.stopped = "max_steps"
        elif self.state.epoch >= self.tc.epochs:
            self.state.stopped = "epochs"
        return bool(self.state.stopped)

    def _train_epoch(self) -> None:
        state, accum = self.state, self.tc.grad_accum_steps
        _seed_epoch(self.cfg.seed, state.epoch, self.rt.rank)
        self.engine.module.train()
        skip = state.batch_in_epoch * accum
        batches = self.train_batches.epoch(state.epoch, skip=skip)
        bar = tqdm(total=self.steps_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}",
                   disable=not self.rt.is_main, leave=False, mininterval=2.0)
        loss_sum, n_steps = torch.zeros((), dtype=torch.float64), 0
        window_start, window_steps = time.perf_counter(), 0
        epoch_start = time.perf_counter()
        for micro in _chunks(batches, accum):
            step_start = time.perf_counter()
            step_loss = self._train_step(micro)
            if self.first_step_seconds is None:  # this process's first: compilation, warm-up
                self.first_step_seconds = time.perf_counter() - step_start
            loss_sum += step_loss.double()
            n_steps, window_steps = n_steps + 1, window_steps + 1
            state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
            self.heap.after_step(state.step)
            bar.update(1)
            if state.step % self.tc.log_every == 0:
                self._log_step(step_loss, window_steps, time.perf_counter() - window_start)
                window_start, window_steps = time.perf_counter(), 0
            if self.tc.max_steps is not None and state.step >= self.tc.max_steps:
                break
        bar.close()
        self.train_seconds += time.perf_counter() - epoch_start
        if state.batch_in_epoch >= self.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self._record_epoch_loss(loss_sum, n_steps)

    def _train_step(self, micro: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over ``accum`` micro-batches; returns this rank's share of the loss.

        The loss of each micro-batch is its summed cross-entropy over the step's *global* label
        count, scaled back by accum x world (DeepSpeed divides by both), so the update is the
        gradient of the mean over all labelled positions of the whole batch, as in one process.
        """
        device, accum, world = self.rt.device, len(micro), self.rt.world_size
        labels = torch.stack([(b["targets"] != PAD).sum() for b in micro]).sum().double()
        denominator = self.all_reduce(labels) / (accum * world)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            with self.autocast:
                loss = self.engine(batch["items"].to(device), batch["lengths"].to(device),
                                   batch["targets"].to(device), denominator.float().to(device))
            self.engine.backward(loss)
            step_loss += loss.detach().float()
            if i < accum - 1:
                self.engine.step()  # DeepSpeed only counts micro-steps until the boundary
        finite = self.all_reduce(torch.isfinite(step_loss).double().cpu(), dist.ReduceOp.MIN)
        if not bool(finite):
            raise FloatingPointError(
                f"non-finite loss at optimizer step {self.state.step + 1} (epoch {self.state.epoch + 1}); "
                "lower train.lr or raise model.temperature"
            )
        if (self.state.step + 1) % self.tc.log_every == 0:
            self._grad_norm_before_step = engine_lib.local_grad_norm(self.engine)
        self.engine.step()
        return step_loss

    def _log_step(self, step_loss: torch.Tensor, steps: int, seconds: float) -> None:
        """The rank-0 log line; the only place a training loss leaves the device (``.item()``)."""
        world_loss = self.all_reduce(step_loss.double().cpu()) / (self.tc.grad_accum_steps * self.rt.world_size)
        fields = {
            "step": self.state.step, "epoch": self.state.epoch + 1, "loss": float(world_loss.item()),
            "lr": float(self.engine.get_lr()[0]), "grad_norm": engine_lib.grad_norm(self.engine, self._grad_norm_before_step),
            "seq_per_s": steps * self.tc.batch_size / max(seconds, 1e-9),
        }
        self.sinks.step(fields)
        if self.rt.is_main:
            self.state.logged.append({"step": fields["step"], "loss": fields["loss"]})

    def _record_epoch_loss(self, loss_sum: torch.Tensor, n_steps: int) -> None:
        total = self.all_reduce(torch.stack([loss_sum, torch.tensor(float(n_steps), dtype=torch.float64)]))
        mean = float(total[0] / max(float(total[1]), 1.0)) / (self.tc.grad_accum_steps)
        self.state.history.append({"epoch": self.state.epoch + (self.state.batch_in_epoch > 0),
                                   "step": self.state.step, "train_loss": mean})

    # ---- validation, checkpoints, export --------------------------------------------------------

    def _validation_decoder(self):
        """train.val_decoding=graph: the graph of the current token table, built in this process,
        and the decoder of ``cfg.decode`` over it (random or history starts; popular is random)."""
        from rpg_dist.decode.graph_decode import GraphDecoder, history_start_items, random_start_items
        from rpg_dist.graph.builder import build_item_graph

        codes = self.eval_model.item_codes.cpu()
        graph_cfg = dataclasses.replace(self.cfg.graph, local_max_items=max(self.cfg.graph.local_max_items, len(codes)),
                                        recall_sample=0, n_partitions=1)
        neighbors = torch.from_numpy(build_item_graph(self.eval_model.token_embeddings.detach().cpu(), codes,
                                                      graph_cfg, seed=self.cfg.seed).neighbors)
        d = self.cfg.decode
        decoder = GraphDecoder(codes, neighbors, d.num_beams, d.steps, d.chunk_size)
        generator = torch.Generator().manual_seed(d.seed)
        fallback = torch.arange(min(2 * d.num_beams, len(codes)))

        def start(items, lengths):
            if d.start == "history":
                return history_start_items(items, lengths, neighbors, fallback, d.num_beams)
            return random_start_items(len(lengths), len(codes), d.num_beams, generator)

        return decoder, start

    def _validate(self) -> None:
        state, started = self.state, time.perf_counter()
        weights = engine_lib.full_state_dict(self.engine)  # collective under ZeRO-3
        self.eval_model.load_state_dict(weights)
        eval_cfg = self.cfg.eval
        ks = sorted(set(eval_cfg.ks) | {10})
        # Validation runs in fp32 whatever the training precision, as the final evaluation does.
        decode = self._validation_decoder() if self.tc.val_decoding == "graph" else None
        sums = validation_sums(self.eval_model, self.val_examples, _with_ks(eval_cfg, ks), self.rt.device, decode)
        metrics = metrics_from_sums(self.all_reduce(sums), ks)
        entry = state.history[-1]
        entry.update({f"val/{k}": v for k, v in metrics.items()})
        entry["val_seconds"] = round(time.perf_counter() - started, 2)
        self.sinks.epoch(entry["epoch"], state.step, {k: v for k, v in entry.items() if k not in ("epoch", "step")})
        if metrics[VAL_METRIC] > state.best_ndcg:
            state.best_ndcg, state.best_epoch, state.best_metrics = metrics[VAL_METRIC], entry["epoch"], metrics
            if self.rt.is_main:
                meta = {**self.identity, "best_epoch": state.best_epoch, "val": metrics, "step": state.step}
                save_weights(weights, meta, checkpoint.best_dir(self.paths.checkpoints), self.storage)
        elif self.tc.patience and entry["epoch"] - state.best_epoch >= self.tc.patience:
            state.stopped = "early_stopping"
            if self.rt.is_main:
                log.info("early stopping at epoch %d: best %s %.4f at epoch %d", entry["epoch"], VAL_METRIC,
                         state.best_ndcg, state.best_epoch)
        self.rt.report({"epoch": entry["epoch"], "step": state.step, **entry})
        self.heap.trim()  # validation's blocks have other sizes than training's

    def _checkpoint(self) -> None:
        root = self.paths.checkpoints
        meta = {"identity": self.identity, "layout": self.layout(), "workers": self.workers,
                "state": {k: v for k, v in asdict(self.state).items() if k != "resumed_from"}}
        checkpoint.save(self.engine, root, self.state.step, meta, self.rt.rank, self.barrier, self.storage)
        failpoints.reach(f"checkpoint-committed-rank{self.rt.rank}")
        if self.rt.is_main:
            checkpoint.prune(root, self.tc.keep_checkpoints, self.storage)

    def _summary(self, elapsed: float, sequences: int) -> dict[str, Any]:
        s = self.state
        return {
            "epochs_run": s.history[-1]["epoch"] if s.history else s.epoch, "steps": s.step,
            "best_epoch": s.best_epoch, f"best_val_{VAL_METRIC}": s.best_ndcg, "best_val": s.best_metrics,
            "stopped": s.stopped, "resumed_from_step": s.resumed_from, "wall_time_s": round(elapsed, 2),
            "train_seconds": round(self.train_seconds, 2), "first_step_seconds": round(self.first_step_seconds or 0.0, 2),
            "val_seconds": round(sum(h.get("val_seconds", 0.0) for h in s.history), 2),
            "seq_per_s": round(sequences / max(self.train_seconds, 1e-9), 1), "world_size": self.rt.world_size,
            "zero_stage": self.tc.zero_stage, "precision": engine_lib.resolved_precision(self.tc),
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_steps": self.tc.warmup_for(self.steps_per_epoch * self.tc.epochs),
            "torch_threads": self.threads, "worker_node_ids": [w["node_id"] for w in self.workers],
        }

    def _export(self, summary: dict[str, Any]) -> None:
        """Rank 0: the best weights to RUN_DIR/model, the plot, the TensorBoard flush."""
        best = checkpoint.best_dir(self.paths.checkpoints)
        save_model(read_weights(best, self.storage), {**self.identity, "training": summary}, self.cfg.run_dir, self.storage)
        write_training_plot(self.state.history, self.state.logged, io.join(self.paths.plots, "training.png"), self.storage)
        log.info("exported best model (epoch %d, val %s %.4f) to %s", self.state.best_epoch, VAL_METRIC,
                 self.state.best_ndcg, self.paths.model)

    # ---- collectives -----------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduced copy of a CPU tensor (gloo) or device tensor; identity in a world of one."""
        if self.rt.world_size == 1:
            return tensor
        out = tensor.clone().to(self.rt.device if self.rt.device.type == "cuda" else "cpu")
        dist.all_reduce(out, op=op)
        return out.to(tensor.device)

    def barrier(self) -> None:
        if self.rt.world_size > 1:
            dist.barrier()


def train_loop(runtime: Runtime, cfg: Config) -> dict[str, Any]:
    """Build and run a ``Trainer`` for this process; returns rank 0's summary (every rank's own)."""
    trainer = Trainer(runtime, cfg)
    try:
        return trainer.run()
    finally:
        trainer.sinks.close()
        trainer.heap.restore()


def _read_manifest(root: str, fingerprint: str, cfg: Config, storage) -> dict[str, Any]:
    uri = windows.WindowsPaths(root).manifest
    if not io.exists(uri, storage):
        raise StageError(f"{uri}: no training windows; `rpg-dist train` prepares them before launching workers")
    manifest = io.read_json(uri, storage)
    if manifest.get("tokenizer_fingerprint") != fingerprint or manifest.get("max_seq_len") != cfg.model.max_seq_len:
        raise StageError(f"{uri}: windows were built for other semantic IDs or max_seq_len; rerun `rpg-dist train`")
    return manifest


def _with_ks(eval_cfg, ks: list[int]):
    from dataclasses import replace

    return replace(eval_cfg, ks=ks)


def _chunks(iterator, size: int):
    """Consecutive lists of ``size`` items (the last may be shorter; the caller sizes epochs so it is not)."""
    chunk = []
    for item in iterator:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Dropout RNG from (seed, epoch, rank): resuming at an epoch boundary replays the same masks."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _broadcast_object(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
