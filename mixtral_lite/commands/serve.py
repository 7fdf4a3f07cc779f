"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming with "stream": true),
/health and /metrics (Prometheus). Requests join the running batch between decode steps; at most
--max-batch run at once and --max-queue wait (a full queue answers 429 with Retry-After). Binds
127.0.0.1 unless --host says otherwise; with --api-key every endpoint but /health needs
"Authorization: Bearer KEY". SIGTERM or Ctrl-C stops accepting, lets in-flight requests finish for
up to --shutdown-timeout seconds, cancels the rest and exits 0. Without --model the bundled demo
model is served.

Under torchrun with --tp/--ep, rank 0 serves HTTP and the other ranks run every step with it.

Examples:
  mixtral-lite serve --model /data/Mixtral-8x7B-Instruct-v0.1 --max-batch 16
  torchrun --nproc-per-node 2 -m mixtral_lite serve --model /data/Mixtral-8x7B-Instruct-v0.1 --tp 2
  mixtral-lite serve --port 8080 --api-key "$KEY"
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "bundled", "prompt": "Once upon a time", "max_tokens": 20}'
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from ..errors import UserError
from .generate import add_model_arguments, add_parallel_arguments, load, model_folder, start_parallel

HELP = "serve a model over an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a batch row (default 64)")
    p.add_argument("--max-seq-len", type=int, help="tokens per request, prompt included (default: context, <= 2048)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step (default 256)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model folder's name)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds in-flight requests get at SIGTERM")
    add_parallel_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serving.server import ServerOptions, create_app
    except ImportError as exc:
        missing = f"serve needs fastapi and uvicorn ({exc.name} is missing)"
        raise UserError(f"{missing}: pip install 'mixtral-lite[serve]'") from None
    from ..config import MixtralConfig
    from ..generation.engine import Engine, follow
    from ..generation.tokenizer import load_tokenizer

    if not 0 <= args.port < 65536:
        raise UserError(f"--port: expected 0..65535, got {args.port}")
    folder = model_folder(args)
    name = args.served_model_name or folder.name
    tokenizer = load_tokenizer(folder, chat_template=args.chat_template)
    parallel = start_parallel(args, MixtralConfig.from_pretrained(folder))
    model = load(args, folder) if parallel is None else parallel.load(folder, dtype=args.dtype)
    engine = Engine(
        model,
        tokenizer,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_seq_len=args.max_seq_len,
        prefill_chunk=args.prefill_chunk,
    )
    app = create_app(engine, tokenizer, ServerOptions(name, api_key=args.api_key, max_body_bytes=args.max_body_bytes))
    if parallel is None:
        return _serve(args, uvicorn, app, engine, model, name)
    # torchrun: rank 0 serves HTTP and sends every model and cache operation to the other ranks,
    # which apply them to their shards in the same order
    send, receive = parallel.channel()
    if not parallel.state.is_main:
        for sig in (signal.SIGTERM, signal.SIGINT):  # torchrun signals every rank: this one ends with rank 0
            signal.signal(sig, signal.SIG_IGN)
        with parallel.guard():
            follow(engine, receive)
        parallel.close()
        return 0
    engine.mirror = send
    try:
        return _serve(args, uvicorn, app, engine, model, name)
    finally:
        send(None)  # the other ranks stop following
        parallel.close()


def _serve(args: argparse.Namespace, uvicorn, app, engine, model, name: str) -> int:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise UserError(f"--host {args.host} --port {args.port}: cannot bind ({exc.strerror})") from None
    sock.listen(2048)  # before the startup line: a client that reads it may connect at once
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"mixtral-lite serve: {name} at http://{shown}:{port}/v1 (max batch {engine.max_batch}, "
        f"queue {engine.max_queue}, {engine.max_seq_len} tokens per request, "
        f"{model.device} {str(model.dtype).removeprefix('torch.')}{', API key required' if args.api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    timeout = args.shutdown_timeout

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM / SIGINT: refuse new requests at once; cancel the ones still running just before
            uvicorn's deadline, so their streams end with an error event instead of a cut connection."""
            engine.stop_accepting()
            threading.Timer(max(timeout - 0.5, 0.0), engine.cancel_all).start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after shutting down (exit status -15); a requested
            # shutdown that went cleanly is a success, so forget it and return normally (exit 0)
            getattr(self, "_captured_signals", []).clear()

    Server(config).run(sockets=[sock])  # stops listening, waits for in-flight requests, then the lifespan end
    return 0
