"""Int8 vs fp32 for deployment: latency at batch 1 and 32, size on disk and test accuracy of
ftlab-quantize's PTQ models (rules from conf/quantize/<file>.yaml, w8a8 with static scales
calibrated on 8 val batches and/or dynamic ones, and weight-only w8) and of the ONNX export
run by ONNX Runtime (fp32, and its int8: `quantize.onnx=true`), as ratios to ftlab's fp32
model measured in the same process (ONNX Runtime's int8 also to its own fp32).

Goal (issue #7): latency <= 0.5x, size <= 0.3x, accuracy drop <= 1 point on MiniLM/BBC and
EfficientNet-Lite0/ELPV. Each model comes from a finished run dir (its best checkpoint and
test split); without one, a random-init model of the same size on synthetic inputs gives
latency and size only. Latency calls go round-robin over fp32 and the int8 variants (one
call of each in turn), so a shared CPU's load falls on all alike; p50 over --repeats calls.

Run: python benchmarks/quantize.py [--bbc runs/bbc_minilm/default --elpv
runs/elpv_defect/default --repeats 20 --activations static,dynamic]  (~8 min on 2 cores)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from common import emit, image_batch, lite0, minilm, token_batch
from ftlab import onnx_export, quantize, runs
from ftlab.data.batches import ArrayData
from ftlab.latency import interleaved
from ftlab.quantize_report import fp32_bytes, hardware, hlo_dots, logits
from ftlab.models.loading import LoadError
from ftlab.app_schema import QuantizeConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "quantize"
RULES = {"minilm": "default", "lite0": "elpv_defect"}  # conf/quantize/<file>.yaml
GOALS = {"latency": 0.5, "size": 0.3, "accuracy_drop": 0.01}


def from_run(run_dir: Path):
    """(fp32 model, {val, test} data, class names, eval batch size) of a finished run."""
    cfg = runs.load_config(run_dir)
    src = runs.open_split(cfg, run_dir, None, "test", keep=("val", "test"))
    model, _ = runs.load_model(cfg, run_dir, src.data.num_classes, "best", src.data.tasks)
    return model, src.data.parts, src.data.class_names, cfg.trainer.eval_batch_size


def qconfig(name: str) -> QuantizeConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantizeConfig),
                                               OmegaConf.load(CONF / f"{name}.yaml")))


def rules(name: str) -> dict:
    return qconfig(name).rules


def onnx_variants(model, parts, bs, rule_file: str, tmp: Path) -> dict:
    """The model exported to ONNX (fp32) and ONNX Runtime's int8 of it (Lite0: static,
    calibrated on 8 val batches; MiniLM: dynamic), as ftlab-quantize makes them with
    quantize.onnx=true."""
    fp32, int8 = onnx_export.export_pair(
        model, quantize.plan(model, qconfig(rule_file)),
        onnx_export.calibration_set(parts["val"], bs, 8), {"class_names": []}, tmp / "fp32",
        tmp / "int8")
    return {"onnx_fp32": onnx_export.load_onnx(fp32.parent),
            "onnx_int8": onnx_export.load_onnx(int8.parent)}


def size_of(model) -> int:
    if isinstance(model, onnx_export.OnnxModel):
        return (model.folder / onnx_export.MODEL_FILE).stat().st_size
    return int8_bytes(model)


def variants(model, parts, bs, activations: list[str], rule_file: str) -> dict:
    """name -> int8 model: w8a8 per activation mode (static scales calibrated on 8 val
    batches, as ftlab-quantize does; on synthetic inputs, on those), and weight-only w8."""
    out = {}
    for act in activations:
        q = QuantizeConfig(rules=rules(rule_file), activations=act)
        modes = quantize.plan(model, q)
        fake = quantize.fake_quantized(model, modes, act == "static")
        if act == "static":
            quantize.calibrate(fake, parts["val"], bs, 8)
        out[f"w8a8_{act}"] = quantize.to_int8(fake, modes)
    modes = quantize.plan(model, QuantizeConfig(rules=rules(rule_file), weight_only=True))
    out["w8"] = quantize.to_int8(model, modes)
    return out


def int8_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return quantize.save_int8(model, Path(tmp), {}).stat().st_size


def bench(label: str, model, parts, example, bs, args, tmp: Path) -> None:
    ints = variants(model, parts, bs, args.activations.split(","), RULES[label])
    ints.update(onnx_variants(model, parts, bs, RULES[label], tmp))
    data = parts.get("test")
    base_size = fp32_bytes(model)
    emit(f"quantize/{label}/fp32/size", base_size / 1e6, "MB")
    accs = {}
    if data is not None:
        for name, m in {"fp32": model, **ints}.items():
            out, labels = logits(m, data, bs)
            accs[name] = float((out.argmax(-1) == labels).mean())
        emit(f"quantize/{label}/fp32/accuracy", accs["fp32"], "accuracy", n=len(labels))
    lat = interleaved({"fp32": model, **ints}, example, (1, 32), args.repeats)
    for b in ("1", "32"):
        emit(f"quantize/{label}/fp32/latency_b{b}", lat["fp32"][b]["p50_ms"], "ms")
    for name, m in ints.items():
        size = size_of(m) / base_size
        goal = name != "onnx_fp32"  # the runtime alone, not an int8 model
        emit(f"quantize/{label}/{name}/size", size, "x fp32", f"quantize/{label}/fp32/size",
             **({"goal": GOALS["size"], "met": size <= GOALS["size"]} if goal else {}))
        for b in ("1", "32"):
            ratio = lat[name][b]["p50_ms"] / lat["fp32"][b]["p50_ms"]
            emit(f"quantize/{label}/{name}/latency_b{b}", ratio, "x fp32",
                 f"quantize/{label}/fp32/latency_b{b}", ms=round(lat[name][b]["p50_ms"], 3),
                 **({"goal": GOALS["latency"], "met": ratio <= GOALS["latency"]} if goal
                    else {}))
            if name == "onnx_int8":  # int8 vs fp32 within ONNX Runtime
                emit(f"quantize/{label}/{name}/latency_b{b}_vs_onnx_fp32",
                     ratio / (lat["onnx_fp32"][b]["p50_ms"] / lat["fp32"][b]["p50_ms"]),
                     "x onnx_fp32", f"quantize/{label}/onnx_fp32/latency_b{b}")
        if accs:
            drop = accs["fp32"] - accs[name]
            emit(f"quantize/{label}/{name}/accuracy_drop", drop, "accuracy",
                 f"quantize/{label}/fp32/accuracy",
                 accuracy=accs[name], goal=GOALS["accuracy_drop"],
                 met=drop <= GOALS["accuracy_drop"])
        if not isinstance(m, onnx_export.OnnxModel):
            emit(f"quantize/{label}/{name}/dots", 0, "count", None,
                 **hlo_dots(m, {k: v[:1] for k, v in example.items()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bbc", default="runs/bbc_minilm/default")
    ap.add_argument("--elpv", default="runs/elpv_defect/default")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--activations", default="static,dynamic")
    ap.add_argument("--models", default="minilm,lite0")
    args = ap.parse_args()
    emit("quantize/device", 0, hardware())
    synthetic = {"minilm": (minilm, lambda: token_batch(32, 128)),
                 "lite0": (lite0, lambda: image_batch(32, 128))}
    dirs = {"minilm": args.bbc, "lite0": args.elpv}
    for label in args.models.split(","):
        run_dir = ROOT / dirs[label]
        try:
            model, parts, _, bs = from_run(run_dir)
            example = next(iter(_rows(parts["test"], 32)))
            emit(f"quantize/{label}/source", 0, str(run_dir), rules=RULES[label])
        except (LoadError, ValueError, OSError) as e:  # no run: random init, no accuracy
            emit(f"quantize/{label}/source", 0, "synthetic", reason=str(e)[:200])
            model, bs = synthetic[label][0](), 32
            example = synthetic[label][1]()
            parts = {"val": ArrayData(dict(example))}
        example = {k: v for k, v in example.items() if k not in ("label", "weight")}
        with tempfile.TemporaryDirectory() as tmp:
            bench(label, model, parts, example, bs, args, Path(tmp))


def _rows(data, n: int):
    yield {k: v[np.arange(n) % len(data)] for k, v in data.arrays.items()}


if __name__ == "__main__":
    from common import run
    run(main)
