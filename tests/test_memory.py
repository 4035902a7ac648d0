"""lookfast.keep_freed_cpu_memory (lookfast/memory.py): freed CPU tensors' memory is reused instead of page-faulting
fresh pages. Each check runs in a fresh interpreter: the setting is process-wide and lasting."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import lookfast

def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


GLIBC = _glibc()

# Allocates and frees two 96 MB tensors per round (a batch's activations), then counts the page faults of one more
# round: without the setting glibc returns such blocks to the OS (mmap/munmap), so every round faults all ~49k pages;
# with it the heap settles after a few rounds (measured: 5 here) and later rounds reuse its pages.
_FAULTS = textwrap.dedent("""
    import resource, sys, torch, lookfast
    applied = lookfast.keep_freed_cpu_memory() if sys.argv[1] == "on" else None
    def round_():
        a = torch.ones(24 << 20); b = torch.ones(24 << 20); del a, b
    for _ in range(8):
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})}, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_cpu_memory acts on glibc's malloc only (Linux with glibc)")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults_on = _faults("on")
    _, faults_off = _faults("off")
    assert applied == "True"
    pages = 2 * (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults_off > pages // 2, faults_off  # glibc's default really faults them in again (the test can fail)
    assert faults_on < pages // 20, (faults_on, pages)


@pytest.mark.skipif(not GLIBC, reason="keep_freed_cpu_memory acts on glibc's malloc only (Linux with glibc)")
def test_environment_switch_disables_it():
    applied, faults = _faults("on", {"LOOKFAST_KEEP_FREED_MEMORY": "0"})
    assert applied == "False" and faults > (96 << 20) // os.sysconf("SC_PAGE_SIZE") // 2


def test_bad_limit_names_the_argument():
    for bad, err in [(0, ValueError), (2048, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError),
                     ("64", TypeError)]:
        with pytest.raises(err, match="limit_mb"):
            lookfast.keep_freed_cpu_memory(bad)


@pytest.mark.skipif(not GLIBC, reason="keep_freed_cpu_memory acts on glibc's malloc only (Linux with glibc)")
def test_bench_flag_applies_it_and_the_default_does_not(monkeypatch):
    # The bench's default rows run with the allocator as a plain process has it; --keep-freed-memory applies the
    # setting before any row (it changes the peers' times too). serve/infer apply it (lookfast.__main__).
    import lookfast.__main__ as cli
    import lookfast.benchmarks.run as run

    calls = []
    monkeypatch.setattr(run, "main", lambda *a, **k: 0)
    monkeypatch.setattr("lookfast.memory.keep_freed_cpu_memory", lambda *a, **k: calls.append(1) or True)
    assert cli.main(["bench", "--only", "E1"]) == 0 and calls == []
    assert cli.main(["bench", "--only", "E1", "--keep-freed-memory"]) == 0 and calls == [1]
