"""Huge-page malloc (ftlab/launch.py: GLIBC_TUNABLES=glibc.malloc.hugetlb=1, what every
`ftlab-*` command sets) against glibc's default, on ftlab's full fine-tuning train step.

XLA:CPU mallocs each step's temporaries as one block and frees it after the step; by default
glibc maps a fresh block every step and the kernel faults it in 4 KiB at a time. The tunable
is read at process start, so each setting runs in its own process: the two alternate (off, on,
off, on), each timing `--steps` steps after two warm-up steps, and `value` is the speedup
(median s/step off / on, over both processes of each). Page faults per step are reported too.
The processes share a temporary compilation cache, so only the first of each case compiles.

Run: python benchmarks/hugepages.py [--cases minilm_float32 ... --steps 5]
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
    enable_persistent_cache(os.environ["HUGEPAGES_BENCH_CACHE"])
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
    from ftlab.launch import TUNABLE
    tunables = ":".join(t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                        if t and not t.startswith(TUNABLE))
    settings = {"off": {"FTLAB_HUGEPAGES": "0", "GLIBC_TUNABLES": tunables},
                "on": {"GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1".lstrip(":")}}
    with tempfile.TemporaryDirectory() as cache:
        for case in args.cases:
            times, faults = {"off": [], "on": []}, {"off": [], "on": []}
            for name in ("off", "on", "off", "on"):
                env = {**os.environ, **settings[name], "HUGEPAGES_BENCH_CACHE": cache}
                r, err = child_result(__file__, ["--child", case, "--steps", str(args.steps)],
                                      env)
                if r is None:
                    print(json.dumps({"name": f"hugepages/{case}", "error": err}), flush=True)
                    break
                times[name] += r["times"]
                faults[name].append(r["faults_per_step"])
            else:
                off, on = statistics.median(times["off"]), statistics.median(times["on"])
                for name, s in (("off", off), ("on", on)):
                    emit(f"hugepages/{case}/{name}", s, "s/step", None,
                         faults_per_step=round(statistics.mean(faults[name])))
                emit(f"hugepages/{case}/speedup", off / on, "x glibc default's throughput",
                     f"hugepages/{case}/off", timed="alternating processes")


if __name__ == "__main__":
    from common import run
    run(main)
