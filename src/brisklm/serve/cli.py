"""`brisk serve`: the streaming server (WebSocket /ws, page at /, /health, /openapi.json)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from brisklm.core.device import add_device_args, device_kwargs
from brisklm.core.inspect import causal_lm_only
from brisklm.core.text import add_text_args, text_options
from brisklm.errors import BriskError


# What `brisk inspect` reports for these commands on a checkpoint (None = runs, else why not).
CHECKPOINT_SUPPORT = {"serve": causal_lm_only}


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE policy options; values are JSON when they parse (3 -> int), else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BriskError(f"--option {pair!r} is not KEY=VALUE: pass e.g. --option k=3")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from brisklm.core.text import TextLayer
    from brisklm.serve.access import check_exposure, normalize_origin, resolve_token
    from brisklm.serve.app import create_app
    from brisklm.serve.policy import policy_names
    from brisklm.serve.server import serve_forever
    from brisklm.serve.sessions import Limits
    from brisklm.zoo.store import load

    token = resolve_token(args.token)
    check_exposure(args.host, token)  # before any loading: a clear refusal, not a model load first
    origins = [normalize_origin(o) for o in args.allow_origin]
    if args.policy not in policy_names():
        raise BriskError(f"unknown --policy {args.policy!r}: choose one of {', '.join(policy_names())}")
    options = parse_options(args.option)
    if args.policy == "wait-k":
        options = {"k": args.k, "phi": args.phi, **options}
    if args.threshold is not None:
        options = {"threshold": args.threshold, **options}
    torch.set_num_threads(args.threads)
    limits = Limits(max_sessions=args.max_sessions, max_source_words=args.max_source_words,
                    max_message_bytes=args.max_message_bytes, max_session_seconds=args.max_session_seconds,
                    max_memory_bytes=int(args.max_memory_mb * 2**20), max_batch=args.max_batch).check()
    loaded = load(args.model, **device_kwargs(args))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, **text_options(args))
    app = create_app(loaded.model, text, policy=args.policy, options=options, limits=limits,
                     batching=not args.no_batching, model_name=str(args.model), instruction=args.instruction,
                     token=token, allow_origins=origins)

    def ready(port: int) -> None:
        guard = "bearer token required" if token else "no token (loopback only)"
        print(f"brisk serve: {args.model} with {args.policy} {json.dumps(options)} on http://{args.host}:{port}/ "
              f"(WebSocket /ws, /health, /openapi.json; {guard}); Ctrl-C stops", flush=True)

    serve_forever(app, args.host, args.port, limits.max_message_bytes, on_ready=ready)
    return 0


def add_commands(subparsers) -> None:
    from brisklm.serve.policy import policy_names

    p = subparsers.add_parser("serve", help="serve streaming translation over WebSocket, with a demo page")
    p.add_argument("--model", default="translate-gpe",
                   help="zoo name or any causal-LM checkpoint folder (best GPE-trained: brisk stream train)")
    p.add_argument("--policy", default="wait-k", help=f"session policy ({', '.join(policy_names())})")
    p.add_argument("--k", type=int, default=3, help="wait-k lag (policy wait-k)")
    p.add_argument("--phi", type=int, default=0, help="first target position (policy wait-k)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision-head threshold (policies entropy / attention / probe; default per head)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="other policy options")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; any other address needs --token)")
    p.add_argument("--token", default=None,
                   help="bearer token every HTTP request and WebSocket handshake must carry (default: the "
                        "BRISK_SERVE_TOKEN environment variable; required off loopback)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (e.g. https://app.example.org) allowed to open WebSockets besides the "
                        "server's own page; repeatable (default: none)")
    p.add_argument("--instruction", default=None,
                   help="text that opens every source group, as in brisk stream translate")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-source-words", type=int, default=200, help="source words per session")
    p.add_argument("--max-message-bytes", type=int, default=16384)
    p.add_argument("--max-session-seconds", type=float, default=300.0)
    p.add_argument("--max-memory-mb", type=float, default=64.0, help="KV-cache memory per session")
    p.add_argument("--max-batch", type=int, default=64, help="sessions per batched engine call")
    p.add_argument("--no-batching", action="store_true", help="run every session's engine step alone")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the engine")
    add_text_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_serve)
