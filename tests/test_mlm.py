"""The masked-LM objective: BERT's 15% / 80-10-10 corruption, its metrics, and that it trains."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kilnlm.mlm import (
    MaskingConfig,
    evaluate_mlm,
    mask_tokens,
    masked_accuracy,
    mlm_generator,
    pseudo_perplexity,
)
from kilnlm.model import ModelConfig, Transformer
from kilnlm.train import IGNORE_INDEX, TrainConfig, train

MASK = 3
V = 50_000  # large, so a random replacement almost never equals the original token


def corrupt(seed: int = 0, shape: tuple[int, int] = (64, 512), **kw) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(10, V, shape, generator=torch.Generator().manual_seed(99))
    inputs, targets = mask_tokens(ids, MASK, V, mlm_generator(seed, 0), MaskingConfig(**kw))
    return ids, inputs, targets


def test_selection_and_80_10_10_split_match_bert() -> None:
    ids, inputs, targets = corrupt()
    selected = targets != IGNORE_INDEX
    n = selected.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.005  # 32768 positions: 3 sigma ~ 0.6 points
    masked = (inputs == MASK) & selected
    kept = (inputs == ids) & selected
    randomised = selected & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.015
    assert abs(randomised.sum().item() / n - 0.1) < 0.015


def test_targets_are_the_originals_at_selected_positions_only() -> None:
    ids, inputs, targets = corrupt()
    selected = targets != IGNORE_INDEX
    assert torch.equal(targets[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else is touched


def test_same_seed_same_batch_and_ranks_differ() -> None:
    ids = torch.randint(10, 100, (4, 64), generator=torch.Generator().manual_seed(0))
    a = mask_tokens(ids, MASK, 100, mlm_generator(7, 3, rank=0))
    b = mask_tokens(ids, MASK, 100, mlm_generator(7, 3, rank=0))
    c = mask_tokens(ids, MASK, 100, mlm_generator(7, 3, rank=1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_protected_positions_are_never_selected_and_random_low_is_respected() -> None:
    ids = torch.randint(10, 1000, (32, 256), generator=torch.Generator().manual_seed(1))
    protected = torch.zeros_like(ids, dtype=torch.bool)
    protected[:, :128] = True
    cfg = MaskingConfig(mask_frac=0.0, random_frac=1.0, random_low=500)
    inputs, targets = mask_tokens(ids, MASK, 1000, mlm_generator(0, 0), cfg, protected=protected)
    assert (targets[protected] == IGNORE_INDEX).all()
    changed = targets != IGNORE_INDEX
    assert changed.any() and (inputs[changed] >= 500).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"select_prob": 0.0}, "select_prob"),
        ({"mask_frac": 1.2}, "mask_frac"),
        ({"mask_frac": 0.8, "random_frac": 0.3}, "random_frac"),
        ({"random_low": -1}, "random_low"),
    ],
)
def test_masking_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MaskingConfig(**kwargs)


def test_masked_accuracy_worked_example() -> None:
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 4] = logits[0, 2, 1] = logits[0, 3, 0] = 1.0  # argmax 2, 4, 1, 0
    targets = torch.tensor([[2, 3, 1, IGNORE_INDEX]])  # right, wrong, right, unscored
    assert masked_accuracy(logits, targets) == pytest.approx(2 / 3)


class Uniform(nn.Module):
    """A model that knows nothing: equal logits everywhere, so its pseudo-perplexity is V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


def test_pseudo_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    seqs = torch.randint(0, 37, (2, 9))
    assert pseudo_perplexity(Uniform(37), seqs, mask_id=0) == pytest.approx(37.0)


@torch.no_grad()
def test_pseudo_perplexity_equals_masking_one_position_at_a_time() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("test-1m", vocab_size=64, causal=False)).eval()
    seqs = torch.randint(10, 64, (2, 12))
    nll = 0.0
    for row in seqs:  # the definition, one forward per masked position
        for t in range(len(row)):
            x = row.clone()
            x[t] = MASK
            nll -= torch.log_softmax(model(x[None])[0, t], -1)[row[t]].item()
    assert pseudo_perplexity(model, seqs, MASK) == pytest.approx(
        math.exp(nll / seqs.numel()), rel=1e-5
    )


def zipf_batches(
    vocab: int, n: int, B: int = 8, T: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Masked batches of Zipf-distributed tokens: a model that learns the marginal beats uniform."""
    weights = 1.0 / torch.arange(1, vocab - 10 + 1, dtype=torch.float) ** 1.5
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = 10 + torch.multinomial(weights, B * T, replacement=True, generator=g).view(B, T)
        out.append(mask_tokens(ids, MASK, vocab, mlm_generator(0, i), MaskingConfig(random_low=10)))
    return out


def test_mlm_loss_decreases_and_accuracy_rises_with_the_library_loop() -> None:
    vocab = 64
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_preset("test-1m", vocab_size=vocab, block_size=32, causal=False)
    )
    batches = zipf_batches(vocab, 40)
    held = zipf_batches(vocab, 42)[40:]
    originals = torch.where(held[0][1] >= 0, held[0][1], held[0][0])
    before = evaluate_mlm(model, held, originals[:1], MASK, max_positions=16)
    cfg = TrainConfig(
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        max_steps=40,
        batch_size=8,
        seq_len=32,
        eval_every=0,
        objective="mlm",
    )
    history = train(model, cfg, lambda i: batches[i], progress=False)
    after = evaluate_mlm(model, held, originals[:1], MASK, max_positions=16)
    assert history[-1].loss < history[0].loss - 1.0
    assert after.loss < before.loss - 1.0
    assert after.accuracy > before.accuracy + 0.2
    assert after.pseudo_perplexity < before.pseudo_perplexity / 2
