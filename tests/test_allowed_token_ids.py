"""``SamplingParams.allowed_token_ids``: only those ids are drawn, the rest renormalise, and the
returned logprobs are the restricted distribution's (pinned against ``kilnlm.rl.toy``'s own
restriction, which the RL enumeration uses)."""

from __future__ import annotations

import pytest
import torch

from kilnlm.errors import InvalidArgumentError
from kilnlm.generate import generate
from kilnlm.model import ModelConfig, Transformer
from kilnlm.rl.toy import restricted_logprobs
from kilnlm.sampling import SamplingParams, apply_allowed_token_ids, process_logits


def test_mask_per_row_and_renormalised():
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    params = [SamplingParams(allowed_token_ids=[1, 4, 7]), SamplingParams()]
    out = process_logits(logits, params)
    assert torch.isinf(out[0, [0, 2, 3, 5, 6, 8, 9]]).all()
    torch.testing.assert_close(
        torch.log_softmax(out[0], -1)[[1, 4, 7]],
        restricted_logprobs(logits[0], [1, 4, 7])[[1, 4, 7]],
    )
    torch.testing.assert_close(out[1], logits[1])  # the other row is untouched
    assert apply_allowed_token_ids(logits, [SamplingParams()] * 2) is logits


def test_generate_draws_only_allowed_ids_with_restricted_logprobs():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    model.eval()
    allowed = [3, 5, 11]
    params = SamplingParams(max_tokens=12, seed=1, logprobs=0, allowed_token_ids=allowed)
    result = generate(model, [1, 2], params, eos_id=39)
    assert result.token_ids and set(result.token_ids) <= set(allowed)
    ids = torch.tensor([[1, 2, *result.token_ids]])
    with torch.no_grad():
        ref = restricted_logprobs(model(ids)[0, 1:-1], allowed)  # (n, V)
    want = ref.gather(1, ids[0, 2:, None])[:, 0]
    got = torch.tensor([lp.logprob for lp in result.logprobs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_invalid_allowed_ids_name_the_field():
    with pytest.raises(InvalidArgumentError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(InvalidArgumentError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[-1])
    with pytest.raises(InvalidArgumentError, match="allowed_token_ids"):
        process_logits(torch.zeros(1, 5), [SamplingParams(allowed_token_ids=[9])])
