"""``rpg-dist serve``: a trained run behind Ray Serve's HTTP proxy.

    app = build_app("runs/beauty", ServeConfig())
    serve.run(app, name=APP_NAME, route_prefix="/")   # after serve.start(http_options=...)

Concurrent requests reach one replica's ``_rank_batch`` together (``@serve.batch``) and are decoded
by one vectorised ``Recommender.rank`` call. The call blocks the replica's event loop on purpose:
run on a worker thread (``asyncio.to_thread``), the decoder held the GIL so much that the loop
admitted ~1.9 requests per batch at 32 clients on 2 cores (80 requests/s); blocking, the requests
wait in Ray's queue and all join the next batch (10.5 per batch, 183 requests/s). With
``graph=sharded`` the replica mostly waits on the shard deployments, so the call runs on a worker
thread there (a Serve handle's result cannot be awaited synchronously on the event loop), and
requests gather in a ``Coalescer`` instead of ``@serve.batch``, which would cut them into small
batches while one decodes (serve/coalesce.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time

import numpy as np
import torch
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from starlette.requests import Request
from starlette.responses import JSONResponse

from rpg_dist.decode.sharded import GraphShard
from rpg_dist.serve import api
from rpg_dist.serve.coalesce import Coalescer
from rpg_dist.serve.config import TOKEN_ENV, ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "rpg-dist"


@serve.deployment(name="GraphShard")
class GraphShardService(GraphShard):
    """One graph partition's lists and codes (``graph=sharded``); state per batch id, so every
    Recommender replica decodes through the same shard."""

    def __init__(self, run_dir: str, partition: int, n_items: int) -> None:
        from rpg_dist.config import read_run_config

        super().__init__(n_items)
        # The prior is computed here, so a replica that Serve restarts scores as the one it replaces.
        self.load_partition(run_dir, partition, read_run_config(run_dir).storage, with_prior=True)

    def replica(self) -> str:
        """This replica's Serve id (its actor's name)."""
        return serve.get_replica_context().replica_id.to_full_id_str()


@serve.deployment(name="Recommender")
class RecommenderService:
    """One replica: the run loaded once (model in eval mode, graph in memory or behind ``shards``,
    one GraphShard deployment handle per partition), requests batched."""

    def __init__(self, run_dir: str, cfg: ServeConfig, token_sha256: str | None, shards: list | None = None) -> None:
        from rpg_dist.config import read_run_config
        from rpg_dist.graph.store import load_partitions
        from rpg_dist.recommend import Recommender

        torch.set_num_threads(max(1, int(cfg.num_cpus_per_replica)))
        self.cfg, self.run_dir = cfg, run_dir
        self.token_sha256 = token_sha256
        start = None if cfg.start == "run" else cfg.start
        method = None if cfg.method == "run" else cfg.method
        self.recommender = Recommender.load(run_dir, start=start, changes=not shards, lists=not shards, method=method)
        if shards:
            storage = read_run_config(run_dir).storage
            self.recommender.use_shards(shards, load_partitions(run_dir, self.recommender.index, storage))
        self.encoder = None  # the run's tokenizer, loaded at the first POST /items
        self.checked_at = time.monotonic()
        self.limits = api.Limits(cfg.max_body_bytes, cfg.max_histories, cfg.max_history_len, cfg.max_k)
        self.info = _run_info(run_dir, self.recommender, cfg)
        # This replica's counts: requests per batch shows how well concurrent requests merge.
        self.served = {"requests": 0, "batches": 0, "histories": 0, "rank_s": 0.0}
        self._rank_batch.set_max_batch_size(cfg.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # graph=sharded: requests gather here while a batch waits on the shards.
        self.coalescer = Coalescer(self._rank_requests, cfg.max_batch_size) if shards else None

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._route(request))
        except api.RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except (RayError, RayServeException):  # graph=sharded: a shard died mid-batch, Serve replaces it
            log.warning("request %s %s: a graph shard failed; answered 503", request.method, request.url.path)
            return JSONResponse({"error": "a graph shard is restarting; retry", "field": ""}, status_code=503,
                                headers={"Retry-After": "1"})
        except Exception:  # a bug, not the client's fault: log it here, never send the traceback
            log.exception("request %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal error; see the replica's log", "field": ""}, status_code=500)

    async def _route(self, request: Request) -> dict:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/healthz": ("GET",), "/info": ("GET",), "/recommend": ("POST",), "/items": ("POST",)}
        route = "/items/{id}" if path.startswith("/items/") else path
        allowed = routes.get(route, ("DELETE",) if route == "/items/{id}" else None)
        if allowed is None:
            raise api.RequestError(404, "path", f"no route {path}; routes are {sorted(routes) + ['/items/{id}']}")
        if method not in allowed:
            raise api.RequestError(405, "method", f"{route} takes {', '.join(allowed)}, not {method}")
        if path == "/healthz":
            return {"status": "ok"}
        self._authorize(request)
        if path == "/info":
            return self._info()
        if route == "/items/{id}":
            return self._withdraw(api.parse_item_id(path[len("/items/"):]))
        payload = api.parse_json(await _read_body(request, self.cfg.max_body_bytes))
        if path == "/items":
            return self._add(payload)
        parsed = api.parse_recommend(payload, self.recommender.index, self.recommender.max_seq_len, self.limits)
        results = await (self._rank_batch(parsed) if self.coalescer is None else self.coalescer.submit(parsed))
        return {"results": results} if parsed.many else results[0]

    def _info(self) -> dict:
        self._catch_up()
        recommender = self.recommender
        return {**self.info, "n_items": len(recommender.index), "n_withdrawn": int(recommender.withdrawn.sum()),
                "catalogue_version": recommender.version, "decoding": recommender.decoding,
                "replica": serve.get_replica_context().replica_id.to_full_id_str(), "served": dict(self.served)}

    def _add(self, payload: object) -> dict:
        """POST /items: encode with the run's tokenizer, insert, commit a catalogue version."""
        from rpg_dist import catalogue
        from rpg_dist.errors import DataError

        self._check_changes("items")
        if self.encoder is None:
            self.encoder = catalogue.ItemEncoder(self.run_dir)
        new = api.parse_items(payload, self.recommender.index, self.encoder.needs_vectors, self.cfg.max_new_items)
        try:
            codes = self.encoder.codes(new.item_ids, new.texts, new.vectors, origin="items")
            change = catalogue.Change("add", new.item_ids, codes, new.titles)
            version = catalogue.change_and_commit(self.recommender, self.run_dir, change, self.recommender.version)
        except DataError as err:
            raise api.RequestError(400, "items", str(err)) from None
        self.recommender.version = version
        return {"added": len(new.item_ids), "version": version, "n_items": len(self.recommender.index)}

    def _withdraw(self, item_id: int) -> dict:
        """DELETE /items/{id}: never recommended again, out of the graph; idempotent."""
        from rpg_dist import catalogue

        self._check_changes("item_id")
        self._catch_up(now=True)  # an item another replica added a moment ago is known here too
        if not self.recommender.index.find(np.array([item_id]))[1][0]:
            raise api.RequestError(404, "item_id", f"item {item_id} is not in the catalogue")
        change = catalogue.Change("withdraw", np.array([item_id], dtype=np.int64))
        version = catalogue.change_and_commit(self.recommender, self.run_dir, change, self.recommender.version)
        self.recommender.version = version
        return {"withdrawn": item_id, "version": version}

    def _check_changes(self, field: str) -> None:
        if self.recommender.shards is not None:
            raise api.RequestError(409, field, "this service decodes over graph shards (graph=sharded), which "
                                   "serve the built graph as it is; change the catalogue on a graph=memory service")

    def _catch_up(self, now: bool = False) -> None:
        """Serve the changes other replicas (or `rpg-dist add-items`) committed since our version;
        at most every ``catalogue_poll_s`` unless ``now``."""
        from rpg_dist import catalogue

        if self.recommender.shards is not None:
            return
        if not now and time.monotonic() - self.checked_at < self.cfg.catalogue_poll_s:
            return
        self.checked_at = time.monotonic()
        if catalogue.current(self.run_dir)["version"] > self.recommender.version:
            self.recommender.version = catalogue.replay(self.recommender, self.run_dir, since=self.recommender.version)

    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
            raise api.RequestError(401, "authorization", "missing or wrong bearer token")

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, requests: list[api.RecommendRequest]) -> list[list[dict]]:
        """The in-memory decoder: blocks the event loop on purpose (the module's docstring)."""
        return self._rank_requests(requests)

    def _rank_requests(self, requests: list[api.RecommendRequest]) -> list[list[dict]]:
        """Every history of every request in one ``rank`` call; answers split back per request."""
        from rpg_dist.model.rpg import right_pad

        self._catch_up()
        # Ids become rows here, not at parsing: a catalogue change in between re-deals the rows.
        lengths = np.concatenate([r.lengths for r in requests])
        rows = self.recommender.index.rows(np.concatenate([r.item_ids for r in requests]))
        items = torch.from_numpy(right_pad(rows, lengths))
        k = torch.from_numpy(np.repeat([r.k for r in requests], [len(r.lengths) for r in requests]))
        exclude = torch.from_numpy(np.repeat([r.exclude_history for r in requests], [len(r.lengths) for r in requests]))
        started = time.perf_counter()
        ranked = self.recommender.rank(items, torch.from_numpy(lengths), k, exclude)
        self.served["rank_s"] += time.perf_counter() - started
        answers = self._answers(ranked)
        self.served["requests"] += len(requests)
        self.served["batches"] += 1
        self.served["histories"] += len(lengths)
        bounds = np.cumsum([0] + [len(r.lengths) for r in requests])
        return [answers[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def _answers(self, ranked) -> list[dict]:
        rows, scores = ranked.rows.numpy(), ranked.scores.numpy()
        kept = rows >= 0
        ids = self.recommender.index.item_ids[np.where(kept, rows, 0)]
        titles = self.recommender.titles
        return [api.answer(ids[q][kept[q]], scores[q][kept[q]], titles[rows[q][kept[q]]].tolist(), int(n))
                for q, n in enumerate(ranked.n_visited.tolist())]


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise api.RequestError(413, "body", f"body of {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise api.RequestError(413, "body", f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _run_info(run_dir: str, recommender, cfg: ServeConfig) -> dict:
    from rpg_dist import catalogue, io
    from rpg_dist.artifacts import RunPaths
    from rpg_dist.config import read_run_config
    from rpg_dist.model.export import read_model_metadata

    storage = read_run_config(run_dir).storage
    # load_model checked the weights against this digest; exports from before it get hashed here.
    weights = read_model_metadata(run_dir, storage).get("weights_sha256") or hashlib.sha256(
        io.read_bytes(RunPaths(run_dir).model_weights, storage)).hexdigest()
    return {
        "run": run_dir,
        "n_items": len(recommender.index),
        "graph_version": catalogue.graph_version(run_dir, storage),
        "decoding": recommender.decoding,
        "graph": cfg.graph,
        "n_shards": 0 if recommender.shards is None else len(recommender.shards[0]),
        "config_sha256": hashlib.sha256(io.read_bytes(io.join(run_dir, "config.yaml"), storage)).hexdigest(),
        "model_sha256": weights,
        "decode": {"num_beams": recommender.decode_cfg.num_beams, "steps": recommender.decode_cfg.steps,
                   "start": recommender.decode_cfg.start},
        "max_seq_len": recommender.max_seq_len,
        "limits": {"max_k": min(cfg.max_k, len(recommender.index)), "max_histories": cfg.max_histories,
                   "max_history_len": cfg.max_history_len, "max_body_bytes": cfg.max_body_bytes},
    }


def build_app(run_dir: str, cfg: ServeConfig):
    """The Serve application of ``run_dir``: ``cfg.replicas`` replicas of the service (and with
    ``cfg.graph == "sharded"`` one GraphShard deployment per graph partition).

    Raises:
        ConfigError: ``cfg.host`` reaches beyond this machine and no token is set (see TOKEN_ENV);
            ``graph=sharded`` on a run without a graph or with committed catalogue changes.
    """
    from rpg_dist.errors import ConfigError

    token = os.environ.get(TOKEN_ENV)
    if not token and not cfg.is_loopback() and not cfg.allow_unauthenticated:
        raise ConfigError(f"host: {cfg.host} is reachable beyond this machine; set {TOKEN_ENV} to require a "
                          "bearer token, or --set allow_unauthenticated=true")
    digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    deployment = RecommenderService.options(
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus_per_replica}, max_constructor_retry_count=2,
    )
    return deployment.bind(run_dir, cfg, digest, _shards(run_dir, cfg))


def _shards(run_dir: str, cfg: ServeConfig) -> list:
    """One bound GraphShard deployment per partition (``graph=sharded``), else none."""
    from rpg_dist import catalogue
    from rpg_dist.config import read_run_config
    from rpg_dist.errors import ConfigError, StageError
    from rpg_dist.graph.store import read_manifest

    if cfg.graph != "sharded":
        return []
    storage = read_run_config(run_dir).storage
    try:
        manifest = read_manifest(run_dir, storage)
    except StageError as err:
        raise ConfigError(f"graph: sharded needs the run's graph: {err}") from None
    method = read_run_config(run_dir).decode.method if cfg.method == "run" else cfg.method
    if method == "full":
        raise ConfigError("graph: sharded serves by graph decoding, and the run's decode.method is full ranking; "
                          "--set method=auto (or graph)")
    version = catalogue.current(run_dir, storage)["version"]
    if version > 0:
        raise ConfigError(f"graph: sharded serves the built graph, and {run_dir} has {version} catalogue changes "
                          "committed since; serve it with graph=memory (or rebuild the graph)")
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": cfg.num_cpus_per_shard},
               "max_ongoing_requests": cfg.max_ongoing_requests}
    return [GraphShardService.options(name=f"GraphShard{part}", **options).bind(run_dir, int(part), manifest["n_items"])
            for part in range(manifest["n_partitions"])]


def start(run_dir: str, cfg: ServeConfig, address: str | None = None) -> str:
    """Join (or start) Ray, start Serve's proxy on ``cfg.host:cfg.port`` and deploy ``run_dir``;
    returns the service's URL once every replica has loaded the run.

    Raises:
        StageError: ``run_dir`` has no config or trained model (checked before anything starts).
    """
    from rpg_dist.config import RayConfig, read_run_config
    from rpg_dist.model.export import read_model_metadata
    from rpg_dist.raycluster import init_ray

    read_model_metadata(run_dir, read_run_config(run_dir).storage)
    app = build_app(run_dir, cfg)
    init_ray(RayConfig(address=address))
    # A log line per request costs the proxy and the replica more than routing it (Serve logs every
    # request at INFO by default); warnings and errors are still logged.
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    return f"http://{cfg.host}:{cfg.port}"


def stop(local: bool) -> None:
    """Remove the application; on a Ray started by ``start`` (``local``) also Serve and Ray."""
    import ray

    serve.delete(APP_NAME)
    if local:
        serve.shutdown()
        ray.shutdown()
