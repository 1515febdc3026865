"""ftlab against PyTorch eager on the same MiniLM-L6 fine-tune (batch 32, seq 128, AdamW,
global-norm clipping, dropout 0.1), full and last-2-layers, fp32 and bf16.

`last2_cached` is last-2 as ftlab's trainer runs it by default (trainer.cache_frozen: the
frozen embeddings and layers 0-3 run once per phase in eval mode, each step starts at layer
4); torch eager recomputes them every step. Its s/step is the steady state; `prefix_seconds`
(the frozen forward of one batch) is paid once per example per phase, so the `one_epoch`
ratio charges it in full, as a one-epoch phase would.

Throughput comes from one process per variant that runs torch's and ftlab's steps in turns
(blocks of 3 steps each, the first of each block not timed; 5 timed turns after one warm-up
turn; medians), so a shared machine's drifting load falls on both alike: runs in separate
processes minutes apart gave this ratio anywhere from 0.83 to 0.97. Blocks, not single steps:
this machine is a VM whose balloon driver hands memory that stays free for ~2 s back to the
host, so a step right after the other framework's 2-s step faults its working memory back in
from the host (measured: torch 2.3 -> 2.7-4 s, ftlab 2.4 -> 3-5 s); a training loop runs
step after step, as the blocks do.
For full fine-tuning, `throughput_ratio_processes` times each framework alone as well, in its
own process as its users run it (torch with glibc's default malloc, ftlab with the tunables
its commands set), alternating torch, ftlab, torch, ftlab: two builds or two frameworks in one
process can rank differently than each alone (XLA's YNNPACK dots-only option did).
Peak memory (max RSS) comes from each framework alone in its own process. The PyTorch model
is a plain BERT encoder written in benchmarks/torch_minilm.py (no transformers), random
weights (speed does not depend on them). torch is a benchmark-only dependency:
`pip install torch==2.13.0` (`make bench` does).

`matmul_bound` says how far the goal is reachable at all: the step's matmul FLOPs (counted
analytically below) at this machine's peak matmul rate (the faster of JAX and torch on a
4096^3 matmul in that dtype, measured in the same run) give a floor no framework can beat;
`value` is torch's s/step over that floor (the highest ratio possible if every non-matmul
op -- softmax, LayerNorm, GELU, dropout, AdamW, the embedding scatter -- were free), and
`mfu_torch` / `mfu_ftlab` the matmul FLOP utilisation each reached.

Run: python benchmarks/vs_torch.py [--steps 5 --batch 32 --seq 128]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time



HIDDEN, MLP, LAYERS = 384, 1536, 6


def matmul_flops(batch: int, seq: int) -> float:
    """Matmul FLOPs of one full MiniLM-L6 fine-tuning step: per layer the Q/K/V/out and MLP
    dense layers (2 * tokens * in * out each) and attention's two batched matmuls (2 * batch
    * seq^2 * hidden each), three times over (forward; backward dx and dW)."""
    tokens = batch * seq
    layer = 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP) + 4 * batch * seq * seq * HIDDEN
    return 3 * LAYERS * layer


def peak_flops(framework: str, dtype: str, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of an n^3 matmul in `framework` (bf16: bf16 operands, f32 accumulation)."""
    if framework == "ftlab":
        from precision import peak_flops as jax_peak
        return jax_peak(dtype, n, repeats)
    import torch
    x = torch.rand(n, n, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def ftlab_stepper(variant: str, dtype: str, batch: int, seq: int, steps: int):
    """ftlab's train step of `variant` as a callable on a fixed batch, and extras (the
    cached variant's prefix_seconds: median of `steps` frozen-prefix passes)."""
    import jax
    from common import LAST2, ftlab_step, minilm, step_call, token_batch
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
        out["prefix_seconds"] = statistics.median(ts)
        data = {**data, "hidden": hidden}
    step, carry, rest = ftlab_step(model, paths, start)
    return step_call(step, list(carry), rest, data), out


def child(args) -> None:
    """One framework alone (its peak memory, its peak matmul rate for `full`), or `pair`:
    torch's step and ftlab's timed in turns in one process, the ratio's source."""
    from common import in_turns
    steps, out, pair = {}, {}, args.framework == "pair"
    repeats = args.steps if pair else 1
    if args.framework in ("torch", "pair"):
        from torch_minilm import stepper
        step = stepper(args.variant.removesuffix("_cached"), args.dtype, args.batch, args.seq)
        steps["torch"] = lambda i: step()
    if args.framework in ("ftlab", "pair"):
        steps["ftlab"], out = ftlab_stepper(args.variant, args.dtype, args.batch, args.seq,
                                            repeats)
    times = in_turns(steps, repeats, warmup=1, block=3) if pair else \
        in_turns(steps, args.steps, warmup=2)
    if pair:
        print("RESULT " + json.dumps({**out, "torch_seconds": times["torch"],
                                      "ftlab_seconds": times["ftlab"]}), flush=True)
        return
    out["seconds"] = times[args.framework]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.variant == "full":  # after the run, so the matmul does not count in its RSS
        out["peak_flops"] = peak_flops(args.framework, args.dtype)
    print("RESULT " + json.dumps(out), flush=True)


def torch_env() -> dict:
    """torch's own process as its users run it: glibc's defaults, not ftlab's tunables."""
    import os
    from ftlab.launch import HUGEPAGES, KEEP_STEP_MEMORY
    ours = {**HUGEPAGES, **KEEP_STEP_MEMORY}
    kept = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
            if t and t.split("=")[0] not in ours]
    return {**os.environ, "FTLAB_MALLOC": "0", "GLIBC_TUNABLES": ":".join(kept)}


