"""AsyncLLMEngine: streaming, cancellation, errors, hot-swap and shutdown across the thread."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kilnlm.engine import AsyncLLMEngine, EngineConfig, EngineDead, LLMEngine, QueueFull
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams


def make_model(seed: int) -> Transformer:
    """test-1m with a long context, so a "long" request cannot end before the test ends it."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("test-1m", block_size=4096)).eval()


LONG = SamplingParams(max_tokens=4000)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


REQUESTS = {
    f"r{i}": (
        prompt(5 + 9 * i, i),
        SamplingParams(temperature=0.8 * (i % 2), seed=i, max_tokens=8 + i),
    )
    for i in range(5)
}


def sync_tokens(model: Transformer) -> dict[str, list[int]]:
    engine = LLMEngine(model, EngineConfig(kv_budget_mib=1))
    for rid, (p, params) in REQUESTS.items():
        engine.add_request(rid, p, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in REQUESTS}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return tokens


async def stream(engine: AsyncLLMEngine, rid: str, p: list[int], params: SamplingParams):
    outs = [out async for out in engine.generate(rid, p, params)]
    return [t for o in outs for t in o.token_ids], outs


async def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
def model() -> Transformer:
    return make_model(0)


def test_concurrent_streams_equal_the_sync_engine(model):
    expected = sync_tokens(model)

    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(kv_budget_mib=1)))
        try:
            got = await asyncio.gather(
                *(stream(engine, rid, *req) for rid, req in REQUESTS.items())
            )
        finally:
            engine.shutdown()
        return dict(zip(REQUESTS, got, strict=True))

    results = asyncio.run(main())
    for rid, (tokens, outs) in results.items():
        assert tokens == expected[rid]
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])


def test_cancelled_consumers_abort_within_a_step_and_free_blocks(model):
    async def main():
        core = LLMEngine(model, EngineConfig(kv_budget_mib=12))
        engine = AsyncLLMEngine(core)
        long = LONG
        background = asyncio.create_task(stream(engine, "bg", prompt(4, 1), long))

        agen = engine.generate("closed", prompt(40, 2), long)
        await agen.__anext__()  # one output, then the client goes away
        steps = core.num_steps
        await agen.aclose()
        await wait_until(lambda: "closed" not in core.requests)
        # The abort runs at the next step boundary; allow a few steps for the OS scheduling
        # the event loop's thread late on a loaded machine.
        assert core.num_steps - steps <= 5

        async def consume():
            async for _ in engine.generate("cancelled", prompt(40, 3), long):
                pass

        task = asyncio.create_task(consume())
        await wait_until(lambda: "cancelled" in core.requests and core.requests["cancelled"].output)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: "cancelled" not in core.requests)
        await engine.abort("bg")
        tokens, outs = await background
        assert outs[-1].finish_reason == "abort" and len(tokens) < 4000
        await wait_until(lambda: engine.stats()["used_blocks"] == 0)
        engine.shutdown()

    asyncio.run(main())


def test_errors_reach_the_caller_and_the_engine_keeps_serving(model):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(kv_budget_mib=1)))
        with pytest.raises(ValueError, match=r"^prompt"):
            await stream(engine, "bad", [], SamplingParams())
        with pytest.raises(ValueError, match=r"^max_tokens"):
            await stream(engine, "bad", [1], SamplingParams(max_tokens=5000))  # over the limit
        tokens, _ = await stream(engine, "ok", [3, 4], SamplingParams(max_tokens=4))
        assert len(tokens) == 4 and engine.healthy
        engine.shutdown()
        assert not engine.healthy
        with pytest.raises(EngineDead):
            await stream(engine, "late", [1], SamplingParams())

    asyncio.run(main())


def test_queue_full_is_raised_to_the_caller(model):
    async def main():
        core = LLMEngine(model, EngineConfig(kv_budget_mib=8, max_queue=1, max_num_seqs=1))
        engine = AsyncLLMEngine(core)
        runner = engine.generate("running", [1], LONG)
        await runner.__anext__()  # occupies the only sequence slot
        waiter = asyncio.create_task(stream(engine, "waiting", [2], SamplingParams(max_tokens=2)))
        await wait_until(lambda: len(core.scheduler.waiting) == 1)
        with pytest.raises(QueueFull):
            await stream(engine, "rejected", [3], SamplingParams(max_tokens=2))
        await runner.aclose()
        tokens, _ = await waiter
        assert len(tokens) == 2
        engine.shutdown()

    asyncio.run(main())


def test_hot_swap_through_the_async_engine_and_shutdown_aborts(model):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(kv_budget_mib=8)))
        old = engine.generate("old", prompt(6, 1), LONG)
        first = await old.__anext__()
        assert await engine.stage(make_model(1).state_dict(), 2) >= 0
        with pytest.raises(ValueError, match="missing"):
            await engine.stage({}, 3)
        await engine.commit(2)
        _, new_outs = await stream(engine, "new", prompt(6, 2), SamplingParams(max_tokens=3))
        assert {o.version for o in new_outs} == {2}
        engine.shutdown()  # "old" is still running: it ends with "abort", on its own version
        rest = [o async for o in old]
        assert rest[-1].finish_reason == "abort"
        assert {o.version for o in [first, *rest]} == {1}
        assert engine.stats()["last_swap"]["to_version"] == 2

    asyncio.run(main())


def test_commit_flips_an_idle_engine(model):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(kv_budget_mib=1, swap_mode="drain")))
        await engine.stage(make_model(1), 2)
        await engine.commit(2)
        await wait_until(lambda: engine.stats()["serving_version"] == 2)
        _, outs = await stream(engine, "new", [1, 2], SamplingParams(max_tokens=2))
        assert outs[-1].version == 2
        engine.shutdown()

    asyncio.run(main())


def test_deadline_through_the_async_engine(model):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, EngineConfig(kv_budget_mib=8)))
        outs = [
            o async for o in engine.generate("d", [1, 2], LONG, deadline=time.monotonic() + 0.05)
        ]
        assert outs[-1].finish_reason == "deadline"
        await wait_until(lambda: engine.stats()["used_blocks"] == 0)
        engine.shutdown()

    asyncio.run(main())
