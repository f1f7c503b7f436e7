"""The RL estimator on the toy: pieces pinned by worked examples, its expected gradient against the
exact gradient of KL(πθ‖π*), and the in-process reference run for three values of β."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kilnlm.rl.buffer import Sample
from kilnlm.rl.objective import (
    RLBatch,
    RLObjective,
    leave_one_out,
    rloo_loss,
    sequence_logprob,
)
from kilnlm.rl.reward import toy_reward
from kilnlm.rl.rollout import ReferenceRunConfig, sample_group, train_in_process
from kilnlm.rl.toy import ToyPosterior, allowed_mask, level_logprobs
from kilnlm.rl.toy_policy import train_toy_policy


@pytest.fixture(scope="module")
def toy():
    return train_toy_policy()


def posterior(toy, beta: float) -> ToyPosterior:
    return ToyPosterior.of(toy.model, toy.spec, toy_reward, toy.decode, beta)


def draw(model, post: ToyPosterior, n: int, k: int, seed: int, version: int = 0) -> list[Sample]:
    """n samples in groups of k, in one batched call."""
    gen = torch.Generator().manual_seed(seed)
    samples = sample_group(model, post.spec, n, gen, version, post.reward_of, group=0)
    return [dataclasses.replace(s, group=i // k) for i, s in enumerate(samples)]


def test_leave_one_out_worked_example():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 7.0])
    groups = torch.tensor([0, 0, 0, 5, 5, 9])
    expected = torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 20.0, 20 - 10.0, 0.0])
    torch.testing.assert_close(leave_one_out(values, groups), expected)


def test_batch_layout():
    samples = [
        Sample((5, 6), (7, 1), (-0.5, -0.25), 3, 1.5, 0),
        Sample((5,), (8,), (-2.0,), 2, 0.0, 0),
    ]
    batch = RLBatch.from_samples(samples, pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1], [5, 8, 1, 1]]
    assert batch.completion_mask.tolist() == [
        [False, False, True, True],
        [False, True, False, False],
    ]
    assert batch.sampler_logprobs.tolist() == [[0, 0, -0.5, -0.25], [0, -2.0, 0, 0]]
    assert batch.versions.tolist() == [3, 2] and batch.rewards.tolist() == [1.5, 0.0]


def test_sampled_logprobs_equal_rescoring_and_first_letters_follow_pi0(toy):
    post = posterior(toy, 1.0)
    samples = draw(toy.model, post, 4096, 8, seed=1)
    assert all(s.completion_ids in post._index for s in samples)
    batch = RLBatch.from_samples(samples, pad_id=toy.spec.eos_id)
    mask = allowed_mask(toy.spec.allowed_ids, toy.model.config.vocab_size)
    with torch.no_grad():
        rescored = sequence_logprob(toy.model, batch, mask)
    sampled = (batch.sampler_logprobs * batch.completion_mask).sum(1)
    torch.testing.assert_close(rescored, sampled, atol=1e-4, rtol=0)
    with torch.no_grad():
        first = level_logprobs(toy.model, toy.spec)[0][0].exp()  # (A+1,)
    counts = torch.tensor(
        [sum(s.completion_ids[0] == t for s in samples) for t in toy.spec.allowed_ids]
    )
    assert (counts / len(samples) - first).abs().max() < 0.03


def test_importance_weight_is_truncated_at_the_cap(toy):
    post = posterior(toy, 1.0)
    samples = draw(toy.model, post, 16, 4, seed=2)
    # a sampler that found every sample e^3 times less likely than the policy does
    far = [
        dataclasses.replace(s, logprobs=tuple(lp - 3.0 / len(s.logprobs) for lp in s.logprobs))
        for s in samples
    ]
    mask = allowed_mask(toy.spec.allowed_ids, toy.model.config.vocab_size)
    batch = RLBatch.from_samples(far, pad_id=toy.spec.eos_id)
    _, metrics = rloo_loss(toy.model, toy.model, batch, RLObjective(1.0, is_cap=2.0), mask, 5)
    assert metrics.truncated_fraction == 1.0 and abs(metrics.mean_weight - 2.0) < 1e-6
    assert metrics.kl_estimate == 0.0 and metrics.mean_lag == 5.0


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def exact_kl_grad(model, post: ToyPosterior) -> torch.Tensor:
    model.zero_grad()
    post.kl_target_loss(model).backward()
    return flat_grad(model)


def estimator_grad(policy, reference, sampler, post: ToyPosterior, n: int, seed: int):
    """The loss gradient over n samples of ``sampler`` in groups of 8: an average of n/8 RLOO
    estimates, so close to the estimator's expectation."""
    batch = RLBatch.from_samples(draw(sampler, post, n, 8, seed), post.spec.eos_id)
    mask = allowed_mask(post.spec.allowed_ids, policy.config.vocab_size)
    policy.zero_grad()
    loss, metrics = rloo_loss(policy, reference, batch, RLObjective(post.beta), mask)
    loss.backward()
    return flat_grad(policy), metrics


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.fixture(scope="module")
def moved(toy):
    """A policy 30 exact-gradient steps from π0 towards π* (β = 1), and its weights 5 steps back:
    away from π0 the KL term's gradient is large, so an estimator without it points elsewhere
    (measured: cosine −0.31 on-policy), and the 5-step-old weights are a stale sampler."""
    post = posterior(toy, 1.0)
    policy = copy.deepcopy(toy.model)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for step in range(30):
        if step == 25:
            stale = copy.deepcopy(policy)
        opt.zero_grad()
        post.kl_target_loss(policy).backward()
        opt.step()
    assert (
        post.measure_model(policy).kl_to_target < 0.2 * post.measure_model(toy.model).kl_to_target
    )
    return post, policy, stale


