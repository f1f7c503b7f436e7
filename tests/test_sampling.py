"""Samplers against transformers' own logits processors, row by row, with different params per row."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kilnlm.errors import InvalidArgumentError
from kilnlm.sampling import (
    GREEDY_BELOW,
    SamplingParams,
    make_generator,
    process_logits,
    sample,
    token_logprobs,
)

# --------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("num_beams", 0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("seed", -1),
        ("length_penalty", math.inf),
        ("stop", [""]),
        ("stop_token_ids", [-3]),
    ],
)
def test_bad_params_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as err:  # a ValueError: old callers still catch it
        SamplingParams(**{field: value})
    assert str(err.value).startswith(field) and err.value.field == field


@pytest.mark.parametrize("temperature", [1e-40, 1e-20, 5e-6, 0.0])
def test_temperatures_below_the_greedy_threshold_are_greedy_not_nan(temperature: float) -> None:
    """vLLM's rule: below 1e-5 is greedy. Dividing by 1e-40 made inf - inf = NaN logits, whose
    argmax is token 0, whatever the model said."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = -5.0  # token 0 is never the argmax
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(3)]
    assert all(p.greedy for p in params) and temperature < GREEDY_BELOW
    x = process_logits(logits, params)
    assert torch.isfinite(x).all()
    tokens = sample(x, params, [make_generator(p.seed) for p in params])
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy  # the threshold itself samples


def test_params_edges_accepted_pickle_and_chat_defaults() -> None:
    p = SamplingParams(
        temperature=0,
        top_p=1.0,
        min_p=1.0,
        logprobs=20,
        seed=2**64 - 1,
        stop="\n\n",
        stop_token_ids=(3,),
    )
    assert p.stop == ["\n\n"] and p.stop_token_ids == [3] and p.greedy
    assert pickle.loads(pickle.dumps(p)) == p
    chat = SamplingParams.chat_defaults(max_tokens=64)
    assert (chat.temperature, chat.top_p, chat.max_tokens) == (0.7, 0.9, 64)
    assert SamplingParams(max_tokens=100).validate_for(100).max_tokens == 100
    with pytest.raises(InvalidArgumentError, match=r"^max_tokens must be <= 100") as err:
        SamplingParams(max_tokens=101).validate_for(100)
    assert err.value.field == "max_tokens"


# --------------------------------------------------------------------------------------------
# process_logits == transformers, row by row


def hf_reference(logits: torch.Tensor, p: SamplingParams, prev: list[int]) -> torch.Tensor:
    """transformers' processors for one row (1, V), in the order its generate() builds them."""
    ids = torch.tensor([prev])
    x = logits[None].clone()
    if p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, x)
    if p.temperature == 0:
        return x[0]  # greedy: HF applies no warper
    if p.temperature != 1:
        x = TemperatureLogitsWarper(float(p.temperature))(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0]


def assert_same_filter(ours: torch.Tensor, ref: torch.Tensor, ties: bool = False) -> None:
    """The -inf sets match exactly; finite values to 1e-6.

    With ties, HF's top-p sorts with an unstable sort, so which member of a group of equal
    logits straddling the cut-off it drops is up to the sort; ours is stable (deterministic and
    batch-invariant). Then the same number of tokens must survive with the same values.
    """
    if ties:
        assert int(torch.isinf(ours).sum()) == int(torch.isinf(ref).sum())
        kept, kept_ref = (
            ours[torch.isfinite(ours)].sort().values,
            ref[torch.isfinite(ref)].sort().values,
        )
        torch.testing.assert_close(kept, kept_ref, rtol=1e-6, atol=1e-6)
        return
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (
        f"removed sets differ at {torch.nonzero(torch.isinf(ours) != torch.isinf(ref)).tolist()}"
    )
    keep = ~torch.isinf(ref)
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-6, atol=1e-6)


V = 50
ROW_PARAMS = [
    SamplingParams(),  # nothing to do
    SamplingParams(temperature=0.7, top_p=0.9),  # chat defaults
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_k=V),  # k = vocab: keeps all
    SamplingParams(top_k=V + 100),  # k > vocab
    SamplingParams(top_k=1),
    SamplingParams(top_p=1.0, min_p=0.0),
    SamplingParams(top_p=0.05),  # keeps only the top token (min_tokens_to_keep = 1)
    SamplingParams(top_p=0.5, top_k=10, temperature=0.5),
    SamplingParams(min_p=0.1),
    SamplingParams(min_p=1.0),  # only the maximum (and its ties) survive
    SamplingParams(temperature=1e-3, top_p=0.95),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.5),  # greedy: only the penalty
    SamplingParams(repetition_penalty=1.3, top_p=0.8),
    SamplingParams(repetition_penalty=0.7, temperature=2.0, min_p=0.05),
    SamplingParams(temperature=0, repetition_penalty=2.0),
]


