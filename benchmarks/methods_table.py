"""The survey's comparison table on a real model: SmolLM2-135M fine-tuned on E2E NLG.

For each method at its usual settings: trainable parameters (count, %), adapter file size, peak
training memory, training step time, no-grad inference time unmerged / merged relative to the
base model (same process, interleaved), and corpus BLEU on a fixed validation subset after the
same short training budget. Each method runs in a fresh worker process so that its peak memory
(VmHWM, reset after set-up as in ../shared/BASELINES.md) is its own.

    .venv/bin/python benchmarks/methods_table.py --data ../shared/data/e2e_nlg --steps 40 --out table.md

BLEU: corpus BLEU-4 (Papineni et al. 2002) over all references of each meaning representation,
lower-cased whitespace tokens of the (already Moses-tokenised) E2E text, brevity penalty against
the closest reference length; greedy decoding. It follows the E2E metrics script's definition
but is a small reimplementation, so compare methods with each other, not with the papers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

METHODS = {  # name -> (config expression, learning rate); "usual settings" for a ~135M Llama
    "lora_r8_qv": ("LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])", 2e-3),
    "ia3": ("IA3Config()", 1e-2),
    "loha_r8_qv": ("LoHaConfig(r=8, alpha=16, target_modules=['q_proj', 'v_proj'])", 2e-3),
    "lokr_r8_qv": ("LoKrConfig(r=8, alpha=16, target_modules=['q_proj', 'v_proj'])", 2e-3),
    "vera_r256_qv": ("VeraConfig(r=256, target_modules=['q_proj', 'v_proj'])", 1e-2),
    "adalora_12to8_qv": ("AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, tinit=STEPS//5, tfinal=STEPS//5, "
                         "total_step=STEPS, target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM')", 2e-3),
    "ln_tuning": ("LNTuningConfig()", 2e-3),
    "houlsby_m36": ("BottleneckConfig(adapter_type='houlsby', reduction_factor=16)", 2e-3),
    "pfeiffer_m36": ("BottleneckConfig(adapter_type='pfeiffer', reduction_factor=16)", 2e-3),
    "parallel_m36_s4": ("BottleneckConfig(adapter_type='parallel', reduction_factor=16, scaling=4.0)", 2e-3),
    "mam_prefix10_par": ("mam:num_virtual_tokens=10,bottleneck_size=36", 2e-3),
}


# ----- data and BLEU -------------------------------------------------------------------------
def load_e2e(folder: str, n_train: int, n_valid: int):
    """(train pairs, [(mr, [refs])]) from the E2E folder; clear error when it is absent."""
    need = ["train.txt", "valid_unique_mrs.txt", "valid_references_e2e_metrics.txt"]
    missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise SystemExit(f"E2E data not found: {folder!r} lacks {missing}. Pass --data pointing at the "
                         "e2e_nlg folder of ../shared/data (see its README).")
    with open(os.path.join(folder, "train.txt"), encoding="utf-8") as f:
        pairs = [line.rstrip("\n").split("||", 1) for line in f if "||" in line]
    import random
    random.Random(0).shuffle(pairs)
    with open(os.path.join(folder, "valid_unique_mrs.txt"), encoding="utf-8") as f:
        mrs = [line.strip() for line in f if line.strip()]
    with open(os.path.join(folder, "valid_references_e2e_metrics.txt"), encoding="utf-8") as f:
        groups = [g.strip().split("\n") for g in f.read().strip().split("\n\n")]
    if len(groups) != len(mrs):
        raise SystemExit(f"{folder}: {len(mrs)} unique MRs but {len(groups)} reference groups.")
    return [(m.strip(), r.strip()) for m, r in pairs[:n_train]], list(zip(mrs, groups))[:n_valid]


def greedy_outputs(model, tok, valid, new_tokens: int) -> list[str]:
    """Greedy first lines generated for each validation meaning representation (left padding)."""
    import torch

    tok.padding_side = "left"
    hyps = []
    with torch.no_grad():
        for i in range(0, len(valid), 8):
            enc = tok([f"{mr} ||" for mr, _ in valid[i:i + 8]], return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                hyps.append(tok.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
    return hyps


def corpus_bleu(hyps: list[str], refs: list[list[str]], n: int = 4) -> float:
    """Corpus BLEU-n in [0, 100] with multiple references per hypothesis."""
    match, total = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        h = hyp.lower().split()
        rs = [r.lower().split() for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            hc = Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
            maxref: Counter = Counter()
            for r in rs:
                for g, c in Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1)).items():
                    maxref[g] = max(maxref[g], c)
            match[k - 1] += sum(min(c, maxref[g]) for g, c in hc.items())
            total[k - 1] += max(len(h) - k + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return 100 * bp * math.exp(log_p)


# ----- one method, in its own process ----------------------------------------------------------
def _build(name: str, base, steps: int):
    import peftkit
    from peftkit.methods.hybrids import mam_adapter

    expr, _ = METHODS[name]
    if expr.startswith("mam:"):
        kw = dict(kv.split("=") for kv in expr[4:].split(","))
        return mam_adapter(base, **{k: int(v) for k, v in kw.items()})
    return peftkit.get_peft_model(base, eval(expr.replace("STEPS", str(steps)), vars(peftkit)))


def worker(args) -> dict:
    import torch

    from common import CpuShare
    from peftkit.models import load_model, load_tokenizer, resolve

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = resolve(args.model, log=lambda *a: None)
    tok = load_tokenizer(path)
    tok.padding_side = "right"  # labels below mask the prompt from the left
    base = load_model(path)
    train, valid = load_e2e(args.data, args.steps * args.batch, args.valid)
    model = _build(args.worker, base, args.steps) if args.worker != "base" else None
    eos = tok.eos_token

    def batch_of(pairs):
        prompts = [f"{mr} ||" for mr, _ in pairs]
        texts = [f"{p} {ref}{eos}" for p, (_, ref) in zip(prompts, pairs)]
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        for i, p in enumerate(prompts):
            labels[i, : len(tok(p)["input_ids"])] = -100
        labels[enc["attention_mask"] == 0] = -100
        return {**enc, "labels": labels}

    out = {"method": args.worker}
    net = model if model is not None else base
    if model is not None:
        t, a = model.get_nb_trainable_parameters()
        out.update(trainable=t, total=a)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=METHODS[args.worker][1], weight_decay=0.0)
        model.train()
        common.reset_peak()
        times, cpu = [], CpuShare().start()
        for step in range(args.steps):
            b = batch_of(train[step * args.batch:(step + 1) * args.batch])
            t0 = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            if "adalora" in args.worker:
                model.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        out.update(peak_train_mib=common.peak_mib(), step_s=statistics.median(times[2:] or times),
                   final_loss=float(loss), train_cpu_others=cpu.stop())
        model.eval()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            out["file_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d)
                                    for f in fs if f.endswith(".safetensors"))
        out.update(_inference_ratios(model, tok, valid, args))
    net.eval()
    hyps = greedy_outputs(net, tok, valid, args.new_tokens)
    out["bleu"] = corpus_bleu(hyps, [refs for _, refs in valid])
    out["sample"] = hyps[0] if hyps else ""
    return out


def _inference_ratios(model, tok, valid, args) -> dict:
    """No-grad forward time of unmerged / merged adapters over the base, interleaved rounds."""
    import torch

    from common import interleave

    enc = tok([f"{mr} ||" for mr, _ in valid[:4]], return_tensors="pt", padding="max_length", max_length=64,
              truncation=True)
    enc = {k: v for k, v in enc.items()}
    layer_model = getattr(model, "layers", model)  # HybridModel: merge its layer part

    def run():
        with torch.no_grad():
            model(**enc)

    def run_base():
        with torch.no_grad(), layer_model.disable_adapter():
            layer_model.get_base_model()(**enc)

    variants = {"base": run_base, "unmerged": run}
    times, _ = interleave(variants, rounds=args.rounds, ref="base", quiet=args.quiet, log=lambda *a: None)
    res = {"unmerged_x": statistics.median(u / b for u, b in zip(times["unmerged"], times["base"]))}
    try:
        layer_model.merge_adapter()
    except TypeError:
        res["merged_x"] = None  # the method cannot merge
        return res
    times, _ = interleave({"base": run_base, "merged": run}, rounds=args.rounds, ref="base", quiet=args.quiet,
                          log=lambda *a: None)
    res["merged_x"] = statistics.median(m / b for m, b in zip(times["merged"], times["base"]))
    layer_model.unmerge_adapter()
    return res


# ----- driver ----------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = ("| method | trainable (%) | file | peak train RSS | step | unmerged / base | merged / base | "
            "BLEU | final loss |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |||||||")
            continue
        if "trainable" not in r:
            lines.append(f"| {r['method']} (no training) | 0 | - | - | - | - | - | {r['bleu']:.1f} | - |")
            continue
        merged = "not mergeable" if r.get("merged_x") is None else f"{r['merged_x']:.2f}x"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.3f}%) | "
            f"{r['file_bytes'] / 1e6:.2f} MB | {r['peak_train_mib']:,.0f} MiB | {r['step_s']:.2f} s | "
            f"{r['unmerged_x']:.2f}x | {merged} | {r['bleu']:.1f} | {r['final_loss']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "e2e_nlg"))
    p.add_argument("--model", default=None, help="model folder / .gguf / hub id (default: SmolLM2-135M GGUF)")
    p.add_argument("--methods", default=",".join(["base", *METHODS]))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--valid", type=int, default=32, help="unique validation MRs scored")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", type=float, default=1.01,
                   help="wait (up to 60 s) per timing round until others use less than this CPU share; "
                        "the default never waits")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    load_e2e(args.data, 1, 1)  # fail early and clearly when the data is absent
    rows = []
    for name in args.methods.split(","):
        if name != "base" and name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from base, {', '.join(METHODS)}")
        cmd = [sys.executable, __file__, "--worker", name] + [a for a in sys.argv[1:] if a != "--worker"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        res = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if res is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            res = {"method": name, "error": err[:120]}
        res["wall_s"] = round(time.time() - t0)
        rows.append(res)
        print(f"{name}: {json.dumps(res)}", flush=True)
        if args.out:  # after every method, so a long run that is stopped still leaves a table
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
