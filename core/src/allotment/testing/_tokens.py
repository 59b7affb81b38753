"""Token counting for scripted usage: tiktoken when its files are on disk, else an approximation."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# tiktoken caches each encoding file under the SHA-1 of the URL it would download it from.
_ENCODING_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}

APPROXIMATE = "approx-utf8-bytes/4"

_env_lock = threading.Lock()


@dataclass(frozen=True)
class Tokenizer:
    """Counts tokens in text; ``name`` is the tiktoken encoding or ``APPROXIMATE``."""

    name: str
    exact: bool
    _count: Callable[[str], int] = field(repr=False, compare=False)

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        return self._count(text) if text else 0


def approximate_tokenizer() -> Tokenizer:
    """The deterministic fallback: ceil(UTF-8 bytes / 4), which tracks English BPE roughly."""
    return Tokenizer(APPROXIMATE, exact=False, _count=_approximate)


def _approximate(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / 4)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """o200k_base, else cl100k_base, if tiktoken can load it offline; else the approximation.

    tiktoken is only asked for an encoding whose file is already cached, because
    otherwise it downloads without a timeout and can hang on a network that drops packets.
    """
    if importlib.util.find_spec("tiktoken") is None:
        return approximate_tokenizer()
    for name, url in _ENCODING_URLS.items():
        key = hashlib.sha1(url.encode()).hexdigest()
        for directory, borrowed in _cache_dirs():
            if (directory / key).is_file():
                tokenizer = _load(name, directory if borrowed else None)
                if tokenizer is not None:
                    return tokenizer
    return approximate_tokenizer()


def _cache_dirs() -> Iterator[tuple[Path, bool]]:
    """Directories tiktoken would read, then llama-index's bundled copy (borrowed)."""
    own = os.environ.get("TIKTOKEN_CACHE_DIR")
    if own is None:
        own = os.environ.get("DATA_GYM_CACHE_DIR")
    if own is None:
        own = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if own:
        yield Path(own), False
    # An explicit TIKTOKEN_CACHE_DIR is the user's choice; never second-guess it.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    try:
        spec = importlib.util.find_spec("llama_index.core")
    except (ImportError, ValueError):
        return
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location) / "_static" / "tiktoken_cache", True


def _load(name: str, borrowed_dir: Path | None) -> Tokenizer | None:
    import tiktoken

    try:
        with _cache_dir_set(borrowed_dir):
            encoding = tiktoken.get_encoding(name)
    except Exception:
        # A corrupt or partial cache file makes tiktoken refetch or raise; either way, not usable.
        return None

    def count(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    return Tokenizer(name, exact=True, _count=count)


@contextmanager
def _cache_dir_set(directory: Path | None) -> Iterator[None]:
    """Point TIKTOKEN_CACHE_DIR at ``directory`` only while tiktoken loads, then restore it.

    tiktoken keeps a loaded encoding in memory, so the variable is needed only for the load;
    leaving it set would change where the user's own tiktoken calls read and write.
    """
    if directory is None:
        yield
        return
    with _env_lock:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
        try:
            yield
        finally:
            del os.environ["TIKTOKEN_CACHE_DIR"]


# Per-message overheads follow OpenAI's published counting recipe for chat models.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


def count_chat_prompt(body: Mapping[str, Any], tokenizer: Tokenizer) -> int:
    """Approximate prompt tokens of a chat request: messages, names and tool definitions."""
    total = _REPLY_PRIMING
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += _PER_MESSAGE
            if not isinstance(message, dict):
                total += tokenizer.count(_compact(message))
                continue
            for key, value in message.items():
                total += (
                    _count_content(value, tokenizer)
                    if key == "content"
                    else (_count_value(value, tokenizer))
                )
                if key == "name":
                    total += _PER_NAME
    tools = body.get("tools")
    if tools:
        total += tokenizer.count(_compact(tools))
    return total


def count_completion_prompt(body: Mapping[str, Any], tokenizer: Tokenizer) -> int:
    """Prompt tokens of a legacy completion request (string, strings, or token ids)."""
    return _count_inputs(body.get("prompt"), tokenizer)


def count_embedding_input(body: Mapping[str, Any], tokenizer: Tokenizer) -> int:
    """Input tokens of an embeddings request."""
    return _count_inputs(body.get("input"), tokenizer)


def _count_inputs(value: Any, tokenizer: Tokenizer) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return tokenizer.count(value)
    if isinstance(value, Sequence):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return sum(_count_inputs(item, tokenizer) for item in value)
    return tokenizer.count(_compact(value))


def _count_value(value: Any, tokenizer: Tokenizer) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return tokenizer.count(value)
    return tokenizer.count(_compact(value))


def _count_content(value: Any, tokenizer: Tokenizer) -> int:
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        # Content parts: only text has a countable size without knowing the model's image rules.
        return sum(
            tokenizer.count(part["text"])
            for part in value
            if part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return _count_value(value, tokenizer)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
