"""The model's invariants: cached = uncached, masks do what they say, counts match reality."""

import math

import pytest
import torch

from kilnlm.model import (
    PRESETS,
    KVCache,
    ModelConfig,
    Transformer,
    attention_mask,
    flops_per_token,
    kv_cache_bytes_per_token,
    num_params,
    sinusoidal_table,
)

VARIANTS = {
    "default": {},
    "mha": {"n_kv_head": 4},
    "tied": {"tie_embeddings": True},
    "classic": {"norm": "layernorm", "mlp": "gelu", "bias": True, "pos_emb": "sinusoidal"},
    "window": {"sliding_window": 7},
    "linear-rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "yarn": {
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    },
}


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("test-1m", vocab_size=97, n_embd=64, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decode_equals_full_forward(variant):
    torch.manual_seed(0)
    cfg = tiny(**VARIANTS[variant])
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(cfg, batch_size=2, max_len=32)
        pieces = [model(x[:, :10], torch.arange(10).expand(2, 10), cache)]
        for t in range(10, 24):  # one token at a time, as in decoding
            pieces.append(model(x[:, t : t + 1], torch.full((2, 1), t), cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_causal_model_ignores_the_future_and_mlm_model_does_not():
    torch.manual_seed(0)
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % 97
    with torch.no_grad():
        causal = Transformer(tiny()).eval()
        a, b = causal(x), causal(y)
        torch.testing.assert_close(a[:, :8], b[:, :8])
        assert not torch.allclose(a[:, 8:], b[:, 8:])
        mlm = Transformer(tiny(causal=False)).eval()
        assert not torch.allclose(mlm(x)[:, :8], mlm(y)[:, :8])


def test_sliding_window_limits_what_a_query_sees():
    torch.manual_seed(0)
    model = Transformer(tiny(sliding_window=4)).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    # A change at position 2 reaches position p only through a chain of windows: with 2 layers
    # and window 4, at most 2·3 positions ahead. Position 9 onwards cannot see it.
    torch.testing.assert_close(a[:, 9:], b[:, 9:])
    assert not torch.allclose(a[:, 2:5], b[:, 2:5])


def test_attention_mask_worked_example():
    q = torch.tensor([[3]])
    k = torch.tensor([[0, 1, 2, 3, 4, -1]])
    assert attention_mask(q, k, causal=True, window=None)[0, 0, 0].tolist() == [1, 1, 1, 1, 0, 0]
    assert attention_mask(q, k, causal=True, window=2)[0, 0, 0].tolist() == [0, 0, 1, 1, 0, 0]
    assert attention_mask(q, k, causal=False, window=None)[0, 0, 0].tolist() == [1, 1, 1, 1, 1, 0]


def test_ragged_batch_rows_are_independent():
    """Two sequences of different lengths in one cache give the same logits as each one alone."""
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg).eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
        cache = KVCache(cfg, batch_size=2, max_len=16)
        # Prefill each row alone, then decode both rows in one batched step at their own
        # positions: row b's empty slots 5..8 must stay invisible to it.
        model(a[:, :8], torch.arange(8)[None], _RowCache(cache, 0))
        model(b[:, :4], torch.arange(4)[None], _RowCache(cache, 1))
        last = model(torch.stack([a[0, 8:], b[0, 4:]]), torch.tensor([[8], [4]]), cache)
    torch.testing.assert_close(last[0, 0], ref_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(last[1, 0], ref_b, atol=1e-5, rtol=1e-4)


class _RowCache:
    """View of one row of a batched KVCache, so rows can be prefilled separately."""

    def __init__(self, cache: KVCache, row: int):
        self.cache, self.row = cache, row

    def update(self, layer, k, v, positions):
        c, r = self.cache, self.row
        if layer == 0:
            c.pos[r, positions[0]] = positions[0]
            c.length = max(c.length, int(positions.max()) + 1)
        c.k[layer, r, :, positions[0]] = k[0]
        c.v[layer, r, :, positions[0]] = v[0]
        n = c.length
        return c.k[layer, r : r + 1, :, :n], c.v[layer, r : r + 1, :, :n], c.pos[r : r + 1, :n]


@pytest.mark.parametrize("name", PRESETS)
def test_num_params_from_config_matches_module(name):
    cfg = PRESETS[name]
    if num_params(cfg) > 20e6:
        cfg = ModelConfig.from_preset(name, n_layer=1, vocab_size=1000)  # same shape rules, smaller
    assert Transformer(cfg).num_params() == num_params(cfg)


@pytest.mark.parametrize(
    "kw", [{"tie_embeddings": True}, {"mlp": "gelu", "norm": "layernorm", "bias": True}]
)
def test_num_params_variants(kw):
    cfg = tiny(**kw)
    assert Transformer(cfg).num_params() == num_params(cfg)
    assert Transformer(cfg).num_params(non_embedding=True) == num_params(cfg, non_embedding=True)


def test_preset_sizes_are_what_their_names_say():
    sizes = {n: num_params(c) for n, c in PRESETS.items()}
    assert 0.5e6 < sizes["test-1m"] < 1.5e6
    assert 90e6 < sizes["base-100m"] < 150e6
    assert 0.9e9 < sizes["llama-1b"] < 1.3e9


def test_flops_and_kv_bytes_worked_example():
    cfg = ModelConfig(
        vocab_size=100,
        block_size=8,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=8,
        intermediate_size=16,
    )
    n = num_params(cfg, non_embedding=True)
    assert flops_per_token(cfg, seq_len=8) == 6 * n + 6 * 2 * 8 * 8
    # 2 · n_layers · n_kv_heads · d_head · bytes
    assert kv_cache_bytes_per_token(cfg, torch.float32) == 2 * 2 * 1 * 4 * 4
    assert kv_cache_bytes_per_token(cfg, torch.bfloat16) == 2 * 2 * 1 * 4 * 2


def test_sinusoidal_table_worked_values():
    t = sinusoidal_table(4, 4)
    assert t[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert t[1, 0].item() == pytest.approx(math.sin(1.0))
    assert t[1, 2].item() == pytest.approx(math.sin(1.0 / 100.0))


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"n_embd": 130}, "n_embd"),
        ({"n_kv_head": 3}, "n_head"),
        ({"norm": "batchnorm"}, "norm"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "original_max_position_embeddings"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("test-1m", **kw)


def test_too_long_input_and_unknown_preset_are_clear_errors():
    model = Transformer(tiny(block_size=8))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("gpt-5")


def test_config_dict_round_trip():
    cfg = tiny(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
