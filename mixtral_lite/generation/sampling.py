"""Turning next-token logits into a token: penalties, filters, then greedy or seeded sampling.

Order (as in transformers): repetition penalty, temperature, top-k, top-p, min-p. Every filter
keeps the most likely token, so a filtered row never ends up empty. Filtered tokens get ``-inf``.

All functions take logits [B, V] (B rows, V vocabulary), work in float32 and never leave the device,
so a decode step can run them without a host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature: expected a number >= 0, got {self.temperature}", param="temperature")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k: expected an integer >= 1, got {self.top_k}", param="top_k")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p: expected a number in (0, 1], got {self.top_p}", param="top_p")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UserError(f"min_p: expected a number in [0, 1], got {self.min_p}", param="min_p")
        if not self.repetition_penalty > 0:
            raise UserError(
                f"repetition_penalty: expected a number > 0, got {self.repetition_penalty}", param="repetition_penalty"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen (``seen`` [B, V] bool): positive logits are divided
    by ``penalty``, negative ones multiplied, so a penalty > 1 always makes a seen token less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to >= p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = before >= p  # the first token has before == 0 < p: always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's probability."""
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Penalty, temperature and filters: the logits whose softmax is the sampling distribution."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None and params.min_p > 0:
        logits = min_p_filter(logits, params.min_p)
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row: tokens [B] and their log-probabilities [B] under the model's own
    (unpenalised, untempered) distribution, the number a caller can use to score the text.

    Sampling draws ``argmax(p / q)`` with ``q ~ Exp(1)``: an exact draw from ``p`` (the exponential
    race) that needs no host synchronisation, unlike ``torch.multinomial``. ``generator`` may be one
    per row: each row's draw then depends on its own generator only, not on the rows beside it.
    """
    processed = process_logits(logits, params, seen)
    if params.greedy:  # max's index: the first maximum, like argmax, and faster on the CPU
        tokens = processed.max(-1).indices
    else:
        probs = processed.softmax(-1)
        if isinstance(generator, Sequence):
            q = torch.stack(
                [torch.empty_like(row).exponential_(1.0, generator=g) for row, g in zip(probs, generator, strict=True)]
            )
        else:
            q = torch.empty_like(probs).exponential_(1.0, generator=generator)
        q = q.clamp_min_(torch.finfo(q.dtype).tiny)  # a zero draw would make 0/0 = nan for filtered tokens
        tokens = (probs / q).max(-1).indices
    logprobs = logits.float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """An explicit generator on the sampling device: seeded, or from fresh OS entropy when ``seed`` is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "make_generator",
    "min_p_filter",
    "process_logits",
    "sample",
    "top_k_filter",
    "top_p_filter",
]
