"""The validation gate: may this checkpoint serve? Checksums, load, held-out perplexity, smoke text.

Pure library code (no Ray, no registry): the orchestrator runs it in a thread or as a Ray task
with its own resources and compares the result with the promoted version's (that margin needs
the registry, so it is the caller's). The first failure is the reason, phrased for the operator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kilnlm import checkpoint
from kilnlm.checkpoint import CheckpointError, remote
from kilnlm.eval import evaluate
from kilnlm.generate import generate
from kilnlm.sampling import SamplingParams
from kilnlm.tokenizer import Tokenizer


class GateSettings(Protocol):
    """What the gate reads from its caller's config (``OrchestratorConfig`` has these fields)."""

    heldout: str
    heldout_max_tokens: int
    heldout_stride: float
    smoke_prompt: str
    smoke_tokens: int
    torch_threads: int


@dataclass
class Validation:
    """What the gate measured (kept in the registry for later comparisons)."""

    perplexity: float
    bits_per_byte: float
    tokens: int
    """Held-out tokens scored."""
    smoke_text: str
    """The smoke generation's text, for people to read."""
    seconds: float
    reference_version: int | None = None
    """The promoted version compared against (None: nothing was promoted)."""
    reference_perplexity: float | None = None


@dataclass
class GateResult:
    ok: bool
    reason: str = ""
    validation: Validation | None = None


def heldout_ids(source: str, tokenizer: Tokenizer, max_tokens: int) -> tuple[list[int], int]:
    """Held-out ids (at most ``max_tokens``, spread over the data as ``kilnlm.shards.spread_slices``
    says) and the UTF-8 bytes they encode.

    A corpus directory gives its heldout split as stored (it must have been encoded with this
    tokenizer); a text file is encoded with ``tokenizer`` after a BOS token.
    """
    from kilnlm.shards import TokenShards, sample_split, spread_slices

    path = Path(source)
    if path.is_dir():
        corpus_tokenizer = Tokenizer.load(path)
        if corpus_tokenizer.to_json() != tokenizer.to_json():
            raise ValueError(
                f"the held-out corpus {path} was encoded with another tokenizer than the "
                "checkpoint's; give the corpus the model was trained on, or a text file"
            )
        ids = [int(t) for t in sample_split(TokenShards(path, "heldout"), max_tokens)]
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        all_ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        ids = [t for a, b in spread_slices(len(all_ids), max_tokens) for t in all_ids[a:b]]
    else:
        raise FileNotFoundError(f"held-out data {path} does not exist")
    if len(ids) < 2:
        raise ValueError(f"held-out data {path} has fewer than 2 tokens; give more text")
    return ids, max(1, tokenizer.count_bytes(ids))


def _device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def run_gate(path: str, settings: GateSettings) -> GateResult:
    """Checksums, load, held-out perplexity, smoke generation; the first failure is the reason.

    ``path`` may be an object-store URI: it is fetched into the node's cache and verified first.
    A bucket that cannot be reached raises ``SwapEnvironmentError`` (not a verdict on the model).
    """
    start = time.perf_counter()
    torch.set_num_threads(settings.torch_threads)
    try:  # an object-store URI: this node's verified cached copy (SwapEnvironmentError: retry)
        path = remote.local_dir(path)
        checkpoint.verify_manifest(path)
    except (CheckpointError, OSError) as e:
        return GateResult(False, f"checksum: {e}")
    device, dtype = _device()
    try:
        model = checkpoint.load(path, device=device, dtype=dtype, verify=False)
        tokenizer = checkpoint.load_tokenizer(path, verify=False)
        if tokenizer is None:
            raise CheckpointError("it has no tokenizer.json, which serving needs")
    except (CheckpointError, ValueError, OSError) as e:
        return GateResult(False, f"load: {e}")
    try:
        ids, n_bytes = heldout_ids(settings.heldout, tokenizer, settings.heldout_max_tokens)
        context = model.config.block_size
        stride = max(1, int(context * settings.heldout_stride))
        result = evaluate(model, ids, n_bytes, seq_len=context, stride=stride)
    except (ValueError, OSError, RuntimeError) as e:
        return GateResult(False, f"held-out evaluation: {e}")
    if not math.isfinite(result.perplexity):
        return GateResult(False, f"held-out perplexity is {result.perplexity} (weights diverged)")
    try:
        smoke = smoke_generation(model, tokenizer, settings)
    except (ValueError, RuntimeError) as e:
        return GateResult(False, f"smoke generation: {e}")
    validation = Validation(
        perplexity=result.perplexity,
        bits_per_byte=result.bits_per_byte,
        tokens=result.tokens,
        smoke_text=smoke,
        seconds=time.perf_counter() - start,
    )
    return GateResult(True, validation=validation)


def smoke_generation(model: Any, tokenizer: Tokenizer, settings: GateSettings) -> str:
    """Greedy text from the smoke prompt: the model runs end to end and emits valid ids."""
    prompt = tokenizer.encode(settings.smoke_prompt) or [tokenizer.bos_id]
    room = model.config.block_size - len(prompt)
    if room < 1:
        raise ValueError("smoke_prompt fills the model's context; shorten it")
    params = SamplingParams(temperature=0, max_tokens=min(settings.smoke_tokens, room))
    out = generate(model, prompt, params, eos_id=tokenizer.eos_id, decode=tokenizer.decode)
    bad = [t for t in out.token_ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"generated id {bad[0]} outside the tokenizer's vocabulary")
    return out.text or ""


def regression(
    validation: Validation, reference: Validation | None, version: int | None, max_increase: float
) -> str:
    """Why ``validation`` is worse than the promoted version's beyond the margin ("" if not);
    records what it was compared with, so ListCheckpoints shows the reference."""
    if reference is None:
        return ""
    validation.reference_version = version
    validation.reference_perplexity = reference.perplexity
    if validation.perplexity <= reference.perplexity * (1 + max_increase):
        return ""
    return (
        f"held-out perplexity {validation.perplexity:.3f} is worse than version {version}'s "
        f"{reference.perplexity:.3f} by more than {max_increase:.0%}"
    )


__all__ = [
    "GateResult",
    "GateSettings",
    "Validation",
    "heldout_ids",
    "regression",
    "run_gate",
    "smoke_generation",
]
