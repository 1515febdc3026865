"""The PyTorch reference for vs_torch.py: a BERT encoder of MiniLM-L6's size (HF BertModel
layout: post-norm layers, GELU MLP, mean pooling) with a linear head, in eager mode.

fp32, or bf16 via torch.autocast (CPU: bf16 matmuls through oneDNN, params in fp32), the usual
PyTorch mixed precision. Frozen params get requires_grad=False, so autograd prunes their
backward like ftlab does.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

HIDDEN, LAYERS, HEADS, MLP, VOCAB, POSITIONS = 384, 6, 12, 1536, 30522, 512


class Layer(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(HIDDEN, HIDDEN) for _ in
                                                      range(4))
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN, eps=1e-12), nn.LayerNorm(HIDDEN, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(HIDDEN, MLP), nn.Linear(MLP, HIDDEN)
        self.p = p

    def forward(self, x, bias):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, HEADS, -1).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + bias
        probs = F.dropout(scores.softmax(-1), self.p, self.training)
        ctx = (probs @ v).transpose(1, 2).reshape(b, t, HIDDEN)
        x = self.norm1(x + F.dropout(self.out(ctx), self.p, self.training))
        h = self.fc2(F.gelu(self.fc1(x)))
        return self.norm2(x + F.dropout(h, self.p, self.training))


class MiniLM(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(POSITIONS, HIDDEN)
        self.token_type = nn.Embedding(2, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1])[None]
        x = self.word(ids) + self.position(pos) + self.token_type.weight[0]
        x = F.dropout(self.norm(x), 0.1, self.training)
        bias = (1.0 - mask[:, None, None, :].float()) * -1e9
        for layer in self.layers:
            x = layer(x, bias)
        m = mask[..., None].float()
        return self.head(F.dropout((x * m).sum(1) / m.sum(1).clamp(min=1.0), 0.1,
                                   self.training))


def stepper(variant: str, dtype: str, batch: int, seq: int):
    """One AdamW train step of `variant` (full, last2) as a callable, on a fixed batch."""
    torch.manual_seed(0)
    model = MiniLM().train()
    if variant == "last2":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("head.", "layers.4.", "layers.5."))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 5, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = F.cross_entropy(model(ids, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step
