"""The RL toy's exact side: restricted sampling, the enumeration (pinned against brute force),
π*, the KL identities, the toy π0 and its export, and reward loading by import path."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch

from kilnlm import checkpoint
from kilnlm.model import ModelConfig, Transformer
from kilnlm.rl.reward import TOY_REWARD, load_reward, toy_reward
from kilnlm.rl.toy import (
    ToyPosterior,
    ToySpec,
    completion_logprobs,
    enumerate_completions,
    kl,
    posterior_logprobs,
    restrict_to,
    total_variation,
)
from kilnlm.rl.toy_policy import ToyTrainConfig, export_toy_policy, train_toy_policy


def random_model(vocab_size: int = 16, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = Transformer(cfg, init_weights=False)
    for p in model.parameters():  # larger than the default init: far-from-uniform distributions
        torch.nn.init.normal_(p, 0.0, 0.5)
    return model.eval()


def test_restrict_to_renormalises_over_the_allowed_ids_row_by_row():
    logits = torch.randn(2, 6)
    out = torch.softmax(restrict_to(logits, [1, 4]), dim=-1)
    expected = torch.softmax(logits[:, [1, 4]], dim=-1)
    assert torch.allclose(out[:, [1, 4]], expected) and out[:, [0, 2, 3, 5]].eq(0).all()
    rows = torch.tensor([[True, True, False, False, False, False], [False] * 5 + [True]])
    per_row = torch.softmax(restrict_to(logits, rows), dim=-1)
    assert torch.allclose(per_row[0, :2], torch.softmax(logits[0, :2], -1))
    assert per_row[1, 5] == 1.0
    with pytest.raises(ValueError, match="allowed ids"):
        restrict_to(logits, [6])


def test_enumeration_counts_every_completion_once():
    spec = ToySpec((5, 6, 7), eos_id=1, prompt_ids=(2,), max_len=3)
    completions = enumerate_completions(spec)
    assert len(completions) == len(set(completions)) == (1 + 3 + 9) + 27
    assert completions[:4] == [(1,), (5, 1), (6, 1), (7, 1)]
    for c in completions:
        assert (c[-1] == 1 and len(c) <= 3 and 1 not in c[:-1]) or (len(c) == 3 and 1 not in c)


def brute_force_logprobs(model: Transformer, spec: ToySpec) -> dict[tuple[int, ...], float]:
    """Independent: every string over the allowed ids, cut at the first eos; one plain forward per
    completion; each step's probability by softmax over the allowed columns only."""
    allowed = list(spec.allowed_ids)
    completions = set()
    for seq in itertools.product(allowed, repeat=spec.max_len):
        cut = seq.index(spec.eos_id) + 1 if spec.eos_id in seq else len(seq)
        completions.add(seq[:cut])
    out = {}
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([[*spec.prompt_ids, *c]])
            logits = model(ids)[0].double()  # (T, V)
            total = 0.0
            for j, token in enumerate(c):
                row = logits[len(spec.prompt_ids) - 1 + j, allowed]
                total += float(row[allowed.index(token)] - torch.logsumexp(row, 0))
            out[c] = total
    return out


