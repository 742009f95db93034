"""Keep freed feature-sized blocks in the process instead of giving them back to the OS.

An evaluation allocates one (N, D) array per layer and frees it a moment later (10 000 × 300
float32 = 12 MB at the thesis' size). glibc serves blocks that large with a fresh mmap unless
its adaptive threshold happens to have risen past them, so in some processes every such
array is faulted in page by page (about 3 000 page faults, 5–7 ms an array) and in others not: a
train-mode BN on it took 8.6 ms or 1.9 ms, ReLU 6.7 ms or 0.6 ms, depending on the process.
Fixing the thresholds makes the fast case the only one: at the thesis' size evaluate() gets
7–20 % faster and a bare forward 15–25 %, with the same results; training is untouched (its
blocks are small). BENCHMARKS.md, "Memory allocator"."""
from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2 ** 20    # the most glibc accepts on 64-bit: blocks up to this come from the heap
TRIM_THRESHOLD = 256 * 2 ** 20   # free heap kept before any is returned to the OS


@functools.cache
def keep_freed_blocks() -> bool:
    """Set glibc's thresholds so blocks up to 32 MiB are reused from the heap, for the rest of
    this process (once; Trainer and PackedTrainer call it). True if set; False where the C
    library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt      # the symbols already loaded: libc's, without a lookup
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), no CDLL(None) (Windows)
        return False                             # (musl's mallopt refuses: False below)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
