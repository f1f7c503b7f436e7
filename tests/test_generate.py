"""Generation: cached == naive, stops, seeds, beam search == exhaustive search, input errors."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from kilnlm.generate import GenerationResult, generate, kv_cache_bytes
from kilnlm.model import KVCache, ModelConfig, Transformer, kv_cache_bytes_per_token
from kilnlm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40], [7, 7, 30, 2, 9]]

# A wide init (0.3 rather than 0.02) makes the random model's logits peaked, so greedy choices
# have clear margins and float differences between the two paths cannot flip a token.
BASE = ModelConfig(
    vocab_size=64, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, init_std=0.3
)
CONFIGS = {
    "mha": BASE,
    "gqa": replace(BASE, n_kv_head=2),
    "mqa-sliding-window": replace(BASE, n_kv_head=1, sliding_window=6),
    "tied": replace(BASE, tie_embeddings=True),
    "sinusoidal-gelu-layernorm": replace(
        BASE, pos_emb="sinusoidal", mlp="gelu", norm="layernorm", bias=True
    ),
}


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def batch(model: Transformer, params: SamplingParams, **kw: object) -> list[GenerationResult]:
    out = generate(model, PROMPTS, params, **kw)
    assert isinstance(out, list)
    return out


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model(replace(BASE, n_kv_head=2))


# --------------------------------------------------------------------------------------------
# Cached == naive


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_naive(name: str) -> None:
    model = make_model(CONFIGS[name])
    naive = batch(model, GREEDY, use_cache=False)
    cached = batch(model, GREEDY, use_cache=True)
    assert [r.token_ids for r in cached] == [r.token_ids for r in naive]
    assert all(len(r.token_ids) == 24 and r.finish_reason == "length" for r in cached)
    # the batch matters: the same prompt alone gives the same tokens as inside the ragged batch
    alone = generate(model, PROMPTS[1], GREEDY)
    assert isinstance(alone, GenerationResult) and alone.token_ids == cached[1].token_ids


def test_cached_equals_naive_with_penalty_and_mixed_params(model: Transformer) -> None:
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=20),
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0, repetition_penalty=0.8, max_tokens=11),
    ]
    naive = generate(model, PROMPTS, params, use_cache=False)
    cached = generate(model, PROMPTS, params, use_cache=True)
    assert [r.token_ids for r in cached] == [r.token_ids for r in naive]
    assert [len(r.token_ids) for r in cached] == [20, 3, 11]
    plain = generate(model, PROMPTS[0], replace(params[0], repetition_penalty=1.0))
    assert plain.token_ids != cached[0].token_ids  # the penalty changed something


def test_kv_cache_bytes_reported(model: Transformer) -> None:
    out = batch(model, replace(GREEDY, max_tokens=5))
    max_len = max(len(p) for p in PROMPTS) + 5
    per_token = kv_cache_bytes_per_token(model.config)
    assert out[0].kv_cache_bytes == len(PROMPTS) * max_len * per_token
    assert out[0].kv_cache_bytes == KVCache(model.config, len(PROMPTS), max_len).nbytes()
    assert kv_cache_bytes(model.config, 2, 10, torch.bfloat16) == 2 * 10 * per_token // 2
    assert batch(model, replace(GREEDY, max_tokens=5), use_cache=False)[0].kv_cache_bytes == 0


def test_kv_cache_reorder_gives_each_row_its_parents_cache(model: Transformer) -> None:
    """A reordered cache decodes exactly as a cache prefilled with the parents' prompts."""
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])  # (3, 3)
    positions = torch.arange(3).expand(3, -1)
    cache = KVCache(model.config, 3, 8)
    model(prompts, positions=positions, cache=cache)
    cache.reorder([2, 2, 0])
    fresh = KVCache(model.config, 3, 8)
    model(prompts[[2, 2, 0]], positions=positions, cache=fresh)
    for name in ("k", "v", "pos"):
        assert torch.equal(getattr(cache, name), getattr(fresh, name))
    nxt, at = torch.tensor([[1], [2], [3]]), torch.full((3, 1), 3)
    assert torch.equal(model(nxt, positions=at, cache=cache), model(nxt, positions=at, cache=fresh))
    for bad in ([0, 1], [0, 1, 3], [-1, 0, 1]):
        with pytest.raises(ValueError, match="reorder needs 3 row indices"):
            cache.reorder(bad)


