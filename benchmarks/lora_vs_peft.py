"""peftkit vs Hugging Face PEFT, LoRA, side by side in one process.

    python benchmarks/lora_vs_peft.py --model smollm2 --rounds 5 --out bench.md
    python benchmarks/lora_vs_peft.py --model tiny --rounds 9

Measures (see ../shared/BASELINES.md for the method and peft's figures on this machine):
training step time over the frozen lower bound (forward + backward through activations only;
the adapters' step adds torch's fused AdamW for both libraries, ``--optim adamw`` for the loop),
peak RSS per configuration in a fresh process, no-grad forward overhead over the base model,
generate() time for 32 tokens, and adapter save / from_pretrained / load_adapter / get_peft_model
times. Ratios are medians (min-max) of per-round ratios; nothing here is asserted.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONFIGS = {"qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
           "all": dict(r=16, lora_alpha=32, target_modules="all-linear")}


def wrap(lib: str, base, cfg: str, dropout: float):
    """A LoRA model from peftkit or peft for config ``cfg`` on (a copy of) ``base``."""
    if lib == "peftkit":
        import peftkit as L
    else:
        import peft as L
    return L.get_peft_model(base, L.LoraConfig(lora_dropout=dropout, **CONFIGS[cfg]))


def lower_bound(base):
    """The frozen model with gradients flowing through activations only."""
    base.requires_grad_(False)
    base.enable_input_require_grads()
    base.train()
    return base


def make_variant(name: str, base, dropout: float, optim: str = "fused"):
    """Build the model for variant name ('lower', 'full', '<lib>_<cfg>') and its optimizer
    (torch's AdamW, ``fused`` as ``peftkit train`` and Trainer run it, or its per-tensor loop)."""
    kw = {"fused": True} if optim == "fused" else {}
    if name == "lower":
        return lower_bound(base), None
    if name == "full":
        base.train()
        return base, torch.optim.AdamW(base.parameters(), lr=1e-5, **kw)
    lib, cfg = name.split("_")
    m = wrap(lib, base, cfg, dropout)
    m.train()
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, **kw)


