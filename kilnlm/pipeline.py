"""The in-process main job: corpus → tokenizer → train → evaluate against an n-gram → sample.

This is what ``kiln run`` (and ``make run``) executes on one machine without Ray. Every stage is
a call into the library; this module only sequences them, times them, and prints what a person
wants to see: held-out perplexity and bits per byte of the neural model beside a count n-gram
baseline on the same tokens, then generations under different sampling settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kilnlm.checkpoint import export_content_addressed, save_pretrained
from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.eval import EvalResult, evaluate
from kilnlm.generate import generate
from kilnlm.model import ModelConfig, Transformer
from kilnlm.ngram import Baseline, best_baseline
from kilnlm.sampling import SamplingParams
from kilnlm.shards import TokenShards, get_batch, sample_split
from kilnlm.tokenizer import Tokenizer
from kilnlm.train import TrainConfig, train

PROMPTS = ("def read_config(path):\n", 'class Queue:\n    """', "import os\nimport sys\n\n")

SAMPLING_SETTINGS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=48),
    "T=0.7 top_p=0.9": SamplingParams(temperature=0.7, top_p=0.9, max_tokens=48, seed=0),
    "T=1.0 top_k=40": SamplingParams(temperature=1.0, top_k=40, max_tokens=48, seed=0),
    "beam 4": SamplingParams(temperature=0.0, num_beams=4, max_tokens=32),
}


