"""glibc malloc settings on ftlab's full fine-tuning train step: glibc's default, huge pages
only (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) and what every `ftlab-*` command sets
(ftlab/launch.py: huge pages, and one arena with no mmap or trim so the step's block is kept).

XLA:CPU mallocs each step's temporaries as one block and frees it after the step; by default
glibc maps a fresh block every step and the kernel faults it in 4 KiB at a time, each page
zeroed. Tunables are read at process start, so each setting runs in its own process: they
alternate (default, huge pages, ftlab, twice), each timing `--steps` steps after two warm-up
steps; a setting's s/step is the median over both its processes, and the speedups are ratios
of those. Page faults per step are reported too. The processes share a temporary
compilation cache, so only the first of each case compiles.

Run: python benchmarks/malloc.py [--cases minilm_float32 ... --steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

CASES = ("minilm_float32", "minilm_bfloat16", "lite0_float32", "lite0_bfloat16")


def child(case: str, steps: int) -> dict:
    from common import ftlab_step, image_batch, lite0, minilm, step_call, token_batch
    from ftlab.compiles import enable_persistent_cache
    from ftlab.models.loading import param_paths
    from ftlab.models.precision import set_compute_dtype
    enable_persistent_cache(os.environ["MALLOC_BENCH_CACHE"])
    which, dtype = case.split("_")
    model = minilm() if which == "minilm" else lite0()
    set_compute_dtype(model, dtype)
    batch = token_batch(32, 128) if which == "minilm" else image_batch(32, 128)
    step, carry, rest = ftlab_step(model, set(param_paths(model)))
    one = step_call(step, list(carry), rest, batch)
    for i in range(2):
        one(i)
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(2, 2 + steps):
        t = time.perf_counter()
        one(i)
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"times": times, "faults_per_step": faults / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps)), flush=True)
        return
    from common import child_result, emit
    from ftlab.launch import HUGEPAGES, KEEP_STEP_MEMORY
    ours = {**HUGEPAGES, **KEEP_STEP_MEMORY}
    kept = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
            if t and t.split("=")[0] not in ours]

    def tunables(names: dict) -> dict:
        return {"FTLAB_MALLOC": "0", "GLIBC_TUNABLES": ":".join(
            kept + [f"{k}={v}" for k, v in names.items()])}
    settings = {"default": tunables({}), "huge_pages": tunables(HUGEPAGES),
                "ftlab": tunables(ours)}
    with tempfile.TemporaryDirectory() as cache:
        for case in args.cases:
            times = {name: [] for name in settings}
            faults = {name: [] for name in settings}
            for name in list(settings) * 2:
                env = {**os.environ, **settings[name], "MALLOC_BENCH_CACHE": cache}
                r, err = child_result(__file__, ["--child", case, "--steps", str(args.steps)],
                                      env)
                if r is None:
                    print(json.dumps({"name": f"malloc/{case}", "error": err}), flush=True)
                    break
                times[name] += r["times"]
                faults[name].append(r["faults_per_step"])
            else:
                s = {name: statistics.median(t) for name, t in times.items()}
                for name in settings:
                    emit(f"malloc/{case}/{name}", s[name], "s/step", None,
                         faults_per_step=round(statistics.mean(faults[name])),
                         tunables=settings[name]["GLIBC_TUNABLES"])
                for name, ref in (("huge_pages", "default"), ("ftlab", "default"),
                                  ("ftlab", "huge_pages")):
                    emit(f"malloc/{case}/{name}_vs_{ref}", s[ref] / s[name],
                         f"x {ref} throughput", f"malloc/{case}/{ref}",
                         timed="alternating processes")


if __name__ == "__main__":
    from common import run
    run(main)
