"""One URI-aware I/O layer: every artefact is read and written through fsspec here.

URIs may be local paths, ``file://``, ``s3://``, ``gs://`` or ``memory://``. Storage options come from
the config's ``storage`` section (``StorageConfig``), never from globals, so Ray workers on other nodes
see the same endpoint and credentials.

Writes are atomic: a reader sees the old object or the complete new one, never a torn file. Locally
that is write-to-temporary-then-rename; object stores publish an object only when its upload
completes, so we write in place and abort the upload on error. A failed upload is an error, never
retried by closing again: an fsspec file marks itself closed even when its final flush fails, so a
second ``close()`` returns quietly and would report an upload that never happened. Whole-object
writes (``write_bytes``) are retried as whole PUTs instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from rpg_dist.errors import DataError, StageError, StorageError

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig

_REMOTE = ("s3", "s3a", "gs", "gcs")


def protocol(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for local paths."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def storage_options(uri: str, storage: StorageConfig | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri`` built from the ``storage`` config section."""
    proto = protocol(uri)
    if storage is None or proto not in _REMOTE:
        return {}
    opts: dict[str, Any] = {}
    if proto in ("s3", "s3a"):
        endpoint = storage.resolved_endpoint()
        if endpoint:
            opts["endpoint_url"] = endpoint
        if storage.key is not None:
            opts["key"] = storage.key
        if storage.secret is not None:
            opts["secret"] = storage.secret
        if storage.region:
            opts["client_kwargs"] = {"region_name": storage.region}
        if storage.anon:
            opts["anon"] = True
        # Other processes write the same prefixes (Ray workers): never trust a cached listing.
        opts["use_listings_cache"] = False
    elif storage.anon:
        opts["token"] = "anon"
    opts.update(storage.options)
    return opts


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    try:
        return fsspec.core.url_to_fs(uri, **storage_options(uri, storage))
    except (ImportError, ValueError) as err:
        raise StorageError(f"{uri}: cannot open filesystem: {err}") from None


def arrow_filesystem(uri: str, storage: StorageConfig | None = None):
    """A ``pyarrow.fs.FileSystem`` and path for ``uri`` (for Ray Data and pyarrow datasets)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, storage)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    """Join URI components with ``/`` (also for local paths)."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        out = posixpath.join(out, part.strip("/")) if out else part
    return out


def is_local(uri: str) -> bool:
    return protocol(uri) in ("file", "local")


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return _call(uri, fs.exists, path)


def list_files(folder: str, suffix: str = "", storage: StorageConfig | None = None) -> list[str]:
    """Sorted URIs of the files directly under ``folder`` whose names end with ``suffix``."""
    fs, path = filesystem(folder, storage)
    if not _call(folder, fs.exists, path):
        return []
    names = [
        posixpath.basename(p.rstrip("/"))
        for p in _call(folder, fs.ls, path, detail=False)
    ]
    return sorted(
        join(folder, n) for n in names if n.endswith(suffix) and not _is_temporary(n)
    )


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    return _call(uri, fs.cat_file, path)


def read_text(uri: str, storage: StorageConfig | None = None) -> str:
    """The file as UTF-8 text. Raises DataError naming the file and byte where it is not UTF-8."""
    return decode_text(read_bytes(uri, storage), uri)


def decode_text(data: bytes, uri: str) -> str:
    """``data`` (the bytes of ``uri``) as UTF-8; DataError naming the line and byte where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{uri}: line {line} (byte {err.start}) is not UTF-8 text: {err.reason}") from None


def size(uri: str, storage: StorageConfig | None = None) -> int:
    """Bytes of the file at ``uri``."""
    fs, path = filesystem(uri, storage)
    return int(_call(uri, fs.size, path))


def is_file(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return bool(_call(uri, fs.isfile, path))


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    text = read_text(uri, storage)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{uri}: invalid JSON at line {err.lineno}: {err.msg}") from None


@contextlib.contextmanager
def atomic_open(uri: str, storage: StorageConfig | None = None, mode: str = "wb") -> Iterator[Any]:
    """Open ``uri`` for writing so that it appears complete or not at all.

    Raises:
        StorageError: the bucket is missing or the credentials are refused.
    """
    fs, path = filesystem(uri, storage)
    if isinstance(fs, LocalFileSystem):
        parent = posixpath.dirname(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex[:12]}-{posixpath.basename(path)}")
        try:
            with fs.open(tmp, mode) as handle:
                yield handle
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
        return
    handle = _call(uri, fs.open, path, mode)
    try:
        yield handle
        # Once only (see the module docstring): the upload completes here or raises.
        _call(uri, handle.close, attempts=1)
    except BaseException:
        # Abort the upload: the object store then publishes nothing and the previous object, if
        # any, stays as it was.
        with contextlib.suppress(Exception):
            if hasattr(handle, "discard"):
                handle.discard()
        # A discarded or failed buffer cannot be flushed: mark it closed so __del__ does not try.
        handle.closed = True
        raise


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` to ``uri`` atomically; remote objects go up as one retried PUT."""
    fs, path = filesystem(uri, storage)
    if isinstance(fs, LocalFileSystem):
        with atomic_open(uri, storage) as handle:
            handle.write(data)
        return
    # Each attempt uploads the whole object afresh (multipart above the block size), so a retry
    # never builds on a half-finished upload.
    _call(uri, fs.pipe_file, path, data)