# --------------------------------------------------------------------------------------------
# Seeds


def test_same_seed_same_tokens_and_batch_invariance(model: Transformer) -> None:
    p = SamplingParams(seed=1234, max_tokens=16, top_p=0.95)
    first = generate(model, PROMPTS[0], p)
    assert generate(model, PROMPTS[0], p).token_ids == first.token_ids
    assert generate(model, PROMPTS[0], replace(p, seed=99)).token_ids != first.token_ids
    # a seeded row inside a batch with other (unseeded, greedy) rows draws the same tokens
    others = [p, SamplingParams(max_tokens=16), SamplingParams(temperature=0, max_tokens=4)]
    assert generate(model, PROMPTS, others)[0].token_ids == first.token_ids


# --------------------------------------------------------------------------------------------
# Stopping


@pytest.mark.parametrize("use_cache", [True, False])
def test_stops_at_eos_and_stop_token_ids(model: Transformer, use_cache: bool) -> None:
    ref = generate(model, PROMPTS[0], GREEDY).token_ids
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # first new token after 3
    eos = generate(model, PROMPTS[0], GREEDY, use_cache=use_cache, eos_id=ref[k])
    assert (eos.token_ids, eos.finish_reason, eos.stop_reason) == (ref[:k], "eos", None)
    stop = generate(
        model, PROMPTS[0], replace(GREEDY, stop_token_ids=[63, ref[k]]), use_cache=use_cache
    )
    assert (stop.token_ids, stop.finish_reason, stop.stop_reason) == (ref[:k], "stop", ref[k])


def letters(ids: list[int]) -> str:
    """A real (if tiny) detokenizer: ids 0..25 are letters, the others two-letter chunks."""
    return "".join(chr(97 + t) if t < 26 else chr(97 + t % 26) + chr(65 + t % 26) for t in ids)


def test_stop_string_truncates_text_and_ids(model: Transformer) -> None:
    ref = generate(model, PROMPTS[0], GREEDY, decode=letters)
    assert ref.text == letters(ref.token_ids)
    cut = len(letters(ref.token_ids[:6]))
    stop = ref.text[cut + 1 : cut + 3]  # starts inside or right after token 6's text
    start = ref.text.find(stop)
    out = generate(model, PROMPTS[0], replace(GREEDY, stop=["zzzz", stop]), decode=letters)
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, ref.text[:start])
    assert out.token_ids == ref.token_ids[: len(out.token_ids)]
    assert ref.text[:start].startswith(letters(out.token_ids))
    assert len(letters(ref.token_ids[: len(out.token_ids) + 1])) > start  # no whole token dropped


def test_incremental_text_equals_decoding_everything_on_real_multibyte_text() -> None:
    """Byte-level tokens split emoji and CJK characters: the text grows by whole characters
    only, and at every step equals the whole-character part of decode(ids so far)."""
    from serving_utils import TEXT

    from kilnlm.decoding import IncrementalText
    from kilnlm.tokenizer import Tokenizer

    tok = Tokenizer.train([TEXT * 8], vocab_size=300, min_frequency=2)
    ids = tok.encode(TEXT + "🏺🏺 陶器")
    inc = IncrementalText(tok.decode)
    for n, t in enumerate(ids, 1):
        inc.push(t)
        full = tok.decode(ids[:n])
        assert full.startswith(inc.text) and inc.final() == full
        assert full[len(inc.text) :] in ("", full[len(inc.text) :].rstrip("\ufffd") + "\ufffd")
    assert inc.text == tok.decode(ids) and -1 in inc.ends  # some character took two tokens


def test_stop_strings_cost_linear_decoding_not_quadratic(model: Transformer) -> None:
    """The stop check decodes only the new tail: ids decoded in all grow linearly with the
    output (re-decoding everything every token was L²/2 ids)."""
    decoded = []

    def counting(ids: list[int]) -> str:
        decoded.append(len(ids))
        return letters(ids)

    params = replace(GREEDY, max_tokens=60, stop=["#never#"])
    out = generate(model, PROMPTS[1], params, decode=counting)
    assert out.finish_reason == "length" and len(out.token_ids) == 60
    assert sum(decoded) <= 6 * 60, sum(decoded)


