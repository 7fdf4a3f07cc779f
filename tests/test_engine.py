"""The continuous-batching engine: every request's tokens equal ``generate()`` of it alone."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite import load_model, load_tokenizer
from mixtral_lite.commands.generate import BUNDLED
from mixtral_lite.errors import UserError
from mixtral_lite.generation.engine import Engine, QueueFull, SeqRequest
from mixtral_lite.generation.generate import generate
from mixtral_lite.generation.sampling import SamplingParams

TEXTS = ["Once upon a time", "The king", "She opened the door and saw", "Hi", "Tom had a red ball. One day, he went"]


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED, progress=False), load_tokenizer(BUNDLED)


def mixed_requests(tokenizer, count: int) -> list[tuple[SeqRequest, dict]]:
    """``count`` requests of different prompts, lengths and parameters, with generate()'s kwargs."""
    out = []
    for i in range(count):
        ids = tokenizer.encode(TEXTS[i % len(TEXTS)] + " x" * (i // len(TEXTS)))
        kw = dict(max_new_tokens=3 + 5 * (i % 4), temperature=0.0 if i % 2 == 0 else 0.9, seed=100 + i)
        if i % 3 == 1:
            kw.update(top_k=40, top_p=0.9)
        if i % 4 == 3:
            kw.update(repetition_penalty=1.3)
        if i % 5 == 2:
            kw.update(stop=["\n"])
        params = SamplingParams(
            kw["temperature"], kw.get("top_k"), kw.get("top_p"), None, kw.get("repetition_penalty", 1.0)
        )
        req = SeqRequest(ids, kw["max_new_tokens"], params, seed=kw["seed"], stop=kw.get("stop", []))
        out.append((req, kw))
    return out


@pytest.mark.parametrize("rows, max_seq_len, chunk", [(4, 1024, 256), (4, 48, 5), (16, 1024, 256)])
def test_sixteen_mixed_requests_equal_generate_alone(bundled, rows, max_seq_len, chunk):
    """16 requests through 4 rows (rows join and leave mid-batch); (48, 5) also forces chunked
    prefill and repeated cache compaction; 16 rows prefill the prompts that join together in
    left-padded calls and decode all rows in one call per layer. Tokens must be identical, logprobs
    within 1e-4."""
    model, tokenizer = bundled
    pairs = mixed_requests(tokenizer, 16)
    engine = Engine(model, tokenizer, max_batch=rows, max_queue=16, max_seq_len=max_seq_len, prefill_chunk=chunk)
    joint = []
    together = engine._prefill_together
    engine._prefill_together = lambda group: joint.append(len(group)) or together(group)
    results = engine.generate([r for r, _ in pairs])
    if max_seq_len == 48:
        assert engine.metrics.repacks >= 2 and not joint  # 5-token chunks: no two prompts fit together
    if rows == 16:
        assert sum(joint) >= 8, joint
    for (req, kw), res in zip(pairs, results, strict=True):
        ref = generate(model, tokenizer, req.prompt, **kw)
        assert res.token_ids == ref.token_ids, kw
        assert res.text == ref.text
        assert res.finish_reason == ref.finish_reason
        assert max((abs(a - b) for a, b in zip(res.logprobs, ref.logprobs, strict=True)), default=0) < 1e-4
    assert engine.running == 0 and not engine.cache.valid.any()


def test_prompt_logprobs_equal_a_full_forward(bundled):
    model, tokenizer = bundled
    ids = tokenizer.encode("The king of the land was very old")
    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=3)  # three chunks
    (res,) = engine.generate([SeqRequest(ids, 1, prompt_logprobs=True, logprobs=2)])
    with torch.no_grad():
        lp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    want = lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(ids)
    assert torch.allclose(torch.tensor(res.prompt_logprobs[1:]), want, atol=1e-4)
    assert len(res.prompt_top_logprobs[1]) == 2


def test_cancel_frees_the_row_and_the_queue_is_bounded(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    ids = tokenizer.encode("Once upon a time")
    events = []
    a = engine.submit(SeqRequest(ids, 50), events.append)
    engine.submit(SeqRequest(ids, 50), lambda d: None)
    with pytest.raises(QueueFull):
        engine.submit(SeqRequest(ids, 50), lambda d: None)
    engine.step()
    assert engine.running == 1 and engine.queued == 1
    engine.cancel(a)
    engine.step()  # a leaves, the queued one joins
    assert events[-1].finish_reason == "cancelled" and engine.running == 1 and engine.queued == 0


def test_requests_that_cannot_fit_are_refused(bundled):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, max_batch=1, max_seq_len=32)
    with pytest.raises(UserError, match="longer than the context"):
        engine.check(SeqRequest(list(range(3, 40)), 1))
    with pytest.raises(UserError, match="max_tokens"):
        engine.check(SeqRequest([1, 5, 6], 30))
    with pytest.raises(UserError, match="max_tokens"):
        engine.check(SeqRequest([1, 5, 6], 0))
