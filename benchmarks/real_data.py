"""One epoch on real, ragged instruction data: the usual PEFT pipeline against ``peftkit train``.

    python benchmarks/real_data.py --data ../shared/data/instruct/code_alpaca_2k.json

The first 256 Code Alpaca records train SmolLM2-135M-Instruct with LoRA r=16 (alpha 32) on every
linear layer, batch 8, max length 512, lr 2e-4 (linear decay after 5% warmup, fused AdamW,
clipping at 1.0, seed 0); the next 64 are held out. Each record becomes a chat (user:
instruction and input; assistant: output) rendered by the model's chat template, with the
loss on the assistant turn only. Both sides get the same tokenised examples and thread count:

- ``peft``: ``peft.get_peft_model`` + ``transformers.Trainer`` with per-batch padding
  (``DataCollatorForSeq2Seq``), the way the PEFT and transformers docs train;
- ``peftkit``: ``peftkit train --data ... --eval-data ...`` with its defaults (packed,
  padding-free batches and the chunked loss, see peftkit/train/packing.py and loss.py).

Each side runs in a fresh process, one after the other (order alternates with ``--order``).
Reported per side: training time (``Trainer.train``), real tokens per second (tokens of the
examples, not padding), peak RSS during training (VmHWM reset just before ``train``; the
model's weights are included), and the held-out loss, per target token, computed by the same
function (``peftkit.train.evaluate.loss_and_accuracy``) after training. Results go to
``benchmarks/results/real_data.json``. ``--loss-memory TOKENS`` instead measures the loss
alone: peak memory of the plain and the chunked loss at SmolLM2's head size. The data is read from the shared folder, never copied
into the project (the JSON Lines the CLI reads are written to a temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "instruct", "code_alpaca_2k.json")


def chat_records(path: str, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """The first ``n_train`` and the next ``n_eval`` Code Alpaca records as chat records."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: pass --data pointing at code_alpaca_2k.json "
                         "(../shared/data/instruct/ from the project root; see ../shared/data/README.md).")
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    if len(raw) < n_train + n_eval:
        raise SystemExit(f"{path} has {len(raw)} records; {n_train + n_eval} are needed.")
    out = []
    for r in raw[: n_train + n_eval]:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
    return out[:n_train], out[n_train:]


def write_jsonl(records: list[dict], path: str) -> str:
    """Write ``records`` as JSON Lines to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def _peak_during_train(trainer_cls, into: dict) -> None:
    """Wrap ``trainer_cls.train`` to record the peak RSS of training alone (VmHWM reset first)."""
    original = trainer_cls.train

    def train(self, *a, **k):
        into["peak_before_train_mib"] = common.peak_mib()
        common.reset_peak()
        t, cpu = time.perf_counter(), time.process_time()
        out = original(self, *a, **k)
        into["train_seconds"] = time.perf_counter() - t
        into["train_cpu_seconds"] = time.process_time() - cpu  # less sensitive to other processes
        into["train_peak_mib"] = common.peak_mib()
        return out

    trainer_cls.train = train


def worker_peft(args, train_path: str, eval_path: str) -> dict:
    """The usual pipeline: peft.get_peft_model + transformers.Trainer, batches padded per batch."""
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from peftkit import models
    from peftkit.train import data as D
    from peftkit.train import evaluate as E

    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    path = models.resolve(None, log=lambda *_: None)
    tok = models.load_tokenizer(path)
    train_set, _ = D.build_dataset(D.read_jsonl(train_path)[0], "chat", tok, args.max_length)
    eval_set, _ = D.build_dataset(D.read_jsonl(eval_path)[0], "chat", tok, args.max_length)
    model = models.load_model(path, "causal")
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    before = E.loss_and_accuracy(pm, eval_set, tok.pad_token_id)["loss"]
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    slots = {"n": 0}

    def collate(batch):
        out = pad([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        slots["n"] += out["input_ids"].numel()
        return out

    targs = TrainingArguments(
        output_dir=os.path.join(args.tmp, "peft-run"), per_device_train_batch_size=args.batch,
        num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.05,
        max_grad_norm=1.0, logging_steps=5, save_strategy="no", seed=args.seed, data_seed=args.seed,
        report_to="none", use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, optim="adamw_torch_fused")
    rec: dict = {}
    _peak_during_train(Trainer, rec)
    trainer = Trainer(model=pm, args=targs, train_dataset=train_set, data_collator=collate)
    result = trainer.train()
    after = E.loss_and_accuracy(pm, eval_set, tok.pad_token_id)["loss"]
    tokens = sum(len(e["input_ids"]) for e in train_set)
    return {**rec, "train_loss": result.training_loss, "eval_loss_before": before, "eval_loss": after,
            "steps": trainer.state.global_step, "real_tokens": tokens, "batch_slots": slots["n"],
            "examples": len(train_set), "threads": torch.get_num_threads()}


def worker_peftkit(args, train_path: str, eval_path: str) -> dict:
    """``peftkit train`` with the same settings, in this process (its metrics.json read back)."""
    from peftkit import models
    from peftkit.cli import main
    from peftkit.train import data as D
    from peftkit.train.loop import AdapterTrainer

    rec: dict = {}
    _peak_during_train(AdapterTrainer, rec)
    out_dir = os.path.join(args.tmp, "peftkit-run")
    argv = ["train", "--data", train_path, "--eval-data", eval_path, "--r", str(args.r), "--alpha", str(2 * args.r),
            "--target", "all-linear", "--batch-size", str(args.batch), "--max-length", str(args.max_length),
            "--lr", str(args.lr), "--epochs", "1", "--threads", str(args.threads), "--seed", str(args.seed),
            "--save-every", "100000", "-o", out_dir, *args.peftkit_args]
    code = main(argv)
    if code:
        raise SystemExit(f"peftkit train exited with {code}")
    with open(os.path.join(out_dir, "metrics.json")) as fh:
        m = json.load(fh)
    tok = models.load_tokenizer(models.resolve(None, log=lambda *_: None))
    train_set, _ = D.build_dataset(D.read_jsonl(train_path)[0], "chat", tok, args.max_length)
    return {**rec, "train_loss": m["train_loss"], "eval_loss_before": m["before"]["eval_loss"],
            "eval_loss": m["after"]["eval_loss"], "steps": m["steps"], "batches": m.get("batches"),
            "real_tokens": sum(len(e["input_ids"]) for e in train_set), "examples": len(train_set),
            "threads": args.threads, "argv": argv}


def loss_peak(variant: str, tokens: int, vocab: int = 49152, dim: int = 576) -> dict:
    """Peak RSS above the inputs of one loss forward+backward at SmolLM2's head size, and its time."""
    import torch
    import torch.nn.functional as F

    from peftkit.train.loss import chunked_cross_entropy

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(vocab, dim, generator=g) * 0.02
    h = torch.randn(tokens, dim, generator=g).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    common.reset_peak()
    base = common.peak_mib()
    t = time.perf_counter()
    if variant == "plain":
        loss = F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
    else:
        loss = chunked_cross_entropy(h, w, None, y)
    loss.backward()
    return {"variant": variant, "tokens": tokens, "loss": loss.item(), "seconds": time.perf_counter() - t,
            "peak_above_inputs_mib": common.peak_mib() - base}


