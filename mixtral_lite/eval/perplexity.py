"""Perplexity of a text with a sliding window, and KL divergence against a reference model.

The text is tokenised once (BOS first) and read in windows of ``context`` tokens, each ending
``stride`` tokens after the previous one; each window scores only the tokens the previous one did
not, so every token after BOS is scored exactly once, seeing at least ``context - stride - 1``
tokens before it (``stride = context - 1``: windows that overlap by one token; a smaller stride
gives each scored token more context at more cost). This is Hugging Face's perplexity guide's
sliding window; llama.cpp's ``llama-perplexity`` instead scores the second half of disjoint chunks,
so its numbers are close to ``stride = context / 2`` but not equal.

With a ``reference`` model the same windows run through it too, and for every scored token the KL
divergence KL(P_ref || P_model) of the two next-token distributions and whether their top-1 tokens
agree are recorded (what ``llama-perplexity --kl-divergence`` reports for a quantised model against
the full-precision one).

Axis legend: T tokens of a window, V vocabulary.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..generation.tokenizer import Tokenizer
from ..model.mixtral import Mixtral

# Without a --context the window is the model's context, capped here: the logits of one window are
# [context, V] float32 (Mixtral's 32768 positions would be 4 GiB of logits per window).
MAX_DEFAULT_CONTEXT = 2048


@dataclass
class EvalResult:
    """What ``evaluate`` measured. ``nll``: mean negative log-likelihood (nats/token) of the scored
    tokens; ``bytes``: UTF-8 bytes of the text they cover (for nats and bits per byte, which compare
    models with different tokenisers). KL fields are None without a reference."""

    tokens: int
    windows: int
    context: int
    stride: int
    nll: float
    ppl: float
    bytes: int
    nats_per_byte: float
    bits_per_byte: float
    reference_nll: float | None = None
    reference_ppl: float | None = None
    ppl_ratio: float | None = None  # ppl / reference_ppl
    kl_mean: float | None = None  # nats, mean over scored tokens of KL(P_ref || P_model)
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None  # share of scored tokens whose argmax is the same

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"tokens scored {self.tokens:,} in {self.windows} windows (context {self.context}, stride {self.stride})",
            f"perplexity {self.ppl:.4f}  ({self.nll:.4f} nats/token, {self.nats_per_byte:.4f} nats/byte, "
            f"{self.bits_per_byte:.4f} bits/byte over {self.bytes:,} bytes)",
        ]
        if self.kl_mean is not None:
            lines.append(
                f"reference perplexity {self.reference_ppl:.4f}  (ratio {self.ppl_ratio:.4f}, "
                f"{(self.ppl_ratio - 1) * 100:+.2f}%)"
            )
            lines.append(
                f"KL(reference || model) mean {self.kl_mean:.6f}, median {self.kl_median:.6f}, "
                f"p99 {self.kl_p99:.6f}, max {self.kl_max:.6f} nats; top-1 agreement {self.top1_agreement:.2%}"
            )
        return "\n".join(lines)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over ``n_tokens`` tokens: (begin, end, first scored position) each, covering
    every position 1 .. n_tokens - 1 exactly once (position 0 is BOS and is never predicted). The
    first window scores all but its first token; each later one ends ``stride`` tokens further and
    scores just those, with the ``context - stride`` tokens before them as context."""
    if context < 2:
        raise UserError(f"context: expected at least 2 tokens, got {context}", param="context")
    if not 1 <= stride < context:
        raise UserError(f"stride: expected 1 .. context - 1 ({context - 1}), got {stride}", param="stride")
    end = min(context, n_tokens)
    out = [(0, end, 1)] if n_tokens > 1 else []
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        out.append((max(0, end - context), end, first))
    return out


