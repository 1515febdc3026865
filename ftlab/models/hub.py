"""Hub ids as model sources: `hf://org/name[@revision]` and `timm://name` (the hub's
`timm/name` repo), fetched with huggingface_hub into its cache (HF_HUB_CACHE).

The cache is read first, with no request. Only when the id is not cached and the machine is
online is anything downloaded: the repo's metadata files and one weights file. Offline
(`HF_HUB_OFFLINE=1`, or the endpoint not answering a TCP connect within `PROBE_S` seconds) an
uncached id is a one-line ConfigError saying how to place the files; no request is attempted.
"""
from __future__ import annotations

import fnmatch
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from ftlab.schema import ConfigError

SCHEMES = {"hf://": "", "timm://": "timm/"}  # scheme -> repo id prefix
META_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "README.md")
PROBE_S = 3.0


def is_hub(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(tuple(SCHEMES))


def repo_id(spec: str, key: str = "model.source") -> tuple[str, str | None]:
    """`hf://org/name@rev` -> ('org/name', 'rev'); `timm://name` -> ('timm/name', None)."""
    scheme = next(s for s in SCHEMES if spec.startswith(s))
    name, _, revision = spec[len(scheme):].partition("@")
    repo = SCHEMES[scheme] + name.strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(key, f"'{spec}' is not a hub id; write hf://org/name or timm://name")
    return repo, revision or None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (tests set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(timeout: float = PROBE_S) -> bool:
    """Whether the hub endpoint (or the https proxy in front of it) accepts a TCP connect."""
    from huggingface_hub import constants
    url = urllib.request.getproxies().get("https") or constants.ENDPOINT
    parts = urllib.parse.urlsplit(url if "//" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except (OSError, TypeError):
        return False


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def not_cached(spec: str, repo: str, key: str, why: str) -> ConfigError:
    from huggingface_hub import constants
    cache = _cache_dir() or constants.HF_HUB_CACHE
    return ConfigError(key, f"{spec}: '{repo}' is not in the Hugging Face cache ({cache}) and "
                            f"{why}; on a connected machine run `hf download {repo}` and copy "
                            "the cache here (or set HF_HUB_CACHE to it), or download the files "
                            f"and set {key} to their directory")


def _choose(files: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The repo's top-level metadata files plus the first file matching `wanted` (in order)."""
    top = [f for f in files if "/" not in f]
    out = [f for f in top if f in META_FILES]
    for pattern in wanted:
        hit = sorted(f for f in top if fnmatch.fnmatch(f, pattern))
        if hit:
            return out + [hit[0]]
    return out


def fetch(spec: str, key: str, wanted: Sequence[str] = ()) -> Path:
    """The local snapshot directory of hub id `spec` (downloaded if online and not cached)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    repo, revision = repo_id(spec, key)
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=_cache_dir(),
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if offline():
        raise not_cached(spec, repo, key, "HF_HUB_OFFLINE is set")
    if not reachable():
        raise not_cached(spec, repo, key, "the hub is unreachable (offline?)")
    try:
        files = _choose(HfApi().list_repo_files(repo, revision=revision), wanted)
        return Path(snapshot_download(repo, revision=revision, cache_dir=_cache_dir(),
                                      allow_patterns=files, etag_timeout=PROBE_S * 3))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise ConfigError(key, f"{spec}: {type(e).__name__} for '{repo}' (check the id; "
                               "gated repos need `hf auth login`)") from None
    except Exception as e:  # network failures come in many types (httpx, OSError, ...)
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise not_cached(spec, repo, key, f"the download failed ({detail})") from None
