"""Pre-flight bounds of what a call can use: a sound estimator and an adaptive one.

``SoundEstimator`` (registered by default) bounds input tokens from above without a
tokenizer: every byte-level BPE token covers at least one UTF-8 byte, so the bytes of
everything sent, plus the framing a chat format adds, bound the tokens of any such
tokenizer. Images are bounded by each provider's published sizing rules, never by the
length of their base64. For OpenAI models whose tiktoken encoding is already on disk the
text is counted exactly instead. Output is bounded by the request's cap, else the model's
known maximum, else a configured ceiling.

``AdaptiveEstimator`` (opt-in) learns how loose the byte bound is for each model from
settled calls and tightens it, staying above what was observed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._call import Call, Image
from ._errors import ConfigurationError
from ._usage import Estimate, Usage
from .hookspecs import hookimpl

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "AdaptiveEstimator",
    "SoundEstimator",
    "encoding_name",
    "image_tokens",
    "load_encoding",
    "max_output_tokens",
]

# -- model names -----------------------------------------------------------------------

_VENDOR_PREFIXES = frozenset(
    {"openai", "azure", "anthropic", "google", "gemini", "vertex_ai", "bedrock", "openrouter"}
)
_DOTTED_VERSION = re.compile(r"(?<=\d)\.(?=\d)")


@functools.lru_cache(maxsize=1024)  # pure in the model name; looked up on every call
def _canonical(model: str | None) -> str:
    """A model name without routing decoration, for the family tables.

    ``openai/gpt-4o``, ``openai:gpt-4o`` and ``azure/gpt-4o`` -> ``gpt-4o``;
    ``us.anthropic.claude-sonnet-4-5-20250929-v1:0`` -> ``claude-sonnet-4-5-...``;
    ``models/gemini-2.5-pro`` -> ``gemini-2.5-pro``; ``ft:gpt-4o-mini:org::id`` ->
    ``gpt-4o-mini:org::id``; Claude's dotted versions (``claude-opus-4.1``) become dashed.
    """
    if not model:
        return ""
    name = model.strip().lower().rsplit("/", 1)[-1]
    for family in ("claude", "gemini"):
        at = name.find(family)
        if at > 0:
            name = name[at:]
            break
    name = name.removeprefix("ft:")
    head, sep, tail = name.partition(":")
    if sep and head in _VENDOR_PREFIXES:
        name = tail
    if name.startswith("claude"):
        name = _DOTTED_VERSION.sub("-", name)
    return name


_SNAPSHOT_SUFFIX = re.compile(r"(?:-\d{8}|-\d{4}-\d{2}-\d{2}|-latest)?(?:-v\d+(?::\d+)?)?$")


def _model_key(model: str | None) -> str:
    """The name a model's learned statistics are kept under: dated snapshots, ``-latest``
    and Bedrock's ``-v1:0`` share their alias's, since they share its tokenizer."""
    return _SNAPSHOT_SUFFIX.sub("", _canonical(model), count=1)


@functools.lru_cache(maxsize=1024)  # pure in the model name; looked up on every call
def _vendor(name: str, provider: str | None) -> str | None:
    """Whose rules apply: the model family decides, the provider id breaks ties."""
    if name.startswith("claude"):
        return "anthropic"
    if name.startswith(("gemini", "gemma")):
        return "google"
    if _OPENAI_FAMILY.match(name):
        return "openai"
    p = (provider or "").strip().lower()
    if p in ("openai", "azure", "azure_openai"):
        return "openai"
    if p in ("anthropic",):
        return "anthropic"
    if p in ("google", "gemini", "vertex_ai", "google-vertex", "google-gla", "google-vertex-ai"):
        return "google"
    return None


_OPENAI_FAMILY = re.compile(
    r"(?:gpt-|chatgpt-|o[1-9](?:$|-)|text-embedding-|computer-use|davinci|babbage)"
)

# -- output bounds ---------------------------------------------------------------------

_MAX_OUTPUT: tuple[tuple[str, int], ...] = (
    # OpenAI
    ("gpt-4o-mini", 16_384),
    ("gpt-4o", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4.1", 32_768),
    ("gpt-4.5", 16_384),
    ("gpt-4-turbo", 4_096),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 4_096),
    ("o1-mini", 65_536),
    ("o1", 100_000),
    ("o3", 100_000),
    ("o4-mini", 100_000),
    ("gpt-5", 128_000),
    # Anthropic
    ("claude-opus-4-7", 128_000),
    ("claude-opus-4-6", 128_000),
    ("claude-opus-4-5", 64_000),
    ("claude-opus-4-1", 32_000),
    ("claude-opus-4", 32_000),
    ("claude-sonnet-4", 64_000),
    ("claude-haiku-4", 64_000),
    ("claude-3-7-sonnet", 64_000),
    ("claude-3-5-sonnet", 8_192),
    ("claude-3-5-haiku", 8_192),
    ("claude-3-opus", 4_096),
    ("claude-3-sonnet", 4_096),
    ("claude-3-haiku", 4_096),
    # Google
    ("gemini-3", 65_536),
    ("gemini-2.5", 65_536),
    ("gemini-2.0", 8_192),
    ("gemini-1.5", 8_192),
)
# Longest prefix first, so ``gpt-4o-mini`` wins over ``gpt-4o`` and ``gpt-4``.
_MAX_OUTPUT_BY_PREFIX = tuple(sorted(_MAX_OUTPUT, key=lambda kv: -len(kv[0])))


@functools.lru_cache(maxsize=1024)  # pure in the model name; looked up on every call
def max_output_tokens(model: str | None) -> int | None:
    """The largest output a well-known model family can produce, or ``None`` if unknown.

    A small built-in table (the providers' published limits; extended-output beta headers
    are not assumed), matched on the name without provider prefixes or date suffixes.
    """
    name = _canonical(model)
    if not name:
        return None
    for prefix, limit in _MAX_OUTPUT_BY_PREFIX:
        if name.startswith(prefix):
            return limit
    return None


# -- images ------------------------------------------------------------------------------

_OPENAI_MAX_TILES = 8
"""At most 2x4 tiles of 512 px survive OpenAI's fit-in-2048, shortest-side-768 resize."""
_OPENAI_MAX_PATCHES = 1536
"""Patch-billed OpenAI models downscale an image to at most 1536 patches of 32 px."""
_ANTHROPIC_CAP_BEFORE_4_7 = 1_600
"""Claude up to 4.6 resizes an image to ~1.15 MP (about 1,600 tokens) before counting."""
_ANTHROPIC_CAP = 4_800
"""Claude Opus 4.7 and later read up to 2576 px on the long edge (~3.75 MP, ~4,784 tokens)."""
_GEMINI_TILE = 258
_GEMINI_UNKNOWN_SIZE = 16 * _GEMINI_TILE
"""Gemini tiles large images at 768 px; an image of unknown size is assumed <= 3072x3072."""
_GEMINI_3_FLOOR = 1_120
"""Gemini 3 bills an image at its media resolution, 1,120 tokens at the high default."""
_CLAUDE_BEFORE_4_7 = re.compile(
    r"claude-(?:[23]|instant)|claude-(?:opus|sonnet|haiku)-4(?:$|-\d{8}|[-.][0-6](?:$|\D))"
)


