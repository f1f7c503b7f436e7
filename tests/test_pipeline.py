"""`kiln run`, the in-process job, end to end on a small stdlib corpus: every stage runs, the
neural model and the n-gram baseline are scored on the same held-out tokens, and what it
exports is a model that loads and generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kilnlm
from kilnlm.data import CorpusConfig
from kilnlm.eval import evaluate
from kilnlm.ngram import NGramModel
from kilnlm.pipeline import PROMPTS, SAMPLING_SETTINGS, LocalRunConfig, run
from kilnlm.shards import TokenShards, sample_split
from kilnlm.tokenizer import Tokenizer
from kilnlm.train import TrainConfig


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[LocalRunConfig, dict]:
    cfg = LocalRunConfig(
        out_dir=str(tmp_path_factory.mktemp("local")),
        corpus=CorpusConfig(max_bytes=300_000, heldout_fraction=0.1),
        vocab_size=512,
        preset="test-1m",
        train=TrainConfig(
            lr=3e-3, warmup_steps=2, max_steps=20, batch_size=4, seq_len=64, eval_every=0
        ),
        ngram_orders=(1, 2, 3),
        eval_tokens=4000,
    )
    return cfg, run(cfg, progress=False)


def test_the_summary_scores_both_models_on_the_same_held_out_tokens(finished) -> None:
    cfg, summary = finished
    out = Path(cfg.out_dir)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == cfg.train.max_steps
    corpus = out / "corpus"
    tok, train, held = (
        Tokenizer.load(corpus),
        TokenShards(corpus, "train"),
        TokenShards(corpus, "heldout"),
    )
    assert len(held) > cfg.eval_tokens  # so the budget is spread over the split
    ids = sample_split(held, cfg.eval_tokens).astype(np.int64)
    assert len(ids) == cfg.eval_tokens
    n_bytes = tok.count_bytes(ids.tolist())
    train_ids = train.read(0, len(train)).astype(np.int64)
    ppl = {
        k: NGramModel(k, train.vocab_size).fit(train_ids).evaluate(ids, n_bytes).perplexity
        for k in cfg.ngram_orders
    }
    best = min(ppl, key=ppl.__getitem__)
    assert summary["ngram_order"] == best
    assert summary["ngram"]["perplexity"] == pytest.approx(ppl[best])
    assert sorted(int(k) for k in summary["ngram_by_order"]) == list(cfg.ngram_orders)
    model = kilnlm.load(summary["export"])
    neural = evaluate(model, ids, n_bytes=n_bytes, seq_len=64, stride=32)  # eval_stride 0.5
    assert summary["neural"]["perplexity"] == pytest.approx(neural.perplexity, rel=1e-5)
    assert summary["neural"]["tokens"] == summary["ngram"]["tokens"] == len(ids) - 1
    assert summary["beats_ngram"] == (neural.perplexity < ppl[best])


def test_it_prints_both_models_with_bits_per_byte_and_samples_each_setting(
    finished, capsys
) -> None:
    cfg, summary = finished
    assert [s["setting"] for s in summary["samples"]] == list(SAMPLING_SETTINGS)
    assert all(s["prompt"] in PROMPTS for s in summary["samples"])
    run(cfg, progress=False)  # the corpus is reused; the printed report is the same shape
    printed = capsys.readouterr().out
    assert "bits/byte" in printed
    assert "transformer" in printed and "-gram Kneser-Ney" in printed
    assert "the best n-gram (orders 1, 2, 3 tried)" in printed


@pytest.mark.parametrize(
    ("field", "value"),
    [("time_budget_s", 0), ("eval_tokens", 1), ("eval_stride", 0), ("ngram_orders", (0, 2))],
)
def test_bad_settings_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"LocalRunConfig.{field} "):
        LocalRunConfig(**{field: value})


def test_a_second_run_into_the_same_folder_never_overwrites_the_first_export(
    finished, tmp_path
) -> None:
    import shutil
    from dataclasses import replace

    cfg, _ = finished
    shutil.copytree(cfg.out_dir, tmp_path / "local")  # corpus and export of the first run
    first = tmp_path / "local" / "model"
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    again = replace(cfg, out_dir=str(tmp_path / "local"), train=replace(cfg.train, max_steps=10))
    other = Path(run(again, progress=False)["export"])
    assert other != first and other.parent == first.parent and other.name.startswith("model-")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert kilnlm.load(other).config == kilnlm.load(first).config
