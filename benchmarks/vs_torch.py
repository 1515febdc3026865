"""ftlab against PyTorch eager on the same MiniLM-L6 fine-tune (batch 32, seq 128, AdamW,
global-norm clipping, dropout 0.1), full and last-2-layers, fp32 and bf16.

`last2_cached` is last-2 as ftlab's trainer runs it by default (trainer.cache_frozen: the
frozen embeddings and layers 0-3 run once per phase in eval mode, each step starts at layer
4); torch eager recomputes them every step. Its s/step is the steady state; `prefix_seconds`
(the frozen forward of one batch) is paid once per example per phase, so the `one_epoch`
ratio charges it in full, as a one-epoch phase would.

Each variant runs in its own process so peak memory (max RSS) is its own. The PyTorch model
is a plain BERT encoder written in benchmarks/torch_minilm.py (no transformers), random
weights (speed does not depend on them). torch is a benchmark-only dependency:
`pip install torch==2.13.0` (`make bench` does); without it, only ftlab runs.

Run: python benchmarks/vs_torch.py [--steps 5 --batch 32 --seq 128]
"""
from __future__ import annotations

import argparse
import json
import resource
import time



def ftlab_variant(variant: str, dtype: str, batch: int, seq: int, steps: int) -> dict:
    import jax
    from common import LAST2, ftlab_step, minilm, token_batch
    from ftlab.models.loading import param_paths
    from flax import nnx
    from ftlab.models.precision import set_compute_dtype
    from ftlab.step import set_modes
    model = minilm()
    set_compute_dtype(model, dtype)
    paths = {p for p in param_paths(model) if variant == "full" or LAST2.fullmatch(p)}
    data = token_batch(batch, seq)
    out = {}
    start = 0
    if variant == "last2_cached":  # stages: embeddings, layers 0-5, head; layer 4 is stage 5
        start = 5
        set_modes(model, None)
        prefix = nnx.jit(lambda m, b: m.forward(b, 0, start))
        jax.block_until_ready(prefix(model, data))
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            hidden = jax.block_until_ready(prefix(model, data))
            ts.append(time.perf_counter() - t)
        out["prefix_seconds"] = sorted(ts)[len(ts) // 2]
        data = {**data, "hidden": hidden}
    step, carry, rest = ftlab_step(model, paths, start)
    key = jax.random.key(0)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        *carry, m = step(*carry, rest, data, jax.random.fold_in(key, i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {**out, "seconds_per_step": sorted(times[2:])[len(times[2:]) // 2]}


def child(args) -> None:
    if args.framework == "ftlab":
        out = ftlab_variant(args.variant, args.dtype, args.batch, args.seq, args.steps)
    else:
        from torch_minilm import run
        out = run(args.variant, args.dtype, args.batch, args.seq, args.steps)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def spawn(framework: str, variant: str, dtype: str, args) -> dict | None:
    from common import child_result
    out, err = child_result(__file__, [
        "--child", framework, "--variant", variant, "--dtype", dtype, "--batch",
        str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)])
    if out is None:
        print(json.dumps({"name": f"vs_torch/{framework}/{variant}/{dtype}", "error": err}),
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=("ftlab", "torch"))
    ap.add_argument("--variant", default="full")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if args.child:
        args.framework = args.child
        return child(args)
    from common import emit
    torch_runs = {}  # torch has no cached variant: last2_cached is compared with its last2
    for variant in ("full", "last2", "last2_cached"):
        base = variant.removesuffix("_cached")
        for dtype in args.dtypes.split(","):
            if variant == base:
                torch_runs[base, dtype] = spawn("torch", variant, dtype, args)
                emit_run("torch", variant, dtype, torch_runs[base, dtype], args)
            t, f = torch_runs.get((base, dtype)), spawn("ftlab", variant, dtype, args)
            emit_run("ftlab", variant, dtype, f, args)
            if t and f:
                extra = {"one_epoch": round(t["seconds_per_step"] / (
                    f["seconds_per_step"] + f["prefix_seconds"]), 3)} if "prefix_seconds" in f else {}
                emit(f"vs_torch/{variant}/{dtype}/throughput_ratio",
                     t["seconds_per_step"] / f["seconds_per_step"], "x torch throughput",
                     f"vs_torch/torch/{base}/{dtype}", goal=">= 1.2", **extra)


def emit_run(framework: str, variant: str, dtype: str, r: dict | None, args) -> None:
    from common import emit
    if r:
        extra = {"prefix_seconds": round(r["prefix_seconds"], 4)} if "prefix_seconds" in r else {}
        emit(f"vs_torch/{framework}/{variant}/{dtype}", args.batch / r["seconds_per_step"],
             "ex/s", None, peak_rss_mb=round(r["peak_rss_mb"]),
             seconds_per_step=round(r["seconds_per_step"], 4), **extra)


if __name__ == "__main__":
    main()
