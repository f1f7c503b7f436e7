"""The training step: schedule values, decay groups, loss, exact gradient accumulation, learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from kilnlm.model import ModelConfig, Transformer
from kilnlm.train import (
    IGNORE_INDEX,
    TrainConfig,
    build_optimizer,
    eval_mode,
    evaluate_loss,
    lm_loss,
    lr_at,
    train,
    train_step,
)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("test-1m", vocab_size=64, n_embd=64, **kw))


def repeating_batches(vocab: int, period: int, batch_size: int, seq_len: int, seed: int = 0):
    """get_batch(i) over an endlessly repeated random pattern: learnable to near-zero loss."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, vocab, (period,), generator=g)
    stream = pattern.repeat(200)

    def get_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gi = torch.Generator().manual_seed(seed * 100_003 + i)
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gi)
        x = torch.stack([stream[s : s + seq_len] for s in starts])  # (B, T)
        y = torch.stack([stream[s + 1 : s + seq_len + 1] for s in starts])  # (B, T)
        return x, y

    return get_batch


# ---- config ---------------------------------------------------------------------------------


def test_lr_schedule_worked_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    expected = {
        0: 1e-4,  # warmup starts at lr/warmup_steps, not 0
        4: 5e-4,
        9: 1e-3,  # peak at the end of warmup
        10: 1e-3,  # cosine starts at the peak
        60: 1e-4 + 0.5 * 9e-4,  # half way down the cosine
        85: 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.75)) * 9e-4,
        110: 1e-4,
        500: 1e-4,  # stays at min_lr past max_steps
    }
    for step, lr in expected.items():
        assert lr_at(step, cfg) == pytest.approx(lr, rel=1e-12), step
    no_warmup = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=4)
    assert [lr_at(s, no_warmup) for s in range(5)] == pytest.approx(
        [
            1e-3,
            0.5e-3 * (1 + math.cos(math.pi / 4)),
            0.5e-3,
            0.5e-3 * (1 - math.cos(math.pi / 4)),
            0,
        ]
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 0.0),
        ("min_lr", 1.0),
        ("grad_accum_steps", 0),
        ("betas", (0.9, 1.0)),
        ("objective", "prefix"),
        ("warmup_steps", 2000),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_config_from_dict_and_toml(tmp_path):
    cfg = TrainConfig.from_dict({"batch_size": 4, "seq_len": 32, "grad_accum_steps": 3})
    assert cfg.tokens_per_step == 4 * 32 * 3
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nn_layer = 2\n\n[train]\nlr = 0.002\nbetas = [0.9, 0.99]\nobjective = "mlm"\n'
    )
    loaded = TrainConfig.from_toml(path)
    assert (loaded.lr, loaded.betas, loaded.objective) == (0.002, (0.9, 0.99), "mlm")
    flat = tmp_path / "flat.toml"
    flat.write_text("max_steps = 7\nwarmup_steps = 2\n")
    assert TrainConfig.from_toml(flat).max_steps == 7
    assert TrainConfig.from_dict(loaded.to_dict()) == loaded


# ---- optimiser and loss ---------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_weight_decay_on_matrices_only(tied):
    model = tiny_model(tie_embeddings=tied, bias=True)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))  # tied: once


def test_lm_loss_matches_cross_entropy_and_masks():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert lm_loss(logits, targets) == pytest.approx(
        float(F.cross_entropy(logits.view(-1, 7), targets.view(-1)))
    )
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    per_token = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    expected = float(per_token[mask].mean())
    assert lm_loss(logits, targets, mask) == pytest.approx(expected, rel=1e-6)
    ignored = targets.masked_fill(~mask, IGNORE_INDEX)
    assert lm_loss(logits, ignored) == pytest.approx(expected, rel=1e-6)
    assert lm_loss(logits, ignored, reduction="sum") == pytest.approx(float(per_token[mask].sum()))


# ---- the step -------------------------------------------------------------------------------


@pytest.mark.parametrize("ragged", [False, True])
def test_accumulated_step_equals_one_big_batch(ragged):
    """4 micro-batches of 2 give the same update as 1 batch of 8, even with uneven masking."""
    torch.manual_seed(1)
    x = torch.randint(0, 64, (8, 16))
    y = torch.randint(0, 64, (8, 16))
    if ragged:  # micro-batches score very different numbers of tokens
        y[0:2, :12] = IGNORE_INDEX
        y[4:6, 3:] = IGNORE_INDEX
    base = dict(lr=0.5, min_lr=0.0, warmup_steps=0, max_steps=10, grad_clip=0.0)
    big_model, small_model = tiny_model(), tiny_model()
    # Plain SGD: the parameter change is -lr·gradient, so equal parameters mean equal gradients.
    big = train_step(
        big_model,
        torch.optim.SGD(big_model.parameters(), lr=0.0),
        [(x, y)],
        TrainConfig(batch_size=8, grad_accum_steps=1, **base),
        step=0,
    )
    small = train_step(
        small_model,
        torch.optim.SGD(small_model.parameters(), lr=0.0),
        [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)],
        TrainConfig(batch_size=2, grad_accum_steps=4, **base),
        step=0,
    )
    assert small.loss == pytest.approx(big.loss, rel=1e-6)
    assert small.grad_norm == pytest.approx(big.grad_norm, rel=1e-5)
    assert small.grad_norm > 0 and small.tokens == big.tokens == 8 * 16
    moved = 0.0
    for (name, p_big), p_small, p_init in zip(
        big_model.named_parameters(),
        small_model.parameters(),
        tiny_model().parameters(),
        strict=True,
    ):
        torch.testing.assert_close(p_small, p_big, atol=1e-6, rtol=1e-5, msg=name)
        moved += float((p_big - p_init).detach().abs().sum())
    assert moved > 0  # the step did update something


