"""A SentencePiece model built from a vocabulary (pieces, scores, types), as GGUF files carry it.

llama.cpp's converter writes a SentencePiece tokenizer into GGUF metadata as three arrays
(``tokenizer.ggml.tokens``, ``.scores``, ``.token_type``) and drops the rest of the model file.
For Llama/Mistral vocabularies the rest is fixed: a BPE model with byte fallback and the identity
normaliser that adds a dummy prefix and escapes spaces as U+2581. This writes that ``ModelProto``
in protobuf's wire format (a few fields, so no protobuf dependency) for ``SentencePieceProcessor``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# GGUF token types (llama.cpp's llama_token_type) -> SentencePiece piece types.
# gguf: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
# sentencepiece: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
PIECE_TYPES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}
BPE = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def model_proto(
    pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *, unk_id: int, bos_id: int, eos_id: int
) -> bytes:
    """The serialised ``sentencepiece.ModelProto`` of a Llama-style BPE vocabulary."""
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        body = _bytes(1, piece.encode("utf-8")) + _float(2, float(score)) + _int(3, PIECE_TYPES.get(int(kind), 1))
        out += _bytes(1, body)
    # TrainerSpec: model_type 3, byte_fallback 35, unk/bos/eos/pad ids 40-43
    trainer = _int(3, BPE) + _int(35, 1) + _int(40, unk_id) + _int(41, bos_id) + _int(42, eos_id) + _int(43, -1)
    out += _bytes(2, trainer)
    # NormalizerSpec: name 1, add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5
    normalizer = _bytes(1, b"identity") + _int(3, 1) + _int(4, 0) + _int(5, 1)
    out += _bytes(3, normalizer)
    return bytes(out)


__all__ = ["model_proto"]
