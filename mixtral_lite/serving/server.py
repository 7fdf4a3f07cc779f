"""An OpenAI-compatible HTTP server over the continuous-batching ``Engine`` (FastAPI, SSE streams).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``GET /metrics`` (Prometheus text). Everything a client can get wrong is answered
with OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` and a 4xx status,
never a traceback: the body is read with a size limit and checked field by field here, because the
messages should name the field and what was expected.

The engine steps in its own thread; each request's events cross into the event loop onto an
``asyncio.Queue``, a step's events in one ``call_soon_threadsafe`` (``_Delivery``). A request
whose client goes away is cancelled, which frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..generation.detok import CONTEXT_TOKENS
from ..generation.engine import Delta, Engine, EngineStopped, Histogram, QueueFull, Seq, SeqRequest
from ..generation.sampling import SamplingParams
from ..generation.tokenizer import Tokenizer

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for chat; completions allow 5)
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    """An error answered as OpenAI's error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(self), status_code=self.status, headers=self.headers)


def _error_body(exc: ApiError) -> dict:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


@dataclass
class ServerOptions:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    retry_after_s: int = 1  # what a 429 asks the client to wait


# ---- reading and checking request bodies ----


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object body, read with a size limit (413 over it, 400 when it is not a JSON object)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _kind(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)
    )


def get_int(body: dict, name: str, default: int | None = None, *, low: int | None = None, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name}: expected an integer, got {_kind(value)} {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"{name}: expected an integer {bounds}, got {value}", param=name)
    return value


def get_float(body: dict, name: str, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name}: expected a number, got {_kind(value)} {value!r}", param=name)
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: expected true or false, got {_kind(value)} {value!r}", param=name)
    return value


def get_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, f"stop: expected a string or a list of up to 4 strings, got {stop!r}", param="stop")
    return [s for s in stops if s]


def sampling_params(body: dict) -> SamplingParams:
    """Penalties other than ``repetition_penalty`` are not implemented: 0 is accepted, others refused."""
    for name in ("presence_penalty", "frequency_penalty"):
        if get_float(body, name, 0.0) != 0.0:
            raise ApiError(400, f"{name}: not supported (use repetition_penalty); only 0 is accepted", param=name)
    top_k = get_int(body, "top_k")
    try:
        return SamplingParams(
            temperature=get_float(body, "temperature", 1.0),
            top_k=None if top_k is None or top_k in (0, -1) else top_k,  # vLLM: 0 or -1 = off
            top_p=get_float(body, "top_p"),
            min_p=get_float(body, "min_p"),
            repetition_penalty=get_float(body, "repetition_penalty", 1.0),
        )
    except UserError as exc:
        raise _user_error(exc) from None


def _user_error(exc: UserError) -> ApiError:
    """A library ``UserError`` as a 400, with the field it names (``--top-p: ...`` -> top_p)."""
    message = str(exc)
    match = re.match(r"-*([a-z_\-]+):", message)
    param = match.group(1).replace("-", "_") if match else None
    code = "context_length_exceeded" if "context" in message else None
    return ApiError(400, message.removeprefix("--"), param=param, code=code)


# ---- the app ----


class _Delivery:
    """Engine events crossing from the stepping thread into the event loop, coalesced: a decode step
    of many rows posts one event per row, and waking the loop once per event (a write to its
    self-pipe and a callback each) costs the loop more than the step's own work. One per app."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set by the first request
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple[int, Delta]]] = []

    def post(self, queue: asyncio.Queue, item: tuple[int, Delta]) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:  # a drain is already scheduled and takes this one too
                return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class _Events:
    """Engine events of one HTTP request's sequences, delivered into the event loop."""

    def __init__(self, delivery: _Delivery) -> None:
        delivery.loop = asyncio.get_running_loop()
        self.delivery = delivery
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

    def callback(self, index: int):
        def on_event(delta: Delta) -> None:
            self.delivery.post(self.queue, (index, delta))

        return on_event


