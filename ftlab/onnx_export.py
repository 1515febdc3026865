"""ONNX Runtime deployment of a finished run's model: the fp32 model as a standard ONNX graph,
and its int8 version from ONNX Runtime's static quantization, which runs on MLAS's int8
kernels (VNNI / AMX on x86).

Why a second int8 path: on XLA:CPU the int8 EfficientNet (`ftlab.quantize`) runs s8 dots for
its 1x1 convs but its depthwise convs, BatchNorm, ReLU6 and the (de)quantize passes in f32,
and stays at ~0.85x of fp32 latency (README, int8 section). ONNX Runtime fuses a conv with
its requantization and runs the depthwise convs in int8 too.

The graph is written from the module tree in standard ops: the input (NHWC, 0-255) is
normalised and transposed to NCHW, each BatchNorm is folded into the conv before it, ReLU6
is `Clip(0, 6)`, the head is `Gemm`s. Every `Conv` / `Gemm` node is named by the param path
of its kernel (`blocks/3/expand/kernel`, as in `ftlab-quantize`'s rules), so the weights
whose mode is fp32 are the nodes left out of quantization. Int8: QDQ format, int8 weights
with one scale per output channel, uint8 activations with one scale per tensor from the
min / max over calibration batches (ONNX Runtime's x86 kernels are u8 x s8).

Supported: EfficientNet-Lite (single task). Other models keep the XLA int8 path.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ftlab.data.batches import ArrayData, batches
from ftlab.models.efficientnet import EfficientNetLite, same_pad
from ftlab.models.heads import ACTIVATIONS as HEAD_ACTIVATIONS, ClassifierHead
from ftlab.models.loading import LoadError
from ftlab.schema import ConfigError

MODEL_FILE, META_FILE, FORMAT = "model.onnx", "onnx.json", "ftlab-onnx/1"
OPSET = 20  # Gelu (a head's activation) is an op from 20 on
ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "gelu": "Gelu"}


def check(model, specs=None) -> None:
    """Refuse, naming `quantize.onnx`, a model this module cannot write as a graph."""
    if specs is not None and len(specs) > 1:
        raise ConfigError("quantize.onnx", "multi-task models are not exported to ONNX; set "
                                           "quantize.onnx=false")
    if not isinstance(model, EfficientNetLite) or not isinstance(model.head, ClassifierHead):
        raise ConfigError("quantize.onnx", f"{type(model).__name__} is not exported to ONNX "
                                           "(EfficientNet-Lite with one head is); set "
                                           "quantize.onnx=false and use the XLA int8 models")


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

    def op(self, kind: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        from onnx import helper
        out = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=name or out, **attrs))
        return out


def _fold(bn, w_oihw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the BatchNorm after it folded in (inference statistics)."""
    scale = np.asarray(bn.scale[...]) / np.sqrt(np.asarray(bn.var[...]) + bn.epsilon)
    bias = np.asarray(bn.bias[...]) - np.asarray(bn.mean[...]) * scale
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
        w, b = _fold(bn, np.asarray(layer.kernel[...]).T[:, :, None, None])
        return self.conv(x, f"{path}/kernel", w, b)

    def block(self, x: str, i: int, blk) -> str:
        h = x
        if blk.expand is not None:
            h = self.relu6(self.pointwise(h, f"blocks/{i}/expand", blk.expand, blk.bn0))
        k = np.asarray(blk.depthwise.kernel[...])  # (k, k, C)
        w, b = _fold(blk.bn1, k.transpose(2, 0, 1)[:, None])
        h = self.relu6(self.conv(h, f"blocks/{i}/depthwise/kernel", w, b,
                                 blk.depthwise.stride, group=k.shape[2]))
        h = self.pointwise(h, f"blocks/{i}/project", blk.project, blk.bn2)
        return self.g.op("Add", [x, h]) if blk.residual else h


def graph(model: EfficientNetLite, height: int, width: int):
    """The model (inference mode) as an ONNX model: input `image` (N, height, width, 3) f32
    in 0-255, output `logits` (N, classes)."""
    import onnx
    from onnx import TensorProto, helper
    check(model)
    g = _Graph()
    x = g.op("Div", [g.op("Sub", ["image", g.const(model.mean)]), g.const(model.std)])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    lite = _Lite(g, (height, width))
    w, b = _fold(model.stem.bn, np.asarray(model.stem.conv.kernel[...]).transpose(3, 2, 0, 1))
    x = lite.relu6(lite.conv(x, "stem/conv/kernel", w, b, model.stem.conv.stride))
    for i, blk in enumerate(model.blocks):
        x = lite.block(x, i, blk)
    x = lite.relu6(lite.pointwise(x, "top/conv", model.top.conv, model.top.bn))
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    head = model.head
    for i, layer in enumerate(head.layers):
        if i:
            kind = ACTIVATIONS[{f: n for n, f in HEAD_ACTIVATIONS.items()}[head.activation]]
            x = g.op(kind, [x], **({"approximate": "tanh"} if kind == "Gelu" else {}))
        path = f"head/layers/{i}/kernel"
        x = g.op("Gemm", [x, g.const(np.asarray(layer.kernel[...]).T, path),
                          g.const(layer.bias[...])], name=path, transB=1)
    g.nodes[-1].output[0] = "logits"
    classes = int(head.layers[-1].kernel.shape[1])
    out = helper.make_model(
        helper.make_graph(g.nodes, "ftlab", [helper.make_tensor_value_info(
            "image", TensorProto.FLOAT, ["batch", height, width, 3])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
            g.inits),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ftlab")
    onnx.checker.check_model(out)
    return out


def _image(batch: dict) -> np.ndarray:
    return np.asarray(batch["image"], np.float32)


def save(model: EfficientNetLite, folder: Path, meta: dict, example: dict) -> Path:
    """Write the fp32 graph (input size from `example["image"]`) and its meta to `folder`."""
    _, h, w, _ = np.shape(example["image"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    import onnx
    onnx.save(graph(model, h, w), str(path))
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, "int8": False, **meta},
                                               indent=2))
    return path


def quantize_static(fp32: Path, folder: Path, calibration: Iterable[dict],
                    modes: dict[str, str], meta: dict) -> Path:
    """ONNX Runtime's static int8 of the graph at `fp32`, calibrated on `calibration` batches;
    weights whose mode is fp32 keep their nodes in fp32. Writes `folder`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static as qs)
    import onnx

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"image": _image(b)}

    nodes = {n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node}
    excluded = sorted(p for p, m in modes.items() if m == "fp32" and p in nodes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    hint = _Drop("pre-process")  # its advice to pre-process first: our graph has static
    logging.getLogger().addFilter(hint)  # shapes and no BatchNorm left; measured, no faster
    try:
        qs(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
           calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    finally:
        logging.getLogger().removeFilter(hint)
    (folder / META_FILE).write_text(json.dumps(
        {"format": FORMAT, "int8": True, "fp32_nodes": excluded, **meta}, indent=2))
    return path


class _Drop(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class OnnxModel:
    """A model saved by `save` / `quantize_static`, run by ONNX Runtime on the CPU:
    `logits(batch)` on prepared inputs (`batch["image"]`, NHWC 0-255)."""

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
        self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), opts,
                                            providers=["CPUExecutionProvider"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def logits(self, batch: dict) -> np.ndarray:
        return self.session.run(["logits"], {"image": _image(batch)})[0]

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