@pytest.mark.parametrize("ties", [False, True])
def test_process_logits_matches_transformers_row_by_row(ties: bool) -> None:
    g = torch.Generator().manual_seed(1 + ties)
    B = len(ROW_PARAMS)
    logits = torch.randn(B, V, generator=g) * 3
    if ties:  # few distinct values: ties at the top-k / top-p / min-p boundaries
        logits = torch.round(logits) / 2
    lengths = torch.randint(1, 12, (B,), generator=g).tolist()  # own generator: reproducible
    prev = [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
    ours = process_logits(logits, ROW_PARAMS, prev)
    assert ours.dtype == torch.float32
    for row, p in enumerate(ROW_PARAMS):
        assert_same_filter(ours[row], hf_reference(logits[row], p, prev[row]), ties)


def test_filters_actually_filter() -> None:
    """Guard against a reference and an implementation that both do nothing."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(top_k=5), SamplingParams(top_p=0.3), SamplingParams(min_p=1.0)]
    kept = torch.isfinite(process_logits(logits, params)).sum(-1).tolist()
    assert kept[0] == 5 and 1 <= kept[1] < V and kept[2] == 1


def test_top_p_tie_at_the_cut_off_drops_lower_ids_first() -> None:
    """Worked example of our (stable, deterministic) tie rule: four equal tokens, top_p 0.5:
    cumulative 0.25, 0.5, 0.75, 1 in id order, so ids 0 and 1 (cumulative <= 1 - 0.5) go;
    with top_p 0.6 only id 0 (cumulative <= 0.4) goes."""
    out = process_logits(torch.zeros(2, 4), [SamplingParams(top_p=0.5), SamplingParams(top_p=0.6)])
    assert torch.isinf(out).tolist() == [[True, True, False, False], [True, False, False, False]]


def test_bf16_logits_are_filtered_in_float32() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3)).bfloat16()
    params = [SamplingParams(top_p=0.9), SamplingParams(temperature=0.5, top_k=7)]
    ours = process_logits(logits, params)
    for row, p in enumerate(params):
        assert_same_filter(ours[row], hf_reference(logits[row].float(), p, []))


PARAM_STRATEGY = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-2, 0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 8, 100]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    repetition_penalty=st.sampled_from([1.0, 1.2, 0.8]),
)


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(PARAM_STRATEGY, min_size=2, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_row_depends_only_on_its_own_params_and_logits(
    params: list[SamplingParams], seed: int, ties: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    B, vocab = len(params), 16
    logits = torch.randn(B, vocab, generator=g) * 2
    if ties:
        logits = torch.round(logits)
    prev = [torch.randint(0, vocab, (3,), generator=g).tolist() for _ in range(B)]
    batch = process_logits(logits, params, prev)
    perm = torch.randperm(B, generator=g).tolist()
    permuted = process_logits(logits[perm], [params[i] for i in perm], [prev[i] for i in perm])
    for row in range(B):
        alone = process_logits(logits[row : row + 1], [params[row]], [prev[row]])[0]
        assert torch.equal(batch[row], alone)
        assert torch.equal(permuted[perm.index(row)], alone)
        assert torch.isfinite(alone).any()  # at least one token always survives


# --------------------------------------------------------------------------------------------
# sample


def test_greedy_is_argmax_lowest_id_on_ties() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, -1.0, 5.0]])
    params = [SamplingParams(temperature=0)] * 2
    assert sample(process_logits(logits, params), params, [None, None]).tolist() == [1, 0]


def test_seeded_draw_is_batch_invariant() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(seed=7),
        SamplingParams(temperature=0),
        SamplingParams(seed=8, top_p=0.9),
        SamplingParams(seed=7, temperature=2.0),
    ]

    def draws(rows: list[int]) -> list[int]:
        ps = [params[i] for i in rows]
        gens = [make_generator(p.seed) for p in ps]
        out = []
        for _ in range(20):  # 20 consecutive draws from each row's own generator
            out.append(sample(process_logits(logits[rows], ps), ps, gens).tolist())
        return [list(col) for col in zip(*out, strict=True)]

    together = draws([0, 1, 2, 3])
    for i in range(4):
        assert draws([i])[0] == together[i]
    assert draws([0])[0] != draws([3])[0]  # same seed, different temperature: other tokens


def test_draws_follow_the_filtered_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(top_k=4, temperature=0.8)
    processed = process_logits(logits, [p])
    n, g = 20000, make_generator(0)
    rows = processed.expand(n, -1)
    tokens = sample(rows, [p] * n, [g] * n)
    freq = torch.bincount(tokens, minlength=6).float() / n
    expected = processed.softmax(-1)[0]
    assert freq[4:].sum() == 0  # filtered tokens are never drawn
    # 4.5 standard errors: a wrong distribution fails, a right one passes with overwhelming odds.
    se = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 4.5 * se + 1e-9).all(), (freq, expected)


def test_token_logprobs_are_raw_model_logprobs() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    tokens = torch.tensor([0, 7, 49])
    lp = token_logprobs(logits, tokens, 4)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp.chosen, ref[torch.arange(3), tokens])
    torch.testing.assert_close(lp.top_logprobs, ref.sort(-1, descending=True).values[:, :4])
    assert torch.equal(ref.gather(1, lp.top_ids), lp.top_logprobs)
    assert token_logprobs(logits, tokens, 0).top_ids.shape == (3, 0)
