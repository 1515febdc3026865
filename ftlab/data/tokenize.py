"""Text -> fixed-length token ids with a HF `tokenizer.json` (the `tokenizers` library)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ftlab.models.loading import find_file


def load_tokenizer(spec: str, max_length: int, key: str = "model.tokenizer"):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(find_file(spec, ("tokenizer.json",), key)))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length)
    return tok


def encode(tok, texts: Sequence[str]) -> dict[str, np.ndarray]:
    out = tok.encode_batch(list(texts))
    return {"input_ids": np.asarray([e.ids for e in out], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in out], np.int32)}