def memory_child(args) -> None:
    """In a fresh process: build one variant, reset VmHWM, run steps, print the peak."""
    torch.set_num_threads(args.threads)
    base = common.load_base(args.model)
    model, opt = make_variant(args.memory_child, base, args.dropout, args.optim)
    batch = common.batch_for(base, args.batch, args.seq)
    common.print_peak_of(common.train_step(model, batch, opt))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--optim", choices=["fused", "adamw"], default="fused",
                   help="the same for both libraries: torch's fused AdamW (what peftkit train and Trainer use) "
                        "or AdamW's per-tensor loop (runs before 2026-11-29 11:30 UTC used it)")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: train memory infer generate io")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = common.load_base(args.model)
    batch = common.batch_for(base, args.batch, args.seq)
    rows: list[tuple[str, str, str]] = []
    shares_all: list[float] = []
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    variants = ["lower", "peftkit_qv", "peft_qv", "peftkit_all", "peft_all"]

    if "train" not in args.skip:
        log("training step")
        built = {n: make_variant(n, copy.deepcopy(base), args.dropout, args.optim) for n in variants}
        fns = {n: common.train_step(m, batch, o) for n, (m, o) in built.items()}
        for f in fns.values():  # warm-up
            f()
        times, shares = common.interleave(fns, args.rounds, "lower", log=log)
        shares_all += shares
        for cfg, label in (("qv", "LoRA r8 q,v"), ("all", "LoRA r16 all-linear")):
            rows.append((f"train step / lower bound, {label}", common.ratio_summary(times, f"peftkit_{cfg}", "lower"),
                         common.ratio_summary(times, f"peft_{cfg}", "lower")))
            rows.append((f"train step peftkit / peft, {label}", common.ratio_summary(times, f"peftkit_{cfg}", f"peft_{cfg}"), ""))
        rows.append(("lower bound step (s)", f"{statistics.median(times['lower']):.3f}", ""))
        rows.append(("optimizer, both libraries", "fused AdamW" if args.optim == "fused" else "AdamW (loop)", ""))
        del built, fns

    if "memory" not in args.skip:
        log("peak memory (fresh process each)")
        here = os.path.abspath(__file__)
        peaks = {}
        for n in variants:
            common.wait_quiet()
            peaks[n] = common.peak_rss_child([here, "--model", args.model, "--threads", str(args.threads),
                                              "--batch", str(args.batch), "--seq", str(args.seq),
                                              "--dropout", str(args.dropout), "--optim", args.optim,
                                              "--memory-child", n])
            log(f"  {n}: {peaks[n]:.0f} MiB")
        rows.append(("peak RSS MiB, lower bound", f"{peaks['lower']:.0f}", ""))
        for cfg, label in (("qv", "LoRA r8 q,v"), ("all", "LoRA r16 all-linear")):
            rows.append((f"peak RSS MiB, {label}", f"{peaks['peftkit_' + cfg]:.0f}", f"{peaks['peft_' + cfg]:.0f}"))

    if "infer" not in args.skip or "generate" not in args.skip:
        models = {"base": copy.deepcopy(base).eval()}
        for n in variants[1:]:
            lib, cfg = n.split("_")
            m = wrap(lib, copy.deepcopy(base), cfg, args.dropout).eval()
            _randomise(m)
            models[n] = m
        merged = wrap("peftkit", copy.deepcopy(base), "all", args.dropout).eval()
        _randomise(merged)
        merged.merge_adapter()
        models["peftkit_all_merged"] = merged

    if "infer" not in args.skip:
        log("no-grad forward")
        def fwd(m):
            def f():
                with torch.no_grad():
                    m(**batch)
            return f
        fns = {n: fwd(m) for n, m in models.items()}
        for f in fns.values():
            f()
        times, shares = common.interleave(fns, args.rounds, "base", log=log)
        shares_all += shares
        for cfg, label in (("qv", "LoRA r8 q,v"), ("all", "LoRA r16 all-linear")):
            rows.append((f"no-grad forward / base, {label}", common.ratio_summary(times, f"peftkit_{cfg}", "base"),
                         common.ratio_summary(times, f"peft_{cfg}", "base")))
        rows.append(("no-grad forward / base, r16 all-linear merged", common.ratio_summary(times, "peftkit_all_merged", "base"), ""))

    if "generate" not in args.skip:
        log("generate 32 tokens, batch 1")
        prompt = common.batch_for(base, 1, 16, seed=1)
        def gen(m):
            def f():
                with torch.no_grad():
                    m.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               pad_token_id=0)
            return f
        fns = {n: gen(m) for n, m in models.items() if n != "peftkit_all_merged"}
        for f in fns.values():
            f()
        times, shares = common.interleave(fns, args.rounds, "base", log=log)
        shares_all += shares
        for cfg, label in (("qv", "LoRA r8 q,v"), ("all", "LoRA r16 all-linear")):
            rows.append((f"generate 32 tokens / base, {label}", common.ratio_summary(times, f"peftkit_{cfg}", "base"),
                         common.ratio_summary(times, f"peft_{cfg}", "base")))
        rows.append(("base generate tokens/s", f"{32 / statistics.median(times['base']):.1f}", ""))

    if "io" not in args.skip:
        log("save / load")
        rows += io_rows(base, args, log)

    table = ["| what | peftkit | peft 0.21.2 |", "| --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if shares_all:
        table.append(f"| other processes' CPU share during timed rounds | median {statistics.median(shares_all):.0%}, max {max(shares_all):.0%} | |")
    text = "\n".join(table)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def _randomise(model) -> None:
    """Non-zero adapter weights, so unmerged paths do real work (B starts at zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def io_rows(base, args, log) -> list[tuple[str, str, str]]:
    """save_pretrained, from_pretrained, load_adapter and get_peft_model times (median of rounds)."""
    import peft
    import peftkit

    tmp = tempfile.mkdtemp()
    res = {}
    try:
        for lib, L in (("peftkit", peftkit), ("peft", peft)):
            cfg = lambda: L.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")  # noqa: E731
            t_get, t_save, t_from, t_load = [], [], [], []
            folder = os.path.join(tmp, lib)
            for r in range(args.rounds):
                common.wait_quiet()
                b = copy.deepcopy(base)
                t = time.perf_counter(); m = L.get_peft_model(b, cfg()); t_get.append(time.perf_counter() - t)
                t = time.perf_counter(); m.save_pretrained(folder); t_save.append(time.perf_counter() - t)
                b2 = copy.deepcopy(base)
                t = time.perf_counter(); m2 = L.PeftModel.from_pretrained(b2, folder); t_from.append(time.perf_counter() - t)
                t = time.perf_counter(); m2.load_adapter(folder, adapter_name=f"x{r}"); t_load.append(time.perf_counter() - t)
                del m, m2, b, b2
            size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors")) / 1e6
            res[lib] = dict(get=t_get, save=t_save, frm=t_from, load=t_load, size=size)
            log(f"  {lib}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in res[lib].items() if k != "size"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = lambda v: f"{statistics.median(v) * 1e3:.0f} ms"  # noqa: E731
    k, p = res["peftkit"], res["peft"]
    return [
        (f"save_pretrained, LoRA r16 all-linear ({k['size']:.1f} MB)", ms(k["save"]), ms(p["save"])),
        ("PeftModel.from_pretrained", ms(k["frm"]), ms(p["frm"])),
        ("load_adapter (second adapter)", ms(k["load"]), ms(p["load"])),
        ("get_peft_model", ms(k["get"]), ms(p["get"])),
    ]


if __name__ == "__main__":
    main()