@pytest.mark.parametrize("alphabet", [(7,), (7, 3)])
def test_enumeration_equals_brute_force_per_sequence_forwards(alphabet):
    """A 2-token vocabulary (one letter + eos) and a 3-token one, inside a 16-id model whose other
    ids are masked."""
    model = random_model()
    spec = ToySpec(alphabet, eos_id=1, prompt_ids=(4, 9), max_len=4)
    brute = brute_force_logprobs(model, spec)
    completions = enumerate_completions(spec)
    with torch.no_grad():
        ours = completion_logprobs(model, spec).double()
    assert set(completions) == set(brute)
    expected = torch.tensor([brute[c] for c in completions], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert math.isclose(float(ours.exp().sum()), 1.0, abs_tol=1e-5)


def test_posterior_and_kl_identity():
    """E_π[r] − β·KL(π‖π0) = −β·KL(π‖π*) + β·log Z for any π: why minimising KL(π‖π*) is the
    regularised objective."""
    gen = torch.Generator().manual_seed(0)
    n, beta = 40, 0.7
    logp0 = torch.log_softmax(torch.randn(n, generator=gen, dtype=torch.float64), 0)
    logp = torch.log_softmax(torch.randn(n, generator=gen, dtype=torch.float64), 0)
    r = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    log_star = posterior_logprobs(logp0, r, beta)
    star = logp0.exp() * torch.exp(r / beta)
    torch.testing.assert_close(log_star.exp(), star / star.sum())
    log_z = math.log(float(star.sum()))
    lhs = float((logp.exp() * r).sum() - beta * kl(logp, logp0))
    assert math.isclose(lhs, -beta * float(kl(logp, log_star)) + beta * log_z, rel_tol=1e-9)
    assert float(kl(log_star, log_star)) == 0.0
    tv = 0.5 * float((logp.exp() - log_star.exp()).abs().sum())
    assert math.isclose(float(total_variation(logp, log_star)), tv)


def test_posterior_of_a_model_measures_pi0_and_pi_star():
    model = random_model()
    spec = ToySpec((7, 3), eos_id=1, prompt_ids=(4,), max_len=3)

    def decode(ids):
        return "".join({7: "a", 3: "b", 4: "w"}[i] for i in ids)

    post = ToyPosterior.of(model, spec, toy_reward, decode, beta=1.0)
    assert post.reward_of((7, 3, 1)) == 2.0  # "ab": one a, ends on b
    assert post.reward_of((3, 3, 3)) == 1.0
    at_pi0, at_star = post.measure(post.logp0), post.measure(post.log_target)
    assert at_pi0.kl_to_reference == 0.0 and at_star.kl_to_target == 0.0
    assert at_star.mean_reward > at_pi0.mean_reward
    assert math.isclose(at_pi0.kl_to_target, float(kl(post.logp0, post.log_target)))


@pytest.fixture(scope="module")
def toy():
    return train_toy_policy()


def test_toy_policy_letters_are_single_ids_and_it_learned_the_corpus(toy):
    spec, tok = toy.spec, toy.tokenizer
    assert [tok.decode([i]) for i in spec.alphabet_ids] == list("abcd")
    assert tok.decode(spec.prompt_ids) == "w:" and spec.eos_id == tok.eos_id
    post = ToyPosterior.of(toy.model, spec, toy_reward, toy.decode, beta=1.0)
    p0 = post.logp0.exp()
    # the corpus writes b 4.5x as often as a: so does π0, on one-letter words
    assert (
        p0[post.index((spec.alphabet_ids[1], spec.eos_id))]
        > 2 * p0[post.index((spec.alphabet_ids[0], spec.eos_id))]
    )


def test_toy_policy_is_deterministic():
    cfg = ToyTrainConfig(steps=3, n_words=32)
    a, b = train_toy_policy(cfg), train_toy_policy(cfg)
    for (name, pa), pb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_toy_policy_export_round_trips(toy, tmp_path):
    path = export_toy_policy(toy, tmp_path / "pi0", version=0)
    manifest = checkpoint.read_manifest(path)
    loaded = checkpoint.load(path)
    assert checkpoint.load_tokenizer(path).encode("w:abcd") == toy.tokenizer.encode("w:abcd")
    assert ToySpec.from_dict(manifest.fields["toy"]) == toy.spec
    record = toy.spec.record(1.0, str(path), [(1, "v1")])
    assert set(record) == {
        "alphabet_ids",
        "eos_id",
        "prompt_ids",
        "max_len",
        "beta",
        "pi0",
        "versions",
    }
    assert ToySpec.from_dict(record) == toy.spec and record["versions"] == [
        {"version": 1, "path": "v1"}
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logprobs(loaded, toy.spec), completion_logprobs(toy.model, toy.spec)
        )


def test_load_reward_finds_a_module_in_the_current_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "kiln_rl_user_rules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rules.py").write_text("def length(prompt, completion):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        fn = load_reward("kiln_rl_user_rules.rules:length")
        assert fn("w:", "abc") == 3
    finally:
        sys.modules.pop("kiln_rl_user_rules.rules", None)
        sys.modules.pop("kiln_rl_user_rules", None)
    assert load_reward(TOY_REWARD) is toy_reward


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("kilnlm.rl.reward", "package.module:function"),
        ("no_such_module_kiln:f", "current directory or on PYTHONPATH"),
        ("kilnlm.rl.reward:missing", "has no 'missing'"),
        ("kilnlm.rl.reward:TOY_REWARD", "not a function"),
    ],
)
def test_load_reward_errors_say_what_to_fix(path, message):
    with pytest.raises(ValueError, match=message):
        load_reward(path)
