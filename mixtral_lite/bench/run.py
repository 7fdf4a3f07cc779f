"""The benchmark run: token check, measurements (medians), int8 quality, JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import bench_config, make_checkpoint, warm_page_cache
from .engines import Engine, Ours, Theirs
from .hardware import PeakMemory, active_weight_bytes, machine_info, measure_bandwidth, release_memory, weight_bytes
from .options import DTYPES, Options
from .report import fmt_check, format_table


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _prompts(vocab: int, b: int, t: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=gen).to(device)  # 0-2: unk, bos, eos


@dataclass
class Measured:
    """Medians for one engine at one dtype (None where not measured)."""

    name: str
    prefill_tok_s: float | None = None
    decode_b1_tok_s: float | None = None
    decode_bn_tok_s: float | None = None
    ttft_s: float | None = None
    peak_mem_mb: float | None = None
    weights_mb: float | None = None
    load_s: float | None = None
    detail: dict = field(default_factory=dict)


METRICS = ("prefill", "decode_b1", "decode_bn")
DECODE = ("decode_b1", "decode_bn")
PREFILL_SAMPLES = 3  # prefill timings per engine and round (a decode run is long enough alone)


@dataclass
class Plan:
    """One engine (in one transformers configuration) and the metrics it is timed on."""

    key: str  # result entry: ours, theirs, ours_compiled, int8, int8_compiled
    engine: Engine
    metrics: tuple[str, ...]
    config: str | None = None  # transformers: "experts implementation/cache"
    runs: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    peak: int = 0

    def prepare(self) -> None:
        if self.config is not None:
            self.engine.set(*self.config.split("/"))


def _warm_up(plan: Plan, opts: Options, prompts: dict[str, torch.Tensor]) -> None:
    """Allocator and lazy initialisation; a compiled step compiles each shape here, untimed."""
    plan.prepare()
    if isinstance(plan.engine, Ours) and plan.engine.compiled:
        for key, batch in (("decode_b1", "b1"), ("decode_bn", "bn")):
            if key in plan.metrics:
                plan.engine.greedy(prompts[batch], opts.new_tokens)
    else:
        plan.engine.greedy(prompts["b1"][:, :8], 4)


def _measure_once(plan: Plan, opts: Options, prompts: dict[str, torch.Tensor], device: torch.device) -> None:
    """One timed run of each of the plan's metrics ("prefill" also times the first token)."""
    plan.prepare()
    engine = plan.engine
    if "prefill" in plan.metrics:  # short (under a second): several samples per round
        for _ in range(PREFILL_SAMPLES):
            plan.runs.setdefault("prefill", []).append(opts.prompt_len / engine.prefill_s(prompts["long"]))
        with PeakMemory(device) as mem:
            run = engine.greedy(prompts["long"], 1)
        plan.runs.setdefault("ttft", []).append(run.ttft)
        plan.peak = max(plan.peak, mem.peak)
    for key, batch in (("decode_b1", "b1"), ("decode_bn", "bn")):
        if key in plan.metrics:
            with PeakMemory(device) as mem:
                run = engine.greedy(prompts[batch], opts.new_tokens)
            plan.runs.setdefault(key, []).append(run.decode_tokens_per_s)
            plan.tokens[batch] = run.tokens
            plan.peak = max(plan.peak, mem.peak)


def _measure_all(plans: list[Plan], opts: Options, prompts: dict[str, torch.Tensor], device: torch.device) -> None:
    """Every plan warmed up, then ``repeats`` rounds with each plan once per round: on a shared
    machine the load drifts, and interleaving lets it fall on every engine alike."""
    for plan in plans:
        _warm_up(plan, opts, prompts)
    for _ in range(opts.repeats):
        for plan in plans:
            _measure_once(plan, opts, prompts, device)


def _result(plans: list[Plan], name: str) -> Measured:
    """The medians of one engine's plans (transformers: each metric from the configuration that
    won it); peak memory: weights plus the largest transient of its runs."""
    engine = plans[0].engine
    m = Measured(name, load_s=engine.load_s, weights_mb=weight_bytes(engine.model) / 2**20)
    for plan in plans:
        med = {k: _median(v) for k, v in plan.runs.items()}
        for metric, attr in (("prefill", "prefill_tok_s"), ("ttft", "ttft_s"), *((d, f"{d}_tok_s") for d in DECODE)):
            if metric in med:
                setattr(m, attr, med[metric])
    m.peak_mem_mb = m.weights_mb + max(p.peak for p in plans) / 2**20
    runs = {p.config or "runs": p.runs for p in plans}
    m.detail = {"tokens": plans[0].tokens, "runs": runs if len(plans) > 1 else plans[0].runs}
    return m


def _check_same_tokens(ours: Engine, theirs: Engine, prompts: dict[str, torch.Tensor], n: int) -> dict:
    """Greedy tokens of both, batch 1 and batch n: positions that agree, and the first mismatch."""
    report = {}
    for key in ("b1", "bn"):
        a = ours.greedy(prompts[key], n).tokens
        b = theirs.greedy(prompts[key], n).tokens
        same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
        total = sum(len(r) for r in a)
        first = next((i for i in range(n) if any(ra[i] != rb[i] for ra, rb in zip(a, b, strict=True))), None)
        report[key] = {"agree": same / total, "first_mismatch": first, "identical": a == b}
    return report


