"""The background producer used by the writer: order, bounded look-ahead and error propagation."""

from __future__ import annotations

import threading
import time

import pytest

from moeprep.checkpoint.pipeline import background_iter


def test_yields_every_item_in_order() -> None:
    assert list(background_iter(iter(range(1000)), depth=3)) == list(range(1000))


def test_producer_runs_at_most_depth_items_ahead() -> None:
    produced: list[int] = []

    def items():  # type: ignore[no-untyped-def]
        for i in range(50):
            produced.append(i)
            yield i

    it = background_iter(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(produced) <= 4  # the one consumed, two queued, one blocked on put
    assert list(it) == list(range(1, 50))


def test_producer_error_is_raised_in_the_consumer() -> None:
    def items():  # type: ignore[no-untyped-def]
        yield 1
        raise ValueError("broken source")

    with pytest.raises(ValueError, match="broken source"):
        list(background_iter(items()))


def test_abandoned_iteration_stops_the_producer() -> None:
    def items():  # type: ignore[no-untyped-def]
        i = 0
        while True:
            i += 1
            yield i

    before = threading.active_count()
    it = background_iter(items(), depth=2)
    next(it)
    it.close()
    time.sleep(0.1)
    assert threading.active_count() == before
