"""Continuous (iteration-level) batching over one static ``KVCache``: the server's requests, and
``generate()``'s lists of prompts on the CPU.

One padded batch makes a request that arrives later wait for the whole batch, and holds every row
until the longest is done. The engine instead keeps a pool of ``max_batch`` cache rows and runs one
*step* at a time: finished requests leave (their row's ``valid`` flags are cleared), queued requests
join a free row (first come, first served), prompts are prefilled (those that joined together in
one call), then one decode step feeds every running row its next token.

How rows share the cache: the model's mask is causal in *slot* order over each row's own valid keys,
and rotary positions are explicit. So all rows write one shared slot ``cur`` per decode step, each at
its own position; a joining prompt is written into its own row at the slots just before ``cur``
(chunk by chunk, through a one-row view of the cache), and the decode slots that pass while it is
still prefilling stay invalid for that row: gaps are masked out and cost nothing but their slot.
When ``cur`` reaches the end of the cache, every row's valid keys are packed to end just before a new
``cur`` (``_repack``): keys keep their rotary positions, so attention sees exactly the same keys.

Each request has its own ``SamplingParams``, stop strings, repetition-penalty state and
``torch.Generator``, and is sampled on its own row of logits with the same calls ``generate()`` makes
for a lone prompt, so its tokens depend only on its prompt, parameters and seed (tested: greedy and
seeded requests equal ``generate()`` of that prompt alone, up to float rounding of the batch shape).

Axis legend: B pool rows, S cache slots, T new tokens, V vocabulary.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..model.cache import KVCache
from ..weights.device_map import layer_devices
from .detok import RowText, continuation_text
from .sampling import SamplingParams, make_generator, sample
from .tokenizer import PAD_ID, Tokenizer

# latency buckets (seconds) for the time-to-first-token and inter-token histograms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueFull(Exception):
    """The request queue is at ``max_queue``: the caller should retry later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine no longer accepts requests (it is shutting down)."""


@dataclass
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense (``le`` upper bounds, plus +Inf)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


@dataclass
class EngineMetrics:
    requests: dict[str, int] = field(default_factory=dict)  # finished requests by finish reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0  # decode steps
    repacks: int = 0  # cache compactions
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)


@dataclass
class Delta:
    """What one step adds to a request: its new token (none on the final event after a stop), the
    text that token releases (may be empty: held back while it could start a stop string), and on
    the last event the finish reason ("eos", "stop", "length" or "cancelled")."""

    token_id: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class SeqRequest:
    """One sequence to generate: token ids and per-request options (checked by ``Engine.submit``)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    continuation: bool = True  # text continues the prompt's text (False: a chat answer)
    logprobs: int = 0  # top alternatives to report per token (0: only the chosen token's)
    prompt_logprobs: bool = False  # also score every prompt token (echo)


@dataclass
class Seq:
    """A request's state inside the engine."""

    req: SeqRequest
    on_event: Callable[[Delta], None]
    id: int
    submitted: float
    row: int = -1
    done: int = 0  # prompt tokens prefilled
    region_end: int = 0  # the prompt occupies slots [region_end - len(prompt), region_end)
    next_token: int = -1  # the token fed at the next decode step
    out_ids: list[int] = field(default_factory=list)
    out_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    out_top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    prompt_top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    text: RowText | None = None
    last_token_time: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.done == len(self.req.prompt)

    @property
    def need(self) -> int:
        """Slots the row holds before ``cur``: every valid key, or the whole prompt while prefilling."""
        return len(self.req.prompt) + len(self.out_ids) - 1 if self.decoding else len(self.req.prompt)


