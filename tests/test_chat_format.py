"""Chat token ids equal mistral-common's, the reference the Mistral Instruct models were trained with."""

from __future__ import annotations

import pytest
from gen_fixtures import MISTRAL_V1, MISTRAL_V2, MISTRAL_V3, mistral_common_ids, write_tokenizer_json

from mixtral_lite.errors import UserError
from mixtral_lite.generation.tokenizer import load_tokenizer


def conv(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


CONVERSATIONS = {
    "one-user": conv(("user", "Hello")),
    "system": conv(("system", "You are terse."), ("user", "What is 2+2?")),
    "multi-turn": conv(
        ("user", "Hi"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Tell me a joke."),
        ("assistant", "No."),
        ("user", "Please?"),
    ),
    "system-multi-turn": conv(
        ("system", "Be kind."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "How are you?"),
    ),
    "two-systems": conv(("system", "Rule one."), ("system", "Rule two."), ("user", "Go")),
    "non-ascii": conv(
        ("system", "Trả lời bằng tiếng Việt."),
        ("user", "Xin chào! 你好 🦙"),
        ("assistant", "Chào bạn 😀 日本語"),
        ("user", "ꙮ 𠜎 ỹ ẵ ợ?"),
    ),
    "spaces-newlines": conv(
        ("user", "  padded  \n\nwith lines\n"),
        ("assistant", " leading and trailing "),
        ("user", "\tend\t"),
    ),
    "markers-in-text": conv(("user", "say [INST] and [/INST] and </s>"), ("assistant", "[/INST] </s>"), ("user", "ok")),
    "empty-user": conv(("user", "")),
    "empty-system": conv(("system", ""), ("user", "x")),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokjson")
    write_tokenizer_json(MISTRAL_V1, folder)
    return {
        "v1": (load_tokenizer(MISTRAL_V1), MISTRAL_V1),
        "v1-json": (load_tokenizer(folder / "tokenizer.json"), MISTRAL_V1),
        "v2": (load_tokenizer(MISTRAL_V2), MISTRAL_V2),
        "v3": (load_tokenizer(MISTRAL_V3), MISTRAL_V3),
    }


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("version", ["v1", "v1-json", "v2", "v3"])
def test_chat_ids_equal_mistral_common(tokenizers, version, name):
    tok, reference = tokenizers[version]
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == mistral_common_ids(reference, messages)


def test_formats_detected(tokenizers):
    assert [tokenizers[v][0].chat_format for v in ("v1", "v1-json", "v2", "v3")] == ["v1", "v1", "v3", "v3"]


def test_v1_layout_is_the_documented_one(tokenizers):
    """<s>[INST] {system}\\n\\n{user} [/INST]{answer}</s>[INST] {user} [/INST], messages encoded apart."""
    tok = tokenizers["v1"][0]
    ids = tok.encode_chat(CONVERSATIONS["system-multi-turn"])
    expected = (
        [1]
        + tok.encode("[INST] Be kind.\n\nHi [/INST]", bos=False)
        + tok.encode("Hello!", bos=False)
        + [2]
        + tok.encode("[INST] How are you? [/INST]", bos=False)
    )
    assert ids == expected


BAD = {
    "empty": ([], "non-empty list"),
    "not-a-list": ("hello", "non-empty list"),
    "assistant-first": (conv(("assistant", "Hi"), ("user", "x")), "expected role 'user' first"),
    "user-user": (conv(("user", "a"), ("user", "b")), "message 2: expected role 'assistant' after a user message"),
    "assistant-assistant": (
        conv(("user", "a"), ("assistant", "b"), ("assistant", "c"), ("user", "d")),
        "message 3: expected role 'user' after a assistant message",
    ),
    "system-later": (conv(("user", "a"), ("system", "s"), ("user", "b")), "message 2: a system message must come"),
    "ends-with-assistant": (conv(("user", "a"), ("assistant", "b")), "must end with a user message"),
    "only-system": (conv(("system", "s")), "must end with a user message"),
    "unknown-role": ([{"role": "tool", "content": "x"}], "chat message 1: expected"),
    "content-not-str": ([{"role": "user", "content": 3}], "chat message 1: expected"),
    "empty-assistant": (conv(("user", "a"), ("assistant", ""), ("user", "b")), "needs non-empty content"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_conversations_raise_user_error(tokenizers, name):
    messages, message = BAD[name]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tokenizers["v1"][0].encode_chat(messages)