def _pick_theirs(theirs: Theirs, opts: Options, prompts: dict[str, torch.Tensor]) -> dict:
    """Try every experts implementation and cache kind on short runs; return the fastest per metric."""
    probe = {}
    for impl in opts.hf_impls:
        for cache in opts.hf_caches:
            theirs.set(impl, cache)
            theirs.greedy(prompts["b1"][:, :8], 3)
            b1 = theirs.greedy(prompts["b1"], 16).decode_tokens_per_s
            bn = theirs.greedy(prompts["bn"], 8).decode_tokens_per_s
            pre = (
                min(theirs.prefill_s(prompts["long"][:, :128]) for _ in range(2))
                if cache == opts.hf_caches[0]
                else None
            )
            probe[f"{impl}/{cache}"] = {"decode_b1": b1, "decode_bn": bn, "prefill_128_s": pre}
    best_b1 = max(probe, key=lambda k: probe[k]["decode_b1"])
    best_bn = max(probe, key=lambda k: probe[k]["decode_bn"])
    best_pre = min((k for k in probe if probe[k]["prefill_128_s"] is not None), key=lambda k: probe[k]["prefill_128_s"])
    return {"probe": probe, "prefill": best_pre, "decode_b1": best_b1, "decode_bn": best_bn}


def _theirs_plans(theirs: Theirs, opts: Options, prompts: dict[str, torch.Tensor]) -> tuple[list[Plan], dict]:
    """transformers: one plan per configuration that won a metric in the probe."""
    choice = _pick_theirs(theirs, opts, prompts)
    by_config: dict[str, tuple[str, ...]] = {}
    for metric in METRICS:
        by_config[choice[metric]] = (*by_config.get(choice[metric], ()), metric)
    return [Plan("theirs", theirs, metrics, config) for config, metrics in by_config.items()], choice


def _quality(ours_q: Ours, ours_ref: Ours, prompts: dict[str, torch.Tensor], n: int) -> dict:
    """int8 against the same model unquantised: logit error on a prompt, greedy agreement over n
    tokens (free-running: position by position; teacher-forced: next-token argmax along the
    reference's own greedy sequence)."""
    ids = prompts["b1"]
    ref_run = ours_ref.greedy(ids, n)
    q_run = ours_q.greedy(ids, n)
    a, b = ref_run.tokens[0], q_run.tokens[0]
    seq = torch.cat([ids, torch.tensor([a], device=ids.device)], dim=1)
    with torch.no_grad():
        lr = ours_ref.model(seq).float()[0]  # [T, V]
        lq = ours_q.model(seq).float()[0]
    t = ids.shape[1]
    forced = (lr[t - 1 : -1].argmax(-1) == lq[t - 1 : -1].argmax(-1)).float().mean().item()
    err = (lq - lr).abs()
    return {
        "greedy_agree_free": sum(x == y for x, y in zip(a, b, strict=True)) / n,
        "greedy_first_mismatch": next((i for i in range(n) if a[i] != b[i]), None),
        "greedy_agree_forced": forced,
        "logit_max_abs_err": err.max().item(),
        "logit_rel_err": (err.norm() / lr.norm()).item(),
        "logit_scale_rms": lr.pow(2).mean().sqrt().item(),
    }


