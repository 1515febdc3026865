"""BERT encoder (HF `BertModel` layout) in Flax nnx, with a classifier head.

Models are built in inference mode (dropout off); the trainer turns dropout on per phase
in the modules that train (`ftlab.step.set_modes`).

Attention runs in (batch, heads, time, dim) layout with plain matmuls, which XLA's CPU
backend executes several times faster than an einsum over (batch, time, heads, dim).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ftlab.models.dropout import Dropout
from ftlab.models.gelu import gelu
from ftlab.models.heads import ClassifierHead
from ftlab.models.precision import batched_matmul


@dataclasses.dataclass(frozen=True)
class BertSize:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    max_positions: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    act: str = "gelu"  # HF hidden_act


VARIANTS = {
    "minilm-l6": BertSize(vocab_size=30522, hidden=384, layers=6, heads=12, mlp=1536),
    "bert-base": BertSize(vocab_size=30522, hidden=768, layers=12, heads=12, mlp=3072),
    "bert-large": BertSize(vocab_size=30522, hidden=1024, layers=24, heads=16, mlp=4096),
    "tiny": BertSize(vocab_size=64, hidden=32, layers=2, heads=2, mlp=64, max_positions=128),
}

ACTS = {"gelu": gelu,
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


def from_hf(config: dict) -> BertSize:
    """Sizes from an HF `BertModel` config.json (BERT, BioBERT, MiniLM, ...)."""
    if config.get("model_type") != "bert":
        raise ValueError(f"config.json has model_type '{config.get('model_type')}', not 'bert'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if config.get("hidden_act", "gelu") not in ACTS:
        raise ValueError(f"hidden_act '{config['hidden_act']}' is not one of: {', '.join(ACTS)}")
    return BertSize(vocab_size=config["vocab_size"], hidden=config["hidden_size"],
                    layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                    mlp=config["intermediate_size"],
                    max_positions=config.get("max_position_embeddings", 512),
                    type_vocab_size=config.get("type_vocab_size", 2),
                    ln_eps=config.get("layer_norm_eps", 1e-12),
                    act=config.get("hidden_act", "gelu"))


class Embeddings(nnx.Module):
    def __init__(self, size: BertSize, dropout: float, rngs: nnx.Rngs):
        self.word = nnx.Embed(size.vocab_size, size.hidden, rngs=rngs)
        self.position = nnx.Embed(size.max_positions, size.hidden, rngs=rngs)
        self.token_type = nnx.Embed(size.type_vocab_size, size.hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(size.hidden, epsilon=size.ln_eps, rngs=rngs)
        self.dropout = Dropout(dropout, deterministic=True)

    def __call__(self, ids, *, rngs=None):
        positions = jnp.arange(ids.shape[1])[None, :]
        x = self.word(ids) + self.position(positions) + self.token_type.embedding[...][0]
        return self.dropout(self.norm(x), rngs=rngs)


class SelfAttention(nnx.Module):
    def __init__(self, size: BertSize, dropout: float, rngs: nnx.Rngs):
        self.heads = size.heads
        self.query = nnx.Linear(size.hidden, size.hidden, rngs=rngs)
        self.key = nnx.Linear(size.hidden, size.hidden, rngs=rngs)
        self.value = nnx.Linear(size.hidden, size.hidden, rngs=rngs)
        self.out = nnx.Linear(size.hidden, size.hidden, rngs=rngs)
        self.dropout = Dropout(dropout, deterministic=True)
        self.compute_dtype = "float32"  # of the two attention matmuls; see models.precision

    def __call__(self, x, bias, *, rngs=None):
        b, t, c = x.shape
        d = c // self.heads

        def split(y):  # (b, t, c) -> (b * h, t, d): merging b and h makes XLA copy to
            # row-major, where a (b, h, t, d) transpose could stay a view of y's layout.
            return y.reshape(b, t, self.heads, d).transpose(0, 2, 1, 3).reshape(-1, t, d)

        q = split(self.query(x)) * (1.0 / math.sqrt(d))
        k, v = split(self.key(x)), split(self.value(x))
        scores = batched_matmul(q, k, self.compute_dtype, nt=True).reshape(b, -1, t, t)
        probs = self.dropout(jax.nn.softmax(scores + bias, axis=-1), rngs=rngs)
        ctx = batched_matmul(probs.reshape(-1, t, t), v, self.compute_dtype)
        ctx = ctx.reshape(b, -1, t, d).transpose(0, 2, 1, 3).reshape(b, t, c)
        return self.out(ctx)


class Layer(nnx.Module):
    def __init__(self, size: BertSize, dropout: float, attn_dropout: float, rngs: nnx.Rngs):
        self.attention = SelfAttention(size, attn_dropout, rngs)
        self.attention_norm = nnx.LayerNorm(size.hidden, epsilon=size.ln_eps, rngs=rngs)
        self.fc1 = nnx.Linear(size.hidden, size.mlp, rngs=rngs)
        self.fc2 = nnx.Linear(size.mlp, size.hidden, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(size.hidden, epsilon=size.ln_eps, rngs=rngs)
        self.dropout = Dropout(dropout, deterministic=True)
        self.act = ACTS[size.act]

    def __call__(self, x, bias, *, rngs=None):
        x = self.attention_norm(x + self.dropout(self.attention(x, bias, rngs=rngs), rngs=rngs))
        h = self.fc2(self.act(self.fc1(x)))
        return self.mlp_norm(x + self.dropout(h, rngs=rngs))


class BertClassifier(nnx.Module):
    """BERT backbone, pooled (mean over real tokens, or [CLS]), then a new head.

    The forward pass is a chain of stages (embeddings, each layer, pooling + head), so a run
    whose first stages are frozen can cache their output once and start from `start`:
    stage s > 0 takes the hidden states entering it (`batch["hidden"]`; pooled for the head).
    """

    def __init__(self, size: BertSize, num_classes: int, *, pooling: str = "mean",
                 dropout: float = 0.1, attention_dropout: float = 0.1,
                 head_hidden=(), head_activation: str = "gelu", head_dropout: float = 0.1,
                 rngs: nnx.Rngs):
        self.pooling = pooling
        self.embeddings = Embeddings(size, dropout, rngs)
        self.layers = nnx.List([Layer(size, dropout, attention_dropout, rngs)
                                for _ in range(size.layers)])
        self.head = ClassifierHead(size.hidden, num_classes, hidden=head_hidden,
                                   activation=head_activation, dropout=head_dropout, rngs=rngs)

    def stage_prefixes(self) -> list[str]:
        """Param-path prefix of each stage, in forward order."""
        return ["embeddings/", *[f"layers/{i}/" for i in range(len(self.layers))], "head/"]

    def _pool(self, x, mask):
        if self.pooling == "cls":
            return x[:, 0]
        m = mask[..., None].astype(x.dtype)
        return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    def forward(self, batch, start: int = 0, stop: int | None = None, *, rngs=None):
        """Run stages [start, stop); stop=None runs to the logits."""
        stop = len(self.layers) + 2 if stop is None else stop
        mask = batch["attention_mask"]
        x = batch["input_ids"] if start == 0 else batch["hidden"]
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
        for s in range(start, stop):
            if s == 0:
                x = self.embeddings(x, rngs=rngs)
            elif s <= len(self.layers):
                x = self.layers[s - 1](x, bias, rngs=rngs)
            else:
                x = self.head(x, rngs=rngs)
            if s == len(self.layers):  # the last layer's stage ends with pooling
                x = self._pool(x, mask)
        return x

    def embed(self, ids, mask):
        """Pooled sentence embedding, (batch, hidden)."""
        return self.forward({"input_ids": ids, "attention_mask": mask}, 0, len(self.layers) + 1)

    def __call__(self, batch, *, rngs=None):
        return self.forward(batch, rngs=rngs)
