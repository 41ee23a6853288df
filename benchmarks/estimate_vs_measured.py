"""peftkit estimate vs the measured peak RSS of real training steps on SmolLM2-135M.

Each configuration runs in a fresh process: the estimate is taken first (the process then holds
only Python, torch and transformers, as `peftkit estimate` would), then the model is loaded,
quantised if asked and wrapped; VmHWM there is the measured load peak. VmHWM is then reset
(`echo 5 > /proc/self/clear_refs`) and three AdamW steps run on random tokens: the step peak.
The estimate's total is compared with the higher of the two, its step peak with the step's.
Writes benchmarks/results/estimate_vs_measured.json and prints a table.

    .venv/bin/python benchmarks/estimate_vs_measured.py [--configs lora qlora prefix] [--batch 4 --seq 128]
        [--threads 2] [--malloc train|default|fixed] [--append]

``--malloc`` chooses glibc's heap settings for the training part of each worker:

* ``train`` (default): what ``peftkit train`` does with the same options: for the quantised base
  (qlora) :func:`peftkit.train.alloc.limit_heap_fragmentation` fixes the mmap threshold at
  128 KiB, as ``peftkit train --quantize`` does; the others keep glibc's defaults;
* ``default``: glibc's defaults for every config (``peftkit train --quantize --malloc-defaults``);
* ``fixed``: every config with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment.

Under glibc's defaults the threshold rises to the size of each freed temporary, smaller tensors
then live on the heap and the holes they leave stay resident: the difference between ``default``
and ``fixed`` is that fragmentation (see peftkit/train/alloc.py). Rows of a rerun replace those
with the same config, batch and heap setting unless ``--append`` keeps both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def one(name: str, batch: int, seq: int, threads: int = 2, malloc: str = "train") -> dict:
    """Estimate, then measure, one configuration in this process."""
    import torch

    from peftkit.train.alloc import limit_heap_fragmentation

    torch.set_num_threads(threads)
    from peftkit import get_peft_model
    from peftkit.estimate import estimate_memory, method_config
    from peftkit.models import load_model, resolve
    from peftkit.quant import prepare_model_for_kbit_training, quantize_model

    path = resolve(None, log=lambda m: None)
    est = estimate_memory(path, name, (batch, seq))
    heap = "glibc default"
    if malloc == "fixed":
        heap = "fixed mmap threshold 128 KiB (MALLOC_MMAP_THRESHOLD_)"
    elif malloc == "train" and name == "qlora":  # what `peftkit train --quantize` calls first
        status = limit_heap_fragmentation()
        if status != "set":
            raise RuntimeError(f"peftkit train's heap setting was not applied here: {status}")
        heap = "mmap threshold 128 KiB (peftkit train --quantize)"
    model = load_model(path)
    if name == "qlora":
        quantize_model(model, "4bit")
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pm = get_peft_model(model, method_config(name))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    load_peak = _status("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    pm.train()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    step_peak = _status("VmHWM")
    peak = max(load_peak, step_peak)
    return {"config": name, "batch": [batch, seq], "threads": threads, "malloc": heap,
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "estimate": est.total, "measured_peak": peak,
            "error": (est.total - peak) / peak, "estimate_step": est.step_peak, "measured_step": step_peak,
            "estimate_load": est.load_peak, "measured_load": load_peak,
            "breakdown": {k: v for k, v in vars(est).items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["lora", "qlora", "prefix"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=["train", "default", "fixed"], default="train",
                    help="heap settings of the training part (see the module docstring)")
    ap.add_argument("--append", action="store_true", help="keep earlier rows with the same key")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.seq, args.threads, args.malloc)))
        return
    rows = []
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--seq", str(args.seq),
                              "--threads", str(args.threads), "--malloc", args.malloc], capture_output=True, text=True,
                             check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if args.malloc == "fixed" else None)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        mib = {k: r[k] / 2**20 for k in ("estimate", "measured_peak", "estimate_step", "measured_step",
                                          "estimate_load", "measured_load")}
        print(f"{name:8s} estimate {mib['estimate']:7.0f} MiB  measured {mib['measured_peak']:7.0f} MiB  "
              f"error {100 * r['error']:+.1f}%   (step {mib['estimate_step']:.0f} vs {mib['measured_step']:.0f}, "
              f"load {mib['estimate_load']:.0f} vs {mib['measured_load']:.0f})  [{r['malloc']}, {r['utc']} UTC]", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "estimate_vs_measured.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    rerun = set() if args.append else {(r["config"], *r["batch"], r["malloc"]) for r in rows}
    keep = [r for r in old if (r["config"], *r["batch"], r.get("malloc", "glibc default")) not in rerun]
    with open(path, "w") as fh:
        json.dump(keep + rows, fh, indent=1)


if __name__ == "__main__":
    main()
