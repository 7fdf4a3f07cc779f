"""Side by side with llama.cpp on the CPU: the same weights, the same greedy tokens, interleaved timings.

For each shape (``bench``: the benchmark preset written by transformers; ``8x7b``: Mixtral-8x7B's
layers, 2 of them, random weights drawn in bfloat16) the checkpoint is converted with llama.cpp's
own ``convert_hf_to_gguf.py`` (f32, bf16, q8_0) and ``llama-quantize`` (q4_0, q4_K_M), and:

1. **checked**: 32 greedy tokens from llama.cpp (``llama-server``, token ids in and out, EOS
   suppressed) against ours at the matching precision (int8 against q8_0, int4 against q4_0;
   q4_K_M against our bfloat16), and the log-probability each gave llama.cpp's chosen tokens (ours teacher-forced);
2. **timed** in interleaved rounds, each engine in a fresh process per round (8x7B-sized weights of
   two engines do not fit in memory together): prefill of 512 tokens and decoding at batch 1 (128
   tokens from an empty cache; ``llama-bench -p 512 -n 128``), ``--threads`` threads each; which
   engine goes first alternates between rounds. Medians over rounds, each round the mean of
   ``--reps`` repetitions (llama-bench's own ``avg_ts``);
3. **bounded**: the roofline fraction of decoding, tokens/s x bytes read per token (each engine's
   own weights: ``active_weight_bytes``, ``gguf_active_bytes``) / the measured read bandwidth.

    python scripts/vs_llamacpp.py --build                     # builds llama.cpp first (cached; 15-30 min on 2 cores)
    python scripts/vs_llamacpp.py --shapes bench --rounds 3   # the bench preset only
    python scripts/vs_llamacpp.py --precisions bf16,int8      # a subset

The converter runs under this Python (it needs ``pip install gguf numpy sentencepiece``); the
checkpoint gets the bundled tokenizer (llama.cpp's converter pads its vocabulary to 32000).
Prints one table; everything goes to ``--out`` (JSON). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mixtral_lite.bench.checkpoint import make_checkpoint, make_checkpoint_direct, warm_page_cache  # noqa: E402
from mixtral_lite.bench.hardware import machine_info, measure_bandwidth  # noqa: E402
from mixtral_lite.bench.llamacpp import DEFAULT_HOME, LlamaCpp, gguf_active_bytes  # noqa: E402
from mixtral_lite.config import MixtralConfig  # noqa: E402
from mixtral_lite.errors import UserError  # noqa: E402

# precision -> (our dtype, our quantize, the GGUF kind); None: this project has no such format yet
PRECISIONS: dict[str, tuple[str | None, str | None, str]] = {
    "f32": ("float32", None, "f32"),
    "bf16": ("bfloat16", None, "bf16"),
    "int8": ("bfloat16", "int8", "q8_0"),
    "q4_0": ("bfloat16", "int4", "q4_0"),  # both 4.5 bits per weight (ours: groups of 64, scale and offset)
    "q4_K_M": (None, None, "q4_K_M"),
}
REFERENCE_FOR_4BIT = "bf16"  # whose tokens llama.cpp's 4-bit files are checked against
BUNDLED_TOKENIZER = ROOT / "mixtral_lite" / "bundled" / "tokenizer.model"


@dataclass
class Shape:
    name: str
    config: MixtralConfig
    std: float  # weight scale of the random recipe (make_checkpoint)
    direct: bool  # weights drawn in bfloat16 (no float32 copy)


def shapes() -> dict[str, Shape]:
    bench = MixtralConfig.from_preset("bench")
    big = MixtralConfig.from_dict({**MixtralConfig.from_preset("mixtral-8x7b").to_dict(), "num_hidden_layers": 2})
    # std scaled by 1 / sqrt(width) against the bench preset's 0.02 at hidden 512, so the layers add
    # as little to the residual stream relative to the embeddings as there (peaked greedy tokens)
    return {
        "bench": Shape("bench", bench, 0.02, False),
        "8x7b": Shape("8x7b", big, 0.02 * (bench.hidden_size / big.hidden_size) ** 0.5, True),
    }


# --- our side, one process per measurement -------------------------------------------------------


def ours_worker(job: dict) -> dict:
    """Load our model, optionally check it against llama.cpp's tokens, time prefill and decode."""
    from mixtral_lite.bench.engines import Ours
    from mixtral_lite.bench.hardware import active_weight_bytes

    torch.set_num_threads(job["threads"])
    engine = Ours.load(
        Path(job["checkpoint"]), getattr(torch, job["dtype"]), torch.device("cpu"), quantize=job["quantize"]
    )
    out: dict = {"active_bytes": active_weight_bytes(engine.model), "load_s": engine.load_s}
    if job.get("check"):
        prompt, theirs = job["check"]["prompt"], job["check"]["tokens"]
        ids = torch.tensor([prompt])
        run = engine.greedy(ids, len(theirs))
        out["tokens"] = run.tokens[0]
        with torch.no_grad():  # teacher-forced on llama.cpp's tokens: our log-probability of each
            seq = torch.tensor([prompt + theirs[:-1]])
            logp = torch.log_softmax(engine.model(seq)[0, len(prompt) - 1 :].float(), -1)
        out["logprobs"] = logp.gather(-1, torch.tensor(theirs)[:, None])[:, 0].tolist()
    if job.get("time"):
        gen = torch.Generator().manual_seed(0)
        vocab = engine.model.config.vocab_size
        long = torch.randint(3, vocab, (1, job["prefill"]), generator=gen)
        one = torch.randint(3, vocab, (1, 1), generator=gen)
        engine.prefill_s(long)  # warm-up: allocator, oneDNN primitives, the kernel's plans
        engine.greedy(one, 8)
        prefill, decode = [], []
        for _ in range(job["reps"]):
            prefill.append(job["prefill"] / engine.prefill_s(long))
            decode.append(engine.greedy(one, job["decode"] + 1).decode_tokens_per_s)
        out["prefill"], out["decode"] = statistics.mean(prefill), statistics.mean(decode)
    return out


