"""XLA CPU compiler options on ftlab's train step (MiniLM full and last-2, Lite0 full): each
option against the default build of the same step, compiled in the same process and timed in
turns.

The options are the ones that could plausibly speed up a CPU train step (wider vectors, fast
math, oneDNN / YNNPACK / XNNPACK library fusions, XLA's other schedulers). Each is passed as a
per-compile option (`jit(...).lower(...).compile(compiler_options=...)`), so the default and
the optioned build share the process, the inputs and the machine's load. Each (case, option)
runs in its own process: an option that crashes XLA (some do) is recorded, not fatal.

`value` is the speedup (default s/step / optioned s/step): > 1 means the option helps. Check
your own CPU: `python benchmarks/xla_options.py`; to use an option in ftlab, set it in
`XLA_FLAGS` (e.g. `XLA_FLAGS=--xla_cpu_prefer_vector_width=512`).

Run: python benchmarks/xla_options.py [--cases minilm_full_fp32 ...] [--options ...]
"""
from __future__ import annotations

import argparse
import json

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
}


def child(case: str, option: str, repeats: int) -> dict:
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
    for name, opts in (("default", {}), (option, OPTIONS[option])):
        step, carry, rest = ftlab_step(model, paths)
        compiled = step.lower(*carry, rest, batch, key).compile(compiler_options=opts)
        steps[name] = (compiled, list(carry), rest)
    t = interleaved(steps, batch, repeats=repeats, warmup=1)
    return {"default_s": round(t["default"], 4), "option_s": round(t[option], 4),
            "speedup": t["default"] / t[option]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "OPTION"))
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.repeats)), flush=True)
        return
    from common import child_result, emit
    for case in args.cases:
        for option in args.options:
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
