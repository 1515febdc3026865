"""Console-script start-up: glibc malloc set for XLA:CPU's step memory, then the command
(ftlab.cli).

XLA:CPU allocates the temporaries of each run of a compiled program as one block (1.76 GB
for MiniLM's batch-32 train step) and frees it when the run ends. glibc serves a block that
large with a fresh mmap and unmaps it on free, so every step faulted all of it in again, each
page zeroed by the kernel: 440k faults of 4 KiB per MiniLM step. Two sets of glibc tunables:

- `glibc.malloc.hugetlb=1`: malloc advises transparent huge pages, 2 MiB faults, ~1.3k per
  step. On a 2-core CPU MiniLM's fp32 step 1.06-1.18x faster, EfficientNet-Lite0's 1.3x.
- Keep the block (CPU hosts only; not where a GPU's device node exists): one arena
  (`arena_max=1`: a thread's arena maps a block this large itself, whatever the limits),
  no mmap for large blocks (`mmap_max=0`: they come from the heap) and no trimming of the
  heap's top (`trim_threshold`), so the next step reuses the same pages: no faults, no
  zeroing (the kernel's zeroing of 1.76 GB costs ~0.17 s). MiniLM's step 1.16x (fp32) and
  1.23x (bf16) faster again; Lite0's, with smaller blocks, the same.

`benchmarks/hugepages.py` measures each. Tunables are read when a process starts, so each
`ftlab-*` command re-executes itself once, first thing, with them added to GLIBC_TUNABLES;
the processes it starts (SLURM jobs through submitit, joblib workers) inherit them. A tunable
GLIBC_TUNABLES already sets is kept as it is; huge pages are skipped where they cannot apply
(not glibc >= 2.35, or transparent huge pages `never`); FTLAB_MALLOC=0 turns all of it off.
"""
from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping

HUGEPAGES = {"glibc.malloc.hugetlb": "1"}
KEEP_STEP_MEMORY = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0",
                    "glibc.malloc.trim_threshold": str(1 << 40)}
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
GPU_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd")


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


def _has_gpu() -> bool:
    return any(glob.glob(pattern) for pattern in GPU_NODES)


def malloc_env(environ: Mapping[str, str], glibc: tuple[int, ...] | None, thp: str,
               gpu: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None where nothing is added (all set already,
    off, or moot)."""
    if environ.get("FTLAB_MALLOC", "1") == "0" or glibc is None:
        return None
    wanted = {}
    if glibc >= (2, 35) and thp in ("always", "madvise"):
        wanted |= HUGEPAGES
    if not gpu:
        wanted |= KEEP_STEP_MEMORY
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    have = {t.split("=")[0] for t in tunables}
    added = [f"{k}={v}" for k, v in wanted.items() if k not in have]
    if not added:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + added)}


def reexec_with_malloc_tunables() -> None:
    """Replace this process by the same command with the tunables set (see the module doc)."""
    env = malloc_env(os.environ, _glibc_version(), _thp_mode(), _has_gpu())
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _command(name: str):
    def run():
        reexec_with_malloc_tunables()
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
