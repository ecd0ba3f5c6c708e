"""Process-level settings for serving: Python's garbage collector and the C allocator.

Both are measured (`benchmarks/host_effects.py`, `docs/host_effects.md`, concurrency 32 on the
embedded pair):

- **GC pauses.** A process that has imported torch and transformers tracks about 350,000
  objects; a full (oldest-generation) collection walks all of them and took 300-360 ms, a stall
  in the middle of a decode step. After start-up the heap is frozen (`gc.freeze`, as vLLM does):
  a full collection then took 2-6 ms. Building another engine unfreezes first, so a dropped
  engine's cyclic garbage is still collected.
- **Page faults in the forwards.** glibc returns freed memory to the OS and maps large blocks
  afresh, so the forward's temporaries (KV gathers, logits) fault their pages in again, step
  after step: 245 page faults per decode step with `none`, 712 with `adaspec`. Keeping freed
  memory in the process (`mallopt`) brought that to 1 and 63. A throughput gain was not
  measurable against this machine's noise (one run each, within 5%). Skipped where the user set
  `MALLOC_*` themselves, preloads another allocator, or sets `ADASPEC_TUNE_MALLOC=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory instead of returning it
MMAP_THRESHOLD = 32 << 20  # blocks below 32 MiB (glibc's maximum) come from the heap, not mmap

_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed memory in the process (once per process); True if glibc accepted it."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ) \
            or "malloc" in os.environ.get("LD_PRELOAD", "") or os.environ.get("ADASPEC_TUNE_MALLOC") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    _allocator_tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _allocator_tuned


def thaw_heap() -> None:
    """Before building an engine: let the collector see everything again (a previous engine that
    was dropped may have left cycles behind in the frozen heap)."""
    gc.unfreeze()
    gc.collect()


def freeze_heap() -> None:
    """After start-up: collect once, then exempt everything alive from later collections."""
    gc.collect()
    gc.freeze()
