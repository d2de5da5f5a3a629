"""`playground.ahead.Ahead`: the producer never waits for the consumer, the
consumer sees every item's effect, errors and closing are handed over."""

import threading

import pytest

from playground.ahead import Ahead


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
    ahead = Ahead(counting(50, done, log), stop=lambda: None)
    it = iter(ahead)
    first = next(it)
    assert 1 <= first <= 50
    # The consumer does nothing until the producer has finished all 50 items...
    assert done.wait(10)
    # ...and then one wake-up covers everything produced meanwhile.
    rest = list(it)
    assert (rest[-1] if rest else first) == 50
    assert len(rest) <= 1
    assert log[-1] == ("closed", "decode-ahead")  # closed in the producer's own thread


def test_min_interval_bounds_the_number_of_wake_ups():
    def slow(n):
        for i in range(n):
            threading.Event().wait(0.005)
            yield i

    counts = list(Ahead(slow(40), stop=lambda: None, min_interval=0.05))
    assert counts[-1] == 40
    assert len(counts) < 20  # 40 items at ~5 ms each, at most one wake-up per 50 ms


def test_the_generators_error_reaches_the_consumer_after_its_items():
    def failing():
        yield 1
        yield 2
        raise ValueError("bad step")

    seen = []
    with pytest.raises(ValueError, match="bad step"):
        for c in Ahead(failing(), stop=lambda: None):
            seen.append(c)
    assert seen[-1] == 2


def test_close_asks_the_generator_to_stop_and_waits_for_it():
    stop_asked, log = threading.Event(), []

    def endless():
        try:
            i = 0
            while not stop_asked.is_set():
                i += 1
                yield i
                threading.Event().wait(0.001)
        finally:
            log.append("finished")

    ahead = Ahead(endless(), stop=stop_asked.set)
    next(iter(ahead))
    ahead.close()
    assert stop_asked.is_set()
    assert log == ["finished"]  # the generator has wound down before close() returned


def test_close_after_the_end_does_not_call_stop():
    calls = []
    ahead = Ahead(iter(range(3)), stop=lambda: calls.append(1))
    assert list(ahead)[-1] == 3
    ahead.close()
    assert calls == []