@dataclass
class Result:
    """A finished request, for the offline API and tests."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]
    prompt_logprobs: list[float | None]
    prompt_top_logprobs: list[list[tuple[int, float]] | None]
    finish_reason: str
    prompt_tokens: int
    stop_reason: str | None = None  # the stop string that ended the text (finish_reason "stop")


def _joint_groups(waiting: list[Seq], budget: int) -> list[list[Seq]]:
    """Runs of at least two requests in adjacent rows that have not started their prompts, whose
    prompts end at the same slot and need no prompt log-probs, within ``budget`` padded tokens in
    all (rows times the longest prompt of each run)."""
    fresh = [s for s in waiting if s.done == 0 and not s.req.prompt_logprobs]
    if not fresh:
        return []
    end = fresh[0].region_end
    runs: list[list[Seq]] = []
    for s in sorted((s for s in fresh if s.region_end == end), key=lambda s: s.row):
        run = runs[-1] if runs else []
        if run and s.row == run[-1].row + 1 and _padded_tokens([*run, s]) <= budget:
            run.append(s)
        else:
            runs.append([s])
    out = []
    for run in runs:
        if len(run) >= 2 and _padded_tokens(run) <= budget:
            out.append(run)
            budget -= _padded_tokens(run)
    return out


def _padded_tokens(group: list[Seq]) -> int:
    """Tokens a left-padded call on these prompts runs: rows times the longest prompt."""
    return len(group) * max(len(s.req.prompt) for s in group)


def _rows_view(cache: KVCache, lo: int, hi: int) -> KVCache:
    """Rows ``lo:hi`` of ``cache`` as a ``KVCache`` sharing its storage (contiguous, so the native
    kernels accept it); writes through it land in the pool's cache."""
    view = KVCache.__new__(KVCache)
    view.k = [k[lo:hi] for k in cache.k]
    view.v = [v[lo:hi] for v in cache.v]
    view.valid, view.pos = cache.valid[lo:hi], cache.pos[lo:hi]
    view.batch_size, view.max_seq_len = hi - lo, cache.max_seq_len
    return view


