"""Console-script start-up: malloc with transparent huge pages, then the command (ftlab.cli).

XLA:CPU allocates the temporaries of each run of a compiled program as one block (1.76 GB
for MiniLM's batch-32 train step) and frees it when the run ends. glibc serves a block that
large with a fresh mmap, so every step faults all of it in again, 4 KiB at a time, each page
zeroed by the kernel: 440k page faults per MiniLM step. glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages on its mmaps: 2 MiB
faults, ~1.3k per step. On a 2-core CPU that is MiniLM's fp32 step 2.7 -> 2.1 s and
EfficientNet-Lite0's bf16 step 0.83 -> 0.43 s (benchmarks/hugepages.py measures it).

Tunables are read when a process starts, so each `ftlab-*` command re-executes itself once,
first thing, with the tunable added to GLIBC_TUNABLES; the processes it starts (SLURM jobs
through submitit, joblib workers) inherit it. Skipped where it cannot apply (not glibc >= 2.35,
or transparent huge pages set to `never`), where GLIBC_TUNABLES already sets
glibc.malloc.hugetlb (yours is kept), and with FTLAB_HUGEPAGES=0.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None


def _thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise, never), "" if unknown."""
    try:
        text = open(THP_MODE).read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def hugepage_env(environ: Mapping[str, str], glibc: tuple[int, ...] | None,
                 thp: str) -> dict[str, str] | None:
    """The environment to re-execute with, or None where the tunable is set, off or moot."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("FTLAB_HUGEPAGES", "1") == "0" or TUNABLE in tunables:
        return None
    if glibc is None or glibc < (2, 35) or thp not in ("always", "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1".lstrip(":")}


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with the tunable set (see the module doc)."""
    env = hugepage_env(os.environ, _glibc_version(), _thp_mode())
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _command(name: str):
    def run():
        reexec_with_hugepages()
        from ftlab import cli
        return getattr(cli, name)()
    run.__name__ = name
    return run


train = _command("train")
lr_find = _command("lr_find")
evaluate = _command("evaluate")
quantize = _command("quantize")
adapt = _command("adapt")
combine = _command("combine")
registry = _command("registry")
predict = _command("predict")
monitor = _command("monitor")
select = _command("select")
retrain = _command("retrain")
