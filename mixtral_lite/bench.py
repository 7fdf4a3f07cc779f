"""Benchmark mixtral_lite against transformers' ``MixtralForCausalLM`` on the same weights.

One random-weight checkpoint is written by transformers and loaded into both models, in the same
dtype, on the same device, with the same thread count, in the same process. Every number is the
median of ``repeats`` runs. Greedy tokens are compared before any speed is reported, so speed is
never bought with a different answer.

Metrics, per dtype: prefill tokens/s (one forward pass over a ``prompt_len`` prompt, filling the
cache), decode tokens/s at batch 1 and at batch ``batch`` (``new_tokens`` greedy tokens after a
``decode_prompt_len`` prompt; the first token is prefill's and not counted), time to first token
(call to first token on the host, for the ``prompt_len`` prompt), peak memory (weights plus the
largest transient of a run), load time (checkpoint folder to a ready model). transformers runs
its own ``generate`` with every experts implementation and cache kind listed, and is credited
with the fastest of them on each metric.

The decode roofline: batch-1 decoding reads every active weight once per token, so tokens/s can
not exceed (measured memory read bandwidth) / (bytes of active weights). "Active" weights are
attention, norms, router, the top-k experts of every layer, the output head in full and one row
of the embedding table.

Axis legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .cache import KVCache
from .config import MixtralConfig
from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Options:
    preset: str = "bench"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    prompt_len: int = 512  # prefill and time-to-first-token prompt
    decode_prompt_len: int = 32  # prompt before the decode measurements
    new_tokens: int = 128
    batch: int = 8
    repeats: int = 3
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


# ----------------------------------------------------------------------------------------------
# The checkpoint, the roofline


def bench_config(opts: Options) -> MixtralConfig:
    config = MixtralConfig.from_preset(opts.preset)
    if opts.layers is not None:
        config = MixtralConfig.from_dict({**config.to_dict(), "num_hidden_layers": opts.layers})
    return config


def make_checkpoint(folder: Path, config: MixtralConfig, *, seed: int, std: float) -> Path:
    """Write a random transformers checkpoint with peaked logits (reused when one with the same
    recipe exists).

    Matrices are N(0, std) and norms ones, except that the embeddings are N(0, 50 * std), larger
    than what the layers add to the residual stream, and the output head is a scaled copy of the
    embedding table with its rows permuted: every token then has one successor whose logit leads
    by many standard deviations, while every layer still runs at full cost. Greedy tokens are thus
    far from ties, so implementations that round differently (bfloat16, int8) can be held to the
    same answer.
    """
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM

    recipe = {"config": config.to_hf_dict(), "seed": seed, "std": std, "kind": "peaked-successor"}
    meta = folder / "bench_recipe.json"
    if meta.exists() and json.loads(meta.read_text()) == recipe:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        hf = MixtralForCausalLM(HFConfig(**config.to_hf_dict()))
    hf = hf.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        emb = hf.model.embed_tokens.weight
        emb.mul_(50.0)
        if not config.tie_word_embeddings:
            successor = torch.randperm(config.vocab_size, generator=gen)  # token v is followed by successor[v]
            head = torch.empty_like(emb)
            head[successor] = emb * (std / emb.std())  # row successor[v] points at v's embedding
            hf.lm_head.weight.copy_(head)
    hf.save_pretrained(folder)
    meta.write_text(json.dumps(recipe))
    return folder


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of ``repeats`` sums over a buffer far larger
    than any cache (on a GPU, a copy, counting the bytes read and written)."""
    x = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            y = x.clone()
            del y
        else:
            x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    moved = 2 * nbytes if device.type == "cuda" else nbytes
    return moved / best


