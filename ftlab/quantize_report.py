"""`ftlab-quantize` on a finished run: PTQ and QAT int8 models (and, with `quantize.onnx`, the
ONNX export in ONNX Runtime, fp32 and int8) next to fp32 on the test split (accuracy,
per-class recall, size on disk, latency p50/p95, max output difference), the per-layer
sensitivity table, and the int8 artifacts, written to `<run_dir>/quantize/`.

Latency is measured round-robin (one call of each model in turn) so a shared, noisy CPU
slows all of them alike and the ratios to fp32 stay comparable.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ftlab import latency, metrics, onnx_export, peft, quantize, runs, tasks
from ftlab.data.batches import ArrayData, batches
from ftlab.models.loading import param_paths
from ftlab.report import cell, fmt, table
from ftlab.app_schema import QuantizeAppConfig
from ftlab.schema import ConfigError
from ftlab.step import make_eval_step, set_modes

log = logging.getLogger(__name__)

MARK = "<!-- ftlab-quantize -->"
OUTPUTS = ("ptq", "qat", "onnx_fp32", "onnx_ptq", "report.md", "quantize.json")


def hardware() -> str:
    """The machine the numbers come from: CPU model, usable cores, int8 instructions."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.platform}: {dev.device_kind}"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(flags.group(1).split()) if flags else set()
    isa = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return (f"cpu: {name.group(1).strip() if name else 'unknown CPU'}, "
            f"{len(os.sched_getaffinity(0))} cores" + (f" ({', '.join(isa)})" if isa else ""))


