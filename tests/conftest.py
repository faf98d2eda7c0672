"""Shared fixtures: real local Ray, a real S3 server (moto) on loopback, real data on disk."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Quiet, local-only Ray and CPU DeepSpeed for every test process and the processes they start.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Crash points (rpg_dist/failpoints.py) armed by the fault tests; set before any Ray process starts
# so that every worker inherits it. Under pytest-xdist each test process gets its own folder: one
# inherited from the controller would let a point armed by one test fire in another process's test.
if os.environ.get("PYTEST_XDIST_WORKER") or "RPG_DIST_FAILPOINTS" not in os.environ:
    os.environ["RPG_DIST_FAILPOINTS"] = tempfile.mkdtemp(prefix="rpg-failpoints-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``RPG_DATA_DIR`` (default ``../shared/data``); missing data skips, except under CI=true."""
    root = Path(os.environ.get("RPG_DATA_DIR", REPO.parent / "shared" / "data"))
    beauty = root / "amazon2014-beauty"
    if not (beauty / "sequences.txt").exists():
        reason = f"Beauty data not found under {root} (set RPG_DATA_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must have the data")
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def beauty_raw(data_dir: Path) -> Path:
    return data_dir / "amazon2014-beauty"


@pytest.fixture(scope="session")
def beauty_dataset(beauty_raw: Path, tmp_path_factory) -> str:
    """Beauty imported once per session with ``rpg-dist prepare --format s3rec``."""
    from rpg_dist.data.config import PrepareConfig
    from rpg_dist.data.importers import prepare

    out = str(tmp_path_factory.mktemp("beauty") / "dataset")
    prepare(PrepareConfig(format="s3rec", input=str(beauty_raw)), out)
    return out


def encode_texts(texts: list[str]):
    """MiniLM vectors of ``texts`` with the bundled encoder (fp32, this process's threads)."""
    import torch

    from rpg_dist.tokenizer import embed

    # fp32 on every machine, so the statistics tests see the same vectors everywhere (bf16 is
    # emulated on CPUs without avx512_bf16/AMX, 5.6x slower than fp32).
    model = embed.load_encoder("bundled", "float32", "cpu", threads=torch.get_num_threads())
    return embed.embed_texts(model, texts, batch_size=32)


@pytest.fixture(scope="session")
def beauty_slice(beauty_dataset):
    """The first 3,000 Beauty items (their MiniLM vectors) and the sequences restricted to them.

    Returns ``(item_ids, vectors (3000, 384) float32, sequences table)``; users left with fewer than
    3 items are dropped.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from rpg_dist.data import dataset

    items = dataset.read_items(beauty_dataset)
    ids = np.sort(items.column("item_id").to_numpy())[:3000]
    items = items.filter(pc.is_in(items.column("item_id"), value_set=pa.array(ids)))
    vectors = encode_texts(items.column("text").to_pylist())
    sequences = dataset.read_sequences(beauty_dataset)
    flat = sequences.column("item_ids").combine_chunks()
    offsets, values = flat.offsets.to_numpy(), flat.flatten().to_numpy()
    keep = np.isin(values, ids)
    counts = np.add.reduceat(keep, offsets[:-1]) if len(values) else np.zeros(0, np.int64)
    lists = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()),
                                     pa.array(values[keep], pa.int64()))
    kept = pa.table({"user_id": sequences.column("user_id"), "item_ids": lists}).filter(pa.array(counts >= 3))
    return items.column("item_id").to_numpy(), vectors, kept


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> str:
    """A small synthetic dataset (600 items, 400 users), shared read-only by tests."""
    from rpg_dist.data import importers, synth

    out = str(tmp_path_factory.mktemp("synth") / "dataset")
    importers.write(synth.generate(n_items=600, n_users=400, seed=0), out, source="synth")
    return out


@pytest.fixture()
def ray_local():
    """A real local Ray instance (``num_cpus=2``), reused across tests in this process.

    Fixtures that connect to a multi-node cluster shut Ray down when they finish, so the next
    ``ray_local`` user starts a fresh local instance.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="rpg-dist-tests", log_to_driver=False)
    yield ray


