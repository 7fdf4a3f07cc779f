"""Tokenizer loading, encode/decode, and the incremental detokeniser used for streaming."""

from __future__ import annotations

import random
import shutil

import pytest
from gen_fixtures import MISTRAL_V1, one_thread, write_tokenizer_json  # noqa: F401 (autouse fixture)

from mixtral_lite.errors import UserError
from mixtral_lite.generation import detok
from mixtral_lite.generation.detok import Detokenizer, continuation_text
from mixtral_lite.generation.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

TEXTS = [
    "Hello world",
    " leading space",
    "trailing spaces  ",
    "two  spaces\tand a tab\n\nnew lines",
    "Tiếng Việt có dấu: ỹ ẵ ợ",
    "中文 한국어 日本語 𠜎",
    "emoji 🦙🤗😀 and ꙮ",
    "literal </s> and <s> and [INST] are text",
    "",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    both = tmp_path_factory.mktemp("both")
    shutil.copy(MISTRAL_V1, both / "tokenizer.model")
    write_tokenizer_json(MISTRAL_V1, both)
    json_only = tmp_path_factory.mktemp("json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(both / name, json_only / name)
    return both, json_only


@pytest.fixture(scope="module")
def sp(folders):
    return load_tokenizer(folders[0])


@pytest.fixture(scope="module")
def hf(folders):
    return load_tokenizer(folders[1])


def test_folder_prefers_sentencepiece_then_json(folders, tmp_path):
    assert isinstance(load_tokenizer(folders[0]), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(folders[1]), HFTokenizer)
    assert isinstance(load_tokenizer(folders[0] / "tokenizer.json"), HFTokenizer)
    with pytest.raises(UserError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_special_ids_and_vocab(sp, hf):
    for tok in (sp, hf):
        assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
        assert tok.chat_format == "v1"
    assert sp.encode("Hello world") == [1, 22557, 1526]
    assert sp.encode("Hello world", bos=False) == [22557, 1526]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_json_equals_sentencepiece(sp, hf, text):
    """The tokenizer.json path gives the same ids and text as the SentencePiece model (exact)."""
    assert hf.encode(text) == sp.encode(text)
    ids = sp.encode(text, bos=False)
    assert hf.decode(ids) == sp.decode(ids) == text


def test_special_tokens_decode_to_nothing(sp, hf):
    for tok in (sp, hf):
        assert tok.decode([1, 22557, 1526, 2]) == "Hello world"


def _stream(tok, ids, context=()):
    d = Detokenizer(tok.decode, context, anchor=tok.encode("a", bos=False), byte_ids=tok.byte_ids)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    return pieces, d


def _byte_ids(tok, text):
    """Ids of ``text`` spelled entirely with byte-fallback tokens (<0xNN>)."""
    return [3 + b for b in text.encode("utf-8")]


def test_byte_ids(sp, hf):
    assert sp.byte_ids == hf.byte_ids == frozenset(range(3, 259))
    assert [sp.sp.id_to_piece(i) for i in _byte_ids(sp, "é")] == ["<0xC3>", "<0xA9>"]


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_streamed_pieces_concatenate_to_decode(which, sp, hf):
    """Pieces of encoded multilingual text, of byte-fallback spellings and of random ids join to
    exactly decode(ids), never emit a broken character, and the window re-anchors on long inputs."""
    tok = sp if which == "sp" else hf
    rng = random.Random(0)
    cases = [tok.encode(t, bos=False) for t in TEXTS]
    cases.append(tok.encode(" ".join(TEXTS) * 3, bos=False))  # long: forces re-anchoring
    cases.append(_byte_ids(tok, "Việt 🦙 日本") + tok.encode(" and more 🤗 text", bos=False) + _byte_ids(tok, "ợ"))
    cases.append([28705] * 40 + tok.encode("spaces", bos=False))  # lone "▁" pieces
    for _ in range(30):  # random ids, many of them byte tokens (broken UTF-8 included)
        cases.append([rng.choice([rng.randrange(3, 259), rng.randrange(259, 32000)]) for _ in range(60)])
    anchored = 0
    for ids in cases:
        pieces, d = _stream(tok, ids)
        expected = tok.decode(ids)
        assert "".join(pieces) == expected
        if "\ufffd" not in expected:
            assert all("\ufffd" not in p for p in pieces)
        anchored += d._anchored
    assert anchored >= 5  # the re-anchoring path ran, and kept the text exact


def test_multibyte_character_is_held_until_complete(sp):
    ids = _byte_ids(sp, "🦙")  # four byte tokens, one character
    pieces, _ = _stream(sp, ids + [1526])
    assert pieces == ["", "", "", "", "🦙 world", ""]  # held until the run of bytes ends
    pieces, _ = _stream(sp, ids)
    assert pieces == ["", "", "", "", "🦙"]  # or until the end


def test_context_keeps_the_leading_space(sp):
    """After a prompt, the first piece keeps its SentencePiece space: " Paris", not "Paris"."""
    context = sp.encode("The capital of France is")
    ids = sp.encode(" Paris. Tiếng Việt 🦙", bos=False)[1:]  # drop the lone "▁" of the leading space
    pieces, _ = _stream(sp, ids, context)
    assert pieces[0] == " Paris"
    full = sp.decode(context + ids)
    assert "".join(pieces) == full[len(sp.decode(context)) :] == continuation_text(sp.decode, context, ids)
    assert "".join(pieces) == " Paris. Tiếng Việt 🦙"


def test_window_stays_short(sp, monkeypatch):
    """Decoding cost per token is bounded: the window never exceeds MAX_WINDOW + 1 tokens here."""
    ids = sp.encode("A long text in plain words. " * 40, bos=False)
    d = Detokenizer(sp.decode, anchor=sp.encode("a", bos=False))
    longest = 0
    for i in ids:
        d.push(i)
        longest = max(longest, len(d._ids))
    assert longest <= detok.MAX_WINDOW + 1