def _within(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def out_dir(app: QuantizeAppConfig, run_dir: Path) -> Path:
    out = Path(app.out) if app.out else run_dir / "quantize"
    if _within(out, run_dir) and not _within(out, run_dir / "quantize"):
        raise ConfigError("out", f"{out} is inside the run dir but not under "
                                 f"{run_dir / 'quantize'}; ftlab-quantize writes nothing "
                                 "else there (or give a folder outside the run dir)")
    return out


def check_run(app: QuantizeAppConfig) -> Path:
    run_dir = Path(app.run_dir)
    if app.checkpoint not in ("best", "latest"):
        raise ConfigError("checkpoint", f"'{app.checkpoint}' is not one of: best, latest")
    if not (run_dir / "ckpt" / app.checkpoint).is_dir():
        raise ConfigError("run_dir", f"{run_dir} has no ckpt/{app.checkpoint} checkpoint; "
                                     "give a finished ftlab-train run dir (or rerun the "
                                     "same ftlab-train command to finish it)")
    return run_dir


def check_skeleton(skeleton, model) -> None:
    """The int8 artifact rebuilds the model without its source: its shapes must not
    depend on the source (model.variant=auto reads them from the source's config.json)."""
    want = {p: s for p, s in param_paths(model).items() if "/lora_" not in p}
    have = param_paths(skeleton)
    diff = sorted(set(want) ^ set(have)) + [p for p in want.keys() & have.keys()
                                            if want[p] != have[p]]
    if diff:
        raise ConfigError("model.variant", f"the model built without its source differs on "
                                           f"{len(diff)} params (e.g. {diff[0]}); int8 "
                                           "artifacts need a named variant, not sizes read "
                                           "from the source's config.json")


def logits(model, data: ArrayData, bs: int, limit=None, specs=None):
    """(primary-task logits, labels) of an nnx model or an ONNX Runtime one."""
    if isinstance(model, onnx_export.OnnxModel):
        return model.predict(data, bs, limit)
    return quantize.logits(model, data, bs, limit, specs)


def accuracy(model, data: ArrayData, bs: int, limit, class_names, specs,
             ref: np.ndarray | None) -> tuple[dict, np.ndarray]:
    out, labels = logits(model, data, bs, limit, specs)
    ev = metrics.full(metrics.softmax(out), labels, class_names)
    row = {"accuracy": ev["metrics"]["accuracy"], "macro_f1": ev["metrics"]["macro_f1"],
           "recall": {c: m["recall"] for c, m in ev["per_class"].items()},
           "max_abs_logit_diff": 0.0 if ref is None else float(np.abs(out - ref).max())}
    return row, out


def fp32_bytes(model) -> int:
    """Size of the fp32 weights as one safetensors file (same format as the int8 one)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        peft.save_weights(model, path)
        return latency.disk_bytes(path)


def hlo_dots(model, example: dict) -> dict:
    """Dots in the compiled forward pass by result type: s32 ones are int8 x int8."""
    set_modes(model, None)
    text = make_eval_step(nnx.graphdef(model)).lower(nnx.state(model), example).compile() \
        .as_text()
    kinds = re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\(", text)
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def rule_counts(modes: dict[str, str]) -> dict[str, int]:
    return {m: list(modes.values()).count(m) for m in sorted(set(modes.values()))}


def rule_table(modes: dict[str, str], shapes: dict[str, tuple]) -> dict:
    out = {}
    for p, mode in modes.items():
        row = out.setdefault(mode, {"weights": 0, "params": 0})
        row["weights"] += 1
        row["params"] += int(np.prod(shapes[p]))
    return out


def run(app: QuantizeAppConfig) -> tuple[dict, Path]:
    """Quantize a run dir's checkpoint (PTQ, then QAT), measure, write the report."""
    from ftlab.train import build_model
    run_dir = check_run(app)
    cfg = runs.load_config(run_dir)
    out, q = out_dir(app, run_dir), app.quantize
    quantize.check(q)
    classes = json.loads((run_dir / "data_summary.json").read_text())["classes"]
    specs = tasks.load(run_dir / "tasks.json")
    deploy = quantize.deploy_config(cfg)
    skeleton = build_model(deploy, len(classes), abstract=True, task_specs=specs)
    check_skeleton(skeleton, build_model(cfg, len(classes), abstract=True, task_specs=specs))
    modes = quantize.plan(skeleton, q)  # bad rules fail before data or weights are read
    if q.onnx:
        onnx_export.check(skeleton, specs)
    paths = quantize.qat_paths(cfg, q.qat, skeleton) if q.qat.epochs else set()
    data = runs.open_split(cfg, run_dir, None, "test").data
    model, step = runs.load_model(cfg, run_dir, data.num_classes, app.checkpoint, data.tasks)
    if cfg.peft.lora:
        peft.merge_lora(model)
    for name in OUTPUTS:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    meta = {"config": _container(deploy), "class_names": data.class_names, "modes": modes,
            "activations": q.activations, "run_dir": str(run_dir),
            "checkpoint": f"{app.checkpoint} (step {step})"}
    log.info("int8 plan (weights per mode): %s", rule_counts(modes))
    variants, files, found = quantize_both(cfg, q, model, modes, paths, data, meta, out,
                                           run_dir)
    rows, example = measure(cfg, variants, files, data)
    result = {"hardware": hardware(), "run_dir": str(run_dir), "name": cfg.name,
              "checkpoint": meta["checkpoint"], "n_test": len(data.parts["test"]),
              "activations": q.activations, "weight_only": q.weight_only,
              "rules": {k: vars(r) for k, r in q.rules.items()},
              "modes": rule_table(modes, param_paths(skeleton)), "weights": modes,
              **found, "qat_trained": sorted(paths), "table": rows,
              "hlo_dots": {k: hlo_dots(variants[k], latency.tile(example, 1))
                           for k in ("fp32", "ptq")},
              "artifacts": {k: str(f) for k, f in files.items()}}
    if q.onnx:
        import onnxruntime
        saved = variants["onnx_ptq"].meta
        result.update(onnxruntime=onnxruntime.__version__, onnx_int8=saved["int8"],
                      onnx_fp32_nodes=saved["fp32_nodes"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text("\n".join(render(result, data.class_names)))
    link_from_eval(run_dir, out, result, data.class_names)
    return result, out


def check_training_config(cfg, num_classes: int, specs) -> None:
    """A training config's `quantize` rules (and QAT regex) against the model it builds,
    before training: what `run` would refuse after it."""
    from ftlab.train import build_model
    skeleton = build_model(quantize.deploy_config(cfg), num_classes, abstract=True,
                           task_specs=specs)
    quantize.plan(skeleton, cfg.quantize)
    if cfg.quantize.onnx:
        onnx_export.check(skeleton, specs)
    if cfg.quantize.qat.epochs:
        quantize.qat_paths(cfg, cfg.quantize.qat, skeleton)


def after_training(cfg, run_dir: Path) -> dict:
    """`run` on a training run that just finished (its best checkpoint, rules
    cfg.quantize): artifacts and report in <run_dir>/quantize/, headline numbers returned."""
    result, out = run(QuantizeAppConfig(run_dir=str(run_dir), quantize=cfg.quantize))
    numbers = headline(result)
    log.info("int8 (%s): %s", out, ", ".join(f"{k.split('/', 1)[1]}={v:.4f}"
                                             for k, v in numbers.items()))
    return numbers


def headline(result: dict) -> dict:
    """Flat numbers of each int8 variant against fp32, for a training run's results.json:
    quantize/<variant>/{accuracy, macro_f1, accuracy_drop, size_ratio, latency_b<n>_ratio}
    (ratios are int8 / fp32, p50 latency measured in the same process), and for onnx_ptq
    latency_b<n>_ratio_onnx_fp32 (int8 / fp32 within ONNX Runtime)."""
    table_, out = result["table"], {}
    base = table_["fp32"]
    for name, r in table_.items():
        if name == "fp32":
            continue
        pre = f"quantize/{name}/"
        out.update({pre + "accuracy": r["accuracy"], pre + "macro_f1": r["macro_f1"],
                    pre + "accuracy_drop": base["accuracy"] - r["accuracy"],
                    pre + "size_ratio": r["size_ratio"]})
        for b, lat in r["latency"].items():
            out[f"{pre}latency_b{b}_ratio"] = lat["p50_ms"] / base["latency"][b]["p50_ms"]
            if name == "onnx_ptq":  # int8 vs fp32 within ONNX Runtime too
                out[f"{pre}latency_b{b}_ratio_onnx_fp32"] = (
                    lat["p50_ms"] / table_["onnx_fp32"]["latency"][b]["p50_ms"])
    return out


def quantize_both(cfg, q, model, modes, paths, data, meta: dict, out: Path,
                  run_dir: Path) -> tuple[dict, dict, dict]:
    """(name -> model: fp32, ptq and, with q.qat.epochs, qat; name -> artifact file;
    {static_scales, sensitivity, onnx_sensitivity, qat history}). Saves each int8 artifact."""
    static, val, onnx_sens = q.activations == "static", data.parts["val"], None
    bs = cfg.trainer.eval_batch_size
    fake = quantize.fake_quantized(model, modes, static)
    scales = quantize.calibrate(fake, val, bs, q.calibration_batches) if static else {}
    sens = quantize.sensitivity(fake, model, modes, val, data.class_names, bs,
                                q.sensitivity_batches, data.tasks) if q.sensitivity else None
    if sens:
        log.info("most sensitive (val accuracy drop): %s", [
            (r["weight"], round(r["accuracy_drop"], 4)) for r in sens["layers"][:3]])
    variants = {"fp32": model, "ptq": quantize.to_int8(fake, modes)}
    files = {"ptq": _save(variants["ptq"], out / "ptq", meta, run_dir)}
    history = None
    if q.qat.epochs:
        trained = quantize.fake_quantized(model, modes, static)
        if static:  # start from PTQ's scales; recalibrated on the trained weights after
            quantize.calibrate(trained, val, bs, q.calibration_batches)
        history = quantize.qat(cfg, q.qat, trained, paths, data)
        if static:
            quantize.calibrate(trained, val, bs, q.calibration_batches)
        variants["qat"] = quantize.to_int8(trained, modes)
        files["qat"] = _save(variants["qat"], out / "qat", {**meta, "qat": history}, run_dir)
    if q.onnx:
        info = {k: meta[k] for k in ("class_names", "run_dir", "checkpoint")}
        calibration = onnx_export.calibration_set(val, bs, q.calibration_batches)
        files["onnx_fp32"], files["onnx_ptq"] = onnx_export.export_pair(
            model, modes, calibration, info, out / "onnx_fp32", out / "onnx_ptq")
        variants.update({k: onnx_export.load_onnx(files[k].parent)
                         for k in ("onnx_fp32", "onnx_ptq")})
        if q.sensitivity:
            onnx_sens = onnx_export.sensitivity(files["onnx_fp32"], calibration, modes, val, bs,
                                                q.sensitivity_batches, data.class_names)
            log.info("most sensitive in ONNX Runtime (val accuracy drop): %s", [
                (r["weight"], round(r["accuracy_drop"], 4)) for r in onnx_sens["layers"][:3]])
    return variants, files, {"static_scales": scales, "sensitivity": sens,
                             "onnx_sensitivity": onnx_sens, "qat": history}


def measure(cfg, variants: dict, files: dict, data) -> tuple[dict, dict]:
    """Each variant's row of the table (test metrics, max logit diff vs fp32, size,
    round-robin latency) and the example inputs the latency used."""
    log.info("measuring %s on test", ", ".join(variants))
    test, bs = data.parts["test"], cfg.trainer.eval_batch_size
    rows, ref = {}, None
    for name, m in variants.items():
        rows[name], out = accuracy(m, test, bs, cfg.trainer.limit_eval_batches,
                                   data.class_names, data.tasks, ref)
        ref = out if ref is None else ref
    sizes = {"fp32": fp32_bytes(variants["fp32"]),
             **{k: latency.disk_bytes(f) for k, f in files.items()}}
    example = next(batches(test, max(cfg.eval.latency_batch_sizes), np.arange(len(test))))
    example = {k: v for k, v in example.items() if k not in ("label", "weight")}
    lat = latency.interleaved(variants, example, cfg.eval.latency_batch_sizes,
                              cfg.eval.latency_iters)
    for name in rows:
        rows[name].update(disk_bytes=sizes[name], size_ratio=sizes[name] / sizes["fp32"],
                          latency=lat[name])
    return rows, example


def _container(cfg) -> dict:
    from omegaconf import OmegaConf
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg))))


