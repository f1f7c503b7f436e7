"""The toy's π0: a small Transformer trained in-process on a fixed corpus of letter words.

The corpus is ``w:`` followed by a word over ``abcd`` and ``<|eos|>``, words drawn from a fixed
seeded distribution (``b`` common, ``a`` rare, 1–5 letters), so π0 is a known, lopsided prior
and the toy reward (which likes ``a``) has to pull against it.

Tokenizer: kilnlm's own byte-level BPE (``kilnlm.tokenizer``), trained on the toy corpus at the
minimum vocabulary (256 bytes + the special tokens, no merges). Every letter is then exactly one
id and text ↔ ids is one-to-one, which the restricted sampling and the reward (it reads text)
both rely on. The export is a normal kilnlm checkpoint (``checkpoint.save_pretrained``), so the
serving replicas load π0 like any other model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kilnlm import checkpoint
from kilnlm.model import ModelConfig, Transformer
from kilnlm.rl.toy import ToySpec
from kilnlm.tokenizer import MIN_VOCAB_SIZE, Tokenizer

ALPHABET = "abcd"
PROMPT = "w:"
MAX_LEN = 5
LETTER_WEIGHTS = (0.1, 0.45, 0.3, 0.15)
"""Corpus frequencies of a, b, c, d."""
LENGTH_WEIGHTS = (0.15, 0.3, 0.3, 0.15, 0.1)
"""Corpus frequencies of words of 1..5 letters."""


@dataclass(frozen=True)
class ToyTrainConfig:
    """How π0 is made: deterministic for a given seed, a few seconds on one CPU core."""

    n_words: int = 256
    steps: int = 100
    lr: float = 1e-2
    seed: int = 0
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2

    def __post_init__(self) -> None:
        for name in ("n_words", "steps", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class ToyPolicy:
    """π0 with the tokenizer and the spec that describe what it may sample."""

    model: Transformer
    tokenizer: Tokenizer
    spec: ToySpec

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return self.tokenizer.decode(ids)


def toy_words(n: int, seed: int) -> list[str]:
    """The fixed corpus: n words drawn with ``random.Random(seed)`` (no global RNG)."""
    rng = random.Random(seed)
    lengths = rng.choices(range(1, len(LENGTH_WEIGHTS) + 1), LENGTH_WEIGHTS, k=n)
    return ["".join(rng.choices(ALPHABET, LETTER_WEIGHTS, k=k)) for k in lengths]


def toy_tokenizer(words: list[str]) -> Tokenizer:
    """Byte-level BPE at the minimum vocabulary: every letter (every byte) is one id."""
    return Tokenizer.train([PROMPT + w for w in words], vocab_size=MIN_VOCAB_SIZE, min_frequency=2)


def toy_spec(tokenizer: Tokenizer) -> ToySpec:
    alphabet = tuple(tokenizer.encode(letter)[0] for letter in ALPHABET)
    return ToySpec(alphabet, tokenizer.eos_id, tuple(tokenizer.encode(PROMPT)), MAX_LEN)


def _rows(words: list[str], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (prompt + word + eos, eos-padded); only word and eos positions score."""
    prompt = tokenizer.encode(PROMPT)
    width = len(prompt) + max(len(w) for w in words) + 1
    x = torch.full((len(words), width), tokenizer.eos_id)
    y = torch.full((len(words), width), -100)
    for i, w in enumerate(words):
        ids = [*prompt, *tokenizer.encode(w), tokenizer.eos_id]
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, len(prompt) - 1 : len(ids) - 1] = torch.tensor(ids[len(prompt) :])
    return x, y


def train_toy_policy(cfg: ToyTrainConfig | None = None) -> ToyPolicy:
    """Train π0 on the toy corpus, full batch with AdamW; same config, same weights."""
    cfg = cfg or ToyTrainConfig()
    words = toy_words(cfg.n_words, cfg.seed)
    tokenizer = toy_tokenizer(words)
    model_cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=16,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
    )
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    x, y = _rows(words, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    for _ in range(cfg.steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ToyPolicy(model.eval(), tokenizer, toy_spec(tokenizer))


def export_toy_policy(policy: ToyPolicy, path: str | Path, **manifest_fields: object) -> Path:
    """Write π0 as a kilnlm export (weights, config, tokenizer, manifest with the toy's spec)."""
    return checkpoint.save_pretrained(
        policy.model, path, tokenizer=policy.tokenizer, toy=policy.spec.to_dict(), **manifest_fields
    )


__all__ = [
    "ALPHABET",
    "MAX_LEN",
    "PROMPT",
    "ToyPolicy",
    "ToyTrainConfig",
    "export_toy_policy",
    "toy_spec",
    "toy_tokenizer",
    "toy_words",
    "train_toy_policy",
]