@torch.no_grad()
def evaluate(
    model: Mixtral,
    tokenizer: Tokenizer,
    text: str,
    *,
    reference: Mixtral | None = None,
    context: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``text`` (and KL / top-1 agreement against ``reference``, a
    model with the same vocabulary, on the same tokens). ``context``: window length (default the
    model's context, at most ``MAX_DEFAULT_CONTEXT``); ``stride``: default half the window;
    ``max_tokens``: score only the first that many tokens of the text."""
    if context is None:
        context = min(model.config.max_position_embeddings, MAX_DEFAULT_CONTEXT)
    if context > model.config.max_position_embeddings:
        raise UserError(
            f"context: the model was made for {model.config.max_position_embeddings} positions, got {context}",
            param="context",
        )
    stride = context // 2 if stride is None else stride
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise UserError(
            f"reference: expected the model's vocabulary ({model.config.vocab_size} tokens), "
            f"got {reference.config.vocab_size}",
            param="reference",
        )
    ids = tokenizer.encode(text, bos=False)
    if max_tokens is not None:
        if max_tokens < 1:
            raise UserError(f"max_tokens: expected at least 1, got {max_tokens}", param="max_tokens")
        ids = ids[:max_tokens]
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else (ids[0] if ids else None)
    if bos is None or len(ids) < 1 or (tokenizer.bos_id is None and len(ids) < 2):
        raise UserError("text: no tokens to score (the text is empty)")
    tokens = torch.tensor([bos, *ids] if tokenizer.bos_id is not None else ids, dtype=torch.long)
    spans = windows(len(tokens), context, stride)
    nll = torch.zeros((), dtype=torch.float64)
    ref_nll = torch.zeros((), dtype=torch.float64)
    kls: list[torch.Tensor] = []
    agree = 0
    bar = _progress(len(spans), progress)
    try:
        for begin, end, first in spans:
            window = tokens[begin:end][None].to(model.device)  # [1, T]
            targets = tokens[first:end]  # what positions first-1 .. end-2 predict
            logp = _scored_log_probs(model, window, first - begin)  # [n, V] float32
            nll += -logp.gather(1, targets[:, None].to(logp.device)).double().sum().cpu()
            if reference is not None:
                ref_logp = _scored_log_probs(reference, window.to(reference.device), first - begin).to(logp.device)
                ref_nll += -ref_logp.gather(1, targets[:, None].to(logp.device)).double().sum().cpu()
                # KL(P_ref || P) = sum_v p_ref (log p_ref - log p), per scored token
                kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).cpu())
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    n = len(tokens) - 1
    scored_text = tokenizer.decode(tokens[1:].tolist()) if tokenizer.bos_id is not None else text
    n_bytes = max(len(scored_text.encode("utf-8")), 1)
    mean = nll.item() / n
    result = EvalResult(
        tokens=n,
        windows=len(spans),
        context=context,
        stride=stride,
        nll=mean,
        ppl=math.exp(mean),
        bytes=n_bytes,
        nats_per_byte=nll.item() / n_bytes,
        bits_per_byte=nll.item() / n_bytes / math.log(2),
    )
    if reference is not None:
        kl = torch.cat(kls).double()
        ref_mean = ref_nll.item() / n
        result.reference_nll = ref_mean
        result.reference_ppl = math.exp(ref_mean)
        result.ppl_ratio = result.ppl / result.reference_ppl
        result.kl_mean = kl.mean().item()
        result.kl_median = kl.median().item()
        result.kl_p99 = (
            torch.quantile(kl, 0.99).item() if kl.numel() <= 2**24 else kl.sort().values[-kl.numel() // 100].item()
        )
        result.kl_max = kl.max().item()
        result.top1_agreement = agree / n
    return result


def _scored_log_probs(model: Mixtral, window: torch.Tensor, skip: int) -> torch.Tensor:
    """log-softmax (float32) of the model's next-token logits at positions skip-1 .. T-2 of the
    window: the predictions of its scored tokens [n, V]."""
    logits = model(window)[0, skip - 1 : -1]  # [n, V]
    return F.log_softmax(logits.float(), dim=-1)


def _progress(total: int, progress: bool | None):
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="window", file=sys.stderr, delay=0 if progress else 1.0, leave=False)


__all__ = ["MAX_DEFAULT_CONTEXT", "EvalResult", "evaluate", "windows"]
