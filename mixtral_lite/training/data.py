"""Text data for training: tokenize a file once, split it deterministically, sample windows.

Tokens are either bytes (id = 3 + byte, the byte-fallback ids of a Mixtral-style SentencePiece
vocabulary, so 0/1/2 stay unk/bos/eos) or a SentencePiece model, which ``train_sentencepiece``
builds the way Mixtral's was built: BPE, byte fallback, unk=0 bos=1 eos=2, no normalisation.

Split: the first ``1 - val_fraction`` of the token stream trains, the rest validates (contiguous,
so no training window overlaps a validation window). Training windows start at offsets drawn from
an explicit ``torch.Generator``, whose state is the data position saved for resuming.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

BYTE_OFFSET = 3  # ids 0, 1, 2: unk, bos, eos
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = 3 + byte."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A ``tokenizer.model``; the whole text is encoded in one call so newlines survive."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{self.path}: not a SentencePiece model: {exc}") from None
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def train_sentencepiece(data: str | Path, vocab_size: int, out_dir: str | Path, *, threads: int = 2) -> Path:
    """Train a Mixtral-style SentencePiece BPE on a text file; returns ``out_dir/tokenizer.model``.

    One sentence per line, as SentencePiece reads it; newlines themselves become byte tokens.
    """
    import sentencepiece as spm

    data, out = Path(data), Path(out_dir)
    if not data.is_file():
        raise UserError(f"--data: {data}: no such file")
    if vocab_size < BYTE_VOCAB_SIZE + 1:
        raise UserError(f"--vocab-size: must be > {BYTE_VOCAB_SIZE} (3 special + 256 byte tokens), got {vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=str(data),
            model_prefix=str(out / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size too high" for a small text
        raise UserError(f"--vocab-size {vocab_size} on {data}: SentencePiece says: {exc}") from None
    return out / "tokenizer.model"


def load_text_tokenizer(spec: str | Path | None) -> ByteTokenizer | SentencePieceTokenizer:
    """``"bytes"`` (or None) -> bytes; a ``tokenizer.model`` file or a folder holding one."""
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"--tokenizer: {spec}: expected 'bytes', a tokenizer.model file or a folder holding one")
    return SentencePieceTokenizer(path)


@dataclass
class TokenData:
    """A tokenized text split into a training and a validation stream (1-D long tensors)."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, val_fraction: float = 0.1) -> TokenData:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--data: {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--data: {path}: cannot read as UTF-8 text: {exc}") from None
        return cls.from_ids(tokenizer.encode(text), val_fraction, source=str(path))

    @classmethod
    def from_ids(cls, ids: list[int], val_fraction: float = 0.1, source: str = "data") -> TokenData:
        if not 0 < val_fraction < 1:
            raise UserError(f"val_fraction: must be in (0, 1), got {val_fraction}")
        tokens = torch.tensor(ids, dtype=torch.long)
        n_val = int(len(tokens) * val_fraction)
        if n_val < 2 or len(tokens) - n_val < 2:
            raise UserError(f"--data: {source}: only {len(tokens)} tokens, too few to split for training")
        return cls(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :])

    def signature(self) -> list[int]:
        """Token counts and id sums of both splits: identifies the data a run was trained on."""
        return [len(self.train), len(self.val), int(self.train.sum()), int(self.val.sum())]

    def check(self, seq_len: int, vocab_size: int) -> None:
        """Raise a ``UserError`` when windows of ``seq_len`` do not fit or ids exceed the vocabulary."""
        for name, stream in (("training", self.train), ("validation", self.val)):
            if len(stream) < seq_len + 1:
                raise UserError(
                    f"seq_len: {seq_len} needs at least {seq_len + 1} {name} tokens, the split has {len(stream)}"
                )
        top = int(max(self.train.max(), self.val.max()))
        if top >= vocab_size:
            raise UserError(f"vocab_size: the data has token id {top}, the model's vocab_size is {vocab_size}")

    def sample(
        self, batch_size: int, seq_len: int, generator: torch.Generator, bos: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: inputs and next-token targets, each [B, T] (see ``windows``)."""
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=generator)
        return windows(self.train, starts.tolist(), seq_len, bos)

    def val_batches(
        self, batch_size: int, seq_len: int, n_batches: int, bos: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same validation windows every time: ``n_batches * batch_size`` evenly spaced starts."""
        count = n_batches * batch_size
        starts = torch.linspace(0, len(self.val) - seq_len - 1, count).long().tolist()
        return [windows(self.val, starts[i : i + batch_size], seq_len, bos) for i in range(0, count, batch_size)]


def windows(
    stream: torch.Tensor, starts: list[int], seq_len: int, bos: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y [B, T] for windows of ``stream`` beginning at ``starts``.

    With ``bos`` every input row starts with it (x = bos + text[s : s+T-1], y = text[s : s+T]): the
    model learns to continue from a bos-prefixed context at any point of the text, which is what
    generation feeds it.
    """
    if bos is None:
        rows = torch.stack([stream[s : s + seq_len + 1] for s in starts])  # [B, T+1]
        return rows[:, :-1], rows[:, 1:]
    y = torch.stack([stream[s : s + seq_len] for s in starts])  # [B, T]
    x = torch.cat([torch.full((len(starts), 1), bos, dtype=y.dtype), y[:, :-1]], dim=1)
    return x, y


__all__ = [
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "TokenData",
    "train_sentencepiece",
    "load_text_tokenizer",
    "BYTE_VOCAB_SIZE",
]