def upload_file(local_path: str, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local file to ``uri``, retried on transient errors like ``write_bytes``.

    An object store publishes the object only once its upload completes, and each attempt uploads
    the whole file afresh, so a failed upload leaves the previous object (or none).

    Raises:
        StorageError: naming ``uri`` when the storage stays unreachable or refuses the write.
    """
    fs, path = filesystem(uri, storage)
    _call(uri, fs.put_file, local_path, path)


def download_folder(uri: str, local_dir: str, storage: StorageConfig | None = None) -> None:
    """Copy every file under ``uri`` into ``local_dir`` (retried on transient errors)."""
    fs, path = filesystem(uri, storage)
    _call(uri, fs.get, path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)


def file_sha256(uri: str, storage: StorageConfig | None = None, block: int = 8 << 20) -> str:
    """sha256 (hex) of a file's bytes, read in ``block``-sized pieces (bounded memory)."""
    fs, path = filesystem(uri, storage)
    digest = hashlib.sha256()
    with _call(uri, fs.open, path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def check_digest(uri: str, actual: str, expected: str, remedy: str) -> None:
    """Refuse an artefact whose sha256 is not the one recorded when it was written.

    ``expected`` may be a prefix of the hex digest (older manifests kept 16 characters).

    Raises:
        StageError: naming the file, both digests and ``remedy`` (how to rebuild it).
    """
    if not actual.startswith(expected):
        raise StageError(f"{uri}: content differs from the digest recorded when it was written (sha256 "
                         f"{expected[:16]}..., found {actual[:16]}...): it was altered or truncated; {remedy}")


def read_verified(uri: str, expected: str, remedy: str, storage: StorageConfig | None = None) -> bytes:
    """The bytes of ``uri`` after ``check_digest`` (for files that are deserialised, not parsed)."""
    data = read_bytes(uri, storage)
    check_digest(uri, hashlib.sha256(data).hexdigest(), expected, remedy)
    return data


def read_parquet_verified(uri: str, expected: str | None, remedy: str, storage: StorageConfig | None = None,
                          columns: list[str] | None = None) -> pa.Table:
    """One parquet file read once, checked against ``expected`` (sha256; None: not recorded), then
    parsed from the same bytes, so the file is neither read twice nor changed between check and use."""
    data = read_verified(uri, expected, remedy, storage) if expected is not None else read_bytes(uri, storage)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{uri}: unreadable parquet: {err}") from None


def write_text(uri: str, text: str, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage)


def write_json(uri: str, obj: Any, storage: StorageConfig | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", storage)


def write_parquet(table: pa.Table, uri: str, storage: StorageConfig | None = None, **kwargs: Any) -> str:
    """Write ``table`` as one parquet file, atomically; returns the sha256 (hex) of the bytes written,
    hashed on the way out, so recording a digest never reads the file back (a download on S3)."""
    with atomic_open(uri, storage) as handle:
        hashing = _HashingWriter(handle)
        pq.write_table(table, hashing, **kwargs)
    return hashing.sha256.hexdigest()


class _HashingWriter:
    """A write-only file object that hashes every byte on its way to ``handle``."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.sha256 = handle, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:  # tell, flush, closed, ... of the real handle
        return getattr(self.handle, name)


def read_parquet(
    uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read one parquet file, or every ``*.parquet`` under a folder (in name order)."""
    files = parquet_files(uri, storage)
    tables = [_read_parquet_file(f, storage, columns) for f in files]
    if not tables:
        raise DataError(f"{uri}: no parquet files")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def iter_parquet(
    uri: str,
    storage: StorageConfig | None = None,
    columns: list[str] | None = None,
    batch_size: int = 65_536,
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """Stream ``(file_uri, batch)`` over a parquet file or folder without loading it whole."""
    for file_uri in parquet_files(uri, storage):
        fs, path = filesystem(file_uri, storage)
        with _call(file_uri, fs.open, path, "rb") as handle:
            try:
                with open_parquet(handle) as reader:
                    for batch in reader.iter_batches(batch_size=batch_size, columns=columns,
                                                     use_threads=PYTHON_FILE_THREADS):
                        yield file_uri, batch
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{file_uri}: unreadable parquet: {err}") from None


def open_parquet(handle) -> pq.ParquetFile:
    """A parquet reader over a Python file object (an fsspec handle) that reads it on the calling
    thread only (see PYTHON_FILE_THREADS); use it as a context manager so it closes before the handle."""
    return pq.ParquetFile(handle, pre_buffer=False)


def parquet_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """``[uri]`` for a file, the sorted ``*.parquet`` files for a folder."""
    fs, path = filesystem(uri, storage)
    if _call(uri, fs.isfile, path):
        return [uri]
    files = list_files(uri, ".parquet", storage)
    if not files:
        raise DataError(f"{uri}: no parquet files found")
    return files


def parquet_schema(uri: str, storage: StorageConfig | None = None) -> pa.Schema:
    fs, path = filesystem(uri, storage)
    with _call(uri, fs.open, path, "rb") as handle:
        try:
            return pq.read_schema(handle)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{uri}: unreadable parquet: {err}") from None


def remove(uri: str, storage: StorageConfig | None = None, recursive: bool = True) -> None:
    fs, path = filesystem(uri, storage)
    if _call(uri, fs.exists, path):
        _call(uri, fs.rm, path, recursive=recursive)


def move(src: str, dst: str, storage: StorageConfig | None = None) -> None:
    """Move a file or folder within one filesystem (a rename locally, copy + delete elsewhere)."""
    fs, src_path = filesystem(src, storage)
    _, dst_path = filesystem(dst, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(dst_path), exist_ok=True)
        _call(src, fs.mv, src_path, dst_path, recursive=True)
        return
    # Object stores have no folders: copy every object under the prefix, then delete the source.
    files = _call(src, fs.find, src_path) if _call(src, fs.isdir, src_path) else [src_path]
    for file in files:
        relative = posixpath.relpath(file, src_path) if file != src_path else ""
        _call(src, fs.copy, file, posixpath.join(dst_path, relative) if relative else dst_path)
    _call(src, fs.rm, src_path, recursive=True)


def makedirs(uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)


def temporary_name(uri: str) -> str:
    """A sibling of ``uri`` that listings skip, for staging a folder before committing it."""
    parent, name = posixpath.split(uri.rstrip("/"))
    return join(parent, f".tmp-{uuid.uuid4().hex[:12]}-{name}")


def _is_temporary(name: str) -> bool:
    return name.startswith(".tmp-") or name.startswith("_")


# Arrow threads reading a Python file object (an fsspec handle) can still be running when the
# interpreter exits, which aborts the process ("terminate called without an active exception",
# about 1 exit in 6 after a read on this machine, pyarrow 26). Reads through a Python handle are
# therefore single-threaded, decoding (use_threads) and fetching alike: pre-buffering fetches
# column chunks on Arrow's IO threads, and a CLI that stops mid-file on a bad row (add-items on a
# null text) exited with such a fetch outstanding and aborted (2 suite runs in stop 30). Local files
# go through Arrow's own reader, which has no such callback.
PYTHON_FILE_THREADS = False


def _read_parquet_file(uri: str, storage: StorageConfig | None, columns: list[str] | None) -> pa.Table:
    fs, path = filesystem(uri, storage)
    try:
        if is_local(uri):
            return pq.read_table(path, columns=columns)  # Arrow's own file reader, multithreaded
        with _call(uri, fs.open, path, "rb") as handle:
            return pq.read_table(handle, columns=columns, use_threads=PYTHON_FILE_THREADS, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{uri}: unreadable parquet: {err}") from None


def _call(uri: str, fn, *args: Any, attempts: int = 4, **kwargs: Any) -> Any:
    """Run one storage call with retries on transient errors and clear errors on fatal ones.

    ``attempts=1`` for calls that must not be repeated (closing an upload).
    """
    delay = 0.5
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as err:
            if _missing_bucket(err):
                raise StorageError(f"{uri}: bucket {_bucket(uri)!r} does not exist") from None
            raise
        except _missing_credentials() as err:
            raise StorageError(
                f"{uri}: no credentials ({err}); set storage.key / storage.secret "
                "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or storage.anon for a public bucket"
            ) from None
        except PermissionError as err:
            raise StorageError(
                f"{uri}: access denied ({err}); check storage.key / storage.secret "
                "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and storage.endpoint_url"
            ) from None
        except _transient_errors() as err:
            if attempt == attempts - 1:
                raise StorageError(f"{uri}: storage unreachable after {attempts} attempt{'s' * (attempts > 1)}: {err}") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: connection resets, timeouts, unreachable endpoints."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        errors += [BotoConnectionError, ReadTimeoutError]
    except ImportError:  # s3fs not installed: nothing boto-specific to catch
        pass
    return tuple(errors)


def _missing_credentials() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import NoCredentialsError
    except ImportError:  # s3fs not installed
        return ()
    return (NoCredentialsError,)


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""


def _missing_bucket(err: FileNotFoundError) -> bool:
    return "NoSuchBucket" in str(err) or "bucket does not exist" in str(err).lower()
