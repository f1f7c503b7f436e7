"""The prefix cache never serves keys/values computed by old weights after a hot-swap.

Online RL swaps weights every iteration and asks the replicas for the same prompts again: a
prompt whose blocks were cached under version N must, after the flip to N + 1, be answered from
N + 1's weights alone. The engine gets this by salting every block's hash chain with the weight
version (``block_manager.root_hash``): N's blocks stay on the free list but no sequence of N + 1
can find them. Real torch, the real engine, both swap modes; the reference is a fresh engine
that has only ever held N + 1's weights.
"""

from __future__ import annotations

import pytest
import torch

from kilnlm.engine import EngineConfig, LLMEngine
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
PROMPT = [(7 * i + 3) % 200 + 10 for i in range(53)]  # three full 16-token blocks and 5 more
FULL_BLOCKS = 3 * 16


def make_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("test-1m")).eval()


def run(engine: LLMEngine, request_id: str) -> tuple[list[int], list[float], int]:
    """(greedy ids, their log-probs, version) of PROMPT, run to the end."""
    engine.add_request(request_id, PROMPT, GREEDY)
    ids: list[int] = []
    lps: list[float] = []
    versions = set()
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.token_ids
            lps += [lp.logprob for lp in out.logprobs or []]
            versions.add(out.version)
    assert len(versions) == 1, versions
    return ids, lps, versions.pop()


def hits(engine: LLMEngine) -> int:
    return engine.stats()["prefix_hit_tokens"]


@pytest.mark.parametrize("swap_mode", ["double", "drain"])
def test_prompt_cached_under_old_weights_is_recomputed_by_new_ones(swap_mode):
    engine = LLMEngine(make_model(0), EngineConfig(kv_budget_mib=1, swap_mode=swap_mode), version=1)
    old_ids, old_lps, v = run(engine, "warm")
    assert v == 1
    assert run(engine, "hit") == (old_ids, old_lps, 1) and hits(engine) == FULL_BLOCKS
    # the prompt's three full blocks are now in the cache, computed by version 1

    engine.stage(make_model(1), version=2)
    engine.commit(2)
    engine.step()  # the boundary: flips (nothing is running)
    assert engine.serving_version == 2

    fresh = run(LLMEngine(make_model(1), EngineConfig(kv_budget_mib=1), version=2), "fresh")
    after = run(engine, "after-swap")
    assert hits(engine) == FULL_BLOCKS, "version 2 took blocks computed by version 1"
    assert after == fresh  # exactly the new weights' tokens and log-probs
    assert after[1] != old_lps  # and the two versions do differ on this prompt

    again = run(engine, "again")  # version 2's own blocks are cached and reused
    assert hits(engine) == 2 * FULL_BLOCKS
    assert again[0] == fresh[0] and again[2] == 2
    torch.testing.assert_close(torch.tensor(again[1]), torch.tensor(fresh[1]))
