"""``peftkit generate | eval | merge | inspect``: using an adapter once it is trained.

Each command takes an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
from peftkit or Hugging Face PEFT). The base model is the one recorded in the adapter's config
(``base_model_name_or_path``) unless ``--model`` names another; the ``peftkit.json`` that
``peftkit train`` writes beside the adapter adds the task (causal LM or classification) and the
class labels.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..config import CONFIG_NAME, ConfigError, PeftConfig
from ..core.registry import get_method
from ..io.checkpoint import WEIGHTS_NAME, load_tensors
from ..models import ModelLoadError

META_NAME = "peftkit.json"


def register(subparsers) -> None:
    """Add ``generate``, ``eval``, ``merge`` and ``inspect`` to the CLI."""
    g = subparsers.add_parser("generate", help="continue a prompt (or chat) with a base model + adapter")
    _adapter_args(g)
    g.add_argument("prompt", nargs="?", help="the prompt (rendered with the chat template unless --raw)")
    g.add_argument("--chat", action="store_true", help="interactive chat; an empty line or Ctrl-D quits")
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--base", action="store_true", help="answer with the adapter turned off, for comparison")
    g.set_defaults(func=cmd_generate)

    e = subparsers.add_parser("eval", help="loss / accuracy / exact match of an adapter on a JSON Lines file")
    _adapter_args(e)
    e.add_argument("--data", required=True, help="JSON Lines file in any peftkit train format")
    e.add_argument("--max-length", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--exact-match", action="store_true", help="also generate answers and score exact match")
    e.add_argument("--base", action="store_true", help="evaluate the base model with the adapter off")
    e.set_defaults(func=cmd_eval)

    m = subparsers.add_parser("merge", help="fold the adapter into the base and save a full model")
    _adapter_args(m)
    m.add_argument("--out", required=True, help="folder for the merged model (transformers' format)")
    m.set_defaults(func=cmd_merge)

    i = subparsers.add_parser("inspect", help="describe an adapter folder")
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(func=cmd_inspect)


def _adapter_args(p) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder (peftkit or Hugging Face PEFT)")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--threads", type=int, help="CPU threads")


def read_meta(adapter: str) -> dict:
    """The ``peftkit.json`` beside an adapter, or {} for adapters written elsewhere."""
    path = os.path.join(adapter, META_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_with_adapter(adapter: str, model: Optional[str] = None, threads: Optional[int] = None):
    """(peft_model, tokenizer, meta): the base model with the adapter loaded, in eval mode."""
    from .. import models
    from ..model import PeftModel
    from .loop import set_threads

    set_threads(threads)
    config = PeftConfig.from_pretrained(adapter)
    meta = read_meta(adapter)
    spec = model or meta.get("resolved_model") or config.base_model_name_or_path
    if not spec:
        raise ModelLoadError(f"{adapter}: the adapter does not record its base model; pass --model.")
    path = models.resolve(spec)
    tokenizer = models.load_tokenizer(path)
    labels = meta.get("labels")
    task = "classification" if config.task_type == "SEQ_CLS" else "causal"
    base = models.load_model(path, task, num_labels=len(labels) if labels else None)
    if labels:
        base.config.id2label = {i: name for name, i in labels.items()}
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    return peft_model, tokenizer, meta


def cmd_generate(args) -> int:
    """Print the model's greedy answer to a prompt, or chat interactively."""
    import contextlib

    from .evaluate import generate_batch

    if not args.prompt and not args.chat:
        raise ConfigError("peftkit generate: give a prompt, or --chat for an interactive session.")
    peft_model, tok, _ = load_with_adapter(args.adapter, args.model, args.threads)
    use_template = not args.raw and getattr(tok, "chat_template", None) is not None
    ctx = peft_model.disable_adapter() if args.base else contextlib.nullcontext()
    history: list[dict] = []

    def answer(text: str) -> str:
        if use_template:
            history.append({"role": "user", "content": text})
            text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        reply = generate_batch(peft_model, tok, [text], args.max_new_tokens, chat_rendered=use_template)[0]
        if use_template and args.chat:
            history.append({"role": "assistant", "content": reply})
        elif use_template:
            history.clear()
        return reply

    with ctx:
        if args.prompt:
            print(answer(args.prompt))
        if args.chat:
            while True:
                try:
                    line = input("you> ").strip()
                except EOFError:
                    break
                if not line:
                    break
                print(f"model> {answer(line)}")
    return 0