def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``moto_server`` on a free loopback port; returns (process, endpoint URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    wait_until(lambda: _port_open(port), proc, "moto_server")
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (``moto_server``) on 127.0.0.1:PORT; yields the endpoint URL.

    Credentials are ``testing``/``testing`` in us-east-1 (set in the environment, so Ray workers and
    subprocesses inherit them); the server is stopped by pid at the end.
    """
    proc, endpoint = _start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    _stop(proc)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_secured():
    """A moto S3 server that checks credentials (IAM); yields (endpoint, bucket, key, secret).

    moto enforces authentication after ``INITIAL_NO_AUTH_ACTION_COUNT`` unauthenticated calls: the
    first calls create an IAM user, its access key and the bucket; later calls must sign correctly.
    """
    import json

    import boto3

    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="rpg")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="rpg", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="rpg")["AccessKey"]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                 aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket="secured")
    yield endpoint, "secured", key["AccessKeyId"], key["SecretAccessKey"]
    _stop(proc)


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields ``(endpoint, bucket)``."""
    import uuid

    import boto3

    bucket = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return s3_server, bucket


class TwoNodeCluster:
    """A Ray head and a second raylet on 127.0.0.1, each with one logical CPU, started by pid."""

    def __init__(self, gcs_address: str, dashboard_url: str, temp_dir: str, procs: list[subprocess.Popen]):
        self.gcs_address = gcs_address  # ray.init(address=...) / RayConfig.address
        self.dashboard_url = dashboard_url  # Ray job submission (JobSubmissionClient, `rpg-dist submit`)
        self.temp_dir = temp_dir
        self.procs = procs

    def alive_node_ids(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def _ray_start(args: list[str], log_path: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group (stopped by that group, never `ray stop`)."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    # The venv's bin first on PATH, as on a cluster image where `rpg-dist` is installed: Ray jobs
    # submitted to this cluster run their entrypoint with the raylet's environment.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen([str(BIN / "ray"), "start", *args, "--block", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop one ``ray start`` and every process it spawned (its own process group).

    SIGTERM first; ``ray start --block`` then drains for up to 30 s, which a throwaway test cluster
    does not need, so whatever is left after a few seconds gets SIGKILL.
    """
    import signal

    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group once the leader is gone


@pytest.fixture()
def ray_two_nodes(tmp_path_factory):
    """Two Ray nodes on 127.0.0.1 (``--num-cpus 1`` each) with a dashboard; yields a TwoNodeCluster.

    The driver is connected (``ray.init(address=gcs_address)``) when the test starts. Both raylets get
    a private ``--temp-dir``, so ``ray.init()`` elsewhere on this machine never finds this cluster
    (ray records the last `ray start` address under its temp dir). Any local Ray of this process is
    shut down first; at the end Ray is shut down and both process groups are terminated.
    """
    import tempfile

    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="r2n", dir="/tmp")
    logs = tmp_path_factory.mktemp("ray_two_nodes")
    port, dashboard_port = free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", temp_dir,
              "--object-store-memory", str(500 * 1024**2)]
    head = _ray_start(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()),
                       "--dashboard-agent-listen-port", str(free_port()), *common], logs / "head.log")
    procs = [head]
    gcs_address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: _port_open(port), head, f"the Ray head ({logs}/head.log)")
        procs.append(_ray_start(["--address", gcs_address, "--dashboard-agent-listen-port", str(free_port()),
                                 *common], logs / "worker.log"))
        cluster = TwoNodeCluster(gcs_address, f"http://127.0.0.1:{dashboard_port}", temp_dir, procs)
        ray.init(address=gcs_address, namespace="rpg-dist-tests", log_to_driver=False)
        wait_until(lambda: len(cluster.alive_node_ids()) >= 2, procs[1], f"the second raylet ({logs}/worker.log)")
        wait_until(lambda: _port_open(dashboard_port), head, f"the Ray head ({logs}/head.log)")
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            _stop_group(proc)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(ready, proc: subprocess.Popen, what: str, poll_s: float = 0.2) -> None:
    """Wait until ``ready()`` holds; fail as soon as ``proc`` (the server being waited for) exits.

    No deadline decides the outcome: a server that is slow to start (a loaded CI box) is waited
    for, one that died fails at once, and a hang is left to the suite's per-test timeout.
    """
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before it was ready")
        time.sleep(poll_s)


class CuttableProxy:
    """A TCP relay on 127.0.0.1 in front of a server; ``cut()`` drops every connection and the port.

    Stands in for a network failure mid-write (the server behind it keeps its state), at a point the
    test chooses, with no timing involved.
    """

    def __init__(self, upstream_port: int) -> None:
        import threading

        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # listener closed by cut()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Refuse new connections and reset open ones."""
        # shutdown() first: close() alone neither wakes the blocked accept() nor frees the port.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture()
def s3_via_proxy(s3_bucket):
    """``(proxy, StorageConfig through the proxy, StorageConfig direct, bucket)`` for fault tests.

    The proxied config makes one connection attempt per call with a 2 s connect timeout, so a cut
    link fails fast instead of waiting out botocore's retries.
    """
    from rpg_dist.config import StorageConfig

    endpoint, bucket = s3_bucket
    proxy = CuttableProxy(int(endpoint.rsplit(":", 1)[1]))
    fast_fail = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}
    via = StorageConfig(endpoint_url=f"http://127.0.0.1:{proxy.port}", options=fast_fail)
    yield proxy, via, StorageConfig(endpoint_url=endpoint), bucket
    proxy.cut()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One complete tiny run through the CLI (`rpg-dist run`): (config path, run dir, its output).
    Shared by the pipeline and serving tests; tests that change a run work on their own copy."""
    import yaml

    from helpers import tiny_config

    root = tmp_path_factory.mktemp("pipeline")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(str(root / "dataset"), str(root / "run"))))
    rpg = str(Path(sys.executable).parent / "rpg-dist")
    out = subprocess.run([rpg, "run", "--config", str(config)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return str(config), str(root / "run"), out
