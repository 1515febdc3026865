"""Write docs/performance.md from the JSON lines in benchmarks/results/ (one file per
machine and benchmark: `<machine>_<benchmark>.jsonl`, as `make bench` and gpu.sh write them).

Run: python benchmarks/report.py > docs/performance.md
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MACHINES = {
    "cpu": "2-core AMD EPYC (Zen 4: AVX-512 with VNNI and BF16, no AMX), 24 GB, shared; "
           "jax/jaxlib 0.10.2, flax 0.12.8, torch 2.13.0+cpu, onnxruntime 1.32.0",
    "zen5": "2-core AMD EPYC (Zen 5, family 26: full-width AVX-512 with VNNI and BF16, no AMX), "
            "24 GB, shared; the same VM type and software as `cpu` on a newer host (every "
            "benchmark but int8 re-run there)",
    "h100": "one NVIDIA H100 80GB HBM3 (driver 580.159.04); jax 0.11.2 (CUDA 13), flax 0.12.10",
}


NOTES = """## Reading these numbers

- MFU = FLOPs of the compiled step (XLA cost analysis, elementwise work included) / step
  time / the peak matmul rate measured in the same run (a 4096³ matmul in that dtype; on the
  H100 jax's default precision runs fp32 dots as TF32). The 2-core CPU is shared and its
  speed moves by ±20% between runs; compare ratios within a table, not across tables.
- glibc malloc: XLA:CPU mallocs each run's temporaries as one block (1.76 GB for MiniLM's
  b32 train step) and frees it after; glibc mapped a fresh block each time and the kernel
  faulted it in 4 KiB at a time, each page zeroed (~400k faults per MiniLM step). Every
  `ftlab-*` command now starts with glibc tunables (ftlab/launch.py): huge pages, and on
  hosts without a GPU one arena with no mmap or trim for large blocks, so the block is kept
  and the next step reuses its pages (no faults). Every benchmark runs so
  (benchmarks/common.run); torch, in its own processes, with glibc's defaults. Re-measured
  with it: the overhead, malloc, PyTorch, precision, freezing and start-up tables; the
  others (depthwise, LoRA, frozen vision, XLA options, int8) were measured before, as ratios
  within one process. The PyTorch and precision tables are from after the bf16-gradient,
  attention and dropout changes below; overhead, malloc, freezing and start-up from before
  them (same code for both sides of each of their ratios).
- Two hosts. The `cpu` tables come from a Zen 4 EPYC (cpu family 25), `zen5` from a Zen 5
  EPYC (family 26) that later sessions of the same 2-core VM type landed on: same software,
  same code for both sides of every ratio, every benchmark but int8 re-run there. Zen 5
  doubles XLA's fp32 matmul rate (peak ~395-430 GFLOP/s against ~200; bf16 ~750-885) while
  PyTorch's fp32 step gains less (1.94 s/step, 0.36 of that peak, against ~2.2 s, ~0.63 of
  Zen 4's), so ftlab's full fp32 fine-tuning reads 1.69x torch on Zen 5 alone in its own
  process (1.54x in turns, where torch runs under ftlab's malloc tunables too) and 1.04x on
  Zen 4: the fp32 goal is met on one host and not the other, with the same program. bf16
  meets it on both (1.30x, 1.28x). Check `grep family /proc/cpuinfo` before comparing a
  new run with either table.
- oneDNN dot fusion (`onednn_dot` in the XLA options tables) is the one option that pays on
  Zen 5 alone in its own process: MiniLM fp32 1.16x (full) and 1.12x (last 2). No model
  sets it: with it on the BERT configs, the test suite's LR-finder run (`bert_tiny`, batch
  16) died of SIGILL (illegal instruction) at any XLA optimization level, on Zen 4 it
  failed to compile the last-2 step, and its programs do not enter the persistent
  compilation cache (no serializer for oneDNN fusions). `model.xla_options` opts in, at
  that risk.
