"""What every benchmark script shares: the machine line, this CPU's measured GEMM rate (the limit
figures are quoted against), peak memory of a process tree, and median timing.

The GEMM rate is measured, not copied from a table: the same 2-vCPU box is sometimes one physical
core with two hyperthreads (about 60-85 GFLOP/s fp32) and sometimes two cores, and a "fraction of
peak" against the wrong peak is worse than none.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch


def machine() -> str:
    """One line: CPU model, cores this process may use, memory, bf16 support, library versions."""
    cpu, flags = platform.processor() or "cpu", ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next((line for line in lines if line.startswith("flags")), "")
    except (OSError, StopIteration):
        pass
    import faiss
    import ray

    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"avx512_bf16={'avx512_bf16' in flags}; torch {torch.__version__}, faiss {faiss.__version__}, "
            f"ray {ray.__version__}; load average {os.getloadavg()[0]:.2f}")


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of a square (size x size) @ (size x size) GEMM on all of torch's threads."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: thread pool, packing buffers
    seconds, _ = timed(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e9


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last call's result)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (Ray workers included), sampled
    in a thread every ``every`` seconds."""

    def __init__(self, every: float = 0.5) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, every: float) -> None:
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(every)
