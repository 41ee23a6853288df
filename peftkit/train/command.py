"""``peftkit train``: fine-tune a model with an adapter, from the command line.

With no arguments it runs the built-in demonstration: SmolLM2-135M-Instruct learns to turn
customer orders into fixed-format JSON (:mod:`peftkit.train.task`), scored by exact match on a
held-out split before and after training. With ``--data`` it trains on the user's JSON Lines
file (:mod:`peftkit.train.data`). Either way the run folder receives ``adapter/`` (the adapter in
Hugging Face PEFT's format), ``checkpoints/`` (resumable), ``loss.png`` and ``metrics.json``.

Under ``torchrun --nproc_per_node N`` the same command trains with DDP; evaluation and saving
happen on rank 0, and every rank's final adapter digest is recorded so that a divergence shows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time

from ..io.checkpoint import atomic_write_text
from . import data as D
from . import evaluate as E
from . import task as T
from .options import add_train_arguments, deepspeed_config, method_config, parse_train_args

META_NAME = "peftkit.json"


def register(subparsers) -> None:
    """Add ``peftkit train`` to the CLI."""
    p = subparsers.add_parser("train", help="fine-tune a model with an adapter (no arguments: the built-in demo)",
                              description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=run, parse=parse_train_args)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _log(*a) -> None:
    if _rank() == 0:
        print(*a, flush=True)


def adapter_digest(peft_model) -> str:
    """SHA-256 over the adapter's tensors (names and bytes), to compare ranks or runs."""
    h = hashlib.sha256()
    for k, v in sorted(peft_model.get_adapter_state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def latest_checkpoint(folder: str):
    """The newest *complete* checkpoint in ``folder`` (None if there is none).

    Trainer writes ``trainer_state.json`` last, so a folder without it is what a kill during a
    save left behind; resuming from it would lose the optimizer or RNG state.
    """
    if not os.path.isdir(folder):
        return None
    done = [d for d in os.listdir(folder) if d.startswith("checkpoint-") and d[11:].isdigit()
            and os.path.isfile(os.path.join(folder, d, "trainer_state.json"))]
    return os.path.join(folder, max(done, key=lambda d: int(d[11:]))) if done else None


def _folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def _load_data(args, tokenizer):
    """Train/eval datasets, the records kept for generation, the format and the label map."""
    if args.data is None:
        train_recs, eval_recs = T.generate(args.train_size, args.eval_size, seed=args.seed)
        fmt = "chat"
    else:
        train_recs, fmt = D.read_jsonl(args.data)
        if args.eval_data:
            eval_recs, efmt = D.read_jsonl(args.eval_data)
            if efmt != fmt:
                raise D.DataError(f"--eval-data is in the {efmt!r} format but --data in the {fmt!r} format.")
        elif args.eval_fraction > 0:
            if not 0 < args.eval_fraction < 1:
                raise D.DataError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}.")
            shuffled = list(train_recs)
            random.Random(args.seed).shuffle(shuffled)
            n = max(1, int(len(shuffled) * args.eval_fraction))
            eval_recs, train_recs = shuffled[:n], shuffled[n:]
        else:
            eval_recs = []
    labels = D.label_map(train_recs + eval_recs) if fmt == "classification" else None
    train_set, dropped = D.build_dataset(train_recs, fmt, tokenizer, args.max_length, labels)
    if dropped:
        _log(f"note: {dropped} training examples had no answer token left within --max-length "
             f"{args.max_length} and were skipped")
    if not len(train_set):
        raise D.DataError("No training example is left after tokenisation; raise --max-length.")
    eval_set = D.build_dataset(eval_recs, fmt, tokenizer, args.max_length, labels)[0] if eval_recs else None
    return train_set, eval_set, eval_recs, fmt, labels


def _evaluate(peft_model, tokenizer, args, eval_set, eval_recs, fmt, use_adapter: bool) -> dict:
    """The run's metrics on the held-out split (exact match where answers are generated)."""
    import contextlib

    ctx = contextlib.nullcontext() if use_adapter else peft_model.disable_adapter()
    out: dict = {}
    with ctx:
        if args.data is None or (args.exact_match and fmt in ("chat", "completion")):
            prompts, refs = zip(*(E.prompt_of(r, fmt, tokenizer) for r in eval_recs))
            replies = E.generate_batch(peft_model, tokenizer, list(prompts), E.answer_tokens(tokenizer, refs),
                                       chat_rendered=fmt == "chat", progress="generating")
            if args.data is None:
                out["exact_match"] = T.score(replies, [r["target"] for r in eval_recs])
            else:
                out["exact_match"] = E.exact_match(replies, refs)
            out["example_reply"] = replies[0]
        if eval_set is not None and args.data is not None:
            out.update({f"eval_{k}": v for k, v in E.loss_and_accuracy(peft_model, eval_set, tokenizer.pad_token_id).items()})
    return out


