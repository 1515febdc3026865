"""New task heads: 1-3 dense layers, dropout, Xavier-initialised kernels, zero biases."""
from __future__ import annotations

import jax
from flax import nnx

from ftlab.models.dropout import Dropout

ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jax.nn.tanh}


class ClassifierHead(nnx.Module):
    def __init__(self, in_features: int, num_classes: int, *, hidden=(),
                 activation: str = "gelu", dropout: float = 0.1, rngs: nnx.Rngs):
        sizes = [in_features, *hidden, num_classes]
        init = nnx.initializers.xavier_uniform()
        self.layers = nnx.List([nnx.Linear(a, b, kernel_init=init, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout, deterministic=True)

    def __call__(self, x, *, rngs=None):
        for i, layer in enumerate(self.layers):
            if i:
                x = self.activation(x)
            x = layer(self.dropout(x, rngs=rngs))
        return x
