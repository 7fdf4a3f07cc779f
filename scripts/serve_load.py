"""Load test of ``mixtral-lite serve``: streamed completions at concurrency 1, 4, 16, 64.

Starts the server in this process on a free port of 127.0.0.1 (or targets ``--url``, which must be
127.0.0.1 / localhost), sends a bounded number of requests per level for at most ``--max-seconds``,
and prints one table row per level: requests/s, output tokens/s, time to first token and
inter-token latency p50/p99, errors. Every request's stream is read to its end; a request that
fails or returns no [DONE] counts as an error.

  PYTHONPATH=. python scripts/serve_load.py --max-tokens 32 --max-seconds 20
  PYTHONPATH=. python scripts/serve_load.py --model /data/bench-weights --levels 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import httpx

PROMPTS = ["Once upon a time", "The king", "She opened the door and saw", "Tom had a red ball. One day, he went"]


def spawn_server(args) -> tuple[str, subprocess.Popen]:
    """``mixtral-lite serve`` in its own process (as deployed: no interpreter lock shared with the
    load generator); returns its URL from the startup line."""
    cmd = [sys.executable, "-m", "mixtral_lite", "serve", "--port", "0", "--max-batch", str(args.max_batch)]
    cmd += ["--max-queue", "256", "--served-model-name", "model"]
    for flag, value in (("--model", args.model), ("--dtype", args.dtype), ("--threads", args.threads)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # notes before the startup line (a kernel build) are passed through
        if " at http://127.0.0.1:" in line:
            break
        seen.append(line)
        print(line, end="", file=sys.stderr)
    else:
        proc.kill()
        raise SystemExit(f"serve_load: the server did not start: {''.join(seen)}")
    return line.split(" at ")[1].split()[0].removesuffix("/v1"), proc


def start_server(args) -> tuple[str, object]:
    import torch
    import uvicorn

    from mixtral_lite import load_model, load_tokenizer
    from mixtral_lite.commands.generate import BUNDLED
    from mixtral_lite.generation.engine import Engine
    from mixtral_lite.serving.server import ServerOptions, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or BUNDLED
    model, tokenizer = load_model(folder, dtype=args.dtype, progress=False), load_tokenizer(folder)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=256)
    app = create_app(engine, tokenizer, ServerOptions("model"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {
        "model": "model",
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    times, tokens, done = [], 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    if not done:
        return {"error": "no [DONE]"}
    ttft = times[0] - start if times else float("nan")
    tokens = tokens or len(times)  # no usage chunk (llama-server): one token per streamed chunk
    return {"ttft": ttft, "itl": [b - a for a, b in zip(times, times[1:], strict=False)], "tokens": tokens}


async def level(url: str, concurrency: int, count: int, max_tokens: int, max_seconds: float) -> dict:
    results: list[dict] = []
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(count))

    async def worker(client):
        for i in counter:
            if time.perf_counter() > deadline:
                return
            results.append(await one(client, url, i, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=max_seconds + 60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] == r["ttft"])  # a request with no text has no first token
    itls = sorted(x for r in ok for x in r["itl"])
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "req_s": len(ok) / elapsed,
        "tok_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft": (pct(ttfts, 50), pct(ttfts, 99)),
        "itl": (pct(itls, 50), pct(itls, 99)),
        "seconds": elapsed,
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(int(p), 99) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server on 127.0.0.1 (default: start one here)")
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--dtype", help="model dtype")
    ap.add_argument("--threads", type=int, help="torch CPU threads of the server")
    ap.add_argument("--in-process", action="store_true", help="run the server in this process (default: its own)")
    ap.add_argument("--max-batch", type=int, default=64, help="server batch rows (default 64)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, >= 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="time bound per level")
    args = ap.parse_args()
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
            print("serve_load: --url must be on 127.0.0.1 or localhost", file=sys.stderr)
            return 2
        url = args.url.rstrip("/").removesuffix("/v1")
    elif args.in_process:
        url, _ = start_server(args)
    else:
        url, proc = spawn_server(args)
    try:
        return report(args, url)
    finally:
        if not args.url and not args.in_process:
            proc.terminate()
            proc.wait(30)


def report(args, url: str) -> int:
    rows = []
    print("| concurrency | requests | errors | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for c in args.levels:
        count = args.requests or max(2 * c, 8)
        r = asyncio.run(level(url, c, count, args.max_tokens, args.max_seconds))
        rows.append(r)
        ms = lambda pair: f"{pair[0] * 1e3:.0f} / {pair[1] * 1e3:.0f}"  # noqa: E731
        print(
            f"| {c} | {r['requests']} | {r['errors']} | {r['req_s']:.2f} | {r['tok_s']:.0f} | {ms(r['ttft'])} "
            f"| {ms(r['itl'])} |",
            flush=True,
        )
    serial = rows[0]["tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    if serial:
        for r in rows[1:]:
            print(f"concurrency {r['concurrency']}: {r['tok_s'] / serial:.1f}x the serial output tokens/s")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
