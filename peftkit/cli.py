"""The ``peftkit`` command: ``train``, ``generate``, ``eval``, ``merge``, ``inspect`` (and more).

Adding a subcommand (the hook other modules use)
------------------------------------------------
Subcommands live in the modules named in :data:`COMMAND_MODULES`. Each module exposes::

    def register(subparsers):            # subparsers: argparse's add_subparsers() object
        p = subparsers.add_parser("export", help="...")
        p.add_argument(...)
        p.set_defaults(func=run)         # run(args) -> exit code (int) or None for 0

and, optionally, ``p.set_defaults(parse=f)`` where ``f(parser, subparser, argv)`` returns the
parsed namespace (``train`` uses this to read ``--config`` files). To add ``peftkit export``,
append ``"peftkit.export.cli"`` (say) to the tuple: that one-line edit is the whole
registration. A module may also add options to an existing command by looking it up in
``subparsers.choices`` (``subparsers.choices["train"].add_argument("--quantize", ...)``); its
option then reaches that command's ``run(args)`` as an attribute of ``args``. Modules are
imported lazily at start-up and register in the order listed.

Errors a user can fix (bad data, bad options, missing files) print one ``peftkit: error:`` line
and exit with status 2 instead of a traceback; ``PEFTKIT_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

#: modules whose ``register(subparsers)`` adds subcommands, in this order
COMMAND_MODULES: tuple[str, ...] = (
    "peftkit.train.command",
    "peftkit.train.tools",
    "peftkit.serve.cli",
    "peftkit.io.gguf", "peftkit.estimate",
)


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning from the command line.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser, sub


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .io.checkpoint import CheckpointError
    from .models import ModelLoadError
    from .train.data import DataError

    return (ConfigError, CheckpointError, ModelLoadError, DataError, FileNotFoundError)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``peftkit`` script; ``peftkit`` alone runs ``peftkit train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked tokenizers warn and may deadlock
    parser, sub = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["train"] + argv
    args = parser.parse_args(argv)
    parse = getattr(args, "parse", None)
    errors = _user_errors()
    try:
        if parse is not None:
            args = parse(parser, sub.choices[args.command], argv)
        code = args.func(args)
    except errors as e:
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        print(f"peftkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npeftkit: interrupted; resume training with --resume", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
