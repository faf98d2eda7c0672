"""Training benchmark on Beauty: seconds per epoch and sequences/s by workers, ZeRO stage and precision,
peak RSS, and the paper-style padded-to-50 step for the ratio.

    # Full figures (quiet machine): one epoch per variant, then 10 reference steps each way
    python benchmarks/bench_train.py --data ../shared/data/amazon2014-beauty
    # Quick validation of the script (a few steps per variant)
    python benchmarks/bench_train.py --max-steps 5 --ref-steps 2
    # Real codes from a tokenized run instead of random ones (compute does not depend on the values)
    python benchmarks/bench_train.py --semantic-ids runs/beauty/tokenizer/semantic_ids.parquet

Each variant is the real ``rpg-dist train`` path in fresh processes (1 worker: launcher "local";
2 workers: torchrun with 2 gloo processes), with configs/beauty.yaml's model and batch (d 448,
2 layers, 32 digits x 256, windows of 50, batch 256). ``train_s`` excludes start-up and the end-of-
epoch validation, ``s/epoch`` scales the steps after the first (which compiles with train.compile)
to the full epoch.
The machine limit comes from the epoch's FLOP count (windows, positions and labels of the real
data) at the GEMM rates measured on this CPU by the script (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import machine, matmul_gflops  # noqa: E402

from rpg_dist import io  # noqa: E402
from rpg_dist.artifacts import RunPaths  # noqa: E402
from rpg_dist.config import load_config  # noqa: E402
from rpg_dist.model.rpg import PAD, RPG  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)
VARIANTS = {
    # name: (workers, zero stage, precision, launcher, train.compile)
    "1w-zero0-fp32": (1, 0, "fp32", "local", False),
    "1w-zero0-bf16": (1, 0, "bf16-autocast", "local", False),
    "1w-zero0-fp32-compiled": (1, 0, "fp32", "local", True),
    "1w-zero0-bf16-compiled": (1, 0, "bf16-autocast", "local", True),
    "2w-zero0-fp32": (2, 0, "fp32", "torchrun", False),
    "2w-zero2-fp32": (2, 2, "fp32", "torchrun", False),
    "2w-zero2-bf16": (2, 2, "bf16-autocast", "torchrun", False),
    # The default launcher: Ray Train (adds Ray's start and a worker process).
    "ray-1w-bf16": (1, 0, "bf16-autocast", "ray", False),
}
DTYPES = {"fp32": torch.float32, "bf16-autocast": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "amazon2014-beauty"))
    parser.add_argument("--semantic-ids", default=None, help="use these codes instead of random ones")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each variant after N steps")
    parser.add_argument("--ref-steps", type=int, default=10, help="steps timed per reference implementation")
    parser.add_argument("--workdir", default=None, help="keep artefacts here (default: a temporary folder)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    dataset = prepare_dataset(args.data, workdir)
    config = os.path.join(REPO, "configs", "beauty.yaml")
    results = []
    for name in args.variants.split(","):
        run_dir = os.path.join(workdir, name)
        write_codes(dataset, run_dir, args.semantic_ids)
        results.append((name, run_variant(name, config, dataset, run_dir, args.max_steps)))
    manifest = io.read_json(os.path.join(workdir, results[0][0], "windows", "manifest.json"))
    print_table(results, manifest)
    reference_steps(dataset, os.path.join(workdir, results[0][0]), config, args.ref_steps)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}")


def prepare_dataset(raw: str, workdir: str) -> str:
    from rpg_dist.data.config import PrepareConfig
    from rpg_dist.data.importers import prepare

    out = os.path.join(workdir, "dataset")
    if not os.path.exists(os.path.join(out, "dataset.json")):
        prepare(PrepareConfig(format="s3rec", input=raw), out)
    return out


def write_codes(dataset: str, run_dir: str, semantic_ids: str | None) -> None:
    from rpg_dist.testing.semantic_ids import write_random_semantic_ids

    if semantic_ids:
        io.write_bytes(RunPaths(run_dir).semantic_ids, io.read_bytes(semantic_ids))
    else:
        write_random_semantic_ids(dataset, run_dir, n_digit=32, seed=0)


def run_variant(name: str, config: str, dataset: str, run_dir: str, max_steps: int | None) -> dict:
    workers, zero, precision, launcher, compiled = VARIANTS[name]
    sets = [f"dataset={dataset}", f"run_dir={run_dir}", "train.epochs=1", "train.log_every=20",
            f"train.compile={str(compiled).lower()}",
            f"train.zero_stage={zero}", f"train.precision={precision}", "train.resume=false",
            f"train.num_workers={workers}", f"train.launcher={launcher}"]
    if max_steps:
        sets.append(f"train.max_steps={max_steps}")
    set_args = [arg for s in sets for arg in ("--set", s)]
    summary_path = os.path.join(run_dir, "summary.json")
    main_args = ["-m", "rpg_dist.train.torchrun_main", "--config", config, "--summary-out", summary_path, *set_args]
    if launcher == "ray":
        cmd = [os.path.join(BIN, "rpg-dist"), "train", "--config", config, *set_args]
    elif launcher == "local":
        cmd = [sys.executable, *main_args]
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(workers), *main_args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    if launcher == "ray":  # the exported model's config.json carries the training summary
        from rpg_dist.model.export import read_model_metadata

        summary = read_model_metadata(run_dir)["training"]
    else:
        summary = json.load(open(summary_path))
    summary["process_wall_s"] = time.perf_counter() - started
    print(f"{name}: {json.dumps({k: summary[k] for k in ('steps', 'train_seconds', 'first_step_seconds', 'val_seconds', 'seq_per_s', 'peak_rss_mb', 'process_wall_s')})}",
          flush=True)
    return summary


def epoch_tflop(manifest: dict, d: int = 448, ffn: int = 1024, layers: int = 2, m: int = 32, vocab: int = 256) -> float:
    """Forward + backward FLOP of one epoch: 2 FLOP per MAC, backward = 2x forward."""
    per_position = layers * (4 * d * d + 2 * d * ffn)
    per_label = m * d * d + m * vocab * d
    macs = manifest["n_positions"] * per_position + manifest["n_labels"] * per_label
    return 6 * macs / 1e12


def print_table(results: list, manifest: dict) -> None:
    steps_per_epoch = -(-manifest["n_windows"] // 256)
    tflop = epoch_tflop(manifest)
    # The limit: this epoch's FLOPs at this CPU's measured square-GEMM rate for the precision.
    gflops = {precision: matmul_gflops(dtype) for precision, dtype in DTYPES.items()}
    print(f"measured GEMM GFLOP/s: {gflops}")
    print(f"\nBeauty epoch: {manifest['n_windows']} windows, {manifest['n_positions']} positions, "
          f"{manifest['n_labels']} labels, {steps_per_epoch} steps of 256, {tflop:.1f} TFLOP fwd+bwd")
    print(f"{'variant':24} {'steps':>5} {'train_s':>8} {'s/epoch':>8} {'seq/s':>7} {'val_s':>6} {'peak RSS MB':>11} "
          f"{'limit s/epoch':>13} {'x limit':>7}")
    for name, s in results:
        precision = VARIANTS[name][2]
        # Steps after the first (which compiles and warms up), scaled to the epoch.
        per_epoch = (s["train_seconds"] - s["first_step_seconds"]) / max(s["steps"] - 1, 1) * steps_per_epoch
        limit = tflop * 1e3 / gflops[precision]
        print(f"{name:24} {s['steps']:>5} {s['train_seconds']:>8.1f} {per_epoch:>8.1f} {manifest['n_windows'] / per_epoch:>7.0f} "
              f"{s['val_seconds']:>6.1f} {s['peak_rss_mb']:>11.0f} {limit:>13.1f} {per_epoch / limit:>7.2f}")


# ---- the reference code's step, for the ratio ------------------------------------------------------


def paper_style_loss(model: RPG, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference code's computation on the same weights: every window padded to 50, a key-padding
    mask, the m heads run at every position, then a per-digit loop over the labelled positions."""
    b, t = items.shape
    rows = items.clamp(min=0)
    x = F.embedding_bag((model.item_codes[rows].long() + model.digit_offsets).view(b * t, -1),
                        model.token_embeddings.reshape(-1, model.cfg.d_model), mode="mean").view(b, t, -1)
    x = model.embd_dropout(x + model.position_embeddings[:t])
    real = torch.arange(t) < lengths[:, None]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool)) & real[:, None, :]  # (B, T, T)
    mask = mask | torch.eye(t, dtype=torch.bool)  # pad queries attend to themselves (no NaN rows)
    for block in model.blocks:
        h = block.ln_1(x)
        q, k, v = block.qkv(h).view(b, t, 3, model.cfg.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=block.attn_dropout)
        x = x + block.attn_proj(att.transpose(1, 2).reshape(b, t, -1))
        x = x + block.mlp_proj(F.gelu(block.fc(block.ln_2(x)), approximate="tanh"))
    x = model.ln_f(x)
    states = torch.stack([x + F.silu(F.linear(x, model.head_weight[k], model.head_bias[k]))
                          for k in range(model.n_digit)], dim=-2)  # (B, T, m, d): every position
    labelled = targets.view(-1) != PAD
    selected = F.normalize(states.view(b * t, model.n_digit, -1)[labelled], dim=-1)
    table = F.normalize(model.token_embeddings, dim=-1)
    codes = model.item_codes[targets.view(-1)[labelled]].long()
    losses = [F.cross_entropy(selected[:, k] @ table[k].T / model.cfg.temperature, codes[:, k])
              for k in range(model.n_digit)]
    return torch.stack(losses).mean()


