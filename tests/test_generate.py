"""Generation on tiny random models with the real Mistral v1 tokenizer.

Cached greedy decoding must equal recomputing the whole sequence and transformers' greedy
``generate`` on the same weights; batches (left padded) must equal one prompt at a time; the cache
must honour a sliding window shorter than the sequence.
"""

from __future__ import annotations

import pytest
import torch
from gen_fixtures import MISTRAL_V1, greedy_margins, make_model_folder, one_thread  # noqa: F401 (autouse fixture)

from mixtral_lite.errors import UserError
from mixtral_lite.generation import generate as gen
from mixtral_lite.generation.generate import decode_step, generate, prefill, stream
from mixtral_lite.generation.sampling import apply_repetition_penalty
from mixtral_lite.generation.tokenizer import load_tokenizer
from mixtral_lite.model.cache import KVCache
from mixtral_lite.weights.loading import load_model

PROMPTS = ["The quick brown fox", "Xin chào thế giới 🦙", "a", "Once upon a time, in a land far away, there was"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = make_model_folder(path, seed=0, max_position_embeddings=96)
    return hf, load_model(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    path = tmp_path_factory.mktemp("window")
    hf = make_model_folder(path, seed=1, sliding_window=5)
    return hf, load_model(path), load_tokenizer(path)


def uncached_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """The reference: recompute the whole sequence for every new token."""
    ids, new, logprobs = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            token = int(logits.argmax())
            new.append(token)
            logprobs.append(float(logits.log_softmax(-1)[token]))
            ids.append(token)
    return new, logprobs


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("fixture", ["tiny", "windowed"])
def test_cached_greedy_equals_recomputation_and_transformers(fixture, request):
    """Exact token equality over 24 steps; every choice is at least 0.01 logits away from a tie, so
    the comparison is meaningful; log-probabilities agree within 1e-4."""
    hf, model, tok = request.getfixturevalue(fixture)
    ids = tok.encode("The quick brown fox jumps")
    n = 24
    result = generate(model, tok, ids, max_new_tokens=n)
    assert result.finish_reason == "length" and len(result.token_ids) == n
    reference, ref_logprobs = uncached_greedy(model, ids, n)
    assert result.token_ids == reference
    assert hf_greedy(hf, ids, n) == reference
    assert min(greedy_margins(model, ids, reference)) > 0.01
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=0)


def test_cached_logits_equal_recomputation_with_sliding_window(windowed):
    """Prefill + decode steps of a left-padded batch give each row the logits of recomputing its
    own unpadded sequence (window 5, sequences up to 21 tokens): max abs difference <= 1e-4."""
    _, model, tok = windowed
    assert model.config.sliding_window == 5
    prompts = [tok.encode("Hello there, how are you today?"), tok.encode("Hi")]
    lengths = [len(p) for p in prompts]
    t, steps = max(lengths), 12
    input_ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - n) + [1] * n for n in lengths])
    cache = KVCache(model.config, 2, t + steps)
    seqs = [list(p) for p in prompts]
    follow = torch.randint(3, 32000, (steps, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = prefill(model, input_ids, cache, mask)
        for step in range(steps + 1):
            for row in range(2):
                expected = model(torch.tensor([seqs[row]]))[0, -1]
                torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0)
            if step == steps:
                break
            tokens = follow[step]
            for row in range(2):
                seqs[row].append(int(tokens[row]))
            positions = torch.tensor([[n + step] for n in lengths])
            logits = decode_step(model, tokens[:, None], cache, torch.tensor([t + step]), positions)
    assert max(len(s) for s in seqs) > 3 * model.config.sliding_window


def test_batched_equals_one_by_one(tiny):
    """Left padding changes nothing: same tokens, texts and finish reasons; log-probs within 1e-4."""
    _, model, tok = tiny
    batch = generate(model, tok, PROMPTS, max_new_tokens=16)
    for prompt, got in zip(PROMPTS, batch, strict=True):
        alone = generate(model, tok, prompt, max_new_tokens=16)
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
    assert len({len(tok.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # really different lengths


def test_a_long_list_of_prompts_is_scheduled_not_padded(tiny, monkeypatch):
    """On the CPU a list of prompts runs through the continuous-batching engine, a few rows at a
    time (here 2 rows for 9 prompts): each result equals its prompt alone, stop strings and seeded
    samples included, and no batch is as wide as the list."""
    _, model, tok = tiny
    monkeypatch.setattr(gen, "SCHEDULED_ROWS", 2)
    widths = []
    real = gen.Engine.__init__
    monkeypatch.setattr(
        gen.Engine, "__init__", lambda self, *a, **kw: widths.append(kw["max_batch"]) or real(self, *a, **kw)
    )
    prompts = [PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)) for i in range(9)]
    for kw in (dict(stop=["e"]), dict(temperature=0.9, top_k=20, seed=7)):
        batch = generate(model, tok, prompts, max_new_tokens=12, **kw)
        for prompt, got in zip(prompts, batch, strict=True):
            alone = generate(model, tok, prompt, max_new_tokens=12, **kw)
            assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
            assert got.stop_reason == alone.stop_reason
        assert batch[0].stats.generated_tokens == sum(len(r.token_ids) for r in batch)
    assert widths == [2, 2]
    assert any(r.stop_reason == "e" for r in generate(model, tok, prompts, max_new_tokens=12, stop=["e"]))


def test_seeded_sampling_is_reproducible(tiny):
    _, model, tok = tiny
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, min_p=0.01)
    a = generate(model, tok, PROMPTS[:2], seed=5, **kw)
    b = generate(model, tok, PROMPTS[:2], seed=5, **kw)
    c = generate(model, tok, PROMPTS[:2], seed=6, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = generate(model, tok, PROMPTS[:2], max_new_tokens=20)
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


def test_stream_equals_final_text(tiny):
    _, model, tok = tiny
    for prompt in PROMPTS:
        for kw in (dict(), dict(temperature=1.0, seed=3)):
            pieces = stream(model, tok, prompt, max_new_tokens=30, **kw)
            text = "".join(pieces)
            assert text == pieces.result.text == generate(model, tok, prompt, max_new_tokens=30, **kw).text
    # a continuation keeps the first token's leading space; a chat answer does not
    ids = tok.encode("The quick brown fox")
    cont = generate(model, tok, ids, max_new_tokens=10)
    answer = generate(model, tok, ids, max_new_tokens=10, continuation=False)
    assert answer.text == tok.decode(answer.token_ids)
    assert cont.text == tok.decode(ids + cont.token_ids)[len(tok.decode(ids)) :]


def test_stream_multibyte_from_byte_tokens(tmp_path):
    """A model that mostly emits byte-fallback tokens: streamed pieces join to exactly the final text,
    which holds characters assembled from several byte tokens, and no piece has a broken one unless
    the final text has it at the same place."""
    hf = make_model_folder(tmp_path, seed=2, tokenizer="model")
    with torch.no_grad():  # favour the 256 byte tokens (ids 3..258): everything else scores 0
        hf.lm_head.weight[259:] = 0
        hf.lm_head.weight[3:259] *= 3
    hf.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path), load_tokenizer(tmp_path)
    pieces = stream(model, tok, "Tiếng Việt", max_new_tokens=200, temperature=1.0, seed=0)
    text = "".join(pieces)
    assert text == pieces.result.text
    assert sum(i in tok.byte_ids for i in pieces.result.token_ids) > 150
    multibyte = [c for c in text if ord(c) > 127 and c != "\ufffd"]
    assert multibyte, "the test needs characters made of several bytes"


def test_stop_strings(tiny):
    _, model, tok = tiny
    full = generate(model, tok, PROMPTS[0], max_new_tokens=30)
    stop = full.text[12:16]
    cut = full.text.index(stop)
    result = generate(model, tok, PROMPTS[0], max_new_tokens=30, stop=["never there", stop])
    assert (result.text, result.finish_reason) == (full.text[:cut], "stop")
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    pieces = stream(model, tok, PROMPTS[0], max_new_tokens=30, stop=stop)
    assert "".join(pieces) == result.text and pieces.result.finish_reason == "stop"
    assert result.stop_reason == pieces.result.stop_reason == stop


def test_eos_ends_a_row(tiny):
    _, model, _ = tiny
    tok = load_tokenizer(MISTRAL_V1)  # a fresh copy: this test changes its eos_id
    full = generate(model, tok, PROMPTS, max_new_tokens=12)
    tok.eos_id = full[0].token_ids[3]  # the same tokenizer, with a token the model is about to emit as EOS
    results = generate(model, tok, PROMPTS, max_new_tokens=12)
    assert (results[0].finish_reason, results[0].stop_reason) == ("stop", None)  # OpenAI's word for EOS
    assert results[0].token_ids == full[0].token_ids[:3]
    for got, before in zip(results[1:], full[1:], strict=True):
        if tok.eos_id in before.token_ids:
            assert got.token_ids == before.token_ids[: before.token_ids.index(tok.eos_id)]
        else:
            assert got.token_ids == before.token_ids and got.finish_reason == "length"


def test_decode_steps_and_context_limit(tiny):
    """n new tokens take n - 1 decode steps; near the context end the budget shrinks to fit."""
    _, model, tok = tiny
    calls = []

    def counting(*args):
        calls.append(1)
        return decode_step(*args)

    generate(model, tok, PROMPTS[0], max_new_tokens=9, decode_fn=counting)
    assert len(calls) == 8
    context = model.config.max_position_embeddings
    result = generate(model, tok, [5] * (context - 3), max_new_tokens=50)
    assert (len(result.token_ids), result.finish_reason) == (3, "length")


def test_vocabulary_beyond_the_tokenizer_is_never_sampled(tmp_path):
    """A model with 32064 logits and a 32000-token tokenizer: the extra ids would win greedy
    decoding, but generation only samples ids the tokenizer can decode."""
    hf = make_model_folder(tmp_path, seed=0, vocab_size=32064)
    with torch.no_grad():
        hf.lm_head.weight[32000:] = hf.lm_head.weight[:64] * 10
    hf.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path), load_tokenizer(tmp_path)
    with torch.no_grad():
        assert int(model(torch.tensor([tok.encode("Hi")]))[0, -1].argmax()) >= 32000
    result = generate(model, tok, "Hi", max_new_tokens=10, temperature=1.0, seed=0)
    assert max(result.token_ids) < 32000