def active_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one batch-1 decode step must read: every tensor of the model, except only the top-k
    slices of stacked expert tensors (and their scales) and one row of the embedding table."""
    config = model.config
    k, e = config.num_experts_per_tok, config.num_experts
    seen: set[int] = set()
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or not t.is_floating_point() and t.dtype != torch.int8:
            continue
        seen.add(t.data_ptr())
        size = t.numel() * t.element_size()
        if name.startswith("tok_embeddings"):
            size //= config.vocab_size
            if config.tie_word_embeddings:
                size *= config.vocab_size  # the same table is the output head: read in full
        elif ".feed_forward." in name and t.dim() >= 2 and t.shape[0] == e and "gate" not in name:
            size = size * k // e
        total += size
    return total


# ----------------------------------------------------------------------------------------------
# Measuring: time, memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Largest memory growth inside the block: resident set size sampled every millisecond on the
    CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss()
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss()) - self._start


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Run:
    """One greedy generation: tokens [B, n], call-to-first-token and later-token times."""

    tokens: list[list[int]]
    ttft: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        b, n = len(self.tokens), len(self.tokens[0])
        return b * (n - 1) / self.decode_s if self.decode_s > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# The two implementations behind one interface


class Engine:
    name: str
    model: torch.nn.Module
    load_s: float

    def prefill_s(self, ids: torch.Tensor) -> float:
        """Seconds for one forward pass over ids [B, T] that fills a fresh cache."""
        raise NotImplementedError

    def greedy(self, ids: torch.Tensor, n: int) -> Run:
        """n greedy tokens after ids [B, T] (EOS suppressed, as transformers' min_new_tokens)."""
        raise NotImplementedError


class Ours(Engine):
    """mixtral_lite: our own greedy loop over ``generate.prefill`` / ``generate.decode_step``."""

    def __init__(
        self, model: torch.nn.Module, name: str = "mixtral_lite", *, load_s: float = 0.0, compile: bool = False
    ):
        from .generate import compile_decode_step, decode_step

        self.model, self.name, self.load_s = model, name + (" compiled" if compile else ""), load_s
        self.device = model.device
        self.decode_fn = compile_decode_step(self.device) if compile else decode_step
        self.compiled = compile
        self.eos = model.config.eos_token_id

    @classmethod
    def load(
        cls, path: Path, dtype: torch.dtype, device: torch.device, *, quantize: str | None = None, compile: bool = False
    ) -> Ours:
        from .loading import load_model

        t0 = time.perf_counter()
        model = load_model(path, dtype=dtype, device=device, quantize=quantize, progress=False)
        _sync(device)
        name = "mixtral_lite" + (f" {quantize}" if quantize else "")
        return cls(model, name, load_s=time.perf_counter() - t0, compile=compile)

    def _cache(self, b: int, length: int) -> KVCache:
        return KVCache(self.model.config, b, length, device=self.device, dtype=self.model.dtype)

    @torch.no_grad()
    def prefill_s(self, ids: torch.Tensor) -> float:
        from .generate import prefill

        cache = self._cache(*ids.shape)
        _sync(self.device)
        t0 = time.perf_counter()
        prefill(self.model, ids, cache, None)
        _sync(self.device)
        return time.perf_counter() - t0

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.eos is not None:
            logits[:, self.eos] = float("-inf")
        return logits.argmax(-1)

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, n: int) -> Run:
        from .generate import prefill

        b, t = ids.shape
        t0 = time.perf_counter()
        cache = self._cache(b, t + n - 1)
        out = torch.empty(b, n, dtype=torch.long, device=self.device)
        out[:, 0] = self._pick(prefill(self.model, ids, cache, None))
        out[:, 0].tolist()  # the first tokens reach the host
        t1 = time.perf_counter()
        slot = torch.tensor([t], device=self.device)
        positions = torch.full((b, 1), t, device=self.device)
        for i in range(1, n):  # no host read inside the loop: tokens stay on the device
            logits = self.decode_fn(self.model, out[:, i - 1 : i], cache, slot, positions)
            out[:, i] = self._pick(logits)
            slot += 1
            positions += 1
        tokens = out.tolist()
        t2 = time.perf_counter()
        return Run(tokens, t1 - t0, t2 - t1)


