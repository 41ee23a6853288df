"""Mixed-adapter batches: peftkit vs Hugging Face PEFT, side by side in one process.

    python benchmarks/mixed_vs_peft.py --model smollm2 --rounds 5

A batch of 16 x 64 tokens whose rows use 8 different LoRA r=8 all-linear adapters, no-grad
forward, against the base model alone and against one active adapter, and the same adapters
saved and loaded for inference (packed, as a server holds them); then 64 rows with 8 vs 64
distinct adapters (the cost should barely grow with the number of adapters). peft runs its
`adapter_names` path (a loop over adapters in every layer); peftkit gathers each row's factors
and runs two batched products per layer. Ratios are medians (min-max) of per-round ratios.
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


def build(lib: str, base, n: int):
    """``base`` with ``n`` random LoRA r=8 all-linear adapters from ``lib``."""
    import peft
    import peftkit

    L = peftkit if lib == "peftkit" else peft
    cfg = lambda: L.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")  # noqa: E731
    model = L.get_peft_model(base, cfg(), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def packed_copy(model, base):
    """``model``'s adapters saved and loaded again for inference onto ``base``: packed adapters
    (peftkit/core/packed.py), as a server holds them."""
    import tempfile

    import peftkit

    with tempfile.TemporaryDirectory() as tmp:
        names = list(model.peft_config)
        model.save_pretrained(tmp)
        folder = lambda n: tmp if n == "default" else os.path.join(tmp, n)  # noqa: E731
        out = peftkit.PeftModel.from_pretrained(base, folder(names[0]), adapter_name=names[0])
        for n in names[1:]:
            out.load_adapter(folder(n), n)
    assert all(peftkit.core.packed.is_packed(out.base_model, n) for n in names)
    return out.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--skip", nargs="*", default=[], choices=["mixed", "growth"],
                   help="parts to skip: mixed (16 x 64 against peft), growth (8 vs 64 distinct adapters)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = common.load_base(args.model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    def run(m, ids, adapter_names=None):
        def f():
            with torch.no_grad():
                if adapter_names is None:
                    m(input_ids=ids)
                else:
                    m(input_ids=ids, adapter_names=adapter_names)
        return f

    if "mixed" not in args.skip:
        mixed_part(args, base, ids, run, log)
    if "growth" not in args.skip:
        growth_part(args, base, g, run, log)


def mixed_part(args, base, ids, run, log) -> None:
    """Batch 16 x 64 with 8 adapters, one per two rows: peftkit's and peft's mixed paths vs the base."""
    n = 8
    names = [f"a{i % n}" for i in range(args.batch)]
    kit, pf, one = build("peftkit", copy.deepcopy(base), n), build("peft", copy.deepcopy(base), n), build("peftkit", copy.deepcopy(base), 1)
    packed = packed_copy(kit, copy.deepcopy(base))
    fns = {"base": run(base.eval(), ids), "peftkit_one": run(one, ids),
           "peftkit_mixed": run(kit, ids, names), "peft_mixed": run(pf, ids, names),
           "packed_mixed": run(packed, ids, names)}
    for f in fns.values():
        f()
    log(f"batch {args.batch}x{args.seq}, {n} adapters")
    times, shares = common.interleave(fns, args.rounds, "base", log=log)
    del kit, pf, one, packed, fns
    print(f"Batch {args.batch} x {args.seq}, {n} LoRA r=8 all-linear adapters, no-grad forward "
          f"(others' CPU median {statistics.median(shares):.0%}):\n")
    print("| what | peftkit | peft |")
    print("| --- | --- | --- |")
    print(f"| mixed batch / base | {common.ratio_summary(times, 'peftkit_mixed', 'base')} | "
          f"{common.ratio_summary(times, 'peft_mixed', 'base')} |")
    print(f"| mixed batch, packed adapters (inference loads) / base | "
          f"{common.ratio_summary(times, 'packed_mixed', 'base')} | |")
    print(f"| one active adapter / base | {common.ratio_summary(times, 'peftkit_one', 'base')} | |")
    print(f"| mixed, peftkit / peft | {common.ratio_summary(times, 'peftkit_mixed', 'peft_mixed')} | |")



def growth_part(args, base, g, run, log) -> None:
    """The same number of tokens as 64 rows, with 8 vs 64 distinct adapters in the batch."""
    rows_n = 64
    seq = max(1, args.batch * args.seq // rows_n)
    ids64 = torch.randint(0, base.config.vocab_size, (rows_n, seq), generator=g)
    k8, k64 = build("peftkit", copy.deepcopy(base), 8), build("peftkit", copy.deepcopy(base), 64)
    fns = {"base": run(base, ids64), "distinct8": run(k8, ids64, [f"a{i % 8}" for i in range(rows_n)]),
           "distinct64": run(k64, ids64, [f"a{i}" for i in range(rows_n)])}
    for f in fns.values():
        f()
    log(f"batch {rows_n}x{seq}: 8 vs 64 distinct adapters")
    times, shares = common.interleave(fns, args.rounds, "base", log=log)
    print(f"\nBatch {rows_n} x {seq} (same token count), peftkit (others' CPU median {statistics.median(shares):.0%}):\n")
    print("| what | ratio |")
    print("| --- | --- |")
    print(f"| 8 distinct adapters / base | {common.ratio_summary(times, 'distinct8', 'base')} |")
    print(f"| 64 distinct adapters / base | {common.ratio_summary(times, 'distinct64', 'base')} |")
    print(f"| 64 distinct / 8 distinct | {common.ratio_summary(times, 'distinct64', 'distinct8')} |")


if __name__ == "__main__":
    main()
