"""Perplexity of a text file (nats/token and per byte), and KL divergence against a reference model.

The text is read in windows of --context tokens, each ending --stride tokens after the last; every
token is scored once (mixtral_lite.eval.perplexity explains the windows). With --reference the same tokens
run through a second model (the full-precision one) and the KL divergence KL(reference || model)
of their next-token distributions and the top-1 agreement are reported, as
`llama-perplexity --kl-divergence` does. The tokenizer is the --model's.

Examples:
  mixtral-lite eval --model DIR --data wiki.test.txt --context 512
  mixtral-lite eval --model DIR --quantize int4 --reference DIR --data text.txt --json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .generate import add_model_arguments, json_line, load, model_folder

HELP = "perplexity of a text file, and KL divergence against a reference model"
MAX_DATA_BYTES = 1 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="the text file to score (UTF-8)")
    p.add_argument("--reference", help="a reference model folder (e.g. the unquantised one): KL and top-1 agreement")
    p.add_argument("--reference-dtype", help="the reference's dtype (default: --dtype)")
    p.add_argument("--context", type=int, help="window length in tokens (default: the model's, at most 2048)")
    p.add_argument("--stride", type=int, help="new tokens scored per window, < --context (default: half the window)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def read_data(path: str) -> str:
    file = Path(path)
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_DATA_BYTES + 1)
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_DATA_BYTES:
        raise UserError(f"--data {path}: more than {MAX_DATA_BYTES >> 30} GiB; pass a smaller text or --max-tokens")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--data {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def run(args: argparse.Namespace) -> int:
    from ..eval import evaluate
    from ..generation.tokenizer import load_tokenizer
    from ..weights.loading import load_model

    text = read_data(args.data)
    folder = model_folder(args)
    tokenizer = load_tokenizer(folder)
    model = load(args, folder)
    reference = None
    if args.reference is not None:
        reference = load_model(
            args.reference, dtype=args.reference_dtype or args.dtype, device=model.device, progress=None
        )
    result = evaluate(
        model,
        tokenizer,
        text,
        reference=reference,
        context=args.context,
        stride=args.stride,
        max_tokens=args.max_tokens,
    )
    if args.json:
        print(
            json_line(
                {"model": str(folder), "reference": args.reference, "quantize": args.quantize, **result.as_dict()}
            )
        )
    else:
        print(result.summary())
    sys.stdout.flush()
    return 0