def _save(model, folder: Path, meta: dict, run_dir: Path) -> Path:
    path = quantize.save_int8(model, folder, meta)
    if (run_dir / "tasks.json").is_file():
        shutil.copy(run_dir / "tasks.json", folder / "tasks.json")
    return path


def _ms(lat: dict, b: str, key: str):
    return (lat.get(b) or {}).get(key)


def comparison(result: dict, names: list[str]) -> list[str]:
    """The fp32 / PTQ / QAT table (Markdown lines)."""
    rows, base = [], result["table"]["fp32"]
    bs = list(base["latency"])
    header = ["model", "accuracy", "macro-F1", *(f"recall {c}" for c in names), "size (MB)",
              "size ÷ fp32", *(f"b{b} p50 / p95 (ms)" for b in bs),
              *(f"b{b} p50 ÷ fp32" for b in bs), "max abs logit diff"]
    for name, r in result["table"].items():
        lat = r["latency"]
        rows.append([name, r["accuracy"], r["macro_f1"], *(r["recall"][c] for c in names),
                     r["disk_bytes"] / 1e6, r["size_ratio"],
                     *(f"{fmt(_ms(lat, b, 'p50_ms'))} / {fmt(_ms(lat, b, 'p95_ms'))}"
                       for b in bs),
                     *(_ms(lat, b, "p50_ms") / _ms(base["latency"], b, "p50_ms") for b in bs),
                     r["max_abs_logit_diff"]])
    return table(header, rows)


