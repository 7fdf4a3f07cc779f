"""Train a SentencePiece BPE tokenizer on a text file, built like Mixtral's: byte fallback,
unk=0 bos=1 eos=2, no normalisation, digits split, whitespace kept.

Writes DIR/tokenizer.model (and tokenizer.vocab, one piece per line). `mixtral-lite train` trains
one by itself when no --tokenizer is given; this command is for reusing one across runs.

Example:
  mixtral-lite train-tokenizer --data shakespeare.txt --vocab-size 2048 --out runs/tok
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training.data import SentencePieceTokenizer, train_sentencepiece

HELP = "train a SentencePiece tokenizer on a text file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--vocab-size", type=int, required=True, help="number of tokens (> 259: 3 special + 256 bytes)")
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    path = train_sentencepiece(args.data, args.vocab_size, args.out)
    tok = SentencePieceTokenizer(path)
    text = Path(args.data).read_text(encoding="utf-8", errors="replace")
    n = len(tok.encode(text))
    print(f"wrote {path} ({tok.vocab_size} tokens); {args.data}: {n:,} tokens, {len(text) / max(n, 1):.2f} chars/token")
    return 0


__all__ = ["add_arguments", "run"]
