"""HF `BertModel` tensor names -> ftlab BERT nnx paths."""
from ftlab.models.loading import Rename, transpose

_LAYER = r"(?:bert\.)?encoder\.layer\.(\d+)\."
_EMB = r"(?:bert\.)?embeddings\."

HF_BERT = (
    Rename(_EMB + r"word_embeddings\.weight", "embeddings/word/embedding"),
    Rename(_EMB + r"position_embeddings\.weight", "embeddings/position/embedding"),
    Rename(_EMB + r"token_type_embeddings\.weight", "embeddings/token_type/embedding"),
    Rename(_EMB + r"LayerNorm\.weight", "embeddings/norm/scale"),
    Rename(_EMB + r"LayerNorm\.bias", "embeddings/norm/bias"),
    Rename(_LAYER + r"attention\.self\.(query|key|value)\.weight",
           r"layers/\1/attention/\2/kernel", transpose),
    Rename(_LAYER + r"attention\.self\.(query|key|value)\.bias",
           r"layers/\1/attention/\2/bias"),
    Rename(_LAYER + r"attention\.output\.dense\.weight",
           r"layers/\1/attention/out/kernel", transpose),
    Rename(_LAYER + r"attention\.output\.dense\.bias", r"layers/\1/attention/out/bias"),
    Rename(_LAYER + r"attention\.output\.LayerNorm\.weight",
           r"layers/\1/attention_norm/scale"),
    Rename(_LAYER + r"attention\.output\.LayerNorm\.bias",
           r"layers/\1/attention_norm/bias"),
    Rename(_LAYER + r"intermediate\.dense\.weight", r"layers/\1/fc1/kernel", transpose),
    Rename(_LAYER + r"intermediate\.dense\.bias", r"layers/\1/fc1/bias"),
    Rename(_LAYER + r"output\.dense\.weight", r"layers/\1/fc2/kernel", transpose),
    Rename(_LAYER + r"output\.dense\.bias", r"layers/\1/fc2/bias"),
    Rename(_LAYER + r"output\.LayerNorm\.weight", r"layers/\1/mlp_norm/scale"),
    Rename(_LAYER + r"output\.LayerNorm\.bias", r"layers/\1/mlp_norm/bias"),
)