def reference_steps(dataset: str, run_dir: str, config: str, n_steps: int) -> None:
    """Median step time (forward, backward, AdamW) of the padded reference formulation (fp32, torch's
    default AdamW, as the reference code trains) beside ours: packed, fused AdamW, eager or compiled,
    fp32 or bf16-autocast. Every variant takes the same batches from the same initial weights."""
    from rpg_dist.tokenizer.semantic_ids import load_semantic_ids
    from rpg_dist.train.windows import collate_windows, read_range_shard

    cfg = load_config(config, [f"dataset={dataset}", f"run_dir={run_dir}"])
    codes = torch.from_numpy(load_semantic_ids(RunPaths(run_dir).semantic_ids).codes)
    windows = read_range_shard(os.path.join(run_dir, "windows", "train"), 0, 1)
    rng = np.random.default_rng(0)
    batches = [collate_windows(windows.take(rng.choice(len(windows), 256, replace=False))) for _ in range(n_steps + 1)]
    torch.manual_seed(0)
    weights = RPG(cfg.model, codes.shape[1], 256, codes).state_dict()
    variants = {  # name: (padded reference, bf16 autocast, compiled label loss)
        "padded to 50 (reference), fp32": (True, False, False),
        "packed (ours), fp32": (False, False, False),
        "packed (ours), fp32, compiled": (False, False, True),
        "packed (ours), bf16-autocast": (False, True, False),
        "packed (ours), bf16-autocast, compiled": (False, True, True),
    }
    medians = {}
    for name, (padded, bf16, compiled) in variants.items():
        model = RPG(cfg.model, codes.shape[1], 256, codes).train()
        model.load_state_dict(weights)
        if compiled:
            model.compile_label_loss()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=not padded)
        loss_fn = (lambda *a, model=model: paper_style_loss(model, *a)) if padded else model
        times = []
        for batch in batches:  # the first step warms up (and compiles): not timed
            inputs = ({k: F.pad(v, (0, cfg.model.max_seq_len - v.shape[1]), value=PAD) if v.dim() == 2 else v
                       for k, v in batch.items()} if padded else batch)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(inputs["items"], inputs["lengths"], inputs["targets"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times[1:])
    reference = medians["padded to 50 (reference), fp32"]
    print(f"\nstep of 256 windows, median of {n_steps} after one warm-up step ({torch.get_num_threads()} threads):")
    for name, seconds in medians.items():
        print(f"  {name:42} {seconds:7.3f} s   {reference / seconds:5.1f}x the padded reference")


if __name__ == "__main__":
    main()