def test_step_clips_sets_lr_and_clears_grads():
    model = tiny_model()
    cfg = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=4, max_steps=8, grad_clip=1e-3)
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, 64, (2, 8))
    m = train_step(model, opt, [(x, x)], cfg, step=1)
    assert m.lr == pytest.approx(cfg.lr * 2 / 4) == opt.param_groups[0]["lr"]
    assert m.grad_norm > cfg.grad_clip  # reported before clipping
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train_step(model, opt, [(x, x), (x, x)], cfg, step=2)


def test_bf16_autocast_step_runs_on_cpu():
    model = tiny_model()
    cfg = TrainConfig(max_steps=2, warmup_steps=1)
    x = torch.randint(0, 64, (2, 8))
    m = train_step(
        model, build_optimizer(model, cfg), [(x, x)], cfg, 0, autocast_dtype=torch.bfloat16
    )
    assert math.isfinite(m.loss) and math.isfinite(m.grad_norm)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_evaluate_loss_is_mean_nll_and_keeps_mode():
    model = tiny_model().train()
    x, y = torch.randint(0, 64, (3, 10)), torch.randint(0, 64, (3, 10))
    y[0, :4] = IGNORE_INDEX
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)
    keep = y != IGNORE_INDEX
    expected = -float(logp[keep].gather(-1, y[keep][:, None]).mean())
    got = evaluate_loss(model, [(x[:1], y[:1]), (x[1:], y[1:])])
    assert got == pytest.approx(expected, rel=1e-5)
    assert model.training


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_it_found_even_on_error(training):
    model = tiny_model().train(training)
    with eval_mode(model):
        assert not model.training
    assert model.training is training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("an evaluation failed")
    assert model.training is training


# ---- the loop -------------------------------------------------------------------------------


def test_training_drives_loss_down_on_a_repeating_sequence():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("test-1m"))  # ~1M params, vocab 2048
    cfg = TrainConfig(
        lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=50, batch_size=8, seq_len=32,
        weight_decay=0.0, eval_every=25, eval_batches=2,
    )  # fmt: skip
    get_batch = repeating_batches(2048, period=24, batch_size=8, seq_len=32)
    held_out = [get_batch(10_000 + i) for i in range(2)]
    history = train(model, cfg, get_batch, eval_batches=held_out, progress=False)
    assert len(history) == 50
    first, last = history[0].loss, sum(m.loss for m in history[-5:]) / 5
    assert first > 0.9 * math.log(2048)  # starts near uniform
    assert last < 0.5 * first, (first, last)
    evals = [m for m in history if m.eval_loss is not None]
    assert [m.step for m in evals] == [24, 49]
    assert evals[-1].eval_loss < 0.5 * first


def _losses(seed: int, steps: int = 6) -> list[float]:
    model = tiny_model(seed=seed)
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=steps, batch_size=2, seq_len=16, seed=seed)
    get_batch = repeating_batches(64, period=10, batch_size=2, seq_len=16, seed=seed)
    return [m.loss for m in train(model, cfg, get_batch, progress=False)]


def test_training_is_deterministic():
    assert _losses(3) == _losses(3)
    assert _losses(3) != _losses(4)


def test_loop_accumulates_resumes_and_stops_on_callback():
    model = tiny_model()
    cfg = TrainConfig(max_steps=10, warmup_steps=1, batch_size=2, seq_len=8, grad_accum_steps=3)
    seen: list[int] = []

    def get_batch(i: int):
        seen.append(i)
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i))
        return x, x

    history = train(
        model, cfg, get_batch, progress=False, start_step=2, callback=lambda m: m.step == 3
    )
    assert [m.step for m in history] == [2, 3]
    assert seen == [6, 7, 8, 9, 10, 11]  # micro-batch i = step·accum + k
    assert history[0].tokens == cfg.tokens_per_step


def test_mlm_objective_needs_a_bidirectional_model():
    cfg = TrainConfig(objective="mlm", max_steps=1, warmup_steps=0, batch_size=1, seq_len=4)
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="causal=False"):
        train(tiny_model(), cfg, lambda i: (x, x), progress=False)
    history = train(tiny_model(causal=False), cfg, lambda i: (x, x), progress=False)
    assert len(history) == 1
