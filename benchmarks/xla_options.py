"""XLA CPU compiler options on ftlab's train step (MiniLM full and last-2, Lite0 full): each
option against the default build of the same step, compiled in the same process and timed in
turns.

The options are the ones that could plausibly speed up a CPU train step (wider vectors, fast
math, oneDNN / YNNPACK / XNNPACK library fusions, XLA's other schedulers). Each is passed as a
per-compile option (`jit(...).lower(...).compile(compiler_options=...)`), so the default and
the optioned build share the process, the inputs and the machine's load. Each (case, option)
runs in its own process: an option that crashes XLA (some do) is recorded, not fatal.

`value` is the speedup (default s/step / optioned s/step): > 1 means the option helps.
Caveat: two builds in one process can rank differently than each alone. YNNPACK on dots only
read 1.08x on MiniLM's full fp32 step in turns and 0.9x with each build in its own process,
as a run has it. `--processes` times that way (default, option, default, option: one build
per process, `--repeats` steps after two warm-up steps each; `<option>/processes` lines):
check a candidate so before relying on it. Check
your own CPU: `python benchmarks/xla_options.py`; to use an option in ftlab, put it in the
model's config (`model.xla_options`, e.g. `+model.xla_options.xla_cpu_prefer_vector_width=512`)
or, for every program of the process, in `XLA_FLAGS`. Both builds here start from XLA's
defaults, not the model config's options.

Run: python benchmarks/xla_options.py [--cases minilm_full_fp32 ...] [--options ...]
"""
from __future__ import annotations

import argparse
import json
import statistics

OPTIONS = {
    "vector_width_512": {"xla_cpu_prefer_vector_width": 512},
    "fast_math": {"xla_cpu_enable_fast_math": True},
    "onednn_dot": {"xla_cpu_use_onednn": True,
                   "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "ynn_dots_only": {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "xnn_graph_greedy": {
        "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "memory_scheduler": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "concurrency_scheduler": {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"},
}
CASES = {  # name -> (model, compute dtype, trainable); batch 32 (seq 128 / 128 px)
    "minilm_full_fp32": ("minilm", "float32", "full"),
    "minilm_full_bf16": ("minilm", "bfloat16", "full"),
    "minilm_last2_fp32": ("minilm", "float32", "last2"),
    "minilm_last2_bf16": ("minilm", "bfloat16", "last2"),
    "lite0_full_fp32": ("lite0", "float32", "full"),
    "lite0_full_bf16": ("lite0", "bfloat16", "full"),
}


def child(case: str, option: str, repeats: int, alone: bool = False) -> dict:
    """Both builds in turns in this process; `alone`: only `option`'s ("default": XLA's),
    `repeats` steps after two warm-up steps (one side of a --processes comparison)."""
    import jax
    from common import LAST2, ftlab_step, image_batch, interleaved, lite0, minilm, token_batch
    from ftlab.models.loading import param_paths
    from ftlab.models.precision import set_compute_dtype
    which, dtype, trainable = CASES[case]
    model = minilm() if which == "minilm" else lite0()
    set_compute_dtype(model, dtype)
    batch = token_batch(32, 128) if which == "minilm" else image_batch(32, 128)
    paths = {p for p in param_paths(model) if trainable == "full" or LAST2.fullmatch(p)}
    key, steps = jax.random.key(0), {}
    builds = [(option, OPTIONS.get(option, {}))] if alone else \
        [("default", {}), (option, OPTIONS[option])]
    for name, opts in builds:
        step, carry, rest = ftlab_step(model, paths, xla_options={})  # XLA's defaults
        compiled = step.lower(*carry, rest, batch, key).compile(compiler_options=opts)
        steps[name] = (compiled, list(carry), rest)
    if alone:
        return {"seconds": interleaved(steps, batch, repeats=repeats, warmup=2)[option]}
    t = interleaved(steps, batch, repeats=repeats, warmup=1)
    return {"default_s": round(t["default"], 4), "option_s": round(t[option], 4),
            "speedup": t["default"] / t[option]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--processes", action="store_true",
                    help="each build in its own process, alternating (default, option, twice)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "OPTION"))
    ap.add_argument("--alone", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.repeats, args.alone)), flush=True)
        return
    from common import child_result, emit
    for case in args.cases:
        for option in args.options:
            if args.processes:
                times = {"default": [], option: []}
                for name in ("default", option) * 2:
                    r, err = child_result(__file__, ["--child", case, name, "--alone",
                                                     "--repeats", str(args.repeats)])
                    if r is None:
                        break
                    times[name].append(r["seconds"])
                if r is None:
                    emit(f"xla_options/{case}/{option}/processes", 0.0, "failed",
                         error=err[:200])
                    continue
                d, o = (statistics.median(times[n]) for n in ("default", option))
                emit(f"xla_options/{case}/{option}/processes", d / o, "x default", "default",
                     default_s=round(d, 4), option_s=round(o, 4),
                     timed="alternating processes (default, option, twice)")
                continue
            r, err = child_result(__file__, ["--child", case, option,
                                             "--repeats", str(args.repeats)])
            flags = " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                             for k, v in OPTIONS[option].items())
            if r is None:
                emit(f"xla_options/{case}/{option}", 0.0, "failed", flags=flags,
                     error=err[:200])
                continue
            emit(f"xla_options/{case}/{option}", r.pop("speedup"), "x default", "default",
                 flags=flags, **r)


if __name__ == "__main__":
    from common import run
    run(main)