@dataclass
class _Choice:
    seq: Seq
    prompt: list[int]
    text: str = ""
    ids: list[int] = field(default_factory=list)  # generated tokens as their events arrived
    finish_reason: str | None = None


def create_app(engine: Engine, tokenizer: Tokenizer, options: ServerOptions) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine's thread and stops it (cancelling what is left)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain=False, timeout=10)

    app = FastAPI(title="mixtral-lite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    delivery = _Delivery()
    http_counts: dict[tuple[str, int], int] = {}

    app.add_middleware(_AuthAndCount, api_key=options.api_key, counts=http_counts)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error ({type(exc).__name__})"
        return ApiError(500, message, type="internal_error", code="internal_error").response()

    @app.get("/health")
    async def health() -> Response:
        if engine.error is not None:
            return JSONResponse({"status": "error", "reason": repr(engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", "running": engine.running, "queued": engine.queued})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": options.model_name,
            "object": "model",
            "created": created,
            "owned_by": "mixtral-lite",
            "max_model_len": engine.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine, http_counts), media_type="text/plain; version=0.0.4")

    def check_model(body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, f"model: expected a string, got {_kind(name)}", param="model")
        if name != options.model_name:
            raise ApiError(404, f"model {name!r} not found; this server has {options.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, options.max_body_bytes)
        check_model(body)
        prompts = _prompts(body.get("prompt"), tokenizer)
        params = sampling_params(body)
        n = get_int(body, "n", 1, low=1, high=MAX_N)
        logprobs = get_int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
        echo, stream = get_bool(body, "echo"), get_bool(body, "stream")
        include_usage = _include_usage(body)
        base = dict(
            max_tokens=get_int(body, "max_tokens", 16),
            params=params,
            stop=get_stop(body),
            continuation=True,
            logprobs=logprobs or 0,
            prompt_logprobs=echo and logprobs is not None,
        )
        seed = get_int(body, "seed")
        reqs = [SeqRequest(ids, seed=None if seed is None else seed + j, **base) for ids in prompts for j in range(n)]
        events = _Events(delivery)
        choices = _submit(engine, reqs, events)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": options.model_name}

        def choice_logprobs(c: _Choice, deltas: list[Delta], offset: int) -> dict | None:
            if logprobs is None:
                return None
            return _completion_logprobs(tokenizer, c, deltas, offset, echo)

        if not stream:
            results = await _collect(request, engine, choices, events)
            out = []
            for i, (c, deltas) in enumerate(results):
                prompt_text = tokenizer.decode(c.prompt) if echo else ""
                out.append({
                    "index": i,
                    "text": prompt_text + c.text,
                    "logprobs": choice_logprobs(c, deltas, 0),
                    "finish_reason": FINISH.get(c.finish_reason, "stop"),
                })  # fmt: skip
            return JSONResponse({**head, "choices": out, "usage": _usage(choices)})

        async def sse() -> AsyncIterator[str]:
            echoed: set[int] = set()
            try:
                async for i, delta in _stream_events(request, engine, choices, events):
                    c, lp = choices[i], None
                    if echo and i not in echoed:  # at the first event: the prompt is prefilled (and scored)
                        echoed.add(i)
                        plp = _completion_logprobs(tokenizer, c, [], 0, True, True) if logprobs is not None else None
                        text = tokenizer.decode(c.prompt)
                        yield _sse(
                            {**head, "choices": [{"index": i, "text": text, "logprobs": plp, "finish_reason": None}]}
                        )
                    if logprobs is not None and delta.token_id is not None:
                        offset = len(c.text) - len(delta.text)
                        lp = _token_logprobs(tokenizer, c.prompt, c.ids[:-1], [delta], offset)
                    finish = FINISH.get(delta.finish_reason, "stop") if delta.finish_reason else None
                    if delta.text or lp is not None or finish:
                        choice = {"index": i, "text": delta.text, "logprobs": lp, "finish_reason": finish}
                        yield _sse({**head, "choices": [choice]})
            except ApiError as exc:  # the response has started: the error goes out as an event
                yield _sse(_error_body(exc))
                return
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(choices)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_json(request, options.max_body_bytes)
        check_model(body)
        messages = _messages(body.get("messages"))
        try:
            ids = tokenizer.encode_chat(messages)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        params = sampling_params(body)
        n = get_int(body, "n", 1, low=1, high=MAX_N)
        want_logprobs = get_bool(body, "logprobs")
        top = get_int(body, "top_logprobs", 0, low=0, high=MAX_LOGPROBS)
        stream = get_bool(body, "stream")
        include_usage = _include_usage(body)
        max_tokens = get_int(body, "max_completion_tokens", None)
        max_tokens = get_int(body, "max_tokens", max_tokens)
        if max_tokens is None:
            max_tokens = max(engine.max_seq_len - len(ids), 1)
        seed = get_int(body, "seed")
        reqs = [
            SeqRequest(
                ids,
                max_tokens,
                params,
                seed=None if seed is None else seed + j,
                stop=get_stop(body),
                continuation=False,
                logprobs=top,
            )
            for j in range(n)
        ]
        events = _Events(delivery)
        choices = _submit(engine, reqs, events)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": options.model_name}

        if not stream:
            results = await _collect(request, engine, choices, events)
            out = []
            for i, (c, deltas) in enumerate(results):
                out.append({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(tokenizer, c, deltas) if want_logprobs else None,
                    "finish_reason": FINISH.get(c.finish_reason, "stop"),
                })  # fmt: skip
            return JSONResponse({**head, "object": "chat.completion", "choices": out, "usage": _usage(choices)})

        chunk = {**head, "object": "chat.completion.chunk"}

        async def sse() -> AsyncIterator[str]:
            for i in range(len(choices)):
                delta = {"role": "assistant", "content": ""}
                yield _sse(
                    {**chunk, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
                )
            try:
                async for i, d in _stream_events(request, engine, choices, events):
                    c, lp = choices[i], None
                    if want_logprobs and d.token_id is not None:
                        lp = {"content": _chat_entries(tokenizer, [], c.ids[:-1], [d])}
                    finish = FINISH.get(d.finish_reason, "stop") if d.finish_reason else None
                    if d.text or lp is not None or finish:
                        delta = {"content": d.text} if d.text else {}
                        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
                        yield _sse({**chunk, "choices": [choice]})
            except ApiError as exc:
                yield _sse(_error_body(exc))
                return
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(choices)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _AuthAndCount:
    """ASGI middleware: the Bearer key (constant-time compare) on all but /health, and a count of
    responses by path and status. Plain ASGI, not ``BaseHTTPMiddleware``, so streamed responses and
    client disconnects pass straight through."""

    def __init__(self, app, api_key: str | None, counts: dict[tuple[str, int], int]) -> None:
        self.app, self.api_key, self.counts = app, api_key, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in PATHS else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                key = (path, message["status"])
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        if self.api_key is not None and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.api_key.encode()):
                error = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
                await error.response()(scope, receive, counting_send)
                return
        await self.app(scope, receive, counting_send)


def _prompts(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of such lists."""
    bad = ApiError(
        400, f"prompt: expected a string, a list of strings or token ids, got {_kind(prompt)}", param="prompt"
    )
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append(tokenizer.encode(item, bos=True))
        elif isinstance(item, list) and item and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            out.append(item)
        else:
            raise bad
    return out


def _messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages with string content, or content as a list of ``{"type": "text"}`` parts."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages: expected a non-empty array, got {_kind(messages)}", param="messages")
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{n - 1}]: expected an object, got {_kind(m)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise ApiError(400, f"messages[{n - 1}].content: only text parts are supported", param="messages")
            content = "".join(parts)
        out.append({"role": m.get("role"), "content": content})
    return out


def _include_usage(body: dict) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise ApiError(400, f"stream_options: expected an object, got {_kind(so)}", param="stream_options")
    return get_bool(so, "include_usage")


def _submit(engine: Engine, reqs: list[SeqRequest], events: _Events) -> list[_Choice]:
    for r in reqs:
        try:
            engine.check(r)
        except UserError as exc:
            raise _user_error(exc) from None
    choices: list[_Choice] = []
    try:
        for i, r in enumerate(reqs):
            choices.append(_Choice(engine.submit(r, events.callback(i)), r.prompt))
    except (QueueFull, EngineStopped) as exc:
        for c in choices:
            engine.cancel(c.seq)
        if isinstance(exc, QueueFull):
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        raise ApiError(503, str(exc), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from None
    except UserError as exc:
        raise _user_error(exc) from None
    return choices


def _failed(reason: str | None) -> ApiError | None:
    if reason == "cancelled":
        return ApiError(503, "the server is shutting down; the request was cancelled", type="server_error",
                        code="shutting_down")  # fmt: skip
    if reason == "error":
        return ApiError(500, "the engine failed; see the server log", type="internal_error", code="internal_error")
    return None


async def _stream_events(
    request: Request, engine: Engine, choices: list[_Choice], events: _Events
) -> AsyncIterator[tuple[int, Delta]]:
    """Every event of ``choices`` until all finish; cancels the rest if the consumer stops early
    (a client that went away: Starlette cancels the response)."""
    left = len(choices)
    try:
        while left:
            i, delta = await events.queue.get()
            c = choices[i]
            c.text += delta.text
            if delta.token_id is not None:
                c.ids.append(delta.token_id)
            if delta.finish_reason is not None:
                c.finish_reason = delta.finish_reason
                left -= 1
                failed = _failed(delta.finish_reason)
                if failed is not None:
                    raise failed
            yield i, delta
    finally:
        for c in choices:
            if c.finish_reason is None:
                engine.cancel(c.seq)


async def _collect(
    request: Request, engine: Engine, choices: list[_Choice], events: _Events
) -> list[tuple[_Choice, list[Delta]]]:
    """Wait for every choice to finish; a client that disconnects meanwhile cancels them."""
    deltas: list[list[Delta]] = [[] for _ in choices]
    stream = _stream_events(request, engine, choices, events)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, choices))
    try:
        async for i, delta in stream:
            deltas[i].append(delta)
    finally:
        watcher.cancel()
        await stream.aclose()
    return list(zip(choices, deltas, strict=True))


async def _cancel_on_disconnect(request: Request, engine: Engine, choices: list[_Choice]) -> None:
    """A non-streamed request whose client goes away: cancel its sequences (frees their rows)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    for c in choices:
        engine.cancel(c.seq)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(choices: list[_Choice]) -> dict:
    prompt = sum(len(p) for p in {id(c.prompt): c.prompt for c in choices}.values())
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- log-probabilities ----


def _piece(tokenizer: Tokenizer, before: list[int], token: int) -> str:
    """The text ``token`` adds after the tokens ``before`` (a short window of them)."""
    window = before[-CONTEXT_TOKENS:]
    return tokenizer.decode([*window, token])[len(tokenizer.decode(window)) :]


def _token_logprobs(
    tokenizer: Tokenizer, prompt: list[int], before: list[int], deltas: list[Delta], offset: int
) -> dict:
    """OpenAI's completions ``logprobs`` object for generated tokens ``deltas`` after ``prompt + before``."""
    ctx = list(prompt) + list(before)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for d in deltas:
        if d.token_id is None:
            continue
        piece = _piece(tokenizer, ctx, d.token_id)
        out["tokens"].append(piece)
        out["token_logprobs"].append(d.logprob)
        top = None if d.top_logprobs is None else {_piece(tokenizer, ctx, t): lp for t, lp in d.top_logprobs}
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(piece)
        ctx.append(d.token_id)
    return out


def _completion_logprobs(
    tokenizer: Tokenizer, c: _Choice, deltas: list[Delta], offset: int, echo: bool, prompt_only: bool = False
) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echo:
        seq, ctx = c.seq, []
        for i, t in enumerate(c.prompt):
            piece = _piece(tokenizer, ctx, t)
            out["tokens"].append(piece)
            out["token_logprobs"].append(seq.prompt_logprobs[i] if i < len(seq.prompt_logprobs) else None)
            alts = seq.prompt_top[i] if i < len(seq.prompt_top) else None
            out["top_logprobs"].append(None if alts is None else {_piece(tokenizer, ctx, a): lp for a, lp in alts})
            out["text_offset"].append(offset)
            offset += len(piece)
            ctx.append(t)
        if prompt_only:
            return out
    gen = _token_logprobs(tokenizer, c.prompt, [], deltas, offset)
    for key in out:
        out[key] += gen[key]
    return out


def _chat_entries(tokenizer: Tokenizer, prompt: list[int], before: list[int], deltas: list[Delta]) -> list[dict]:
    ctx, entries = list(prompt) + list(before), []
    for d in deltas:
        if d.token_id is None:
            continue
        piece = _piece(tokenizer, ctx, d.token_id)
        alts = []
        for t, lp in d.top_logprobs or []:
            p = _piece(tokenizer, ctx, t)
            alts.append({"token": p, "logprob": lp, "bytes": list(p.encode())})
        entries.append({"token": piece, "logprob": d.logprob, "bytes": list(piece.encode()), "top_logprobs": alts})
        ctx.append(d.token_id)
    return entries


def _chat_logprobs(tokenizer: Tokenizer, c: _Choice, deltas: list[Delta]) -> dict:
    return {"content": _chat_entries(tokenizer, [], [], deltas)}


# ---- metrics ----


def prometheus_text(engine: Engine, http_counts: dict[tuple[str, int], int]) -> str:
    m, p = engine.metrics, "mixtral_lite"
    lines = [
        f"# HELP {p}_requests_total Finished generation requests (sequences), by finish reason.",
        f"# TYPE {p}_requests_total counter",
    ]
    for reason, count in sorted(m.requests.items()):
        lines.append(f'{p}_requests_total{{finish_reason="{reason}"}} {count}')
    lines += [
        f"# HELP {p}_http_requests_total HTTP requests by path and status.",
        f"# TYPE {p}_http_requests_total counter",
    ]
    for (path, status), count in sorted(http_counts.items()):
        lines.append(f'{p}_http_requests_total{{path="{path}",status="{status}"}} {count}')
    for name, value, kind, help_text in (
        ("prompt_tokens_total", m.prompt_tokens, "counter", "Prompt tokens prefilled."),
        ("generation_tokens_total", m.generation_tokens, "counter", "Tokens generated."),
        ("decode_steps_total", m.steps, "counter", "Decode steps of the whole batch."),
        ("cache_repacks_total", m.repacks, "counter", "KV cache compactions."),
        ("running_requests", engine.running, "gauge", "Sequences holding a batch row."),
        ("queued_requests", engine.queued, "gauge", "Sequences waiting for a row."),
        ("max_batch", engine.max_batch, "gauge", "Rows in the batch."),
    ):
        lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
    for name, hist, help_text in (
        ("time_to_first_token_seconds", m.ttft, "Time from submission to the first token."),
        ("inter_token_latency_seconds", m.itl, "Time between a sequence's consecutive tokens."),
    ):
        lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} histogram"]
        lines += _histogram_lines(f"{p}_{name}", hist)
    return "\n".join(lines) + "\n"


def _histogram_lines(name: str, hist: Histogram) -> list[str]:
    lines = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(hist.buckets, hist.counts, strict=True)]
    return [
        *lines,
        f'{name}_bucket{{le="+Inf"}} {hist.count}',
        f"{name}_sum {hist.total}",
        f"{name}_count {hist.count}",
    ]


__all__ = ["ApiError", "ServerOptions", "create_app", "prometheus_text"]
