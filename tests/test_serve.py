"""`rpg-dist serve`: a real Ray Serve answering real HTTP requests on loopback, on the tiny run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.data.items import ItemIndex
from rpg_dist.recommend import Recommender, _keep_top
from rpg_dist.serve import api

from conftest import free_port

RPG = str(Path(sys.executable).parent / "rpg-dist")
TOKEN = "test-token-not-a-real-secret-41"
HISTORIES = [[5, 17, 300], [44], [1, 2, 3, 4, 5, 6, 7], [799, 800], [120, 121, 122, 123]]


# ---- the API without Ray ---------------------------------------------------------------------------

LIMITS = api.Limits(max_body_bytes=1000, max_histories=3, max_history_len=6, max_k=50)
INDEX = ItemIndex(np.array([5, 17, 44, 300, 2**62]))


@pytest.mark.parametrize("payload, field", [
    ([1, 2], "body"),
    ({"history": [5], "user": 3}, "user"),
    ({}, "history"),
    ({"history": [5], "histories": [[5]]}, "history"),
    ({"history": "5,17"}, "history"),
    ({"history": []}, "history"),
    ({"history": [5, 17, 44, 300, 5, 17, 44]}, "history"),  # longer than max_history_len
    ({"history": [5, 17.0]}, "history[1]"),
    ({"history": [5, True]}, "history[1]"),
    ({"history": [5, 2**64]}, "history[1]"),
    ({"history": [5, 999]}, "history[1]"),
    ({"histories": [[5], [17, 44, 6]]}, "histories[1][2]"),
    ({"histories": []}, "histories"),
    ({"histories": [[5]] * 4}, "histories"),
    ({"history": [5], "k": 0}, "k"),
    ({"history": [5], "k": 6}, "k"),  # more than the 5 items
    ({"history": [5], "k": "3"}, "k"),
    ({"history": [5], "k": 2.5}, "k"),
    ({"history": [5], "exclude_history": "yes"}, "exclude_history"),
])
def test_bad_payloads_are_400_naming_the_field(payload, field):
    with pytest.raises(api.RequestError) as err:
        api.parse_recommend(payload, INDEX, max_seq_len=3, limits=LIMITS)
    assert (err.value.status, err.value.field) == (400, field), err.value.message


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b'{"history": [NaN]}', b'{"history": [5], "k": Infinity}'])
def test_bad_json_is_400_on_the_body(body):
    with pytest.raises(api.RequestError) as err:
        api.parse_json(body)
    assert (err.value.status, err.value.field) == (400, "body")


def test_histories_keep_their_last_max_seq_len_items():
    parsed = api.parse_recommend({"histories": [[5, 17, 44, 300], [2**62], [300, 5]], "k": 2},
                                 INDEX, max_seq_len=3, limits=LIMITS)
    assert parsed.lengths.tolist() == [3, 1, 2] and parsed.many and parsed.k == 2 and parsed.exclude_history
    assert parsed.item_ids.tolist() == [17, 44, 300, 2**62, 300, 5]


def test_keep_top_matches_a_per_query_filter():
    """Excluding history items and cutting at each query's k, against the plain definition."""
    gen = torch.Generator().manual_seed(0)
    batch, width, n_items = 40, 12, 30
    rows = torch.stack([torch.randperm(n_items, generator=gen)[:width] for _ in range(batch)])
    scores = -torch.sort(torch.rand(batch, width, generator=gen), dim=1).values.cumsum(1)
    lengths = torch.randint(1, 6, (batch,), generator=gen)
    items = torch.full((batch, 5), -1)
    for q in range(batch):
        items[q, : lengths[q]] = torch.randint(0, n_items, (int(lengths[q]),), generator=gen)
    k = torch.randint(1, 8, (batch,), generator=gen)
    exclude = torch.rand(batch, generator=gen) < 0.5
    got = _keep_top(rows, scores, torch.zeros(batch), items, exclude, k)
    for q in range(batch):
        history = set(items[q, : lengths[q]].tolist()) if exclude[q] else set()
        want = [(r, s) for r, s in zip(rows[q].tolist(), scores[q].tolist()) if r not in history][: int(k[q])]
        kept = [(r, s) for r, s in zip(got.rows[q].tolist(), got.scores[q].tolist()) if r >= 0]
        assert kept == want


