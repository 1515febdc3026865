"""ONNX Runtime deployment of a finished run's model: the fp32 model as a standard ONNX graph,
and its int8 version from ONNX Runtime's quantization, which runs on MLAS's int8 kernels
(VNNI / AMX on x86).

Why a second int8 path: on XLA:CPU the int8 EfficientNet (`ftlab.quantize`) runs s8 dots for
its 1x1 convs but its depthwise convs, BatchNorm, ReLU6 and the (de)quantize passes in f32,
and stays at ~0.85x of fp32 latency (README, int8 section); on a CPU without AMX the int8
MiniLM stays at ~0.7x. ONNX Runtime fuses a conv with its requantization, runs the depthwise
convs in int8 too, and quantizes a transformer's activations on the fly.

The graph is written from the module tree in standard ops, every `Conv` / `MatMul` / `Gather`
with a weight named by that weight's param path (`blocks/3/expand/kernel`,
`layers/0/fc1/kernel`, as in `ftlab-quantize`'s rules), so the weights whose mode is fp32
are the nodes left out of quantization.
- EfficientNet-Lite: the input (NHWC, 0-255) normalised and transposed to NCHW, each
  BatchNorm folded into the conv before it, ReLU6 as `Clip(0, 6)`. Int8: static QDQ, int8
  weights with one scale per output channel, uint8 activations with one scale per tensor
  from the min / max over calibration batches (ONNX Runtime's x86 kernels are u8 x s8).
- BERT (MiniLM): embeddings, attention, `LayerNormalization`, `Gelu`, masked mean / [CLS]
  pooling. Int8: dynamic (weights int8 per output channel, activations quantized per call;
  what ONNX Runtime recommends for transformers; static QDQ measured 1.2x slower here), the
  word-embedding table 8-bit too.
`save` checks that the graph reproduces the model on the example rows before anything else;
`sensitivity` ranks the nodes by what ONNX Runtime's int8 of that node alone costs on val.
Single-task models with one `ClassifierHead`, no unmerged adapters; others keep the XLA path.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from flax import nnx

from ftlab import metrics, peft
from ftlab.data.batches import ArrayData, batches
from ftlab.models.bert import ACTS as BERT_ACTIVATIONS, BertClassifier
from ftlab.models.efficientnet import EfficientNetLite, same_pad
from ftlab.models.heads import ACTIVATIONS as HEAD_ACTIVATIONS, ClassifierHead
from ftlab.models.loading import LoadError
from ftlab.quantize import ranked, sensitivity_row
from ftlab.schema import ConfigError
from ftlab.step import set_modes

MODEL_FILE, META_FILE, FORMAT = "model.onnx", "onnx.json", "ftlab-onnx/1"
OPSET = 20  # Gelu is an op from 20 on
ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "gelu": "Gelu"}
INPUTS = {EfficientNetLite: ("image",), BertClassifier: ("input_ids", "attention_mask")}


def check(model, specs=None) -> None:
    """Refuse, naming `quantize.onnx`, a model this module cannot write as a graph."""
    if specs is not None and len(specs) > 1:
        raise ConfigError("quantize.onnx", "multi-task models are not exported to ONNX; set "
                                           "quantize.onnx=false")
    if type(model) not in INPUTS or not isinstance(model.head, ClassifierHead):
        raise ConfigError("quantize.onnx", f"{type(model).__name__} is not exported to ONNX "
                                           "(EfficientNet-Lite and BERT with one head are); "
                                           "set quantize.onnx=false")
    if any(isinstance(m, peft.AdapterLinear) for _, m in nnx.iter_modules(model)):
        raise ConfigError("quantize.onnx", "bottleneck adapters are not exported to ONNX; set "
                                           "quantize.onnx=false")


class _Graph:
    """Nodes and initializers of the graph being written."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}_{self.n}"

    def const(self, value, name: str | None = None) -> str:
        from onnx import numpy_helper
        name = name or self._name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def ints(self, value) -> str:
        from onnx import numpy_helper
        name = self._name("ints")
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def op(self, kind: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        from onnx import helper
        out = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=name or out, **attrs))
        return out