@dataclass
class LocalRunConfig:
    """Settings of the in-process job; the defaults train ~6 minutes on 2 CPU cores (900 steps of
    2K tokens: the fewest that beat the best Kneser-Ney order on the default corpus's held-out
    split by a clear margin; 600 only tie it)."""

    out_dir: str = "runs/local"
    """Corpus, tokenizer, exported model and summary.json go here (the corpus is reused)."""
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(max_bytes=6_000_000))
    vocab_size: int = 4096
    preset: str = "tiny-3m"
    """Model preset (kilnlm.model.PRESETS); vocab_size and block_size follow the tokenizer / seq_len."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=50,
            max_steps=900,
            batch_size=16,
            seq_len=128,
            weight_decay=0.1,
            eval_every=300,
            eval_batches=4,
        )
    )
    time_budget_s: float = 540.0
    """Stop training after this many seconds even if max_steps is not reached (a safety on a
    slow machine: the cosine is scheduled by steps, so a cut run ends before its decay)."""
    ngram_orders: tuple[int, ...] = (2, 3, 4, 5)
    """The baseline is fitted at each order and reported at its best held-out order (fair to it)."""
    eval_tokens: int = 200_000
    """Held-out tokens scored: all of the split when it fits, else this many spread over it
    (kilnlm.shards.sample_split, as the orchestrator's gate)."""
    eval_stride: float = 0.5
    """Scoring windows advance by this fraction of seq_len (as the orchestrator's gate): every
    token after the first window is predicted from at least half a context."""
    threads: int = 0
    """torch threads; 0 = all cores."""

    def __post_init__(self) -> None:
        self.ngram_orders = tuple(self.ngram_orders)  # TOML and JSON give lists
        checks = [
            ("time_budget_s", self.time_budget_s > 0, "> 0"),
            ("eval_tokens", self.eval_tokens >= 2, ">= 2"),
            ("eval_stride", 0 < self.eval_stride <= 1, "in (0, 1]"),
            ("threads", self.threads >= 0, ">= 0 (0: all cores)"),
            ("ngram_orders", all(k >= 1 for k in self.ngram_orders), "orders >= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(
                    f"LocalRunConfig.{name} must be {want}, got {getattr(self, name)!r}"
                )


def run(cfg: LocalRunConfig, progress: bool = True) -> dict[str, Any]:
    """Run every stage and return the summary (also written to out_dir/summary.json)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    manifest = build_corpus(cfg.corpus, out / "corpus", cfg.vocab_size, progress=progress)
    tok = Tokenizer.load(out / "corpus")
    train_ids, heldout_ids = (
        TokenShards(out / "corpus", "train"),
        TokenShards(out / "corpus", "heldout"),
    )
    timings["corpus_s"] = time.perf_counter() - t
    _say(f"corpus: {manifest.stats.summary()}")
    _say(f"tokens: train {len(train_ids):,}  held-out {len(heldout_ids):,}  vocab {tok.vocab_size}")

    model, steps, timings["train_s"] = _train(cfg, tok, train_ids, progress)
    heldout = sample_split(heldout_ids, cfg.eval_tokens).astype(np.int64)
    n_bytes = tok.count_bytes(heldout.tolist())

    t = time.perf_counter()
    L = cfg.train.seq_len
    stride = max(1, int(L * cfg.eval_stride))
    neural = evaluate(model, heldout, n_bytes=n_bytes, seq_len=L, stride=stride)
    ngram = _ngram(cfg, train_ids, heldout, n_bytes)
    timings["eval_s"] = time.perf_counter() - t
    _print_comparison(neural, ngram)

    fields = {"step": steps, "tokens_seen": steps * cfg.train.tokens_per_step}
    export = _export(model, tok, out, version=1, heldout_loss=neural.mean_nll, **fields)
    samples = _samples(model, tok)
    summary = {
        "neural": asdict(neural),
        "ngram": asdict(ngram.result),
        "ngram_order": ngram.order,
        "ngram_by_order": {str(k): asdict(r) for k, r in ngram.by_order.items()},
        "beats_ngram": neural.perplexity < ngram.result.perplexity,
        "steps": steps,
        "params": model.num_params(),
        "timings": timings,
        "samples": samples,
        "export": str(export),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"exported model to {export}; summary in {out / 'summary.json'}")
    return summary


def _train(
    cfg: LocalRunConfig, tok: Tokenizer, shards: TokenShards, progress: bool
) -> tuple[Transformer, int, float]:
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model_cfg = ModelConfig.from_preset(
        cfg.preset, vocab_size=tok.vocab_size, block_size=tc.seq_len
    )
    model = Transformer(model_cfg)
    _say(
        f"model: {cfg.preset}, {model.num_params() / 1e6:.2f}M parameters, "
        f"{model.flops_per_token(tc.seq_len) / 1e6:.1f} MFLOPs/token"
    )
    deadline = time.monotonic() + cfg.time_budget_s
    start = time.perf_counter()

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(shards, tc.batch_size, tc.seq_len, step=i, seed=tc.seed)

    metrics = train(
        model, tc, batch, progress=progress, callback=lambda m: time.monotonic() > deadline
    )
    model.eval()
    return model, len(metrics), time.perf_counter() - start


def _ngram(
    cfg: LocalRunConfig, train_ids: TokenShards, heldout: np.ndarray, n_bytes: int
) -> Baseline:
    train = train_ids.read(0, len(train_ids))
    return best_baseline(train, heldout, n_bytes, train_ids.vocab_size, cfg.ngram_orders)


def _print_comparison(neural: EvalResult, ngram: Baseline) -> None:
    _say("held-out evaluation (same tokens, same tokenizer):")
    _say(f"  {'model':<22}{'perplexity':>12}{'bits/byte':>12}{'mean NLL':>10}")
    for name, r in (("transformer", neural), (ngram.name, ngram.result)):
        _say(f"  {name:<22}{r.perplexity:>12.2f}{r.bits_per_byte:>12.3f}{r.mean_nll:>10.3f}")
    verdict = "beats" if neural.perplexity < ngram.result.perplexity else "does NOT beat"
    orders = ", ".join(str(k) for k in ngram.by_order)
    _say(f"  the transformer {verdict} the best n-gram (orders {orders} tried)")


def _export(model: Transformer, tok: Tokenizer, out: Path, **fields: Any) -> Path:
    """``out/model``, or beside it under a name that says its content when ``out/model`` holds
    another run's export: exports are never overwritten (a registered version may use it)."""
    try:
        return save_pretrained(model, out / "model", tokenizer=tok, **fields)
    except FileExistsError:
        state = model.state_dict()
        return export_content_addressed(state, model.config, out, "model", tok, **fields)


def _samples(model: Transformer, tok: Tokenizer) -> list[dict[str, str]]:
    out = []
    for setting, params in SAMPLING_SETTINGS.items():
        prompt = PROMPTS[len(out) % len(PROMPTS)]
        result = generate(model, tok.encode(prompt), params, eos_id=tok.eos_id, decode=tok.decode)
        text = result.text if result.text is not None else tok.decode(result.token_ids)
        _say(f"\n--- {setting} ---\n{prompt}{text}")
        out.append({"setting": setting, "prompt": prompt, "completion": text})
    return out


def _say(line: str) -> None:
    print(line, flush=True)
