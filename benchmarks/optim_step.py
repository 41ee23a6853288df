"""Optimizer step time for a LoRA adapter's tensors: AdamW's per-tensor loop, foreach, and fused.

    python benchmarks/optim_step.py --model smollm2 --rounds 9

``peftkit train --optim adamw`` uses torch's fused AdamW (Trainer's ``adamw_torch_fused``). A
LoRA adapter is hundreds of small tensors (420 for r=16 on every linear layer of SmolLM2), so the
per-tensor loop of the default AdamW is dominated by per-operation overhead. This times one
``step()`` of each variant over the trainable tensors of a real adapter (random gradients), in
interleaved rounds, and prints medians (min-max). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from peftkit import LoraConfig, get_peft_model

    model = get_peft_model(common.load_base(args.model), LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                    target_modules="all-linear"))
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    variants = {"loop (AdamW default on CPU)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {}
    for name, kw in variants.items():
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        for q in params:
            q.grad = torch.randn_like(q)
        opts[name] = torch.optim.AdamW(params, lr=1e-4, **kw)
        for _ in range(3):
            opts[name].step()
    times: dict[str, list[float]] = {n: [] for n in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    n = sum(s.numel() for s in shapes)
    print(f"AdamW step over {len(shapes)} LoRA r={args.r} all-linear tensors ({n / 1e6:.2f}M values) of "
          f"{args.model}, {args.threads} threads, {args.rounds} rounds\n")
    print("| variant | step (ms), median (min-max) | / fused |")
    print("| --- | --- | --- |")
    fused = statistics.median(times["fused"])
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} ({1e3 * min(ts):.1f}-{1e3 * max(ts):.1f}) | "
              f"{statistics.median(ts) / fused:.2f}x |")


if __name__ == "__main__":
    main()