def cmd_eval(args) -> int:
    """Print (as JSON) the adapter's metrics on a data file."""
    import contextlib

    from . import data as D
    from . import evaluate as E

    peft_model, tok, meta = load_with_adapter(args.adapter, args.model, args.threads)
    records, fmt = D.read_jsonl(args.data)
    labels = meta.get("labels")
    if fmt == "classification":
        if not labels:
            raise D.DataError(f"{args.adapter} has no label list ({META_NAME}); it was not trained for classification.")
        unknown = {str(r["label"]) for r in records} - set(labels)
        if unknown:
            raise D.DataError(f"{args.data}: labels {sorted(unknown)} were not seen in training "
                              f"(known: {sorted(labels)}).")
    dataset, dropped = D.build_dataset(records, fmt, tok, args.max_length, labels)
    ctx = peft_model.disable_adapter() if args.base else contextlib.nullcontext()
    with ctx:
        result = E.loss_and_accuracy(peft_model, dataset, tok.pad_token_id, args.batch_size)
        if args.exact_match:
            prompts, refs = zip(*(E.prompt_of(r, fmt, tok) for r in records))
            replies = E.generate_batch(peft_model, tok, list(prompts), E.answer_tokens(tok, refs),
                                       batch_size=args.batch_size, chat_rendered=fmt == "chat")
            result["exact_match"] = E.exact_match(replies, refs)
    result.update({"examples": len(dataset), "skipped_too_long": dropped, "format": fmt})
    print(json.dumps(result, indent=2))
    return 0


def cmd_merge(args) -> int:
    """Merge the adapter into the base weights and save a plain transformers model."""
    peft_model, tok, _ = load_with_adapter(args.adapter, args.model, args.threads)
    merged = peft_model.merge_and_unload()
    os.makedirs(args.out, exist_ok=True)
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"merged model written to {args.out} (load it with transformers' from_pretrained)")
    return 0


def _site_of(key: str, roots: set[str]) -> str:
    """The module path of a PEFT tensor key: up to the adapter's own part, whose first name is one
    of the method's on-disk ``roots`` (``lora_A``, ``adapter_down``, ``ln_tuning_layers``, ...)."""
    parts = key.removeprefix("base_model.model.").split(".")
    for i, part in enumerate(parts):
        if i and (part in roots or part in ("base_layer", "modules_to_save")):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])  # a parameter of the module itself (a trained head or bias)


def describe(adapter: str) -> dict:
    """Method, targets, parameter count, file size and base model of an adapter folder."""
    config = PeftConfig.from_pretrained(adapter)
    tensors = load_tensors(adapter)
    weights = os.path.join(adapter, WEIGHTS_NAME)
    roots = get_method(config.peft_type).on_disk_roots()
    # host-level tensors (VeRA's shared base_model.vera_A) belong to no site
    sites = sorted({_site_of(k, roots) for k in tensors if k.startswith("base_model.model.")})
    modules = sorted({s.rsplit(".", 1)[-1] for s in sites})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    out = {
        "method": config.peft_type, "task_type": config.task_type,
        "base_model": config.base_model_name_or_path, "target_modules": getattr(config, "target_modules", None),
        "adapted_module_names": modules, "adapted_sites": len(sites),
        "parameters": sum(t.numel() for t in tensors.values()), "tensors": len(tensors), "dtypes": dtypes,
        "size_mb": round(os.path.getsize(weights) / 2**20, 3) if os.path.isfile(weights) else None,
    }
    for key in ("r", "lora_alpha", "use_dora", "use_rslora"):
        if hasattr(config, key):
            out[key] = getattr(config, key)
    meta = read_meta(adapter)
    if meta:
        out["trained_with"] = {k: meta[k] for k in ("model", "task", "format", "labels") if k in meta}
    return out


def cmd_inspect(args) -> int:
    """Print :func:`describe` of an adapter folder."""
    if not os.path.isfile(os.path.join(args.adapter, CONFIG_NAME)):
        raise FileNotFoundError(f"{args.adapter!r} has no {CONFIG_NAME}; expected an adapter folder.")
    info = describe(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0
