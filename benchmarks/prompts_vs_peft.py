"""peftkit vs Hugging Face PEFT for the prompt methods, side by side in one process.

    python benchmarks/prompts_vs_peft.py --model tiny --rounds 5
    python benchmarks/prompts_vs_peft.py --model smollm2 --rounds 3 --out bench_prompts.md

Methods (as in ../shared/BASELINES.md): prompt tuning 20 tokens, p-tuning 20 tokens (MLP),
prefix tuning 20 tokens, adaption prompt (adapter_len 10, top 2 layers). Measures the training
step (forward + backward + AdamW) over the frozen lower bound, peak RSS per configuration in a
fresh process, and generate() tokens/s for 32 new tokens at batch 1. Ratios are medians (min-max)
of per-round ratios with rotating order; the other processes' CPU share is recorded. Nothing here
is asserted.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

METHODS = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=20)),
    "ptuning": ("PromptEncoderConfig", dict(num_virtual_tokens=20, encoder_hidden_size=128)),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=20)),
    "adaption": ("AdaptionPromptConfig", dict(adapter_len=10, adapter_layers=2)),
}
LABELS = {"prompt": "prompt tuning 20", "ptuning": "p-tuning 20 (MLP 128)", "prefix": "prefix tuning 20",
          "adaption": "adaption prompt (len 10, top 2)"}


def wrap(lib: str, base, method: str):
    """``method``'s adapter from peftkit or peft on ``base``."""
    import peft
    import peftkit

    L = peftkit if lib == "peftkit" else peft
    cls, kw = METHODS[method]
    return L.get_peft_model(base, getattr(L, cls)(task_type="CAUSAL_LM", **kw))


def make_variant(name: str, base):
    """'lower' (frozen model, gradients through activations) or '<lib>_<method>' with AdamW."""
    if name == "lower":
        base.requires_grad_(False)
        base.enable_input_require_grads()
        base.train()
        return base, None
    lib, method = name.split("_")
    m = wrap(lib, base, method)
    m.train()
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)


def memory_child(args) -> None:
    """In a fresh process: one variant, VmHWM reset after set-up, three steps, print the peak."""
    torch.set_num_threads(args.threads)
    base = common.load_base(args.model)
    model, opt = make_variant(args.memory_child, base)
    common.print_peak_of(common.train_step(model, common.batch_for(base, args.batch, args.seq), opt))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: train memory generate")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    base = common.load_base(args.model)
    batch = common.batch_for(base, args.batch, args.seq)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[tuple[str, str, str]] = []
    shares_all: list[float] = []
    variants = ["lower"] + [f"{lib}_{m}" for m in args.methods for lib in ("peftkit", "peft")]

    if "train" not in args.skip:
        log("training step")
        built = {n: make_variant(n, copy.deepcopy(base)) for n in variants}
        fns = {n: common.train_step(m, batch, o) for n, (m, o) in built.items()}
        for f in fns.values():
            f()
        times, shares = common.interleave(fns, args.rounds, "lower", log=log)
        shares_all += shares
        for m in args.methods:
            rows.append((f"train step / lower bound, {LABELS[m]}", common.ratio_summary(times, f"peftkit_{m}", "lower"),
                         common.ratio_summary(times, f"peft_{m}", "lower")))
            rows.append((f"train step peftkit / peft, {LABELS[m]}",
                         common.ratio_summary(times, f"peftkit_{m}", f"peft_{m}"), ""))
        rows.append((f"lower bound step {args.batch}x{args.seq} (s)", f"{statistics.median(times['lower']):.3f}", ""))
        del built, fns

    if "memory" not in args.skip:
        log("peak memory (fresh process each)")
        here = os.path.abspath(__file__)
        peaks = {}
        for n in variants:
            common.wait_quiet()
            peaks[n] = common.peak_rss_child([here, "--model", args.model, "--threads", str(args.threads),
                                              "--batch", str(args.batch), "--seq", str(args.seq),
                                              "--memory-child", n])
            log(f"  {n}: {peaks[n]:.0f} MiB")
        rows.append(("peak RSS MiB, lower bound", f"{peaks['lower']:.0f}", ""))
        for m in args.methods:
            rows.append((f"peak RSS MiB, {LABELS[m]}", f"{peaks['peftkit_' + m]:.0f}", f"{peaks['peft_' + m]:.0f}"))

    if "generate" not in args.skip:
        log("generate 32 tokens, batch 1")
        prompt = common.batch_for(base, 1, 16, seed=1)
        models = {"base": copy.deepcopy(base).eval()}
        for n in variants[1:]:
            lib, m = n.split("_")
            models[n] = wrap(lib, copy.deepcopy(base), m).eval()
            with torch.no_grad():  # adaption gates start at zero; make every adapter do real work
                for name, q in models[n].named_parameters():
                    if q.requires_grad and "adaption_gate" in name:
                        q.fill_(0.1)

        def gen(model):
            def f():
                with torch.no_grad():
                    model.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            return f
        fns = {n: gen(m) for n, m in models.items()}
        for f in fns.values():
            f()
        times, shares = common.interleave(fns, args.rounds, "base", log=log)
        shares_all += shares
        for m in args.methods:
            rows.append((f"generate tokens/s, {LABELS[m]}", f"{32 / statistics.median(times['peftkit_' + m]):.1f}",
                         f"{32 / statistics.median(times['peft_' + m]):.1f}"))
            rows.append((f"generate time peftkit / peft, {LABELS[m]}",
                         common.ratio_summary(times, f"peftkit_{m}", f"peft_{m}"), ""))
        rows.append(("base generate tokens/s", f"{32 / statistics.median(times['base']):.1f}", ""))

    table = ["| what | peftkit | peft 0.21.2 |", "| --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if shares_all:
        table.append(f"| other processes' CPU share during timed rounds | median {statistics.median(shares_all):.0%}, "
                     f"max {max(shares_all):.0%} | |")
    text = "\n".join(table)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
