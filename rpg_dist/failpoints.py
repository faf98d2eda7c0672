"""Crash points for fault tests: a process dies (or is interrupted) at a named point on demand, so no
test has to race a killer against the work.

With ``RPG_DIST_FAILPOINTS=FOLDER`` in the environment (tests/conftest.py sets it before any Ray
process starts, so every worker inherits it), the first process that reaches point ``NAME`` while
``FOLDER/NAME`` exists claims that file (an atomic rename, so exactly one process fires) and sends
the signal the file names to the process it names: by default SIGKILL to itself, as a crash at that
point would. ``arm(name, sig, pid=driver)`` lets a Ray worker signal its driver at an exact point;
the worker then waits there until it is stopped (as the driver's failure would stop it), so it does no
work past the point however long the signal takes. Without the variable ``reach`` returns at once.

Points: ``dataset-parts-moved`` (prepare: the parts in place, ``dataset.json`` not yet written),
``shard-committed`` (a tokenize worker, after committing a shard's part and manifest),
``shard-collected`` (the tokenize driver, after receiving a finished shard),
``checkpoint-committed-rank{R}`` (training rank R, after a checkpoint is complete),
``graph-part-written`` (build-graph, after each partition file),
``split-evaluated`` (evaluate, after each split's metrics, before ``metrics.json``),
``catalogue-change-written`` (a catalogue change written, its version not yet current).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "RPG_DIST_FAILPOINTS"
FIRED = ".fired-"


def reach(name: str) -> None:
    """Fire here if point ``name`` is armed (see the module docstring)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    path = os.path.join(folder, name)
    claimed = f"{path}{FIRED}{os.getpid()}"
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return
    with open(claimed) as handle:
        words = handle.read().split()  # "[SIGNAL [PID]]"
    sig = signal.Signals[words[0]] if words else signal.SIGKILL
    target = int(words[1]) if len(words) > 1 else os.getpid()
    os.kill(target, sig)
    if target != os.getpid():
        threading.Event().wait()  # until this process is stopped


def arm(name: str, sig: signal.Signals = signal.SIGKILL, pid: int | None = None) -> None:
    """Make the next process to reach ``name`` send ``sig`` to ``pid`` (default: itself)."""
    folder = os.environ[ENV]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as handle:
        handle.write(f"{sig.name} {pid}" if pid is not None else sig.name)


def fired(name: str) -> list[int]:
    """Pids of the processes that fired ``name`` (and clears the record)."""
    folder = os.environ[ENV]
    prefix = f"{name}{FIRED}"
    pids = []
    for entry in os.listdir(folder):
        if entry.startswith(prefix):
            pids.append(int(entry[len(prefix):]))
            os.remove(os.path.join(folder, entry))
    return pids
