"""OpenAI wire shapes: completion bodies, stream chunks and embeddings."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
import struct
from collections.abc import Sequence
from typing import Any, Literal

from ._script import Reply, ToolCall, Usage

Endpoint = Literal["chat", "completion"]

FINGERPRINT = "fp_allotment_scripted"
_WORDS = re.compile(r"\s*\S+\s*$|\s*\S+")
_DEFAULT_ARGUMENT_CHUNK = 16


def new_id(prefix: str) -> str:
    """An id shaped like OpenAI's, e.g. ``chatcmpl-...`` or ``call_...``."""
    return prefix + secrets.token_hex(12)


def split(text: str, reply: Reply, *, words: bool) -> list[str]:
    """Cut ``text`` into stream pieces by the reply's chunk_size or chunks, else by default."""
    if not text:
        return []
    if reply.chunks is not None:
        size = max(1, math.ceil(len(text) / reply.chunks))
    elif reply.chunk_size is not None:
        size = reply.chunk_size
    elif words:
        # Leading whitespace stays on each piece, as BPE tokens carry it.
        return _WORDS.findall(text) or [text]
    else:
        size = _DEFAULT_ARGUMENT_CHUNK
    return [text[i : i + size] for i in range(0, len(text), size)]


def tool_call_ids(calls: Sequence[ToolCall]) -> list[str]:
    """The ids to send: fixed ones as given, fresh ones for the rest."""
    return [call.id if call.id is not None else new_id("call_") for call in calls]


def chat_completion(
    reply: Reply, *, id: str, created: int, model: str, ids: list[str], usage: Usage | None
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.content,
        "refusal": None,
        "annotations": [],
    }
    if reply.calls:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for call, call_id in zip(reply.calls, ids, strict=True)
        ]
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reply.effective_finish_reason,
            }
        ],
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }
    if usage is not None:
        body["usage"] = usage.to_openai()
    return body


def chat_chunks(
    reply: Reply,
    *,
    id: str,
    created: int,
    model: str,
    ids: list[str],
    usage: Usage | None,
    usage_fields: bool,
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a stream, in order, without ``[DONE]``.

    With ``usage_fields`` every chunk carries ``"usage": null`` and a final chunk with empty
    choices carries ``usage``, which is what OpenAI does for ``include_usage``.
    """

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if usage_fields:
            data["usage"] = None
        return data

    first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
    if reply.content is None:
        first["content"] = None
    chunks = [chunk(first)]
    for piece in split(reply.content or "", reply, words=True):
        chunks.append(chunk({"content": piece}))
    for index, (call, call_id) in enumerate(zip(reply.calls, ids, strict=True)):
        opening = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        chunks.append(chunk({"tool_calls": [opening]}))
        for piece in split(call.arguments_json, reply, words=False):
            chunks.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    chunks.append(chunk({}, reply.effective_finish_reason))
    if usage_fields and usage is not None:
        final = chunk({})
        final["choices"] = []
        final["usage"] = usage.to_openai()
        chunks.append(final)
    return chunks


def _legacy_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def completion(
    reply: Reply, *, id: str, created: int, model: str, usage: Usage | None
) -> dict[str, Any]:
    """A non-streamed legacy ``text_completion`` object."""
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "text": reply.content or "",
                "index": 0,
                "logprobs": None,
                "finish_reason": reply.finish_reason or "stop",
            }
        ],
        "system_fingerprint": FINGERPRINT,
    }
    if usage is not None:
        body["usage"] = _legacy_usage(usage)
    return body


def completion_chunks(
    reply: Reply,
    *,
    id: str,
    created: int,
    model: str,
    usage: Usage | None,
    usage_fields: bool,
) -> list[dict[str, Any]]:
    """The legacy ``text_completion`` stream chunks, without ``[DONE]``."""

    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
            "system_fingerprint": FINGERPRINT,
        }
        if usage_fields:
            data["usage"] = None
        return data

    chunks = [chunk(piece) for piece in split(reply.content or "", reply, words=True)]
    chunks.append(chunk("", reply.finish_reason or "stop"))
    if usage_fields and usage is not None:
        final = chunk("")
        final["choices"] = []
        final["usage"] = _legacy_usage(usage)
        chunks.append(final)
    return chunks


def embedding_inputs(value: Any) -> list[str]:
    """Each input of an embeddings request as a string key (token lists as their JSON)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return [repr(value)]
        return [item if isinstance(item, str) else repr(item) for item in value]
    return [repr(value)]


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on ``text``, so equal inputs embed equally."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        raw.extend((byte - 127.5) / 127.5 for byte in digest)
        counter += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    # Round-trip through float32 so float and base64 answers agree exactly.
    return [struct.unpack("<f", struct.pack("<f", x / norm))[0] for x in raw]


def embeddings(
    inputs: list[str], *, model: str, dimensions: int, base64_format: bool, prompt_tokens: int
) -> dict[str, Any]:
    """An embeddings ``list`` response."""
    data: list[dict[str, Any]] = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dimensions)
        encoded: Any = vector
        if base64_format:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
