"""The `research` executable: sets up the C allocator for XLA's CPU runtime, then runs `research.cli`.

XLA on CPU allocates each step's buffers afresh (a GPT-2 step's logits alone are 16 x 256 x 50,257 floats,
823 MB), and glibc serves allocations above 32 MB with a fresh mmap, so every page of them faults on first
touch and is zeroed by the kernel: 4 KiB at a time, ~3 us each in these VMs. Measured on the 2-core CI
machine: the CoNLL-2003 run (experiments/conll2003_minilm.py) spent 911 s of its 4,913 CPU seconds in the
kernel (304 M page faults; PyTorch on the same recipe: 20 s, 4.7 M), and 8 steps of the Tiny Shakespeare
GPT-2 ran 30% faster with huge pages (15.1 M -> 0.3 M faults, 1.3 -> 1.75 examples/s). glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages (2 MiB per fault). Tunables are
read when a process starts, so the command re-executes itself once with the tunable added; the numbers
cannot change (same memory, fewer faults). `RESEARCH_MALLOC_HUGEPAGES=0` opts out; other libcs, other
systems and an explicit GLIBC_TUNABLES choice are left alone. Only the command does this: importing
`research` as a library never touches the process.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"


def main() -> None:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    wanted = (sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and TUNABLE not in tunables
              and os.environ.get("RESEARCH_MALLOC_HUGEPAGES", "1") != "0")
    if wanted:
        os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
        # Same PID, same arguments (sys.orig_argv is the interpreter's own command line): signals and process
        # bookkeeping see one process. The tunable in the environment stops a second re-execution.
        os.execv(sys.executable, sys.orig_argv)
    from research.cli import main as cli_main

    cli_main()
