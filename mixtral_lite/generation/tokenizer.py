"""Tokenizers: a SentencePiece ``tokenizer.model`` (Mistral's own format) or a Hugging Face
``tokenizer.json``, behind one small interface, plus the Mistral Instruct chat format.

The chat format follows mistral-common, the reference the Instruct models were trained with
(tests compare token ids):

- v1 (Mixtral-8x7B-Instruct): ``<s>[INST] {user} [/INST]{answer}</s>[INST] {user} [/INST]``, where
  ``[INST]`` is plain text and every message is encoded on its own (so each gets SentencePiece's
  leading space). System prompts are joined by blank lines and put before the FIRST user message.
- v2/v3 (vocabularies with ``[INST]`` / ``[/INST]`` control tokens, e.g. Mixtral-8x22B-Instruct):
  ``<s>[INST]{user}[/INST]{answer}</s>``, the markers are single token ids, the system prompt goes
  before the LAST user message, and trailing spaces of answers are dropped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..validate import check_text
from .chat_template import ChatTemplate, special_tokens, template_from_tokenizer_config

ROLES = ("system", "user", "assistant")


PAD_ID = 0  # the id of left padding (generate) and of idle rows (the engine); masked out, so any valid id works


class Tokenizer:
    """``encode(text, bos=True) -> ids``, ``decode(ids) -> text``, ``encode_chat(messages) -> ids``."""

    path: Path
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    chat_template: ChatTemplate | None = None  # set: encode_chat renders it (else the Mistral formats)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._encode(check_text(text, "prompt"))
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (bos, eos, control) decode to nothing."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat template: special tokens in the text are the special tokens, nothing added."""
        raise UserError(f"{self.path}: chat templates need a tokenizer.json (Hugging Face) tokenizer")

    def control_id(self, piece: str) -> int | None:
        """The id of a control token such as ``[INST]``, or None when the vocabulary has none."""
        raise NotImplementedError

    @functools.cached_property
    def byte_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback tokens ``<0x00>`` .. ``<0xFF>`` (empty without byte fallback)."""
        ids = (self._piece_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    def _piece_id(self, piece: str) -> int | None:
        raise NotImplementedError

    @property
    def chat_format(self) -> str:
        """ "v1" (text markers) or "v3" ([INST] / [/INST] control tokens)."""
        return "v3" if self.control_id("[INST]") is not None and self.control_id("[/INST]") is not None else "v1"

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation that ends with a user message, ready for the answer.

        ``messages``: ``{"role": "system" | "user" | "assistant", "content": str}`` dicts; system
        messages first, then user and assistant turns alternating, starting and ending with user.
        With a ``chat_template`` the ids are transformers' ``apply_chat_template`` ids
        (``add_generation_prompt`` passed to the template); without, the Mistral formats.
        """
        system, turns = split_conversation(messages)
        for m in messages:  # checked by split_conversation: dicts with a role and str content
            check_text(m["content"], f"{m['role']} message")
        if self.chat_template is not None:
            return self.encode_rendered(self.chat_template.render(messages, add_generation_prompt))
        if self.bos_id is None or self.eos_id is None:
            raise UserError(f"{self.path}: the chat format needs bos and eos tokens; this tokenizer lacks them")
        ids = [self.bos_id]
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if self.chat_format == "v1":
            for i, m in enumerate(turns):
                if m["role"] == "user":
                    content = f"{system}\n\n{m['content']}" if system and i == users[0] else m["content"]
                    ids += self._encode(f"[INST] {content} [/INST]")
                else:
                    ids += [*self._encode(m["content"]), self.eos_id]
            return ids
        begin, end = self.control_id("[INST]"), self.control_id("[/INST]")
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if system and i == users[-1] else m["content"]
                ids += [begin, *self._encode(content), end]
            else:
                ids += [*self._encode(m["content"].rstrip(" ")), self.eos_id]
        return ids


