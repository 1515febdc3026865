"""Text -> fixed-length token ids with a HF `tokenizer.json` (the `tokenizers` library).

A run's texts are encoded once and kept in the data cache (ftlab/data/cache.py): BBC's 2225
articles took ~2 s of every run to tokenize. The key is the tokenizer's files, max_length,
the library's version and a digest of the texts.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from ftlab.data.cache import cached, file_key
from ftlab.models.loading import find_file

FILES = ("tokenizer.json", "vocab.txt")


def load_tokenizer(spec: str, max_length: int, key: str = "model.tokenizer"):
    """`tokenizer.json`, else a BERT `vocab.txt` (WordPiece; lower-casing as the files'
    tokenizer_config.json says, default on), in `spec` (file, dir, pkg:// or hub id)."""
    return _load(find_file(spec, FILES, key), max_length)


def _load(path: Path, max_length: int):
    from tokenizers import Tokenizer
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


def tokenize(spec: str, max_length: int, texts: Sequence[str],
             key: str = "model.tokenizer") -> tuple[dict[str, np.ndarray], object]:
    """`encode` through the data cache; also returns the tokenizer."""
    path = find_file(spec, FILES, key)
    tok = _load(path, max_length)
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8", "surrogatepass") + b"\0")
    conf = path.parent / "tokenizer_config.json"
    ckey = {"files": [file_key(p) for p in (path, conf) if p.is_file()], "max_length": max_length,
            "tokenizers": importlib.metadata.version("tokenizers"), "n": len(texts),
            "texts": digest.hexdigest()}

    def build():
        out = encode(tok, texts)
        return np.stack([out["input_ids"], out["attention_mask"]])
    ids, mask = cached("tokens", ckey, build)
    return {"input_ids": ids, "attention_mask": mask}, tok


def encode(tok, texts: Sequence[str]) -> dict[str, np.ndarray]:
    out = tok.encode_batch(list(texts))
    return {"input_ids": np.asarray([e.ids for e in out], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in out], np.int32)}
