"""`realm-jax serve`: the options, their checks before the model loads, and the uvicorn server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys

from realm_jax.errors import ArgumentError

__all__ = ["add_parser"]


def add_parser(sub, add_load_options, add_mesh_options, command) -> None:
    """The `serve` subcommand's options; `command` (realm_jax.cli's) checks them, loads the model and calls
    `run`."""
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_load_options(p)
    add_mesh_options(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 exposes the server to the network, use --api-key then)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-context", type=int, default=None, help="the most tokens (prompt + completion) of a "
                   "sequence: each slot's KV cache (default: the model's context, at most 2048)")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step (a "
                   "multiple of 64): a long prompt does not stall the others' decoding for its whole length")
    p.add_argument("--batch-dependent", action="store_true", help="decode all slots in one batch: faster on CPU "
                   "past 8 busy slots, but a request's numbers then depend on the others (default: batch-invariant)")
    p.add_argument("--api-key", default=os.environ.get("REALM_JAX_API_KEY"), help="require Authorization: Bearer "
                   "KEY on /v1/* (default: $REALM_JAX_API_KEY, or none)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template for "
                   "/v1/chat/completions instead of the file's (needed for a file without one)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="the largest request body (default 4 MiB)")
    p.add_argument("--max-connections", type=int, default=256, help="concurrent connections; more get 503")
    p.set_defaults(func=command)


def check(args: argparse.Namespace) -> None:
    """The serve options, and the serve extra, before anything is loaded."""
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            raise ArgumentError(f"--host={args.host!r} must be an IP address or localhost") from None
    for name, low, high in (("port", 0, 65535), ("slots", 1, 1024), ("queue_size", 0, 1 << 20),
                            ("max_body_bytes", 1024, 1 << 30), ("max_connections", 1, 1 << 16),
                            ("prefill_chunk", 64, 1 << 16)):
        value = getattr(args, name)
        if not low <= value <= high:
            raise ArgumentError(f"--{name.replace('_', '-')}={value} must be in [{low}, {high}]")
    if args.prefill_chunk % 64:
        raise ArgumentError(f"--prefill-chunk={args.prefill_chunk} must be a multiple of 64")
    if args.api_key is not None and not args.api_key.strip():
        raise ArgumentError("--api-key is empty")
    try:
        import uvicorn  # noqa: F401

        import realm_jax.serve.server  # noqa: F401
    except ImportError as e:
        raise ArgumentError(f"serve needs the serve extra: pip install 'realm-jax[serve]' ({e})") from None


def listen(args: argparse.Namespace) -> socket.socket:
    """The server's listening socket on --host/--port, bound before the model loads: a port in use is an
    ArgumentError at once, not a failure after the load, and nothing can take the port during it."""
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        return socket.create_server((args.host, args.port), family=family, backlog=2048)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ArgumentError(f"--host {args.host} --port {args.port}: cannot listen there: {reason}") from None


def run(args: argparse.Namespace, model, template: str | None, sock: socket.socket) -> int:
    """Serve `model` (loaded by realm_jax.cli after `check`) with the checked options on `sock` (`listen`'s,
    bound before the load) until interrupted."""
    import uvicorn

    from realm_jax.serve.engine import Engine, RequestParams, complete
    from realm_jax.serve.server import create_app

    engine = Engine(model, slots=args.slots, max_context=args.max_context, queue_size=args.queue_size,
                    prefill_chunk=args.prefill_chunk, batch_invariant=not args.batch_dependent).warm_up().start()
    try:
        # The prefill and the first token's path too, before the first client comes.
        complete(engine, model.tokenizer.encode("Hello"), RequestParams(max_tokens=2, temperature=0.0))
        app = create_app(engine, name=model.path.stem, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                         chat_template=template, template_source=f"--chat-template {args.chat_template}")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        host, port = args.host, sock.getsockname()[1]  # --port 0: the port the system chose
        print(f"realm-jax: serving {model.path.name} on http://{f'[{host}]' if ':' in host else host}:{port} "
              f"({engine.slots} slots, context {engine.max_context})", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=host, port=port, limit_concurrency=args.max_connections,
                                timeout_keep_alive=5, log_level="warning", h11_max_incomplete_event_size=64 << 10)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    return 0
