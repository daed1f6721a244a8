"""Token counts for requests whose upstream sent no usage (a stream cut short): tiktoken for OpenAI-family
models, a documented characters-per-token ratio for the others.

tiktoken fetches its BPE tables from the internet the first time, which a relay behind a firewall (and this
project's CI) cannot. The same tables ship inside the `bpe-openai` wheel; they are copied into a private
tiktoken cache directory under the names tiktoken looks for, and tiktoken itself checks them against the
SHA-256 it expects before using them, so the counts are tiktoken's own.

Loading a table takes ~0.7 s and ~140 MB, so it happens once per process, in a thread, on first need
(`warm`); until it is loaded, counts use the ratio and say so (`exact` is False).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import os
import tempfile
import threading
from typing import Any

__all__ = ["CHARS_PER_TOKEN", "count", "encoding_for", "warm"]

log = logging.getLogger("rocket_relay.tokenizer")

# Characters per token of model families without a local tokenizer (their providers' published guidance:
# Anthropic ~3.5 for English text; a general default of 4).
CHARS_PER_TOKEN: dict[str, float] = {"claude": 3.5, "": 4.0}
_URLS = {"o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
         "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"}
_lock = threading.Lock()
_encodings: dict[str, Any] = {}
_failed: set[str] = set()


def _seed_cache() -> None:
    """Put the tables bundled with bpe-openai where tiktoken's cache looks (named by the SHA-1 of its URL)."""
    directory = os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rr-tiktoken"))
    os.makedirs(directory, exist_ok=True)
    for name, url in _URLS.items():
        path = os.path.join(directory, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.exists(path):
            data = gzip.decompress((importlib.resources.files("bpe_openai") / "data" / f"{name}.tiktoken.gz")
                                   .read_bytes())
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)


def warm(name: str) -> Any | None:
    """Load tiktoken's `name` table (blocking: call from a thread); None if it cannot be had."""
    with _lock:
        if name in _encodings or name in _failed:
            return _encodings.get(name)
        try:
            import tiktoken

            _seed_cache()
            _encodings[name] = tiktoken.get_encoding(name)
        except Exception as exc:  # no table, a hash mismatch, no network to fall back on
            log.warning("tokenizer %s unavailable (%s); estimates use characters per token", name,
                        type(exc).__name__)
            _failed.add(name)
        return _encodings.get(name)


def encoding_for(model: str) -> str | None:
    """The tiktoken table of an OpenAI-family model name (None for other families)."""
    try:
        import tiktoken

        return tiktoken.encoding_name_for_model(model)
    except (KeyError, ImportError):
        return None


def count(text: str, model: str) -> tuple[int, bool]:
    """(tokens of `text` for `model`, exact): tiktoken's count when its table is loaded, else the ratio."""
    if not text:
        return 0, True
    name = encoding_for(model)
    encoding = _encodings.get(name) if name else None
    if encoding is not None:
        return len(encoding.encode(text, disallowed_special=())), True
    family = next((f for f in CHARS_PER_TOKEN if f and model.startswith(f)), "")
    return -(-len(text) * 10 // int(CHARS_PER_TOKEN[family] * 10)), False
