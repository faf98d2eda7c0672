"""serve/coalesce.py: requests that arrive while a batch decodes form the next batch (no clocks:
the first decode is held on an event until the others are pending)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rpg_dist.serve.coalesce import Coalescer


def _held_first_call(fail_on_call: int | None = None):
    """A ``run`` whose first call blocks until released; call ``fail_on_call`` raises."""
    started, release, calls = threading.Event(), threading.Event(), []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            started.set()
            assert release.wait(timeout=120)
        if len(calls) == fail_on_call:
            raise RuntimeError("shard died")
        return [item * 10 for item in items]

    return run, started, release, calls


async def _submit_during_first_decode(coalescer, started, release, later):
    first = asyncio.create_task(coalescer.submit(1))
    assert await asyncio.to_thread(started.wait, 120)  # the first decode is running
    rest = [asyncio.create_task(coalescer.submit(item)) for item in later]
    while len(coalescer.pending) < len(later):  # each task registers on its first step
        await asyncio.sleep(0)
    release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_requests_arriving_during_a_decode_form_the_next_batches():
    run, started, release, calls = _held_first_call()
    coalescer = Coalescer(run, max_batch_size=4)
    answers = asyncio.run(_submit_during_first_decode(coalescer, started, release, range(2, 8)))
    assert answers == [10, 20, 30, 40, 50, 60, 70]
    assert calls == [[1], [2, 3, 4, 5], [6, 7]]  # arrival order, at most max_batch_size a call
    assert list(coalescer.batch_sizes) == [1, 4, 2]


def test_a_failed_batch_fails_only_its_own_requests():
    run, started, release, calls = _held_first_call(fail_on_call=2)
    coalescer = Coalescer(run, max_batch_size=2)
    answers = asyncio.run(_submit_during_first_decode(coalescer, started, release, range(2, 6)))
    assert answers[0] == 10 and answers[3:] == [40, 50]
    assert all(isinstance(a, RuntimeError) for a in answers[1:3])
    assert calls == [[1], [2, 3], [4, 5]]


def test_an_idle_coalescer_starts_a_batch_at_once():
    coalescer = Coalescer(lambda items: [-x for x in items], max_batch_size=8)

    async def one_at_a_time():
        return [await coalescer.submit(x) for x in (3, 4)]

    assert asyncio.run(one_at_a_time()) == [-3, -4]
    assert list(coalescer.batch_sizes) == [1, 1]


@pytest.mark.parametrize("size", [1, 3])
def test_max_batch_size_one_and_more(size):
    run, started, release, calls = _held_first_call()
    coalescer = Coalescer(run, max_batch_size=size)
    asyncio.run(_submit_during_first_decode(coalescer, started, release, range(2, 5)))
    assert all(len(call) <= size for call in calls) and sum(map(len, calls)) == 4
