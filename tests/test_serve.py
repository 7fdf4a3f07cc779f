"""The OpenAI-compatible server, started for real on 127.0.0.1 and driven with the official client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mixtral_lite import load_model, load_tokenizer  # noqa: E402
from mixtral_lite.commands.generate import BUNDLED  # noqa: E402
from mixtral_lite.generation.engine import Engine, SeqRequest  # noqa: E402
from mixtral_lite.generation.generate import generate  # noqa: E402
from mixtral_lite.serving.server import ServerOptions, create_app  # noqa: E402

PROMPTS = ["Once upon a time", "The king", "She opened the door and saw", "Hi", "Tom had a red ball. One day, he went"]


class Server:
    """A real uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, engine: Engine, tokenizer, **options) -> None:
        self.engine = engine
        app = create_app(engine, tokenizer, ServerOptions("bundled", **options))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED, progress=False), load_tokenizer(BUNDLED)


@pytest.fixture(scope="module")
def server(bundled):
    model, tokenizer = bundled
    s = Server(Engine(model, tokenizer, max_batch=8, max_queue=32), tokenizer, max_body_bytes=20_000)
    yield s
    s.close()


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["bundled"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_completion_greedy_equals_generate_and_streams_the_same_text(server, bundled):
    model, tokenizer = bundled
    c = server.client()
    r = c.completions.create(model="bundled", prompt=PROMPTS[0], max_tokens=20, temperature=0, logprobs=3)
    ref = generate(model, tokenizer, PROMPTS[0], max_new_tokens=20)
    choice = r.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0])) and r.usage.completion_tokens == 20
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, ref.logprobs, strict=True)) < 1e-4
    assert all(len(t) == 3 for t in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == ref.text
    stream = c.completions.create(model="bundled", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_token_id_prompts_lists_n_and_seeds(server, bundled):
    model, tokenizer = bundled
    c = server.client()
    ids = tokenizer.encode(PROMPTS[1])
    r = c.completions.create(model="bundled", prompt=[ids, PROMPTS[2]], max_tokens=8, temperature=0)
    assert [ch.text for ch in r.choices] == [
        generate(model, tokenizer, p, max_new_tokens=8).text for p in (ids, PROMPTS[2])
    ]
    kw = dict(model="bundled", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, n=3, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # same seed, same samples
    assert len({ch.text for ch in a.choices}) > 1  # choice j uses seed + j
    alone = generate(model, tokenizer, PROMPTS[3], max_new_tokens=12, temperature=1.0, seed=8)
    assert a.choices[1].text == alone.text


def test_stop_strings_and_echo(server, bundled):
    model, tokenizer = bundled
    c = server.client()
    ref = generate(model, tokenizer, PROMPTS[0], max_new_tokens=30, stop=["\n"])
    r = c.completions.create(model="bundled", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop="\n")
    assert r.choices[0].text == ref.text and "\n" not in ref.text and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="bundled", prompt=PROMPTS[2], max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    n = len(tokenizer.encode(PROMPTS[2]))
    assert r.choices[0].text.startswith(PROMPTS[2]) and len(lp.token_logprobs) == n + 1
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    kw = dict(model="bundled", prompt=PROMPTS[2], max_tokens=1, temperature=0, echo=True, logprobs=1, stream=True)
    chunks = [ch for ch in c.completions.create(**kw) if ch.choices]
    assert chunks[0].choices[0].text == tokenizer.decode(tokenizer.encode(PROMPTS[2]))
    streamed = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs  # the prompt's scores, then the new token's


def test_chat_equals_generate_of_the_chat_prompt(server, bundled):
    model, tokenizer = bundled
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    ids = tokenizer.encode_chat(messages)
    ref = generate(model, tokenizer, ids, max_new_tokens=16, continuation=False)
    r = c.chat.completions.create(model="bundled", messages=messages, max_tokens=16, temperature=0, logprobs=True)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert len(r.choices[0].logprobs.content) == len(ref.token_ids)
    stream = c.chat.completions.create(
        model="bundled",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_sixteen_concurrent_requests_equal_each_request_alone(server, bundled):
    """Greedy ones equal generate() alone; seeded ones equal the same request sent alone afterwards."""
    model, tokenizer = bundled
    c = server.client()
    reqs = []
    for i in range(16):
        kw = dict(model="bundled", prompt=PROMPTS[i % 5] + " and" * (i // 5), max_tokens=4 + 3 * (i % 5))
        kw.update(temperature=0) if i % 2 == 0 else kw.update(temperature=0.8, top_p=0.95, seed=i)
        if i % 4 == 1:
            kw["extra_body"] = {"top_k": 30, "repetition_penalty": 1.2}
        reqs.append(kw)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda kw: c.completions.create(**kw).choices[0].text, reqs))
    for kw, text in zip(reqs, together, strict=True):
        if kw["temperature"] == 0:
            assert text == generate(model, tokenizer, kw["prompt"], max_new_tokens=kw["max_tokens"]).text
        else:
            assert text == c.completions.create(**kw).choices[0].text


def post(server, path: str, body, headers=None) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}{path}", content=data, headers={"content-type": "application/json", **(headers or {})}
    )


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"model": "bundled", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": "bundled", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "bundled", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "bundled", "prompt": 5}, 400, "prompt"),
        ({"model": "other", "prompt": "hi"}, 404, "model"),
        ({"model": "bundled", "prompt": list(range(3, 1100))}, 400, "prompt"),
        ({"model": "bundled", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "bundled", "prompt": "x" * 30_000}, 413, None),
    ],
)
def test_bad_requests_get_the_error_object(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_chat_and_unknown_path(server):
    r = post(server, "/v1/chat/completions", {"model": "bundled", "messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_metrics_are_prometheus_text(server):
    server.client().completions.create(model="bundled", prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    names = ["requests_total", "prompt_tokens_total", "generation_tokens_total", "running_requests"]
    names += ["queued_requests", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count"]
    for name in names:
        assert f"mixtral_lite_{name}" in text


def test_client_disconnect_mid_stream_frees_the_row(server):
    body = {"model": "bundled", "prompt": PROMPTS[0], "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                break
        assert server.engine.running == 1
    deadline = time.time() + 10
    while server.engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.running == 0
    assert server.engine.metrics.requests.get("cancelled", 0) >= 1


def test_api_key_and_full_queue(bundled):
    model, tokenizer = bundled
    s = Server(Engine(model, tokenizer, max_batch=1, max_queue=0), tokenizer, api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200  # no key needed
        assert s.client("sekrit").models.list().data[0].id == "bundled"
        busy = s.engine.submit(SeqRequest(tokenizer.encode(PROMPTS[0]), 1000), lambda d: None)  # the one row
        body = {"model": "bundled", "prompt": PROMPTS[0], "max_tokens": 5}
        full = post(s, "/v1/completions", body, headers={"Authorization": "Bearer sekrit"})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1, full.text[:200]
        assert full.json()["error"]["type"] == "rate_limit_error"
        s.engine.cancel(busy)
    finally:
        s.close()


def test_cli_serves_and_exits_0_on_sigterm(tmp_path: Path):
    """The real command in a subprocess: startup line with the URL, a request, SIGTERM -> exit 0."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "mixtral_lite", "serve", "--port", "0", "--threads", "1", "--shutdown-timeout", "2"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while line.startswith("mixtral_lite: building the CPU kernel"):  # a first run builds it
            line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert c.completions.create(model="bundled", prompt="Hi", max_tokens=3).choices[0].text is not None
        body = {"model": "bundled", "prompt": "Once", "max_tokens": 900, "stream": True}
        with httpx.stream("POST", f"{url}/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]  # the stream ends: finished, or cancelled at the deadline
        assert rest[-1] == "data: [DONE]" or "shutting_down" in rest[-1]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
