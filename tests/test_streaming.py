"""actors/streaming.coalesce: fewer messages, same items in the same order, first one at once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kilnlm.actors.streaming import StreamShape, coalesce


def merge(parts: list[list[int]]) -> list[int]:
    return [x for p in parts for x in p]


async def source(n: int, gap_s: float, log: list[str], fail_at: int | None = None):
    try:
        for i in range(n):
            if fail_at == i:
                raise RuntimeError("boom")
            yield [i]
            await asyncio.sleep(gap_s)
    finally:
        log.append("closed")


async def collect(shape: StreamShape, n: int = 20, gap_s: float = 0.001, fail_at=None):
    log: list[str] = []
    out = []
    async with contextlib.aclosing(
        coalesce(source(n, gap_s, log, fail_at), merge, len, shape)
    ) as s:
        async for chunk in s:
            out.append(chunk)
    return out, log


def test_same_items_in_order_and_fewer_messages():
    out, log = asyncio.run(collect(StreamShape(interval_s=10.0, max_tokens=5)))
    assert merge(out) == list(range(20))
    assert out[0] == [0]  # the first delta alone, at once
    assert [len(c) for c in out[1:]] == [5, 5, 5, 4]  # then full batches, the tail at the end
    assert log == ["closed"]


def test_interval_bounds_the_hold():
    # Items every 20 ms, an interval of 1 ms and no token bound: nothing waits for company.
    out, _ = asyncio.run(collect(StreamShape(interval_s=0.001), n=5, gap_s=0.02))
    assert out == [[0], [1], [2], [3], [4]]


def test_zero_shape_is_one_message_per_item_when_the_consumer_keeps_up():
    out, _ = asyncio.run(collect(StreamShape(), n=5, gap_s=0.01))
    assert merge(out) == list(range(5))
    assert len(out) == 5


def test_error_comes_after_the_items_before_it():
    async def run():
        got: list[list[int]] = []
        log: list[str] = []
        with pytest.raises(RuntimeError, match="boom"):
            async for chunk in coalesce(
                source(10, 0, log, fail_at=7), merge, len, StreamShape(1.0, 100)
            ):
                got.append(chunk)
        return got

    assert merge(asyncio.run(run())) == list(range(7))


def test_closing_early_closes_the_source():
    async def run():
        log: list[str] = []
        stream = coalesce(source(1000, 0.001, log), merge, len, StreamShape(0.005, 3))
        async with contextlib.aclosing(stream) as s:
            async for _ in s:
                break
        await asyncio.sleep(0)
        return log

    assert asyncio.run(run()) == ["closed"]


def test_shape_validates():
    with pytest.raises(ValueError, match="interval"):
        StreamShape(interval_s=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        StreamShape(max_tokens=-1)
