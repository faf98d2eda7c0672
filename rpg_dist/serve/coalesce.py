"""Greedy batching for a decode that awaits: what arrives while one batch decodes is the next batch.

``@serve.batch`` cuts a batch ``batch_wait_timeout_s`` after its first request and starts waiting
for the next one at once, busy handler or not (``_process_batches`` in ray/serve/batching.py); the
cut batches then queue for the handler. A handler that blocks the event loop (the in-memory
decoder) stops that cutting, so requests pile up and the next batch takes them all; one that
awaits (the sharded decoder waits on its shard deployments) runs a string of small batches: 1.8
requests per batch at 64 clients, where the blocking replica gathers 18 (BENCHMARKS.md, Serving).
Here a batch is cut only when the decoder is free, from everything submitted meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class Coalescer:
    """``await submit(x)`` returns ``run([..., x, ...])``'s answer for ``x``; ``run`` (a blocking
    function of a list, answers in order) runs on a worker thread, one call at a time, over at
    most ``max_batch_size`` items taken in arrival order."""

    def __init__(self, run: Callable[[list], list], max_batch_size: int) -> None:
        self.run, self.max_batch_size = run, max_batch_size
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.draining: asyncio.Task | None = None
        # Sizes of the recent calls of ``run``; bounded, since a service runs batches for days.
        self.batch_sizes: deque[int] = deque(maxlen=1024)

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            taken, self.pending = self.pending[: self.max_batch_size], self.pending[self.max_batch_size :]
            self.batch_sizes.append(len(taken))
            try:
                answers = await asyncio.to_thread(self.run, [item for item, _ in taken])
            except Exception as err:  # every caller of this batch sees it (e.g. a shard died: a 503)
                for _, future in taken:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), answer in zip(taken, answers):
                if not future.done():  # a cancelled request (client gone) drops its answer
                    future.set_result(answer)