class Engine:
    """A pool of ``max_batch`` rows over one cache of ``max_seq_len`` slots per row.

    ``submit`` queues a request (thread-safe); ``step`` runs one iteration; ``start`` runs steps in
    a background thread until ``stop``. ``on_event`` callbacks run on the stepping thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        context = model.config.max_position_embeddings
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise UserError(f"engine: expected max_batch >= 1, max_queue >= 0, prefill_chunk >= 1, got "
                            f"{max_batch}, {max_queue}, {prefill_chunk}")  # fmt: skip
        self.max_seq_len = min(context, max_seq_len or 2048)
        if self.max_seq_len < 2:
            raise UserError(f"--max-seq-len: expected at least 2 tokens, got {self.max_seq_len}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.cache = KVCache(
            model.config,
            max_batch,
            self.max_seq_len,
            device=layer_devices(model),
            dtype=model.dtype,
            num_kv_heads=model.layers[0].attention.n_kv_heads,
        )
        self.cur = 0  # the slot every running row writes at the next decode step
        self.rows: list[Seq | None] = [None] * max_batch
        self.queue: deque[Seq] = deque()
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self.error: BaseException | None = None  # what stopped the stepping thread, if anything
        self.mirror: Callable[[tuple], None] | None = None  # rank 0 of a tensor-parallel server: sends each op

    # ---- the public side (any thread) ----

    @property
    def running(self) -> int:
        return sum(1 for s in self.rows if s is not None)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def check(self, req: SeqRequest) -> None:
        """Raise ``UserError`` for a request the engine can never run (before queueing it)."""
        n = len(req.prompt)
        if n == 0:
            raise UserError("prompt: empty")
        bad = [i for i in req.prompt if not isinstance(i, int) or not 0 <= i < self.model.config.vocab_size]
        if bad:
            raise UserError(f"prompt: token ids must be integers in [0, {self.model.config.vocab_size}), got {bad[:5]}")
        if n >= self.max_seq_len:
            raise UserError(
                f"prompt: {n} tokens, longer than the context allows (at most {self.max_seq_len - 1} prompt tokens)"
            )
        if req.max_tokens < 1:
            raise UserError(f"max_tokens: expected an integer >= 1, got {req.max_tokens}")
        if n + req.max_tokens > self.max_seq_len:
            raise UserError(
                f"max_tokens: this model's context is {self.max_seq_len} tokens; the prompt has {n} and "
                f"max_tokens is {req.max_tokens} ({n + req.max_tokens} in all)"
            )

    def submit(self, req: SeqRequest, on_event: Callable[[Delta], None]) -> Seq:
        """Queue ``req``; raises ``UserError`` (bad request), ``QueueFull`` or ``EngineStopped``."""
        self.check(req)
        seq = Seq(req, on_event, next(self._ids), time.perf_counter())
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self.queue) >= self.max_queue + self.max_batch - self.running:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting, {self.max_batch} running)")
            self.queue.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: Seq) -> None:
        """Stop ``seq`` (e.g. its client went away); its row is freed at the next step."""
        with self._lock:
            seq.cancelled = True
            self._wake.notify()

    def start(self) -> None:
        """Step in a background thread until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="mixtral-lite-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new requests (``EngineStopped``); the ones in flight go on."""
        with self._lock:
            self._accepting = False

    def cancel_all(self) -> None:
        """Cancel every queued and running request (their callers get finish_reason "cancelled")."""
        with self._lock:
            for s in list(self.queue) + [s for s in self.rows if s is not None]:
                s.cancelled = True
            self._wake.notify()

    def stop(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests and end the stepping thread; ``drain`` finishes the requests in
        flight first, else they are cancelled."""
        self.stop_accepting()
        if not drain:
            self.cancel_all()
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def generate(self, requests: Sequence[SeqRequest]) -> list[Result]:
        """Run ``requests`` to the end in this thread (no background thread): the offline API."""
        results: dict[int, Seq] = {}
        pending = deque(requests)
        order = []
        while pending or self.running or self.queue:
            while pending and len(self.queue) < self.max_queue + self.max_batch - self.running:
                seq = self.submit(pending.popleft(), lambda d: None)
                results[seq.id] = seq
                order.append(seq.id)
            self.step()
        return [self.result(results[i]) for i in order]

    def result(self, seq: Seq) -> Result:
        tokenizer = self.tokenizer
        context = seq.req.prompt if seq.req.continuation else []
        text = seq.text.text if seq.text is not None else continuation_text(tokenizer.decode, context, seq.out_ids)
        return Result(
            text=text,
            token_ids=seq.out_ids,
            logprobs=seq.out_logprobs,
            top_logprobs=seq.out_top,
            prompt_logprobs=seq.prompt_logprobs,
            prompt_top_logprobs=seq.prompt_top,
            finish_reason=seq.finish_reason or "length",
            prompt_tokens=len(seq.req.prompt),
            stop_reason=seq.text.stop_hit if seq.text is not None and seq.finish_reason == "stop" else None,
        )

    # ---- the stepping side (one thread) ----

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self.queue and self.running == 0:
                        self._wake.wait()
                    if self._stopping and not self.queue and self.running == 0:
                        return
                self.step()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting caller, then kept
            self.error = exc
            with self._lock:
                self._accepting = False
                waiting = list(self.queue) + [s for s in self.rows if s is not None]
                self.queue.clear()
                self.rows = [None] * self.max_batch
            for s in waiting:
                s.on_event(Delta(finish_reason="error"))
            raise

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: drop cancelled requests, admit queued ones, prefill one chunk, decode once."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self.queue if s.cancelled]
            for s in gone:
                self.queue.remove(s)
        for s in gone:
            self._finish(s, "cancelled")
        for s in self.rows:
            if s is not None and s.cancelled:
                self._finish(s, "cancelled")

    def _admit(self) -> None:
        while True:
            free = [r for r, s in enumerate(self.rows) if s is None]
            with self._lock:
                if not free or not self.queue:
                    return
                seq = self.queue.popleft()
            seq.row = free[0]  # the lowest free row: keeps running rows packed at the top of the pool
            self.rows[seq.row] = seq
            n = len(seq.req.prompt)
            if self.cur < n:  # no room before the shared slot: move everyone's keys right
                self._repack(max(s.need for s in self.rows if s is not None))
            seq.region_end = self.cur
            self._setup(seq)

    def _setup(self, seq: Seq) -> None:
        req, device = seq.req, self.model.output.weight.device
        if not req.params.greedy:
            seq.generator = make_generator(req.seed, device)
        if req.params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(1, self._vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in req.prompt if i < self._vocab], dtype=torch.long, device=device)
            seq.seen[0, ids] = True
        context = req.prompt if req.continuation else []
        seq.text = RowText(self.tokenizer, context, req.stop)
        if req.prompt_logprobs:
            seq.prompt_logprobs, seq.prompt_top = [None], [None]  # the first token has no context to score it

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens, oldest request first: prompts that joined together
        in one left-padded call where they can (``_prefill_together``), the rest each through its
        own row."""
        budget = self.prefill_chunk
        waiting = sorted((s for s in self.rows if s is not None and not s.decoding), key=lambda s: s.id)
        for group in _joint_groups(waiting, budget):
            budget -= _padded_tokens(group)
            self._prefill_together(group)
        for seq in waiting:
            if seq.decoding:  # prefilled together above
                continue
            if budget <= 0:
                return
            prompt, n = seq.req.prompt, len(seq.req.prompt)
            c = min(n - seq.done, budget)
            budget -= c
            start = seq.region_end - n + seq.done
            logits = self._run(
                (
                    "forward", seq.row, seq.row + 1, [prompt[seq.done : seq.done + c]],  # ids [1, T]
                    list(range(start, start + c)), [list(range(seq.done, seq.done + c))], None,
                    not seq.req.prompt_logprobs,
                )
            )  # fmt: skip
            if seq.req.prompt_logprobs:
                self._score_prompt(seq, logits[0], seq.done, c)
            seq.done += c
            self.metrics.prompt_tokens += c
            if seq.decoding:
                self._accept(seq, *self._sample(seq, logits[:, -1]))

    def _prefill_together(self, group: list[Seq]) -> None:
        """Whole prompts of adjacent rows that end at the same slot, in one call: left-padded to the
        longest, pads masked out (invalid keys, position 0). One call instead of one per prompt is
        what a burst of requests costs on a CPU, where each call's fixed cost outweighs its tokens."""
        t = max(len(s.req.prompt) for s in group)
        ids = [[PAD_ID] * (t - len(s.req.prompt)) + s.req.prompt for s in group]  # [rows, T]
        real = [[0] * (t - len(s.req.prompt)) + [1] * len(s.req.prompt) for s in group]
        end = group[0].region_end
        op = ("forward", group[0].row, group[-1].row + 1, ids, list(range(end - t, end)), None, real, True)
        logits = self._run(op)[:, -1]  # [rows, V]
        for i, s in enumerate(group):
            s.done = len(s.req.prompt)
            self.metrics.prompt_tokens += s.done
            self._accept(s, *self._sample(s, logits[i : i + 1]))

    def _score_prompt(self, seq: Seq, logits: torch.Tensor, start: int, c: int) -> None:
        """Log-probabilities of prompt tokens ``start+1 .. start+c`` (those the chunk's logits predict)."""
        prompt = seq.req.prompt
        nxt = prompt[start + 1 : start + c + 1]
        if not nxt:
            return
        lp = logits[: len(nxt)].float().log_softmax(-1)  # [T, V]
        chosen = lp.gather(-1, torch.tensor(nxt, device=lp.device)[:, None])[:, 0]
        seq.prompt_logprobs += chosen.tolist()
        if seq.req.logprobs:
            top = lp[:, : self._vocab].topk(seq.req.logprobs, dim=-1)
            for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                seq.prompt_top.append(list(zip(idx, vals, strict=True)))
        else:
            seq.prompt_top += [None] * len(nxt)

    def _decode(self) -> None:
        running = [s for s in self.rows if s is not None and s.decoding]
        if not running:
            return
        if self.cur >= self.max_seq_len:  # the shared slot ran off the end: compact every row
            self._repack(max(s.need for s in self.rows if s is not None))
        hi = max(s.row for s in running) + 1  # rows 0..hi-1 take part; free or prefilling ones write invalid keys
        tokens = [[PAD_ID]] * hi  # [B, 1]
        positions = [[0]] * hi
        live = [[0]] * hi
        for s in running:
            tokens[s.row], positions[s.row], live[s.row] = [s.next_token], [s.need], [1]
        mask = None if all(v == [1] for v in live) else live  # [B, 1]
        logits = self._run(("forward", 0, hi, tokens, [self.cur], positions, mask, False))[:, -1]  # [B, V]
        self.cur += 1
        self.metrics.steps += 1
        picks = self._sample_rows(running, logits)
        for s in running:
            self._accept(s, *picks[s.row])

    def _sample_rows(self, seqs: list[Seq], logits: torch.Tensor) -> dict[int, tuple]:
        """Each row sampled as ``generate()`` samples a lone prompt; plain greedy rows in one call."""
        plain = [s for s in seqs if s.req.params.greedy and s.seen is None]
        picks = {}
        if plain:
            rows = torch.tensor([s.row for s in plain], device=logits.device)
            sub = logits[rows, : self._vocab]
            tokens, lps = sample(sub, SamplingParams())
            tops = self._tops(plain, sub)
            for i, (s, t, lp) in enumerate(zip(plain, tokens.tolist(), lps.tolist(), strict=True)):
                picks[s.row] = (t, lp, tops[i])
        for s in seqs:
            if s.row not in picks:
                picks[s.row] = self._sample(s, logits[s.row : s.row + 1])
        return picks

    def _tops(self, seqs: list[Seq], logits: torch.Tensor) -> list[list[tuple[int, float]] | None]:
        k = max(s.req.logprobs for s in seqs)
        if k == 0:
            return [None] * len(seqs)
        top = logits.float().log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
        out = []
        for s, vals, idx in zip(seqs, top.values.tolist(), top.indices.tolist(), strict=True):
            n = s.req.logprobs
            out.append(list(zip(idx[:n], vals[:n], strict=True)) if n else None)
        return out

    def _sample(self, seq: Seq, logits: torch.Tensor) -> tuple[int, float, list | None]:
        logits = logits[:, : self._vocab]  # [1, V]
        tokens, lps = sample(logits, seq.req.params, seq.generator, seq.seen)
        if seq.seen is not None:
            seq.seen.scatter_(1, tokens[:, None], True)
        return tokens.item(), lps.item(), self._tops([seq], logits)[0]

    def _accept(self, seq: Seq, token: int, logprob: float, top: list | None) -> None:
        """Host bookkeeping of one new token, as in ``generate()``: EOS, stop strings, budget."""
        now = time.perf_counter()
        if seq.out_ids or seq.finish_reason:
            self.metrics.itl.observe(now - seq.last_token_time)
        else:
            self.metrics.ttft.observe(now - seq.submitted)
        seq.last_token_time = now
        if token == self.tokenizer.eos_id:
            self._finish(seq, "eos")
            return
        seq.out_ids.append(token)
        seq.out_logprobs.append(logprob)
        seq.out_top.append(top)
        seq.next_token = token
        self.metrics.generation_tokens += 1
        piece, stopped = seq.text.push(token)
        reason = "stop" if stopped else "length" if len(seq.out_ids) >= seq.req.max_tokens else None
        if reason is None:
            seq.on_event(Delta(token, piece, logprob, top))
            return
        seq.on_event(Delta(token, piece + seq.text.finish(), logprob, top))
        self._finish(seq, reason, text_done=True)

    def _finish(self, seq: Seq, reason: str, *, text_done: bool = False) -> None:
        """The request leaves: its row is freed and its keys made invisible."""
        seq.finish_reason = reason
        if seq.row >= 0 and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self._run(("clear", seq.row))
        self.metrics.requests[reason] = self.metrics.requests.get(reason, 0) + 1
        rest = "" if text_done or seq.text is None or reason == "cancelled" else seq.text.finish()
        seq.on_event(Delta(text=rest, finish_reason=reason))

    def _repack(self, target: int) -> None:
        """Move every row's valid keys so they end just before slot ``target`` (a prefilling row keeps
        room for its whole prompt), and make ``target`` the shared slot. Order and rotary positions
        are kept, so every row attends to the same keys as before."""
        self.metrics.repacks += 1
        plan = []  # (row, the slot its first key moves to)
        for s in self.rows:
            if s is None:
                continue
            n = int(self.cache.valid[s.row].sum())
            plan.append((s.row, target - (len(s.req.prompt) if not s.decoding else n)))
            if not s.decoding:
                s.region_end = target
        self._run(("repack", plan))
        self.cur = target

    # ---- the operations on the model and the cache (every rank's, under torchrun) ----

    def _run(self, op: tuple):
        """Apply one operation on the model or the cache. In a tensor-parallel server rank 0 first
        hands it to ``mirror``, which sends it to the other ranks: they apply the same operations in
        the same order on their shards (``follow``), so every collective inside the model has all
        its ranks. The operations hold plain lists, the same on every rank."""
        if self.mirror is not None:
            self.mirror(op)
        return self.apply(op)

    def apply(self, op: tuple):
        """("forward", lo, hi, ids, slots, positions, mask, last_only): the model on rows lo..hi-1 of
        the cache (positions None: from the mask), its logits; ("clear", row): the row's keys made
        invisible; ("repack", [(row, first), ...]): each row's valid keys moved, in order, to slots
        first.. (their rotary positions kept)."""
        cache, kind = self.cache, op[0]
        if kind == "forward":
            _, lo, hi, ids, slots, positions, mask, last_only = op
            device = self.model.device
            as_tensor = lambda v: None if v is None else torch.tensor(v, device=device)  # noqa: E731
            return self.model(
                as_tensor(ids), cache=_rows_view(cache, lo, hi), slots=as_tensor(slots),
                positions=as_tensor(positions), attention_mask=as_tensor(mask), last_only=last_only,
            )  # fmt: skip
        if kind == "clear":
            cache.valid[op[1]] = False
            return None
        if kind == "repack":
            for r, first in op[1]:
                src = cache.valid[r].nonzero()[:, 0]  # [n] slots in order
                dst = torch.arange(first, first + src.numel(), device=src.device)
                for k in (*cache.k, *cache.v):
                    k[r][:, dst.to(k.device)] = k[r][:, src.to(k.device)]  # the read copies: overlap is safe
                pos = cache.pos[r, src]
                cache.valid[r] = False
                cache.valid[r, dst] = True
                cache.pos[r, dst] = pos
            return None
        raise ValueError(f"engine: unknown operation {kind!r}")


def follow(engine: Engine, receive: Callable[[], tuple | None]) -> None:
    """A tensor-parallel server's other ranks: apply rank 0's operations (``Engine.mirror``) on this
    rank's engine, whose cache holds this rank's heads, until ``receive`` gives None."""
    with torch.no_grad():
        while (op := receive()) is not None:
            engine.apply(op)


__all__ = [
    "Delta", "Engine", "EngineMetrics", "EngineStopped", "Histogram", "QueueFull", "Result", "SeqRequest", "follow",
]  # fmt: skip