def _plot(plot_losses, log_history, path: str, method: str):
    """The loss curve, written last: a failure (no matplotlib, a full disk) is a warning, never a lost run."""
    try:
        return plot_losses(log_history, path, title=f"peftkit train ({method})")
    except Exception as e:  # the adapter and metrics.json are already written
        _log(f"warning: loss.png not written ({type(e).__name__}: {e}); the adapter and metrics.json are. "
             "For the plot: pip install 'peftkit[train]'")
        return None


def _headline(metrics: dict) -> str:
    for key in ("exact_match", "eval_accuracy"):
        if key in metrics:
            return f"{key} {100 * metrics[key]:.1f}%"
    if "eval_loss" in metrics:
        return f"eval loss {metrics['eval_loss']:.4f}"
    return "(no eval data)"


def run(args) -> int:
    """Run ``peftkit train`` with parsed ``args``; returns the exit code."""
    import torch
    from transformers import TrainingArguments, set_seed

    from .. import models
    from ..model import get_peft_model
    from .loop import enable_checkpointing, make_trainer, plot_losses, set_threads

    from ..quant.half import HALF_MODES

    t0 = time.time()
    if (getattr(args, "quantize", None) not in (None, *HALF_MODES)  # bitsandbytes modes only
            and not getattr(args, "malloc_defaults", False)):
        # before any tensor exists: a quantised base fragments glibc's heap (see alloc.py)
        from .alloc import limit_heap_fragmentation

        heap = limit_heap_fragmentation()
        _log("malloc: mmap threshold fixed at 128 KiB for the quantised base" if heap == "set"
             else f"malloc: left as is ({heap})")
    args.threads = set_threads(args.threads)  # fixed for the run, so every phase uses the same count
    set_seed(args.seed)
    default = args.data is None
    if default:
        _log("peftkit train: built-in demo - SmolLM2-135M-Instruct learns to write customer orders as JSON.\n"
             "(Pass --data file.jsonl to train on your own data; see `peftkit train --help`.)")
        for key, value in (("r", 8), ("alpha", 16), ("target", "all-linear"), ("lr", 2e-3)):
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.lr is None:
        args.lr = 2e-4
    path = models.resolve(args.model, log=_log)
    tokenizer = models.load_tokenizer(path)
    train_set, eval_set, eval_recs, fmt, labels = _load_data(args, tokenizer)
    task = "classification" if fmt == "classification" else "causal"
    model = models.load_model(path, task, num_labels=len(labels) if labels else None, dtype=args.dtype)
    if getattr(args, "quantize", None):
        from ..quant import prepare_model_for_kbit_training, quantize_model

        quantize_model(model, args.quantize)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if labels:
        model.config.id2label = {i: str(name) for name, i in labels.items()}
        model.config.label2id = {str(name): i for name, i in labels.items()}
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classification pools at the last non-pad token
    config = method_config(args, "SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    _log(f"model {path} ({args.threads} CPU threads)\nmethod {args.method}: trainable params {trainable:,d} of {total:,d} "
         f"({100 * trainable / total:.3f}%)\ndata: {len(train_set)} training examples ({fmt} format), "
         f"{len(eval_recs)} held out")
    if args.gradient_checkpointing:
        enable_checkpointing(peft_model)

    out_dir = os.path.abspath(args.output)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    before = {}
    if _rank() == 0 and eval_recs and not args.resume:
        _log("evaluating the base model (adapter off) ...")
        before = _evaluate(peft_model, tokenizer, args, eval_set, eval_recs, fmt, use_adapter=False)
        _log(f"before: {_headline(before)}" + (f"\n  e.g. {before['example_reply']!r}" if "example_reply" in before else ""))

    from .loss import chunk_rows
    from .packing import plan_batches

    plan = plan_batches(peft_model, train_set, tokenizer.pad_token_id, task == "causal",
                        packing=getattr(args, "packing", True), group_by_length=getattr(args, "group_by_length", False),
                        loss_chunk=getattr(args, "loss_chunk", -1), deepspeed=bool(getattr(args, "deepspeed", None)))
    for note in plan.notes:
        _log(f"note: {note}")
    if getattr(config, "init_lora_weights", None) == "eva":  # EVA: A from the training data's activations
        from ..methods.lora.eva import initialize_lora_eva_weights

        initialize_lora_eva_weights(peft_model, torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, collate_fn=plan.collator), show_progress_bar=False)
        _log(f"EVA: ranks {peft_model.peft_config['default'].rank_pattern or 'unchanged'}")
    rows = (args.loss_chunk if getattr(args, "loss_chunk", -1) > 0 else chunk_rows(plan.loss_head.out_features)) if plan.loss_head else None
    _log("batches: " + ("packed, padding-free" + (", attention example by example" if plan.attention_before else "")
                        if plan.packed else "padded" + (", grouped by length" if plan.group_by_length else ""))
         + (f"; loss in chunks of {rows} tokens" if rows else ""))

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    warm = int(args.warmup) if args.warmup >= 1 else float(args.warmup)
    targs = TrainingArguments(
        output_dir=ckpt_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type=args.scheduler, warmup_steps=warm, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or 0.0, logging_steps=args.log_every, save_strategy="steps",
        save_steps=args.save_every, save_total_limit=args.keep_checkpoints, seed=args.seed, data_seed=args.seed,
        eval_strategy="steps" if args.eval_every and eval_set is not None else "no",
        eval_steps=args.eval_every or None, report_to="none", use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None, remove_unused_columns=False,
        label_names=["labels"], dataloader_num_workers=0, disable_tqdm=False, logging_first_step=True,
        ddp_find_unused_parameters=False, save_only_model=False, deepspeed=deepspeed_config(args),
        optim=getattr(args, "trainer_optim", "adamw_torch_fused"),  # --optim, checked in options._checked
        train_sampling_strategy="group_by_length" if plan.group_by_length else "random",
    )
    set_threads(args.threads)  # accelerate resets the thread count when it starts a process group
    trainer = make_trainer(peft_model, targs, train_set, eval_set, plan.collator,
                           seq_loss=task == "causal", loss_head=plan.loss_head, loss_rows=rows)
    from .optim import build_optimizer  # --optim loraplus / lorafa: built here, scheduled by Trainer

    trainer.optimizer = build_optimizer(args.optim, peft_model, args.lr, args.weight_decay,
                                        getattr(args, "loraplus_ratio", 16.0))
    resume = args.resume
    if resume == "latest":
        resume = latest_checkpoint(ckpt_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume.")
    if resume:
        _log(f"resuming from {resume}")
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t_train
    from .varlen import restore_attention

    restore_attention(peft_model, plan.attention_before)  # evaluation and generation as the model came

    digests = [adapter_digest(peft_model)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, adapter_digest(peft_model))
    if _rank() != 0:
        return 0

    adapter_dir = os.path.join(out_dir, "adapter")
    peft_model.save_pretrained(adapter_dir)
    meta = {"model": args.model or models.DEFAULT_MODEL, "resolved_model": path, "task": task, "format": fmt,
            "method": args.method, "labels": labels,
            "saved_by_rank": _rank()}
    atomic_write_text(os.path.join(adapter_dir, META_NAME), json.dumps(meta, indent=2) + "\n")
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    after = _evaluate(peft_model, tokenizer, args, eval_set, eval_recs, fmt, use_adapter=True) if eval_recs else {}
    metrics = {
        "before": before, "after": after, "train_loss": result.training_loss,
        "steps": trainer.state.global_step, "train_seconds": round(train_s, 1),
        "batches": {"packed": plan.packed, "group_by_length": plan.group_by_length, "loss_chunk_rows": rows,
                    "packed_attention": bool(plan.attention_before)},
        "total_seconds": round(time.time() - t0, 1), "trainable_params": trainable, "total_params": total,
        "adapter_mb": round(_folder_mb(adapter_dir), 3), "world_size": len(digests), "rank_digests": digests,
        "ranks_agree": len(set(digests)) == 1, "log_history": trainer.state.log_history,
    }
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2, default=str) + "\n")
    png = _plot(plot_losses, trainer.state.log_history, os.path.join(out_dir, "loss.png"), args.method)
    _log("\n=== summary ===")
    _log(f"{_headline(before) if before else 'before: (resumed run, not measured)'} -> {_headline(after)}"
         if after else "no held-out data: pass --eval-data or --eval-fraction to measure")
    if "example_reply" in after:
        _log(f"  e.g. {after['example_reply']!r}")
    _log(f"adapter: {adapter_dir} ({metrics['adapter_mb']:.2f} MB)")
    _log(f"loss curve: {png or '(no loss logged yet; lower --log-every)'}\nmetrics: {os.path.join(out_dir, 'metrics.json')}")
    _log(f"time: {metrics['total_seconds']:.0f} s total, {train_s:.0f} s training ({trainer.state.global_step} steps)")
    if not metrics["ranks_agree"]:
        _log("WARNING: the ranks ended with different adapters: " + ", ".join(digests))
        return 1
    return 0
