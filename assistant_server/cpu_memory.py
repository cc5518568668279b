"""Keep freed CPU memory for reuse, so a training or evaluation loop does not page-fault every step.

glibc hands every allocation above its mmap threshold (at most 32 MiB) its own mapping and unmaps it on
free, so a Stage-1 step's large activations (a batch of 64×64 embeddings is ~70 MB) are zero-filled
again page by page on each step. On a 2-vCPU VM without transparent huge pages that was half the
process's CPU time in the kernel and made a Stage-1 step 12.6 s instead of 9.3 s (docs/benchmarks.md).
Turning mmap off and never trimming the heap keeps that memory in the process; the peak stays what it
was. Only for the CPU paths of long batch jobs (training, bank building, evaluation), never for a
server, whose memory should go back when idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory(device: torch.device) -> bool:
    """For a batch job whose model runs on `device`: on the CPU, tell glibc malloc to serve large blocks
    from the heap and keep freed ones (once per process). Returns whether it applies: False for another
    device, off Linux/glibc, or with VESSA_KEEP_FREED_MEMORY=0."""
    global _applied
    if device.type != "cpu":
        return False
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("VESSA_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