def split_conversation(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, list[Mapping[str, str]]]:
    """Check a conversation's shape; return (system prompt or None, the user/assistant turns)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UserError("chat messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    system: list[str] = []
    turns: list[Mapping[str, str]] = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(
                f"chat message {n}: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {m!r}"
            )
        role = m["role"]
        if role == "system":
            if turns:
                raise UserError(f"chat message {n}: a system message must come before all user/assistant messages")
            if m["content"]:
                system.append(m["content"])
            continue
        expected = "user" if not turns or turns[-1]["role"] == "assistant" else "assistant"
        if role != expected:
            after = f"after a {turns[-1]['role']} message" if turns else "first (after any system messages)"
            raise UserError(f"chat message {n}: expected role '{expected}' {after}, got '{role}'")
        if role == "assistant" and not m["content"]:
            raise UserError(f"chat message {n}: an assistant message needs non-empty content")
        turns.append(m)
    if not turns or turns[-1]["role"] != "user":
        raise UserError("chat messages: the conversation must end with a user message (the one to answer)")
    return ("\n\n".join(system) or None), turns


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, proto: bytes | None = None) -> None:
        """From a ``tokenizer.model`` file, or from its serialised ``proto`` (``path`` then names
        where it came from: a GGUF file's metadata)."""
        import sentencepiece as spm

        self.path = Path(path)
        try:
            if proto is not None:
                self.sp = spm.SentencePieceProcessor(model_proto=proto)
            else:
                self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{path}: not a readable SentencePiece model ({exc})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def control_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() and self.sp.is_control(i) else None

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.is_byte(i) else None


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json``; bos/eos come from ``tokenizer_config.json`` beside it (else <s> / </s>)."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise UserError(
                f"{path}: reading a tokenizer.json needs the `tokenizers` package: "
                "pip install 'mixtral-lite[tokenizers]'"
            ) from None
        self.path = Path(path)
        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise UserError(f"{path}: not a readable tokenizer.json ({exc})") from None
        self.tok.encode_special_tokens = True  # user text "</s>" is text, as in SentencePiece
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = _special_token_names(self.path.parent / "tokenizer_config.json")
        self.bos_id = self.tok.token_to_id(names.get("bos_token") or "<s>")
        if names.get("add_bos_token") is False:  # e.g. OLMoE: prompts start without one
            self.bos_id = None
        self.eos_id = self.tok.token_to_id(names.get("eos_token") or "</s>")
        self._special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """With a post-processor in tokenizer.json (Qwen's, DeepSeek's) the special tokens are
        the ones it adds, exactly as ``tokenizers`` encodes; without one, bos as the base class."""
        if bos and self.tok.post_processor is not None:
            return self.tok.encode(check_text(text, "prompt"), add_special_tokens=True).ids
        return super().encode(text, bos)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> list[int]:
        self.tok.encode_special_tokens = False
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def control_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece) if piece in self._special else None

    def _piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def _special_token_names(config_path: Path) -> dict[str, Any]:
    """The named special tokens of a ``tokenizer_config.json``, and its ``add_bos_token`` if set."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        return {}
    names: dict[str, Any] = special_tokens(config)
    if isinstance(config.get("add_bos_token"), bool):
        names["add_bos_token"] = config["add_bos_token"]
    return names


def find_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer file of a model folder: tokenizer.model, tokenizer.model.v*, then tokenizer.json."""
    folder = Path(folder)
    for candidate in [
        folder / "tokenizer.model",
        *sorted(folder.glob("tokenizer.model.v*")),
        folder / "tokenizer.json",
    ]:
        if candidate.is_file():
            return candidate
    return None


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file of a model folder, or ``path`` itself when it is a file."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise UserError(f"{path}: no tokenizer found (expected tokenizer.model (SentencePiece) or tokenizer.json)")
        return found
    if not path.is_file():
        raise UserError(f"{path}: no such tokenizer file or model folder")
    return path


def load_tokenizer(path: str | Path, *, chat_template: str | Path | None = None) -> Tokenizer:
    """A tokenizer from a model folder or a tokenizer file (SentencePiece model or tokenizer.json).

    ``chat_template``: a template file to render chats with (``--chat-template``). Without it, a
    ``tokenizer.json`` beside a ``tokenizer_config.json`` with a ``chat_template`` uses that one,
    unless the folder's ``config.json`` is a Mixtral's: Mixtral keeps the Mistral formats.
    """
    if Path(path).suffix == ".gguf" and Path(path).is_file():  # the vocabulary in a GGUF file's metadata
        from ..weights.gguf import gguf_tokenizer_proto

        return SentencePieceTokenizer(Path(path), proto=gguf_tokenizer_proto(path))
    path = tokenizer_file(path)
    tok: Tokenizer = HFTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)
    tokens = {
        k: v for k, v in _special_token_names(path.parent / "tokenizer_config.json").items() if k != "add_bos_token"
    }
    if chat_template is not None:
        tok.chat_template = ChatTemplate.from_file(chat_template, tokens)
    elif isinstance(tok, HFTokenizer) and not _is_mixtral_folder(path.parent):
        tok.chat_template = template_from_tokenizer_config(path.parent / "tokenizer_config.json")
    return tok


def _is_mixtral_folder(folder: Path) -> bool:
    """The folder's config.json describes a Mixtral (or our Mixtral variants), or there is none."""
    config = folder / "config.json"
    if not config.is_file():
        return True
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # the model loader reports it
    if not isinstance(data, dict):
        return True
    own = data.get("mixtral_lite_config")
    if data.get("model_type") == "mixtral_lite" and isinstance(own, dict):
        return own.get("family", "mixtral") == "mixtral"
    return data.get("model_type") in ("mixtral", "mixtral_lite", None)


__all__ = [
    "PAD_ID",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "find_tokenizer",
    "load_tokenizer",
    "tokenizer_file",
]
