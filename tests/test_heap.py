"""kdcore.engine.heap: big MLX buffers reuse freed memory instead of faulting in new pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# In a fresh process (mallopt is process-wide): minor page faults of allocating, filling
# and freeing a 64 MiB MLX array, the second time round.
PROBE = """
import json, resource, sys
from kdcore.engine.heap import heap_status, reuse_freed_memory
state = reuse_freed_memory() if sys.argv[1] == "on" else heap_status()
import mlx.core as mx

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

counts = []
for _ in range(3):
    before = faults()
    x = mx.full((4096, 4096), 1.5)
    mx.eval(x)
    total = float(x[-1, -8:].sum().item())  # the last page filled as asked
    del x
    counts.append(faults() - before)
print(json.dumps({"state": state, "faults": counts, "total": total}))
"""


def probe(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_big_buffers_are_reused_without_new_page_faults():
    pages = 4096 * 4096 * 4 // os.sysconf("SC_PAGE_SIZE")
    default = probe("off")
    assert default["state"] == "not asked"
    # glibc's default: a fresh mmap per 64 MiB block, a fault per page each time
    assert min(default["faults"][1:]) > pages // 2
    reused = probe("on")
    assert reused["state"] == "reuse"
    assert max(reused["faults"][1:]) < pages // 20  # the same memory again
    assert reused["total"] == default["total"] == 12.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kd_heap_system_keeps_glibcs_defaults():
    out = probe("on", KD_HEAP="system")
    assert out["state"] == "system: KD_HEAP=system"
    pages = 4096 * 4096 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert min(out["faults"][1:]) > pages // 2
