"""What the benchmark measures: ``Options``, and the command line that fills them (shared by
``scripts/bench.py`` and ``mixtral-lite bench``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from ..errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Options:
    preset: str = "bench"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    prompt_len: int = 512  # prefill and time-to-first-token prompt
    decode_prompt_len: int = 32  # prompt before the decode measurements
    new_tokens: int = 128
    batch: int = 8
    repeats: int = 5
    threads: int | None = None  # None: torch's current setting
    device: str = "cpu"
    hf_impls: tuple[str, ...] = ("eager", "grouped_mm")  # transformers experts implementations to try
    hf_caches: tuple[str, ...] = ("dynamic", "static")
    quantize: bool = True  # also measure our int8 weights (bfloat16 activations)
    compile: bool = False  # also measure our decode step under torch.compile
    compare: bool = True  # run transformers (False: ours only)
    checkpoint: str | None = None  # folder for the random checkpoint (default: under out's folder)
    out: str = "bench_out/bench.json"
    seed: int = 0
    std: float = 0.02  # weight scale (embeddings: 50x; see make_checkpoint)
    layers: int | None = None  # override the preset's layer count (quick runs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Options()
    p.add_argument("--preset", default=d.preset, help="model shapes (configs/<preset>.json)")
    p.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeat for several (default: both)")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prefill / time-to-first-token prompt")
    p.add_argument("--decode-prompt-len", type=int, default=d.decode_prompt_len)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--batch", type=int, default=d.batch, help="the larger decode batch")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both (default: torch's)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--hf-impl", action="append", help="transformers experts implementation(s) to try")
    p.add_argument("--hf-cache", action="append", choices=["dynamic", "static"], help="transformers cache kind(s)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 measurement")
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    p.add_argument("--ours-only", action="store_true", help="skip transformers")
    p.add_argument("--checkpoint", default=None, help="folder for the random checkpoint")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--out", default=d.out, help="JSON output file")
    p.add_argument("--quick", action="store_true", help="short run: 2 layers, 128-token prompt, 32 tokens, 1 repeat")


def options_from_args(args: argparse.Namespace) -> Options:
    opts = Options(
        preset=args.preset,
        dtypes=tuple(args.dtype) if args.dtype else Options.dtypes,
        prompt_len=args.prompt_len,
        decode_prompt_len=args.decode_prompt_len,
        new_tokens=args.new_tokens,
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        hf_impls=tuple(args.hf_impl) if args.hf_impl else Options.hf_impls,
        hf_caches=tuple(args.hf_cache) if args.hf_cache else Options.hf_caches,
        quantize=not args.no_int8,
        compile=args.compile,
        compare=not args.ours_only,
        checkpoint=args.checkpoint,
        out=args.out,
        layers=args.layers,
    )
    if args.quick:
        opts = replace(opts, layers=args.layers or 2, prompt_len=128, new_tokens=32, repeats=1)
    for name in ("prompt_len", "decode_prompt_len", "new_tokens", "batch", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(opts, name)}")
    if opts.new_tokens < 2:
        raise UserError(f"--new-tokens: expected at least 2 (the first token is prefill's), got {opts.new_tokens}")
    return opts
