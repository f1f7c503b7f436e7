"""Single-line infill on held-out standard-library functions: the data and the quick model that
``bench/fim.py`` and ``tests/test_infill.py`` share.

The corpus is the stdlib's short functions (a few lines each, methods included), every one with
the module it came from; modules are split train / held-out by a hash of their path, so no
held-out function was trained on (nor any other function of its module). A case removes one
body line: prefix (every line before it, its newline included) and suffix (the newline after
it and every line after) are given, the line is to be written. Exact match compares the line
without trailing blanks; ``parses`` asks whether prefix + middle + suffix is valid Python.
"""

from __future__ import annotations

import ast
import hashlib
import random
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.documents import _stdlib_files
from kilnlm.model import ModelConfig, Transformer
from kilnlm.shards import TokenShards, get_batch
from kilnlm.train import TrainConfig, train


@dataclass(frozen=True)
class Function:
    module: str
    source: str


@dataclass(frozen=True)
class InfillCase:
    prefix: str
    middle: str
    suffix: str

    def splice(self, middle: str) -> str:
        return self.prefix + middle + self.suffix


def stdlib_functions(max_lines: int = 6) -> Iterator[Function]:
    """Undecorated functions of 2..max_lines lines from the stdlib's sources, dedented."""
    for path in _stdlib_files(include_tests=False):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            if node.end_lineno is None or not 2 <= node.end_lineno - node.lineno + 1 <= max_lines:
                continue
            source = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno])) + "\n"
            if source.isascii():
                yield Function(str(path), source)


def is_heldout_module(module: str, fraction: float = 0.1) -> bool:
    digest = hashlib.blake2b(Path(module).name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def split_functions(funcs: Sequence[Function]) -> tuple[list[Function], list[Function]]:
    train_funcs = [f for f in funcs if not is_heldout_module(f.module)]
    return train_funcs, [f for f in funcs if is_heldout_module(f.module)]


def infill_case(source: str, seed: int = 0) -> InfillCase | None:
    """Remove one non-blank body line (drawn from the source and seed); None if there is none."""
    lines = source.splitlines(keepends=True)
    body = [k for k in range(1, len(lines)) if lines[k].strip()]
    if not body:
        return None
    k = random.Random(f"{seed}:{source}").choice(body)
    middle = lines[k].rstrip("\n")
    return InfillCase("".join(lines[:k]), middle, "\n" + "".join(lines[k + 1 :]))


def exact_match(got: str, case: InfillCase) -> bool:
    return got.rstrip() == case.middle.rstrip()


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def write_sources(funcs: Sequence[Function], out_dir: Path, per_file: int = 1) -> Path:
    """The training functions as .py files of ``per_file`` functions each. One function per
    document by default: FIM draws one cut per document, so short documents give many FIM
    examples per token, and a held-out case (one function) looks like a training document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(funcs), per_file):
        text = "\n\n".join(f.source for f in funcs[i : i + per_file])
        (out_dir / f"funcs_{i // per_file:05d}.py").write_text(text, encoding="utf-8")
    return out_dir


def build_function_corpus(
    funcs: Sequence[Function], root: Path, fim_rate: float, vocab_size: int = 512
) -> Path:
    """A corpus of the functions (one build per FIM rate; the same tokenizer training text)."""
    src = write_sources(funcs, root / "src")
    cfg = CorpusConfig(
        sources=[str(src)], min_chars=20, near_dup_threshold=1.0, heldout_fraction=0.05,
        fim_rate=fim_rate,
    )  # fmt: skip
    out = root / f"corpus-fim{fim_rate}"
    build_corpus(cfg, out, vocab_size, progress=False)
    return out


def train_small(
    corpus: Path, steps: int, preset: str = "test-1m", seq_len: int = 128, batch_size: int = 16
) -> Transformer:
    """A model trained from scratch on ``corpus`` for ``steps`` steps (seeded: the same model)."""
    shards = TokenShards(corpus, "train")
    cfg = TrainConfig(
        max_steps=steps, batch_size=batch_size, seq_len=seq_len, lr=3e-3, warmup_steps=20,
        eval_every=10**9, log_every=10**9, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=shards.vocab_size))
    train(model, cfg, lambda i: get_batch(shards, batch_size, seq_len, i), progress=False)
    return model.eval()


def heldout_nll(model: Transformer, corpus: Path, seq_len: int = 128, n: int = 16) -> float:
    """Mean left-to-right NLL (nats/token) on the corpus's held-out split (never FIM-transformed)."""
    shards = TokenShards(corpus, "heldout")
    ids = np.asarray(shards.read(0, min(len(shards), n * seq_len + 1)), dtype=np.int64)
    m = (len(ids) - 1) // seq_len
    x = torch.from_numpy(ids[: m * seq_len]).view(m, seq_len)
    y = torch.from_numpy(ids[1 : m * seq_len + 1]).view(m, seq_len)
    with torch.no_grad():
        logits = model(x)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))


def score_cases(
    infill: Callable[[InfillCase], str], cases: Sequence[InfillCase]
) -> dict[str, float]:
    """Exact-match and parse rates of ``infill`` over the cases."""
    got = [infill(c) for c in cases]
    return {
        "exact_match": sum(exact_match(g, c) for g, c in zip(got, cases, strict=True)) / len(cases),
        "parses": sum(parses(c.splice(g)) for g, c in zip(got, cases, strict=True)) / len(cases),
    }