def _ceil_div(a: Fraction | int, b: int) -> int:
    return math.ceil(Fraction(a) / b)


def _openai_tiles(image: Image, base: int, per_tile: int) -> int:
    if image.detail == "low":
        return base
    w, h = image.width, image.height
    if not w or not h:
        return base + per_tile * _OPENAI_MAX_TILES
    # Exact fractions: a float rounding a side just under a multiple of 512 would drop a tile.
    fw, fh = Fraction(w), Fraction(h)
    longest = max(fw, fh)
    if longest > 2048:
        fw, fh = fw * 2048 / longest, fh * 2048 / longest
    shortest = min(fw, fh)
    if shortest > 768:
        fw, fh = fw * 768 / shortest, fh * 768 / shortest
    return base + per_tile * _ceil_div(fw, 512) * _ceil_div(fh, 512)


def _openai_patches(image: Image, multiplier: Fraction) -> int:
    w, h = image.width, image.height
    patches = (
        _OPENAI_MAX_PATCHES
        if not w or not h
        else min(_ceil_div(w, 32) * _ceil_div(h, 32), _OPENAI_MAX_PATCHES)
    )
    return math.ceil(patches * multiplier)


def _anthropic(image: Image, cap: int) -> int:
    w, h = image.width, image.height
    if not w or not h:
        return cap
    # The older rule (pixels / 750) and the newer one (28 px patches after padding) differ
    # by a few percent; either may be the one billed, so take the larger.
    return min(max(math.ceil(Fraction(w * h, 750)), _ceil_div(w, 28) * _ceil_div(h, 28)), cap)


