"""Generate text from a prompt and stream it to stdout; timing goes to stderr.

The prompt comes from --prompt, --prompt-file or stdin (one trailing newline of a file or stdin is
dropped). With --chat it is wrapped as one user turn of the Instruct chat format (with --system as
the system prompt). Greedy unless --temperature > 0. Without --model the bundled demo model is used.

Examples:
  mixtral-lite generate --model /data/Mixtral-8x7B-v0.1 --prompt "The capital of France is" --max-new-tokens 20
  echo "Write a haiku about experts" | mixtral-lite generate --model DIR --chat --temperature 0.7 --seed 1
  mixtral-lite generate --model DIR --prompt-file prompt.txt --stop "\\n\\n" --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from ..bundle import BUNDLED
from ..errors import UserError
from ..validate import check_text, read_text_bounded

HELP = "generate text from a prompt (streams to stdout)"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (config + safetensors + tokenizer); default: the bundled demo model")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--device-map", help="split layers across devices: 'auto' or '0-15=cuda:0,16-31=cuda:1'")
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "int4-hqq", "int4-mixed", "int4-mixed-hqq"],
        help="quantize the weights while loading (int4-mixed: attention int8, experts int4; -hqq: HQQ int4)",
    )
    p.add_argument("--group-size", type=int, help="inputs per scale of int4 weights (default 64)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice, one per core)")
    p.add_argument(
        "--experts-on",
        choices=("cpu", "disk", "auto"),
        help="keep the routed experts apart: cpu (host memory beside a GPU, computed there), disk (read from the "
        "memory-mapped checkpoint as tokens choose them), auto (only as many layers as needed to fit)",
    )
    p.add_argument(
        "--n-cpu-moe", type=int, metavar="N", help="only the first N layers' experts go where --experts-on says"
    )
    p.add_argument(
        "--expert-cache",
        type=int,
        metavar="N",
        help="experts per offloaded layer kept in an LRU (default: as many as fit, at most half)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="print which CPU kernels were installed, and why not (stderr)"
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="render chats with this jinja template (or a tokenizer_config.json's) instead of the model's own",
    )


def add_sampling_arguments(p: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with probability >= p, in (0, 1]")
    p.add_argument("--min-p", type=float, help="keep tokens with probability >= min_p * the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help=r'stop before this text (repeatable); backslash escapes are read: --stop "\n\n" stops at a blank line',
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat format")
    p.add_argument("--system", help="system prompt (with --chat)")
    add_sampling_arguments(p, max_new_tokens=128, temperature=0.0)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of streaming text")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CUDA graphs on a GPU; on a CPU with the C kernel eager is as fast)",
    )
    p.add_argument("--quiet-stats", action="store_true", help="do not print timing to stderr")
    p.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    add_parallel_arguments(p)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--tp, --ep and --step-timeout: generate and serve under torchrun."""
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch with torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (launch with torchrun)")
    p.add_argument(
        "--step-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --tp/--ep: a rank that does not answer a collective for this long stops the job",
    )


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling flags as ``generate``'s options; warns (stderr) about flags greedy decoding ignores."""
    from ..generation.sampling import SamplingParams
    from ..validate import check_seed

    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)  # errors first
    check_seed(args.seed)
    if args.temperature == 0:
        ignored = [
            f"--{n.replace('_', '-')}" for n in ("top_k", "top_p", "min_p", "seed") if getattr(args, n) is not None
        ]
        if ignored:
            print(
                f"mixtral-lite: warning: {', '.join(ignored)} ignored at --temperature 0 (greedy decoding); "
                "pass --temperature 0.8 (say) to sample",
                file=sys.stderr,
            )
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": [unescape_stop(s) for s in args.stop],
    }


def unescape_stop(text: str) -> str:
    """A shell cannot easily pass a newline, so ``--stop "\\n\\n"`` means two newlines, as in Python
    string literals; other characters (non-ASCII too) stay as typed."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:
        raise UserError(f"--stop {text!r}: bad backslash escape ({exc.reason}); write a backslash as \\\\") from None


def model_folder(args: argparse.Namespace) -> Path:
    if args.model is None:
        if not (BUNDLED / "config.json").is_file():
            raise UserError(f"no --model given and the bundled model is missing ({BUNDLED}); pass --model DIR")
        return BUNDLED
    folder = Path(args.model)
    if folder.suffix == ".gguf" and folder.is_file():  # llama.cpp's single-file format
        return folder
    from ..weights.hub_cache import resolve_model

    return resolve_model(args.model)


def load(args: argparse.Namespace, folder: Path):
    """The model, on the device the flags ask for (imports torch and the loader only now)."""
    import torch

    from ..cpu import cpu_kernels_status
    from ..weights.loading import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads: expected an integer >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.device_map else "cpu")
    model = load_model(
        folder,
        dtype=args.dtype,
        device=device,
        device_map=args.device_map,
        quantize=args.quantize,
        experts_on=args.experts_on,
        n_cpu_moe=args.n_cpu_moe,
        expert_cache=args.expert_cache,
        group_size=getattr(args, "group_size", None),
    )
    if getattr(args, "verbose", False):
        print(cpu_kernels_status(model), file=sys.stderr)
        if getattr(model, "offload", None) is not None:
            print(model.offload, file=sys.stderr)
    return model


def start_parallel(args: argparse.Namespace, config):
    """Join torchrun's process group for --tp / --ep; None for a plain single-process run."""
    if args.tp * args.ep == 1 and os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    if args.device_map or args.quantize or args.experts_on or args.n_cpu_moe is not None:
        raise UserError("--tp/--ep: cannot be combined with --device-map, --quantize, --experts-on or --n-cpu-moe")
    from ..parallel.launch import start_parallel as start

    if not args.step_timeout > 0:
        raise UserError(f"--step-timeout: expected a positive number of seconds, got {args.step_timeout}")
    return start(args.tp, args.ep, args.device, config=config, step_timeout_s=args.step_timeout)


