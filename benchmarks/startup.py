"""Start-up cost: wall time of `ftlab-train ... trainer.halt_after_steps=1` (start, load data
and weights, compile, one step, save, exit), with empty and then warm caches (the persistent
compilation cache FTLAB_JAX_CACHE and the data cache FTLAB_DATA_CACHE: token ids, splits,
decoded images), in fresh run dirs.

Run: python benchmarks/startup.py [--args "experiment=bbc_minilm schedule=full"]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

BIN = Path(sys.executable).parent / "ftlab-train"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--args", default="experiment=bbc_minilm schedule=full")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # Without this process's GLIBC_TUNABLES: ftlab-train sets its own (a re-exec, timed).
        env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
               "FTLAB_JAX_CACHE": f"{tmp}/cache",
               "FTLAB_DATA_CACHE": f"{tmp}/data", "WANDB_MODE": "offline"}
        times = {}
        for name in ("cold", "warm"):
            cmd = [str(BIN), *shlex.split(args.args), "trainer.halt_after_steps=1",
                   "trainer.progress=false", f"hydra.run.dir={tmp}/{name}"]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            times[name] = time.perf_counter() - t
            emit(f"startup/{name}_cache", times[name], "s to first step (and exit)", None,
                 args=args.args)
        emit("startup/warm_vs_cold", times["warm"] / times["cold"], "x cold", "startup/cold_cache",
             goal="warm <= 15 s")


if __name__ == "__main__":
    from common import run
    run(main)
