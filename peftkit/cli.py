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


#: subcommand -> (import name, what it is for) of the optional packages it needs, all from the extra
#: ``peftkit[train]``; checked before the command does any work (``peftkit serve`` checks its own)
EXTRA_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("accelerate", "transformers' Trainer"), ("matplotlib", "the loss plot")),
    "export": (("gguf", "writing GGUF files"),),
}
#: what ``--model`` / ``--config`` values need, whatever the command
_GGUF = ("gguf", "reading the default model and other .gguf files")
_YAML = ("yaml", "reading a YAML --config file")


class MissingExtraError(ImportError):
    """An optional package the command needs is not installed; the message names the extra."""


def _option(argv: list[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_extras(command: str, argv: list[str]) -> None:
    """Raise :class:`MissingExtraError` when ``command`` with ``argv`` needs a package that is missing.

    ``train`` (whose default model is a GGUF file) and ``generate``, ``eval``, ``merge`` with
    ``--model`` naming a ``.gguf`` file or ``smollm2`` need ``gguf``, unless the default model's
    conversion is cached already.
    """
    import importlib.util

    needs = list(EXTRA_NEEDS.get(command, ()))
    model = _option(argv, "--model")
    default = command == "train" and model is None  # the others default to the adapter's recorded base
    if default or command in ("train", "generate", "eval", "merge") and model and (model.endswith(".gguf")
                                                                                 or model == "smollm2"):
        if not _cached_default(model):
            needs.append(_GGUF)
    config = _option(argv, "--config") or ""
    if config.endswith((".yaml", ".yml")):
        needs.append(_YAML)
    missing = [(mod, why) for mod, why in needs if importlib.util.find_spec(mod) is None]
    if missing:
        names = ", ".join(f"{mod} ({why})" for mod, why in missing)
        raise MissingExtraError(f"peftkit {command} needs {names}, not installed. Install the extra: "
                                "pip install 'peftkit[train]'")


def _cached_default(model: Optional[str]) -> bool:
    """Whether the model is the default one and its conversion is cached (then gguf is not needed)."""
    if model not in (None, "smollm2"):
        return False
    from . import models

    try:
        return models.cached_conversion(models.default_gguf()) is not None
    except models.ModelLoadError:
        return False  # not installed: resolve() says so with its own message


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
    errors = _user_errors() + (MissingExtraError,)
    try:
        check_extras(args.command, argv)
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
