"""actors/streaming.coalesce: fewer messages, same items in the same order, first one at once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kilnlm.actors.streaming import Failover, StreamShape, coalesce, resumable


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


class Lost(RuntimeError):
    pass


def test_resumable_continues_from_the_streamed_tokens_on_the_same_version():
    """A 'replica' that dies after a few tokens: the stream resumes where it stopped."""
    calls: list[tuple[list[int], int | None]] = []
    deaths = [3, 5]  # the first replica dies after 3 items, the next after 5 more

    def start(streamed: list[int], version: int | None):
        calls.append((streamed, version))

        async def replica():
            for i, tok in enumerate(range(len(streamed), 12)):
                if deaths and i == deaths[0]:
                    deaths.pop(0)
                    raise Lost("replica died")
                yield ([tok], 7)

        return replica()

    async def run():
        got = []
        stream = resumable(
            start, lambda c: c[0], lambda c: c[1], lambda e: isinstance(e, Lost), Failover(3, 0)
        )
        async for item in stream:
            got.append(item)
        return got

    got = asyncio.run(run())
    assert [t for toks, _ in got for t in toks] == list(range(12))  # unbroken, no token twice
    assert calls == [([], None), ([0, 1, 2], 7), ([0, 1, 2, 3, 4, 5, 6, 7], 7)]


def test_resumable_gives_up_after_the_bound_and_never_resends_a_request_error():
    tries: list[int] = []

    def start(kind: type[Exception]):
        def opener(streamed: list[int], version: int | None):
            tries.append(len(streamed))

            async def replica():
                yield ([len(streamed)], 1)
                raise kind("x")

            return replica()

        return opener

    async def run(kind: type[Exception]) -> list:
        got = []
        s = resumable(
            start(kind),
            lambda c: c[0],
            lambda c: c[1],
            lambda e: isinstance(e, Lost),
            Failover(2, 0),
        )
        with pytest.raises(kind):
            async for item in s:
                got.append(item)
        return got

    assert len(asyncio.run(run(Lost))) == 3 and tries == [0, 1, 2]  # the first try + 2 resends
    tries.clear()
    assert len(asyncio.run(run(ValueError))) == 1 and tries == [0]
