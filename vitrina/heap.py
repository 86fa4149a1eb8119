"""glibc's heap settings for inference: keep freed activations in the heap instead of handing them back.

By default glibc serves an allocation above its mmap threshold (dynamic, 128 kB up to 32 MB) with a fresh
``mmap`` and gives it back with ``munmap`` on free, and trims the top of the heap once 128 kB of it is free.
A model's forward pass allocates and frees the same activation sizes batch after batch, so every batch
page-faults its activations in again. Measured by ``bench/heap.py`` (fresh processes, 2-core Intel Xeon,
one torch thread, batch 64, 2026-12-05): the demo's image tower takes ~6,900 minor faults a batch under
glibc's defaults and ~36 with these settings, 0.73 against 0.63 ms per image (1.16x; clip-minilm 1.18x,
clip-small 1.16x), and ``vitrina index`` of 10,000 files 1.03x the img/s. A training step did not change
(a bare loop of the hybrid Fashion-MNIST ViT, timed once outside the benches: ~1,200 img/s both ways; the
kernel took ~3% of its time under glibc's defaults).

The cost: up to ``trim_threshold`` (256 MiB) of freed memory can stay with the process instead of going back
to the system, and blocks above ``mmap_threshold`` still come and go by ``mmap``. ``VITRINA_HEAP=default``
leaves glibc as it is. Elsewhere than glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 64 * 2**20  # above a ViT-B/32 MLP activation at batch 64 (64 x 50 x 3072 float32: 39 MB)
TRIM_THRESHOLD = 256 * 2**20
HEAP_VARIABLE = "VITRINA_HEAP"


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (the only one these settings are for), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (macOS, musl), no libc
        return None


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process (forked children inherit them); whether they
    were set (False off glibc, where glibc refuses a value, or where ``VITRINA_HEAP=default`` asks for glibc's
    own settings: a process that should give memory back, or ``bench/heap.py``'s other side)."""
    libc = glibc()
    if libc is None or os.environ.get(HEAP_VARIABLE) == "default":
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
