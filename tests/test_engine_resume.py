"""Failover's engine half: a request resumed from tokens already streamed goes on exactly as the
undisturbed request would have (greedy and seeded), streaming only what is new."""

from __future__ import annotations

import pytest
import torch
from serving_utils import TEXT

from kilnlm.engine import EngineConfig, LLMEngine
from kilnlm.errors import InvalidArgumentError
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams
from kilnlm.tokenizer import Tokenizer

ENGINE = EngineConfig(kv_budget_mib=8, max_num_seqs=8, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.train([TEXT * 8], vocab_size=320, min_frequency=2)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-1m", vocab_size=tok.vocab_size, block_size=256)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id].zero_()  # never stops early: exactly max_tokens
    return model, tok


def run(setup, params: SamplingParams, resume: list[int] = (), busy: bool = False):
    """(new token ids, the text streamed per token, last output) of one request; ``busy`` adds
    other requests to the batch."""
    model, tok = setup
    engine = LLMEngine(model, ENGINE, tok.eos_id, version=3, decode=tok.decode)
    prompt = tok.encode("The kiln fires clay")
    if busy:
        for i in range(3):
            engine.add_request(f"other{i}", tok.encode("A potter"), SamplingParams(max_tokens=9))
    engine.add_request("r", prompt, params, resume=resume)
    ids, texts, last = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "r":
                assert len(out.token_ids) == 1  # one token a step: text per token below
                ids += out.token_ids
                texts.append(out.text or "")
                last = out
    return ids, texts, last


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=24),
        SamplingParams(temperature=0.8, seed=5, max_tokens=24, logprobs=2),
    ],
    ids=["greedy", "seeded", "seeded-logprobs"],
)
@pytest.mark.parametrize("k", [1, 7, 23])
def test_resumed_request_continues_the_undisturbed_one(setup, params, k):
    ref_ids, ref_texts, ref_last = run(setup, params)
    assert len(ref_ids) == 24
    ids, texts, last = run(setup, params, resume=ref_ids[:k], busy=True)
    assert ids == ref_ids[k:]  # only the new tokens, and exactly the undisturbed ones
    # The text the client already had (whole characters only) + the new text = the whole text.
    assert "".join(ref_texts[:k]) + "".join(texts) == "".join(ref_texts)
    assert last.finish_reason == "length" and last.num_completion_tokens == 24
    assert last.num_prompt_tokens == ref_last.num_prompt_tokens and last.version == 3
    if params.logprobs:
        assert len(last.logprobs) == len(last.token_ids)
        assert all(lp.logprob == lp.logprob for lp in last.logprobs)  # no placeholder leaks


def test_resume_is_refused_when_nothing_is_left_or_for_beams(setup):
    model, tok = setup
    engine = LLMEngine(model, ENGINE, tok.eos_id, decode=tok.decode)
    with pytest.raises(InvalidArgumentError, match="nothing is left") as e:
        engine.add_request("a", [1, 2], SamplingParams(max_tokens=2), resume=[5, 6])
    assert e.value.field == "resume_token_ids"
    with pytest.raises(InvalidArgumentError, match="beam"):
        engine.add_request("b", [1, 2], SamplingParams(max_tokens=4, num_beams=2), resume=[5])
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        engine.add_request("c", [1, 2], SamplingParams(max_tokens=4), resume=[10**6])
