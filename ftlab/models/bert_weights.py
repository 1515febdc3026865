"""HF `BertModel` tensor names -> ftlab BERT nnx paths (the `bert.` prefix of task models and
the legacy LayerNorm `gamma` / `beta` names of TF-converted checkpoints accepted)."""
from ftlab.models.loading import Rename, transpose

_LAYER = r"(?:bert\.)?encoder\.layer\.(\d+)\."
_EMB = r"(?:bert\.)?embeddings\."
_W, _B = r"(?:weight|gamma)", r"(?:bias|beta)"  # LayerNorm

HF_BERT = (
    Rename(_EMB + r"word_embeddings\.weight", "embeddings/word/embedding"),
    Rename(_EMB + r"position_embeddings\.weight", "embeddings/position/embedding"),
    Rename(_EMB + r"token_type_embeddings\.weight", "embeddings/token_type/embedding"),
    Rename(_EMB + r"LayerNorm\." + _W, "embeddings/norm/scale"),
    Rename(_EMB + r"LayerNorm\." + _B, "embeddings/norm/bias"),
    Rename(_LAYER + r"attention\.self\.(query|key|value)\.weight",
           r"layers/\1/attention/\2/kernel", transpose),
    Rename(_LAYER + r"attention\.self\.(query|key|value)\.bias",
           r"layers/\1/attention/\2/bias"),
    Rename(_LAYER + r"attention\.output\.dense\.weight",
           r"layers/\1/attention/out/kernel", transpose),
    Rename(_LAYER + r"attention\.output\.dense\.bias", r"layers/\1/attention/out/bias"),
    Rename(_LAYER + r"attention\.output\.LayerNorm\." + _W,
           r"layers/\1/attention_norm/scale"),
    Rename(_LAYER + r"attention\.output\.LayerNorm\." + _B,
           r"layers/\1/attention_norm/bias"),
    Rename(_LAYER + r"intermediate\.dense\.weight", r"layers/\1/fc1/kernel", transpose),
    Rename(_LAYER + r"intermediate\.dense\.bias", r"layers/\1/fc1/bias"),
    Rename(_LAYER + r"output\.dense\.weight", r"layers/\1/fc2/kernel", transpose),
    Rename(_LAYER + r"output\.dense\.bias", r"layers/\1/fc2/bias"),
    Rename(_LAYER + r"output\.LayerNorm\." + _W, r"layers/\1/mlp_norm/scale"),
    Rename(_LAYER + r"output\.LayerNorm\." + _B, r"layers/\1/mlp_norm/bias"),
)

# Never used: the pooler (ftlab pools itself), position ids, pre-training heads (MLM, NSP).
SKIP = (r"(bert\.)?pooler\..*", r"(bert\.)?embeddings\.position_ids", r"cls\..*")
# A sequence-classification head sits on the pooler's tanh output, which ftlab does not
# compute: it is skipped for a new head, never mapped.
CLASSIFIER = r"classifier\..*"
