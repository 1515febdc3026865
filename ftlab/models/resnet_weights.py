"""ResNet tensor names -> ftlab ResNet nnx paths, for the two published namings:

- HF `ResNetModel` / `ResNetForImageClassification` (`microsoft/resnet-50`, ...):
  `embedder.embedder.convolution.weight`, `encoder.stages.S.layers.B.layer.K.convolution`,
  `...shortcut.convolution`, `normalization.*`, classifier `classifier.1.*`;
- timm and torchvision (`timm/resnet50.a1_in1k`, torchvision `resnet50-*.pth`):
  `conv1`, `bn1`, `layerN.B.convK`, `layerN.B.bnK`, `layerN.B.downsample.0/1`, `fc.*`.
"""
import numpy as np

from ftlab.models.efficientnet_weights import dense_conv, pointwise
from ftlab.models.loading import Rename, transpose

BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN = r"(weight|bias|running_mean|running_var)"


def conv_kernel(a: np.ndarray) -> np.ndarray:
    """torch (cout, cin, k, k) -> (cin, cout) for 1x1 (a matmul here), else (k, k, cin, cout)."""
    return pointwise(a) if a.shape[2:] == (1, 1) else dense_conv(a)


def _bn_target(prefix: str):
    """Target function: `prefix` (with match groups expanded) + the BN leaf's nnx name."""
    return lambda m: m.expand(prefix) + BN[m.group(m.lastindex)]


_HF = r"(?:resnet\.)?"
_HF_LAYER = _HF + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
HF_RESNET = (
    Rename(_HF + r"embedder\.embedder\.convolution\.weight", "stem/conv/kernel", dense_conv),
    Rename(_HF + r"embedder\.embedder\.normalization\." + _BN, _bn_target("stem/bn/")),
    Rename(_HF_LAYER + r"shortcut\.convolution\.weight", r"stages/\1/\2/shortcut/conv/kernel",
           pointwise),
    Rename(_HF_LAYER + r"shortcut\.normalization\." + _BN,
           _bn_target(r"stages/\1/\2/shortcut/bn/")),
    Rename(_HF_LAYER + r"layer\.(\d)\.convolution\.weight",
           lambda m: f"stages/{m[1]}/{m[2]}/conv{int(m[3]) + 1}/kernel", conv_kernel),
    Rename(_HF_LAYER + r"layer\.(\d)\.normalization\." + _BN,
           lambda m: f"stages/{m[1]}/{m[2]}/bn{int(m[3]) + 1}/{BN[m[4]]}"),
    Rename(r"classifier\.1\.weight", "head/layers/0/kernel", transpose),
    Rename(r"classifier\.1\.bias", "head/layers/0/bias"),
)
HF_CLASSIFIER = r"classifier\.1\..*"

_TV_LAYER = r"layer(\d+)\.(\d+)\."


def _stage(m) -> str:
    """timm / torchvision count stages from layer1."""
    return f"stages/{int(m[1]) - 1}/{m[2]}/"


TIMM_RESNET = (
    Rename(r"conv1\.weight", "stem/conv/kernel", dense_conv),
    Rename(r"bn1\." + _BN, _bn_target("stem/bn/")),
    Rename(_TV_LAYER + r"conv(\d)\.weight", lambda m: _stage(m) + f"conv{m[3]}/kernel",
           conv_kernel),
    Rename(_TV_LAYER + r"bn(\d)\." + _BN, lambda m: _stage(m) + f"bn{m[3]}/{BN[m[4]]}"),
    Rename(_TV_LAYER + r"downsample\.0\.weight", lambda m: _stage(m) + "shortcut/conv/kernel",
           pointwise),
    Rename(_TV_LAYER + r"downsample\.1\." + _BN,
           lambda m: _stage(m) + f"shortcut/bn/{BN[m[3]]}"),
    Rename(r"fc\.weight", "head/layers/0/kernel", transpose),
    Rename(r"fc\.bias", "head/layers/0/bias"),
)
TIMM_CLASSIFIER = r"fc\..*"

SKIP = (r".*num_batches_tracked",)