def _arr(v) -> np.ndarray:
    """A variable's value as a numpy array."""
    return np.asarray(v[...])


def _fold(bn, w_oihw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the BatchNorm after it folded in (inference statistics)."""
    scale = _arr(bn.scale) / np.sqrt(_arr(bn.var) + bn.epsilon)
    bias = _arr(bn.bias) - _arr(bn.mean) * scale
    return w_oihw * scale[:, None, None, None], bias


class _Lite:
    """EfficientNet-Lite as ONNX ops, tracking the spatial size for TF's SAME padding."""

    def __init__(self, g: _Graph, hw: tuple[int, int]):
        self.g, self.hw = g, hw

    def conv(self, x: str, path: str, w_oihw, b, stride: int = 1, group: int = 1) -> str:
        k = w_oihw.shape[2]
        (t, bo), (le, r) = same_pad(self.hw[0], k, stride), same_pad(self.hw[1], k, stride)
        self.hw = (-(-self.hw[0] // stride), -(-self.hw[1] // stride))
        return self.g.op("Conv", [x, self.g.const(w_oihw, path), self.g.const(b)], name=path,
                         kernel_shape=[k, k], strides=[stride, stride], pads=[t, le, bo, r],
                         group=group)

    def relu6(self, x: str) -> str:
        return self.g.op("Clip", [x, self.g.const(np.float32(0)), self.g.const(np.float32(6))])

    def pointwise(self, x: str, path: str, layer, bn) -> str:
        w, b = _fold(bn, _arr(layer.kernel).T[:, :, None, None])
        return self.conv(x, f"{path}/kernel", w, b)

    def block(self, x: str, i: int, blk) -> str:
        h = x
        if blk.expand is not None:
            h = self.relu6(self.pointwise(h, f"blocks/{i}/expand", blk.expand, blk.bn0))
        k = _arr(blk.depthwise.kernel)  # (k, k, C)
        w, b = _fold(blk.bn1, k.transpose(2, 0, 1)[:, None])
        h = self.relu6(self.conv(h, f"blocks/{i}/depthwise/kernel", w, b,
                                 blk.depthwise.stride, group=k.shape[2]))
        h = self.pointwise(h, f"blocks/{i}/project", blk.project, blk.bn2)
        return self.g.op("Add", [x, h]) if blk.residual else h


def _lite(g: _Graph, model: EfficientNetLite, example: dict) -> str:
    _, height, width, _ = np.shape(example["image"])
    x = g.op("Div", [g.op("Sub", ["image", g.const(model.mean)]), g.const(model.std)])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    lite = _Lite(g, (height, width))
    w, b = _fold(model.stem.bn, _arr(model.stem.conv.kernel).transpose(3, 2, 0, 1))
    x = lite.relu6(lite.conv(x, "stem/conv/kernel", w, b, model.stem.conv.stride))
    for i, blk in enumerate(model.blocks):
        x = lite.block(x, i, blk)
    x = lite.relu6(lite.pointwise(x, "top/conv", model.top.conv, model.top.bn))
    return g.op("Flatten", [g.op("GlobalAveragePool", [x])])


def _dense(g: _Graph, x: str, layer, path: str) -> str:
    """`MatMul` (named `path`, the kernel's param path) + bias. Not `Gemm`: ONNX Runtime's
    dynamic quantization rewrites a Gemm under a new name, past the rules' exclusions."""
    return g.op("Add", [g.op("MatMul", [x, g.const(_arr(layer.kernel), path)], name=path),
                        g.const(_arr(layer.bias))])


def _bert(g: _Graph, model: BertClassifier, example: dict) -> str:
    def norm(x, ln):
        return g.op("LayerNormalization", [x, g.const(_arr(ln.scale)), g.const(_arr(ln.bias))],
                    axis=-1, epsilon=float(ln.epsilon))

    def dense(x, layer, path):
        return _dense(g, x, layer, path)

    e = model.embeddings
    word = "embeddings/word/embedding"
    x = g.op("Gather", [g.const(_arr(e.word.embedding), word), "input_ids"], name=word)
    tokens = g.op("Shape", ["input_ids"], start=1, end=2)
    pos = g.op("Slice", [g.const(_arr(e.position.embedding), "embeddings/position/embedding"),
                         g.ints([0]), tokens, g.ints([0])])
    x = norm(g.op("Add", [g.op("Add", [x, pos]), g.const(_arr(e.token_type.embedding)[0])]),
             e.norm)
    keep = g.op("Greater", ["attention_mask", g.ints(0)])
    bias = g.op("Unsqueeze", [g.op("Where", [keep, g.const(np.float32(0)),
                                             g.const(np.float32(-1e9))]), g.ints([1, 2])])
    heads = model.layers[0].attention.heads
    c = _arr(model.layers[0].attention.query.kernel).shape[0]
    d = c // heads
    gelu = {"gelu": {}, "gelu_new": {"approximate": "tanh"},
            "gelu_pytorch_tanh": {"approximate": "tanh"}}
    for i, layer in enumerate(model.layers):
        a, p = layer.attention, f"layers/{i}/attention"

        def heads_of(y, perm=(0, 2, 1, 3)):  # (b, t, c) -> (b, h, t, d), or (b, h, d, t)
            return g.op("Transpose", [g.op("Reshape", [y, g.ints([0, 0, heads, d])])],
                        perm=list(perm))
        q = g.op("Mul", [heads_of(dense(x, a.query, f"{p}/query/kernel")),
                         g.const(np.float32(1.0 / math.sqrt(d)))])
        k = heads_of(dense(x, a.key, f"{p}/key/kernel"), (0, 2, 3, 1))
        v = heads_of(dense(x, a.value, f"{p}/value/kernel"))
        probs = g.op("Softmax", [g.op("Add", [g.op("MatMul", [q, k]), bias])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.ints([0, 0, c])])
        x = norm(g.op("Add", [x, dense(ctx, a.out, f"{p}/out/kernel")]), layer.attention_norm)
        act = next(n for n, f in BERT_ACTIVATIONS.items() if f is layer.act)
        h = dense(x, layer.fc1, f"layers/{i}/fc1/kernel")
        h = g.op("Gelu", [h], **gelu[act]) if act in gelu else g.op("Relu", [h])
        x = norm(g.op("Add", [x, dense(h, layer.fc2, f"layers/{i}/fc2/kernel")]),
                 layer.mlp_norm)
    if model.pooling == "cls":
        return g.op("Gather", [x, g.ints(0)], axis=1)
    m = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=1), g.ints([2])])  # 1: float
    total = g.op("ReduceSum", [g.op("Mul", [x, m]), g.ints([1])], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [m, g.ints([1])], keepdims=0),
                         g.const(np.float32(1))])
    return g.op("Div", [total, count])


