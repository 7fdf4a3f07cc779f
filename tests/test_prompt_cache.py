"""A PromptCache between calls: the next prompt runs only its new tokens, with the same answer.

A conversation's second turn extends the first turn's prompt and answer; its prefill must cover
only the tokens after the cached prefix, and every token and log-probability must equal a run
without the cache (the reference). Seeded sampling must not depend on the batch.
"""

from __future__ import annotations

import pytest
import torch
from gen_fixtures import make_model_folder, one_thread  # noqa: F401 (autouse fixture)

from mixtral_lite import PromptCache, generate
from mixtral_lite.commands.chat import ChatSession
from mixtral_lite.cpu import uninstall_cpu_kernels
from mixtral_lite.errors import UserError
from mixtral_lite.generation.tokenizer import load_tokenizer
from mixtral_lite.weights.loading import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_model_folder(path, seed=0, max_position_embeddings=600)
    return path, load_model(path), load_tokenizer(path)


@pytest.mark.parametrize("kernels", [True, False])
def test_second_call_prefills_only_the_new_tokens_and_matches_a_fresh_run(tiny, kernels):
    path, model, tok = tiny
    if not kernels:
        model = load_model(path)
        uninstall_cpu_kernels(model)  # generate leaves a model without kernels as it is
    cache = PromptCache()
    first = tok.encode("The quick brown fox", bos=True)
    r1 = generate(model, tok, first, cache=cache, max_new_tokens=12)
    assert r1.stats.cached_tokens == 0
    second = first + r1.token_ids + tok.encode(" and then", bos=False)
    r2 = generate(model, tok, second, cache=cache, max_new_tokens=12)
    fresh = generate(model, tok, second, max_new_tokens=12)
    assert r2.token_ids == fresh.token_ids
    torch.testing.assert_close(torch.tensor(r2.logprobs), torch.tensor(fresh.logprobs), atol=1e-4, rtol=0)
    # everything before " and then" was in the cache: the first turn's prompt and all but its last token
    assert r2.stats.cached_tokens >= len(first) + len(r1.token_ids) - 1
    assert r2.stats.cached_tokens < len(second)


def test_a_prompt_that_diverges_reuses_only_the_common_prefix(tiny):
    _, model, tok = tiny
    cache = PromptCache()
    a = tok.encode("Once upon a time there was a king", bos=True)
    generate(model, tok, a, cache=cache, max_new_tokens=4)
    b = tok.encode("Once upon a time there lived", bos=True)
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    r = generate(model, tok, b, cache=cache, max_new_tokens=6)
    assert r.stats.cached_tokens == common
    assert r.token_ids == generate(model, tok, b, max_new_tokens=6).token_ids


def test_the_cache_grows_when_the_conversation_outgrows_it(tiny):
    _, model, tok = tiny
    cache = PromptCache()
    ids = tok.encode("a b c", bos=True)
    r = generate(model, tok, ids, cache=cache, max_new_tokens=4)
    small = cache.kv.max_seq_len
    longer = ids + r.token_ids + tok.encode(" word" * 200, bos=False)
    r2 = generate(model, tok, longer, cache=cache, max_new_tokens=100)
    assert cache.kv.max_seq_len > small
    assert r2.stats.cached_tokens > 0
    assert r2.token_ids == generate(model, tok, longer, max_new_tokens=100).token_ids


def test_a_cache_takes_one_prompt(tiny):
    _, model, tok = tiny
    with pytest.raises(UserError, match="cache: a PromptCache serves one prompt per call"):
        generate(model, tok, ["a", "b"], cache=PromptCache())


def test_chat_second_turn_runs_only_its_new_tokens(tiny):
    """The chat session keeps its cache: turn 2's prefill is its new tokens, not the conversation."""
    _, model, tok = tiny
    session = ChatSession(model, tok, max_new_tokens=8, temperature=0.0)
    session.ask("Hello there", lambda piece: None)
    turn1 = session.last_result
    session.ask("Tell me more", lambda piece: None)
    turn2 = session.last_result
    assert turn2.stats.cached_tokens >= turn1.prompt_tokens  # at least the whole first prompt
    fresh = generate(model, tok, session.tokenizer.encode_chat(session.messages()[:-1]), max_new_tokens=8,
                     continuation=False)  # fmt: skip
    assert turn2.token_ids == fresh.token_ids
    session.reset()
    assert session.cache.kv is None


def test_seeded_sample_is_the_same_alone_and_in_any_batch(tiny):
    _, model, tok = tiny
    prompts = ["The quick brown fox", "Xin chào", "a", "Once upon a time"]
    opts = dict(max_new_tokens=16, temperature=1.0, top_k=50, seed=1234)
    alone = [generate(model, tok, p, **opts).token_ids for p in prompts]
    batched = [r.token_ids for r in generate(model, tok, prompts, **opts)]
    reordered = [r.token_ids for r in generate(model, tok, prompts[::-1], **opts)][::-1]
    assert batched == alone
    assert reordered == alone
    assert len({tuple(a) for a in alone}) > 1  # the prompts do sample differently


def test_a_compiled_steps_pool_reuses_one_cache_per_bucket(tiny):
    """A decode_fn with a CachePool (what compile_decode_step returns) gets the same cache object
    for calls whose lengths fall in one bucket, lengths rounded up; tokens equal the plain step's."""
    from mixtral_lite.generation.cache_pool import CachePool
    from mixtral_lite.generation.generate import decode_step

    _, model, tok = tiny
    seen = []

    def step(model, tokens, cache, slot, positions):
        seen.append(cache)
        return decode_step(model, tokens, cache, slot, positions)

    step.cache_pool = CachePool(bucket=64, size=2)
    prompts = ["The quick brown fox", "Once upon a time, in a land far away"]
    for p in prompts:
        for n in (5, 20):
            assert generate(model, tok, p, max_new_tokens=n, decode_fn=step).token_ids == \
                generate(model, tok, p, max_new_tokens=n).token_ids  # fmt: skip
    assert len({id(c) for c in seen}) == 1  # every length fitted the first 64-slot bucket
    assert seen[0].max_seq_len == 64
    generate(model, tok, prompts[0], max_new_tokens=100, decode_fn=step)
    assert seen[-1].max_seq_len == 128 and seen[-1] is not seen[0]
