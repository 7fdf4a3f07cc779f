"""Sampling definitions on hand-made logits: penalty, temperature, top-k, top-p, min-p, seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from mixtral_lite.errors import UserError
from mixtral_lite.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # a row with known probabilities
LOGITS = PROBS.log()
INF = float("-inf")


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(top_k_filter(LOGITS, 1)) == [0]
    assert kept(top_k_filter(LOGITS, 3)) == [0, 1, 2]
    assert kept(top_k_filter(LOGITS, 10)) == [0, 1, 2, 3]  # k beyond the vocabulary keeps all


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, [0]),
        (0.5, [0]),
        (0.5001, [0, 1]),
        (0.8, [0, 1]),
        (0.8001, [0, 1, 2]),
        (0.95, [0, 1, 2]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_smallest_set_reaching_p(p, expected):
    """Nucleus: the smallest set of most likely tokens whose probability sums to >= p."""
    shuffled = torch.tensor([[2, 0, 3, 1]])  # order in the vocabulary must not matter
    logits = LOGITS[:, shuffled[0]]
    out = top_p_filter(logits, p)
    assert sorted(shuffled[0, kept(out)].tolist()) == expected


def test_min_p_keeps_relative_to_the_top():
    assert kept(min_p_filter(LOGITS, 0.5)) == [0, 1]  # threshold 0.25
    assert kept(min_p_filter(LOGITS, 0.3)) == [0, 1, 2]  # threshold 0.15 (0.15 is kept)
    assert kept(min_p_filter(LOGITS, 1.0)) == [0]
    assert kept(min_p_filter(LOGITS, 0.0)) == [0, 1, 2, 3]


def test_temperature_scales_logits():
    out = process_logits(LOGITS, SamplingParams(temperature=0.5))
    expected = PROBS**2 / (PROBS**2).sum()  # softmax(log p / 0.5) = p^2 normalised
    torch.testing.assert_close(out.softmax(-1), expected, atol=1e-6, rtol=0)


def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # positive / 2, negative * 2, unseen unchanged


def test_filters_apply_after_temperature():
    """top-p counts probabilities after temperature: at T=0.5 the top token alone holds 0.25/0.365 = 0.685."""
    params = SamplingParams(temperature=0.5, top_p=0.68)
    assert kept(process_logits(LOGITS, params)) == [0]
    assert kept(process_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.68))) == [0, 1]


def test_greedy_is_argmax_and_logprobs_are_the_models():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits, SamplingParams(temperature=0.0))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).max(-1).values, atol=1e-6, rtol=0)
    # the penalty changes the choice but not the reported log-probability's definition
    seen = torch.zeros(5, 100, dtype=torch.bool).scatter(1, tokens[:, None], True)
    t2, lp2 = sample(logits, SamplingParams(temperature=0.0, repetition_penalty=1e6), seen=seen)
    assert (t2 != tokens).all()
    torch.testing.assert_close(lp2, logits.log_softmax(-1).gather(1, t2[:, None])[:, 0], atol=1e-6, rtol=0)


N = 40_000  # draws; a frequency's standard error is at most 0.0025


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
        (SamplingParams(temperature=0.5), [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]),
        (SamplingParams(temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (SamplingParams(temperature=1.0, min_p=0.25), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    ],
)
def test_sampled_frequencies_follow_the_distribution(params, expected):
    """Frequencies of N seeded draws within 0.012 (about 5 standard errors) of the filtered,
    renormalised probabilities; filtered tokens are never drawn."""
    logits = LOGITS.expand(N, 4)
    tokens, _ = sample(logits, params, make_generator(0, "cpu"))
    freq = torch.bincount(tokens, minlength=4).float() / N
    for f, e in zip(freq.tolist(), expected, strict=True):
        assert math.isclose(f, e, abs_tol=0.012), (freq.tolist(), expected)
        if e == 0:
            assert f == 0


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a, _ = sample(logits, params, make_generator(7, "cpu"))
    b, _ = sample(logits, params, make_generator(7, "cpu"))
    c, _ = sample(logits, params, make_generator(8, "cpu"))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_parameters_name_the_python_parameter(kwargs, flag):
    """A Python call names its own parameter (a ValueError); the CLI shows the flag (test_cli_generate)."""
    with pytest.raises(ValueError, match=f"^{flag}: ") as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, UserError) and err.value.param == flag
    assert err.value.for_flag().startswith("--" + flag.replace("_", "-") + ": ")