@pytest.mark.parametrize("penalty", [0.01, 1e4])
def test_repetition_penalty_follows_its_definition(tiny, penalty):
    """Equal to recomputing with the CTRL penalty over prompt + generated tokens; a penalty below 1
    makes this model repeat (at least half its tokens were seen before), above 1 it never repeats."""
    _, model, tok = tiny
    ids = tok.encode("the cat and the dog and the bird")
    result = generate(model, tok, ids, max_new_tokens=16, repetition_penalty=penalty)
    seq, seen_before = list(ids), 0
    with torch.no_grad():
        for token in result.token_ids:
            logits = model(torch.tensor([seq]))[0, -1:]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, seq] = True
            assert int(apply_repetition_penalty(logits, seen, penalty).argmax()) == token
            seen_before += token in seq
            seq.append(token)
    if penalty < 1:
        assert seen_before >= len(result.token_ids) / 2
    else:
        assert seen_before == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "^temperature: "),
        (dict(top_p=0.0), "^top_p: "),
        (dict(top_p=1.5), "^top_p: "),
        (dict(top_k=0), "^top_k: "),
        (dict(max_new_tokens=0), "^max_new_tokens: "),
        (dict(stop=[""]), "^stop: "),
        (dict(prompts=""), "prompt: empty"),
        (dict(prompts=[]), "at least one prompt"),
        (dict(prompts=[[]]), "prompt: empty list"),
        (dict(prompts=["ok", ""]), "prompt 2: empty"),
        (dict(prompts=[[1, 32000]]), r"token ids must be integers in \[0, 32000\)"),
        (dict(prompts=[[5] * 96]), "prompt: 96 tokens, longer than the model's context allows"),
    ],
)
def test_bad_arguments_raise_user_error(tiny, kwargs, message):
    _, model, tok = tiny
    kwargs = {"prompts": "Hello", "max_new_tokens": 4, **kwargs}
    with pytest.raises(UserError, match=message):
        generate(model, tok, kwargs.pop("prompts"), **kwargs)
    if isinstance(kwargs.get("temperature"), float):
        with pytest.raises(UserError, match=message):
            stream(model, tok, "Hello", **kwargs)  # checked when the stream is made, not when read


def test_stop_string_in_held_text(tiny):
    """Text that could start a stop string is held back; once the stop string completes, nothing
    after it comes out, even what the detokeniser still held."""
    from mixtral_lite.generation.detok import RowText

    _, _, tok = tiny
    ids = tok.encode("one two three 🦙 four", bos=False)
    row = RowText(tok, [], ["thr", "🦙 f"])
    pieces = []
    for i in ids:
        piece, stopped = row.push(i)
        pieces.append(piece)
        if stopped:
            break
    pieces.append(row.finish())
    assert "".join(pieces) == row.text == "one two "
    assert row.finish() == ""
    row = RowText(tok, [], ["🦙 f"])
    pieces = [row.push(i)[0] for i in ids + ids] + [row.finish()]  # pushing on after the stop adds nothing
    assert "".join(pieces) == row.text == "one two three "
