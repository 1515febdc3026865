"""Vision Transformer (Dosovitskiy et al. 2021; HF `ViTModel` layout: pre-norm layers, [CLS]
token, learned position embeddings, final LayerNorm) in Flax nnx, with a classifier head on
the normalised [CLS] token.

The patch embedding (a conv with kernel = stride = patch) is a reshape into patches and one
matmul; attention is BERT's (batch, heads, time, dim) matmul layout, several times faster on
XLA's CPU backend than an einsum over (batch, time, heads, dim). The position grid is built
for `image_size`; a checkpoint made at another resolution is resampled (bicubic) on loading,
and an input of another size resamples the grid on the fly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlab.models.bert import ACTS, SelfAttention
from ftlab.models.dropout import Dropout
from ftlab.models.efficientnet import normalize
from ftlab.models.heads import ClassifierHead


@dataclasses.dataclass(frozen=True)
class ViTSize:
    hidden: int
    layers: int
    heads: int
    mlp: int
    patch: int = 16
    image_size: int = 224  # pre-training resolution (the checkpoint's position grid)
    ln_eps: float = 1e-12
    act: str = "gelu"


VARIANTS = {
    "b16": ViTSize(hidden=768, layers=12, heads=12, mlp=3072),
    "s16": ViTSize(hidden=384, layers=12, heads=6, mlp=1536),
    "tiny": ViTSize(hidden=32, layers=2, heads=2, mlp=64, patch=8, image_size=32),
}


def from_hf(config: dict) -> ViTSize:
    """Sizes from an HF `ViTModel` config.json."""
    if config.get("model_type") != "vit":
        raise ValueError(f"config.json has model_type '{config.get('model_type')}', not 'vit'")
    if not config.get("qkv_bias", True) or config.get("num_channels", 3) != 3:
        raise ValueError("only qkv_bias=true and 3 input channels are supported")
    if config.get("hidden_act", "gelu") not in ACTS:
        raise ValueError(f"hidden_act '{config['hidden_act']}' is not one of: {', '.join(ACTS)}")
    size = config.get("image_size", 224)
    return ViTSize(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"], mlp=config["intermediate_size"],
                   patch=config.get("patch_size", 16),
                   image_size=size if isinstance(size, int) else size[0],
                   ln_eps=config.get("layer_norm_eps", 1e-12), act=config.get("hidden_act", "gelu"))


def resample_grid(pos, gh: int, gw: int):
    """(1, 1 + g*g, D) position embeddings -> (1, 1 + gh*gw, D): the [CLS] entry kept, the
    square grid resized bicubically (antialiased when shrinking)."""
    g = int(round((pos.shape[1] - 1) ** 0.5))
    if g * g != pos.shape[1] - 1:
        raise ValueError(f"position embeddings {tuple(pos.shape)} are not [CLS] + a square grid")
    grid = pos[0, 1:].reshape(g, g, pos.shape[-1])
    grid = jax.image.resize(grid, (gh, gw, pos.shape[-1]), "bicubic").reshape(1, gh * gw, -1)
    return jnp.concatenate([pos[:, :1], grid.astype(pos.dtype)], axis=1)


def fit_positions(mapped: dict, shapes: dict) -> dict:
    """Loading hook: resample a source's position grid to the model's (other resolution)."""
    key = "embeddings/position"
    if key in mapped and key in shapes:
        src, arr = mapped[key]
        want = shapes[key]
        if arr.shape != want and arr.ndim == 3 and arr.shape[-1] == want[-1]:
            g = int(round((want[1] - 1) ** 0.5))
            try:
                new = np.asarray(resample_grid(jnp.asarray(arr, jnp.float32), g, g), arr.dtype)
            except ValueError:
                return mapped
            g0 = int(round((arr.shape[1] - 1) ** 0.5))
            mapped = {**mapped, key: (f"{src} (resampled {g0}x{g0} -> {g}x{g})", new)}
    return mapped


class Embeddings(nnx.Module):
    """Patches -> tokens, [CLS] first, plus position embeddings."""

    def __init__(self, size: ViTSize, grid: int, dropout: float, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(0.02)
        self.patch_size = size.patch
        self.patch = nnx.Linear(size.patch * size.patch * 3, size.hidden, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, size.hidden)))
        self.position = nnx.Param(init(rngs.params(), (1, 1 + grid * grid, size.hidden)))
        self.dropout = Dropout(dropout, deterministic=True)

    def __call__(self, x, *, rngs=None):
        b, h, w, c = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p  # a conv with stride p drops the remainder alike
        x = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.patch(x.reshape(b, gh * gw, p * p * c))
        pos = self.position[...]
        if pos.shape[1] != gh * gw + 1:
            pos = resample_grid(pos, gh, gw)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, tokens.shape[-1]))
        return self.dropout(jnp.concatenate([cls, tokens], axis=1) + pos, rngs=rngs)


class Layer(nnx.Module):
    """Pre-norm encoder layer: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, size: ViTSize, dropout: float, attn_dropout: float, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(size.hidden, epsilon=size.ln_eps, rngs=rngs)
        self.attention = SelfAttention(size, attn_dropout, rngs)
        self.mlp_norm = nnx.LayerNorm(size.hidden, epsilon=size.ln_eps, rngs=rngs)
        self.fc1 = nnx.Linear(size.hidden, size.mlp, rngs=rngs)
        self.fc2 = nnx.Linear(size.mlp, size.hidden, rngs=rngs)
        self.dropout = Dropout(dropout, deterministic=True)
        self.act = ACTS[size.act]

    def __call__(self, x, *, rngs=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), 0.0, rngs=rngs), rngs=rngs)
        h = self.fc2(self.act(self.fc1(self.mlp_norm(x))))
        return x + self.dropout(h, rngs=rngs)