def step_rounds(args) -> dict:
    """Interleaved forward+backward of the same random batches: peft padded vs peftkit packed.

    Each round draws 8 training examples, times PEFT's padded step and peftkit's step (packed
    row, per-example attention, chunked loss) in alternating order, one model copy each, and the
    ratio per round is reported as median (min-max): robust to the machine's load changing
    between the two whole-epoch runs.
    """
    import random
    import statistics

    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq

    from peftkit import LoraConfig, get_peft_model, models
    from peftkit.train import data as D
    from peftkit.train.loss import causal_lm_loss_sum, frozen_linear_head, head_bypassed
    from peftkit.train.packing import PackedCollator
    from peftkit.train.varlen import use_packed_attention

    torch.set_num_threads(args.threads)
    path = models.resolve(None, log=lambda *_: None)
    tok = models.load_tokenizer(path)
    train, _ = chat_records(args.data, args.train, args.eval)
    ds, _ = D.build_dataset(train, "chat", tok, args.max_length)
    theirs = peft.get_peft_model(models.load_model(path, "causal"), peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM"))
    ours = get_peft_model(models.load_model(path, "causal"), LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                       target_modules="all-linear"))
    assert use_packed_attention(ours) == "sdpa"
    head = frozen_linear_head(ours.get_base_model())
    theirs.train(), ours.train()
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    rng = random.Random(args.seed)

    def peft_step(exs):
        batch = pad([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs])
        theirs(**batch).loss.backward()
        theirs.zero_grad(set_to_none=True)

    def peftkit_step(exs):
        batch = PackedCollator()(exs)
        labels = batch.pop("labels")
        with head_bypassed(ours, head):
            hidden = ours(**batch).logits
        total, count = causal_lm_loss_sum(hidden, labels, head)
        (total / count).backward()
        ours.zero_grad(set_to_none=True)

    times = {"peft": [], "peftkit": []}
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        exs = [ds[i] for i in rng.sample(range(len(ds)), args.batch)]
        order = [("peft", peft_step), ("peftkit", peftkit_step)][:: 1 if r % 2 else -1]
        for name, fn in order:
            t = time.perf_counter()
            fn(exs)
            if r:
                times[name].append(time.perf_counter() - t)
        if r:
            print(f"  round {r}: peft {times['peft'][-1]:.2f} s, peftkit {times['peftkit'][-1]:.2f} s", flush=True)
    ratios = [a / b for a, b in zip(times["peftkit"], times["peft"])]
    return {"rounds": args.rounds, "peftkit_over_peft_median": statistics.median(ratios),
            "min": min(ratios), "max": max(ratios), "total_peft_s": sum(times["peft"]),
            "total_peftkit_s": sum(times["peftkit"])}


