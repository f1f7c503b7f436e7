"""Helpers shared by bench/serving.py and bench/hotswap.py (not a benchmark itself).

Both benchmarks need the same things: a tokenizer trained on text every machine has (the
standard library), a random-init model of a preset exported like a trained one, prompts whose
token ids are known exactly, a local Ray cluster sized like the tests', a line saying how busy
the machine was, and percentiles.
"""

from __future__ import annotations

import math
import os
import platform
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from kilnlm.checkpoint import save_pretrained
from kilnlm.documents import default_corpus
from kilnlm.model import ModelConfig, Transformer
from kilnlm.tokenizer import Tokenizer


def machine_note() -> str:
    """Cores, load average and versions: wall-clock figures mean little without them."""
    one, five, fifteen = os.getloadavg()
    return (
        f"{os.cpu_count()} cores, load average {one:.1f} / {five:.1f} / {fifteen:.1f} "
        f"(1 / 5 / 15 min), torch {torch.__version__}, Python {platform.python_version()}"
    )


def stdlib_texts(max_bytes: int) -> list[str]:
    """The standard library's sources, capped: the same text on every machine with Python."""
    return [doc.text for doc in default_corpus(max_bytes=max_bytes)]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    return Tokenizer.train(texts, vocab_size=vocab_size)


def export_random_model(
    path: Path, preset: str, tokenizer: Tokenizer, seed: int, version: int = 1, **overrides: object
) -> Path:
    """A random-init model of ``preset`` (vocabulary from the tokenizer), exported like a real one.

    The EOS row of the output projection is zeroed. Why: a random model otherwise emits EOS at
    random places, and the paths compared would do different amounts of work; with EOS's logit
    pinned at 0 (below the largest of thousands of random logits) every request generates
    exactly max_tokens, on every path.
    """
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id].zero_()
    return save_pretrained(model, path, tokenizer=tokenizer, version=version)


def token_stream(tokenizer: Tokenizer, texts: Sequence[str], n_tokens: int) -> list[int]:
    """At least ``n_tokens`` ids of real text, to cut prompts from (no accidental sharing)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"the text gives {len(ids)} tokens, fewer than {n_tokens}; read more")
    return ids


def text_prompt(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """A text prompt and the exact ids the server will encode it to.

    Decoding a slice and encoding it again can merge differently at the edges, so the ids of
    record are the re-encoded ones: the gateway (text in) and the in-process peers (ids in)
    then see the very same tokens.
    """
    text = tokenizer.decode(list(ids))
    return text, tokenizer.encode(text)


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    """A length between low and high, short ones as likely per octave as long ones."""
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_local_ray(num_cpus: int, temp_dir: Path) -> None:
    """Local Ray with more logical CPUs than cores, one torch thread per process (as the tests).

    Ray resources are logical: replicas, gateway and orchestrator ask for fractions, and every
    process keeps torch to one thread so two cores are not oversubscribed.
    """
    import ray

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(temp_dir),
        runtime_env={"env_vars": env},
    )


def stop_local_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


__all__ = [
    "export_random_model",
    "log_uniform",
    "machine_note",
    "percentile",
    "start_local_ray",
    "stdlib_texts",
    "stop_local_ray",
    "text_prompt",
    "token_stream",
    "train_tokenizer",
]
