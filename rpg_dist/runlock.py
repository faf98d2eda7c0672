"""One writer per run directory: the process running a stage holds ``RUN_DIR/.lock``.

The lock is an advisory ``flock`` on a local file, which the kernel drops when the holder exits,
however it exits: a crash or ``kill -9`` cannot leave a run directory locked. Object stores have no
such primitive, so run directories on s3:// or gs:// are not locked (README says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Iterator

from rpg_dist import io
from rpg_dist.errors import StageError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block.

    Raises:
        StageError: another live process holds it (the message says which).
    """
    if not io.is_local(run_dir):
        yield
        return
    folder = io.filesystem(run_dir)[1]
    try:
        fd = _open_lock_file(folder, LOCK_NAME)
    except OSError as err:  # a file in the way, no permission, read-only filesystem
        raise StageError(f"{run_dir}: cannot be used as a run directory: {err.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise StageError(f"{run_dir}: in use by {holder}; wait for it to finish or use another "
                             "run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:2])})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def waiting_lock(folder: str, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold the flock of the local file ``folder/name`` for the block, waiting while another process
    holds it (the kernel drops it when the holder exits, however it exits)."""
    fd = _open_lock_file(folder, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_lock_file(folder: str, name: str) -> int:
    """A read-write descriptor of ``folder/name``, both created if missing."""
    os.makedirs(folder, exist_ok=True)
    return os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o644)