class ViT(nnx.Module):
    """Stages: embeddings, each layer, final norm + [CLS] pooling, head. `batch["image"]` is
    NHWC 0-255, normalised here by the model's mean / std."""

    def __init__(self, size: ViTSize, num_classes: int, *, image_size: int | None = None,
                 mean=127.5, std=127.5, dropout: float = 0.0, attention_dropout: float = 0.0,
                 head_hidden=(), head_activation: str = "gelu", head_dropout: float = 0.0,
                 rngs: nnx.Rngs):
        self.mean, self.std = mean, std
        grid = (image_size or size.image_size) // size.patch
        self.embeddings = Embeddings(size, grid, dropout, rngs)
        self.layers = nnx.List([Layer(size, dropout, attention_dropout, rngs)
                                for _ in range(size.layers)])
        self.norm = nnx.LayerNorm(size.hidden, epsilon=size.ln_eps, rngs=rngs)
        self.head = ClassifierHead(size.hidden, num_classes, hidden=head_hidden,
                                   activation=head_activation, dropout=head_dropout, rngs=rngs)

    def stage_prefixes(self) -> list[str]:
        return ["embeddings/", *[f"layers/{i}/" for i in range(len(self.layers))], "norm/",
                "head/"]

    def forward(self, batch, start: int = 0, stop: int | None = None, *, rngs=None):
        """Run stages [start, stop); stage s > 0 reads `batch["hidden"]`."""
        n = len(self.layers)
        stop = n + 3 if stop is None else stop
        x = batch["hidden"] if start else normalize(batch["image"], self.mean, self.std)
        for s in range(start, stop):
            if s == 0:
                x = self.embeddings(x, rngs=rngs)
            elif s <= n:
                x = self.layers[s - 1](x, rngs=rngs)
            elif s == n + 1:
                x = self.norm(x)[:, 0]
            else:
                x = self.head(x, rngs=rngs)
        return x

    def __call__(self, batch, *, rngs=None):
        return self.forward(batch, rngs=rngs)
