"""Serving benchmark: `rpg-dist serve` under load from a real HTTP client, beside the in-process decoder.

    python benchmarks/bench_serve.py --run /work/runs/beauty-snap92 --clients 1,8,64
    python benchmarks/bench_serve.py --run /work/runs/e2e1m/run --clients 1,8,64 --queries 2000

Queries are test-split histories of the run's dataset (a seeded sample), k 10, history excluded.
1. In-process: ``Recommender.rank`` over the queries in batches of ``--batch`` (what one replica's
   decoder can do at best on this box): queries/s.
2. The service (Ray Serve, one replica unless ``--replicas``) on loopback, and ``c`` closed-loop
   aiohttp clients for each ``c`` in ``--clients``: each sends its next request when the last one
   answers, until ``--requests`` answers or ``--seconds`` pass. Reports throughput, p50/p95/p99
   latency and how many requests each decoder batch held, and the ratio to in-process q/s; then
   the same at the highest concurrency with ``--per-request`` histories in each request.
3. The proxy's ceiling: GET /healthz (no decoding) at the highest concurrency.
The client runs on the same cores as the service: its CPU time is part of what the box must pay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402


def test_histories(run_dir: str, n: int, seed: int) -> list[list[int]]:
    from rpg_dist.config import read_run_config
    from rpg_dist.data.dataset import read_sequences
    from rpg_dist.data.splits import leave_one_out

    cfg = read_run_config(run_dir)
    split = leave_one_out(read_sequences(cfg.dataset, cfg.storage), max_len=cfg.model.max_seq_len)
    histories = split.test.histories
    pick = np.random.default_rng(seed).choice(len(histories), min(n, len(histories)), replace=False)
    return [histories[int(i)].as_py() for i in pick]


def in_process(run_dir: str, histories: list[list[int]], batch: int) -> dict:
    from rpg_dist.recommend import Recommender

    recommender = Recommender.load(run_dir, start="history")
    recommender.recommend(histories[:batch], k=10, exclude_history=True)  # warm-up
    started = time.perf_counter()
    for lo in range(0, len(histories), batch):
        recommender.recommend(histories[lo : lo + batch], k=10, exclude_history=True)
    spent = time.perf_counter() - started
    return {"queries_per_s": len(histories) / spent, "batch": batch, "torch_threads": torch.get_num_threads()}


async def load(url: str, histories: list[list[int]], clients: int, max_requests: int, seconds: float,
               per_request: int = 1, path: str = "/recommend") -> dict:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    counter = iter(range(max_requests))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for i in counter:
            if time.perf_counter() > deadline:
                return
            lo = (i * per_request) % len(histories)
            body = ({"history": histories[lo], "k": 10, "exclude_history": True} if per_request == 1 else
                    {"histories": histories[lo : lo + per_request], "k": 10, "exclude_history": True})
            sent = time.perf_counter()
            request = session.get(url + path) if path == "/healthz" else session.post(url + path, json=body)
            async with request as response:
                await response.read()
                failures += response.status != 200
            latencies.append(time.perf_counter() - sent)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        spent = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "path": path, "histories_per_request": per_request, "requests": len(latencies),
            "failures": failures, "requests_per_s": len(latencies) / spent,
            "queries_per_s": len(latencies) * (per_request if path != "/healthz" else 0) / spent,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def served(url: str) -> dict:
    import requests

    return requests.get(url + "/info", timeout=60).json()["served"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--queries", type=int, default=4000, help="distinct test histories")
    parser.add_argument("--requests", type=int, default=4000, help="at most this many per level")
    parser.add_argument("--seconds", type=float, default=60, help="at most this long per level")
    parser.add_argument("--batch", type=int, default=64, help="in-process batch (the service's max_batch_size)")
    parser.add_argument("--per-request", type=int, default=16, help="histories per request in the last level")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--graph", choices=["memory", "sharded"], default="memory",
                        help="sharded: one GraphShard deployment per graph partition")
    parser.add_argument("--cpus-per-shard", type=float, default=0.5)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from rpg_dist.serve import app
    from rpg_dist.serve.config import ServeConfig

    histories = test_histories(args.run, args.queries, args.seed)
    baseline = in_process(args.run, histories, args.batch)
    print(f"in-process: {baseline['queries_per_s']:.0f} q/s (batch {args.batch})", flush=True)
    cfg = ServeConfig(port=args.port, replicas=args.replicas, num_cpus_per_replica=args.cpus_per_replica,
                      max_batch_size=args.batch, graph=args.graph, num_cpus_per_shard=args.cpus_per_shard)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    url = app.start(args.run, cfg)
    levels = []
    try:
        asyncio.run(load(url, histories, 4, 200, 30))  # warm-up: connections, decoder per beam width
        clients = [int(c) for c in args.clients.split(",")]
        # The proxy's own ceiling: a route that decodes nothing, at the highest concurrency.
        ceiling = asyncio.run(load(url, histories, clients[-1], args.requests, args.seconds, path="/healthz"))
        print(json.dumps(ceiling), flush=True)
        runs = [(c, 1) for c in clients] + [(clients[-1], args.per_request)]
        for n_clients, per_request in runs:
            before = served(url)
            level = asyncio.run(load(url, histories, n_clients, args.requests, args.seconds, per_request))
            after = served(url)
            batches = max(after["batches"] - before["batches"], 1)
            level["requests_per_batch"] = (after["requests"] - before["requests"]) / batches
            level["vs_in_process"] = level["queries_per_s"] / baseline["queries_per_s"]
            level["vs_proxy_ceiling"] = level["requests_per_s"] / ceiling["requests_per_s"]
            levels.append(level)
            print(json.dumps(level), flush=True)
    finally:
        app.stop(local=True)
    result = {"machine": machine(), "run": args.run, "in_process": baseline, "proxy_ceiling": ceiling, "levels": levels,
              "serve": {"replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica,
                        "max_batch_size": args.batch, "graph": args.graph}}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