def run_worker(side: str, args) -> dict:
    """Run one side in a fresh process; returns its result dict with the others' CPU share."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--data", args.data,
           "--train", str(args.train), "--eval", str(args.eval), "--threads", str(args.threads),
           "--tmp", args.tmp, "--r", str(args.r), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--lr", str(args.lr), "--seed", str(args.seed)]
    for extra in args.peftkit_args:
        cmd.append(f"--peftkit-arg={extra}")
    import resource

    def child_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    share, cpu0 = common.CpuShare().start(), child_cpu()
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    # CpuShare counts every process but this one, the worker included: take the worker's CPU out
    others = max(0.0, share.stop() - (child_cpu() - cpu0) / (wall * os.cpu_count()))
    if proc.returncode:
        raise SystemExit(f"{side} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res.update(wall_seconds=wall, others_cpu_share=others)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="code_alpaca_2k.json")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default="peft,peftkit", help="comma-separated sides in run order")
    p.add_argument("--peftkit-arg", dest="peftkit_args", action="append", default=[],
                   help="extra argument for peftkit train (repeatable), e.g. --peftkit-arg=--no-packing")
    p.add_argument("--out", default=os.path.join(HERE, "results", "real_data.json"))
    p.add_argument("--loss-memory", type=int, metavar="TOKENS",
                   help="instead: peak memory of the plain vs the chunked loss (forward+backward) for TOKENS "
                        "target tokens at SmolLM2's head size (49152 x 576), each in a fresh process")
    p.add_argument("--steps", type=int, dest="rounds", metavar="ROUNDS",
                   help="instead: ROUNDS interleaved forward+backward steps, peft padded vs peftkit packed, "
                        "in one process (see step_rounds)")
    p.add_argument("--worker", choices=["peft", "peftkit", "plain", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker in ("plain", "chunked"):
        print("RESULT " + json.dumps(loss_peak(args.worker, args.loss_memory)), flush=True)
        return
    if args.rounds:
        share = common.CpuShare().start()
        res = step_rounds(args)
        res["others_cpu_share"] = share.stop()
        print(json.dumps(res, indent=2))
        return
    if args.loss_memory:
        for variant in ("plain", "chunked"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant,
                                  "--loss-memory", str(args.loss_memory)], capture_output=True, text=True, check=True)
            r = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
            print(f"{variant}: {r['tokens']} tokens, loss {r['loss']:.3f}, peak {r['peak_above_inputs_mib']:.0f} MiB "
                  f"above the inputs, {r['seconds']:.2f} s")
        return
    if args.worker:
        train_path, eval_path = os.path.join(args.tmp, "train.jsonl"), os.path.join(args.tmp, "eval.jsonl")
        fn = worker_peft if args.worker == "peft" else worker_peftkit
        print("RESULT " + json.dumps(fn(args, train_path, eval_path)), flush=True)
        return
    train, held = chat_records(args.data, args.train, args.eval)
    with tempfile.TemporaryDirectory(prefix="real_data_") as tmp:
        args.tmp = tmp
        write_jsonl(train, os.path.join(tmp, "train.jsonl"))
        write_jsonl(held, os.path.join(tmp, "eval.jsonl"))
        results = {}
        for side in args.order.split(","):
            print(f"running {side} ...", flush=True)
            results[side] = run_worker(side, args)
            r = results[side]
            print(f"  {side}: train {r['train_seconds']:.1f} s, {r['real_tokens'] / r['train_seconds']:.0f} real tokens/s, "
                  f"training peak RSS {r['train_peak_mib']:.0f} MiB, held-out loss {r['eval_loss']:.4f} "
                  f"(before {r['eval_loss_before']:.4f}), others' CPU {r['others_cpu_share']:.0%}", flush=True)
    out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    if set(results) == {"peft", "peftkit"}:
        out["summary"] = summarise(results)
        print(json.dumps(out["summary"], indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as fh:
        json.dump(out, fh, indent=2)
    os.replace(tmp_out, args.out)


def summarise(results: dict) -> dict:
    """Ratios and the issue's targets from both sides' results."""
    a, b = results["peftkit"], results["peft"]
    summary = {
        "time_ratio_peftkit_over_peft": a["train_seconds"] / b["train_seconds"],
        "tokens_per_s": {k: v["real_tokens"] / v["train_seconds"] for k, v in results.items()},
        "train_peak_mib": {k: v["train_peak_mib"] for k, v in results.items()},
        "eval_loss": {k: v["eval_loss"] for k, v in results.items()},
        "eval_loss_delta_peftkit_minus_peft": a["eval_loss"] - b["eval_loss"],
        "padding_share_peft": 1 - b["real_tokens"] / b["batch_slots"],
    }
    summary["targets_met"] = {"time<=0.5x": summary["time_ratio_peftkit_over_peft"] <= 0.5,
                              "loss<=peft+0.02": summary["eval_loss_delta_peftkit_minus_peft"] <= 0.02,
                              "peak lower": a["train_peak_mib"] < b["train_peak_mib"]}
    return summary


if __name__ == "__main__":
    main()