def _gemini(image: Image, floor: int) -> int:
    w, h = image.width, image.height
    if not w or not h:
        return max(_GEMINI_UNKNOWN_SIZE, floor)
    if w <= 384 and h <= 384:
        return max(_GEMINI_TILE, floor)
    return max(_ceil_div(w, 768) * _ceil_div(h, 768) * _GEMINI_TILE, floor)


ImageRule = Callable[[Image], int]


def _tiles(base: int, per_tile: int) -> ImageRule:
    return lambda image: _openai_tiles(image, base, per_tile)


def _patches(multiplier: str) -> ImageRule:
    m = Fraction(multiplier)
    return lambda image: _openai_patches(image, m)


def _openai_default(image: Image) -> int:
    # Newer or unlisted OpenAI models: the larger of a 1.2x-scaled tile rule and the
    # costliest patch multiplier, so neither billing scheme can exceed the bound.
    return max(_openai_tiles(image, 102, 204), _openai_patches(image, Fraction("2.46")))


_OPENAI_IMAGE_RULES: tuple[tuple[str, ImageRule], ...] = (
    # gpt-4o-mini bills images at ~33x the tokens of gpt-4o (same dollars at its lower rate).
    ("gpt-4o-mini", _tiles(2833, 5667)),
    ("gpt-4.1-mini", _patches("1.62")),
    ("gpt-4.1-nano", _patches("2.46")),
    ("gpt-5-mini", _patches("1.62")),
    ("gpt-5-nano", _patches("2.46")),
    ("o4-mini", _patches("1.72")),
    ("o1", _tiles(75, 150)),
    ("o3", _tiles(75, 150)),
    ("gpt-4o", _tiles(85, 170)),
    ("chatgpt-4o", _tiles(85, 170)),
    ("gpt-4.1", _tiles(85, 170)),
    ("gpt-4.5", _tiles(85, 170)),
    ("gpt-4-turbo", _tiles(85, 170)),
)


def image_tokens(image: Image, model: str | None, provider: str | None = None) -> int:
    """An upper bound of the input tokens one image costs on ``model``.

    By the provider's sizing rules: OpenAI's 512 px tiles (85 + 170 per tile for gpt-4o,
    after fitting 2048x2048 then a 768 px shortest side; 85 for ``detail="low"``; other
    bases and multipliers per family, patch-billed families at up to 1536 patches),
    Anthropic's width x height / 750 capped at ~1,600 (~4,800 from Opus 4.7), Gemini's
    258 tokens per 768 px tile. An unknown size takes the provider's maximum; an unknown
    provider the largest of the rules.
    """
    name = _canonical(model)
    vendor = _vendor(name, provider)
    if vendor == "openai":
        for prefix, rule in _OPENAI_IMAGE_RULES:
            if name.startswith(prefix):
                return rule(image)
        return _openai_default(image)
    if vendor == "anthropic":
        cap = _ANTHROPIC_CAP_BEFORE_4_7 if _CLAUDE_BEFORE_4_7.match(name) else _ANTHROPIC_CAP
        return _anthropic(image, cap)
    if vendor == "google":
        floor = 0 if name.startswith(("gemini-1", "gemini-2", "gemma")) else _GEMINI_3_FLOOR
        return _gemini(image, floor)
    return max(
        _openai_default(image), _anthropic(image, _ANTHROPIC_CAP), _gemini(image, _GEMINI_3_FLOOR)
    )


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WebP or JPEG header, or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            w = int.from_bytes(data[26:28], "little") & 0x3FFF
            h = int.from_bytes(data[28:30], "little") & 0x3FFF
            return w, h
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return (
                int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1,
            )
        return None
    if data[:2] == b"\xff\xd8":
        at = 2
        while at + 9 <= len(data):
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker in _JPEG_SOF:
                h = int.from_bytes(data[at + 5 : at + 7], "big")
                w = int.from_bytes(data[at + 7 : at + 9], "big")
                return w, h
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                at += 2
                continue
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


_B64_HEAD = 4_096
"""Base64 characters decoded to find a header; JPEGs with large EXIF blocks get more."""
_B64_HEAD_JPEG = 262_144
_B64_JUNK = re.compile(r"[^A-Za-z0-9+/_-]")