def graph(model, example: dict):
    """The model (inference mode) as an ONNX model: inputs as in `example` (`image` (N, H,
    W, 3) f32 in 0-255, or int64 `input_ids` and `attention_mask` (N, T)), output `logits`."""
    import onnx
    from onnx import TensorProto, helper
    check(model)
    g = _Graph()
    x = (_lite if isinstance(model, EfficientNetLite) else _bert)(g, model, example)
    head = model.head
    for i, layer in enumerate(head.layers):
        if i:
            kind = ACTIVATIONS[{f: n for n, f in HEAD_ACTIVATIONS.items()}[head.activation]]
            x = g.op(kind, [x], **({"approximate": "tanh"} if kind == "Gelu" else {}))
        x = _dense(g, x, layer, f"head/layers/{i}/kernel")
    g.nodes[-1].output[0] = "logits"
    classes = int(head.layers[-1].kernel.shape[1])
    inputs = [helper.make_tensor_value_info(
        n, TensorProto.FLOAT if n == "image" else TensorProto.INT64,
        ["batch", *np.shape(example[n])[1:]] if n == "image" else ["batch", "tokens"])
        for n in INPUTS[type(model)]]
    out = helper.make_model(
        helper.make_graph(g.nodes, "ftlab", inputs, [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", classes])], g.inits),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ftlab")
    onnx.checker.check_model(out)
    return out


def _feed(batch: dict, names) -> dict[str, np.ndarray]:
    return {n: np.asarray(batch[n], np.float32 if n == "image" else np.int64) for n in names}


def save(model, folder: Path, meta: dict, example: dict, rows: int = 2) -> Path:
    """Write the fp32 graph (input shapes from `example`) and its meta to `folder`, after
    checking on `rows` rows of `example` that it computes the model's logits."""
    import onnx
    import onnxruntime as ort
    names = INPUTS[type(model)]
    proto = graph(model, example)
    few = {n: np.asarray(example[n])[:rows] for n in names}
    set_modes(model, None)
    ref = np.asarray(model(few))
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]
                               ).run(["logits"], _feed(few, names))[0]
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max()) + 1e-6
    if not diff <= 1e-3 * scale:
        raise ConfigError("quantize.onnx", f"the ONNX graph differs from the model by {diff:.3g}"
                                           f" (max |logit| {scale:.3g}); set quantize.onnx=false")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    onnx.save(proto, str(path))
    (folder / META_FILE).write_text(json.dumps(
        {"format": FORMAT, "int8": None, "inputs": list(names), **meta}, indent=2))
    return path