def render(result: dict, names: list[str]) -> list[str]:
    modes = ", ".join(f"{m}: {v['weights']} weights ({v['params']:,} params)"
                      for m, v in result["modes"].items())
    lines = [f"# {cell(result['name'])}: int8 quantization (fp32 vs PTQ vs QAT)", "",
             f"Measured on **{cell(result['hardware'])}**; {result['checkpoint']} checkpoint; "
             f"test split, n={result['n_test']}; activations `{result['activations']}`"
             f"{' (weight-only)' if result['weight_only'] else ''}.", "",
             *comparison(result, names),
             *onnx_note(result),
             "Sizes are the weights as safetensors (fp32: every weight in f32; int8: int8 "
             "weights + f32 scales + the fp32 rest). Latency: one forward pass, round-robin "
             "between the models, after warm-up. Max abs logit diff: vs fp32 on test.", "",
             f"**Weights**: {modes}.", "",
             "**Compiled dots** (forward pass, batch 1; `s32` = int8 x int8 -> int32): " +
             "; ".join(f"{k}: {', '.join(f'{n} {t}' for t, n in v.items())}"
                       for k, v in result["hlo_dots"].items()), ""]
    lines += sensitivity_section(
        result.get("sensitivity"), "Per-layer sensitivity", "only that layer int8 (simulated "
        "by fake-quant, which matches the int8 model to ~1e-6)")
    lines += sensitivity_section(
        result.get("onnx_sensitivity"), "Per-node sensitivity in ONNX Runtime",
        "only that node int8 by ONNX Runtime (its weights, and for static int8 its input "
        "activation with the calibrated range), the rest of the graph fp32")
    if result.get("qat"):
        lines += ["## QAT", "", f"Trained {len(result['qat_trained'])} tensors; "
                  + "; ".join(f"epoch {h['epoch']}: loss {fmt(h.get('train/loss'))}, "
                              f"accuracy {fmt(h.get('train/accuracy'))}"
                              for h in result["qat"]), ""]
    loader = {True: "onnx_export.load_onnx", False: "quantize.load_quantized"}
    lines += ["## Artifacts", "", *(f"- `{k}`: `{v}` — `ftlab.{loader[k.startswith('onnx')]}"
                                    f"(\"{Path(v).parent}\")`"
                                    for k, v in result["artifacts"].items()), ""]
    return lines


