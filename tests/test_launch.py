"""Console-script start-up (ftlab/launch.py): the re-exec with glibc's huge-page malloc, and
the entry points it wraps."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ftlab import cli, launch

ROOT = Path(__file__).resolve().parent.parent


def test_hugepage_env_adds_the_tunable_only_where_it_applies():
    env = {"PATH": "/bin"}
    assert launch.hugepage_env(env, (2, 36), "madvise") == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert launch.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36),
                               "always")["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # The user's own setting is kept; off by request; where glibc or the kernel can't.
    assert launch.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36),
                               "madvise") is None
    assert launch.hugepage_env({"FTLAB_HUGEPAGES": "0"}, (2, 36), "madvise") is None
    assert launch.hugepage_env(env, (2, 34), "madvise") is None
    assert launch.hugepage_env(env, None, "madvise") is None
    assert launch.hugepage_env(env, (2, 36), "never") is None


PROBE = """
import resource, sys
from ftlab.launch import reexec_with_hugepages
reexec_with_hugepages()
import ctypes, os
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# What XLA does (numpy advises huge pages itself): 256 MiB malloc'd, 65,536 pages of 4 KiB.
ctypes.memset(libc.malloc(256 << 20), 1, 256 << 20)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_reexec_makes_large_allocations_fault_in_huge_pages():
    if launch.hugepage_env({}, launch._glibc_version(), launch._thp_mode()) is None:
        pytest.skip("no glibc >= 2.35 with transparent huge pages here")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FTLAB_HUGEPAGES")}
    out = {}
    for name, extra in (("on", {}), ("off", {"FTLAB_HUGEPAGES": "0"})):
        p = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra}, text=True,
                           capture_output=True, check=True)
        tunables, faults = p.stdout.split()[-2:] if name == "on" else ("", p.stdout.split()[-1])
        out[name] = (tunables, int(faults))
    assert out["on"][0] == "glibc.malloc.hugetlb=1"
    assert out["off"][1] > 60_000  # every 4 KiB page faulted in
    assert out["on"][1] < 2_000, out  # 2 MiB pages: 128 of them, and some slack


def test_every_console_script_resolves_to_its_cli_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for script, target in scripts.items():
        module, name = target.split(":")
        assert module in ("ftlab.cli", "ftlab.launch"), script
        assert callable(getattr(cli, name)), script
        if module == "ftlab.launch":
            assert getattr(launch, name).__name__ == name, script
