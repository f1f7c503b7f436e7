"""Held-out evaluation: every token scored once, log-probs equal a by-hand computation, known values."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kilnlm.eval import EvalResult, evaluate, perplexity, token_logprobs, windows
from kilnlm.model import ModelConfig, Transformer


def small_model(block_size: int = 16) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-1m", vocab_size=50, n_embd=64, block_size=block_size)
    return Transformer(cfg).eval()


class UniformModel(nn.Module):
    """Logits that are all zero: every token has probability exactly 1/V."""

    def __init__(self, vocab_size: int, block_size: int = 8):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_embd=8, n_head=1)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.config.vocab_size) + 0 * self.anchor  # (B, T, V)


@pytest.mark.parametrize("n_tokens", [2, 3, 16, 17, 18, 50, 101])
@pytest.mark.parametrize(
    "seq_len,stride", [(1, None), (4, None), (16, None), (16, 5), (16, 1), (7, 7)]
)
def test_windows_score_every_target_exactly_once(n_tokens, seq_len, stride):
    scored: list[int] = []
    for w in windows(n_tokens, seq_len, stride):
        assert 0 <= w.begin < w.end <= n_tokens - 1
        assert w.end - w.begin <= seq_len  # fits the context
        assert w.begin + 1 <= w.score_from <= w.end
        scored += range(w.score_from, w.end + 1)
    assert scored == list(range(1, n_tokens))


def test_sliding_windows_give_every_later_token_enough_context():
    seq_len, stride = 16, 4
    for w in windows(200, seq_len, stride)[1:]:
        assert w.score_from - w.begin >= seq_len - stride  # context tokens before the first scored


def test_windows_reject_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, stride=5)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, stride=0)


def manual_logprobs(model: nn.Module, ids: torch.Tensor, seq_len: int, stride: int) -> list[float]:
    """Target t, one at a time: run the window's context ids[begin:t] and read the last position."""
    out = []
    for w in windows(len(ids), seq_len, stride):
        for t in range(w.score_from, w.end + 1):
            with torch.no_grad():
                logits = model(ids[w.begin : t][None])[0, -1]  # (V,)
            out.append(float(torch.log_softmax(logits, -1)[ids[t]]))
    return out


@pytest.mark.parametrize("n_tokens,stride", [(12, None), (40, None), (40, 6)])
def test_token_logprobs_match_manual_computation(n_tokens, stride):
    model = small_model(block_size=16)
    ids = torch.randint(0, 50, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    got = token_logprobs(model, ids, stride=stride, batch_size=2)
    assert got.shape == (n_tokens - 1,)
    expected = torch.tensor(manual_logprobs(model, ids, 16, stride or 16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_single_window_logprobs_are_the_full_forward():
    model = small_model()
    ids = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None])[0], -1)  # (T, V)
    expected = logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(model, ids), expected)


def test_uniform_model_has_perplexity_vocab_size():
    V = 37
    model = UniformModel(V)
    ids = list(np.random.default_rng(0).integers(0, V, 30))
    assert perplexity(model, ids) == pytest.approx(V, rel=1e-6)
    result = evaluate(model, ids, n_bytes=60, batch_size=3, stride=3)
    assert result.tokens == 29
    assert result.mean_nll == pytest.approx(math.log(V), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(29 * math.log2(V) / 60, rel=1e-6)


def test_evaluate_agrees_with_token_logprobs_and_accepts_any_sequence_type():
    model = small_model()
    ids = np.random.default_rng(2).integers(0, 50, 45)
    lp = token_logprobs(model, torch.tensor(ids))
    result = evaluate(model, ids, n_bytes=123)
    assert result.tokens == 44
    assert result.mean_nll == pytest.approx(-float(lp.double().mean()), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll))
    assert result.bits_per_byte * math.log(2) * 123 == pytest.approx(result.mean_nll * 44, rel=1e-9)
    assert perplexity(model, ids.tolist()) == pytest.approx(perplexity(model, ids), rel=1e-6)


def test_evaluation_keeps_the_models_mode():
    model = small_model().train()
    token_logprobs(model, [1, 2, 3])
    assert model.training


@pytest.mark.parametrize("bad", [[], [5], torch.tensor([[1, 2], [3, 4]]), [0.5, 1.5]])
def test_bad_sequences_are_rejected(bad):
    with pytest.raises(ValueError):
        perplexity(small_model(), bad)


def test_seq_len_beyond_the_context_is_rejected():
    with pytest.raises(ValueError, match="context"):
        evaluate(small_model(block_size=16), list(range(40)), n_bytes=40, seq_len=17)


def test_eval_result_rejects_empty_and_byteless():
    with pytest.raises(ValueError, match="n_bytes"):
        EvalResult.from_total_nll(1.0, tokens=3, n_bytes=0)
    with pytest.raises(ValueError, match="2 tokens"):
        EvalResult.from_total_nll(0.0, tokens=0, n_bytes=3)
