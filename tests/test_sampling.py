"""Sampling: processors on hand-computed vectors, sampler distributions (chi-square), seeds, logprobs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localllm.sampling import (
    SAMPLING_OPTIONS,
    SampledToken,
    SamplingParams,
    TokenSampler,
    log_softmax,
    make_frequency_presence_penalty,
    make_logit_bias,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
    top_logprobs,
    truncate,
)

NEG_INF = -np.inf
REPO_ROOT = Path(__file__).resolve().parents[1]


def f32(values):
    return np.array(values, dtype=np.float32)


# ----------------------------------------------------------------------------- processors, exact


def test_repetition_penalty_window_llama_cpp_semantics():
    logits = f32([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    history = [0, 1, 1, 4, 5, 3]
    # last 4 tokens: {1, 4, 5, 3}; positive /2, negative *2, zero stays zero
    out = make_repetition_penalty(2.0, 4)(logits, history, 2)
    np.testing.assert_array_equal(out, f32([2.0, -2.0, 0.5, 1.5, -4.0, 0.0]))
    # -1: whole history, prompt included
    out = make_repetition_penalty(2.0, -1)(logits, history, 6)
    np.testing.assert_array_equal(out, f32([1.0, -2.0, 0.5, 1.5, -4.0, 0.0]))
    # window longer than the history
    out = make_repetition_penalty(2.0, 100)(logits, [3], 1)
    np.testing.assert_array_equal(out, f32([2.0, -1.0, 0.5, 1.5, -2.0, 0.0]))
    np.testing.assert_array_equal(logits, f32([2.0, -1.0, 0.5, 3.0, -2.0, 0.0]))  # input untouched


def test_frequency_presence_penalty_counts_generated_tokens_only():
    logits = f32([1.0, 1.0, 1.0, 1.0, 1.0])
    history = [0, 0, 1, 2, 2, 2, 3]  # prompt [0, 0, 1]; generated 2 x3, 3 x1
    out = make_frequency_presence_penalty(0.5, 0.25)(logits, history, 3)
    np.testing.assert_allclose(out, f32([1.0, 1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]))
    # negative values encourage repetition
    out = make_frequency_presence_penalty(-1.0, -2.0)(logits, history, 3)
    np.testing.assert_allclose(out, f32([1.0, 1.0, 6.0, 4.0, 1.0]))
    # nothing generated yet: unchanged
    np.testing.assert_array_equal(make_frequency_presence_penalty(0.5, 0.5)(logits, history, 7), logits)


def test_logit_bias_add_ban_force():
    logits = f32([0.0, 1.0, 2.0, 3.0, 4.0])
    out = make_logit_bias({1: 2.5, 3: -100, 4: -1})(logits, [], 0)
    np.testing.assert_array_equal(out, f32([0.0, 3.5, 2.0, NEG_INF, 3.0]))
    out = make_logit_bias({2: 100})(logits, [], 0)
    np.testing.assert_array_equal(out, f32([NEG_INF, NEG_INF, 102.0, NEG_INF, NEG_INF]))
    out = make_logit_bias({0: 100, 2: 100.0, 4: -3})(logits, [], 0)
    np.testing.assert_array_equal(out, f32([100.0, NEG_INF, 102.0, NEG_INF, NEG_INF]))
    with pytest.raises(ValueError, match="logit_bias token id 9 is out of range for vocab_size 5"):
        make_logit_bias({9: 1.0})(logits, [], 0)


def test_processors_accept_batched_rows():
    logits = np.stack([f32([2.0, -1.0, 0.5]), f32([-2.0, 4.0, 1.0])])  # (2, vocab)
    out = make_repetition_penalty(2.0, -1)(logits, [0, 1], 0)
    np.testing.assert_array_equal(out, np.stack([f32([1.0, -2.0, 0.5]), f32([-4.0, 2.0, 1.0])]))
    out = make_logit_bias({2: -100})(logits, [], 0)
    assert np.all(out[:, 2] == NEG_INF)


def test_history_out_of_vocab_is_an_error():
    with pytest.raises(ValueError, match="token id 7, out of range for vocab_size 3"):
        make_repetition_penalty(1.5, -1)(f32([0, 0, 0]), [1, 7], 0)


def test_make_logits_processors_pipeline_order():
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=-1, frequency_penalty=1.0, logit_bias={1: 1.0})
    logits = f32([2.0, -1.0, 0.5])
    history, n_prompt = [0, 1, 2, 0], 2
    for processor in make_logits_processors(params):
        logits = processor(logits, history, n_prompt)
    # repeat: [1, -2, 0.25]; frequency over generated [2, 0]: [0, -2, -0.75]; bias +1 on token 1
    np.testing.assert_allclose(logits, f32([0.0, -1.0, -0.75]))
    assert make_logits_processors(SamplingParams(repeat_penalty=1.0)) == []
    assert make_logits_processors(SamplingParams(repeat_penalty=1.3, repeat_last_n=0)) == []
    assert len(make_logits_processors(SamplingParams(presence_penalty=0.1, logit_bias={}))) == 1


# ----------------------------------------------------------------------------- truncation, exact


PROBS = np.array([0.15, 0.4, 0.05, 0.3, 0.1])  # best first: 1, 3, 0, 4, 2


def test_truncate_each_sampler_exact():
    logits = np.log(PROBS).astype(np.float32)
    assert set(truncate(logits, top_k=3)[0]) == {1, 3, 0}
    assert set(truncate(logits, top_p=0.65)[0]) == {1, 3}  # cum 0.4, 0.7
    assert set(truncate(logits, top_p=0.8)[0]) == {1, 3, 0}  # cum 0.4, 0.7, 0.85
    assert set(truncate(logits, top_p=0.0)[0]) == {1}  # keeps at least one
    # top_p after top_k renormalises over the 3 kept: 0.4/0.85 = 0.47, 0.7/0.85 = 0.82
    assert set(truncate(logits, top_k=3, top_p=0.8)[0]) == {1, 3}
    assert set(truncate(logits, min_p=0.3)[0]) == {1, 3, 0}  # p >= 0.12
    assert set(truncate(logits, min_p=0.75)[0]) == {1, 3}  # p >= 0.3
    ids, values = truncate(logits)
    assert ids is None
    np.testing.assert_array_equal(values, logits.astype(np.float64))
    ids, values = truncate(logits, top_k=2)
    np.testing.assert_array_equal(values, logits[ids].astype(np.float64))


def test_truncate_drops_banned_and_breaks_ties_by_id():
    logits = f32([1.0, 3.0, 3.0, NEG_INF, 3.0, 0.0])
    assert list(truncate(logits, top_k=2)[0]) == [1, 2]
    assert set(truncate(logits, top_k=5)[0]) == {0, 1, 2, 4, 5}
    assert set(truncate(logits, top_p=0.99)[0]) == {0, 1, 2, 4, 5}


def _nucleus_oracle(logits, top_p):
    order = np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))
    probs = np.exp(logits[order].astype(np.float64) - logits.max())
    probs /= probs.sum()
    n_keep = int(np.argmax(np.cumsum(probs) >= top_p)) + 1
    return set(order[:n_keep].tolist())


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_large_vocab_matches_full_sort(top_p):
    # a flat distribution over 3000 tokens forces the large-nucleus path; rounded logits add ties
    rng = np.random.default_rng(5)
    logits = np.round(rng.standard_normal(3000) * 0.5, 1).astype(np.float32)
    logits[[7, 11]] = NEG_INF
    assert set(truncate(logits, top_p=top_p)[0].tolist()) == _nucleus_oracle(logits, top_p)


# ----------------------------------------------------------------------------- distributions, chi-square

LOGITS8 = f32([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
# chi-square critical values at significance 0.001, by degrees of freedom
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def _softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _expected_distribution(top_k, top_p, min_p, temperature):
    """Written independently of the library: full sort, llama.cpp chain top_k -> top_p -> min_p -> temperature."""
    logits = LOGITS8.astype(np.float64)  # already sorted descending, distinct
    kept = np.arange(logits.size)
    if top_k:
        kept = kept[:top_k]
    if top_p < 1.0:
        cum = np.cumsum(_softmax64(logits[kept]))
        kept = kept[: int(np.argmax(cum >= top_p)) + 1]
    if min_p > 0.0:
        probs = _softmax64(logits[kept])
        kept = kept[probs >= min_p * probs.max()]
    expected = np.zeros(logits.size)
    expected[kept] = _softmax64(logits[kept] / temperature)
    return expected


@pytest.mark.parametrize(
    "top_k, top_p, min_p, temperature, n_kept",
    [
        (0, 1.0, 0.0, 0.7, 8),  # temperature only
        (0, 1.0, 0.0, 1.6, 8),
        (3, 1.0, 0.0, 1.0, 3),  # top_k
        (0, 0.85, 0.0, 2.0, 4),  # top_p on T=1 probabilities (temperature first would keep 6)
        (0, 1.0, 0.2, 2.0, 4),  # min_p on T=1 probabilities (temperature first would keep 7)
        (6, 0.9, 0.1, 0.8, 4),  # the whole chain
    ],
)
def test_sampler_distribution_chi_square(top_k, top_p, min_p, temperature, n_kept):
    expected = _expected_distribution(top_k, top_p, min_p, temperature)
    assert np.count_nonzero(expected) == n_kept
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sample = make_sampler(params, np.random.Generator(np.random.PCG64(20240601)))
    n_draws = 20000
    counts = np.bincount([sample(LOGITS8) for _ in range(n_draws)], minlength=LOGITS8.size)
    assert np.all(counts[expected == 0] == 0), counts
    kept = expected > 0
    expected_counts = expected[kept] * n_draws
    assert expected_counts.min() >= 5
    chi2 = float(np.sum((counts[kept] - expected_counts) ** 2 / expected_counts))
    assert chi2 < CHI2_CRITICAL_0_001[n_kept - 1], (chi2, counts, expected_counts)


# ----------------------------------------------------------------------------- seeds


SEEDED_SCRIPT = """
import json, sys
import numpy as np
from localllm.sampling import SamplingParams, TokenSampler
logits = np.linspace(-1.0, 1.0, 50).astype(np.float32)
sampler = TokenSampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.95, seed=int(sys.argv[1])))
print(json.dumps([sampler(logits, [1, 2], 2).token_id for _ in range(64)]))
"""


def _draw(seed, n=64, **kw):
    logits = np.linspace(-1.0, 1.0, 50).astype(np.float32)
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.95, seed=seed, **kw))
    return sampler, [sampler(logits, [1, 2], 2).token_id for _ in range(n)]


def test_same_seed_same_tokens_in_another_process():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", SEEDED_SCRIPT, "1234"], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    assert json.loads(result.stdout) == _draw(1234)[1]


def test_seeds_differ_and_none_is_random():
    sampler, tokens = _draw(1234)
    assert sampler.seed == 1234
    assert _draw(1234)[1] == tokens
    assert _draw(1235)[1] != tokens
    first, tokens_a = _draw(None)
    second, tokens_b = _draw(None)
    assert first.seed != second.seed and tokens_a != tokens_b
    assert 0 <= first.seed < 2**63
    # the reported seed reproduces the run
    assert _draw(first.seed)[1] == tokens_a
    # negative seeds (OpenAI allows them) are deterministic too
    assert _draw(-5)[1] == _draw(-5)[1] != _draw(5)[1]


# ----------------------------------------------------------------------------- greedy, logprobs, bias


def test_greedy_picks_argmax_with_max_logprob():
    logits = f32([0.1, 2.5, -1.0, 2.4, 0.0])
    sampler = TokenSampler(SamplingParams(temperature=0.0, seed=1))
    for _ in range(5):
        result = sampler(logits, [], 0)
        assert isinstance(result, SampledToken)
        assert result.token_id == 1
        assert result.logprob == result.logprobs.max()
    assert TokenSampler(SamplingParams(temperature=0))(f32([1.0, 3.0, 3.0]), [], 0).token_id == 1  # tie -> low id


def test_logprobs_are_before_temperature_and_truncation():
    logits = f32([0.0, math.log(3.0)])  # probabilities 0.25, 0.75
    result = TokenSampler(SamplingParams(temperature=2.0, top_k=1, seed=3))(logits, [], 0)
    assert result.token_id == 1
    assert result.logprob == pytest.approx(math.log(0.75), abs=1e-6)
    np.testing.assert_allclose(result.logprobs, np.log([0.25, 0.75]), atol=1e-6)
    # ... but after the processors: a penalty changes the reported distribution
    result = TokenSampler(SamplingParams(temperature=0, logit_bias={0: math.log(3.0)}))(logits, [], 0)
    np.testing.assert_allclose(np.exp(result.logprobs), [0.5, 0.5], atol=1e-6)


def test_log_softmax_hand_values():
    np.testing.assert_allclose(log_softmax(f32([0.0, math.log(3.0), NEG_INF])), [math.log(0.25), math.log(0.75), NEG_INF], atol=1e-7)
    rows = log_softmax(np.array([[1.0, 1.0], [0.0, 1000.0]]))
    np.testing.assert_allclose(rows, [[-math.log(2), -math.log(2)], [-1000.0, 0.0]])


def test_top_logprobs_sorted_ties_by_id_without_impossible_tokens():
    logprobs = np.array([-2.0, -0.5, -2.0, NEG_INF, -1.0, -2.0])
    assert top_logprobs(logprobs, 4) == [(1, -0.5), (4, -1.0), (0, -2.0), (2, -2.0)]
    assert top_logprobs(logprobs, 20) == [(1, -0.5), (4, -1.0), (0, -2.0), (2, -2.0), (5, -2.0)]
    assert top_logprobs(logprobs, 0) == []
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match="top_logprobs must be between 0 and 20"):
            top_logprobs(logprobs, bad)


def test_logit_bias_ban_is_never_sampled():
    logits = f32([8.0, 0.0, 0.5, -0.5])
    sampler = TokenSampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, logit_bias={0: -100}, seed=9))
    drawn = {sampler(logits, [], 0).token_id for _ in range(2000)}
    assert 0 not in drawn and drawn == {1, 2, 3}
    result = sampler(logits, [], 0)
    assert result.logprobs[0] == NEG_INF
    assert 0 not in dict(top_logprobs(result.logprobs, 4))
    forced = TokenSampler(SamplingParams(temperature=1.0, logit_bias={3: 100}, seed=9))
    assert {forced(logits, [], 0).token_id for _ in range(200)} == {3}


def test_every_token_banned_or_bad_logits_is_a_clear_error():
    sampler = TokenSampler(SamplingParams(logit_bias={0: -100, 1: -100}))
    with pytest.raises(ValueError, match="every token is banned"):
        sampler(f32([1.0, 2.0]), [], 0)
    with pytest.raises(ValueError, match="NaN"):
        TokenSampler(SamplingParams())(f32([1.0, np.nan]), [], 0)
    with pytest.raises(ValueError, match="shape"):
        TokenSampler(SamplingParams())(np.zeros((2, 3), np.float32), [], 0)
    with pytest.raises(ValueError, match="n_prompt"):
        TokenSampler(SamplingParams())(f32([1.0, 2.0]), [0], 2)


def test_extra_processors_run_after_builtin_ones():
    calls = []

    def mask_all_but_2(logits, history, n_prompt):
        calls.append((logits.copy(), list(history), n_prompt))
        out = np.full_like(logits, -np.inf)
        out[2] = logits[2]
        return out

    sampler = TokenSampler(SamplingParams(temperature=1.0, logit_bias={1: 5.0}, seed=0), [mask_all_but_2])
    result = sampler(f32([0.0, 0.0, 0.0]), [0, 1], 1)
    assert result.token_id == 2 and result.logprob == 0.0
    np.testing.assert_array_equal(calls[0][0], f32([0.0, 5.0, 0.0]))
    assert calls[0][1:] == ([0, 1], 1)


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "field_name, value, message",
    [
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", "hot", "temperature must be a finite number"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_k", 4.5, "top_k must be an integer"),
        ("top_p", 1.5, "top_p must be between 0 and 1"),
        ("min_p", -0.1, "min_p must be between 0 and 1"),
        ("repeat_penalty", 0.0, "repeat_penalty must be > 0"),
        ("repeat_last_n", -2, "repeat_last_n must be >= -1"),
        ("frequency_penalty", 2.5, "frequency_penalty must be between -2 and 2"),
        ("presence_penalty", -3, "presence_penalty must be between -2 and 2"),
        ("logit_bias", {"5": 1.0}, "logit_bias keys must be integer token ids"),
        ("logit_bias", {5: 101}, "logit_bias values must be between -100 and 100"),
        ("logit_bias", {-1: 1}, "logit_bias token id -1 is out of range"),
        ("logit_bias", [1, 2], "logit_bias must be a dict"),
        ("seed", 1.5, "seed must be an integer"),
        ("seed", 2**64, "seed must fit in 64 bits"),
    ],
)
def test_validate_names_the_parameter(field_name, value, message):
    params = SamplingParams(**{field_name: value})
    with pytest.raises(ValueError, match=message):
        params.validate()
    with pytest.raises(ValueError, match=field_name):
        TokenSampler(params)


def test_validate_checks_logit_bias_against_vocab():
    SamplingParams(logit_bias={10: 1.0}).validate()
    with pytest.raises(ValueError, match="logit_bias token id 10 is out of range for vocab_size 10"):
        SamplingParams(logit_bias={10: 1.0}).validate(vocab_size=10)
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, frequency_penalty=-2, seed=0).validate(vocab_size=10)


def test_from_options_merges_defaults_and_overrides():
    params = SamplingParams.from_options({"temperature": 0.2, "top_k": 5, "seed": 7}, top_k=None, top_p=0.5, min_p=0.05)
    assert params == SamplingParams(temperature=0.2, top_k=5, top_p=0.5, min_p=0.05, seed=7)
    assert SamplingParams.from_options() == SamplingParams()
    assert SamplingParams.from_options({"seed": 7}, seed=-1).seed is None  # Ollama: -1 = random
    assert SamplingParams.from_options(seed=-7).seed == -7
    assert SamplingParams.from_options(logit_bias={3: -100}).logit_bias == {3: -100}
    with pytest.raises(ValueError, match="'num_ctx'"):
        SamplingParams.from_options(num_ctx=2048)
    with pytest.raises(ValueError, match="'mirostat'"):
        SamplingParams.from_options({"mirostat": 1})
    with pytest.raises(ValueError, match="top_p must be between 0 and 1"):
        SamplingParams.from_options(top_p=2)
    assert {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed",
            "frequency_penalty", "presence_penalty", "logit_bias"} == SAMPLING_OPTIONS


# ----------------------------------------------------------------------------- numerical edges
# Every finite value the schemas accept, at the edges of float range: the sampler must still pick a
# token with a finite logprob (or, only when the request itself bans every token, say so clearly).

from hypothesis import given, settings, strategies as st  # noqa: E402

TINY = (5e-324, 1e-300, 1e-30)
HUGE = (1e30, 1e300, float(np.finfo(np.float64).max))
EDGES = {
    "temperature": (0.0, *TINY, 0.5, 2.0, *HUGE),
    "top_k": (0, 1, 2, 63, 64, 2**31, 2**63 - 1),
    "top_p": (0.0, *TINY, 0.5, 1.0 - 1e-16, 1.0),
    "min_p": (0.0, *TINY, 0.5, 1.0 - 1e-16, 1.0),
    "repeat_penalty": (*TINY, 1.0, *HUGE),
    "repeat_last_n": (-1, 0, 1, 2**31),
    "frequency_penalty": (-2.0, -1e-300, 0.0, 1e-300, 2.0),
    "presence_penalty": (-2.0, -1e-300, 0.0, 1e-300, 2.0),
}


def _edge_logits(vocab: int, rng: np.random.Generator) -> np.ndarray:
    logits = (rng.standard_normal(vocab) * 8).astype(np.float32)
    logits[:3] = [30.0, -30.0, 0.0]                    # the seen ids below cover both signs and zero
    return logits


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.fixed_dictionaries({name: st.sampled_from(values) for name, values in EDGES.items()}),
       st.sampled_from([None, {0: -100.0}, {0: 100.0}, {1: 100.0, 2: -100.0}, {5: 1e-300}]),
       st.integers(0, 2**32))
def test_extreme_sampling_values_still_pick_a_token(values, logit_bias, seed):
    vocab = 64
    params = SamplingParams(**values, logit_bias=logit_bias, seed=seed)
    sampler = TokenSampler(params)
    history = [0, 1, 2, 0, 7, 2]
    sampled = sampler(_edge_logits(vocab, np.random.default_rng(seed)), history, n_prompt=3)
    assert 0 <= sampled.token_id < vocab
    assert math.isfinite(sampled.logprob)
    assert not np.isnan(sampled.logprobs).any()
    if logit_bias and 0 in logit_bias and logit_bias[0] == -100.0:
        assert sampled.token_id != 0


def test_tiny_repeat_penalty_saturates_instead_of_overflowing():
    # 30 / 5e-324 overflows float32: held at the largest float32, so the seen positive token ranks first.
    sampler = TokenSampler(SamplingParams(temperature=0, repeat_penalty=5e-324, repeat_last_n=-1))
    logits = np.array([30.0, -30.0, 0.0, 40.0], dtype=np.float32)
    sampled = sampler(logits, [0, 1, 2], n_prompt=3)
    assert sampled.token_id == 0 and math.isfinite(sampled.logprob)
    # huge penalty: the seen positive logit falls to ~0, the seen negative one is held at -max (never +-inf)
    sampler = TokenSampler(SamplingParams(temperature=0, repeat_penalty=1e300, repeat_last_n=-1))
    out = sampler.processors[0](logits, [0, 1], 2)
    assert out[0] == 0.0 and out[1] == -np.finfo(np.float32).max and out[3] == 40.0


def test_banned_logits_stay_banned_under_a_saturating_penalty():
    ban_then_penalise = [lambda logits, h, n: np.where(np.arange(logits.size) == 1, -np.inf, logits)]
    sampler = TokenSampler(SamplingParams(temperature=1.0, repeat_penalty=5e-324, seed=1), ban_then_penalise)
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert sampler(logits, [1], 1).logprobs[1] == -np.inf
