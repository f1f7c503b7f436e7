"""Fill-in-the-middle: teach a left-to-right model to write the middle of a document.

A document is cut at two character positions drawn uniformly (Bavarian et al. 2022, "Efficient
Training of Language Models to Fill in the Middle") into prefix, middle and suffix, and the
pieces are rearranged so the middle comes last::

    PSM  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|eos|>
    SPM  <|fim_suffix|> suffix <|fim_prefix|> prefix <|fim_middle|> middle <|eos|>

The ``<|eos|>`` is the one ``kilnlm.data.pack_split`` writes after every document, so a model
learns to stop once the middle is written; inference builds the PSM prompt (``infill_ids``) and
generates until ``<|eos|>``. Each piece is encoded on its own (the specials are ids, never text a
document could forge). Whether a document is transformed, where it is cut and which order it gets
are drawn from a generator seeded by ``(seed, the document's text)``: the same corpus comes out
of every build, in any document order, so a resumed run reads the very data it read before.

FIM is applied when the corpus is built (``CorpusConfig.fim_rate``), to the train split only: the
cut is on characters, and a packed token stream no longer has the text; re-encoding windows at
batch time would put the tokenizer in the training loop and change window lengths. The held-out
split stays plain, so held-out perplexity stays the left-to-right figure it always was.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from kilnlm.tokenizer import Tokenizer

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
FIM_SPECIALS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)


@dataclass(frozen=True)
class FimConfig:
    """How many documents are rearranged and how."""

    rate: float = 0.0
    """Share of documents transformed (each drawn on its own); 0 = off, 0.5 the usual rate."""
    spm_rate: float = 0.5
    """Share of the transformed documents put in suffix–prefix–middle order (the rest PSM)."""
    seed: int = 0
    """Mixed with each document's text into its generator."""

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FimConfig.{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class FimSplit:
    """One document cut in three: ``prefix + middle + suffix`` is the document."""

    prefix: str
    middle: str
    suffix: str
    spm: bool

    def pieces(self) -> list[str]:
        """The training order, specials as their marker strings."""
        if self.spm:
            return [FIM_SUFFIX, self.suffix, FIM_PREFIX, self.prefix, FIM_MIDDLE, self.middle]
        return [FIM_PREFIX, self.prefix, FIM_SUFFIX, self.suffix, FIM_MIDDLE, self.middle]


def document_rng(text: str, seed: int) -> random.Random:
    """A generator that depends on the document and the seed only (not on its position)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8)
    digest.update(seed.to_bytes(8, "little", signed=True))
    return random.Random(int.from_bytes(digest.digest(), "little"))


def fim_split(text: str, cfg: FimConfig) -> FimSplit | None:
    """The document's cut and order, or None when this document stays left to right."""
    if cfg.rate == 0.0:
        return None
    rng = document_rng(text, cfg.seed)
    if rng.random() >= cfg.rate:
        return None
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return FimSplit(text[:i], text[i:j], text[j:], spm=rng.random() < cfg.spm_rate)


def fim_text(text: str, cfg: FimConfig) -> str:
    """The transformed document as a string with the marker texts (for reading and tests)."""
    split = fim_split(text, cfg)
    return text if split is None else "".join(split.pieces())


def encode_documents(texts: Sequence[str], tok: Tokenizer, cfg: FimConfig) -> list[list[int]]:
    """Token ids of each document, FIM-transformed at ``cfg.rate``; one batched encode call.

    A transformed document's pieces alternate special, text, special, text, ...: the parity says
    which is which, so a document whose text happens to equal a marker is still encoded as text.
    """
    docs = [_marked_pieces(t, cfg) for t in texts]
    encoded = iter(tok.encode_batch([s for doc in docs for s, special in doc if not special]))
    return [
        [i for s, special in doc for i in ([tok.special_id(s)] if special else next(encoded))]
        for doc in docs
    ]


def _marked_pieces(text: str, cfg: FimConfig) -> list[tuple[str, bool]]:
    """(piece, is_special) in training order."""
    split = fim_split(text, cfg)
    if split is None:
        return [(text, False)]
    return [(s, k % 2 == 0) for k, s in enumerate(split.pieces())]


def infill_ids(tok: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """The PSM prompt whose continuation is the middle (ended by ``<|eos|>``)."""
    return [
        tok.special_id(FIM_PREFIX),
        *tok.encode(prefix),
        tok.special_id(FIM_SUFFIX),
        *tok.encode(suffix),
        tok.special_id(FIM_MIDDLE),
    ]