- Where a goal is not met it is shown as measured. On Zen 4 (`cpu`), full fine-tuning of
  MiniLM, each framework alone in its own process (the sentence under the PyTorch
  table): 1.04x in fp32 (1.07x the run before) and 1.28x in bf16 (0.94x before the
  bf16-gradient, attention and dropout changes; at the start of this work: 0.82x and 0.73x).
  Timed in turns in one process (the table) ftlab reads lower, 1.00x and 1.15x (in that
  process torch runs under ftlab's malloc tunables too, one arena for both). So on Zen 4
  bf16 meets 1.2x as users run it (each alone), not in turns; fp32 does not. The "matmul
  bound" lines say how far 1.2x is: the step's 275 GFLOP of matmuls take ~1.45 s at Zen
  4's peak fp32 matmul rate; torch's whole step runs at ~0.62-0.65 of that peak, ftlab's at ~0.65,
  and 1.2x torch needs ~0.75-0.79 for the whole step, softmax, LayerNorm, GELU, dropout,
  AdamW and the 30522-row embedding gradient included (bf16: torch 0.49 of its peak, ftlab
  0.56, 1.2x needs 0.59). ftlab's fp32 peak RSS read 3.5 GB in this run, 2.4 GB in the one
  before; the compiled step's temporaries went down (1.54 -> 1.32 GB fp32, 1.56 -> 1.08 GB
  bf16), so the spread is the process's, not the program's. In-turns timing uses blocks of 3
  steps each with the first of each block not timed: this VM's balloon driver hands memory
  free for ~2 s back to the host, so the first step after the other framework's turn faults
  its working memory back in from the host (torch 2.3 -> 2.7-4 s, ftlab 2.4 -> 3-5 s),
  which a training loop, step after step, never pays.
  Where ftlab's fp32 step still loses (profile with huge pages): attention's batched 128x32
  products (~0.2 s; torch's bmm 0.16 s), transposed copies of activations for the
  weight-gradient and head-split dots (~0.19 s; torch's copies 0.04 s), and elementwise
  fusions. BERT's exact GELU now has a hand-written gradient (erf's polynomial forward,
  the backward recomputed from the input; jax's went through erfc's piecewise expansion):
  GELU forward + backward 35 -> 14.5 ms per layer, the step 3% faster. XLA's YNNPACK on
  dots only (`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`,
  which gives LayerNorm's and softmax's reductions back to XLA's loops) read 1.07-1.08x on
  MiniLM's fp32 step in turns against XLA's default in one process, but 0.88-0.93x with
  each build in its own process through jax.jit's compiler_options (16 processes over three
  runs; bf16 0.91x with `--processes`); one `--processes` fp32 run read 1.09x, its default
  build at 2.59 s/step against 2.1-2.4 s in the other runs. So no model sets it; `model.xla_options`
  takes any such option per model.
  bf16 weight gradients: XLA:CPU runs a bf16 dot only when both operands are row-major with
  the contraction on the left operand's last axis; any other (the weight gradient x^T g
  over the 4096 tokens, attention's g^T a, a transposed k) it converts to f32 and runs at
  f32 speed (170-195 GFLOP/s against 360-400). The backward now hands those dots row-major
  copies (ftlab/models/precision.py `_fresh`: 275-295 GFLOP/s with the copy), and
  attention's two products run in bf16 under compute_dtype (as torch.autocast's do):
  MiniLM's bf16 step 1.60-1.72 -> 1.30-1.48 s/step from the dense gradients (two pairs of
  alternating processes) and 2.5% more from attention (in turns). Dropout masks are now a
  keyed integer hash of the element index (ftlab/models/dropout.py), not threefry words:
  9-10% off the step in fp32 and bf16 (in turns in one process; fp32 in alternating
  processes, 4 each: 2.29 -> 2.08 s/step).
  The earlier try, threefry unrolled (the bits 38 -> 3.3 ms in isolation), had not moved
  the step. XLA's CPU options are measured in their own table (`benchmarks/xla_options.py`).
  Tried without gain: one fused QKV dot (fp32 slower with its head transpose; bf16 the
  same), a hand-written f32 attention backward (slower than autodiff's). Last-2 as ftlab
  trains it (frozen prefix cached, the default) is 1.8x (fp32) and 2.5x (bf16) torch in
  steady state, 1.13x and 1.45x even when a one-epoch phase pays the prefix pass; without
  the cache 1.17x (fp32, 1.13-1.17x over the last three runs) and 1.43x (bf16).
- Freezing: `bare_last2` / `bare_head_only` are the pruned step written by hand (only the
  trainable params differentiated, frozen blocks in inference mode as ftlab runs them);
  `<set>_vs_bare` times it and ftlab's step in turns, two steps each with the first not
  timed (goal: no worse, <= 1).
- Framework overhead: ftlab's epoch loop and the bare loop run in turns, 6 steps each, the
  first 3 not timed (as for PyTorch above).
- "vs bare step" uses the same step math as ftlab (BatchNorm on batch statistics, dropout,
  AdamW after clipping), so it measures the loop and per-group optimizer, not the model.
- Start-up: "cold" has empty compilation and data caches (token ids, split folds, decoded
  images); "warm" is the rerun. A warm start still pays the imports (jax, flax, orbax;
  sklearn waits for the first metric), tracing the train step (the persistent cache skips
  XLA's compile, not tracing), the step itself (MiniLM full fine-tuning, batch 32) and the
  checkpoint written at the halt.
- Depthwise convs: autodiff of shifted views reduces over batch and space once per kernel
  tap, and XLA's CPU loops do such reductions (channels kept, the minor axis) slowly; the
  hand-written gradient does all taps in one reduction per example. Per layer that is
  1.5-12x on Zen 4 and 1.1-4.4x on Zen 5 (autodiff's layers run 2-4x faster there, the
  hand-written ones 1.2-2x); a full Lite0 step gains less because its 1x1-conv gradients
  and BatchNorm (transposed copies, reductions of the same kind) now take most of it.
"""


def load() -> dict[str, dict[str, dict]]:
    """machine -> metric name -> record."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(RESULTS.glob("*.jsonl")):
        machine = path.stem.split("_", 1)[0]
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                out.setdefault(machine, {})[rec["name"]] = rec
    return out


def fmt(v, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def section(machine: str, r: dict[str, dict]) -> str:
    parts = [f"## {machine}: {MACHINES.get(machine, machine)}"]
    over = sorted({k.split("/")[1] for k in r if k.startswith("overhead/")})
    if over:
        parts.append("### Framework overhead (ftlab's loop vs a bare jitted step; goal >= 0.95)")
        parts.append(table(["case", "bare s/step", "ftlab s/step", "throughput ratio"], [
            [c, fmt(r[f"overhead/{c}/bare"]["value"], 4), fmt(r[f"overhead/{c}/ftlab"]["value"], 4),
             fmt(r[f"overhead/{c}/throughput_ratio"]["value"], 3)] for c in over]))
    ml = [k.split("/")[1] for k in r if k.startswith("malloc/") and k.endswith("/ftlab")]
    if ml:
        parts.append("### glibc malloc: glibc's default, huge pages only (glibc.malloc.hugetlb=1) "
                     "and what `ftlab-*` commands set (huge pages, one arena, no mmap or trim: "
                     "the step's block kept), ftlab's full fine-tuning step (batch 32)")
        parts.append(table(["case", "default s/step", "huge pages", "ftlab", "huge pages vs "
                            "default", "ftlab vs default", "ftlab vs huge pages",
                            "page faults/step: default", "huge pages", "ftlab"], [
            [c, *(fmt(r[f"malloc/{c}/{n}"]["value"], 3)
                  for n in ("default", "huge_pages", "ftlab")),
             *(fmt(r[f"malloc/{c}/{n}"]["value"], 2) for n in (
                 "huge_pages_vs_default", "ftlab_vs_default", "ftlab_vs_huge_pages")),
             *(f"{r[f'malloc/{c}/{n}']['faults_per_step']:,}"
               for n in ("default", "huge_pages", "ftlab"))] for c in ml]))
    vs = [k for k in r if k.startswith("vs_torch/") and k.endswith("throughput_ratio")]
    if vs:
        parts.append("### Against PyTorch eager (MiniLM-L6, batch 32, seq 128; goal >= 1.2)")
        rows = []
        for k in vs:
            _, variant, dtype, _ = k.split("/")
            torch = variant.removesuffix("_cached")
            t, f = r[f"vs_torch/torch/{torch}/{dtype}"], r[f"vs_torch/ftlab/{variant}/{dtype}"]
            one = r[k].get("one_epoch")
            rows.append([variant, dtype, fmt(t["value"], 1), fmt(f["value"], 1),
                         fmt(r[k]["value"], 2), "" if one is None else fmt(one, 2),
                         t["peak_rss_mb"], f["peak_rss_mb"]])
        parts.append(table(["fine-tuning", "dtype", "torch ex/s", "ftlab ex/s", "ratio",
                            "ratio, 1-epoch phase", "torch peak MB", "ftlab peak MB"], rows))
        parts.append("`last2_cached` is last-2 as ftlab's trainer runs it (`trainer.cache_frozen`, "
                     "the default): the frozen prefix runs once per phase, not every step; "
                     "its ratio is the steady state, the 1-epoch column also charges that "
                     "prefix pass in full (torch: the same last-2 run).")
        sep = [(k.split("/")[2], r[k]) for k in r if k.startswith("vs_torch/full/")
               and k.endswith("/throughput_ratio_processes")]
        if sep:
            parts.append("Full fine-tuning with each framework alone in its own process, as "
                         "its users run it (torch, ftlab, torch, ftlab; torch with glibc's "
                         "default malloc, ftlab with its commands' tunables): " + "; ".join(
                             f"{d} {fmt(x['value'], 2)}x ({fmt(x['torch_seconds'], 2)} vs "
                             f"{fmt(x['ftlab_seconds'], 2)} s/step)" for d, x in sep) + ".")
        for dtype in ("float32", "bfloat16"):
            b = r.get(f"vs_torch/full/{dtype}/matmul_bound")
            if b:
                parts.append(
                    f"Matmul bound, full {dtype}: {fmt(b['gflop_per_step'], 1)} GFLOP of matmuls "
                    f"per step at this machine's peak ({fmt(b['peak_gflops'], 0)} GFLOP/s) "
                    f"take {fmt(b['floor_seconds'], 2)} s; torch runs at {fmt(b['mfu_torch'], 2)} "
                    f"of that peak, ftlab at {fmt(b['mfu_ftlab'], 2)}; 1.2x torch needs "
                    f"{fmt(b['mfu_needed'], 2)}, and even with every non-matmul op free a step "
                    f"could be at most {fmt(b['value'], 2)}x torch's throughput.")
    prec = sorted({k.split("/")[1] for k in r if k.startswith("precision/") and
                   k.endswith("/speedup")})
    if prec:
        peak = {d: r.get(f"precision/peak_matmul_{d}", {}).get("value") for d in
                ("float32", "bfloat16")}
        parts.append("### Precision: fp32 vs bf16 compute (ftlab's step), and MFU")
        parts.append(f"Peak matmul measured here: fp32 {fmt(peak['float32'], 0)} GFLOP/s, "
                     f"bf16 {fmt(peak['bfloat16'], 0)} GFLOP/s.")
        rows = []
        for c in prec:
            a, b = r[f"precision/{c}/float32"], r[f"precision/{c}/bfloat16"]
            rows.append([c, fmt(a["value"], 1), fmt(b["value"], 1),
                         fmt(r[f"precision/{c}/speedup"]["value"], 2), fmt(a["mfu"], 3),
                         fmt(b["mfu"], 3)])
        parts.append(table(["case", "fp32 ex/s", "bf16 ex/s", "bf16 speedup", "MFU fp32",
                            "MFU bf16"], rows))
    frz = [k for k in r if k.startswith("freeze/") and "optimizer_state" not in k]
    if frz:
        parts.append("### Freezing: step time vs full fine-tuning (MiniLM-L6 b32 s128)")
        parts.append(table(["variant", "value", "unit"], [
            [k.split("/", 1)[1], fmt(r[k]["value"], 4), r[k]["unit"]] for k in frz]))
    opt = [k for k in r if k.startswith("freeze/optimizer_state/")]
    if opt:
        parts.append("### Optimizer state vs full fine-tuning (goal <= 0.15 at >= 90% frozen)")
        parts.append(table(["trainable set", "frozen fraction", "optimizer bytes", "x full"], [
            [k.rsplit("/", 1)[1], fmt(r[k]["frozen_fraction"], 3), f"{r[k]['bytes']:,}",
             fmt(r[k]["value"], 3)] for k in opt]))
    qm = sorted({k.split("/")[1] for k in r if k.startswith("quantize/") and
                 k.endswith("/fp32/size")})
    if qm:
        parts.append("### int8 vs fp32 (`ftlab-quantize`; goal latency <= 0.5x, size <= 0.3x, "
                     "accuracy drop <= 1 point)")
        if "quantize/device" in r:
            parts.append(f"Measured on {r['quantize/device']['unit']}.")
        rows = []
        for m in qm:
            for v in sorted({k.split("/")[2] for k in r if k.startswith(f"quantize/{m}/")
                             and k.endswith("/accuracy_drop")}):
                get = lambda x: r.get(f"quantize/{m}/{v}/{x}", {}).get("value")
                rows.append([m, v, fmt(get("size"), 3), fmt(get("latency_b1"), 2),
                             fmt(get("latency_b32"), 2), fmt(100 * get("accuracy_drop"), 2)])
        parts.append(table(["model", "variant", "size x fp32", "latency b1 x", "latency b32 x",
                            "accuracy drop (points)"], rows))
        for m in qm:
            own = [r.get(f"quantize/{m}/onnx_int8/latency_b{b}_vs_onnx_fp32")
                   for b in (1, 32)]
            if all(own):
                parts.append(f"{m}: `onnx_fp32` is ftlab's fp32 model exported to ONNX and run "
                             "by ONNX Runtime (the runtime's own speed, no int8); "
                             "`onnx_int8` is ONNX Runtime's int8 of it (static for Lite0, "
                             "dynamic for MiniLM). Within "
                             f"ONNX Runtime, int8 / fp32 latency: b1 {fmt(own[0]['value'], 2)}x, "
                             f"b32 {fmt(own[1]['value'], 2)}x.")
    dw = [k for k in r if k.startswith("depthwise/")]
    if dw:
        parts.append("### Depthwise convs: hand-written gradient vs autodiff of the same "
                     "forward (EfficientNet-Lite0, batch 32, 128 px)")
        parts.append(table(["case", "autodiff", "hand-written", "speedup"], [
            [k.split("/", 1)[1],
             fmt(r[k]["autodiff_ms"], 1) + " ms" if "autodiff_ms" in r[k]
             else fmt(r[k]["autodiff_s"], 3) + " s",
             fmt(r[k]["hand_ms"], 1) + " ms" if "hand_ms" in r[k]
             else fmt(r[k]["hand_s"], 3) + " s",
             fmt(r[k]["value"], 2)] for k in dw]))
    st = [k for k in r if k.startswith("startup/") and k.endswith("_cache")]
    if st:
        parts.append("### Start-up: `ftlab-train` to first step and exit (goal warm <= 15 s)")
        parts.append(table(["cache", "seconds", "command"], [
            [k.split("/")[1], fmt(r[k]["value"], 1), f"`{r[k]['args']}`"] for k in st]))
    xo = [k for k in r if k.startswith("xla_options/") and not k.endswith("/processes")]
    xp = [k for k in r if k.startswith("xla_options/") and k.endswith("/processes")]
    if xo:
        cases = list(dict.fromkeys(k.split("/")[1] for k in xo))
        options = list(dict.fromkeys(k.split("/")[2] for k in xo))
        cell = lambda rec: ("n/a" if rec is None else "fails" if rec["unit"] == "failed"
                            else fmt(rec["value"], 2))
        parts.append("### XLA CPU options on ftlab's train step (batch 32; speedup over the "
                     "default build in the same process, timed in turns; > 1 helps)")
        parts.append(table(["option", *cases, "XLA_FLAGS"], [
            [o, *(cell(r.get(f"xla_options/{c}/{o}")) for c in cases),
             f"`{next(r[k]['flags'] for k in xo if k.endswith('/' + o))}`"]
            for o in options]))
        errors = sorted({r[k]["error"] for k in xo if r[k]["unit"] == "failed"})
        if errors:
            parts.append("fails: XLA's compile raised " + "; ".join(f'"{e}"' for e in errors)
                         + ".")
    if xp:
        parts.append("Checked in separate processes (`--processes`: default, option, default, "
                     "option, one build per process, as a run has it):")
        parts.append(table(["case", "option", "speedup", "default s/step", "option s/step"], [
            [k.split("/")[1], k.split("/")[2], fmt(r[k]["value"], 2),
             fmt(r[k].get("default_s", 0), 3), fmt(r[k].get("option_s", 0), 3)] for k in xp]))
    return "\n\n".join(parts)


def main() -> None:
    res = load()
    print("# Performance\n\nGenerated by `python benchmarks/report.py` from "
          "`benchmarks/results/*.jsonl` (each figure is a ratio to a reference measured in "
          "the same run; absolute numbers move with machine load).\n")
    for machine in sorted(res):
        print(section(machine, res[machine]) + "\n")
    print(NOTES)


if __name__ == "__main__":
    main()
