"""``kiln rl --defaults``'s pure parts: the held-out prompts it picks and the exports it finds."""

from __future__ import annotations

import pytest
from serving_utils import make_checkpoint

from kilnlm.checkpoint import load, load_tokenizer, save_pretrained
from kilnlm.posttrain.defaults import default_sets
from kilnlm.posttrain.reward import reward_head_field
from kilnlm.rl.defaults import PROMPT_KINDS, find_exports, heldout_prompts, tradeoff_rows


def test_heldout_prompts_alternate_the_judged_kinds_and_were_never_trained_on():
    prompts = heldout_prompts(8)
    labels = [p.label() for p in prompts]
    assert len(prompts) == 8 and len(set(labels)) == 8
    assert [next(i for i, k in enumerate(PROMPT_KINDS) if s.startswith(k)) for s in labels] == [
        0,
        1,
    ] * 4
    sets = default_sets()
    trained = {c[0]["content"] for c in sets.train_chats}
    held = {c[0]["content"] for c in sets.heldout_chats}
    assert set(labels) <= held and not set(labels) & trained
    for p in prompts:  # a chat of one user turn: rendered with the chat template
        assert p.messages is not None and [m["role"] for m in p.messages] == ["user"]
    assert heldout_prompts(8) == prompts  # the same every run


def test_find_exports_needs_an_sft_and_a_reward_model(tmp_path):
    sft = make_checkpoint(tmp_path / "sft")
    with pytest.raises(FileNotFoundError, match="make posttrain"):
        find_exports(tmp_path)
    make_checkpoint(tmp_path / "reward")
    with pytest.raises(ValueError, match="no reward_head"):
        find_exports(tmp_path)
    tok = load_tokenizer(sft)
    head = reward_head_field(tok.special_id("<|mask|>"))
    save_pretrained(load(sft), tmp_path / "rm", tokenizer=tok, reward_head=head)
    (tmp_path / "reward").rename(tmp_path / "plain")
    (tmp_path / "rm").rename(tmp_path / "reward")
    assert find_exports(tmp_path) == (str(sft.absolute()), str((tmp_path / "reward").absolute()))


def test_tradeoff_rows_read_before_and_after():
    summary = {
        "beta": 0.01,
        "before": {"mean_reward": 2.9, "kl_estimate": 0.0, "version": 1},
        "after": {"mean_reward": 3.0, "kl_estimate": 0.4, "version": 5},
    }
    assert tradeoff_rows([summary]) == [
        {"beta": 0.01, "reward_before": 2.9, "kl_before": 0.0, "reward_after": 3.0,
         "kl_after": 0.4, "final_version": 5}
    ]  # fmt: skip