def test_logprobs_are_the_models_raw_logprobs(model: Transformer) -> None:
    p = SamplingParams(seed=3, max_tokens=6, logprobs=3, temperature=1.5, top_k=10)
    out = generate(model, PROMPTS[2], p)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPTS[2] + out.token_ids]))[0]
    logp = torch.log_softmax(logits, -1)[len(PROMPTS[2]) - 1 : -1]  # (6, V) predicting each token
    for j, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[j]
        assert math.isclose(entry.logprob, float(logp[j, entry.token_id]), abs_tol=1e-5)
        assert [t for t, _ in entry.top] == logp[j].topk(3).indices.tolist()
    assert generate(model, PROMPTS[2], replace(p, logprobs=None)).logprobs is None


# --------------------------------------------------------------------------------------------
# Beam search


def sequence_logprob(model: Transformer, prompt: list[int], seq: list[int]) -> float:
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + seq]))[0], -1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(seq))


def exhaustive_best(
    model: Transformer, prompt: list[int], eos: int, max_tokens: int, length_penalty: float
) -> list[int]:
    """Best complete sequence among all of them (each ends with EOS or reaches max_tokens),
    scored sum_logprobs / len**length_penalty, len counting the EOS; returned without the EOS."""
    V, P = model.config.vocab_size, len(prompt)
    seqs = list(itertools.product(range(V), repeat=max_tokens))
    with torch.inference_mode():  # every prefix's logprob from the V**max_tokens full sequences
        logp = torch.log_softmax(model(torch.tensor([prompt + list(s) for s in seqs])), -1)
    steps = torch.arange(P - 1, P - 1 + max_tokens)
    best, best_score = None, -math.inf
    for i, seq in enumerate(seqs):
        cumulative = logp[i, steps, torch.tensor(seq)].cumsum(0).tolist()
        for n in range(1, max_tokens + 1):
            if eos in seq[: n - 1]:
                break
            if n < max_tokens and seq[n - 1] != eos:
                continue
            score = cumulative[n - 1] / n**length_penalty
            if score > best_score:
                best, best_score = list(seq[:n]), score
    assert best is not None
    return best[:-1] if best[-1] == eos else best


def test_beam_search_with_enough_beams_equals_exhaustive_search() -> None:
    # seed 3 is a worked example where the winner depends on length_penalty and on the width
    tiny = make_model(replace(BASE, vocab_size=4), seed=3)
    prompt, eos, steps = [1, 2], 0, 3
    winners, narrow_misses = set(), 0
    for length_penalty in (1.0, 0.0, 2.0, -1.0):
        best = exhaustive_best(tiny, prompt, eos, steps, length_penalty)
        winners.add(tuple(best))
        p = SamplingParams(num_beams=4**steps, max_tokens=steps, length_penalty=length_penalty)
        for use_cache in (True, False):
            out = generate(tiny, prompt, p, eos_id=eos, use_cache=use_cache)
            assert out.token_ids == best, (length_penalty, use_cache)
            assert out.finish_reason == ("length" if len(best) == steps else "eos")
        narrow = generate(tiny, prompt, replace(p, num_beams=2), eos_id=eos)
        narrow_misses += narrow.token_ids != best
    assert len(winners) >= 2 and narrow_misses >= 1  # the example can tell right from wrong


def test_beam_search_cached_equals_naive_and_beats_greedy(model: Transformer) -> None:
    p = SamplingParams(num_beams=4, max_tokens=8, logprobs=1)
    cached = generate(model, PROMPTS[2], p, eos_id=5)
    naive = generate(model, PROMPTS[2], p, eos_id=5, use_cache=False)
    assert cached.token_ids == naive.token_ids and cached.finish_reason == naive.finish_reason
    assert cached.kv_cache_bytes == 4 * (len(PROMPTS[2]) + 8) * kv_cache_bytes_per_token(
        model.config
    )
    greedy = generate(model, PROMPTS[2], replace(GREEDY, max_tokens=8), eos_id=5)
    if cached.finish_reason == greedy.finish_reason == "length":
        beam_lp = sequence_logprob(model, PROMPTS[2], cached.token_ids)
        assert beam_lp >= sequence_logprob(model, PROMPTS[2], greedy.token_ids) - 1e-5
    assert cached.logprobs is not None and len(cached.logprobs) == len(cached.token_ids)
    # a batch mixing beam search and sampling keeps the order of the prompts
    mixed = generate(model, PROMPTS, [GREEDY, p, GREEDY], eos_id=5)
    assert generate(model, PROMPTS[1], p, eos_id=5).token_ids == mixed[1].token_ids
    assert generate(model, PROMPTS[2], GREEDY, eos_id=5).token_ids == mixed[2].token_ids


