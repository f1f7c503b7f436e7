"""On-policy preference pairs (``kilnlm.posttrain.onpolicy``): the labels follow ROUGE-L to the
reference, checked here against an LCS computed a different way (memoised recursion over all
subsequences, not the library's row-by-row dynamic programme); the replies are a real model's
samples, reproducible from their seeds; the pairs' prompts never come from held-out modules."""

from __future__ import annotations

import json
from functools import cache

import pytest
from serving_utils import make_checkpoint

from kilnlm.checkpoint import load, load_tokenizer
from kilnlm.posttrain.data import read_preferences
from kilnlm.posttrain.defaults import DefaultsConfig, is_heldout
from kilnlm.posttrain.onpolicy import (
    OnPolicyConfig,
    build_pairs,
    label_pairs,
    reference_prompts,
    sample_replies,
    write_pairs,
)
from kilnlm.rl.defaults import betas_for, final_export, heldout_prompts, references, tradeoff_rows


def rouge_independent(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens, its LCS by memoised recursion."""
    a, b = tuple(candidate.split()), tuple(reference.split())

    @cache
    def lcs(i: int, j: int) -> int:
        if i == len(a) or j == len(b):
            return 0
        if a[i] == b[j]:
            return 1 + lcs(i + 1, j + 1)
        return max(lcs(i + 1, j), lcs(i, j + 1))

    n = lcs(0, 0)
    return 0.0 if n == 0 else 2 * n / (len(a) + len(b))  # F1 = 2PR/(P+R) = 2·lcs/(|a|+|b|)


def check_labels(user: str, reference: str, replies: list[str], pairs, min_gap: float) -> None:
    """Every kept pair is the rule's; every pair the rule keeps is there; nothing else."""
    score = {r: rouge_independent(r, reference) for r in replies}
    want = set()
    distinct = list(dict.fromkeys(replies))
    for i, x in enumerate(distinct):
        for y in distinct[i + 1 :]:
            if abs(score[x] - score[y]) > min_gap:
                want.add((x, y) if score[x] > score[y] else (y, x))
    got = [(p.chosen, p.rejected) for p in pairs]
    assert len(got) == len(set(got)) and set(got) == want
    for p in pairs:
        assert p.prompt == ({"role": "user", "content": user},)
        assert score[p.chosen] > score[p.rejected] + min_gap


def test_labels_follow_rouge_l_ties_and_identical_replies_dropped():
    reference = "Return the sum of a and b."
    replies = [
        "Return the sum of a and b.",  # 1.0
        "Return the sum.",  # partial
        "the sum of b",  # partial, another length
        "Returns nothing useful here",  # 0
        "Nothing at all",  # 0: ties with the one above
        "Return the sum.",  # identical to the second
    ]
    pairs, dropped = label_pairs("What does `m.add` do?", reference, replies)
    check_labels("What does `m.add` do?", reference, replies, pairs, 0.0)
    assert dropped == {"identical": 5, "ties": 1}  # the copy's 5 pairs; one 0-vs-0 tie
    assert len(pairs) == 10 - 1  # 5 distinct replies, C(5,2) = 10, one tie
    pairs, _ = label_pairs("q", reference, replies, min_gap=0.3)  # small gaps count as ties
    check_labels("q", reference, replies, pairs, 0.3)
    with pytest.raises(ValueError, match="samples"):
        OnPolicyConfig(samples=0)


def test_pair_prompts_come_from_training_modules_only():
    frac = DefaultsConfig().heldout_fraction
    train, held = reference_prompts("train"), reference_prompts("heldout")
    assert train and held and not {r.user for r in train} & {r.user for r in held}
    assert all(not is_heldout(r.module, frac) for r in train)
    assert all(is_heldout(r.module, frac) for r in held)
    rl_prompts = {p.messages[-1]["content"] for p in heldout_prompts(8)}
    assert rl_prompts <= {r.user for r in held} and not rl_prompts & {r.user for r in train}
    spread = reference_prompts("train", limit=5)
    assert len(spread) == 5 and spread[0] == train[0]


def test_pairs_of_a_real_model_are_its_seeded_samples_labelled_by_the_rule(tmp_path):
    export = make_checkpoint(tmp_path / "policy", block_size=512)
    cfg = OnPolicyConfig(samples=3, max_tokens=12, batch_rows=4)
    pairs, summary, samples = build_pairs(export, "train", cfg, limit=3)
    assert summary["prompts"] == 3 and summary["pairs"] == len(pairs)
    assert summary["pairs"] + summary["dropped_ties"] + summary["dropped_identical"] == 3 * 3
    model, tok = load(export), load_tokenizer(export)
    again = sample_replies(model, tok, [s["prompt"] for s in samples], cfg)
    assert again == [s["replies"] for s in samples]  # each row's own seed: the same draws
    for s in samples:
        assert len(s["replies"]) == 3
        mine = [p for p in pairs if p.prompt[0]["content"] == s["prompt"]]
        check_labels(s["prompt"], s["reference"], s["replies"], mine, cfg.min_gap)
    # a random model's replies share no word with the stdlib references (all ties above): label
    # the same real samples against a reference made of their own words, so pairs are kept
    replies = sample_replies(model, tok, ["Write a Python function that does this: x"], cfg)[0]
    words = [w for r in replies for w in r.split()]
    reference = " ".join(words[::2])
    pairs, _ = label_pairs("q", reference, replies)
    assert pairs  # the rule kept some: the check below is not vacuous
    check_labels("q", reference, replies, pairs, 0.0)
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    back, _ = read_preferences(path, dedup=False)
    assert [(p.chosen, p.rejected) for p in back] == [(p.chosen, p.rejected) for p in pairs]
    assert set(json.loads(path.read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}


def test_betas_scale_with_the_reward_spread():
    assert betas_for(0.1) == (0.04, 0.14, 0.4)
    assert betas_for(0.007) == (0.0028, 0.0098, 0.028)
    with pytest.raises(ValueError, match="sd"):
        betas_for(0.0)


def test_rl_prompts_are_scored_against_their_own_references(tmp_path):
    prompts = heldout_prompts(4)
    refs = references(prompts)
    answers = {r.user: r.answer for r in reference_prompts("heldout")}
    assert refs == [answers[p.messages[-1]["content"]] for p in prompts]
    for step in (2, 10, 8):  # the last export by step, not by the order they were listed in
        (tmp_path / "train" / "rl-x" / "exports" / f"step-{step:08d}-ab").mkdir(parents=True)
    assert final_export(tmp_path).endswith("step-00000010-ab")
    with pytest.raises(FileNotFoundError, match="no export"):
        final_export(tmp_path / "none")
    q0 = {"rouge_l": 0.1, "greedy_rouge_l": 0.2, "mean_reward": 0.3}
    q1 = {"rouge_l": 0.4, "greedy_rouge_l": 0.5, "mean_reward": 0.6}
    row = tradeoff_rows([{"beta": 1.0, "quality": {"before": q0, "after": q1}}])[0]
    assert (row["rouge_l_before"], row["rouge_l_after"], row["sampled_reward_after"]) == (
        0.1,
        0.4,
        0.6,
    )
