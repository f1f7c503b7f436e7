"""Fill-in-the-middle transform (kilnlm.fim) and its place in the corpus build."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.fim import (
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SPECIALS,
    FIM_SUFFIX,
    FimConfig,
    FimSplit,
    encode_documents,
    fim_split,
    fim_text,
    infill_ids,
)
from kilnlm.shards import TokenShards
from kilnlm.tokenizer import Tokenizer

DOC = "def add(a, b):\n    return a + b\n"
TEXTS = [f"def f{i}(x):\n    return x * {i}\n# line {i % 7}\n" for i in range(4000)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS[:200], vocab_size=300, show_progress=False)


def strip_specials(text: str) -> str:
    for s in FIM_SPECIALS:
        text = text.replace(s, "")
    return text


def test_worked_example_psm_and_spm() -> None:
    split = FimSplit(prefix="def add(a, b):\n    ", middle="return a + b", suffix="\n", spm=False)
    assert "".join(split.pieces()) == (
        "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n<|fim_middle|>return a + b"
    )
    spm = FimSplit(split.prefix, split.middle, split.suffix, spm=True)
    assert "".join(spm.pieces()) == (
        "<|fim_suffix|>\n<|fim_prefix|>def add(a, b):\n    <|fim_middle|>return a + b"
    )


def test_drawn_split_is_a_permutation_of_the_document() -> None:
    cfg = FimConfig(rate=1.0, seed=3)
    split = fim_split(DOC, cfg)
    assert split is not None
    assert split.prefix + split.middle + split.suffix == DOC
    out = fim_text(DOC, cfg)
    assert sorted(strip_specials(out)) == sorted(DOC)
    assert Counter(out.count(s) for s in FIM_SPECIALS) == Counter({1: 3})
    assert (
        out.endswith(split.middle) and FIM_MIDDLE + split.middle == out[-len(split.middle) - 14 :]
    )


def test_rate_zero_is_identity(tok: Tokenizer) -> None:
    assert all(fim_text(t, FimConfig(rate=0.0)) == t for t in TEXTS[:100])
    assert encode_documents(TEXTS[:50], tok, FimConfig()) == tok.encode_batch(TEXTS[:50])


def test_rate_and_spm_share_are_honoured() -> None:
    """4000 documents: the transformed share is within 4.5 binomial standard deviations."""
    splits = [fim_split(t, FimConfig(rate=0.5, spm_rate=0.25, seed=1)) for t in TEXTS]
    done = [s for s in splits if s is not None]
    assert abs(len(done) / len(TEXTS) - 0.5) < 4.5 * (0.25 / len(TEXTS)) ** 0.5
    spm = sum(s.spm for s in done) / len(done)
    assert abs(spm - 0.25) < 4.5 * (0.25 * 0.75 / len(done)) ** 0.5
    assert all(s.prefix + s.middle + s.suffix == t for s, t in zip(splits, TEXTS, strict=True) if s)


def test_draws_depend_on_document_and_seed_only() -> None:
    cfg = FimConfig(rate=0.5, seed=7)
    forward = [fim_text(t, cfg) for t in TEXTS[:300]]
    backward = [fim_text(t, cfg) for t in reversed(TEXTS[:300])]
    assert forward == backward[::-1]
    assert forward != [fim_text(t, FimConfig(rate=0.5, seed=8)) for t in TEXTS[:300]]


def test_encoding_puts_special_ids_between_separately_encoded_pieces(tok: Tokenizer) -> None:
    cfg = FimConfig(rate=1.0, spm_rate=0.0, seed=3)
    split = fim_split(DOC, cfg)
    assert split is not None and not split.spm
    (ids,) = encode_documents([DOC], tok, cfg)
    pre, suf, mid = (tok.special_id(s) for s in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    assert ids == [
        pre,
        *tok.encode(split.prefix),
        suf,
        *tok.encode(split.suffix),
        mid,
        *tok.encode(split.middle),
    ]
    assert infill_ids(tok, split.prefix, split.suffix) == ids[: ids.index(mid) + 1]


def test_a_document_that_is_a_marker_string_stays_text(tok: Tokenizer) -> None:
    (ids,) = encode_documents([FIM_PREFIX], tok, FimConfig(rate=0.0))
    assert tok.special_id(FIM_PREFIX) not in ids


def test_config_rejects_rates_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"FimConfig\.rate"):
        FimConfig(rate=1.5)
    with pytest.raises(ValueError, match="fim_spm_rate"):
        CorpusConfig(fim_spm_rate=-0.1)


def test_corpus_build_applies_fim_to_train_only_and_eos_ends_each_middle(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"m{i}.py").write_text(
            "\n".join(f"def g{i}_{k}(x):\n    return x + {k}" for k in range(12))
        )
    base = dict(sources=[str(src)], heldout_fraction=0.2, min_chars=50, near_dup_threshold=1.0)
    plain = build_corpus(CorpusConfig(**base), tmp_path / "plain", 300, progress=False)
    fim = build_corpus(CorpusConfig(**base, fim_rate=0.5), tmp_path / "fim", 300, progress=False)
    assert fim.fingerprint != plain.fingerprint
    tok = Tokenizer.load(tmp_path / "fim" / "tokenizer.json")
    mid = tok.special_id(FIM_MIDDLE)
    train = np.asarray(TokenShards(tmp_path / "fim", "train").read(0, fim.splits["train"].n_tokens))
    heldout = TokenShards(tmp_path / "fim", "heldout")
    n_docs = fim.splits["train"].n_documents
    n_fim = int((train == mid).sum())
    assert 0 < n_fim < n_docs
    assert mid not in np.asarray(heldout.read(0, len(heldout)))
    # every document, transformed or not, is followed by <|eos|>: a middle ends with it
    assert int((train == tok.eos_id).sum()) == n_docs
    plain_heldout = TokenShards(tmp_path / "plain", "heldout")
    assert plain.splits["heldout"].n_documents == fim.splits["heldout"].n_documents
    assert len(plain_heldout) == len(heldout)


def test_fim_rate_flag_on_train_and_up() -> None:
    from kilnlm.cli import training, up

    for module in (training, up):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        module.register(sub)
        name = "train" if module is training else "up"
        args = parser.parse_args([name, "--fim-rate", "0.5"])
        assert module.job_from_args(args).corpus.fim_rate == 0.5
        args = parser.parse_args([name])
        assert module.job_from_args(args).corpus.fim_rate == 0.0
