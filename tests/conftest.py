"""Shared fixtures: real local Ray, a real S3 server (moto) on loopback, real data on disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("moto_server did not start within 30 s")


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
