"""The masked-LM objective: corrupt some tokens, predict the originals from both sides.

BERT's recipe (Devlin et al., 2019, §3.1): each position is *selected* with probability 15%;
a selected token is replaced by ``<|mask|>`` 80% of the time, by a random token 10% of the time
and left as it is 10% of the time; the loss counts selected positions only. The random and kept
cases matter because ``<|mask|>`` never occurs at inference: without them the model would learn
that only masked positions need a good representation.

Everything here is a pure function of its inputs and an explicit ``torch.Generator``, so a batch
is reproducible from (seed, step, rank) alone and a resumed run masks exactly as before. The
targets use ``kilnlm.train.IGNORE_INDEX`` where nothing is scored, so ``lm_loss`` and
``train_step`` train either objective unchanged. The model must be bidirectional
(``ModelConfig(causal=False)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kilnlm.train import IGNORE_INDEX, Batch, eval_mode, lm_loss


@dataclass(frozen=True)
class MaskingConfig:
    """How a batch is corrupted for masked-LM training."""

    select_prob: float = 0.15
    """Probability that a position is selected for prediction."""
    mask_frac: float = 0.8
    """Of the selected positions, the share replaced by ``<|mask|>``."""
    random_frac: float = 0.1
    """Of the selected positions, the share replaced by a random token (the rest keep theirs)."""
    random_low: int = 0
    """Random replacements are drawn from ``[random_low, vocab_size)``; set it past the special
    ids (the tokenizer puts them first) so a random replacement is never a control marker."""

    def __post_init__(self) -> None:
        if not 0.0 < self.select_prob <= 1.0:
            raise ValueError(f"MaskingConfig.select_prob must be in (0, 1], got {self.select_prob}")
        for name in ("mask_frac", "random_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"MaskingConfig.{name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.mask_frac + self.random_frac > 1.0:
            raise ValueError(
                f"MaskingConfig.mask_frac + random_frac must be <= 1 (the rest are kept), got "
                f"{self.mask_frac} + {self.random_frac}"
            )
        if self.random_low < 0:
            raise ValueError(f"MaskingConfig.random_low must be >= 0, got {self.random_low}")


def mask_tokens(
    ids: Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    cfg: MaskingConfig = MaskingConfig(),
    protected: Tensor | None = None,
) -> Batch:
    """(inputs, targets) for masked-LM from token ids (B, T).

    ``targets`` holds the original id at selected positions and ``IGNORE_INDEX`` elsewhere.
    ``protected`` (B, T) bool marks positions that are never selected (e.g. padding).
    Draws come from ``generator`` (on the ids' device), so equal seeds give equal batches.
    """
    if cfg.random_low >= vocab_size:
        raise ValueError(f"random_low ({cfg.random_low}) must be < vocab_size ({vocab_size})")
    u = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, T)
    selected = u < cfg.select_prob
    if protected is not None:
        selected &= ~protected
    # One more uniform per position decides what a selected token becomes.
    v = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, T)
    to_mask = selected & (v < cfg.mask_frac)
    to_random = selected & (v >= cfg.mask_frac) & (v < cfg.mask_frac + cfg.random_frac)
    random_ids = torch.randint(
        cfg.random_low, vocab_size, ids.shape, generator=generator, device=ids.device
    )
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    targets = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, targets


def mlm_generator(
    seed: int, step: int, rank: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator fixed by (seed, step, rank): masking needs no RNG state in a checkpoint."""
    g = torch.Generator(device=device)
    # Mix the three into one 63-bit seed; distinct (step, rank) pairs give distinct streams.
    g.manual_seed(((seed * 1_000_003 + step) * 65_537 + rank) & (2**63 - 1))
    return g


def masked_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Share of selected positions (target != IGNORE_INDEX) whose argmax is the original token."""
    scored = targets != IGNORE_INDEX  # (B, T)
    n = int(scored.sum())
    if n == 0:
        raise ValueError("masked_accuracy got no selected positions; mask at least one token")
    hits = (logits.argmax(-1) == targets) & scored
    return int(hits.sum()) / n


@dataclass
class MLMEval:
    """Held-out masked-LM quality."""

    loss: float
    """Mean cross-entropy (nats) over selected positions of the masked batches."""
    accuracy: float
    """Masked-token accuracy over the same positions."""
    pseudo_perplexity: float
    """exp of the mean NLL of each token with only itself masked (Salazar et al., 2020)."""


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module,
    masked_batches: Iterable[Batch],
    sequences: Tensor,
    mask_id: int,
    max_positions: int = 64,
) -> MLMEval:
    """Masked loss and accuracy on ``masked_batches``; pseudo-perplexity on ``sequences`` (B, T)."""
    with eval_mode(model):
        loss_sum, hits, count = 0.0, 0, 0
        for x, y in masked_batches:
            logits = model(x)  # (B, T, V)
            loss_sum += float(lm_loss(logits, y, reduction="sum"))
            scored = y != IGNORE_INDEX
            hits += int(((logits.argmax(-1) == y) & scored).sum())
            count += int(scored.sum())
        if count == 0:
            raise ValueError("evaluate_mlm got no selected positions in masked_batches")
        pppl = pseudo_perplexity(model, sequences, mask_id, max_positions)
    return MLMEval(loss=loss_sum / count, accuracy=hits / count, pseudo_perplexity=pppl)


@torch.no_grad()
def pseudo_perplexity(
    model: nn.Module, sequences: Tensor, mask_id: int, max_positions: int | None = None
) -> float:
    """PPPL = exp(−mean_t log p(w_t | w without t)) over the first ``max_positions`` of each row.

    Each position is masked on its own in one copy of the sequence; all copies of a sequence go
    through the model as one batch, so a (B, T) input costs B forwards of batch T.
    """
    nll, n = 0.0, 0
    for row in sequences:  # (T,)
        T = row.numel()
        P = T if max_positions is None else min(T, max_positions)
        copies = row.expand(P, T).clone()  # (P, T): copy p masks position p
        pos = torch.arange(P, device=row.device)
        copies[pos, pos] = mask_id
        logits = model(copies)  # (P, T, V)
        logp = torch.log_softmax(logits[pos, pos].float(), dim=-1)  # (P, V)
        nll -= float(logp.gather(1, row[:P, None]).sum())
        n += P
    if n == 0:
        raise ValueError("pseudo_perplexity needs at least one token")
    return math.exp(nll / n)


__all__ = [
    "MLMEval",
    "MaskingConfig",
    "evaluate_mlm",
    "mask_tokens",
    "masked_accuracy",
    "mlm_generator",
    "pseudo_perplexity",
]
