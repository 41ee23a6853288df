"""peftkit.train.alloc: glibc heap thresholds fixed for quantised bases, and only then."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from peftkit.train import alloc


class FakeLibc:
    """Records mallopt calls; answers ``result`` (glibc: 1 success, 0 error)."""

    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_sets_both_thresholds():
    lib = FakeLibc()
    assert alloc.limit_heap_fragmentation(environ={}, libc=lib) == "set"
    assert lib.calls == [(alloc.M_MMAP_THRESHOLD, 128 << 10), (alloc.M_TRIM_THRESHOLD, 128 << 10)]


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"MALLOC_TOP_PAD_": "0"}, {"MALLOC_MMAP_MAX_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off:glibc.malloc.mmap_threshold=4096"}])
def test_user_settings_win(env):
    lib = FakeLibc()
    status = alloc.limit_heap_fragmentation(environ=env, libc=lib)
    assert status.startswith("user settings: ") and lib.calls == []


def test_other_tunables_do_not_block():
    lib = FakeLibc()
    assert alloc.limit_heap_fragmentation(environ={"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, libc=lib) == "set"
    assert len(lib.calls) == 2


def test_refusal_is_reported_not_raised():
    assert alloc.limit_heap_fragmentation(environ={}, libc=FakeLibc(result=0)) == "mallopt refused"


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert alloc.limit_heap_fragmentation(environ={}) == "not glibc"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert alloc.limit_heap_fragmentation(environ={}) == "not glibc"


def test_bad_threshold():
    with pytest.raises(ValueError, match="positive number of bytes"):
        alloc.limit_heap_fragmentation(0, environ={}, libc=FakeLibc())


_PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from peftkit.train.alloc import limit_heap_fragmentation
    if sys.argv[1] == "fixed":
        assert limit_heap_fragmentation(environ={}) == "set"
    class MI(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MI
    big = torch.ones(2 << 20)   # 8 MiB: mapped on its own either way
    del big                     # glibc's default now raises its mmap threshold to 8 MiB
    before = libc.mallinfo2().hblkhd
    x = torch.ones(256 << 10)   # 1 MiB: mapped only while the threshold is fixed at 128 KiB
    print(libc.mallinfo2().hblkhd - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_real_glibc_keeps_large_tensors_mapped():
    """In a fresh process: after an 8 MiB tensor is freed, a 1 MiB tensor is mapped on its own only
    with the fixed threshold (glibc's default serves it from the heap, where holes stay resident)."""
    env = {k: v for k, v in __import__("os").environ.items() if k not in alloc.USER_SETTINGS}
    env.pop("GLIBC_TUNABLES", None)
    mapped = {}
    for mode in ("default", "fixed"):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
        if out.returncode and "mallinfo2" in out.stderr:
            pytest.skip("glibc older than 2.33 (no mallinfo2)")
        assert out.returncode == 0, out.stderr
        mapped[mode] = int(out.stdout.split()[-1])
    assert mapped["default"] == 0
    assert mapped["fixed"] >= 1 << 20


class _Stop(Exception):
    pass


@pytest.mark.parametrize("argv, expected", [(["--quantize", "4bit"], 1), (["--quantize", "8bit"], 1), ([], 0),
                                            (["--quantize", "nf4", "--malloc-defaults"], 0),
                                            (["--quantize", "bf16"], 0)])
def test_train_sets_it_only_for_quantised_bases(monkeypatch, argv, expected):
    """`peftkit train` calls it first thing with a bitsandbytes --quantize mode (unless
    --malloc-defaults), never otherwise (16-bit storage was measured with glibc's default heap)."""
    from peftkit.train import command, loop
    from peftkit.train.options import add_train_arguments, parse_train_args

    calls = []
    monkeypatch.setattr(alloc, "limit_heap_fragmentation", lambda: calls.append(1) or "set")

    def stop(n):
        raise _Stop  # the next thing run() does; nothing heavier runs in this test

    monkeypatch.setattr(loop, "set_threads", stop)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parse_train_args(parser, parser, argv)
    with pytest.raises(_Stop):
        command.run(args)
    assert len(calls) == expected


def test_default_thread_count_is_not_guessed_from_load(monkeypatch):
    """A background job seen at start-up must not halve a whole run: by default every core is
    used (shared among local ranks), busy or not."""
    import subprocess
    import sys
    import time

    import torch

    from peftkit.train.loop import set_threads

    before = torch.get_num_threads()
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.5)  # the spinner is running: a load-based guess would take a core away
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert set_threads(None) == (os.cpu_count() or 1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(None) == max(1, (os.cpu_count() or 1) // 2)
        assert set_threads(3) == 3
    finally:
        spin.kill()
        torch.set_num_threads(before)