def spawn(framework: str, variant: str, dtype: str, args) -> dict | None:
    from common import child_result
    out, err = child_result(__file__, [
        "--child", framework, "--variant", variant, "--dtype", dtype, "--batch",
        str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)],
        torch_env() if framework == "torch" else None)
    if out is None:
        print(json.dumps({"name": f"vs_torch/{framework}/{variant}/{dtype}", "error": err}),
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=("ftlab", "torch", "pair"))
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
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("vs_torch.py needs torch (benchmark-only): pip install torch==2.13.0")
    from common import emit
    alone = {}  # (framework, variant, dtype) -> its own process: peak memory, peak matmul
    for variant in ("full", "last2", "last2_cached"):
        base = variant.removesuffix("_cached")  # torch has no cached variant: its last2
        for dtype in args.dtypes.split(","):
            if variant == base:
                alone["torch", base, dtype] = spawn("torch", base, dtype, args)
            alone["ftlab", variant, dtype] = spawn("ftlab", variant, dtype, args)
            if variant == "full":  # and again, alternating: each in its own process
                runs = {fw: [alone[fw, base, dtype]] for fw in ("torch", "ftlab")}
                for fw in ("torch", "ftlab"):
                    runs[fw].append(spawn(fw, base, dtype, args))
                if all(runs["torch"] + runs["ftlab"]):
                    t, f = (statistics.median(r["seconds"] for r in runs[fw])
                            for fw in ("torch", "ftlab"))
                    emit(f"vs_torch/{variant}/{dtype}/throughput_ratio_processes", t / f,
                         "x torch throughput", f"vs_torch/torch/{base}/{dtype}",
                         goal=">= 1.2", timed="alternating processes (torch, ftlab, twice), "
                         "each as its users run it", torch_seconds=round(t, 4),
                         ftlab_seconds=round(f, 4))
            pair = spawn("pair", variant, dtype, args)
            if pair is None:
                continue
            t, f = pair["torch_seconds"], pair["ftlab_seconds"]
            if variant == base:
                emit_run("torch", base, dtype, t, alone["torch", base, dtype], args)
            emit_run("ftlab", variant, dtype, f, alone["ftlab", variant, dtype], args,
                     **({"prefix_seconds": round(pair["prefix_seconds"], 4)}
                        if "prefix_seconds" in pair else {}))
            extra = {"one_epoch": round(t / (f + pair["prefix_seconds"]), 3)} \
                if "prefix_seconds" in pair else {}
            emit(f"vs_torch/{variant}/{dtype}/throughput_ratio", t / f, "x torch throughput",
                 f"vs_torch/torch/{base}/{dtype}", goal=">= 1.2", timed="in turns, one process",
                 **extra)
            peaks = [r["peak_flops"] for r in (alone["torch", base, dtype],
                                               alone["ftlab", variant, dtype])
                     if r and "peak_flops" in r]
            if variant == "full" and peaks:
                flops, peak = matmul_flops(args.batch, args.seq), max(peaks)
                floor = flops / peak
                emit(f"vs_torch/full/{dtype}/matmul_bound", t / floor,
                     "x torch throughput, at most", f"vs_torch/torch/full/{dtype}",
                     gflop_per_step=round(flops / 1e9, 1), peak_gflops=round(peak / 1e9, 1),
                     floor_seconds=round(floor, 4), mfu_torch=round(floor / t, 3),
                     mfu_ftlab=round(floor / f, 3), mfu_needed=round(1.2 * floor / t, 3))


def emit_run(framework: str, variant: str, dtype: str, seconds: float, alone: dict | None,
             args, **extra) -> None:
    from common import emit
    emit(f"vs_torch/{framework}/{variant}/{dtype}", args.batch / seconds, "ex/s", None,
         peak_rss_mb=round(alone["peak_rss_mb"]) if alone else None,
         seconds_per_step=round(seconds, 4), **extra)


if __name__ == "__main__":
    from common import run
    run(main)