def run_benchmark(opts: Options, log: Callable[[str], None] = print) -> dict:
    """Measure everything; return the JSON-ready result (also written to ``opts.out``)."""
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device}: CUDA is not available on this machine")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    for d in opts.dtypes:
        if d not in DTYPES:
            raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {d!r}")
    config = bench_config(opts)
    out = Path(opts.out)
    folder = (
        Path(opts.checkpoint) if opts.checkpoint else out.parent / f"ckpt-{opts.preset}-{config.num_hidden_layers}l"
    )
    log(f"checkpoint: {folder}")
    make_checkpoint(folder, config, seed=opts.seed, std=opts.std)
    warm_page_cache(folder)
    prompts = {
        "long": _prompts(config.vocab_size, 1, opts.prompt_len, opts.seed + 1, device),
        "b1": _prompts(config.vocab_size, 1, opts.decode_prompt_len, opts.seed + 2, device),
        "bn": _prompts(config.vocab_size, opts.batch, opts.decode_prompt_len, opts.seed + 3, device),
    }
    bandwidth = measure_bandwidth(device)
    result = {
        "machine": machine_info(device),
        "options": asdict(opts),
        "config": config.to_dict(),
        "bandwidth_GBps": bandwidth / 1e9,
        "dtypes": {},
    }
    log(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s; threads: {torch.get_num_threads()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = [bandwidth]
    for dname in opts.dtypes:
        result["dtypes"][dname] = _bench_dtype(dname, folder, opts, prompts, device, bandwidth, log)
        out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted run
        samples.append(measure_bandwidth(device))
    # The machine's bandwidth is the best measured: on a shared machine a single sample can be low.
    bandwidth = max(samples)
    result["bandwidth_GBps"], result["bandwidth_samples_GBps"] = bandwidth / 1e9, [b / 1e9 for b in samples]
    for entry in result["dtypes"].values():
        entry["roofline_tok_s"] = bandwidth / entry["bytes_per_token"]
        if "int8_bytes_per_token" in entry:
            entry["int8_roofline_tok_s"] = bandwidth / entry["int8_bytes_per_token"]
    result["same_tokens_ok"] = all(
        c["identical"] for entry in result["dtypes"].values() for c in entry.get("same_tokens", {}).values()
    )
    out.write_text(json.dumps(result, indent=2))
    log("")
    log(format_table(result))
    log(f"\nJSON: {out}")
    return result


def _bench_dtype(
    dname: str,
    folder: Path,
    opts: Options,
    prompts: dict[str, torch.Tensor],
    device: torch.device,
    bandwidth: float,
    log: Callable[[str], None],
) -> dict:
    """Every measurement at one dtype: ours, transformers, ours compiled, ours int8 (interleaved)."""
    dtype = DTYPES[dname]
    entry: dict = {}
    log(f"[{dname}] loading mixtral_lite")
    ours = Ours.load(folder, dtype, device)
    entry["bytes_per_token"] = active_weight_bytes(ours.model)
    entry["roofline_tok_s"] = bandwidth / entry["bytes_per_token"]
    plans = [Plan("ours", ours, METRICS)]
    names = {
        "ours": "mixtral_lite",
        "theirs": "transformers",
        "ours_compiled": "mixtral_lite compiled",
        "int8": "mixtral_lite int8",
        "int8_compiled": "mixtral_lite int8 compiled",
    }
    choice = None
    if opts.compare:
        log(f"[{dname}] loading transformers")
        theirs = Theirs(folder, dtype, device, opts.hf_impls[0], opts.hf_caches[0])
        entry["same_tokens"] = _check_same_tokens(ours, theirs, prompts, opts.new_tokens)
        log(f"[{dname}] greedy tokens vs transformers: {fmt_check(entry['same_tokens'])}")
        log(f"[{dname}] transformers: trying {', '.join(opts.hf_impls)} x {', '.join(opts.hf_caches)} caches")
        theirs_plans, choice = _theirs_plans(theirs, opts, prompts)
        plans += theirs_plans
    if opts.compile:  # its own copy: on the CPU a compiled step stores the weights row-major
        log(f"[{dname}] compiling the decode step")
        plans.append(Plan("ours_compiled", Ours.load(folder, dtype, device, compile=True), DECODE))
    q = None
    if opts.quantize and dtype == torch.bfloat16:
        q = Ours.load(folder, dtype, device, quantize="int8")
        plans.append(Plan("int8", q, METRICS))
        if opts.compile:
            plans.append(Plan("int8_compiled", Ours.load(folder, dtype, device, quantize="int8", compile=True), DECODE))
    who = ", ".join(names[p.key] + (f" ({p.config})" if p.config else "") for p in plans)
    log(f"[{dname}] measuring: {opts.repeats} rounds of {who}")
    _measure_all(plans, opts, prompts, device)
    for key in dict.fromkeys(p.key for p in plans):
        entry[key] = _result([p for p in plans if p.key == key], names[key])
        log(f"[{dname}] {entry[key].name}: {_fmt_measured(entry[key], opts)}")
    for key in ("ours_compiled", "int8_compiled"):  # compiled and eager steps: the same tokens
        if key in entry:
            base = entry["ours" if key == "ours_compiled" else "int8"].detail["tokens"]
            entry[f"{key}_same_tokens_as_eager"] = entry[key].detail["tokens"] == base
    if choice is not None:
        entry["theirs"].detail.update(choice={k: v for k, v in choice.items() if k != "probe"}, probe=choice["probe"])
    if q is not None:
        entry["int8_bytes_per_token"] = active_weight_bytes(q.model)
        entry["int8_roofline_tok_s"] = bandwidth / entry["int8_bytes_per_token"]
        entry["int8_quality"] = _quality(q, ours, prompts, opts.new_tokens)
    del plans, ours, q
    release_memory()
    return _jsonable(entry)


def _fmt_measured(m: Measured, opts: Options) -> str:
    parts = []
    for label, value, unit in (
        (f"prefill {opts.prompt_len}", m.prefill_tok_s, "tok/s"),
        ("decode b1", m.decode_b1_tok_s, "tok/s"),
        (f"decode b{opts.batch}", m.decode_bn_tok_s, "tok/s"),
        ("ttft", m.ttft_s, "s"),
    ):
        if value is not None:
            parts.append(f"{label} {value:.3g} {unit}")
    return ", ".join(parts) + f", peak {m.peak_mem_mb:.0f} MB, load {m.load_s:.2f} s"


def _jsonable(entry: dict) -> dict:
    return {k: asdict(v) if isinstance(v, Measured) else v for k, v in entry.items()}
