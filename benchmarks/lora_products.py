"""What LoRA's products cost in one training step, against the base layers' forward products.

    python benchmarks/lora_products.py            # SmolLM2-135M's shapes, batch 4 x 128, r=16

For every linear layer of one SmolLM2 decoder layer this times, at 2 threads, each matrix
product that LoRA adds to a training step (forward ``A x`` and ``y += s B h``; backward ``dB``,
``dh``, ``dA``, ``dx`` and the accumulation of ``dx`` into the input's gradient), multiplies by
the number of layers, and compares with the base layers' forward products. It also times the
alternative of computing ``A x`` once for layers that share their input (q/k/v, gate/up). These
are the floor that the training-step ratio of ``lora_vs_peft.py`` cannot go under. Medians of
``--calls`` calls; nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

#: SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads of 64, 30 layers
SITES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
         "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
LAYERS = 30


def median_time(fn, calls: int) -> float:
    """Median seconds of ``calls`` calls of ``fn`` after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def site_costs(n_in: int, n_out: int, tokens: int, r: int, calls: int) -> dict[str, float]:
    """Seconds of each LoRA product at one site, and of the base forward product."""
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(tokens, n_in, generator=g), torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    y, grad, w = torch.randn(tokens, n_out, generator=g), torch.randn(tokens, n_out, generator=g), torch.randn(n_out, n_in, generator=g)
    h, dh = x @ a.t(), torch.randn(tokens, r, generator=g)
    dx, dx_base = torch.randn(tokens, n_in, generator=g), torch.randn(tokens, n_in, generator=g)
    ops = {"fwd A x": lambda: torch.mm(x, a.t()), "fwd y += s B h": lambda: y.addmm_(h, b.t(), alpha=0.5),
           "bwd dB": lambda: torch.mm(grad.t(), h), "bwd dh": lambda: torch.mm(grad, b),
           "bwd dA": lambda: torch.mm(dh.t(), x), "bwd dx": lambda: torch.mm(dh, a),
           "bwd dx accumulate": lambda: dx.add_(dx_base), "base forward": lambda: torch.mm(x, w.t())}
    return {k: median_time(f, calls) for k, f in ops.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="batch x sequence (4 x 128)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    costs = {name: site_costs(i, o, args.tokens, args.r, args.calls) for name, (i, o) in SITES.items()}
    ops = [k for k in next(iter(costs.values())) if k != "base forward"]
    print(f"LoRA r={args.r} products per training step, {args.tokens} tokens, {LAYERS} layers, "
          f"{args.threads} threads (ms per step; median of {args.calls} calls each)\n")
    print("| site | " + " | ".join(ops) + " | LoRA total | base forward |")
    print("| --- |" + " --- |" * (len(ops) + 2))
    lora_total = base_total = 0.0
    for name, c in costs.items():
        lora = sum(c[k] for k in ops)
        lora_total += lora * LAYERS
        base_total += c["base forward"] * LAYERS
        cells = " | ".join(f"{1e3 * LAYERS * c[k]:.1f}" for k in ops)
        print(f"| {name} | {cells} | {1e3 * LAYERS * lora:.1f} | {1e3 * LAYERS * c['base forward']:.1f} |")
    print(f"\nLoRA products: {1e3 * lora_total:.0f} ms per step; the base layers' forward products: "
          f"{1e3 * base_total:.0f} ms (a training step's lower bound does them about twice, plus attention "
          "and the output head).")
    g = torch.Generator().manual_seed(1)
    for group in (("q", "k", "v"), ("gate", "up")):
        n_in = SITES[group[0]][0]
        x = torch.randn(args.tokens, n_in, generator=g)
        a = torch.randn(len(group) * args.r, n_in, generator=g)
        dh = torch.randn(args.tokens, len(group) * args.r, generator=g)
        shared = (median_time(lambda: torch.mm(x, a.t()), args.calls) + median_time(lambda: torch.mm(dh.t(), x), args.calls)
                  + median_time(lambda: torch.mm(dh, a), args.calls))
        apart = sum(costs[s][k] for s in group for k in ("fwd A x", "bwd dA", "bwd dx", "bwd dx accumulate"))
        print(f"A x shared by {'/'.join(group)}: {1e3 * LAYERS * shared:.1f} ms per step instead of "
              f"{1e3 * LAYERS * apart:.1f} ms (saves {1e3 * LAYERS * (apart - shared):.1f} ms)")


if __name__ == "__main__":
    main()
