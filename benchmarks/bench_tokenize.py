"""Tokenize benchmark: embedding items/s through Ray vs one plain process, OPQ train/encode seconds.

    # Beauty (12,101 items; prepared from RPG_DATA_DIR, default ../shared/data): embedding with the
    # bundled encoder in one plain process, then through Ray with 1 and 2 actors; OPQ32 train/encode
    python benchmarks/bench_tokenize.py beauty
    # Synthetic 1M x 384 embeddings (encoder skipped): OPQ32 trained on 200k, 1M encoded by 2 actors
    python benchmarks/bench_tokenize.py synthetic --items 1000000 --train 200000
    # small validation runs
    python benchmarks/bench_tokenize.py beauty --dataset synth:2000 --repeats 1 --opq-niter 4
    python benchmarks/bench_tokenize.py synthetic --items 20000 --train 5000 --opq-niter 4

Ray runs use the stage's own code (``embed_dataset``, ``encode_shards``): shards, Ray Data actor
pools, parquet part files and manifests included, so the Ray figures carry all of the stage's
overhead. Each Ray figure comes twice: wall time (actor start and model load included) and steady
state (items over the actors' busy seconds, from the shard manifests). Machine limits: the encoder's
FLOPs per item are counted from its tokenised texts and set against the matmul rates measured on
this box by the script itself (benchmarks/common.py); OPQ encoding costs
D^2 + 256 D multiply-adds per item.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import machine, matmul_gflops  # noqa: E402
# The environment the stage gives its Ray workers (shards.worker_env), here too, before torch/faiss
# load OpenMP: the plain-process baseline and in-process OPQ figures run under the same conditions.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rpg_dist import io  # noqa: E402
from rpg_dist.artifacts import RunPaths  # noqa: E402
from rpg_dist.config import config_from_dict  # noqa: E402
from rpg_dist.data import dataset  # noqa: E402
from rpg_dist.tokenizer import embed, opq, shards, stage  # noqa: E402
from rpg_dist.tokenizer.config import TokenizeConfig  # noqa: E402

def make_cfg(dataset_uri: str, run_dir: str, **tokenize) -> object:
    return config_from_dict({"dataset": dataset_uri, "run_dir": run_dir, "seed": 2024,
                             "ray": {"num_cpus": 2 * (os.cpu_count() or 1)}, "tokenize": tokenize})


def steady_items_per_s(manifest_dir: str) -> float:
    """Sum over actors of (items / busy seconds), from the shard manifests of one run."""
    per_pid: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for m in shards.read_manifests(manifest_dir):
        per_pid[m["pid"]][0] += m["n_items"]
        per_pid[m["pid"]][1] += m["seconds"]
    return sum(n / s for n, s in per_pid.values() if s > 0)


def peak_rss_per_worker(manifest_dir: str) -> dict[int, float]:
    peaks: dict[int, float] = defaultdict(float)
    for m in shards.read_manifests(manifest_dir):
        peaks[m["pid"]] = max(peaks[m["pid"]], m["peak_rss_mb"])
    return dict(peaks)


def resolve_dataset(spec: str, workdir: str) -> str:
    """``beauty`` (prepared from RPG_DATA_DIR), ``synth:N`` (generated) or an existing dataset URI."""
    from rpg_dist.data import importers, synth

    out = os.path.join(workdir, "dataset")
    if spec == "beauty":
        from rpg_dist.data.config import PrepareConfig

        root = os.environ.get("RPG_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
        importers.prepare(PrepareConfig(format="s3rec", input=os.path.join(root, "amazon2014-beauty")), out)
        return out
    if spec.startswith("synth:"):
        n = int(spec.split(":", 1)[1])
        importers.write(synth.generate(n_items=n, n_users=n, seed=0), out, source="synth")
        return out
    return spec


def encoder_gflop_per_item(texts: list[str], model) -> float:
    """2 x multiply-adds of MiniLM-style layers per item: per token 4 d^2 + 2 d f (+ attention 2 L d)."""
    cfg = model[0].auto_model.config
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    lengths = np.array([len(ids) for ids in model.tokenizer(texts[:2000], truncation=True)["input_ids"]])
    macs = layers * (lengths * (4 * d * d + 2 * d * f) + 2 * lengths**2 * d)
    return float(2 * macs.mean() / 1e9)


def plain_process(dataset_uri: str, dtype: str, batch_size: int, repeats: int) -> dict:
    """The same encoder in this process, all cores, no Ray: the baseline."""
    texts = dataset.read_items(dataset_uri).column("text").to_pylist()
    start = time.perf_counter()
    model = embed.load_encoder("bundled", dtype, "cpu", os.cpu_count() or 1)
    load_s = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        embed.embed_texts(model, texts, batch_size)
        runs.append(len(texts) / (time.perf_counter() - start))
    gflop = encoder_gflop_per_item(texts, model)
    median = statistics.median(runs)
    peak = matmul_gflops(getattr(torch, dtype))
    return {"items": len(texts), "load_s": load_s, "items_per_s_median": median, "items_per_s_runs": runs,
            "gflop_per_item": gflop, "achieved_gflops": median * gflop, "matmul_gflops": peak,
            "fraction_of_matmul_peak": median * gflop / peak}


def ray_embedding(dataset_uri: str, workdir: str, actors: int, dtype: str, batch_size: int,
                  shard_size: int, repeats: int) -> dict:
    """Embedding through the stage (Ray Data actor pool), the machine's cores split over ``actors``."""
    cores = os.cpu_count() or 1
    walls, steadies = [], []
    for rep in range(repeats):
        run_dir = os.path.join(workdir, f"ray{actors}-{rep}")
        cfg = make_cfg(dataset_uri, run_dir, encoder_dtype=dtype, embed_batch_size=batch_size,
                       shard_size=shard_size, concurrency=actors, num_cpus_per_actor=cores / actors,
                       threads_per_actor=max(1, cores // actors))
        _, _, timings = stage.embed_dataset(cfg)
        walls.append(timings["embed_items"] / timings["embed_seconds"])
        steadies.append(steady_items_per_s(RunPaths(run_dir).embedding_manifests))
    return {"actors": actors, "threads_per_actor": max(1, cores // actors),
            "wall_items_per_s_median": statistics.median(walls),
            "steady_items_per_s_median": statistics.median(steadies), "run_dir": run_dir}


def opq_on_embeddings(run_dir: str, dataset_uri: str, n_digit: int, niter: int, seed: int = 2024) -> dict:
    """Train OPQ on the training-sequence items' embeddings, encode all items (in process, all cores)."""
    paths = RunPaths(run_dir)
    parts = io.list_files(paths.embeddings, ".parquet")
    sample = stage.training_sample(dataset_uri, None, 50, 1_000_000, seed)
    x = opq.gather_sample(parts, sample, None)
    cfg = TokenizeConfig(n_digit=n_digit, opq_niter=niter)
    start = time.perf_counter()
    index = opq.train_index(x, cfg, seed, os.cpu_count() or 1)
    train_s = time.perf_counter() - start
    pairs = [embed.read_embeddings(p) for p in parts]
    emb = np.concatenate([e for _, e in pairs])
    start = time.perf_counter()
    codes = opq.encode(index, emb)
    encode_s = time.perf_counter() - start
    from rpg_dist.tokenizer.stats import count_colliding_exact

    return {"n_sample": len(x), "opq_niter": niter, "train_s": train_s, "encode_s": encode_s,
            "encode_items_per_s": len(emb) / encode_s, "colliding_items": count_colliding_exact(codes)}


def bench_beauty(args, workdir: str) -> dict:
    dataset_uri = resolve_dataset(args.dataset, workdir)
    out = {"machine": machine(), "dataset": args.dataset, "dtype": args.dtype}
    out["plain"] = plain_process(dataset_uri, args.dtype, args.batch_size, args.repeats)
    for actors in (1, 2):
        out[f"ray_{actors}_actor"] = ray_embedding(dataset_uri, workdir, actors, args.dtype, args.batch_size,
                                                   args.shard_size, args.repeats)
        ratio = out[f"ray_{actors}_actor"]["steady_items_per_s_median"] / out["plain"]["items_per_s_median"]
        out[f"ray_{actors}_actor"]["steady_vs_plain"] = ratio
        out[f"ray_{actors}_actor"]["wall_vs_plain"] = (out[f"ray_{actors}_actor"]["wall_items_per_s_median"]
                                                       / out["plain"]["items_per_s_median"])
    out["opq"] = opq_on_embeddings(out["ray_2_actor"]["run_dir"], dataset_uri, args.n_digit, args.opq_niter)
    return out


def synthetic_part(shard: int, shard_size: int, n_items: int, dim: int, centres: np.ndarray) -> tuple:
    """Shard ``shard`` of the synthetic catalogue: unit vectors around shared centres (seeded per shard)."""
    rng = np.random.default_rng(1000 + shard)
    lo, hi = shard * shard_size, min(n_items, (shard + 1) * shard_size)
    x = centres[rng.integers(0, len(centres), hi - lo)] + 0.5 * rng.standard_normal((hi - lo, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(lo, hi, dtype=np.int64), x.astype(np.float32)


def write_synthetic(run_dir: str, n_items: int, dim: int, shard_size: int) -> list[str]:
    """Embedding part files and manifests exactly as the embedding stage commits them."""
    paths = RunPaths(run_dir)
    centres = np.random.default_rng(0).standard_normal((1000, dim))
    keys = []
    for shard in range((n_items + shard_size - 1) // shard_size):
        key = f"{shard:06d}"
        ids, x = synthetic_part(shard, shard_size, n_items, dim, centres)
        io.write_parquet(embed.embedding_table(ids, x), io.join(paths.embeddings, shards.part_name(key)))
        shards.write_manifest(paths.embedding_manifests, key, "synthetic", None, kind="embed", n_items=len(ids))
        keys.append(key)
    return keys


def bench_synthetic(args, workdir: str) -> dict:
    import ray

    run_dir = os.path.join(workdir, "run")
    start = time.perf_counter()
    keys = write_synthetic(run_dir, args.items, args.dim, args.shard_size)
    out = {"machine": machine(), "items": args.items, "dim": args.dim, "shard_size": args.shard_size,
           "write_s": time.perf_counter() - start}
    parts = [io.join(RunPaths(run_dir).embeddings, shards.part_name(k)) for k in keys]
    n_train_parts = max(1, -(-args.train // args.shard_size))
    x = np.concatenate([embed.read_embeddings(p)[1] for p in parts[:n_train_parts]])[: args.train]
    cfg_t = TokenizeConfig(n_digit=args.n_digit, opq_niter=args.opq_niter)
    start = time.perf_counter()
    index = opq.train_index(x, cfg_t, 0, os.cpu_count() or 1)
    out.update(train_items=len(x), opq_niter=args.opq_niter, train_s=time.perf_counter() - start)
    del x
    cfg = make_cfg("unused", run_dir, n_digit=args.n_digit, concurrency=args.actors,
                   num_cpus_per_actor=(os.cpu_count() or 1) / args.actors)
    stage.save_index(RunPaths(run_dir), None, opq.serialize(index), {"fingerprint": "synthetic"})
    timings = stage.encode_shards(cfg, keys)
    manifests = RunPaths(run_dir).code_manifests
    out.update(encode_actors=args.actors, encode_wall_s=timings["encode_seconds"],
               encode_wall_items_per_s=timings["encode_items_per_s"],
               encode_steady_items_per_s=steady_items_per_s(manifests),
               peak_rss_mb_per_worker=peak_rss_per_worker(manifests),
               shard_payload_mb=args.shard_size * args.dim * 4 / 2**20)
    ray.shutdown()
    # Machine limit: the rotation (D^2) and the PQ distances (256 D) per item at the fp32 matmul rate.
    gflop = 2 * (args.dim**2 + 256 * args.dim) * args.items / 1e9
    out["matmul_gflops_fp32"] = matmul_gflops(torch.float32)
    out["encode_limit_s"] = gflop / out["matmul_gflops_fp32"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("beauty")
    p.add_argument("--dataset", default="beauty", help="beauty | synth:N | an existing dataset URI")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-digit", type=int, default=32)
    p.add_argument("--opq-niter", type=int, default=50)
    p = sub.add_parser("synthetic")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--train", type=int, default=200_000)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--n-digit", type=int, default=32)
    p.add_argument("--opq-niter", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix=f"bench-tokenize-{args.part}-")
    try:
        result = bench_beauty(args, workdir) if args.part == "beauty" else bench_synthetic(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # up to ~1.5 GB of synthetic parts
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
