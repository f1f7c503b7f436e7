"""Post-training pieces in one process (no Ray): data formats, the embedded sets, and each
objective's loss checked against a direct computation on a tiny real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kilnlm.model import ModelConfig, Transformer
from kilnlm.posttrain.data import DataFormatError, read_chats, read_preferences
from kilnlm.posttrain.defaults import CORRUPTIONS, corrupt, default_sets, parses
from kilnlm.posttrain.dpo import (
    DPOLoss,
    collate_dpo,
    implicit_figures,
    pair_logps,
    sequence_logps,
)
from kilnlm.posttrain.plugin import batch_rows
from kilnlm.posttrain.reward import RewardLoss, bradley_terry, encode_pairs, pairwise_figures
from kilnlm.posttrain.sft import collate, encode_sft, rouge_l
from kilnlm.tokenizer import Tokenizer
from kilnlm.train import IGNORE_INDEX, TOKEN_LOSS, TrainConfig


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus) -> Tokenizer:
    return Tokenizer.load(tiny_corpus)


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-1m", vocab_size=tokenizer.vocab_size, block_size=128)
    return Transformer(cfg).eval()


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- data formats ------------------------------------------------------------------------------


def test_chat_jsonl_keeps_good_lines_and_counts_every_skip(tmp_path: Path) -> None:
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"messages": turn}),
            "",
            json.dumps({"messages": turn}),  # duplicate
            json.dumps({"messages": turn[:1]}),  # no assistant turn
        ],
    )
    chats, stats = read_chats(f)
    assert chats == [turn]
    assert stats.to_dict() == {
        "files": 1,
        "kept": 1,
        "skipped": {"blank": 1, "duplicate": 1, "no_assistant_turn": 1},
    }


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"msgs": []}', "missing 'messages'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ],
)
def test_a_bad_chat_line_names_the_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    good = json.dumps({"messages": [{"role": "assistant", "content": "ok"}]})
    f = write(tmp_path / "chat.jsonl", [good, good.replace("ok", "fine"), line])
    with pytest.raises(DataFormatError, match=rf"chat\.jsonl:3: .*{problem}"):
        read_chats(f)


def test_preferences_from_a_folder_in_both_trl_shapes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "b.jsonl", [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})])
    conversational = {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    write(
        tmp_path / "sub" / "a.jsonl",
        [json.dumps(conversational), json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"})],
    )
    pairs, stats = read_preferences(tmp_path)
    assert [(len(p.prompt), p.chosen, p.rejected) for p in pairs] == [(1, "a", "b"), (2, "a", "b")]
    assert stats.files == 2 and stats.skipped == {"chosen_equals_rejected": 1}
    every_line, _ = read_preferences(tmp_path, dedup=False)  # scoring: one entry per line
    assert len(every_line) == 3
    write(tmp_path / "c.jsonl", [json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"})])
    with pytest.raises(DataFormatError, match=r"c\.jsonl:1: 'chosen' must be a string"):
        read_preferences(tmp_path)


# ---- embedded defaults -------------------------------------------------------------------------


def test_default_sets_split_by_module_with_checkable_preferences() -> None:
    sets = default_sets()
    assert sets.summary() == default_sets().summary()  # deterministic
    assert len(sets.train_chats) > 500 and len(sets.heldout_chats) > 50
    assert len(sets.train_pairs) > 300 and len(sets.heldout_pairs) > 40
    held = set(sets.heldout_modules)
    assert held and all(p.group in held for p in sets.heldout_pairs)
    assert not any(p.group in held for p in sets.train_pairs)
    train_answers = {c[-1]["content"] for c in sets.train_chats}
    assert not train_answers & {c[-1]["content"] for c in sets.heldout_chats}
    code = [
        p
        for p in sets.train_pairs + sets.heldout_pairs
        if p.prompt[0]["content"].startswith("Write")
    ]
    assert len(code) > 50 and all(parses(p.chosen) and not parses(p.rejected) for p in code)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_breaks_a_function(kind: str) -> None:
    src = "def f(a, b):\n    x = (a + b)\n    return x * 2"
    assert parses(src) and not parses(corrupt(src, kind))


# ---- batches -----------------------------------------------------------------------------------


def test_batch_rows_are_a_pure_function_disjoint_across_ranks_and_cover_each_epoch() -> None:
    n, b, world = 10, 2, 2
    rows = [batch_rows(n, b, i, r, world, seed=3) for i in range(5) for r in range(world)]
    assert sorted(x for r in rows[:5] for x in r) == list(range(n))  # the first epoch, once each
    assert batch_rows(n, b, 3, 1, world, seed=3) == rows[7]
    assert batch_rows(n, b, 3, 1, world, seed=4) != rows[7]


# ---- SFT ---------------------------------------------------------------------------------------


def test_sft_scores_assistant_tokens_and_their_eos_only(tokenizer: Tokenizer, model) -> None:
    """The loss the worker trains on (TOKEN_LOSS on collate's batch) counts exactly the assistant
    contents and one <|eos|> per assistant turn; a token after the last assistant turn (a trailing
    user turn, which cannot affect earlier positions) leaves it bit-identical."""
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two and two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three and three?"},
        {"role": "assistant", "content": "Six."},
        {"role": "user", "content": "Thanks, goodbye."},
    ]
    ex = encode_sft(tokenizer, chat)
    scored = [t for t in ex.y if t != IGNORE_INDEX]
    eos = tokenizer.eos_id
    assert scored == [*tokenizer.encode("Four."), eos, *tokenizer.encode("Six."), eos]
    batch = collate([ex], tokenizer.pad_id)
    with torch.no_grad():
        loss = TOKEN_LOSS.loss_sum(model, batch)
        changed = [{**m} for m in chat]
        changed[-1]["content"] = "Thanks, farewell!"
        loss_changed = TOKEN_LOSS.loss_sum(model, collate([encode_sft(tokenizer, changed)], 0))
        assert torch.equal(loss, loss_changed)
        # ...while a change inside an assistant turn does move it
        changed[2]["content"] = "Five."
        other = TOKEN_LOSS.loss_sum(model, collate([encode_sft(tokenizer, changed)], 0))
        assert not torch.equal(loss, other)
        # and it is the plain sum of -log p over those positions
        x, y = batch
        logp = torch.log_softmax(model(x), -1)[0]
        ref = -sum(logp[t, y[0, t]] for t in range(y.size(1)) if y[0, t] != IGNORE_INDEX)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_rouge_l_worked_example() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5 words)
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "a b") == 1.0


# ---- reward model and DPO ------------------------------------------------------------------------


def pairs_of(tokenizer: Tokenizer) -> list:
    return encode_pairs(tokenizer, default_sets().heldout_pairs[:6], 128, {})


def test_reward_loss_is_bradley_terry_at_the_last_token(tokenizer: Tokenizer, model) -> None:
    from kilnlm.posttrain.reward import collate_pairs

    examples = pairs_of(tokenizer)
    head = tokenizer.mask_id
    ids, last = collate_pairs(examples, tokenizer.pad_id)
    with torch.no_grad():
        got = RewardLoss(head).loss_sum(model, (ids, last))
        r = torch.stack(
            [model(torch.tensor([seq]))[0, -1, head] for seq in [e.chosen for e in examples]]
            + [model(torch.tensor([seq]))[0, -1, head] for seq in [e.rejected for e in examples]]
        )
    n = len(examples)
    want = -torch.nn.functional.logsigmoid(r[:n] - r[n:]).sum()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert bradley_terry(torch.zeros(4)).tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_loss_is_log2_at_the_reference_and_uses_reply_tokens_only(tokenizer, model) -> None:
    examples = pairs_of(tokenizer)
    refs = pair_logps(model, examples, tokenizer.pad_id)
    x, y, ref = collate_dpo(examples, refs, tokenizer.pad_id)
    with torch.no_grad():
        loss = DPOLoss(beta=0.1).loss_sum(model, (x, y, ref)) / len(examples)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
        logps = sequence_logps(model, x, y)
    e = examples[0]  # brute force: the reply tokens' log-probs, each given everything before it
    seq = torch.tensor([e.chosen])
    logp = torch.log_softmax(model(seq), -1)[0]
    want = sum(logp[t - 1, e.chosen[t]] for t in range(e.prompt_len, len(e.chosen)))
    torch.testing.assert_close(logps[0], want, rtol=1e-4, atol=1e-4)
    assert (y[: len(examples)] != IGNORE_INDEX).sum(1)[0] == len(e.chosen) - e.prompt_len


def test_train_config_knows_the_post_training_objectives() -> None:
    for kind in ("sft", "reward", "dpo"):
        assert TrainConfig(objective=kind).objective == kind
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="ppo")


def test_prepare_reads_user_files_splits_them_and_counts_skips(tokenizer, model, tmp_path) -> None:
    from kilnlm.checkpoint import save_pretrained
    from kilnlm.posttrain.job import PostTrainConfig, prepare

    parent = save_pretrained(model, tmp_path / "parent", tokenizer, version=3)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(60)
    ]
    long = {
        "messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]
    }
    data = write(tmp_path / "chat.jsonl", [json.dumps(c) for c in [*chats, chats[0], long]])
    cfg = PostTrainConfig(
        objective="sft", parent=str(parent), out=str(tmp_path / "out"), data=str(data)
    )
    prep = prepare(cfg, seq_len=64, batch_size=4, seed=0)
    summary = prep.data_summary
    assert summary["skipped"] == {"duplicate": 1} and summary["skipped_too_long"] == 1
    assert summary["train"] + summary["heldout"] == 61 and 0 < summary["heldout"] < 20
    assert len(prep.plugin.train) == summary["train"] - 1  # the long one was in train
    assert prep.plugin.manifest_fields()["parent_version"] == 3
    pairs = write(
        tmp_path / "p.jsonl",
        [json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) for i in range(30)],
    )
    cfg = PostTrainConfig(
        objective="dpo", parent=str(parent), out=str(tmp_path / "o"), data=str(pairs)
    )
    prep = prepare(cfg, seq_len=64, batch_size=4, seed=0)
    assert len(prep.plugin.train_refs) == len(prep.plugin.train) > 0
    assert prep.plugin.loss.beta == 0.1


def test_pair_figures_count_a_tie_as_half() -> None:
    # Reward model: one pair ranked right, one tie, one wrong.
    assert pairwise_figures([(2.0, 1.0), (0.5, 0.5), (0.0, 3.0)])["accuracy"] == pytest.approx(0.5)
    # DPO, beta 0.1: pair 1's implicit margin is 0.1 * ((-1 + 2) - (-3 + 2)) = 0.2, pair 2's is 0.
    f = implicit_figures([(-1.0, -3.0), (-2.0, -2.0)], [(-2.0, -2.0), (-2.0, -2.0)], beta=0.1)
    assert f["implicit_accuracy"] == pytest.approx(0.75)
    assert f["implicit_margin"] == pytest.approx(0.1)
    assert f["policy_logp_accuracy"] == pytest.approx(0.75)
    assert f["reference_logp_accuracy"] == pytest.approx(0.5)