def _size_from_base64(data: str) -> tuple[int, int] | None:
    for limit in (_B64_HEAD, _B64_HEAD_JPEG):
        head = _B64_JUNK.sub("", data[:limit])
        head = head[: len(head) - len(head) % 4]
        try:
            raw = base64.b64decode(head.replace("-", "+").replace("_", "/"))
        except (binascii.Error, ValueError):
            return None
        size = _image_size(raw)
        if size is not None or not raw.startswith(b"\xff\xd8") or len(data) <= limit:
            return size
    return None


def _image_from(url: Any, data: Any, detail: Any) -> Image:
    """An ``Image`` for a content part; its size read from inline data when there is any."""
    size: tuple[int, int] | None = None
    if isinstance(data, str):
        size = _size_from_base64(data)
    elif isinstance(url, str) and url.startswith("data:"):
        _, _, payload = url.partition(",")
        size = _size_from_base64(payload)
    det = detail if isinstance(detail, str) else "auto"
    if size is None:
        return Image(detail=det)
    return Image(width=size[0], height=size[1], detail=det)


# -- flattening what is sent -----------------------------------------------------------


_SILENT_KEYS = frozenset(
    {
        "role",
        "content",
        "type",
        "text",
        "name",
        "tool_calls",
        "tool_call_id",
        "id",
        "function",
        "arguments",
        "input",
        "parts",
        "tool_use_id",
        "cache_control",
        "is_error",
        "args",
        "output",
    }
)
"""Keys that are message structure, not text the model reads (their values still count)."""
_DATA_KEYS = frozenset({"input", "args", "arguments", "response", "parameters"})
"""Tool-call arguments and results given as objects reach the model as JSON, punctuation
and key names included, so they are counted as their JSON rather than leaf by leaf."""
_MEDIA_KEYS = frozenset({"inline_data", "inlineData", "file_data", "fileData"})
"""Gemini's media parts carry no ``type``."""


