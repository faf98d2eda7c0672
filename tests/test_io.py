"""The URI-aware I/O layer on a local disk, in memory and on a real S3 server (moto) on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pytest

from rpg_dist import io
from rpg_dist.config import StorageConfig
from rpg_dist.errors import DataError, StorageError


def _roundtrip(base: str, storage: StorageConfig | None = None) -> None:
    io.write_json(io.join(base, "a", "meta.json"), {"x": 1}, storage)
    assert io.read_json(io.join(base, "a", "meta.json"), storage) == {"x": 1}
    table = pa.table({"item_id": pa.array([3, 1, 2], pa.int64()), "text": ["c", "a", "b"]})
    digest = io.write_parquet(table.slice(0, 2), io.join(base, "t", "part-00000.parquet"), storage)
    io.write_parquet(table.slice(2), io.join(base, "t", "part-00001.parquet"), storage)
    # The digest hashed while writing is that of the stored bytes.
    assert digest == io.file_sha256(io.join(base, "t", "part-00000.parquet"), storage)
    assert io.read_parquet(io.join(base, "t"), storage).equals(table)
    batches = [b for _, b in io.iter_parquet(io.join(base, "t"), storage, batch_size=1)]
    assert sum(len(b) for b in batches) == 3
    assert [u.rsplit("/", 1)[1] for u in io.list_files(io.join(base, "t"), ".parquet", storage)] == [
        "part-00000.parquet", "part-00001.parquet",
    ]
    io.remove(io.join(base, "t"), storage)
    assert not io.exists(io.join(base, "t"), storage)


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path))
    _roundtrip("file://" + str(tmp_path / "viaurl"))


def test_memory_roundtrip():
    _roundtrip(f"memory://io-test-{uuid.uuid4().hex[:8]}")


def test_s3_roundtrip(s3_bucket):
    endpoint, bucket = s3_bucket
    _roundtrip(f"s3://{bucket}/prefix", StorageConfig(endpoint_url=endpoint))


def test_failed_local_write_leaves_old_file_intact(tmp_path):
    target = str(tmp_path / "x.json")
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_open(target) as handle:
            handle.write(b'{"v": 2, "trunc')
            raise RuntimeError("crash mid-write")
    assert io.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_failed_s3_write_publishes_nothing(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    target = f"s3://{bucket}/half.bin"
    with pytest.raises(RuntimeError):
        with io.atomic_open(target, storage) as handle:
            handle.write(b"x" * 1024)
            raise RuntimeError("crash mid-upload")
    assert not io.exists(target, storage)


def test_missing_bucket_is_a_clear_error(s3_bucket):
    endpoint, _ = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        io.write_json("s3://no-such-bucket/x.json", {}, storage)


@pytest.mark.parametrize("wrong", ["key", "secret"])
def test_wrong_credentials_are_a_clear_error(s3_secured, wrong):
    endpoint, bucket, key, secret = s3_secured
    good = StorageConfig(endpoint_url=endpoint, key=key, secret=secret)
    io.write_json(f"s3://{bucket}/ok.json", {"v": 1}, good)
    bad = StorageConfig(endpoint_url=endpoint, key="AKIAWRONGKEY" if wrong == "key" else key,
                        secret="wrong" if wrong == "secret" else secret)
    for action in (lambda: io.read_json(f"s3://{bucket}/ok.json", bad),
                   lambda: io.write_json(f"s3://{bucket}/new.json", {}, bad)):
        with pytest.raises(StorageError, match="access denied .*check storage.key / storage.secret"):
            action()
    assert not io.exists(f"s3://{bucket}/new.json", good)


def test_unreachable_endpoint_is_a_storage_error():
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9", options={"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    with pytest.raises(StorageError, match="storage unreachable after 4 attempts"):
        io.read_bytes("s3://bucket/x", storage)


def test_failed_upload_close_is_an_error_and_keeps_the_old_object(s3_via_proxy):
    """The link fails after the data was handed over, before the upload completed (on close)."""
    proxy, via, direct, bucket = s3_via_proxy
    target = f"s3://{bucket}/manifest.json"
    io.write_json(target, {"version": 1}, via)
    big = f"s3://{bucket}/big.bin"
    io.write_bytes(big, b"old", via)
    with pytest.raises(StorageError, match="manifest.json: storage unreachable"):
        with io.atomic_open(target, via) as handle:
            handle.write(b'{"version": 2}')
            proxy.cut()
    # Larger than one multipart block: the first part goes up before the link fails.
    with pytest.raises(StorageError, match="big.bin: storage unreachable"):
        with io.atomic_open(big, via) as handle:
            handle.write(b"n" * (6 * 2**20))
            handle.flush()
            handle.write(b"tail")
    assert io.read_json(target, direct) == {"version": 1}
    assert io.read_bytes(big, direct) == b"old"


def test_write_to_unreachable_storage_is_an_error(s3_via_proxy):
    """The reported bug: write_text returned normally after its upload had failed."""
    proxy, via, direct, bucket = s3_via_proxy
    target = f"s3://{bucket}/metrics.json"
    io.write_text(target, "v1", via)
    proxy.cut()
    for write in (lambda: io.write_text(target, "v2", via),
                  lambda: io.write_parquet(pa.table({"a": [1]}), target, via)):
        with pytest.raises(StorageError, match="metrics.json: storage unreachable"):
            write()
    assert io.read_text(target, direct) == "v1"


def test_file_uploads_are_errors_naming_the_file_and_keep_the_old_object(s3_via_proxy, tmp_path):
    """Checkpoint and TensorBoard uploads: a cut link is a StorageError, not a botocore traceback."""
    proxy, via, direct, bucket = s3_via_proxy
    local = tmp_path / "mp_rank_00_model_states.pt"
    local.write_bytes(b"new weights")
    target = f"s3://{bucket}/checkpoints/step-1/ds/mp_rank_00_model_states.pt"
    io.write_bytes(target, b"old weights", direct)
    proxy.cut()
    with pytest.raises(StorageError, match="mp_rank_00_model_states.pt: storage unreachable"):
        io.upload_file(str(local), target, via)
    assert io.read_bytes(target, direct) == b"old weights"
    io.upload_file(str(local), target, direct)
    io.write_bytes(f"s3://{bucket}/checkpoints/step-1/meta.json", b"{}", direct)
    io.download_folder(f"s3://{bucket}/checkpoints/step-1", str(tmp_path / "down"), direct)
    assert (tmp_path / "down" / "ds" / "mp_rank_00_model_states.pt").read_bytes() == b"new weights"
    assert (tmp_path / "down" / "meta.json").read_bytes() == b"{}"
    with pytest.raises(StorageError, match="step-1: storage unreachable"):
        io.download_folder(f"s3://{bucket}/checkpoints/step-1", str(tmp_path / "again"), via)


def test_missing_credentials_are_a_clear_error(monkeypatch, s3_bucket):
    endpoint, bucket = s3_bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no credentials .*storage.key / storage.secret"):
        # A fresh filesystem: the cached one resolved credentials earlier in the session.
        io.write_text(f"s3://{bucket}/x", "hi", StorageConfig(endpoint_url=endpoint, options={"skip_instance_cache": True}))


def test_truncated_parquet_names_the_file(tmp_path):
    good = tmp_path / "good.parquet"
    io.write_parquet(pa.table({"a": list(range(1000))}), str(good))
    bad = tmp_path / "part-00000.parquet"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"part-00000.parquet: unreadable parquet"):
        io.read_parquet(str(bad))
    with pytest.raises(DataError, match=r"part-00000.parquet: unreadable parquet"):
        list(io.iter_parquet(str(bad)))


def test_storage_options_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    opts = io.storage_options("s3://b/k", StorageConfig(region="eu-west-1"))
    assert opts["endpoint_url"] == "http://env:1"
    assert opts["client_kwargs"] == {"region_name": "eu-west-1"}
    explicit = io.storage_options("s3://b/k", StorageConfig(endpoint_url="http://cfg:2", key="k", secret="s"))
    assert (explicit["endpoint_url"], explicit["key"], explicit["secret"]) == ("http://cfg:2", "k", "s")
    assert io.storage_options("/local/path", StorageConfig(endpoint_url="http://x")) == {}


_THREAD_PROBE = """
import os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from rpg_dist import io
from rpg_dist.data import interactions
from rpg_dist.tokenizer import embed, precomputed, shards

path = sys.argv[1]
n = 40_000
vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 4, np.float32)), 4)
pq.write_table(pa.table({"item_id": np.arange(n), "user_id": np.arange(n), "timestamp": np.arange(n),
                         "text": [f"item {i}" for i in range(n)], "embedding": vectors}), path, row_group_size=5_000)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
# Readers left mid-file, as a bad row leaves them, and the shard readers of tokenize.
for n, _ in enumerate(io.iter_parquet(path, columns=["item_id"], batch_size=1_000)):
    if n == 3:
        break
next(iter(interactions._raw_batches(path, ["user_id", "item_id", "timestamp"], None)))
shard = shards.plan_shards(path, 5_000, None)[2]
embed.read_shard_items(shard, None)
precomputed.read_shard_vectors(shard, 4, None)
print(before, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_reads_through_python_handles_start_no_arrow_threads(tmp_path):
    """Arrow threads that call back into a Python file object can still be running at exit and abort
    the process (add-items exited -6 after a null-text error): such reads stay on the caller's thread."""
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, str(tmp_path / "t.parquet")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (int(x) for x in out.stdout.split())
    assert after == before
