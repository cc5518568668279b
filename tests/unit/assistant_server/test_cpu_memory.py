"""keep_freed_memory: large CPU tensors allocated and freed in a loop stop page-faulting once it is on."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SCRIPT = """
import resource, sys, torch
from assistant_server.cpu_memory import keep_freed_memory
if sys.argv[1] == "1":
    cpu = torch.device("cpu")
    assert keep_freed_memory(cpu) and keep_freed_memory(cpu)  # a second call is a no-op that still says yes
    assert not keep_freed_memory(torch.device("meta"))  # another device: nothing to do
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def loop(n):
    for _ in range(n):
        x = torch.empty(16 * 1024 * 1024).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold
        del x
loop(40)  # the heap settles first (the first few dozen blocks still fault as it grows)
f0 = faults()
loop(20)
print(faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    def growth(on: bool) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT, "1" if on else "0"], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    plain, kept = growth(False), growth(True)
    assert plain > 20 * 16384 * 0.9  # every 64 MiB block faulted in again: 16384 pages each
    assert kept < plain / 10