@dataclasses.dataclass
class _Sent:
    """Everything a call sends, as text pieces and images."""

    texts: list[str] = dataclasses.field(default_factory=list)
    images: list[Image] = dataclasses.field(default_factory=list)
    messages: int = 0
    opaque: int = 0
    """Non-image media (audio, documents) whose data was counted as text."""
    token_ids: int = 0
    """Tokens given already tokenized (embedding inputs as lists of ids)."""

    def message(self, message: Any) -> None:
        self.messages += 1
        self.value(message)

    def value(self, value: Any) -> None:
        # Exact type checks first: plain str/dict/list is nearly everything, and the
        # abstract-class isinstance checks below cost more than the counting itself.
        t = type(value)
        if t is str:
            if value:
                self.texts.append(value)
        elif t is dict:
            self.mapping(value)
        elif t is list or t is tuple:
            for item in value:
                self.value(item)
        elif value is None or t is bool:
            return
        elif t is int or t is float or isinstance(value, str):
            self.texts.append(str(value))
        elif isinstance(value, Mapping):
            self.mapping(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            # Raw bytes travel base64-encoded; their size as text is the only bound we have.
            self.opaque += 1
            self.texts.append("x" * (4 * math.ceil(len(value) / 3)))
        elif isinstance(value, (int, float)):
            self.texts.append(str(value))
        elif isinstance(value, Sequence):
            for item in value:
                self.value(item)
        else:
            self.value(_plain(value))

    def mapping(self, value: Mapping[Any, Any]) -> None:
        kind = value.get("type")
        if (
            kind != "text"
            and (kind is not None or _MEDIA_KEYS.intersection(value))
            and self._media(value, kind)
        ):
            return
        texts = self.texts
        for key, item in value.items():
            if type(item) is str:
                if item:
                    texts.append(item)
            elif key in _DATA_KEYS and isinstance(item, (Mapping, list, tuple)):
                texts.append(_tool_json(item))
            else:
                self.value(item)
            if key not in _SILENT_KEYS and isinstance(key, str):
                texts.append(key)

    def _media(self, part: Mapping[Any, Any], kind: Any) -> bool:
        """Record ``part`` if it is an image (True); other media fall through as text."""
        if kind in ("image_url", "input_image"):
            src = part.get("image_url")
            if isinstance(src, Mapping):
                self.images.append(
                    _image_from(src.get("url"), None, src.get("detail", part.get("detail")))
                )
            else:
                self.images.append(_image_from(src, None, part.get("detail")))
            return True
        if kind == "image":
            src = part.get("source")
            if isinstance(src, Mapping):
                self.images.append(_image_from(src.get("url"), src.get("data"), None))
            else:
                data = part.get("data", part.get("base64"))
                self.images.append(_image_from(part.get("url"), data, part.get("detail")))
            return True
        for key in _MEDIA_KEYS:
            inner = part.get(key)
            if isinstance(inner, Mapping):
                mime = inner.get("mime_type", inner.get("mimeType", ""))
                if isinstance(mime, str) and mime.startswith("image/"):
                    self.images.append(_image_from(None, inner.get("data"), None))
                    return True
                self.opaque += 1
        return False


def _plain(value: Any) -> Any:
    """A framework object as plain data: message-like objects, pydantic dumps, dataclasses."""
    if hasattr(value, "content") and not isinstance(value, type):
        # Message objects (LangChain's, LlamaIndex's) also carry response metadata that is
        # never sent back; only these fields reach the model.
        return {
            key: getattr(value, key)
            for key in ("role", "type", "name", "content", "tool_calls")
            if getattr(value, key, None) is not None
        }
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return dump()
        except Exception:  # a model that cannot dump itself still has a str()
            return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return str(value)


def _tool_json(tool: Any) -> str:
    if isinstance(tool, str):
        return tool
    schema = getattr(tool, "model_json_schema", None)
    if isinstance(tool, type) and callable(schema):
        # A pydantic model class given as a tool: the provider is sent its JSON schema.
        tool = {"name": tool.__name__, "parameters": schema()}
    return json.dumps(
        tool, separators=(",", ":"), ensure_ascii=False, default=_json_default, sort_keys=False
    )


def _json_default(value: Any) -> Any:
    plain = _plain(value)
    return plain if plain is not value else str(value)


_SHORT = 32
"""Texts up to this length (roles, names, tool names) repeat across calls: their counts are
remembered rather than re-encoded."""
_SHORT_CACHED = 8_192
_LONG_CACHED_CHARS = 4_000_000
"""Agent loops resend their whole history on every call: remembering each message's count
(up to this many characters in all) makes an estimate cost what is new, not all of it."""


def _token_counter(encoding: tiktoken.Encoding) -> Callable[[str], int]:
    # encode_ordinary: special-token strings in user text are sent, and billed, as text.
    encode = encoding.encode_ordinary
    short = _short_counts.setdefault(encoding.name, {})
    long = _long_counts.setdefault(encoding.name, {})

    def count(text: str) -> int:
        if len(text) > _SHORT:
            n = long.get(text)
            if n is None:
                n = len(encode(text))
                size = _long_size.get(encoding.name, 0) + len(text)
                if size > _LONG_CACHED_CHARS:
                    long.clear()
                    size = len(text)
                _long_size[encoding.name] = size
                long[text] = n
            return n
        n = short.get(text)
        if n is None:
            n = len(encode(text))
            if len(short) >= _SHORT_CACHED:
                short.clear()
            short[text] = n
        return n

    return count


_short_counts: dict[str, dict[str, int]] = {}
_long_counts: dict[str, dict[str, int]] = {}
_long_size: dict[str, int] = {}


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# -- exact counting ------------------------------------------------------------------------

_ENCODING_FILES = {
    # name: (the URL tiktoken would download it from, the SHA-256 tiktoken checks)
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
_O200K = re.compile(r"(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o[134](?:$|-))")
_CL100K = re.compile(r"(?:gpt-4(?:$|-)|gpt-3\.5|gpt-35|text-embedding-3-|text-embedding-ada-002)")


@functools.lru_cache(maxsize=1024)  # pure in the model name; looked up on every call
def encoding_name(model: str | None) -> str | None:
    """The tiktoken encoding of an OpenAI model, or ``None`` for any other model."""
    name = _canonical(model)
    if _O200K.match(name):
        return "o200k_base"
    if _CL100K.match(name):
        return "cl100k_base"
    return None


_encodings: dict[str, tiktoken.Encoding | None] = {}
_encodings_lock = threading.Lock()
_env_lock = threading.Lock()


def _cache_dirs() -> Iterator[tuple[Path, bool]]:
    """Where an encoding file may already be: tiktoken's own cache, then llama-index's copy.

    The flag says whether tiktoken must be pointed at the directory to read it there.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        own = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        own = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        own = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if own:  # empty means tiktoken caches nothing and always downloads
        yield Path(own), False
    try:
        # Found without importing llama_index.core, which is slow and pulls in a lot.
        spec = importlib.util.find_spec("llama_index")
    except (ImportError, ValueError):
        return
    for location in (spec.submodule_search_locations or []) if spec else []:
        yield Path(location) / "core" / "_static" / "tiktoken_cache", True


def _verified(path: Path, sha256: str) -> bool:
    # tiktoken deletes a cache file whose hash is wrong and downloads it again; only a file
    # that will pass its check may be handed to it.
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


@contextmanager
def _reading_from(directory: Path | None) -> Iterator[None]:
    """Point tiktoken's cache at ``directory`` while it loads; tiktoken keeps what it loaded."""
    if directory is None:
        yield
        return
    with _env_lock:
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
        try:
            yield
        finally:
            if saved is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved


def load_encoding(name: str) -> tiktoken.Encoding | None:
    """A tiktoken encoding if it can be had without the network, else ``None``.

    Looks in tiktoken's cache (``TIKTOKEN_CACHE_DIR``, ``DATA_GYM_CACHE_DIR`` or its temp
    directory) and in the copy llama-index-core ships, for the file tiktoken names by the
    SHA-1 of its download URL, and checks its SHA-256 before letting tiktoken read it.
    The answer, either way, is remembered.
    """
    if name in _encodings:
        return _encodings[name]
    with _encodings_lock:
        if name not in _encodings:
            _encodings[name] = _load_offline(name)
        return _encodings[name]


def _load_offline(name: str) -> tiktoken.Encoding | None:
    entry = _ENCODING_FILES.get(name)
    if entry is None or importlib.util.find_spec("tiktoken") is None:
        return None
    url, sha256 = entry
    import tiktoken

    key = hashlib.sha1(url.encode()).hexdigest()
    for directory, borrowed in _cache_dirs():
        if borrowed and "TIKTOKEN_CACHE_DIR" in os.environ:
            # The user chose tiktoken's cache; reading elsewhere would hide that choice
            # only for the load, so borrow llama-index's copy only when none was chosen.
            continue
        if _verified(directory / key, sha256):
            try:
                with _reading_from(directory if borrowed else None):
                    return tiktoken.get_encoding(name)
            except Exception:  # an unreadable encoding only costs exactness
                return None
    return None


# -- the sound estimator ---------------------------------------------------------------------


class SoundEstimator:
    """The default estimator: an upper bound of a call's tokens that holds for any model.

    Input, for an LLM call: the UTF-8 bytes of every text sent (message contents, roles,
    names, tool calls and results, tool schemas as compact JSON), plus ``per_message``
    tokens per message and ``per_request`` per request for the chat framing, plus
    ``per_tool`` per tool schema and ``tools_overhead`` when tools are sent (Anthropic adds
    a hidden tool-use system prompt of several hundred tokens; OpenAI a small preamble),
    plus each image by its provider's sizing rules (base64 data is never counted as text;
    inline image headers give the size, otherwise the provider's largest is assumed).
    Bytes bound tokens because every byte-level BPE token covers at least one byte.

    For OpenAI models (o200k_base: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1/o3/o4; cl100k_base:
    gpt-4, gpt-3.5, embeddings), text is counted with tiktoken when its encoding is on disk
    already (see ``load_encoding``), and the estimate says ``exact_input``. Nothing here
    ever downloads.

    Output: ``call.max_output_tokens`` when the request sets it; else the model family's
    published maximum (``max_output_tokens``); else ``output_ceiling``. The ceiling is a
    policy, not a bound: with no cap and an unknown model, nothing bounds output, and a
    call that writes more is still charged in full at settle time. The default, 16,384,
    covers the default maximum of most current models; set ``max_output_tokens`` on the
    request (or a smaller ceiling) to reserve less.

    Tool calls reserve one tool call and no tokens; embeddings reserve input only.
    """

    def __init__(
        self,
        *,
        output_ceiling: int = 16_384,
        per_message: int = 8,
        per_request: int = 16,
        per_tool: int = 16,
        tools_overhead: int | None = None,
        exact: bool = True,
    ) -> None:
        for what, value in (
            ("output_ceiling", output_ceiling),
            ("per_message", per_message),
            ("per_request", per_request),
            ("per_tool", per_tool),
            ("tools_overhead", 0 if tools_overhead is None else tools_overhead),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{what} must be a non-negative int, not {value!r}")
        self.output_ceiling = output_ceiling
        self.per_message = per_message
        self.per_request = per_request
        self.per_tool = per_tool
        self.tools_overhead = tools_overhead
        self.exact = exact

    @hookimpl(trylast=True)
    def allotment_estimate(self, call: Call) -> Estimate | None:
        return self.estimate(call)

    def estimate(self, call: Call) -> Estimate:
        """The bound for ``call``."""
        if call.kind == "tool":
            return Estimate(
                usage=Usage(tool_calls=1, tools=((call.tool_name or "", 1),)),
                exact_input=True,
                notes=(f"tool call {call.tool_name!r}: one call, no tokens",),
            )
        notes: list[str] = []
        input_tokens, exact = self._input(call, notes)
        if call.kind == "embedding":
            return Estimate(
                usage=Usage(input_tokens=input_tokens), exact_input=exact, notes=tuple(notes)
            )
        output_tokens = self.output_bound(call, notes)
        return Estimate(
            usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens, llm_calls=1),
            exact_input=exact,
            notes=tuple(notes),
        )

    def output_bound(self, call: Call, notes: list[str] | None = None) -> int:
        """Output tokens to reserve: the request's cap, the model's maximum, or the ceiling."""
        if call.max_output_tokens is not None:
            if notes is not None:
                notes.append(f"output: max_output_tokens {call.max_output_tokens}")
            return call.max_output_tokens
        known = max_output_tokens(call.model)
        if known is not None:
            if notes is not None:
                notes.append(f"output: {call.model}'s maximum of {known}")
            return known
        if notes is not None:
            notes.append(
                f"output: ceiling {self.output_ceiling} assumed ({call.model!r} has no known "
                f"maximum and the request sets no max_output_tokens)"
            )
        return self.output_ceiling

    def sound_input(self, call: Call) -> int:
        """The byte-based input bound, never the tokenizer's count (adaptive learning uses it)."""
        return self._input(call, None, exact=False)[0]

    def _input(
        self, call: Call, notes: list[str] | None, *, exact: bool | None = None
    ) -> tuple[int, bool]:
        sent = _Sent()
        embedding = call.kind == "embedding"
        for message in call.messages:
            if embedding and _is_token_ids(message):
                # Pre-tokenized input: its length is its count, whatever the model.
                sent.messages += 1
                sent.token_ids += len(message)
            else:
                sent.message(message)
        tools = [_tool_json(tool) for tool in call.tools]
        sent.images.extend(call.images)

        encoding = None
        if self.exact if exact is None else exact:
            name = encoding_name(call.model)
            encoding = load_encoding(name) if name else None
        count = _utf8_len if encoding is None else _token_counter(encoding)

        text = sum(count(t) for t in sent.texts)
        tool_text = sum(count(t) for t in tools)
        images = sum(image_tokens(img, call.model, call.provider) for img in sent.images)
        if embedding:
            framing = 2 * sent.messages
        else:
            framing = self.per_request + self.per_message * sent.messages
            if tools:
                framing += self.per_tool * len(tools) + self._tools_overhead(call)
        total = text + tool_text + images + framing + sent.token_ids
        if notes is not None:
            how = f"tiktoken {encoding.name}" if encoding is not None else "UTF-8 bytes"
            notes.append(
                f"input: {text + tool_text} text tokens by {how} ({len(sent.texts)} pieces, "
                f"{len(tools)} tool schemas) + {framing} framing for {sent.messages} messages"
            )
            if sent.images:
                notes.append(f"input: {images} tokens for {len(sent.images)} images by rule")
            if sent.opaque:
                notes.append(
                    f"input: {sent.opaque} non-image media parts bounded by their encoded size "
                    f"(documents or audio billed by page or second may exceed it)"
                )
        return total, encoding is not None

    def _tools_overhead(self, call: Call) -> int:
        if self.tools_overhead is not None:
            return self.tools_overhead
        vendor = _vendor(_canonical(call.model), call.provider)
        return _TOOLS_OVERHEAD_OPENAI if vendor == "openai" else _TOOLS_OVERHEAD_OTHER


_TOOLS_OVERHEAD_OPENAI = 64
"""OpenAI renders tool schemas inside a short namespace preamble."""
_TOOLS_OVERHEAD_OTHER = 600
"""Anthropic adds a tool-use system prompt (313-530 tokens depending on model and
tool_choice); other providers are assumed to do as much."""


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes, bytearray))
        and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


