"""bench/serving.py's shared setup: the kernels compared, one export of a random model, the
prompts every path computes, and the engine configuration every in-process run uses."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    export_random_model,
    log_uniform,
    stdlib_texts,
    text_prompt,
    token_stream,
    train_tokenizer,
)

from kilnlm import checkpoint
from kilnlm.engine import EngineConfig
from kilnlm.model import Transformer
from kilnlm.sampling import SamplingParams
from kilnlm.tokenizer import Tokenizer

KERNELS = {"invariant": True, "library": False}  # name -> EngineConfig.batch_invariant
HF = "hf generate (padded batch)"
SHAPES = {"llama-4x256": ("tiny-3m", {"n_embd": 256, "n_head": 4, "n_kv_head": 4})}
"""Shapes beside kilnlm's presets: issue 16's case, a Llama of 4 layers x 256 (5.3 M parameters
with a 4096-token vocabulary), is tiny-3m widened to 256 with multi-head attention."""


# --------------------------------------------------------------------------------------------
# Setup: tokenizer, one export, prompts


@dataclass
class Setup:
    path: Path
    tokenizer: Tokenizer
    model: Transformer
    corpus_ids: list[int]
    prompts: list[tuple[str, list[int]]]
    """Part 1's prompts: (text the gateway gets, the exact ids every path computes)."""


def build(args: argparse.Namespace, root: Path) -> Setup:
    texts = stdlib_texts(2_000_000)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    preset, shape = SHAPES.get(args.preset, (args.preset, {}))
    path = export_random_model(
        root / "model", preset, tokenizer, args.seed, block_size=args.context, **shape
    )
    corpus_ids = token_stream(tokenizer, texts[::-1], 200_000)  # other files than the BPE's head
    rng = random.Random(args.seed)
    prompts, start = [], 0
    for _ in range(args.streams):
        n = log_uniform(rng, *args.prompt)
        prompts.append(text_prompt(tokenizer, corpus_ids[start : start + n]))
        start += n
    model = checkpoint.load(path).eval()
    return Setup(path, tokenizer, model, corpus_ids[start:], prompts)


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    return EngineConfig(
        kv_budget_mib=args.kv_mib, max_num_seqs=64, max_tokens_limit=args.context, **overrides
    )


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)
