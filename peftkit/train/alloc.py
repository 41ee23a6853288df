"""glibc heap settings for training on a quantised base (``peftkit train --quantize``).

Why. glibc's ``malloc`` serves requests of at least its *mmap threshold* (initially 128 KiB) with
their own ``mmap`` and returns them to the system when freed. Each time such a block is freed,
glibc raises the threshold to that block's size (up to 32 MiB) and its trim threshold to twice
that. A training step frees temporaries of every size (activation-sized intermediates, and on
a bitsandbytes base a dense fp32 copy of the weight after every op that reads one: 0.4-3.5 MiB
each on SmolLM2-135M), so after the first ones the threshold sits above most activations. From
then on activations and temporaries share the brk heap: a temporary freed below a live chunk
leaves a hole, the heap only shrinks from its top, and the holes stay resident. Measured on
SmolLM2-135M, QLoRA r8 q,v, batch 4x128, one thread: the live tensors peak at 847 MiB in both
settings, but training peaks at 1,614-1,690 MiB with glibc's default against 1,340-1,347 MiB with
a fixed 128 KiB threshold, and between steps the default keeps ~650 MiB of free heap resident
(mallinfo2).

What. :func:`limit_heap_fragmentation` fixes the mmap threshold at 128 KiB with
``mallopt(M_MMAP_THRESHOLD)`` (which also stops the dynamic raising) and the trim threshold at
128 KiB (``M_TRIM_THRESHOLD``), so each tensor of 128 KiB or more is mapped alone and unmapped
when freed. The price is a page fault per 4 KiB of every new large tensor: on that QLoRA step
about 3 s more system time and 50% more CPU time per step (BENCHMARKS.md, "Memory estimate
(issue 7)"); ``peftkit train --malloc-defaults`` keeps glibc's defaults when time matters
more. ``peftkit estimate`` counts every allocation of 128 KiB or more at its own whole pages,
which is this setting.

It is a no-op (and says why) when the C library is not glibc, when ``mallopt`` is missing or
refuses, and when the user has chosen malloc settings: any of ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` in the environment or a
``glibc.malloc.`` entry in ``GLIBC_TUNABLES``: those win.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Mapping, Optional

#: mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: glibc's own initial value of both thresholds
THRESHOLD = 128 << 10
#: environment variables through which a user sets glibc's malloc parameters
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_malloc_settings(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Names of the malloc settings the user made in ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    found = [k for k in USER_SETTINGS if k in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (AttributeError if absent)
    except (OSError, AttributeError):
        return None
    return libc


def limit_heap_fragmentation(threshold: int = THRESHOLD, environ: Optional[Mapping[str, str]] = None,
                             libc: Optional[ctypes.CDLL] = None) -> str:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes, unless the user set malloc options.

    Returns what happened: ``"set"``, or why nothing was done (``"user settings: ..."``,
    ``"not glibc"``, ``"mallopt refused"``). Never raises for a platform reason. ``libc``: the C
    library to call (default: this process's glibc, looked up only on Linux with glibc).
    """
    if not isinstance(threshold, int) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    mine = user_malloc_settings(environ)
    if mine:
        return "user settings: " + ", ".join(mine)
    lib = libc if libc is not None else _glibc()
    if lib is None:
        return "not glibc"
    # mallopt returns 1 on success, 0 on error
    ok = lib.mallopt(M_MMAP_THRESHOLD, threshold) == 1
    ok = lib.mallopt(M_TRIM_THRESHOLD, threshold) == 1 and ok
    return "set" if ok else "mallopt refused"

