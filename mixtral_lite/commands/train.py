"""Train a model (Mixtral or any routing variant) from scratch on a text file.

The config file is the JSON form of a model config (the fields of configs/tiny.json, with the
routing variant in its "moe" section) plus an optional "train" section with the training
hyper-parameters; a flag given on the command line overrides the file. --config also takes a
preset name (tiny, bench, ...).

Without --tokenizer a SentencePiece BPE tokenizer (byte fallback, unk=0 bos=1 eos=2) is trained on
the data with the config's vocab_size and saved as DIR/tokenizer.model; --tokenizer bytes uses
UTF-8 bytes (ids 3..258; such a folder has no tokenizer.model for `generate`).

The output folder loads with mixtral_lite.load_model and `mixtral-lite generate --model DIR`. It
also holds training_state.pt and train_log.json: `--resume DIR` continues exactly where the run
stopped (same losses as an uninterrupted run); --stop-at N interrupts a run after step N.

Balance losses (--balance-loss): switch (Switch/Mixtral aux loss), deepseek (expert-level loss),
importance (CV^2, for soft routing), none; "auto" = importance for soft routing, none when the
config uses bias balancing (moe.bias_balancing: DeepSeek-V3's auxiliary-loss-free updates, done
after every step), switch otherwise.

Example:
  mixtral-lite train --config mixtral_lite/configs/tiny.json --data mixtral_lite/bundled/heldout.txt \\
      --out runs/tiny --steps 2000 --batch-size 16 --seq-len 256 --lr 1e-3
  mixtral-lite train --resume runs/tiny --steps 3000      # the data file is read from the run's state
  mixtral-lite generate --model runs/tiny --prompt "ROMEO:"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..config import MixtralConfig, available_presets
from ..errors import UserError
from ..training.data import ByteTokenizer, TokenData, load_text_tokenizer, train_sentencepiece
from ..training.train import BALANCE_CHOICES, TrainConfig, check_run, read_state, train

HELP = "train a model (any MoE variant) on a text file"

# flag -> TrainConfig field (type from the dataclass)
FLAGS = {
    "--steps": "steps",
    "--batch-size": "batch_size",
    "--seq-len": "seq_len",
    "--lr": "lr",
    "--warmup": "warmup",
    "--min-lr": "min_lr",
    "--weight-decay": "weight_decay",
    "--grad-clip": "grad_clip",
    "--balance-loss": "balance_loss",
    "--aux-coef": "aux_coef",
    "--z-coef": "z_coef",
    "--eval-interval": "eval_interval",
    "--eval-batches": "eval_batches",
    "--val-fraction": "val_fraction",
    "--init-std": "init_std",
    "--seed": "seed",
    "--save-interval": "save_interval",
}
HELPS = {
    "steps": "optimizer steps in the whole run (the cosine schedule spans them)",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence",
    "lr": "peak learning rate (AdamW)",
    "warmup": "linear warmup steps",
    "min_lr": "learning rate at the end of the cosine decay",
    "weight_decay": "AdamW weight decay of the matrices",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "balance_loss": f"one of {', '.join(BALANCE_CHOICES)}",
    "aux_coef": "weight of the balance loss",
    "z_coef": "weight of the router z-loss",
    "eval_interval": "validate every N steps",
    "eval_batches": "validation batches per evaluation",
    "val_fraction": "the last fraction of the tokens held out for validation",
    "init_std": "standard deviation of the random initialisation",
    "seed": "seed of initialisation and data order",
    "save_interval": "also save every N steps (0: at the end only)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model + training config JSON file, or a preset name (not with --resume)")
    p.add_argument(
        "--data",
        help="a UTF-8 text file to train on, e.g. mixtral_lite/bundled/heldout.txt (106 KB of Shakespeare); "
        "with --resume: default the run's own",
    )
    p.add_argument("--out", help="output folder (default: the --resume folder)")
    p.add_argument("--tokenizer", help="a tokenizer.model (or a folder holding one), or 'bytes'")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    p.add_argument("--stop-at", type=int, metavar="N", help="stop after step N (resume later with --resume)")
    defaults = TrainConfig()
    for flag, name in FLAGS.items():
        kind = type(getattr(defaults, name))
        choices = BALANCE_CHOICES if name == "balance_loss" else None
        p.add_argument(
            flag, type=kind, default=None, choices=choices, help=f"{HELPS[name]} (default {getattr(defaults, name)})"
        )
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (also off when stderr is not a terminal)"
    )
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (small models often run fastest on 1)")


def read_config_file(spec: str) -> tuple[MixtralConfig, dict]:
    """(model config, "train" section) from a JSON file, or a preset with no train section."""
    path = Path(spec)
    if not path.is_file():
        if spec in available_presets():
            return MixtralConfig.from_preset(spec), {}
        raise UserError(f"--config: {spec}: no such file and not a preset ({', '.join(available_presets())})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--config: {path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {path}: expected a JSON object")
    section = data.pop("train", {})
    if not isinstance(section, dict):
        raise UserError(f"--config: {path}: train: expected an object, got {type(section).__name__}")
    if path.name == "params.json" or ("dim" in data and "n_layers" in data):
        return MixtralConfig.from_mistral_params(data, source=str(path)), section
    return MixtralConfig.from_dict(data, source=str(path)), section


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    overrides = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name in FLAGS.items()}
    overrides["bf16"] = args.bf16
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.resume:
        if args.config:
            raise UserError("--config: not with --resume (the run's config is read from the --resume folder)")
        model_config = MixtralConfig.from_pretrained(args.resume)
        state = read_state(args.resume)
        section = state["train_config"]
        out = Path(args.out or args.resume)
        if args.data is None:
            args.data = state.get("data_file")
            if args.data is None:
                raise UserError(f"--data: required: {args.resume} does not record the file it was trained on")
            if not Path(args.data).is_file():
                raise UserError(f"--data: {args.resume} was trained on {args.data}, which is gone; pass --data FILE")
    else:
        if not args.config or not args.out:
            raise UserError("--config and --out are required (unless --resume)")
        if not args.data:
            raise UserError("--data: required (unless --resume); e.g. mixtral_lite/bundled/heldout.txt")
        model_config, section = read_config_file(args.config)
        out = Path(args.out)
    cfg = TrainConfig.from_dict({**section, **overrides}, source="train")
    check_run(model_config, cfg)

    tokenizer_file = None
    spec = args.tokenizer
    if spec is None and args.resume:
        spec = (
            str(Path(args.resume) / "tokenizer.model") if (Path(args.resume) / "tokenizer.model").is_file() else "bytes"
        )
    if spec is None:
        print(f"training a SentencePiece tokenizer (vocab {model_config.vocab_size}) on {args.data}")
        spec = str(train_sentencepiece(args.data, model_config.vocab_size, out))
    tokenizer = load_text_tokenizer(spec)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer_file = tokenizer.path
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"--tokenizer: {spec} has {tokenizer.vocab_size} tokens, more than vocab_size={model_config.vocab_size}"
        )
    data = TokenData.from_file(args.data, tokenizer, cfg.val_fraction)
    progress = not args.no_progress and sys.stderr.isatty()  # no \r frames in a log file: one line per evaluation
    print(f"data: {len(data.train):,} training and {len(data.val):,} validation tokens")
    result = train(
        model_config,
        cfg,
        data,
        out,
        resume=args.resume,
        stop_at=args.stop_at,
        tokenizer_file=tokenizer_file,
        progress=progress,
        log=None if progress else print,
        data_file=args.data,
    )
    final = result.final_val
    summary = f"saved step {result.step} to {out}"
    if final:
        summary += f" (val loss {final['val_loss']:.4f})"
    print(f"{summary}; {result.tokens_per_s:,.0f} tokens/s")
    if tokenizer_file is not None:
        print(f'try: mixtral-lite generate --model {out} --prompt "..."')
    return 0


__all__ = ["add_arguments", "run", "read_config_file"]