def quantize(fp32: Path, folder: Path, calibration: Iterable[dict], modes: dict[str, str],
             meta: dict) -> Path:
    """ONNX Runtime's int8 of the graph saved at `fp32` (an image model: static, calibrated
    on the `calibration` batches; a transformer: dynamic); weights whose mode is fp32 keep
    their nodes in fp32. Writes `folder`."""
    names = json.loads((fp32.parent / META_FILE).read_text())["inputs"]
    excluded = sorted(p for p, m in modes.items() if m == "fp32" and p in node_names(fp32))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    method = _ort_int8(fp32, path, names, calibration, exclude=excluded)
    (folder / META_FILE).write_text(json.dumps(
        {"format": FORMAT, "int8": method, "inputs": names, "fp32_nodes": excluded, **meta},
        indent=2))
    return path


def node_names(path: Path) -> set[str]:
    import onnx
    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


def _ort_int8(fp32: Path, path: Path, names, calibration: Iterable[dict], exclude=(),
              only: list[str] | None = None, cache: Path | None = None) -> str:
    """Write ONNX Runtime's int8 of `fp32` to `path` (`only`: just those nodes; `cache`: the
    static ranges' file, computed on the first call and reused after); the method used."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else _feed(b, names)

    hint = _Drop("pre-process")  # its advice to pre-process first: our graphs have no
    logging.getLogger().addFilter(hint)  # BatchNorm or unknown shapes left; measured, no faster
    try:
        if "image" in names:
            quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=only,
                            nodes_to_exclude=list(exclude),
                            calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=cache)
            return "static"
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                         nodes_to_quantize=only, nodes_to_exclude=list(exclude))
        return "dynamic"
    finally:
        logging.getLogger().removeFilter(hint)


def sensitivity(fp32: Path, calibration: list[dict], modes: dict[str, str], data: ArrayData,
                batch_size: int, limit: int | None, class_names) -> dict:
    """Per node that `quantize` makes int8 (named by its weight; `layers`, worst first), the
    metrics on `data` with only that node int8 by ONNX Runtime: its method, and for a static
    graph the ranges calibrated once on `calibration` (the int8 node's input activation is
    quantized too, as in the full int8 graph). `baseline`: the fp32 graph's. The same rows
    as `quantize.sensitivity`, for the runtime that will serve the model."""
    meta = json.loads((fp32.parent / META_FILE).read_text())
    nodes = node_names(fp32)
    live = [p for p, m in modes.items() if m != "fp32" and p in nodes]
    ref, labels = OnnxModel(fp32.parent).predict(data, batch_size, limit)
    base = metrics.classification(ref, labels, class_names)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftlab-onnx-sens-") as tmp:
        folder, cache = Path(tmp) / "node", Path(tmp) / "ranges.json"
        folder.mkdir()
        (folder / META_FILE).write_text(json.dumps(meta))
        for p in live:
            _ort_int8(fp32, folder / MODEL_FILE, meta["inputs"], calibration, only=[p],
                      cache=cache)
            out, _ = OnnxModel(folder).predict(data, batch_size, limit)
            rows.append(sensitivity_row(p, modes[p], base, out, ref, labels, class_names))
    return ranked(base, len(labels), rows)


def calibration_set(val: ArrayData, batch_size: int, n: int) -> list[dict]:
    """The first `n` batches of `val`: static int8's calibration (and `save`'s example)."""
    return list(batches(val, batch_size, np.arange(len(val)), limit=n))


def export_pair(model, modes: dict[str, str], calibration: list[dict], meta: dict,
                fp32_dir: Path, int8_dir: Path) -> tuple[Path, Path]:
    """`save` then `quantize`, calibrated on the `calibration` batches (`calibration_set`; the
    first also gives the input shapes): the fp32 and int8 model files."""
    fp32 = save(model, fp32_dir, meta, calibration[0])
    return fp32, quantize(fp32, int8_dir, calibration, modes, meta)


class _Drop(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class OnnxModel:
    """A model saved by `save` / `quantize`, run by ONNX Runtime on the CPU: `logits(batch)`
    on prepared inputs (the run's image size or tokenizer; `meta["inputs"]` names them)."""

    def __init__(self, folder: Path):
        import onnxruntime as ort
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = len(os.sched_getaffinity(0))  # the job's cores, not the host's
        # Idle threads sleep instead of spinning: spinning threads of one session (or of JAX)
        # slow the next call of another; measured at batch 32 with two sessions in turns, int8
        # / fp32 went from 0.60x spinning to 0.48x (each alone: about the same as not spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ONNX Runtime fuses each residual Add + LayerNormalization of the int8 BERT graph into
        # SkipLayerNormalization, whose CPU kernel took ~2x the time of the two ops it replaces
        # (MiniLM, batch 1: 1.9 ms of an 11 ms call); without that fusion the int8 MiniLM took
        # 0.89x the time at batch 1 and 0.85x at 32 (in turns, two runs; the fp32 graph is
        # not fused either way, and EfficientNet has no LayerNorm).
        self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), opts,
                                            providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["SkipLayerNormFusion"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def logits(self, batch: dict) -> np.ndarray:
        return self.session.run(["logits"], _feed(batch, self.meta["inputs"]))[0]

    def predict(self, data: ArrayData, batch_size: int, limit: int | None = None):
        """(logits, labels) of the real rows of `data`, in order (like `loop.predict`)."""
        outs, labels = [], []
        for b in batches(data, batch_size, np.arange(len(data)), limit=limit):
            keep = b["weight"] > 0
            outs.append(self.logits(b)[keep])
            labels.append(b["label"][keep])
        return np.concatenate(outs), np.concatenate(labels)


def load_onnx(folder: Path | str) -> OnnxModel:
    """The ONNX model in `folder` (e.g. `<run>/quantize/onnx_ptq`), with no checkpoint."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / META_FILE).is_file():
        raise LoadError(f"{folder}: no {MODEL_FILE} + {META_FILE}; give a folder written by "
                        "ftlab-quantize with quantize.onnx=true (<run>/quantize/onnx_ptq)")
    fmt = json.loads((folder / META_FILE).read_text()).get("format")
    if fmt != FORMAT:
        raise LoadError(f"{folder / META_FILE}: format {fmt!r}, expected {FORMAT}")
    return OnnxModel(folder)
