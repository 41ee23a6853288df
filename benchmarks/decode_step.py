"""One decode step (a one-token forward) with LoRA r=16 on every linear layer, against the base.

    python benchmarks/decode_step.py --model smollm2 --rounds 30

generate() at batch 1 is a loop of one-token forwards, so its overhead over the base model is
this step's. Timing the step alone, many times, in interleaved rounds, resolves it better than
timing whole generate() calls. Variants: the base model; peftkit with the adapter unmerged
(``get_peft_model``, modules); the same adapter saved and loaded for inference (packed,
peftkit/core/packed.py); merged (``merge_adapter``); and Hugging Face PEFT unmerged. Ratios are
medians (min-max) of per-round ratios; nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from lora_vs_peft import _randomise, wrap  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=5, help="one-token forwards per timed call")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit import PeftModel

    base = common.load_base(args.model).eval()
    unmerged = wrap("peftkit", copy.deepcopy(base), "all", 0.0).eval()
    _randomise(unmerged)
    theirs = wrap("peft", copy.deepcopy(base), "all", 0.0).eval()
    _randomise(theirs)
    with tempfile.TemporaryDirectory() as tmp:
        unmerged.save_pretrained(tmp)
        packed = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp, packed=False).eval()
    merged.merge_adapter()
    ids = torch.tensor([[5]])

    def step(m):
        def f():
            with torch.no_grad():
                for _ in range(args.steps):
                    m(input_ids=ids)
        return f

    fns = {"base": step(base), "unmerged": step(unmerged), "packed": step(packed), "merged": step(merged),
           "peft": step(theirs)}
    for f in fns.values():
        f()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    times, shares = common.interleave(fns, args.rounds, "base", log=log)
    print(f"One-token forward, LoRA r16 all-linear, {args.model}, {args.threads} threads, {args.rounds} rounds of "
          f"{args.steps} steps (others' CPU median {statistics.median(shares):.0%}); base step "
          f"{1000 * statistics.median(times['base']) / args.steps:.1f} ms\n")
    print("| variant / base | ratio |\n| --- | --- |")
    for name in ("unmerged", "packed", "merged", "peft"):
        print(f"| {name} | {common.ratio_summary(times, name, 'base')} |")


if __name__ == "__main__":
    main()