def read_prompt(args: argparse.Namespace) -> tuple[str, str]:
    """The prompt text and where it came from (for error messages)."""
    if args.prompt is not None:
        return args.prompt, "--prompt"
    if args.prompt_file is not None:
        source = f"--prompt-file {args.prompt_file}"
        try:
            with open(args.prompt_file, "rb") as f:
                text = read_text_bounded(f, source)
        except OSError as exc:
            reason = exc.strerror or exc
            raise UserError(f"--prompt-file {args.prompt_file}: cannot read it ({reason})") from None
    elif sys.stdin is None or sys.stdin.isatty():
        raise UserError("no prompt: pass --prompt TEXT, --prompt-file FILE or pipe the text on stdin")
    else:
        text, source = read_text_bounded(getattr(sys.stdin, "buffer", sys.stdin), "stdin"), "stdin"
    return check_text(text, source).removesuffix("\n").removesuffix("\r"), source


def json_line(data: dict) -> str:
    """Valid JSON always: NaN and infinities (from broken weights) become null, with a warning."""
    try:
        return json.dumps(data, ensure_ascii=False, allow_nan=False)
    except ValueError:
        print("mixtral-lite: warning: non-finite numbers in the output were written as null", file=sys.stderr)
        return json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def ensure_utf8(stream) -> None:
    """Printing model output must not crash on a terminal that cannot show every character."""
    if (getattr(stream, "encoding", None) or "").lower().replace("-", "") != "utf8":
        stream.reconfigure(errors="replace")


def _write(args, model, tokenizer, prompt: str, prompt_ids, options: dict, continuation: bool, decode_fn):
    """Generate and print (a JSON line, or the text as it streams); the result for the stats line."""
    from ..generation.generate import generate, stream

    ensure_utf8(sys.stdout)
    kwargs = dict(**options, continuation=continuation, decode_fn=decode_fn)
    if args.json:
        result = generate(model, tokenizer, prompt_ids, **kwargs)
        print(json_line({**result.as_dict(), "stats": result.stats.as_dict()}))
        return result
    pieces = stream(model, tokenizer, prompt_ids, **kwargs)
    if args.echo:
        sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return pieces.result


def run(args: argparse.Namespace) -> int:
    from ..config import MixtralConfig
    from ..generation.generate import decode_step, prepare
    from ..generation.tokenizer import load_tokenizer

    options = sampling_options(args)
    if args.system is not None and not args.chat:
        raise UserError("--system: only used with --chat")
    prompt, source = read_prompt(args)
    if not prompt:
        raise UserError(f"{source}: the prompt is empty; give some text to continue")
    folder = model_folder(args)
    tokenizer = load_tokenizer(folder, chat_template=args.chat_template)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt_ids = tokenizer.encode_chat(messages)
    else:
        prompt_ids = tokenizer.encode(prompt)
    continuation = not args.chat
    config = MixtralConfig.from_pretrained(folder)
    prepare(config, tokenizer, [prompt_ids], **options, continuation=continuation)

    if args.compile and (args.experts_on or args.n_cpu_moe is not None):
        raise UserError("--compile: not available with --experts-on / --n-cpu-moe (the expert stores run eagerly)")
    parallel = start_parallel(args, config)
    if parallel is None:
        model, decode_fn = load(args, folder), decode_step
        if args.compile:
            from ..generation.generate import compile_decode_step

            decode_fn = compile_decode_step(model.device)
            print(
                "mixtral-lite: --compile: the first decode step compiles the model (tens of seconds on a CPU); "
                "the decode rate below includes that time",
                file=sys.stderr,
            )
    elif args.compile:
        raise UserError("--compile: not available with --tp/--ep")
    else:  # every rank runs the same loop on its shard, fed rank 0's seed and tokens
        model, decode_fn = parallel.load(folder, dtype=args.dtype), parallel.decode_fn(decode_step)
    with parallel.guard() if parallel is not None else contextlib.nullcontext():
        if parallel is not None:
            options["seed"] = parallel.seed(args.seed)
        result = _write(args, model, tokenizer, prompt, prompt_ids, options, continuation, decode_fn)
    if not args.quiet_stats and (parallel is None or parallel.state.is_main):
        print(f"{result.stats.summary()} | finish: {result.finish_reason}", file=sys.stderr)
    if parallel is not None:
        parallel.close()  # on success only: after an error torchrun stops the other ranks
    return 0
