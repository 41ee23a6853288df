"""The ``peftkit serve`` command: load a base model and adapters, then run the HTTP server.

    peftkit serve --model smollm2 --adapters ./sql ./chat=./runs/chat --port 8000

Each ``--adapters`` entry is a folder written by ``save_pretrained`` (peftkit or Hugging Face
PEFT), served under the folder's name or under ``NAME=DIR``. The server listens on 127.0.0.1
unless ``--host`` says otherwise; run-time loading (``POST /v1/adapters``) accepts folders under
``--adapter-root`` (default: the folders that hold the ``--adapters``).
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``["DIR", "NAME=DIR"]`` -> ``[(name, dir)]``; names must be unique and not ``base`` (ConfigError)."""
    from ..config import ConfigError
    from .app import NAME_RE

    out, seen = [], set()
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder, name = spec, os.path.basename(os.path.normpath(spec))
        if not NAME_RE.match(name) or name == "base":
            raise ConfigError(f"adapter name {name!r} (from {spec!r}) must be 1-64 letters, digits, '.', '_' or "
                             "'-' and not 'base'; write NAME=DIR to choose one.")
        if name in seen:
            raise ConfigError(f"two adapters are named {name!r}; write NAME=DIR to tell them apart.")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"adapter folder {folder!r} does not exist.")
        seen.add(name)
        out.append((name, folder))
    return out


def register(subparsers) -> None:
    """Add ``peftkit serve`` to the ``peftkit`` command (peftkit/cli.py's registration hook)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with many adapters on one base model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model: a folder, a .gguf file, a hub id, or 'smollm2' (default)")
    p.add_argument("--adapters", nargs="+", default=[], metavar="DIR", help="adapter folders (or NAME=DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--adapter-root", action="append", default=None, metavar="DIR",
                   help="folders run-time loads may read from (repeatable)")
    p.add_argument("--scheduler", choices=("continuous", "static"), default="continuous",
                   help="continuous: rows join and leave the batch at every decoding step (default); "
                        "static: one generate per gathered batch")
    p.add_argument("--max-batch", type=int, default=32, help="most requests running at once")
    p.add_argument("--max-running-tokens", type=int, default=None,
                   help="continuous: most prompt + max_tokens positions the running requests may reserve "
                        "(default: 1024 per --max-batch row)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="static: how long to gather a batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 + Retry-After")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.set_defaults(func=run)


def build(args):
    """The (engine, app) for parsed ``args`` (model and adapters loaded)."""
    import torch

    from ..models import load_model, load_tokenizer, resolve
    from .app import Limits, create_app
    from .engine import Engine

    specs = parse_adapter_specs(args.adapters)
    path = resolve(args.model, log=lambda m: print(m, file=sys.stderr))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path, dtype=args.dtype).to(device).eval()
    engine = Engine(model, load_tokenizer(path), max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                    max_queue=args.max_queue, scheduler=args.scheduler, max_running_tokens=args.max_running_tokens)
    for name, folder in specs:
        engine.load_adapter(name, folder)
    roots = args.adapter_root or sorted({os.path.dirname(os.path.abspath(f)) for _, f in specs})
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens)
    return engine, create_app(engine, limits, tuple(roots))


def run(args) -> int:
    """Serve until interrupted."""
    try:
        import uvicorn
    except ImportError:
        print("peftkit serve needs FastAPI and uvicorn: pip install 'peftkit[serve]'", file=sys.stderr)
        return 2
    engine, app = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: the server has no authentication.", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_keep_alive=5)
    finally:
        engine.close()
    return 0


def main(argv=None) -> int:
    """``python -m peftkit.serve.cli ...`` without the rest of the ``peftkit`` command."""
    parser = argparse.ArgumentParser(prog="peftkit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
