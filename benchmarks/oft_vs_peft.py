"""OFT and BOFT: peftkit vs Hugging Face PEFT, side by side in one process.

    python benchmarks/oft_vs_peft.py --model smollm2 --rounds 5

One training step (forward + backward, causal-LM loss) and one no-grad forward of a batch of
4 x 128 tokens, adapters on q_proj and v_proj of every layer: OFT with 32-blocks (PEFT's default,
Cayley-Neumann) and BOFT with 8-blocks and one butterfly factor, each in both libraries from the
same weights; plus peftkit's BOFT with two factors, which PEFT computes only with its CUDA
extension (on a CPU it trains with one factor; see peftkit/methods/boft.py). Every variant has
its own copy of the base. Ratios are medians (min-max) of per-round ratios.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def build(lib: str, method: str, base, factors: int = 1):
    """``base`` with one adapter of ``method`` from ``lib``, random non-trivial weights (seeded)."""
    import peft
    import peftkit

    L = peftkit if lib == "peftkit" else peft
    if method == "oft":
        cfg = L.OFTConfig(oft_block_size=32, target_modules=TARGETS)
    else:
        cfg = L.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=factors, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's BOFT warns that its CUDA extension is missing
        model = L.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    base = common.load_base(args.model)
    batch = common.batch_for(base, args.batch, args.seq)
    models = {
        "peftkit_oft": build("peftkit", "oft", copy.deepcopy(base)),
        "peft_oft": build("peft", "oft", copy.deepcopy(base)),
        "peftkit_boft": build("peftkit", "boft", copy.deepcopy(base)),
        "peft_boft": build("peft", "boft", copy.deepcopy(base)),
        "peftkit_boft2": build("peftkit", "boft", copy.deepcopy(base), factors=2),
    }
    with torch.no_grad():  # same math: the pairs agree before anything is timed
        for m in ("oft", "boft"):
            a = models[f"peftkit_{m}"].eval()(**batch).logits
            b = models[f"peft_{m}"].eval()(**batch).logits
            log(f"{m}: max |peftkit - peft| logits {float((a - b).abs().max()):.2e}")
    for m in models.values():
        m.train()
    train = {n: common.train_step(m, batch) for n, m in models.items()}

    def forward(m):
        def f():
            with torch.no_grad():
                m(**batch)
        return f

    infer = {n: forward(m) for n, m in models.items()}
    print(f"model {args.model}, batch {args.batch} x {args.seq}, {args.threads} threads, targets {TARGETS}\n")
    print("| step | OFT peftkit / peft | BOFT peftkit / peft | BOFT 2 factors / 1 factor (peftkit) |")
    print("| --- | --- | --- | --- |")
    for label, fns in (("train (fwd + bwd)", train), ("no-grad forward", infer)):
        log(label)
        for fn in fns.values():  # warm-up: first-call allocations and autograd set-up are not timed
            fn()
        times, shares = common.interleave(fns, args.rounds, "peft_oft", log=log)
        print(f"| {label} | {common.ratio_summary(times, 'peftkit_oft', 'peft_oft')} | "
              f"{common.ratio_summary(times, 'peftkit_boft', 'peft_boft')} | "
              f"{common.ratio_summary(times, 'peftkit_boft2', 'peftkit_boft')} |")
        med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        log("  medians: " + ", ".join(f"{n} {v * 1e3:.0f} ms" for n, v in med.items())
            + f"; others' CPU {max(shares):.0%} at most")


if __name__ == "__main__":
    main()