class _Timestamps:
    """A transformers streamer that notes when each step's tokens reach the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Theirs(Engine):
    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device, impl: str, cache: str) -> None:
        from transformers import MixtralForCausalLM

        self.name = f"transformers ({impl}, {cache} cache)"
        self.impl, self.cache_kind, self.device = impl, cache, device
        t0 = time.perf_counter()
        self.model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
        _sync(device)
        self.load_s = time.perf_counter() - t0
        self.model.eval()
        self.set(impl, cache)

    def set(self, impl: str, cache: str) -> None:
        self.model.set_experts_implementation(impl)
        self.impl, self.cache_kind = impl, cache
        self.name = f"transformers ({impl}, {cache} cache)"

    @torch.no_grad()
    def prefill_s(self, ids: torch.Tensor) -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, n: int) -> Run:
        stamps = _Timestamps()
        kw = {"cache_implementation": "static"} if self.cache_kind == "static" else {}
        t0 = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
            streamer=stamps,
            **kw,
        )
        t = stamps.times  # [prompt, token 1, ..., token n]
        return Run(out[:, ids.shape[1] :].tolist(), t[1] - t0, t[-1] - t[1])


# ----------------------------------------------------------------------------------------------
# The benchmark


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


def _measure(
    engine: Engine,
    opts: Options,
    prompts: dict[str, torch.Tensor],
    device: torch.device,
    metrics: tuple[str, ...] = METRICS,
) -> Measured:
    """Run the ``metrics`` ``repeats`` times each (after one short warm-up); keep the medians.
    "prefill" also times the first token; peak memory is the largest of the timed runs."""
    m = Measured(engine.name, load_s=engine.load_s, weights_mb=weight_bytes(engine.model) / 2**20)
    if isinstance(engine, Ours) and engine.compiled:  # compile each shape before timing it
        for key, batch in (("decode_b1", "b1"), ("decode_bn", "bn")):
            if key in metrics:
                engine.greedy(prompts[batch], opts.new_tokens)
    else:
        engine.greedy(prompts["b1"][:, :8], 4)  # warm-up: allocator, lazy initialisation
    peak = 0
    runs: dict[str, list[float]] = {}
    tokens = {}
    for _ in range(opts.repeats):
        if "prefill" in metrics:
            runs.setdefault("prefill", []).append(opts.prompt_len / engine.prefill_s(prompts["long"]))
            with PeakMemory(device) as mem:
                run = engine.greedy(prompts["long"], 1)
            runs.setdefault("ttft", []).append(run.ttft)
            peak = max(peak, mem.peak)
        for key, batch in (("decode_b1", "b1"), ("decode_bn", "bn")):
            if key in metrics:
                with PeakMemory(device) as mem:
                    run = engine.greedy(prompts[batch], opts.new_tokens)
                runs.setdefault(key, []).append(run.decode_tokens_per_s)
                tokens[batch] = run.tokens
                peak = max(peak, mem.peak)
    med = {k: _median(v) for k, v in runs.items()}
    m.prefill_tok_s, m.ttft_s = med.get("prefill"), med.get("ttft")
    m.decode_b1_tok_s, m.decode_bn_tok_s = med.get("decode_b1"), med.get("decode_bn")
    m.peak_mem_mb = m.weights_mb + peak / 2**20
    m.detail = {"tokens": tokens, "runs": runs}
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


def _measure_theirs(theirs: Theirs, opts: Options, prompts: dict[str, torch.Tensor], device: torch.device) -> Measured:
    """Each metric measured in full with the configuration that won it in the probe."""
    choice = _pick_theirs(theirs, opts, prompts)
    by_config: dict[str, tuple[str, ...]] = {}
    for metric in METRICS:
        by_config[choice[metric]] = (*by_config.get(choice[metric], ()), metric)
    best = Measured("transformers", load_s=theirs.load_s, weights_mb=weight_bytes(theirs.model) / 2**20)
    best.peak_mem_mb = 0.0
    configs = {}
    for key, metrics in by_config.items():
        theirs.set(*key.split("/"))
        r = _measure(theirs, opts, prompts, device, metrics)
        configs[key] = {**asdict(r), "detail": r.detail["runs"]}
        for field_name in ("prefill_tok_s", "ttft_s", "decode_b1_tok_s", "decode_bn_tok_s"):
            if getattr(r, field_name) is not None:
                setattr(best, field_name, getattr(r, field_name))
        best.peak_mem_mb = max(best.peak_mem_mb, r.peak_mem_mb)
    best.detail = {
        "choice": {k: v for k, v in choice.items() if k != "probe"},
        "probe": choice["probe"],
        "configs": configs,
    }
    return best


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
    _warm_page_cache(folder)
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
    for dname in opts.dtypes:
        result["dtypes"][dname] = _bench_dtype(dname, folder, opts, prompts, device, bandwidth, log)
        out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted run
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
    """Every measurement at one dtype: ours, transformers, ours compiled, ours int8."""
    dtype = DTYPES[dname]
    entry: dict = {}

    def done(key: str, m: Measured) -> None:
        entry[key] = m
        log(f"[{dname}] {m.name}: {_fmt_measured(m, opts)}")

    log(f"[{dname}] loading mixtral_lite")
    ours = Ours.load(folder, dtype, device)
    entry["bytes_per_token"] = active_weight_bytes(ours.model)
    entry["roofline_tok_s"] = bandwidth / entry["bytes_per_token"]
    theirs = None
    if opts.compare:
        log(f"[{dname}] loading transformers")
        theirs = Theirs(folder, dtype, device, opts.hf_impls[0], opts.hf_caches[0])
        entry["same_tokens"] = _check_same_tokens(ours, theirs, prompts, opts.new_tokens)
        log(f"[{dname}] greedy tokens vs transformers: {_fmt_check(entry['same_tokens'])}")
    done("ours", _measure(ours, opts, prompts, device))
    if theirs is not None:
        log(f"[{dname}] transformers: trying {', '.join(opts.hf_impls)} x {', '.join(opts.hf_caches)} caches")
        done("theirs", _measure_theirs(theirs, opts, prompts, device))
        del theirs
        _release_memory()
    if opts.compile:
        log(f"[{dname}] compiling the decode step")
        compiled = Ours(ours.model, compile=True)
        done("ours_compiled", _measure(compiled, opts, prompts, device, ("decode_b1", "decode_bn")))
        del compiled
    if opts.quantize and dtype == torch.bfloat16:
        q = Ours.load(folder, dtype, device, quantize="int8")
        done("int8", _measure(q, opts, prompts, device))
        entry["int8_bytes_per_token"] = active_weight_bytes(q.model)
        entry["int8_roofline_tok_s"] = bandwidth / entry["int8_bytes_per_token"]
        entry["int8_quality"] = _quality(q, ours, prompts, opts.new_tokens)
        del q
    del ours
    _release_memory()
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


def _fmt_check(check: dict) -> str:
    parts = []
    for key, c in check.items():
        state = "identical" if c["identical"] else f"{c['agree']:.1%} agree, first mismatch at {c['first_mismatch']}"
        parts.append(f"{key} {state}")
    return "; ".join(parts)


def _jsonable(entry: dict) -> dict:
    return {k: asdict(v) if isinstance(v, Measured) else v for k, v in entry.items()}


def _warm_page_cache(folder: Path) -> None:
    """Read the checkpoint once so both loaders start from the page cache."""
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------
# The table

_ROWS = [
    # (label, key, higher is better, format)
    ("prefill {prompt_len} (tok/s)", "prefill_tok_s", True, "{:.1f}"),
    ("decode b1 (tok/s)", "decode_b1_tok_s", True, "{:.1f}"),
    ("decode b{batch} (tok/s)", "decode_bn_tok_s", True, "{:.1f}"),
    ("time to first token (s)", "ttft_s", False, "{:.3f}"),
    ("peak memory (MB)", "peak_mem_mb", False, "{:.0f}"),
    ("load time (s)", "load_s", False, "{:.2f}"),
]


def format_table(result: dict) -> str:
    """The comparison table: ours, theirs and the speedup (ours/theirs for rates, theirs/ours for
    times and memory, so above 1 always means ours is better)."""
    opts, mach = result["options"], result["machine"]
    lines = [
        f"mixtral_lite vs transformers {mach.get('transformers', '?')} on the same weights: preset {opts['preset']}, "
        f"{mach['device']} ({mach['cpu']}, {mach['cpu_capability']}), {mach['threads']} threads, torch {mach['torch']}",
        f"median of {opts['repeats']}; decode: {opts['new_tokens']} greedy tokens after a "
        f"{opts['decode_prompt_len']}-token prompt; 'better' > 1 means mixtral_lite is better",
        "",
    ]
    header = ("dtype", "metric", "mixtral_lite", "transformers", "better")
    rows = [header]
    for dname, entry in result["dtypes"].items():
        ours, theirs = entry["ours"], entry.get("theirs")
        for n, (label, key, higher, fmt) in enumerate(_ROWS):
            a = ours[key]
            b = theirs[key] if theirs else None
            ratio = "" if b is None or not a or not b else f"{(a / b if higher else b / a):.2f}x"
            rows.append(
                (
                    dname if n == 0 else "",
                    label.format(**opts),
                    fmt.format(a),
                    "" if b is None else fmt.format(b),
                    ratio,
                )
            )
        if "ours_compiled" in entry:
            c = entry["ours_compiled"]
            rows.append(("", "decode b1, --compile (tok/s)", f"{c['decode_b1_tok_s']:.1f}", "", ""))
            rows.append(("", f"decode b{opts['batch']}, --compile (tok/s)", f"{c['decode_bn_tok_s']:.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    lines.append("")
    lines.extend(_roofline_lines(result))
    for dname, entry in result["dtypes"].items():
        if "int8" in entry:
            lines.extend(_int8_lines(dname, entry, opts))
        if "same_tokens" in entry:
            lines.append(f"greedy tokens vs transformers ({dname}): {_fmt_check(entry['same_tokens'])}")
        if entry.get("theirs"):
            ch = entry["theirs"]["detail"]["choice"]
            lines.append(
                f"transformers configuration used ({dname}): prefill {ch['prefill']}, decode b1 {ch['decode_b1']}, "
                f"decode b{opts['batch']} {ch['decode_bn']} (experts implementation / cache)"
            )
    return "\n".join(lines)


def _roofline_lines(result: dict) -> list[str]:
    bw = result["bandwidth_GBps"]
    lines = [f"decode roofline at batch 1: {bw:.1f} GB/s measured read bandwidth / bytes of active weights per token"]
    for dname, entry in result["dtypes"].items():
        roof = entry["roofline_tok_s"]
        ours = entry["ours"]["decode_b1_tok_s"]
        lines.append(
            f"  {dname}: {entry['bytes_per_token'] / 1e6:.1f} MB/token -> {roof:.1f} tok/s; "
            f"mixtral_lite {ours:.1f} tok/s = {ours / roof:.0%} of it"
        )
        if "int8" in entry:
            r8, o8 = entry["int8_roofline_tok_s"], entry["int8"]["decode_b1_tok_s"]
            lines.append(
                f"  int8: {entry['int8_bytes_per_token'] / 1e6:.1f} MB/token -> {r8:.1f} tok/s; "
                f"mixtral_lite {o8:.1f} tok/s = {o8 / r8:.0%} of it"
            )
    return lines


def _int8_lines(dname: str, entry: dict, opts: dict) -> list[str]:
    q, ours, qual = entry["int8"], entry["ours"], entry["int8_quality"]
    return [
        f"int8 weights ({dname} activations): decode b1 {q['decode_b1_tok_s']:.1f} tok/s = "
        f"{q['decode_b1_tok_s'] / ours['decode_b1_tok_s']:.2f}x our {dname}; decode b{opts['batch']} "
        f"{q['decode_bn_tok_s']:.1f} tok/s; prefill {q['prefill_tok_s']:.1f} tok/s",
        f"  weights {ours['weights_mb']:.0f} MB -> {q['weights_mb']:.0f} MB "
        f"(saved {ours['weights_mb'] - q['weights_mb']:.0f} MB, {1 - q['weights_mb'] / ours['weights_mb']:.0%})",
        f"  quality vs {dname}: greedy agreement over {opts['new_tokens']} tokens {qual['greedy_agree_free']:.1%} "
        f"free-running (first mismatch: {qual['greedy_first_mismatch']}), {qual['greedy_agree_forced']:.1%} "
        f"teacher-forced; logits max abs err {qual['logit_max_abs_err']:.3g} "
        f"(logit rms {qual['logit_scale_rms']:.3g}), relative err {qual['logit_rel_err']:.2%}",
    ]


# ----------------------------------------------------------------------------------------------
# Command line (shared by scripts/bench.py and ``mixtral-lite bench``)


def add_arguments(p) -> None:
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


def options_from_args(args) -> Options:
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


__all__ = [
    "Options",
    "active_weight_bytes",
    "add_arguments",
    "format_table",
    "make_checkpoint",
    "measure_bandwidth",
    "options_from_args",
    "run_benchmark",
]