# ---- the CLI service over HTTP ---------------------------------------------------------------------

class Service:
    """``rpg-dist serve`` in its own process session; ``url`` once it printed that it serves."""

    def __init__(self, run_dir: str, port: int, *args: str) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        env = {**os.environ, "RPG_DIST_SERVE_TOKEN": TOKEN, "RAY_AUTH_MODE": "disabled"}
        self.proc = subprocess.Popen([RPG, "serve", "--run", run_dir, "--port", str(port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("serving "):
                self.ready.set()
        self.ready.set()  # exited: wake the waiter, which checks the process

    def wait_ready(self, timeout: float = 300) -> None:
        assert self.ready.wait(timeout), "no 'serving' line within the deadline:\n" + "".join(self.lines[-40:])
        assert self.proc.poll() is None, "rpg-dist serve exited:\n" + "".join(self.lines[-40:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def post(self, body, token: str | None = TOKEN, path: str = "/recommend", **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = body if isinstance(body, bytes) else json.dumps(body)
        return requests.post(self.url + path, data=data, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, token: str | None = TOKEN) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.url + path, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def service(tiny_run):
    _, run_dir, _ = tiny_run
    # Graph decoding (at 800 items decode.method=auto would rank every item: a test of its own below).
    svc = Service(run_dir, free_port(), "--set", "max_body_bytes=4096", "--set", "max_history_len=100",
                  "--set", "method=graph")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def local_answers(tiny_run):
    """The in-process recommender the service wraps (history starts, as the service's default)."""
    return Recommender.load(tiny_run[1], start="history", method="graph")


def _ids(answer: dict) -> list[int]:
    return [item["item_id"] for item in answer["items"]]


@pytest.mark.slow
def test_http_answers_equal_the_in_process_recommender(service, local_answers):
    for exclude in (True, False):
        for history in HISTORIES:
            got = service.post({"history": history, "k": 5, "exclude_history": exclude})
            assert got.status_code == 200, got.text
            want = local_answers.recommend([history], k=5, exclude_history=exclude)[0]
            assert _ids(got.json()) == [r.item_id for r in want]
            np.testing.assert_allclose([i["score"] for i in got.json()["items"]], [r.score for r in want], atol=1e-4)
            assert [i["title"] for i in got.json()["items"]] == [r.title for r in want]
            assert 0 < got.json()["n_visited_items"] < 800
            if exclude:
                assert not set(_ids(got.json())) & set(history)
    many = service.post({"histories": HISTORIES, "k": 3})
    assert [_ids(r) for r in many.json()["results"]] == [_ids(service.post({"history": h, "k": 3}).json())
                                                          for h in HISTORIES]


@pytest.mark.slow
def test_concurrent_requests_get_the_answers_they_get_alone(service):
    rng = np.random.default_rng(3)
    histories = [rng.integers(1, 801, rng.integers(1, 12)).tolist() for _ in range(32)]
    alone = [_ids(service.post({"history": h, "k": 4}).json()) for h in histories]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda h: service.post({"history": h, "k": 4}), histories))
    assert [r.status_code for r in together] == [200] * len(histories)
    assert [_ids(r.json()) for r in together] == alone


@pytest.mark.slow
def test_bad_requests_are_4xx_naming_the_field(service):
    cases = [
        (service.post(b"{not json"), 400, "body"),
        (service.post(b"\xff\xfe"), 400, "body"),
        (service.post({"history": [5, 999999]}), 400, "history[1]"),
        (service.post({"history": []}), 400, "history"),
        (service.post({"history": list(range(101))}), 400, "history"),
        (service.post({"history": [5], "k": 0}), 400, "k"),
        (service.post({"history": [5], "k": 801}), 400, "k"),
        (service.post({"history": ["5"]}), 400, "history[0]"),
        (service.post({"history": [5], "n": 3}), 400, "n"),
        (service.post(b'{"history": [' + b"1," * 3000 + b"1]}"), 413, "body"),  # over max_body_bytes
        (service.post({"history": [5]}, token=None), 401, "authorization"),
        (service.post({"history": [5]}, token="wrong"), 401, "authorization"),
        (service.get("/recommend"), 405, "method"),
        (service.get("/nowhere"), 404, "path"),
    ]
    for response, status, field in cases:
        assert (response.status_code, response.json()["field"]) == (status, field), response.text
        assert "Traceback" not in response.text
    assert service.post({"history": [5]}).status_code == 200  # the service is still fine


@pytest.mark.slow
def test_health_and_info(service, tiny_run):
    _, run_dir, _ = tiny_run
    assert service.get("/healthz", token=None).json() == {"status": "ok"}
    assert service.get("/info", token=None).status_code == 401
    info = service.get("/info").json()
    assert info["n_items"] == 800 and info["decoding"] == "graph" and info["run"] == run_dir
    assert info["config_sha256"] == hashlib.sha256(Path(run_dir, "config.yaml").read_bytes()).hexdigest()
    assert info["graph_version"] == io.read_json(RunPaths(run_dir).stage_manifest("build-graph"))["run_id"]
    assert info["limits"]["max_body_bytes"] == 4096 and info["limits"]["max_history_len"] == 100
    assert TOKEN not in json.dumps(info)


def _outward_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_binds_loopback_only(service):
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no address beyond loopback to try")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{address}:{service.port}/healthz", timeout=10)


def test_refuses_to_bind_beyond_loopback_without_a_token(tiny_run):
    env = {k: v for k, v in os.environ.items() if k != "RPG_DIST_SERVE_TOKEN"}
    out = subprocess.run([RPG, "serve", "--run", tiny_run[1], "--host", "0.0.0.0"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2 and "RPG_DIST_SERVE_TOKEN" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_sigterm_stops_the_service_and_its_processes(tiny_run):
    service = Service(tiny_run[1], free_port())
    service.wait_ready()
    session = os.getsid(service.proc.pid)
    during = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "-s", str(session)], capture_output=True, text=True).stdout
    assert "raylet" in during and "ServeReplica" in during  # Ray and the replica run in the CLI's session
    assert service.stop() == 0
    assert "stopped" in "".join(service.lines)
    assert TOKEN not in "".join(service.lines)
    with pytest.raises(requests.ConnectionError):
        requests.get(service.url + "/healthz", timeout=10)
    left = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "-s", str(session)], capture_output=True, text=True).stdout
    assert not left.strip(), left


# ---- in-process Serve: batching and a killed replica -----------------------------------------------

@pytest.fixture()
def serve_local(ray_local, tiny_run):
    """Serve on the test's local Ray; the HTTP proxy on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}", port, tiny_run[1]
    finally:
        serve.shutdown()


def _deploy(run_dir: str, **settings):
    from ray import serve

    from rpg_dist.serve.app import APP_NAME, build_app
    from rpg_dist.serve.config import ServeConfig

    serve.run(build_app(run_dir, ServeConfig(**settings)), name=APP_NAME, route_prefix="/")


@pytest.mark.slow
def test_concurrent_requests_are_decoded_in_one_batch(serve_local):
    url, port, run_dir = serve_local
    # The batch waits up to 10 minutes for its 8th request: only merged requests can answer quickly.
    _deploy(run_dir, port=port, max_batch_size=8, batch_wait_timeout_s=600)
    histories = HISTORIES + [[10], [11, 12], [13]]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda h: requests.post(url + "/recommend", json={"history": h, "k": 3}, timeout=300),
                                histories))
    assert [a.status_code for a in answers] == [200] * 8
    assert requests.get(url + "/info", timeout=60).json()["served"] == {"requests": 8, "batches": 1, "histories": 8, "rank_s": pytest.approx(0, abs=600)}


@pytest.mark.slow
def test_a_small_catalogue_is_served_by_full_ranking(serve_local):
    """decode.method=auto at 800 items (<= full_ranking_max_items): every item scored, the exact top-k."""
    from twins import full_ranking_reference

    url, port, run_dir = serve_local
    _deploy(run_dir, port=port)
    assert requests.get(url + "/info", timeout=60).json()["decoding"] == "full_ranking"
    local = Recommender.load(run_dir, method="graph")
    items, lengths = local._batch(HISTORIES)
    with torch.no_grad():
        log_probs = local.model.next_token_log_probs(items, lengths).float()
    rows, scores = full_ranking_reference(log_probs, local.model.item_codes, 5)
    for history, want_rows, want_scores in zip(HISTORIES, rows, scores):
        got = requests.post(url + "/recommend", json={"history": history, "k": 5}, timeout=60).json()
        assert _ids(got) == local.index.item_ids[want_rows.numpy()].tolist() and got["n_visited_items"] == 800
        np.testing.assert_allclose([i["score"] for i in got["items"]], want_scores.numpy(), atol=1e-4)


@pytest.mark.slow
def test_a_killed_replica_is_replaced_under_load(serve_local):
    import ray
    from ray import serve

    from rpg_dist.serve.app import APP_NAME

    url, port, run_dir = serve_local
    _deploy(run_dir, port=port, replicas=2, num_cpus_per_replica=0.5)
    before = {requests.get(url + "/info", timeout=60).json()["replica"] for _ in range(40)}
    assert len(before) == 2  # requests reach both replicas
    statuses, stop = [], threading.Event()

    def load() -> None:
        while not stop.is_set() and len(statuses) < 5000:
            try:
                statuses.append(requests.post(url + "/recommend", json={"history": [5, 17]}, timeout=120).status_code)
            except requests.ConnectionError:
                statuses.append(0)

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deployment = None
    for _ in range(600):  # Serve notices the dead actor and starts a new replica; bounded polling
        deployment = serve.status().applications[APP_NAME].deployments["Recommender"]
        running = deployment.replica_states.get("RUNNING", 0)
        now = {requests.get(url + "/info", timeout=60).json()["replica"] for _ in range(10)}
        if running == 2 and victim not in now and len(now - before) == 1:
            break
    else:
        pytest.fail(f"no replacement replica: {deployment}")
    stop.set()
    for client in clients:
        client.join(timeout=300)
    assert statuses.count(200) > 0 and set(statuses) <= {0, 200, 500, 502, 503}, set(statuses)
    after = [requests.post(url + "/recommend", json={"history": [5, 17]}, timeout=60) for _ in range(20)]
    assert [a.status_code for a in after] == [200] * 20


@pytest.mark.slow
def test_catalogue_changes_through_the_api_reach_every_replica(serve_local, tmp_path):
    import shutil

    url, port, shared_run = serve_local
    run_dir = str(tmp_path / "run")
    shutil.copytree(shared_run, run_dir)
    _deploy(run_dir, port=port, replicas=2, num_cpus_per_replica=0.5, catalogue_poll_s=0, method="graph")
    new = {"items": [{"item_id": 5001, "text": "Belus eco-friendly pink rake, 3-pack. Belus. Garden, Tools, rake.",
                      "title": "New rake"},
                     {"item_id": 5002, "text": "Vexeon red gel pen set, small. Vexeon. Office Products, Writing."}]}
    added = requests.post(url + "/items", json=new, timeout=300)
    assert added.status_code == 200 and added.json() == {"added": 2, "version": 1, "n_items": 802}, added.text
    replicas = {}
    for _ in range(40):  # both replicas answer with the new catalogue
        info = requests.get(url + "/info", timeout=60).json()
        replicas[info["replica"]] = (info["catalogue_version"], info["n_items"])
    assert len(replicas) == 2 and set(replicas.values()) == {(1, 802)}
    answer = requests.post(url + "/recommend", json={"history": [5001], "k": 5, "exclude_history": False}, timeout=60)
    assert 5001 in _ids(answer.json()) and "New rake" in [i["title"] for i in answer.json()["items"]]
    bad = [
        (requests.post(url + "/items", json=new, timeout=60), 409, "items[0].item_id"),
        (requests.post(url + "/items", json={"items": [{"item_id": 9}]}, timeout=60), 400, "items[0].text"),
        (requests.post(url + "/items", json={"items": [{"item_id": 9, "text": "x", "price": 3}]}, timeout=60),
         400, "items[0].price"),
        (requests.delete(url + "/items/424242", timeout=60), 404, "item_id"),
        (requests.delete(url + "/items/abc", timeout=60), 400, "item_id"),
    ]
    for response, status, field in bad:
        assert (response.status_code, response.json()["field"]) == (status, field), response.text
    gone = requests.delete(url + "/items/5001", timeout=300)
    assert gone.json() == {"withdrawn": 5001, "version": 2}
    for _ in range(20):
        answer = requests.post(url + "/recommend", json={"history": [5001, 5], "k": 10, "exclude_history": False},
                               timeout=60).json()
        assert 5001 not in _ids(answer) and len(answer["items"]) == 10
    assert requests.delete(url + "/items/5001", timeout=60).json() == {"withdrawn": 5001, "version": 2}  # idempotent
    restarted = Recommender.load(run_dir)
    assert restarted.version == 2 and len(restarted.index) == 802 and int(restarted.withdrawn.sum()) == 1


@pytest.mark.slow
def test_graph_shards_serve_what_the_in_process_recommender_does(serve_local, local_answers):
    """graph=sharded: one GraphShard deployment per partition; replicas decode through them."""
    import ray
    from ray import serve

    from rpg_dist.serve.app import APP_NAME

    url, port, run_dir = serve_local
    _deploy(run_dir, port=port, graph="sharded", replicas=2, num_cpus_per_replica=0.25, num_cpus_per_shard=0.25,
            max_batch_size=2)
    assert {"GraphShard0", "GraphShard1"} <= set(serve.status().applications[APP_NAME].deployments)
    info = requests.get(url + "/info", timeout=60).json()
    assert (info["graph"], info["n_shards"], info["decoding"]) == ("sharded", 2, "graph")

    def post(history: list[int]) -> requests.Response:
        return requests.post(url + "/recommend", json={"history": history, "k": 5}, timeout=120)

    # Concurrent requests on two replicas: batches decode through the same shards at once.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, HISTORIES * 3))
    for history, got in zip(HISTORIES * 3, answers):
        assert got.status_code == 200, got.text
        want = local_answers.recommend([history], k=5)[0]
        assert _ids(got.json()) == [r.item_id for r in want]
        np.testing.assert_allclose([i["score"] for i in got.json()["items"]], [r.score for r in want], atol=1e-4)
    refused = requests.post(url + "/items", json={"items": [{"item_id": 9001, "text": "x"}]}, timeout=60)
    assert (refused.status_code, refused.json()["field"]) == (409, "items")
    assert requests.delete(url + "/items/5", timeout=60).status_code == 409

    # A killed shard replica: Serve starts another, requests meanwhile get 503 (never a 500).
    shard = serve.get_deployment_handle("GraphShard0", APP_NAME)
    victim = shard.replica.remote().result()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    statuses = []
    for _ in range(2000):  # bounded: until ten answers in a row after the replacement started
        statuses.append(post([5, 17]).status_code)
        if statuses[-10:] == [200] * 10 and shard.replica.remote().result() != victim:
            break
    else:
        pytest.fail(f"no replacement shard: {serve.status().applications[APP_NAME].deployments['GraphShard0']}")
    assert set(statuses) <= {200, 503}, set(statuses)
    assert _ids(post([5, 17]).json()) == [r.item_id for r in local_answers.recommend([[5, 17]], k=5)[0]]


def test_graph_shards_refuse_a_run_with_catalogue_changes(tiny_run, tmp_path):
    import shutil

    from rpg_dist import catalogue
    from rpg_dist.errors import ConfigError
    from rpg_dist.serve.app import build_app
    from rpg_dist.serve.config import ServeConfig

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run[1], run_dir)
    recommender = Recommender.load(run_dir)
    change = catalogue.Change("withdraw", np.array([5], dtype=np.int64))
    catalogue.change_and_commit(recommender, run_dir, change, recommender.version)
    with pytest.raises(ConfigError, match="graph: sharded .* 1 catalogue changes"):
        build_app(run_dir, ServeConfig(graph="sharded"))
    build_app(run_dir, ServeConfig(graph="memory"))  # the in-memory graph replays them
