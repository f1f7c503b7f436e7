"""The serving engine: block-paged KV cache, continuous batching, prefix reuse, hot-swap.

Token ids in, token ids out; no Ray, no gRPC (``kilnlm.actors`` wraps it in Ray Serve).

    engine = LLMEngine(model, EngineConfig(kv_budget_mib=64), eos_id=tok.eos_id)
    engine.add_request("r1", prompt_ids, SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.token_ids, out.finish_reason)

``AsyncLLMEngine`` runs the same loop in a background thread and streams outputs to asyncio.
``engine.serving.current`` is the one answer to "which weights serve" (serving.py).
"""

from kilnlm.decoding import FinishReason
from kilnlm.engine.async_engine import AsyncLLMEngine, EngineDead
from kilnlm.engine.block_manager import BlockManager, Sequence
from kilnlm.engine.engine import EngineConfig, LLMEngine, QueueFull
from kilnlm.engine.invariant import batch_invariant
from kilnlm.engine.paged_cache import PagedCache
from kilnlm.engine.request import RequestOutput
from kilnlm.engine.serving import (
    ServingState,
    Snapshot,
    VersionError,
    VersionMismatch,
    VersionRule,
    VersionUnavailable,
)
from kilnlm.engine.weights import SwapReport

__all__ = [
    "AsyncLLMEngine",
    "BlockManager",
    "EngineConfig",
    "EngineDead",
    "FinishReason",
    "LLMEngine",
    "PagedCache",
    "QueueFull",
    "RequestOutput",
    "Sequence",
    "ServingState",
    "Snapshot",
    "SwapReport",
    "VersionError",
    "VersionMismatch",
    "VersionRule",
    "VersionUnavailable",
    "batch_invariant",
]