def test_estimator_points_along_the_exact_kl_gradient_on_policy(toy, moved):
    """−∇J = β·∇KL(πθ‖π*): the loss gradient must point where exact gradient descent does."""
    post, policy, _ = moved
    exact = exact_kl_grad(policy, post)
    est, metrics = estimator_grad(policy, toy.model, policy, post, 8192, seed=3)
    assert metrics.mean_weight == pytest.approx(1.0, abs=1e-4)  # on-policy: every weight 1
    print(f"on-policy cosine {cosine(est, exact):.3f}")
    assert cosine(est, exact) > 0.95


def test_estimator_points_along_the_exact_kl_gradient_off_policy(toy, moved):
    """Samples from weights 5 versions old, gradient for the current policy: the truncated
    importance weight keeps the direction."""
    post, policy, stale = moved
    exact = exact_kl_grad(policy, post)
    est, metrics = estimator_grad(policy, toy.model, stale, post, 8192, seed=4)
    assert metrics.mean_weight != pytest.approx(1.0, abs=1e-4)  # the weights are doing work
    print(f"off-policy cosine {cosine(est, exact):.3f}, mean weight {metrics.mean_weight:.4f}")
    assert cosine(est, exact) > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_in_process_run_reaches_a_fifth_of_the_starting_kl(toy, beta):
    """The reference the live loop must reproduce (docs/rl.md records the figures): 200 steps of
    32 samples, sampled from the weights one version behind (as replicas between swaps)."""
    post = posterior(toy, beta)
    cfg = ReferenceRunConfig(beta=beta, sampler_lag=1, max_staleness=1)
    run = train_in_process(toy.model, post, cfg)
    start, final = run.start.kl_to_target, run.final.kl_to_target
    print(
        f"beta={beta} KL(pi0||pi*)={start:.4f} KL(pi||pi*)={final:.4f} TV={run.final.total_variation:.4f}"
    )
    assert run.dropped == 0 and all(m.mean_lag == 1.0 for m in run.losses[1:])
    assert final < start / 5
    assert run.final.mean_reward > run.start.mean_reward
