"""Text generation: prefill the prompt into a KV cache, then decode one token per step.

Prompts of different lengths share a batch through LEFT padding: every row's next token then sits
in the same cache slot, so a decode step writes one slot for the whole batch (``slots`` [1]) while
``positions`` [B, 1] carry each row's own rotary position.

The host reads each step's tokens (for EOS, stop strings and streaming) one step late: the next
decode step is queued before the host waits for the previous tokens, so on a GPU the bookkeeping
overlaps the model. ``decode_step`` is a plain function of tensors (no Python-side state), so it can
be wrapped by ``torch.compile(fullgraph=True)`` and passed in as ``decode_fn``.

Axis legend: B batch (prompts), T prompt length (padded), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import MixtralConfig
from ..cpu import install_cpu_kernels
from ..cpu.layout import cpu_layout
from ..cuda import install_cuda_kernels
from ..errors import UserError, UserTypeError
from ..model.cache import KVCache
from ..validate import check_seed
from ..weights.device_map import layer_devices
from .cache_pool import CachePool
from .detok import RowText, continuation_text
from .engine import Engine, SeqRequest
from .prompt_cache import PromptCache
from .sampling import SamplingParams, make_generator, sample
from .tokenizer import PAD_ID, Tokenizer

Prompt = str | Sequence[int]


@dataclass
class GenerationStats:
    """Timing of one ``generate`` call (all its prompts together)."""

    prompt_tokens: int = 0  # real prompt tokens, all rows
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a PromptCache (not run)
    generated_tokens: int = 0  # tokens generated, all rows (EOS not counted)
    time_to_first_token: float = 0.0  # s, from the call to the first tokens on the host
    prefill_time: float = 0.0  # s, the prompt forward pass and the first sampled tokens
    decode_time: float = 0.0  # s, every later token
    rows_with_tokens: int = 0  # rows that generated at least one token (their first is prefill's)
    # Offloaded experts (``model.offload``): the counters of prefill and of decoding (``OffloadStats``)
    offload_prefill: Any = None
    offload_decode: Any = None

    @property
    def prefill_tokens_per_s(self) -> float:
        run = self.prompt_tokens - self.cached_tokens
        return run / self.prefill_time if self.prefill_time > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first of each row, per second of decoding."""
        later = max(self.generated_tokens - self.rows_with_tokens, 0)
        return later / self.decode_time if self.decode_time > 0 else 0.0

    @property
    def decoded_tokens(self) -> int:
        """Tokens fed through decode steps (each row's first token comes from prefill)."""
        return max(self.generated_tokens - self.rows_with_tokens, 0)

    def as_dict(self) -> dict:
        out = {
            **{k: v for k, v in asdict(self).items() if not k.startswith("offload")},
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }
        if self.offload_prefill is not None:
            out["experts"] = {
                "prefill": self.offload_prefill.as_dict(self.prompt_tokens),
                "decode": self.offload_decode.as_dict(self.decoded_tokens),
            }
        return out

    def summary(self) -> str:
        line = (
            f"time to first token {self.time_to_first_token:.3f} s | "
            f"prefill {self.prefill_tokens_per_s:.1f} tok/s ({self.prompt_tokens} tokens"
            + (f", {self.cached_tokens} cached" if self.cached_tokens else "")
            + ") | "
            f"decode {self.decode_tokens_per_s:.1f} tok/s ({self.generated_tokens} tokens)"
        )
        if self.offload_decode is not None:
            line += f" | decode experts: {self.offload_decode.summary(self.decoded_tokens)}"
        return line


@dataclass
class GenerationOptions:
    """What ``generate`` and ``stream`` take besides the model, tokenizer and prompts.

    Greedy when ``temperature`` is 0; sampling is reproducible with ``seed``: every prompt of a batch
    draws from its own generator seeded with it, so a prompt gives the same text alone and in any
    batch (identical prompts, identical samples). ``continuation``: the
    text continues the prompt's text, keeping the first token's leading space (" Paris" after "The
    capital of France is"); False gives ``decode(token_ids)``, as for a chat answer after ``[/INST]``.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    continuation: bool = True


@dataclass
class GenerationResult:
    """One prompt's continuation.

    ``text``: what the tokens add to the prompt, cut before a stop string; ``token_ids``: the
    generated tokens, without the final EOS; ``logprobs``: each token's log-probability under the
    model (before penalty and temperature); ``finish_reason``: "stop" (EOS or a stop string, as
    OpenAI and vLLM say) or "length"; ``stop_reason``: the stop string that ended it (None for
    EOS and "length"); ``prompt_tokens``: the prompt's length in tokens; ``stats``: the timing of
    the whole call (shared by every prompt of a batch).
    """

    text: str  # the text the tokens add to the prompt (cut before a stop string)
    token_ids: list[int]  # generated tokens, without the final EOS
    logprobs: list[float]  # log-probability of each token under the model (before penalty/temperature)
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)
    stop_reason: str | None = None  # the stop string that ended the text; None for EOS or length

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "prompt_tokens": self.prompt_tokens,
        }


@torch.no_grad()
def prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Write the prompt [B, T] into cache slots 0..T-1; return the last position's logits [B, V]."""
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    return model(input_ids, cache=cache, slots=slots, attention_mask=attention_mask, last_only=True)[:, -1]


