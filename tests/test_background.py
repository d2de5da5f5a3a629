"""`playground.ui.background.BackgroundStream`: the producer never waits for the consumer, the
consumer sees every item's effect, errors and closing are handed over, and
cancelling the consumer interrupts its waits at once."""

import asyncio
import threading
import time

import pytest

from playground.ui.background import BackgroundStream


async def collect(ahead, on_each=None):
    """The count of items produced so far at each wake-up."""
    counts = []
    async for new in ahead:
        c = (counts[-1] if counts else 0) + len(new)
        counts.append(c)
        if on_each is not None:
            await on_each(c)
    return counts


def counting(n, done: threading.Event, log: list):
    try:
        for i in range(n):
            log.append(i)
            yield i
        done.set()
    finally:
        log.append(("closed", threading.current_thread().name))


def test_producer_runs_ahead_of_a_blocked_consumer_and_renders_coalesce():
    done, log = threading.Event(), []

    async def slow_render(c):  # the first render lasts until the producer is done
        if c < 50:
            await asyncio.to_thread(done.wait, 10)

    counts = asyncio.run(collect(BackgroundStream(counting(50, done, log), stop=lambda: None), slow_render))
    assert done.is_set()
    assert counts[-1] == 50
    assert len(counts) <= 2  # one wake-up covered everything produced during the first render
    assert log[-1] == ("closed", "decode-ahead")  # the generator ran and ended in the producer's thread


def slow(n, step_s=0.005):
    for i in range(n):
        time.sleep(step_s)
        yield i


def test_min_interval_bounds_the_number_of_wake_ups():
    counts = asyncio.run(collect(BackgroundStream(slow(40), stop=lambda: None, min_interval=0.05)))
    assert counts[-1] == 40
    assert len(counts) < 20  # 40 items at ~5 ms each, at most one wake-up per 50 ms


def test_share_spaces_wake_ups_by_the_consumers_own_cost():
    async def render(c):
        time.sleep(0.02)  # a 20 ms render (blocking, as Gradio's postprocess is)

    t0 = time.monotonic()
    counts = asyncio.run(collect(BackgroundStream(slow(60), stop=lambda: None, share=0.25), render))
    elapsed = time.monotonic() - t0
    assert counts[-1] == 60
    # Each render of 20 ms is followed by at least 60 ms without one.
    assert len(counts) <= elapsed / 0.08 + 2


def test_the_generators_error_reaches_the_consumer_after_its_items():
    def failing():
        yield 1
        yield 2
        raise ValueError("bad step")

    seen = []

    async def consume():
        async for c in BackgroundStream(failing(), stop=lambda: None):
            seen.append(c)

    with pytest.raises(ValueError, match="bad step"):
        asyncio.run(consume())
    assert seen[-1][-1] == 2  # the last item, in the last batch


def endless(stop_asked: threading.Event, log: list):
    try:
        i = 0
        while not stop_asked.is_set():
            i += 1
            yield i
            time.sleep(0.001)
    finally:
        log.append("finished")


def test_close_asks_the_generator_to_stop_and_waits_for_it():
    stop_asked, log = threading.Event(), []
    ahead = BackgroundStream(endless(stop_asked, log), stop=stop_asked.set)
    ahead.close()
    assert stop_asked.is_set()
    assert log == ["finished"]  # the generator has wound down before close() returned


def test_cancelling_the_consumer_interrupts_a_paced_wait_at_once():
    stop_asked, log = threading.Event(), []
    ahead = BackgroundStream(endless(stop_asked, log), stop=stop_asked.set, min_interval=30.0)

    async def main():
        task = asyncio.create_task(collect(ahead))
        await asyncio.sleep(0.2)  # the consumer rendered once and now waits 30 s
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.5
    ahead.close()
    assert log == ["finished"]


def test_close_after_the_end_does_not_call_stop():
    calls = []
    ahead = BackgroundStream(iter(range(3)), stop=lambda: calls.append(1))
    assert asyncio.run(collect(ahead))[-1] == 3
    ahead.close()
    assert calls == []
