"""The engine owns which weights serve: its snapshot, read leases, and version rules.

In-process, no Ray: the Serve-level checks of the same rules are in test_version_truth.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from kilnlm.engine import (
    AsyncLLMEngine,
    EngineConfig,
    LLMEngine,
    VersionMismatch,
    VersionRule,
    VersionUnavailable,
)
from kilnlm.eval import token_logprobs
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def make_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("test-1m")).eval()


def finish(engine: LLMEngine) -> dict[str, list]:
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def test_version_rules_are_checked_against_the_version_of_admission():
    """A request pinned to 1 that is still waiting when version 2 flips in is rejected, not
    run on 2; one pinned to 2 (queued before the flip) runs on 2."""
    engine = LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1, max_num_seqs=1), version=1)
    engine.add_request("running", [1, 2, 3], SamplingParams(temperature=0, max_tokens=20))
    engine.step()
    engine.add_request("pin1", [4, 5], GREEDY, versions=VersionRule(pin_version=1))
    engine.add_request("pin2", [4, 5], GREEDY, versions=VersionRule(pin_version=2))
    engine.add_request("min3", [4, 5], GREEDY, versions=VersionRule(min_version=3))
    engine.stage(make_model(1), version=2, payload="v2 files")
    engine.commit(2)  # double mode: flips at the next boundary; the queue waits for the slot
    outputs = finish(engine)
    assert {o.version for o in outputs["running"]} == {1}
    final = {rid: outs[-1] for rid, outs in outputs.items()}
    assert final["pin1"].finish_reason == "rejected" and not final["pin1"].token_ids
    assert isinstance(final["pin1"].error, VersionMismatch)
    assert isinstance(final["min3"].error, VersionUnavailable)
    assert final["pin2"].finish_reason == "length" and final["pin2"].version == 2
    assert engine.serving.current.version == 2 and engine.serving.current.payload == "v2 files"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_drain_flip_waits_for_readers_and_new_readers_wait_for_it():
    """A lease on the old snapshot keeps the drain flip (an in-place copy) waiting; while it
    waits no new lease is granted; the flip publishes the new snapshot to listeners."""
    old, new = make_model(0), make_model(1)
    ids = [1, 7, 9, 30, 2]
    expected_new = token_logprobs(new, ids)
    engine = LLMEngine(old, EngineConfig(kv_budget_mib=1, swap_mode="drain"), version=1)
    changes = []
    engine.serving.add_listener(lambda: changes.append(engine.serving.current.version))
    lease = engine.serving.try_lease()
    assert lease is not None and lease.version == 1
    engine.stage(new, version=2)
    engine.commit(2)
    assert engine.serving.try_lease() is None  # new readers wait for the new weights
    for _ in range(3):
        engine.step()
    assert engine.serving.current.version == 1, "flipped under a reader"
    assert torch.equal(token_logprobs(lease.model, ids), token_logprobs(make_model(0), ids))
    engine.serving.release(lease)
    engine.step()
    current = engine.serving.current
    assert current.version == 2 and engine.serving.flips == 1 and changes[-1] == 2
    assert torch.allclose(token_logprobs(current.model, ids), expected_new)
    assert engine.stats()["loaded_versions"] == [2]


def test_abort_of_a_waiting_drain_commit_lets_readers_in_again():
    engine = LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1, swap_mode="drain"))
    engine.add_request("old", [1, 2], SamplingParams(temperature=0, max_tokens=10))
    engine.step()
    engine.stage(make_model(1), version=2)
    engine.commit(2)
    assert engine.serving.try_lease() is None
    assert engine.abort_stage()
    lease = engine.serving.try_lease()
    assert lease is not None and lease.version == 1
    engine.serving.release(lease)
    finish(engine)
    assert engine.serving.current.version == 1


def test_async_reading_waits_for_a_pending_drain_flip_then_reads_the_new_weights():
    async def body() -> None:
        old, new = make_model(0), make_model(1)
        core = LLMEngine(old, EngineConfig(kv_budget_mib=1, swap_mode="drain"), version=1)
        engine = AsyncLLMEngine(core)
        try:
            stream = engine.generate("old", [3, 4], SamplingParams(temperature=0, max_tokens=40))
            first = await stream.__anext__()
            assert first.version == 1
            await engine.stage(make_model(1), 2)
            await engine.commit(2)
            assert engine.snapshot().version == 1  # the commit is queued, not flipped
            reader = asyncio.create_task(_read_version(engine))
            async for out in stream:  # the drain: the old request runs to its end
                assert out.version == 1
            version, same = await asyncio.wait_for(reader, 30)
            assert version == 2 and same(new) and engine.flips == 1
            await asyncio.wait_for(engine.wait_serving(2), 5)
        finally:
            engine.shutdown()

    asyncio.run(body())


async def _read_version(engine: AsyncLLMEngine):
    ids = [5, 6, 7]
    async with engine.reading() as snapshot:
        lp = token_logprobs(snapshot.model, ids)
    return snapshot.version, lambda model: torch.allclose(lp, token_logprobs(model, ids))


@pytest.mark.parametrize("rule", [VersionRule(pin_version=2), VersionRule(min_version=2)])
def test_version_rule_errors_reach_the_async_caller(rule: VersionRule):
    async def body() -> None:
        engine = AsyncLLMEngine(LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1)))
        try:
            with pytest.raises((VersionMismatch, VersionUnavailable)):
                async for _ in engine.generate("r", [1, 2], GREEDY, versions=rule):
                    pass
            outs = [o async for o in engine.generate("ok", [1, 2], GREEDY)]
            assert outs[-1].finish_reason == "length"  # the engine keeps serving
        finally:
            engine.shutdown()

    asyncio.run(body())
