"""HF `ViTModel` / `ViTForImageClassification` tensor names -> ftlab ViT nnx paths
(`google/vit-base-patch16-224-in21k`, `WinKawaks/vit-small-patch16-224`, ...)."""
import numpy as np

from ftlab.models.loading import Rename, transpose


def patch_kernel(a: np.ndarray) -> np.ndarray:
    """Patch conv (D, C, P, P) -> (P*P*C, D), rows in the (row, column, channel) order in
    which `vit.Embeddings` flattens a patch."""
    d, c, p, q = a.shape
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0).reshape(p * q * c, d))


_V = r"(?:vit\.)?"
_L = _V + r"encoder\.layer\.(\d+)\."
_LN = {"weight": "scale", "bias": "bias"}

HF_VIT = (
    Rename(_V + r"embeddings\.cls_token", "embeddings/cls_token"),
    Rename(_V + r"embeddings\.position_embeddings", "embeddings/position"),
    Rename(_V + r"embeddings\.patch_embeddings\.projection\.weight", "embeddings/patch/kernel",
           patch_kernel),
    Rename(_V + r"embeddings\.patch_embeddings\.projection\.bias", "embeddings/patch/bias"),
    Rename(_L + r"attention\.attention\.(query|key|value)\.weight",
           r"layers/\1/attention/\2/kernel", transpose),
    Rename(_L + r"attention\.attention\.(query|key|value)\.bias", r"layers/\1/attention/\2/bias"),
    Rename(_L + r"attention\.output\.dense\.weight", r"layers/\1/attention/out/kernel", transpose),
    Rename(_L + r"attention\.output\.dense\.bias", r"layers/\1/attention/out/bias"),
    Rename(_L + r"intermediate\.dense\.weight", r"layers/\1/fc1/kernel", transpose),
    Rename(_L + r"intermediate\.dense\.bias", r"layers/\1/fc1/bias"),
    Rename(_L + r"output\.dense\.weight", r"layers/\1/fc2/kernel", transpose),
    Rename(_L + r"output\.dense\.bias", r"layers/\1/fc2/bias"),
    Rename(_L + r"layernorm_before\.(weight|bias)", lambda m: f"layers/{m[1]}/attention_norm/"
           + _LN[m[2]]),
    Rename(_L + r"layernorm_after\.(weight|bias)", lambda m: f"layers/{m[1]}/mlp_norm/"
           + _LN[m[2]]),
    Rename(_V + r"layernorm\.(weight|bias)", lambda m: "norm/" + _LN[m[1]]),
    Rename(r"classifier\.weight", "head/layers/0/kernel", transpose),
    Rename(r"classifier\.bias", "head/layers/0/bias"),
)
CLASSIFIER = r"classifier\..*"
# ViTModel's pooler (dense + tanh) is not used: the head reads the normalised [CLS] token, as
# ViTForImageClassification's classifier does; the mask token is for masked-image modelling.
SKIP = (_V + r"pooler\..*", _V + r"embeddings\.mask_token")
