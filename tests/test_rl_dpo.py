"""DPO on the toy: the pairs follow Bradley–Terry on the reward, and DPO's exact population loss is
minimised at π* (the online loop's target)."""

from __future__ import annotations

import pytest
import torch

from kilnlm.model import ModelConfig, Transformer
from kilnlm.rl.dpo import population_dpo_loss, preference_probability, toy_preference_pairs
from kilnlm.rl.reward import toy_reward
from kilnlm.rl.toy import ToyPosterior, ToySpec, kl

SPEC = ToySpec((7, 3), eos_id=1, prompt_ids=(4,), max_len=3)


def decode(ids):
    return "".join({7: "a", 3: "b", 4: "w"}[i] for i in ids)


def posterior(beta: float) -> ToyPosterior:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16)
    return ToyPosterior.of(Transformer(cfg).eval(), SPEC, toy_reward, decode, beta)


def test_pairs_are_drawn_from_pi0_and_preferred_by_bradley_terry():
    post = posterior(beta=1.0)
    pairs = toy_preference_pairs(post, 20000, torch.Generator().manual_seed(0))
    a, b = post.index((7, 1)), post.index((3, 1))  # "a" (r = 1) vs "b" (r = 1): a tie
    c = post.index((7, 7, 7))  # "aaa" (r = 3)
    wins = {(a, c): 0, (c, a): 0}
    for p in pairs:
        assert p.prompt_len == 1 and p.chosen != p.rejected
        key = (post.index(p.chosen[1:]), post.index(p.rejected[1:]))
        if key in wins:
            wins[key] += 1
    assert preference_probability(post, a, b) == 0.5
    n = wins[(a, c)] + wins[(c, a)]
    assert n > 50
    expected = preference_probability(post, c, a)  # σ(3 − 1) ≈ 0.88
    assert abs(wins[(c, a)] / n - expected) < 4 * (expected * (1 - expected) / n) ** 0.5


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_population_dpo_loss_is_minimised_at_the_posterior(beta):
    post = posterior(beta)
    assert population_dpo_loss(post.log_target, post) < population_dpo_loss(post.logp0, post)
    logits = post.logp0.clone().requires_grad_(True)  # a free policy over the completions
    opt = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = population_dpo_loss(torch.log_softmax(logits, 0), post)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = torch.log_softmax(logits.detach(), 0)
    assert float(kl(fitted, post.log_target)) < 1e-6