@torch.no_grad()
def decode_step(
    model: torch.nn.Module, tokens: torch.Tensor, cache: KVCache, slot: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Feed tokens [B, 1] at cache ``slot`` [1] and rotary ``positions`` [B, 1]; return logits [B, V]."""
    return model(tokens, cache=cache, slots=slot, positions=positions)[:, -1]


def compile_decode_step(device: torch.device | str = "cpu", mode: str | None = None) -> Callable:
    """``decode_step`` compiled as one graph (``fullgraph=True``: a graph break is an error), for
    ``decode_fn``. On CUDA the default mode is "reduce-overhead" (CUDA graphs): the cache tensors
    are marked as static addresses, so the graph writes them in place. A new cache length (prompt
    plus new tokens) compiles once more. On the CPU the first call with a model stores its weight
    matrices row-major (``cpu.layout.cpu_layout(model, compiled=True)``: same values, other
    strides), the layout the generated matrix-vector kernels read fastest; the compiled graph runs
    PyTorch's ops, not the C kernel. The returned step carries a ``CachePool``: ``generate``
    reuses its caches, with lengths rounded up to a bucket, so shapes (and CUDA graphs) repeat."""
    device = torch.device(device)
    if mode is None and device.type == "cuda":
        mode = "reduce-overhead"
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    # On the CPU the few-token experts read their ids with .item(): traced as unbacked integers.
    scalars = torch._dynamo.config.patch(capture_scalar_outputs=True)
    if device.type != "cuda":
        laid_out: weakref.WeakSet = weakref.WeakSet()

        @scalars
        def cpu_step(model, tokens, cache, slot, positions):
            if model not in laid_out:  # row-major weights: what the generated kernels read fastest
                cpu_layout(model, kernel=False, compiled=True)
                laid_out.add(model)
            return compiled(model, tokens, cache, slot, positions)

        cpu_step.cache_pool = CachePool()
        return cpu_step

    @scalars
    def step(model, tokens, cache, slot, positions):
        for t in (*cache.k, *cache.v, cache.valid, cache.pos):
            torch._dynamo.mark_static_address(t)
        return compiled(model, tokens, cache, slot, positions).clone()  # outlives the next replay

    step.cache_pool = CachePool()
    return step


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Prompt | Sequence[Prompt],
    options: GenerationOptions | None = None,
    *,
    decode_fn: Callable = decode_step,
    cache: PromptCache | None = None,
    **fields: Any,
) -> GenerationResult | list[GenerationResult]:
    """Continue one prompt (text, or token ids used as given) or a list of them.

    Text prompts are encoded with BOS. The options are a ``GenerationOptions`` or its fields as
    keywords (``max_new_tokens=20, temperature=0.8``; keywords override ``options``). Returns one
    ``GenerationResult`` per prompt (a list for a list of prompts); each carries the call's ``stats``.
    On the CPU a list is scheduled through the continuous-batching engine (``engine.Engine``), at
    most ``SCHEDULED_ROWS`` rows at a time; elsewhere it runs as one left-padded batch.
    ``cache``: a ``PromptCache`` kept across calls with one prompt each; a prompt that starts with
    the tokens of the previous call (prompt and answer) prefills only the rest.
    """
    single = _is_single(prompts)
    opts = _merge(options, fields)
    if cache is not None and not single:
        raise UserError("cache: a PromptCache serves one prompt per call, got a list of prompts")
    request = prepare(model.config, tokenizer, [prompts] if single else list(prompts), **asdict(opts))
    if not single and len(request.prompts) > 1 and decode_fn is decode_step and _schedules(model):
        return _scheduled(model, request)
    events = _run(model, request, stream=False, decode_fn=decode_fn, prompt_cache=cache)
    while True:
        try:
            next(events)
        except StopIteration as done:
            results = done.value
            break
    return results[0] if single else results


SCHEDULED_ROWS = 64  # rows a list of prompts is scheduled through at once on the CPU


def _schedules(model: torch.nn.Module) -> bool:
    """Whether a list of prompts runs through the continuous-batching engine: a model on the CPU
    (every layer), experts in memory. A GPU keeps one padded batch, whose decode step its CUDA graph
    replays."""
    if getattr(model, "offload", None) is not None:
        return False
    return all(d.type == "cpu" for d in layer_devices(model)) and model.device.type == "cpu"


def _scheduled(model: torch.nn.Module, request: Request) -> list[GenerationResult]:
    """Many prompts through the engine (``engine.Engine``): prompts join as rows free up and leave
    when done, instead of one padded batch as long as the longest, so a list of a thousand prompts
    holds at most ``SCHEDULED_ROWS`` rows of cache. Each row samples from its own generator seeded
    with the call's seed, as in the padded batch, and equals its prompt alone."""
    if not hasattr(model, "cpu_kernels"):
        install_cpu_kernels(model)
    start = time.perf_counter()
    longest = max(len(p) + n for p, n in zip(request.prompts, request.budgets, strict=True))  # <= the context
    rows = min(len(request.prompts), SCHEDULED_ROWS)
    engine = Engine(model, request.tokenizer, max_batch=rows, max_queue=len(request.prompts), max_seq_len=longest)
    reqs = [
        SeqRequest(p, n, request.params, seed=request.seed, stop=request.stops, continuation=request.continuation)
        for p, n in zip(request.prompts, request.budgets, strict=True)
    ]
    results = engine.generate(reqs)
    elapsed = time.perf_counter() - start
    first = engine.metrics.ttft.total / max(engine.metrics.ttft.count, 1)
    stats = GenerationStats(
        prompt_tokens=engine.metrics.prompt_tokens,
        generated_tokens=sum(len(r.token_ids) for r in results),
        time_to_first_token=first,
        prefill_time=first,
        decode_time=max(elapsed - first, 0.0),
        rows_with_tokens=sum(1 for r in results if r.token_ids),
    )
    return [
        GenerationResult(
            text=r.text,
            token_ids=r.token_ids,
            logprobs=r.logprobs,
            finish_reason="length" if r.finish_reason == "length" else "stop",
            prompt_tokens=r.prompt_tokens,
            stats=stats,
            stop_reason=r.stop_reason,
        )
        for r in results
    ]


class TextStream:
    """Iterate to get text pieces as they are generated; ``result`` holds the full result after."""

    def __init__(self, events: Iterator[tuple[int, str]]) -> None:
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                _, piece = next(self._events)
            except StopIteration as done:
                self.result = done.value[0]
                return
            yield piece

    def close(self) -> None:
        """Stop generating (e.g. on Ctrl-C); frees the cache."""
        self._events.close()


def stream(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    options: GenerationOptions | None = None,
    *,
    decode_fn: Callable = decode_step,
    cache: PromptCache | None = None,
    **fields: Any,
) -> TextStream:
    """Like ``generate`` for one prompt, but yields text pieces as they come. Their concatenation is
    exactly ``result.text``: a multi-byte character is held back until complete, and so is text that
    may turn out to be the start of a stop string. Arguments are checked here, before iterating."""
    if not _is_single(prompt):
        raise UserError("stream: expected one prompt (a string or a list of token ids)")
    request = prepare(model.config, tokenizer, [prompt], **asdict(_merge(options, fields)))
    return TextStream(_run(model, request, stream=True, decode_fn=decode_fn, prompt_cache=cache))


def _merge(options: GenerationOptions | None, fields: dict[str, Any]) -> GenerationOptions:
    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise UserTypeError(f"unexpected option {unknown[0]!r}; expected one of {', '.join(sorted(names))}")
    return dataclasses.replace(options or GenerationOptions(), **fields)


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    items = list(prompts) if isinstance(prompts, Sequence) else None
    if items is None:
        raise UserError(f"prompts: expected a string, a list of token ids or a list of those, got {type(prompts)}")
    return bool(items) and all(isinstance(x, int) for x in items)


@dataclass
class Request:
    tokenizer: Tokenizer
    prompts: list[list[int]]
    budgets: list[int]  # tokens each row may generate: max_new_tokens, less near the context limit
    params: SamplingParams
    seed: int | None
    stops: list[str]
    continuation: bool  # text continues the prompt (keeps a leading space), else decode(token_ids)


def check_prompt_lengths(lengths: Sequence[int], context: int) -> None:
    """Every prompt must leave room for at least one new token in the model's context."""
    for n, length in enumerate(lengths, 1):
        if length >= context:
            which = "prompt" if len(lengths) == 1 else f"prompt {n}"
            raise UserError(
                f"{which}: {length} tokens, longer than the model's context allows "
                f"(max_position_embeddings = {context}; at most {context - 1} prompt tokens)"
            )


def prepare(
    config: MixtralConfig,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float,
    seed: int | None,
    stop: str | Sequence[str] | None,
    continuation: bool = True,
) -> Request:
    """Check every argument (raising ``UserError`` naming it) and encode the prompts; needs only the
    model's config, so a command line can check its input before loading any weights."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    check_seed(seed)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}", param="max_new_tokens")
    if stop is not None and not isinstance(stop, str | Sequence):
        raise UserTypeError(f"stop: expected a string or a list of strings, got {type(stop).__name__}", param="stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise UserError(f"stop: expected non-empty strings, got {stops!r}", param="stop")
    if not prompts:
        raise UserError("prompts: expected at least one prompt, got an empty list")
    vocab = config.vocab_size
    encoded = []
    for n, p in enumerate(prompts, 1):
        which = "prompt" if len(prompts) == 1 else f"prompt {n}"
        if isinstance(p, str):
            if not p:
                raise UserError(f"{which}: empty; give some text to continue")
            ids = tokenizer.encode(p, bos=True)
        else:
            ids = list(p)
            if not ids:
                raise UserError(f"{which}: empty list of token ids")
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
            if bad:
                raise UserError(f"{which}: token ids must be integers in [0, {vocab}), got {bad[:5]}")
        encoded.append(ids)
    context = config.max_position_embeddings
    check_prompt_lengths([len(ids) for ids in encoded], context)
    budgets = [min(max_new_tokens, context - len(ids)) for ids in encoded]
    return Request(tokenizer, encoded, budgets, params, seed, stops, continuation)


def _to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Start copying small tensors to the host without waiting for the device (CUDA); the event
    says when they have arrived."""
    if tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors], None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    stream = torch.cuda.current_stream(tensors[0].device)  # the copies' stream: not cuda:0's with device_map
    with torch.cuda.stream(stream):
        for h, t in zip(host, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return host, event


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run(
    model: torch.nn.Module,
    request: Request,
    *,
    stream: bool,
    decode_fn: Callable,
    prompt_cache: PromptCache | None = None,
) -> Iterator[tuple[int, str]]:
    """The prefill/decode loop. Yields (row, text piece) when streaming; returns the results."""
    start = time.perf_counter()
    tokenizer, params = request.tokenizer, request.params
    lengths = [len(p) for p in request.prompts]
    b, t = len(lengths), max(lengths)
    steps = max(request.budgets)
    device = model.device
    input_ids = torch.tensor([[PAD_ID] * (t - len(p)) + p for p in request.prompts], device=device)  # [B, T]
    mask = None
    if min(lengths) != t:
        mask = torch.tensor([[0] * (t - n) + [1] * n for n in lengths], device=device)  # [B, T]

    if device.type == "cpu" and not hasattr(model, "cpu_kernels"):  # CPU inference: decided once per model
        install_cpu_kernels(model)
    if device.type != "cpu" and not hasattr(model, "cuda_kernels"):  # GPU (or meta: traced) inference, the same
        install_cuda_kernels(model)
    length = t + steps - 1  # the last token is sampled, never fed back
    n_kv = model.layers[0].attention.n_kv_heads
    offload = getattr(model, "offload", None)
    counters = None if offload is None else offload.stats
    before = None if counters is None else counters.snapshot()
    kept = 0
    pool: CachePool | None = getattr(decode_fn, "cache_pool", None)  # a compiled step's: shapes repeat
    if prompt_cache is None:
        if pool is not None:
            cache = pool.get(model, b, length, layer_devices(model), n_kv)
        else:
            cache = KVCache(model.config, b, length, device=layer_devices(model), dtype=model.dtype, num_kv_heads=n_kv)
        logits = prefill(model, input_ids, cache, mask)  # [B, V]
    else:  # one prompt: its first `kept` tokens are already in the cache
        cache, kept = prompt_cache.take(model, request.prompts[0], length, layer_devices(model), n_kv)
        slots = torch.arange(kept, t, device=device)
        logits = model(input_ids[:, kept:], cache=cache, slots=slots, last_only=True)[:, -1]
    fed: list[torch.Tensor] = []  # the tokens fed after the prompt (their keys are in the cache)
    out_device = logits.device
    vocab = min(tokenizer.vocab_size, logits.shape[-1])  # never sample ids the tokenizer cannot decode
    generator: Any = None
    if not params.greedy:  # seeded: one generator per row, so a prompt's sample is the same in any batch
        generator = (
            make_generator(None, out_device)
            if request.seed is None
            else [make_generator(request.seed, out_device) for _ in range(b)]
        )
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=out_device)
        for row, p in enumerate(request.prompts):
            ids = torch.tensor([i for i in p if i < vocab], dtype=torch.long, device=out_device)
            seen[row, ids] = True

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = sample(logits[:, :vocab], params, generator, seen)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        return tokens, logprobs

    tokens, logprobs = pick(logits)
    first = _to_host(tokens, logprobs)

    contexts = request.prompts if request.continuation else [[] for _ in request.prompts]
    texts = [RowText(tokenizer, c, request.stops) if stream or request.stops else None for c in contexts]
    out_ids: list[list[int]] = [[] for _ in range(b)]
    out_logprobs: list[list[float]] = [[] for _ in range(b)]
    finish: list[str | None] = [None] * b
    stats = GenerationStats(prompt_tokens=sum(lengths), cached_tokens=kept)
    eos = tokenizer.eos_id

    def accept(host: list[torch.Tensor]) -> Iterator[tuple[int, str]]:
        """Host bookkeeping for one step's tokens: EOS, budget, stop strings, streamed text."""
        for row, (tok, lp) in enumerate(zip(host[0].tolist(), host[1].tolist(), strict=True)):
            if finish[row] is not None:
                continue
            if tok == eos:
                finish[row] = "stop"
            else:
                out_ids[row].append(tok)
                out_logprobs[row].append(lp)
                if texts[row] is not None:
                    piece, stopped = texts[row].push(tok)
                    if stopped:
                        finish[row] = "stop"
                    if piece:
                        yield row, piece
                if finish[row] is None and len(out_ids[row]) >= request.budgets[row]:
                    finish[row] = "length"
            if finish[row] is not None and texts[row] is not None:
                piece = texts[row].finish()
                if piece:
                    yield row, piece

    def wait(pending) -> list[torch.Tensor]:
        host, event = pending
        if event is not None:
            event.synchronize()
        return host

    host = wait(first)
    stats.time_to_first_token = stats.prefill_time = time.perf_counter() - start
    first_done = time.perf_counter()
    if counters is not None:
        stats.offload_prefill, before = counters.since(before), counters.snapshot()
    yield from accept(host)

    slot = torch.tensor([t], device=device)  # cache slot of the token fed next, same for all rows
    positions = torch.tensor(lengths, device=device)[:, None]  # [B, 1] each row's next position
    pending = None
    for _ in range(steps - 1):
        if all(f is not None for f in finish):
            break
        logits = decode_fn(model, tokens[:, None].to(device), cache, slot, positions)
        fed.append(tokens)
        slot += 1
        positions += 1
        tokens, logprobs = pick(logits)
        if pending is not None:  # the previous step's tokens, read while this step runs
            yield from accept(wait(pending))
        pending = _to_host(tokens, logprobs)
    if pending is not None:
        yield from accept(wait(pending))
    if prompt_cache is not None:
        prompt_cache.hold(request.prompts[0] + (torch.cat(fed).tolist() if fed else []))
    _sync(out_device)
    stats.decode_time = time.perf_counter() - first_done
    stats.generated_tokens = sum(len(ids) for ids in out_ids)
    stats.rows_with_tokens = sum(1 for ids in out_ids if ids)
    if counters is not None:
        stats.offload_decode = counters.since(before)

    results = []
    for row in range(b):
        if texts[row] is not None:
            text = texts[row].text
        else:
            text = continuation_text(tokenizer.decode, contexts[row], out_ids[row])
        results.append(
            GenerationResult(
                text=text,
                token_ids=out_ids[row],
                logprobs=out_logprobs[row],
                finish_reason=finish[row] or "length",
                prompt_tokens=lengths[row],
                stats=stats,
                stop_reason=texts[row].stop_hit if texts[row] is not None else None,
            )
        )
    return results


__all__ = [
    "GenerationOptions",
    "GenerationResult",
    "GenerationStats",
    "Request",
    "TextStream",
    "check_prompt_lengths",
    "compile_decode_step",
    "decode_step",
    "generate",
    "prefill",
    "prepare",
    "stream",
]
