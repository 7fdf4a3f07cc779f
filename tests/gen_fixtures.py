"""Tiny model folders with a real tokenizer, for the tokenizer, generation and CLI tests.

The tokenizer is mistral-common's copy of the Mistral v1 SentencePiece model (vocabulary 32000, the
one Mixtral-8x7B uses), so the tiny models have a 32000-token vocabulary and a small hidden size.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import mistral_common
import pytest
import torch
from helpers import make_hf_model

DATA = Path(mistral_common.__file__).parent / "data"
MISTRAL_V1 = DATA / "tokenizer.model.v1"
MISTRAL_V2 = DATA / "mistral_instruct_tokenizer_240216.model.v2"
MISTRAL_V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
VOCAB = 32000


def make_model_folder(path: Path, *, seed: int = 0, tokenizer: str | None = "model", **overrides):
    """Save a random transformers Mixtral (peaked logits) plus a tokenizer; return the HF model.

    ``tokenizer``: "model" (tokenizer.model), "json" (tokenizer.json + tokenizer_config.json), None.
    """
    hf = make_hf_model(seed, **{"vocab_size": VOCAB, **overrides})
    hf.save_pretrained(path)
    if tokenizer == "model":
        shutil.copy(MISTRAL_V1, Path(path) / "tokenizer.model")
    elif tokenizer == "json":
        write_tokenizer_json(MISTRAL_V1, Path(path))
    return hf


def write_tokenizer_json(sp_model: Path, folder: Path) -> None:
    """Convert a SentencePiece BPE model to a ``tokenizer.json`` the way the Hugging Face hub files
    of Mistral models are built (BPE merges ranked by piece score, byte fallback, "▁" spaces)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {sp.id_to_piece(i): sp.get_score(i) for i in range(n) if i not in special and not sp.is_byte(i)}
    ranked = sorted(
        (-score, vocab[piece], piece[:k], piece[k:])
        for piece, score in normal.items()
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    tok = Tokenizer(
        BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True) for i in special])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id())}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def mistral_common_ids(sp_model: Path, messages: list[dict]) -> list[int]:
    """The reference: mistral-common's encoding of a chat request."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return _mistral_tokenizer(str(sp_model)).encode_chat_completion(request).tokens


@functools.cache
def _mistral_tokenizer(path: str):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(path)


def greedy_margins(model, ids: list[int], new_ids: list[int]) -> list[float]:
    """Top-1 minus top-2 logit at every greedy step: how far the choices are from ties."""
    full = torch.tensor([ids + new_ids])
    with torch.no_grad():
        logits = model(full)[0, len(ids) - 1 : len(ids) - 1 + len(new_ids)].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run 10-20x faster on one thread when the CPU is shared (thread spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
