"""The CUDA paths, measured: one JSON line per figure (run by benchmarks/gpu_check.sh on a GPU machine).

    python benchmarks/gpu_figures.py --beauty DIR --out figures.jsonl            # on a GPU machine
    python benchmarks/gpu_figures.py --device cpu --quick --out figures.jsonl    # the same code on CPU

Figures: the device's bf16 GEMM rate; full ranking and graph decoding queries/s on the device at
Beauty's size (12,101 items) and at 1M items (random log-probabilities, m 32, V 256, batch 256,
b 20, k 200, q 3); Beauty training through the real `rpg-dist train` path (launcher local, one
process, DeepSpeed over NCCL on one GPU) in bf16 with ZeRO 0 and 2: sequences/s of the timed
steps. Beauty's codes are random (the compute does not depend on them); faiss-gpu is reported as
not installable when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def emit(out, name: str, **values) -> None:
    line = json.dumps({"figure": name, **values})
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def gemm_tflops(device: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def decoding(device: torch.device, n_items: int, batches: int, out) -> None:
    """Full ranking and graph decoding on ``device`` over a random catalogue and a random graph."""
    from rpg_dist.decode.graph_decode import GraphDecoder, random_start_items
    from rpg_dist.decode.scoring import full_ranking_topk

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (n_items, 32), generator=gen, dtype=torch.int16)
    neighbors = torch.randint(0, n_items, (n_items, 200), generator=gen, dtype=torch.int32)
    log_probs = torch.randn(256, 32, 256, generator=gen).log_softmax(-1)
    codes_d, lp = codes.to(device), log_probs.to(device)
    full_ranking_topk(lp, codes_d, 10)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        full_ranking_topk(lp, codes_d, 10)
    _sync(device)
    emit(out, "full_ranking", device=str(device), n_items=n_items, queries_per_s=256 * batches / (time.perf_counter() - start))
    decoder = GraphDecoder(codes_d, neighbors.to(device), num_beams=20, steps=3)
    begin = random_start_items(256, n_items, 20, gen).to(device)
    decoder.decode(lp, begin, 10)
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        decoder.decode(lp, begin, 10)
    _sync(device)
    emit(out, "graph_decoding", device=str(device), n_items=n_items, beams=20, edges=200, steps=3,
         queries_per_s=256 * batches / (time.perf_counter() - start))


def training(beauty: str, device: torch.device, steps: int, zero: int, compiled: bool, out) -> None:
    """Beauty windows through `rpg-dist train` (local launcher): the trainer's own summary."""
    from rpg_dist.data.config import PrepareConfig
    from rpg_dist.data.importers import prepare
    from rpg_dist.testing.semantic_ids import write_random_semantic_ids

    with tempfile.TemporaryDirectory(prefix="rpg-gpu-") as root:
        dataset, run_dir, summary = f"{root}/dataset", f"{root}/run", f"{root}/summary.json"
        prepare(PrepareConfig(format="s3rec", input=beauty), dataset)
        write_random_semantic_ids(dataset, run_dir, n_digit=32)
        gpu = device.type == "cuda"
        sets = [f"dataset={dataset}", f"run_dir={run_dir}", "train.launcher=local", f"train.max_steps={steps}",
                f"train.zero_stage={zero}", f"train.use_gpu={'true' if gpu else 'false'}",
                f"train.compile={'true' if compiled else 'false'}",
                f"train.precision={'bf16' if gpu else 'fp32'}", "train.val_users=2000", "train.eval_every=1000",
                "train.log_every=20"]
        cmd = [sys.executable, "-m", "rpg_dist.train.torchrun_main", "--config", f"{REPO}/configs/beauty.yaml",
               *[arg for s in sets for arg in ("--set", s)], "--summary-out", summary]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29555"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode:
            emit(out, "training", zero_stage=zero, compiled=compiled, error=proc.stderr[-1500:])
            return
        result = json.load(open(summary))
        emit(out, "training", device=str(device), zero_stage=zero, compiled=compiled,
             precision="bf16" if gpu else "fp32", steps=result.get("steps"), seq_per_s=result.get("seq_per_s"),
             first_step_s=result.get("first_step_seconds"), wall_time_s=result.get("wall_time_s"),
             peak_rss_mb=result.get("peak_rss_mb"))


def faiss_gpu(out) -> None:
    try:
        import faiss
    except ImportError:
        emit(out, "faiss_gpu", available=False, reason="faiss is not installed")
        return
    emit(out, "faiss_gpu", available=hasattr(faiss, "StandardGpuResources"),
         gpus=faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--beauty", default=None, help="folder with sequences.txt and items.jsonl")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke test)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    with open(args.out, "w") as out:
        emit(out, "device", device_name=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
             torch=torch.__version__, gemm_tflops=gemm_tflops(device, 512 if args.quick else 8192))
        for n_items in ((2000,) if args.quick else (12_101, 1_000_000)):
            decoding(device, n_items, 1 if args.quick else 20, out)
        if args.beauty:
            # ZeRO 0 with the compiled heads and loss (configs/beauty.yaml's setting), ZeRO 2 eager.
            for zero, compiled in (((0, False),) if args.quick else ((0, True), (2, False))):
                training(args.beauty, device, 3 if args.quick else 200, zero, compiled, out)
        faiss_gpu(out)


if __name__ == "__main__":
    main()