# -- the adaptive estimator ------------------------------------------------------------------


class AdaptiveEstimator:
    """An opt-in estimator that tightens the byte bound with what settled calls used.

    ``plugins().register(AdaptiveEstimator())``. For each model it keeps the ratio of the
    provider-reported input tokens to the byte-based bound over the last ``window`` calls
    that were settled with real usage (never ones whose usage was itself an estimate), and
    once it has ``min_samples`` of them it reserves
    ``ceil(sound_bound * ratio_quantile * margin)`` input tokens, where ``ratio_quantile`` is
    the ``quantile`` of the window (1.0, the default, is its maximum). Until then, and for
    tool calls and embeddings it defers to the sound estimator, and calls whose input the
    base counts exactly get that exact count. It never reserves more than the sound bound.
    Statistics are kept per model name, with provider prefixes and snapshot dates folded
    into the alias.

    Output is left to the sound estimator: the request's ``max_output_tokens`` is a hard cap
    that is always reserved in full.

    The learned bound is a high quantile of what was seen, not a guarantee: a call whose
    input is less compressible than the history (a base64 blob, a new language) can use
    more than was held. Its actual cost is still charged in full at settle time (and shows
    as an overrun); only the hold was smaller.
    """

    def __init__(
        self,
        base: SoundEstimator | None = None,
        *,
        min_samples: int = 20,
        window: int = 200,
        quantile: float = 1.0,
        margin: float = 1.1,
    ) -> None:
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ConfigurationError(f"min_samples must be a positive int, not {min_samples!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < min_samples:
            raise ConfigurationError(f"window must be an int >= min_samples, not {window!r}")
        if not 0 < quantile <= 1:
            raise ConfigurationError(f"quantile must be in (0, 1], not {quantile!r}")
        if not margin >= 1:
            raise ConfigurationError(f"margin must be >= 1, not {margin!r}")
        self.base = base if base is not None else SoundEstimator()
        self.min_samples = min_samples
        self.window = window
        self.quantile = quantile
        self.margin = margin
        self._ratios: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @hookimpl(tryfirst=True)
    def allotment_estimate(self, call: Call) -> Estimate | None:
        return self.estimate(call)

    @hookimpl
    def allotment_after_call(self, call: Call, usage: Usage, estimate: Estimate | None) -> None:
        self.observe(call, usage, estimate)

    def estimate(self, call: Call) -> Estimate | None:
        """The tightened bound, or ``None`` to let the sound estimator answer."""
        if call.kind != "llm":
            return None
        ratio = self.ratio(call.model)
        if ratio is None:
            return None
        sound = self.base.estimate(call)
        if sound.exact_input:
            # Already counted with the model's tokenizer: nothing to learn, and no reason
            # to count it a second time in the sound estimator.
            return sound
        bound = sound.usage.input_tokens
        tightened = min(bound, math.ceil(bound * ratio * self.margin))
        return Estimate(
            usage=dataclasses.replace(sound.usage, input_tokens=tightened),
            exact_input=False,
            notes=(
                f"input: adaptive {tightened} = sound bound {bound} x learned ratio "
                f"{ratio:.4f} x margin {self.margin}",
                *sound.notes,
            ),
        )

    def observe(self, call: Call, usage: Usage, estimate: Estimate | None = None) -> None:
        """Learn from a settled call (the ``allotment_after_call`` hook calls this)."""
        if usage.estimated or call.kind != "llm" or usage.input_tokens <= 0:
            return
        if estimate is not None and estimate.exact_input:
            return
        bound = self.base.sound_input(call)
        if bound <= 0:
            return
        key = _model_key(call.model)
        with self._lock:
            ratios = self._ratios.get(key)
            if ratios is None:
                ratios = self._ratios[key] = deque(maxlen=self.window)
            ratios.append(usage.input_tokens / bound)

    def ratio(self, model: str | None) -> float | None:
        """The learned quantile of actual/bound for ``model``, or ``None`` before enough calls."""
        with self._lock:
            ratios = self._ratios.get(_model_key(model))
            if ratios is None or len(ratios) < self.min_samples:
                return None
            ordered = sorted(ratios)
        rank = max(math.ceil(self.quantile * len(ordered)) - 1, 0)
        return ordered[rank]

    def samples(self, model: str | None) -> int:
        """How many settled calls of ``model`` are in the window."""
        with self._lock:
            ratios = self._ratios.get(_model_key(model))
            return 0 if ratios is None else len(ratios)
