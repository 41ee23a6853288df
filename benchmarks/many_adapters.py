"""Many adapters on one base: does load_adapter / set_adapter / delete_adapter cost grow with N?

    python benchmarks/many_adapters.py --model tiny --n 100
    python benchmarks/many_adapters.py --model smollm2 --n 100 --peft

Loads one saved LoRA r=8 adapter (q,v by default; ``--targets all-linear`` for every linear
layer) N times under different names and records: each load's time (first 10 vs last 10), the
total, set_adapter and delete_adapter times with few and with N adapters loaded, the resident
memory added against the adapters' own parameter bytes, and (``--profile``) where the time of
the N-th load goes. ``--peft`` runs the same with Hugging Face PEFT. Each library runs in a
fresh process, so memory that one freed and the allocator kept cannot hide the other's growth.
The issue's target (SmolLM2): 100 adapters load in under 5 s in total and add no more than their
parameter bytes. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mib() -> float:
    """Resident memory of this process (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def base_model(name: str):
    if name == "tiny":  # the tiny Llama of ../shared/BASELINES.md
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=4, vocab_size=4096)).eval()
    from peftkit.models import load_model, resolve

    return load_model(resolve(None if name == "smollm2" else name)).eval()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ms(xs) -> str:
    return f"{1000 * statistics.median(xs):.2f} ms"


def run(lib: str, args, folder: str) -> dict:
    """Load the adapter ``args.n`` times with ``lib`` ("peftkit" or "peft") and time the calls."""
    if lib == "peft":
        from peft import PeftModel
    else:
        from peftkit import PeftModel
    model = base_model(args.model)
    gc.collect()
    rss0 = rss_mib()
    loads = [timed(lambda: setattr(run, "m", PeftModel.from_pretrained(model, folder, adapter_name="a0")))]
    pm = run.m
    loads.append(timed(lambda: pm.load_adapter(folder, "a1")))
    set_few = [timed(lambda k=k: pm.set_adapter(f"a{k % 2}")) for k in range(20)]  # switching, as below
    for k in range(2, args.n - 1):
        loads.append(timed(lambda: pm.load_adapter(folder, f"a{k}")))
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    loads.append(timed(lambda: pm.load_adapter(folder, f"a{args.n - 1}")))
    if prof:
        prof.disable()
    gc.collect()
    rss1 = rss_mib()
    set_many = [timed(lambda k=k: pm.set_adapter(f"a{k}")) for k in range(0, args.n, max(1, args.n // 20))]
    del_many = [timed(lambda k=k: pm.delete_adapter(f"a{k}")) for k in range(args.n - 1, args.n - 11, -1)]
    for k in range(args.n - 11, 2, -1):
        pm.delete_adapter(f"a{k}")
    del_few = [timed(lambda: pm.delete_adapter("a2"))]
    out = dict(total=sum(loads), first=loads[1:11], last=loads[-10:], set_few=set_few, set_many=set_many,
               del_few=del_few, del_many=del_many, rss=rss1 - rss0)
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(14)
        out["profile"] = s.getvalue()
    return out


def in_fresh_process(lib: str, args, folder: str) -> dict:
    """:func:`run` in a process of its own: memory that one library freed and the allocator kept
    would otherwise be reused by the next and hide part of its growth."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run, lib, args, folder).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, smollm2, or a model folder")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma list or all-linear")
    ap.add_argument("--peft", action="store_true", help="also run Hugging Face PEFT")
    ap.add_argument("--profile", action="store_true", help="profile the N-th load_adapter")
    args = ap.parse_args()
    if args.n < 14:
        ap.error("--n must be at least 14: the script times the first and the last 10 loads and deletes")
    torch.set_num_threads(2)
    from peftkit import LoraConfig, get_peft_model

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model = get_peft_model(base_model(args.model), LoraConfig(r=8, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(tmp)
        nbytes = sum(v.numel() * v.element_size() for v in model.get_adapter_state_dict("default").values())
        del model
        results = {lib: in_fresh_process(lib, args, tmp) for lib in (["peftkit", "peft"] if args.peft else ["peftkit"])}
    print(f"## {args.n} LoRA r=8 adapters ({args.targets}) on {args.model}: {nbytes / 2**20:.2f} MiB each, "
          f"{args.n * nbytes / 2**20:.1f} MiB in all\n")
    libs = list(results)
    print("| what | " + " | ".join(libs) + " |\n| --- |" + " --- |" * len(libs))
    rows = [("total load time", lambda r: f"{r['total']:.2f} s"),
            ("load_adapter, adapters 2-11 (median)", lambda r: ms(r["first"])),
            (f"load_adapter, last 10 of {args.n} (median)", lambda r: ms(r["last"])),
            ("set_adapter, 2 loaded", lambda r: ms(r["set_few"])),
            (f"set_adapter, {args.n} loaded", lambda r: ms(r["set_many"])),
            (f"delete_adapter, {args.n} loaded", lambda r: ms(r["del_many"])),
            ("delete_adapter, 3 loaded", lambda r: ms(r["del_few"])),
            ("resident memory added / parameter bytes", lambda r: f"{r['rss'] * 2**20 / (args.n * nbytes):.3f}x")]
    for label, f in rows:
        print(f"| {label} | " + " | ".join(f(results[lib]) for lib in libs) + " |")
    for lib in libs:
        if "profile" in results[lib]:
            print(f"\n### {lib}: profile of load_adapter #{args.n}\n```\n{results[lib]['profile']}```")


if __name__ == "__main__":
    main()