def run_ours(job: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"our worker failed ({done.returncode}) on {job['checkpoint']}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    precision: str
    ours: dict = field(default_factory=lambda: {"prefill": [], "decode": []})
    theirs: dict = field(default_factory=lambda: {"prefill": [], "decode": []})
    ours_bytes: int | None = None
    theirs_bytes: int | None = None
    check: dict = field(default_factory=dict)
    skipped: str | None = None


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def prepare(shape: Shape, work: Path) -> Path:
    folder = work / f"ckpt-{shape.name}"
    if shape.direct:
        make_checkpoint_direct(folder, shape.config, seed=0, std=shape.std, dtype=torch.bfloat16)
    else:
        make_checkpoint(folder, shape.config, seed=0, std=shape.std)
    if not (folder / "tokenizer.model").exists():  # the converter needs one; ids are all we use
        shutil.copyfile(BUNDLED_TOKENIZER, folder / "tokenizer.model")
    return folder


def check(row: Row, llama: LlamaCpp, gguf: Path, ckpt: Path, args: argparse.Namespace, ours_spec: tuple) -> None:
    """Greedy tokens of both engines on one prompt; log-probabilities of llama.cpp's tokens."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, MixtralConfig.from_pretrained(ckpt).vocab_size, (16,), generator=gen).tolist()
    theirs, their_logp = llama.greedy(gguf, prompt, args.check_tokens, threads=args.threads)
    dtype, quantize = ours_spec
    job = {"checkpoint": str(ckpt), "dtype": dtype, "quantize": quantize, "threads": args.threads}
    job["check"] = {"prompt": prompt, "tokens": theirs}
    mine = run_ours(job)
    same = sum(a == b for a, b in zip(mine["tokens"], theirs, strict=True))
    prefix = next((i for i, (a, b) in enumerate(zip(mine["tokens"], theirs, strict=True)) if a != b), len(theirs))
    dl = max(abs(a - b) for a, b in zip(mine["logprobs"], their_logp, strict=True))
    row.check = {
        "against": f"ours {dtype}" + (f" {quantize}" if quantize else ""),
        "same": same,
        "n": len(theirs),
        "prefix": prefix,
        "max_dlogprob": dl,
        "ours_tokens": mine["tokens"],
        "llamacpp_tokens": theirs,
    }


def timed_round(row: Row, llama: LlamaCpp, gguf: Path, ckpt: Path, args, spec, r: int, decode: int) -> None:
    dtype, quantize = spec
    ours_first = r % 2 == 0

    def ours() -> None:
        if dtype is None:
            return
        job = {"checkpoint": str(ckpt), "dtype": dtype, "quantize": quantize, "threads": args.threads, "time": True}
        job.update(prefill=args.prefill, decode=decode, reps=args.reps)
        got = run_ours(job)
        row.ours_bytes = got["active_bytes"]
        row.ours["prefill"].append(got["prefill"])
        row.ours["decode"].append(got["decode"])

    def theirs() -> None:
        got = llama.bench(gguf, prompt=args.prefill, gen=decode, threads=args.threads, reps=args.reps)
        row.theirs["prefill"].append(got["prefill"])
        row.theirs["decode"].append(got["decode"])

    for step in (ours, theirs) if ours_first else (theirs, ours):
        step()


def needed_bytes(shape: Shape, dtype: str | None, quantize: str | None) -> int:
    """Our resident model at this precision (the larger of the two engines: GGUF files are mapped)."""
    from mixtral_lite.params import count_parameters

    if dtype is None:
        return 0
    n = count_parameters(shape.config).total
    if quantize:  # loaded in bfloat16, then quantised: both copies for a while
        return 3 * n
    return n * (torch.finfo(getattr(torch, dtype)).bits // 8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="build llama.cpp first (cached in --llamacpp)")
    p.add_argument("--llamacpp", type=Path, default=DEFAULT_HOME, help="llama.cpp home (src/, build/bin/)")
    p.add_argument(
        "--llamacpp-amx", action="store_true", help="--build: keep llama.cpp's AMX kernels (left out by default)"
    )
    p.add_argument("--shapes", default="bench,8x7b", help="comma list of: bench, 8x7b")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of: {', '.join(PRECISIONS)}")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (0: only convert and check)")
    p.add_argument("--reps", type=int, default=2, help="repetitions per engine and round (llama-bench -r)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--decode-8x7b", type=int, default=32, help="decode tokens on the 8x7b shape (slow)")
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--work", type=Path, default=ROOT / "bench_out" / "vs_llamacpp", help="checkpoints, GGUF files")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "vs_llamacpp.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(ours_worker(json.loads(args.worker))))
        return 0
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _pick(value: str, allowed, flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UserError(f"{flag}: expected a comma list of {', '.join(allowed)}, got {value!r}")
    return items


def run(args: argparse.Namespace) -> int:
    all_shapes = shapes()
    chosen = [all_shapes[s] for s in _pick(args.shapes, all_shapes, "--shapes")]
    precisions = _pick(args.precisions, PRECISIONS, "--precisions")
    if args.rounds < 0:
        raise UserError(f"--rounds: expected an integer >= 0 (0: check only), got {args.rounds}")
    for name in ("reps", "threads", "prefill", "decode", "decode_8x7b", "check_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    llama = LlamaCpp(args.llamacpp)
    if args.build:
        t0 = time.perf_counter()
        llama.build(amx=args.llamacpp_amx)
        print(f"llama.cpp built in {llama.bin} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    llama.require()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    bandwidths: list[float] = []
    for shape in chosen:
        ckpt = prepare(shape, args.work)
        decode = args.decode_8x7b if shape.name == "8x7b" else args.decode
        todo = []
        for prec in precisions:
            dtype, quantize, kind = PRECISIONS[prec]
            row = Row(shape.name, prec)
            rows.append(row)
            need = max(needed_bytes(shape, dtype, quantize), needed_bytes(shape, *PRECISIONS[REFERENCE_FOR_4BIT][:2]))
            if need * 1.15 > mem_available():
                row.skipped = f"needs ~{need / 2**30:.1f} GiB, {mem_available() / 2**30:.1f} GiB available"
                print(f"{shape.name} {prec}: skipped ({row.skipped})", file=sys.stderr)
                continue
            print(f"{shape.name} {prec}: converting, checking", file=sys.stderr)
            gguf = llama.convert(ckpt, kind, args.work / f"gguf-{shape.name}")
            row.theirs_bytes = gguf_active_bytes(gguf, shape.config.num_experts_per_tok, shape.config.num_experts,
                                                 shape.config.vocab_size)  # fmt: skip
            spec = (dtype, quantize) if dtype is not None else PRECISIONS[REFERENCE_FOR_4BIT][:2]
            if llama.has_server():
                check(row, llama, gguf, ckpt, args, spec)
            else:
                print(f"{shape.name} {prec}: not checked (no llama-server in {llama.bin})", file=sys.stderr)
            todo.append((row, gguf, (dtype, quantize)))
        warm_page_cache(ckpt)
        for r in range(args.rounds):
            bandwidths.append(measure_bandwidth(torch.device("cpu")))
            for row, gguf, spec in todo:
                print(f"{shape.name} {row.precision}: round {r + 1}/{args.rounds}", file=sys.stderr)
                timed_round(row, llama, gguf, ckpt, args, spec, r, decode)
    bandwidth = statistics.median(bandwidths) if bandwidths else measure_bandwidth(torch.device("cpu"))
    result = {
        "machine": machine_info(torch.device("cpu")),
        "llamacpp": {"home": str(llama.home), "version": llama.version()},
        "bandwidth_gb_s": bandwidth / 1e9,
        "bandwidths_gb_s": [b / 1e9 for b in bandwidths],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
        "rows": [asdict(r) for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(format_table(result))
    unchecked = [f"{r.shape} {r.precision}" for r in rows if not r.check and not r.skipped]
    if unchecked:
        print(f"not checked against ours (no llama-server): {', '.join(unchecked)}", file=sys.stderr)
    bad = [r for r in rows if r.check and PRECISIONS[r.precision][0] is not None and r.check["same"] != r.check["n"]]
    for r in bad:
        print(f"tokens differ: {r.shape} {r.precision}: {r.check['same']}/{r.check['n']} same", file=sys.stderr)
    return 1 if bad else 0


def _ratio_cell(ours: list[float], theirs: list[float]) -> str:
    if not theirs:
        return "-"
    t = statistics.median(theirs)
    if not ours:
        return f"- / {t:.1f}"
    o = statistics.median(ours)
    per_round = [a / b for a, b in zip(ours, theirs, strict=False)]
    spread = f" [{min(per_round):.2f}-{max(per_round):.2f}]" if len(per_round) > 1 else ""
    return f"{o:.1f} / {t:.1f} ({o / t:.2f}x{spread})"


def format_table(result: dict) -> str:
    bw = result["bandwidth_gb_s"] * 1e9
    head = "| shape | precision | prefill tok/s ours / llama.cpp | decode b1 tok/s ours / llama.cpp | "
    head += "roofline ours / llama.cpp | greedy tokens | max dlogprob |"
    lines = [
        f"llama.cpp: {result['llamacpp']['version']}; {result['machine']['cpu']}, "
        f"{result['settings']['threads']} threads, read bandwidth {result['bandwidth_gb_s']:.1f} GB/s; "
        f"medians of {result['settings']['rounds']} interleaved rounds [per-round ratio range]",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["skipped"]:
            lines.append(f"| {r['shape']} | {r['precision']} | skipped: {r['skipped']} | | | | |")
            continue
        roof = []
        for runs, nbytes in ((r["ours"]["decode"], r["ours_bytes"]), (r["theirs"]["decode"], r["theirs_bytes"])):
            roof.append(f"{statistics.median(runs) * nbytes / bw:.0%}" if runs and nbytes else "-")
        c = r["check"]
        tokens = f"{c['same']}/{c['n']} vs {c['against']}" if c else "-"
        dl = f"{c['max_dlogprob']:.3f}" if c else "-"
        prefill = _ratio_cell(r["ours"]["prefill"], r["theirs"]["prefill"])
        decode = _ratio_cell(r["ours"]["decode"], r["theirs"]["decode"])
        lines.append(
            f"| {r['shape']} | {r['precision']} | {prefill} | {decode} | {' / '.join(roof)} | {tokens} | {dl} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
