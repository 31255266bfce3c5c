"""keep_freed_memory (called by recipe run and train()): freed CPU memory is reused by the next step (glibc), instead
of the kernel zero-filling it anew each time."""
import subprocess
import sys

import pytest

PAGE_FAULTS_OF_A_REALLOCATION = """
import resource, sys
import torch
from edgedistill.train import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
n = 64 * 2**20 // 4                                   # 64 MB of float32: over glibc's largest mmap threshold
for step in range(3):                                 # allocated, touched, freed, as in a few training steps
    torch.ones(n).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(n).sum()                                   # the same size again, as the next step allocates it
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_REALLOCATION, mode], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reallocation_reuses_freed_pages():
    pages = 64 * 2**20 // 4096
    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    assert default > pages // 2   # by default the 64 MB buffer is mapped afresh: every page faults again
    assert kept < pages // 10     # kept: the freed pages are reused
