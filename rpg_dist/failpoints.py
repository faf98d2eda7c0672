"""Crash points for fault tests: a process dies at a named point on demand, so no test has to race
a killer against the work.

With ``RPG_DIST_FAILPOINTS=FOLDER`` in the environment (tests/conftest.py sets it before any Ray
process starts, so every worker inherits it), the first process that reaches point ``NAME`` while
``FOLDER/NAME`` exists claims that file (an atomic rename, so exactly one process fires) and kills
itself with SIGKILL, as a crash at that point would. Without the variable ``reach`` returns at once.

Points: ``shard-committed`` (a tokenize worker, after committing a shard's part and manifest),
``checkpoint-committed-rank{R}`` (training rank R, after a checkpoint is complete),
``catalogue-change-written`` (a catalogue change written, its version not yet current).
"""

from __future__ import annotations

import os
import signal

ENV = "RPG_DIST_FAILPOINTS"
FIRED = ".fired-"


def reach(name: str) -> None:
    """Die here if point ``name`` is armed (see the module docstring)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    path = os.path.join(folder, name)
    try:
        os.rename(path, f"{path}{FIRED}{os.getpid()}")
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def arm(name: str) -> None:
    """Make the next process to reach ``name`` die there."""
    folder = os.environ[ENV]
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, name), "w").close()


def fired(name: str) -> list[int]:
    """Pids of the processes that died at ``name`` (and clears the record)."""
    folder = os.environ[ENV]
    prefix = f"{name}{FIRED}"
    pids = []
    for entry in os.listdir(folder):
        if entry.startswith(prefix):
            pids.append(int(entry[len(prefix):]))
            os.remove(os.path.join(folder, entry))
    return pids
