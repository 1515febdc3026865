"""Text -> fixed-length token ids with a HF `tokenizer.json` (the `tokenizers` library)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ftlab.models.loading import find_file


def load_tokenizer(spec: str, max_length: int, key: str = "model.tokenizer"):
    """`tokenizer.json`, else a BERT `vocab.txt` (WordPiece; lower-casing as the files'
    tokenizer_config.json says, default on), in `spec` (file, dir, pkg:// or hub id)."""
    from tokenizers import Tokenizer
    path = find_file(spec, ("tokenizer.json", "vocab.txt"), key)
    if path.suffix == ".txt":
        import json
        from tokenizers.implementations import BertWordPieceTokenizer
        conf = path.parent / "tokenizer_config.json"
        lower = json.loads(conf.read_text()).get("do_lower_case", True) if conf.is_file() else True
        tok = BertWordPieceTokenizer(str(path), lowercase=lower)
    else:
        tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length)
    return tok


def encode(tok, texts: Sequence[str]) -> dict[str, np.ndarray]:
    out = tok.encode_batch(list(texts))
    return {"input_ids": np.asarray([e.ids for e in out], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in out], np.int32)}