def sensitivity_section(sens: dict | None, title: str, how: str) -> list[str]:
    """A sensitivity table (worst first) and the fp32 rule that would keep its worst."""
    if not sens:
        return []
    base, layers = sens["baseline"], sens["layers"]
    worst = [r["weight"] for r in layers[:3] if r["accuracy_drop"] > 0]
    lines = [f"## {title}", "",
             f"Val split (n={sens['n']}), {how}; fp32: accuracy {fmt(base['accuracy'])}, "
             f"macro-F1 {fmt(base['macro_f1'])}.", "",
             *table(["weight", "mode", "accuracy", "accuracy drop", "macro-F1 drop",
                     "max abs logit diff"],
                    [[cell(r["weight"]), r["mode"], r["accuracy"], r["accuracy_drop"],
                      r["macro_f1_drop"], r["max_abs_logit_diff"]] for r in layers])]
    if worst:
        alt = "|".join(re.escape(w) for w in worst)
        lines += ["To keep the worst in fp32, add this rule to a copy of "
                  "`conf/quantize/default.yaml` and pass `quantize=<its name>`: "
                  f"`keep: {{pattern: \"{alt}\", mode: fp32}}`", ""]
    return lines


def onnx_note(result: dict) -> list[str]:
    """What the ONNX Runtime rows are, and their int8 ÷ fp32 latency within that runtime."""
    table_ = result["table"]
    if "onnx_ptq" not in table_:
        return []
    a, b = table_["onnx_ptq"]["latency"], table_["onnx_fp32"]["latency"]
    ratios = ", ".join(f"b{k} {fmt(a[k]['p50_ms'] / b[k]['p50_ms'])}x" for k in a)
    fp32 = result.get("onnx_fp32_nodes") or []
    how = {"static": "static int8 (QDQ: per-channel int8 weights, uint8 activations "
                     "calibrated on the same val batches; depthwise convs int8 too)",
           "dynamic": "dynamic int8 (per-channel int8 weights, activations quantized per "
                      "call; the word-embedding table 8-bit)"}[result["onnx_int8"]]
    return [f"**ONNX Runtime** rows (`onnx_*`): the model as an ONNX graph "
            f"(`ftlab.onnx_export`) run by ONNX Runtime {result['onnxruntime']} on the CPU; "
            f"`onnx_ptq` is its {how}, {len(fp32)} node(s) kept fp32 by the rules"
            f"{': ' + ', '.join(fp32) if fp32 else ''}. onnx_ptq ÷ onnx_fp32 p50 latency: "
            f"{ratios}.", ""]


def link_from_eval(run_dir: Path, out: Path, result: dict, names: list[str]) -> Path | None:
    """Append (or replace) the int8 section of the run's test report, linking the full one."""
    path = run_dir / "eval" / "test" / "report.md"
    if not path.is_file():
        return None
    text = path.read_text().split(MARK)[0].rstrip()
    rel = os.path.relpath(out / "report.md", path.parent)
    path.write_text("\n".join([text, "", MARK, "## Int8 quantization", "",
                               f"Measured on {cell(result['hardware'])}.", "",
                               *comparison(result, names),
                               f"Full report: [{rel}]({rel})", ""]))
    return path
