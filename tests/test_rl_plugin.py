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


def test_a_fed_plugin_trains_step_s_on_iteration_s_over_steps(toy):
    """With a ``source`` (the long-lived run's feed), step s trains on iteration s // steps's
    batch, asked for once per iteration, and a resumed worker asking again gets the same one."""
    batches = {i: samples_of(toy, 8, 4) for i in range(3)}
    batches = {i: [dataclasses.replace(s, reward=float(i)) for s in b] for i, b in batches.items()}
    asked: list[int] = []

    def source(iteration: int):
        asked.append(iteration)
        return batches[iteration], [0.5 * iteration] * len(batches[iteration])

    def fed():
        return RLPlugin(
            parent="unused", data="test", batch_size=8, seed=0, pad_id=toy.spec.eos_id,
            source=source, steps_per_iteration=3,
        )  # fmt: skip

    plugin = fed()
    assert plugin.fed_fields() == {}
    got = {step: plugin.batch(step, 0, 1) for step in range(9)}
    assert asked == [0, 1, 2]  # once per iteration, in order
    for step, micro in got.items():
        want = RLBatch.from_samples(batches[step // 3], toy.spec.eos_id)
        torch.testing.assert_close(micro[0], want.input_ids)
        torch.testing.assert_close(micro[4], want.rewards)
        assert micro[6].tolist() == [0.5 * (step // 3)] * 8
    assert plugin.fed_fields() == {"samples": 8, "rl_iteration": 2}
    resumed = fed()  # a restarted worker resumes at step 3: iteration 1's batch again
    torch.testing.assert_close(resumed.batch(3, 0, 1)[0], got[3][0])
    assert asked[-1] == 1
    with pytest.raises(ValueError, match="at least one sample"):
        RLPlugin(parent="unused", data="test", batch_size=8, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="steps_per_iteration"):
        dataclasses.replace(plugin, steps_per_iteration=0)


def test_export_step_reads_the_step_of_an_export_folder():
    from kilnlm.cluster.checkpointing import export_dir_name
    from kilnlm.cluster.rl_trainer import export_step

    assert export_step(f"/runs/rl/exports/{export_dir_name(12)}-0a1b2c3d") == 12
    assert export_step(f"s3://b/rl/exports/{export_dir_name(4)}-ff00/") == 4
    with pytest.raises(ValueError, match="not a step export"):
        export_step("/runs/rl/pi0")
