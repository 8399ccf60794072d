"""A micro-batched CPU run fixes glibc's mmap threshold (devices.bound_host_allocator), so freed
activation-sized blocks go back to the system instead of staying in a fragmented heap."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stamp_dist.pruning.prunable as prunable
from stamp_dist.devices import bound_host_allocator

glibc = pytest.mark.skipif(not bound_host_allocator(), reason="needs glibc's mallopt (Linux)")

# Frees 16 blocks of 8 MiB with small live blocks between them, after one large free (which makes glibc's
# default raise its threshold, so the 8 MiB blocks come from the heap); prints the MiB not given back.
_FRAGMENT = textwrap.dedent("""
    import sys, torch
    from stamp_dist.devices import bound_host_allocator
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    if sys.argv[1] == "bounded":
        bound_host_allocator()
    block = 8 * 2**20 // 4
    torch.empty(block).fill_(1)
    base = rss_mib()
    held, pins = [], []
    for _ in range(16):
        held.append(torch.empty(block).fill_(1))
        pins.append(torch.empty(4096).fill_(1))
    del held
    print(round(rss_mib() - base))
""")


def _kept_mib(mode: str) -> int:
    src = str(Path(prunable.__file__).parents[2])
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return int(out.stdout.split()[-1])


@glibc
def test_bounded_allocator_returns_freed_blocks_to_the_system():
    assert _kept_mib("default") >= 64  # the fragmentation it fixes, seen on this libc
    assert _kept_mib("bounded") <= 8


def test_a_micro_batched_backbone_bounds_the_allocator(tiny_run, monkeypatch):
    calls = []
    monkeypatch.setattr(prunable, "bound_host_allocator", lambda: calls.append(1))
    prunable.PrunableBackbone.load(tiny_run / "pretrain", "cpu")
    assert calls == []
    prunable.PrunableBackbone.load(tiny_run / "pretrain", "cpu", micro_batch=4)
    assert calls == [1]
