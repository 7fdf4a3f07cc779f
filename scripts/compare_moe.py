"""Compare MoE variants on a text file at equal active parameters and equal training tokens.

Every model shares attention, embeddings and depth; only the feed-forward differs, sized so each
token goes through the same number of FFN parameters (k * I = 2 * 128 here):

  dense           one SwiGLU FFN of size k * I = 256 (all layers dense)
  mixtral         top-2 of 8 experts of size 128 (Mixtral)
  hard            top-1 of 8 experts of size 256, capacity factor 1.25 (Switch)
  soft            all 8 experts of size 32, weighted by the full softmax (dense mixture)
  hierarchical    2 groups of 4 experts of size 128: top-1 group, top-2 inside (weight = product)
  deepseek        fine-grained m=4: 31 routed experts of size 32, top-7, + 1 shared (DeepSeekMoE)
  deepseek-v3     the same experts, sigmoid scores, auxiliary-loss-free bias balancing

each without balancing and with its balance loss (Switch aux loss; importance loss for soft;
DeepSeek expert-level loss for deepseek) at coefficient 0.02. Byte-level tokens, a deterministic
90/10 split, the same seeds for every variant. Writes a Markdown table between the result markers
of --out (the text around them is kept).

Usage:
  .venv/bin/python scripts/compare_moe.py ../shared/data/tinyshakespeare.txt
  .venv/bin/python scripts/compare_moe.py DATA --steps 20 --variants dense,mixtral --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.model.routing import fine_grained
from mixtral_lite.params import count_parameters
from mixtral_lite.training.data import ByteTokenizer, TokenData
from mixtral_lite.training.train import TrainConfig, make_optimizer, moe_layers, train, train_step

START, END = "<!-- results:start -->", "<!-- results:end -->"
I_EXPERT, K = 128, 2


def base_config(layers: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=I_EXPERT,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        moe={"num_experts": 8, "num_experts_per_tok": K},
    )


def with_moe(config: MixtralConfig, intermediate_size: int | None = None, **moe) -> MixtralConfig:
    data = config.to_dict()
    data["moe"] = {**data["moe"], **moe}
    if intermediate_size is not None:
        data["intermediate_size"] = intermediate_size
    return MixtralConfig.from_dict(data)


def variants(layers: int) -> dict[str, tuple[MixtralConfig, list[tuple[str, str]]]]:
    """name -> (model config, [(balancing label, balance_loss), ...])."""
    base = base_config(layers)
    fine = fine_grained(base, 4, n_shared=1)
    both = [("none", "none"), ("aux 0.02", "switch")]
    return {
        "dense": (with_moe(base, first_k_dense=layers, dense_intermediate_size=K * I_EXPERT), [("-", "none")]),
        "mixtral": (base, both),
        "hard": (with_moe(base, K * I_EXPERT, kind="hard", num_experts_per_tok=1, capacity_factor=1.25), both),
        "soft": (with_moe(base, K * I_EXPERT // 8, kind="soft"), [("none", "none"), ("importance 0.02", "importance")]),
        "hierarchical": (with_moe(base, kind="hierarchical", num_groups=2, top_k_groups=1), both),
        "deepseek": (fine, [("none", "none"), ("expert loss 0.02", "deepseek")]),
        "deepseek-v3": (with_moe(fine, score_func="sigmoid", bias_balancing=True), [("bias (aux-free)", "none")]),
    }


def describe(config: MixtralConfig, name: str) -> str:
    moe = config.moe
    if name == "dense":
        return f"dense FFN {moe.dense_intermediate_size}"
    size = f"{moe.num_experts}x{config.intermediate_size}"
    if moe.kind == "soft":
        return f"{size}, all (dense mixture)"
    if moe.kind == "hierarchical":
        return f"{size} in {moe.num_groups} groups, top-{moe.top_k_groups} group, top-{moe.num_experts_per_tok}"
    shared = f" + {moe.n_shared_experts} shared" if moe.n_shared_experts else ""
    capacity = f", capacity {moe.capacity_factor}" if moe.kind == "hard" else ""
    scores = ", sigmoid" if moe.score_func == "sigmoid" else ""
    return f"{size} top-{moe.num_experts_per_tok}{shared}{capacity}{scores}"


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    data = TokenData.from_file(args.data, ByteTokenizer())
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=max(1, args.steps // 10),
        min_lr=args.lr / 10,
        weight_decay=0.1,
        grad_clip=1.0,
        aux_coef=0.02,
        eval_interval=args.steps,
        eval_batches=args.eval_batches,
    )
    table = variants(args.layers)
    wanted = args.variants.split(",") if args.variants else list(table)
    unknown = sorted(set(wanted) - set(table))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {list(table)}")
    rows = []
    for name in wanted:
        config, balancings = table[name]
        counts = count_parameters(config)
        for label, loss_name in balancings:
            runs = []
            for seed in range(args.seeds):
                run_cfg = dataclasses.replace(cfg, seed=seed, balance_loss=loss_name)
                t0 = time.perf_counter()
                result = train(config, run_cfg, data, None, progress=False, log=lambda s: None)
                final = result.final_val
                runs.append(
                    {
                        "val_loss": final["val_loss"],
                        "tokens_per_s": result.tokens_per_s,
                        "load_cv": final.get("load_cv"),
                        "max_vio": final.get("max_vio"),
                        "train_dropped": final.get("train_dropped"),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(
                    f"{name:13s} {label:17s} seed {seed}: val {final['val_loss']:.4f} "
                    f"({runs[-1]['seconds']:.0f} s, {result.tokens_per_s:,.0f} tok/s)",
                    flush=True,
                )
            rows.append(
                {
                    "variant": name,
                    "experts": describe(config, name),
                    "balancing": label,
                    "total_params": counts.total,
                    "active_params": counts.active,
                    "runs": runs,
                }
            )
    return rows


def measure_speed(rows: list[dict], args: argparse.Namespace, rounds: int = 3, steps: int = 3) -> None:
    """Training-step throughput per row, measured round-robin over the variants (best of
    ``rounds``), so load from other processes on the machine hits every variant alike."""
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(3, 259, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    table = variants(args.layers)
    setups = []
    for r in rows:
        config, balancings = table[r["variant"]]
        cfg = TrainConfig(lr=args.lr, balance_loss=dict(balancings)[r["balancing"]])
        model = Mixtral(config)
        model.reset_parameters(generator=torch.Generator().manual_seed(0))
        layers = moe_layers(model)
        for m in layers:
            m.record_routing = True
        setups.append((model, make_optimizer(model, cfg), layers, cfg))
    best = [float("inf")] * len(setups)
    for _ in range(rounds):
        for i, (model, opt, layers, cfg) in enumerate(setups):
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, layers, x, y, cfg, cfg.balance_loss)
            best[i] = min(best[i], (time.perf_counter() - t0) / steps)
    for r, seconds in zip(rows, best, strict=True):
        r["step_tokens_per_s"] = args.batch_size * args.seq_len / seconds


def fmt(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    tokens = args.steps * args.batch_size * args.seq_len
    lines = [
        f"Command: `.venv/bin/python scripts/compare_moe.py {args.data} --steps {args.steps} --seeds {args.seeds}`",
        "",
        f"Data: `{Path(args.data).name}`, UTF-8 bytes, last 10% held out. Each run: {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens = {tokens:,} training tokens; {args.layers} layers, hidden 64, "
        f"4 heads (2 kv); AdamW lr {args.lr} (warmup {max(1, args.steps // 10)}, cosine to {args.lr / 10:g}), "
        f"clip 1.0; float32 on {args.threads} CPU thread(s). Val loss: mean cross-entropy (nats/byte) on "
        f"{args.eval_batches} x {args.batch_size} fixed validation windows; load CV and MaxVio: on those "
        "windows, mean over layers (eval mode, so hard routing drops nothing there); dropped: % of tokens over "
        "capacity during training (mean over steps and layers). tokens/s: training steps (forward, backward, "
        "AdamW) of freshly initialised models timed round-robin over the variants after the runs, best of 3 "
        "rounds of 3 steps; tokens/s in "
        "run: the same during the runs, which other processes on the machine slowed unevenly. "
        "Values: mean ± std over "
        f"seeds {list(range(args.seeds))}. Total run time {seconds / 60:.1f} min on {platform.machine()}.",
        "",
        "| variant | experts | balancing | params total / active | val loss | tokens/s | tokens/s in run "
        "| load CV | MaxVio | dropped % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = r["runs"]
        lines.append(
            f"| {r['variant']} | {r['experts']} | {r['balancing']} | "
            f"{r['total_params'] / 1e3:.0f}k / {r['active_params'] / 1e3:.0f}k | "
            f"{fmt([x['val_loss'] for x in runs], 4)} | {fmt([r.get('step_tokens_per_s')], 0)} | "
            f"{fmt([x['tokens_per_s'] for x in runs], 0)} | "
            f"{fmt([x['load_cv'] for x in runs], 3)} | {fmt([x['max_vio'] for x in runs], 3)} | "
            f"{fmt([None if x['train_dropped'] is None else 100 * x['train_dropped'] for x in runs], 1)} |"
        )
    return "\n".join(lines)


def write(out: Path, block: str) -> None:
    text = out.read_text() if out.is_file() else f"# MoE variants compared\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a text file, e.g. ../shared/data/tinyshakespeare.txt")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", help="comma-separated subset (default: all)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "moe_comparison.md"))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--from-json", help="skip training: take the rows from a --json file of an earlier run")
    p.add_argument("--no-speed", action="store_true", help="skip the interleaved throughput measurement")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        if isinstance(saved, list):  # rows only: the run time is the sum of the runs'
            saved = {"rows": saved, "seconds": sum(x["seconds"] for r in saved for x in r["runs"])}
        rows, seconds = saved["rows"], saved["seconds"]
    else:
        rows = run(args)
        seconds = time.perf_counter() - t0
    if not args.no_speed:
        measure_speed(rows, args)
    block = markdown(rows, args, seconds)
    write(Path(args.out), block)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=1) + "\n")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
