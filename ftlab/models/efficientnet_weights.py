"""torch EfficientNet-Lite names (lukemelas `efficientnet_pytorch` layout) -> nnx paths."""
import numpy as np

from ftlab.models.loading import Rename, transpose


def pointwise(a: np.ndarray) -> np.ndarray:
    """(cout, cin, 1, 1) -> (cin, cout)."""
    return np.ascontiguousarray(a[:, :, 0, 0].T)


def depthwise(a: np.ndarray) -> np.ndarray:
    """(C, 1, k, k) -> (k, k, C)."""
    return np.ascontiguousarray(a[:, 0].transpose(1, 2, 0))


def dense_conv(a: np.ndarray) -> np.ndarray:
    """(cout, cin, k, k) -> (k, k, cin, cout)."""
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0))


BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _bn(source: str, target: str) -> list[Rename]:
    return [Rename(rf"{source}\.{k}", rf"{target}/{v}") for k, v in BN.items()]


_B = r"_blocks\.(\d+)\."
TORCH_LITE = (
    Rename(r"_conv_stem\.weight", "stem/conv/kernel", dense_conv),
    *_bn(r"_bn0", "stem/bn"),
    Rename(_B + r"_expand_conv\.weight", r"blocks/\1/expand/kernel", pointwise),
    *_bn(_B + "_bn0", r"blocks/\1/bn0"),
    Rename(_B + r"_depthwise_conv\.weight", r"blocks/\1/depthwise/kernel", depthwise),
    *_bn(_B + "_bn1", r"blocks/\1/bn1"),
    Rename(_B + r"_project_conv\.weight", r"blocks/\1/project/kernel", pointwise),
    *_bn(_B + "_bn2", r"blocks/\1/bn2"),
    Rename(r"_conv_head\.weight", "top/conv/kernel", pointwise),
    *_bn(r"_bn1", "top/bn"),
    Rename(r"_fc\.weight", "head/layers/0/kernel", transpose),
    Rename(r"_fc\.bias", "head/layers/0/bias"),
)
