"""The RL plug-in (what one Ray Train update of ``kiln rl`` runs): through ``train_step`` it takes
exactly the gradient of ``rloo_loss`` with π0 beside the policy, from π0's log-probs computed once."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kilnlm.rl.objective import RLBatch, RLObjective, rloo_loss
from kilnlm.rl.plugin import RLPlugin, reference_logps
from kilnlm.rl.reward import toy_reward
from kilnlm.rl.rollout import sample_group
from kilnlm.rl.toy import ToyPosterior, allowed_mask
from kilnlm.rl.toy_policy import train_toy_policy
from kilnlm.train import TrainConfig, train_step


@pytest.fixture(scope="module")
def toy():
    return train_toy_policy()


def samples_of(toy, n: int, k: int):
    post = ToyPosterior.of(toy.model, toy.spec, toy_reward, toy.decode, beta=0.5)
    gen = torch.Generator().manual_seed(3)
    drawn = sample_group(toy.model, toy.spec, n, gen, 0, post.reward_of, group=0)
    return [dataclasses.replace(s, group=i // k) for i, s in enumerate(drawn)]


def test_plugin_step_is_rloo_with_reference_model(toy):
    samples = samples_of(toy, 12, 4)
    spec, pad = toy.spec, toy.spec.eos_id
    plugin = RLPlugin(
        parent="unused",
        data="test",
        batch_size=len(samples),
        seed=0,
        pad_id=pad,
        beta=0.5,
        samples=samples,
        ref_logps=reference_logps(toy.model, samples, pad, spec.allowed_ids),
        allowed_ids=spec.allowed_ids,
        policy_version=0,
    )
    # the reference: rloo_loss with π0 as a second model, on a policy moved away from π0
    policy = copy.deepcopy(toy.model).train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref_policy = copy.deepcopy(policy)
    mask = allowed_mask(spec.allowed_ids, toy.model.config.vocab_size)
    loss, _ = rloo_loss(
        ref_policy, toy.model, RLBatch.from_samples(samples, pad), RLObjective(0.5), mask, 0
    )
    loss.backward()
    expected = [p.grad.clone() for p in ref_policy.parameters()]

    cfg = TrainConfig(
        objective="rl", lr=1.0, min_lr=1.0, warmup_steps=0, max_steps=1, batch_size=12, grad_clip=0
    )
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    metrics = train_step(policy, opt, [plugin.batch(0, 0, 1)], cfg, 0, objective=plugin.loss)
    assert metrics.loss == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-7)
    assert metrics.grad_norm > 0
    for b, p, want in zip(before, policy.parameters(), expected, strict=True):
        torch.testing.assert_close((b - p.detach()) / metrics.lr, want, rtol=1e-4, atol=1e-6)


def test_groups_stay_whole_across_ranks(toy):
    samples = samples_of(toy, 12, 4)  # groups 0, 1, 2
    plugin = RLPlugin(
        parent="unused",
        data="test",
        batch_size=12,
        seed=0,
        pad_id=toy.spec.eos_id,
        samples=samples,
        ref_logps=[0.0] * 12,
    )
    shares = [plugin.share(r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(12))
    for share in shares:
        groups = {samples[i].group for i in share}
        assert all(s.group not in groups for j, s in enumerate(samples) if j not in share)
    with pytest.raises(ValueError, match="reference log-probs"):
        dataclasses.replace(plugin, ref_logps=[0.0])
