"""Console-script start-up (ftlab/launch.py): the re-exec with glibc's malloc tunables, and
the entry points it wraps."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ftlab import cli, launch

ROOT = Path(__file__).resolve().parent.parent


HUGE = "glibc.malloc.hugetlb=1"
KEEP = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def test_malloc_env_adds_only_the_tunables_that_apply_and_keeps_the_users():
    env = {"PATH": "/bin"}
    assert launch.malloc_env(env, (2, 36), "madvise", gpu=False) == {
        "PATH": "/bin", "GLIBC_TUNABLES": f"{HUGE}:{KEEP}"}
    # A GPU host keeps glibc's arenas; huge pages still apply.
    assert launch.malloc_env(env, (2, 36), "always", gpu=True)["GLIBC_TUNABLES"] == HUGE
    # The user's own settings are kept as they are, the rest added after them.
    assert launch.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, (2, 36),
                             "madvise", gpu=False)["GLIBC_TUNABLES"] == \
        f"glibc.malloc.arena_max=4:{HUGE}:" + KEEP.split(":", 1)[1]
    assert launch.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36),
                             "madvise", gpu=True) is None
    # Off by request; huge pages where glibc or the kernel can't; nothing without glibc.
    assert launch.malloc_env({"FTLAB_MALLOC": "0"}, (2, 36), "madvise", gpu=False) is None
    assert launch.malloc_env(env, (2, 34), "madvise", gpu=False)["GLIBC_TUNABLES"] == KEEP
    assert launch.malloc_env(env, (2, 36), "never", gpu=True) is None
    assert launch.malloc_env(env, None, "madvise", gpu=False) is None
    # Re-executed with them, a process adds nothing more (no second exec).
    once = launch.malloc_env(env, (2, 36), "madvise", gpu=False)
    assert launch.malloc_env(once, (2, 36), "madvise", gpu=False) is None


PROBE = """
import resource, threading
from ftlab.launch import reexec_with_malloc_tunables
reexec_with_malloc_tunables()
import ctypes, os
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
faults = []
def step():  # what XLA's worker thread does each step (numpy advises huge pages itself)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    libc.free(ctypes.c_void_p(block))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(2):
    t = threading.Thread(target=step)
    t.start()
    t.join()
print(os.environ.get("GLIBC_TUNABLES", "") or "-", faults[1])
"""


def test_reexec_makes_the_next_step_reuse_its_memory_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FTLAB_MALLOC")}
    if launch.malloc_env(env, launch._glibc_version(), launch._thp_mode(), False) is None:
        pytest.skip("not glibc here")
    out = {}
    for name, extra in (("on", {}), ("off", {"FTLAB_MALLOC": "0"}),
                        ("huge pages only", {"GLIBC_TUNABLES": HUGE, "FTLAB_MALLOC": "0"})):
        p = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra}, text=True,
                           capture_output=True, check=True)
        tunables, faults = p.stdout.split()[-2:]
        out[name] = (tunables, int(faults))
    assert out["off"][1] > 60_000, out  # every 4 KiB page of 256 MiB faulted in again
    if launch._has_gpu():
        return
    assert out["on"][0].split(":")[-3:] == KEEP.split(":"), out
    assert out["on"][1] < 100, out  # the second step's block is the first one's pages
    # The one-arena setting is what does it: a thread's arena maps a large block itself.
    assert out["huge pages only"][0] == HUGE
    if launch._thp_mode() in ("always", "madvise"):
        assert 100 < out["huge pages only"][1] < 2_000, out  # 2 MiB faults, every step


def test_every_console_script_resolves_to_its_cli_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for script, target in scripts.items():
        module, name = target.split(":")
        assert module in ("ftlab.cli", "ftlab.launch"), script
        assert callable(getattr(cli, name)), script
        if module == "ftlab.launch":
            assert getattr(launch, name).__name__ == name, script