# --------------------------------------------------------------------------------------------
# Against transformers (same weights through kilnlm.checkpoint's HF Llama mapping)


@pytest.fixture(scope="module")
def hf_pair() -> tuple[Transformer, object]:
    checkpoint = pytest.importorskip("kilnlm.checkpoint")
    transformers = pytest.importorskip("transformers")
    ours = make_model(replace(BASE, vocab_size=6, n_kv_head=2), seed=1)
    hf_config = transformers.LlamaConfig(**checkpoint.config_to_hf(ours.config))
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(checkpoint.to_hf_state_dict(ours.state_dict(), ours.config))
    with torch.inference_mode():
        x = torch.tensor([[3, 1, 4, 1, 5, 2]])
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-5, atol=1e-5)
    return ours, hf


def hf_new_tokens(hf: object, prompt: list[int], eos: int, **kw: object) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(  # type: ignore[attr-defined]
            torch.tensor([prompt]), eos_token_id=eos, pad_token_id=eos, **kw
        )[0, len(prompt) :].tolist()
    return out[: out.index(eos)] if eos in out else out


PROMPT = [3, 1, 4, 1, 5]


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
def test_beam_search_equals_transformers(
    hf_pair: tuple[Transformer, object], num_beams: int, length_penalty: float
) -> None:
    ours, hf = hf_pair
    p = SamplingParams(num_beams=num_beams, max_tokens=6, length_penalty=length_penalty)
    for eos in (0, 2, 3):  # with 2 and 3, length_penalty 2 needs the exact stopping bound
        # early_stopping="never" is HF's exact stopping rule (its default is a heuristic)
        ref = hf_new_tokens(
            hf,
            PROMPT,
            eos,
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=6,
            length_penalty=length_penalty,
            early_stopping="never",
        )
        assert generate(ours, PROMPT, p, eos_id=eos).token_ids == ref


def test_greedy_with_repetition_penalty_equals_transformers(
    hf_pair: tuple[Transformer, object],
) -> None:
    ours, hf = hf_pair
    p = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.4)
    prompt = [1]  # unpenalised, this model repeats 1 forever; the penalty must see the prompt
    ref = hf_new_tokens(hf, prompt, 0, do_sample=False, max_new_tokens=12, repetition_penalty=1.4)
    assert generate(ours, prompt, p, eos_id=0).token_ids == ref
    assert generate(ours, prompt, replace(p, repetition_penalty=1.0), eos_id=0).token_ids != ref


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], GREEDY, r"^prompt_ids is empty"),
        ([[1, 2], []], GREEDY, r"^prompt_ids\[1\] is empty"),
        ([1, 64], GREEDY, r"^prompt_ids has token id 64 outside the vocabulary"),
        ([[1], [-1]], GREEDY, r"^prompt_ids\[1\] has token id -1"),
        (["a", "b"], GREEDY, r"^prompt_ids\[0\] must be a list of int"),
        (list(range(64)), GREEDY, r"^prompt_ids has 64 tokens but the context holds 64"),
        ([1] * 50, SamplingParams(max_tokens=15), r"^max_tokens \(15\) .* at most 14 new tokens"),
        ([1], SamplingParams(stop=["x"]), r"stop strings need text"),
        ([1], [GREEDY, GREEDY], r"^params must be one SamplingParams or a list of 1"),
    ],
)
def test_bad_input_raises_a_clear_error(
    model: Transformer, prompt: list, params: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, params)  # type: ignore[arg-type]


def test_prompt_plus_max_tokens_may_fill_the_context_exactly(model: Transformer) -> None:
    out = generate(model, [1] * 50, SamplingParams(temperature=0, max_tokens=14))
    assert len(out.token_ids) == 14


def test_bidirectional_model_is_refused() -> None:
    with pytest.raises(ValueError, match="causal"):
        generate(make_model(replace(BASE, causal=False)), [1, 2], GREEDY)
