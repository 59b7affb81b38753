"""Pure translations between LlamaIndex callback payloads and allotment's ``Call`` and ``Usage``.

Nothing here imports LlamaIndex: payload keys are the string values of ``EventPayload``
(a ``str`` enum, so both spellings look up the same entry) and framework objects are read
by attribute, which keeps these functions cheap to call and easy to test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from allotment import BudgetExceeded, Call, Usage

MESSAGES = "messages"
PROMPT = "formatted_prompt"
SERIALIZED = "serialized"
ADDITIONAL_KWARGS = "additional_kwargs"
RESPONSE = "response"
COMPLETION = "completion"
EXCEPTION = "exception"
CHUNKS = "chunks"
TOOL = "tool"

_MAX_TOKEN_KWARGS = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "max_new_tokens",
    "num_predict",
)

_PROVIDERS = {
    "openai_llm": "openai",
    "azure_openai_llm": "azure",
    "OpenAIEmbedding": "openai",
    "AzureOpenAIEmbedding": "azure",
    "Anthropic_LLM": "anthropic",
}

STREAM_USAGE_CLASSES = frozenset({"openai_llm", "azure_openai_llm"})
"""LLM classes that forward call kwargs into an OpenAI chat-completions request and drop
``stream_options`` from requests that do not stream, so asking for streamed usage is safe."""

ErrorOutcome = Literal["release", "estimate"]


def provider_of(serialized: Mapping[str, Any]) -> str | None:
    """The provider id for a serialized LLM or embedding model, when its class says so."""
    name = serialized.get("class_name")
    return _PROVIDERS.get(name) if isinstance(name, str) else None


def model_of(serialized: Mapping[str, Any]) -> str | None:
    """The model name a serialized LLM or embedding model reports (``None`` if unknown)."""
    name = serialized.get("model_name")
    return name if isinstance(name, str) and name else None


def wants_stream_usage(serialized: Mapping[str, Any]) -> bool:
    """Whether a call of this LLM can safely be asked to report usage in its stream."""
    return serialized.get("class_name") in STREAM_USAGE_CLASSES


def request_stream_usage(kwargs: dict[str, Any]) -> None:
    """Ask an OpenAI-style request to end its stream with a usage chunk.

    ``kwargs`` is the call's own keyword dict (the callback payload holds the same object
    the LLM is then called with), so setting it here reaches the request. An explicit
    ``stream_options`` is left as the caller gave it.
    """
    kwargs.setdefault("stream_options", {"include_usage": True})


def output_cap(serialized: Mapping[str, Any], kwargs: Mapping[str, Any]) -> int | None:
    """The largest output the request allows, from the LLM's ``max_tokens`` and the call's.

    When both are set, the larger is taken: which one wins depends on the LLM class, and
    the larger is the safe bound either way.
    """
    values = [serialized.get("num_output"), *(kwargs.get(k) for k in _MAX_TOKEN_KWARGS)]
    caps = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(caps) if caps else None


# -- requests ------------------------------------------------------------------------------


def llm_call(payload: Mapping[str, Any], *, agent: str | None = None) -> Call:
    """The ``Call`` an LLM start event is about to make."""
    serialized = payload.get(SERIALIZED) or {}
    kwargs = payload.get(ADDITIONAL_KWARGS) or {}
    raw_messages = payload.get(MESSAGES)
    if raw_messages is not None:
        messages = [message_dict(m) for m in raw_messages]
    else:
        prompt = payload.get(PROMPT)
        messages = [] if prompt is None else [{"role": "user", "content": str(prompt)}]
    tools = [tool_schema(t) for t in kwargs.get("tools") or ()]
    schema = kwargs.get("response_format")
    if isinstance(schema, Mapping):
        # A structured-output schema is sent and billed like a tool schema.
        tools.append(schema)
    return Call(
        kind="llm",
        model=model_of(serialized),
        provider=provider_of(serialized),
        messages=messages,
        tools=tools,
        max_output_tokens=output_cap(serialized, kwargs),
        agent=agent,
        metadata={"framework": "llamaindex", "class_name": serialized.get("class_name")},
    )


def embedding_call(
    serialized: Mapping[str, Any], texts: Sequence[str], *, agent: str | None = None
) -> Call:
    """The ``Call`` an embedding start event is about to make, for ``texts``."""
    return Call(
        kind="embedding",
        model=model_of(serialized),
        provider=provider_of(serialized),
        messages=list(texts),
        agent=agent,
        metadata={"framework": "llamaindex", "class_name": serialized.get("class_name")},
    )


def tool_call(name: str, *, agent: str | None = None) -> Call:
    """The ``Call`` for running the tool ``name``."""
    return Call(kind="tool", tool_name=name, agent=agent, metadata={"framework": "llamaindex"})


def tool_name_of(payload: Mapping[str, Any]) -> str | None:
    """The tool a ``FUNCTION_CALL`` start event names (its ``ToolMetadata``)."""
    tool = payload.get(TOOL)
    name = getattr(tool, "name", None)
    if name is None and isinstance(tool, Mapping):
        name = tool.get("name")
    return name if isinstance(name, str) and name else None


def message_dict(message: Any) -> Any:
    """A chat message as the plain data the estimator counts: every block that is sent.

    ``ChatMessage.content`` holds only the text blocks; images, tool calls and thinking
    blocks are sent too and must be in the bound.
    """
    blocks = getattr(message, "blocks", None)
    if blocks is None:
        return message
    role = getattr(message, "role", "user")
    parts: list[Any] = []
    calls: list[Any] = []
    for block in blocks:
        kind = getattr(block, "block_type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind == "thinking":
            parts.append(block.content or "")
        elif kind == "tool_call":
            calls.append({"name": block.tool_name, "arguments": _arguments(block.tool_kwargs)})
        else:
            # Documents, audio, citations: the estimator bounds them by their serialized size.
            parts.append(block)
    out: dict[str, Any] = {"role": getattr(role, "value", role), "content": parts}
    extra = getattr(message, "additional_kwargs", None) or {}
    if extra.get("tool_calls"):
        calls.extend(extra["tool_calls"])
    if calls:
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(extra.get(key), str):
            out[key] = extra[key]
    return out


def _image_part(block: Any) -> dict[str, Any]:
    detail = getattr(block, "detail", None) or "auto"
    data = getattr(block, "image", None)
    if isinstance(data, bytes) and data:
        mime = getattr(block, "image_mimetype", None) or "image/png"
        # LlamaIndex keeps image bytes base64-encoded; the estimator reads the size from them.
        url = f"data:{mime};base64,{data.decode('ascii', 'ignore')}"
    else:
        url = str(getattr(block, "url", None) or "")
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def _arguments(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def tool_schema(tool: Any) -> Any:
    """A tool as the provider is sent it: OpenAI dicts as given, LlamaIndex tools as their
    OpenAI function schema."""
    if isinstance(tool, Mapping):
        return tool
    metadata = getattr(tool, "metadata", None)
    to_openai = getattr(metadata, "to_openai_tool", None)
    if callable(to_openai):
        return to_openai()
    return tool


# -- responses -----------------------------------------------------------------------------


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if type(obj) is dict:  # the common case, without an abstract-class check
        return obj.get(key)
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _count(obj: Any, key: str) -> int:
    value = _get(obj, key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_counts(counts: Any) -> Usage | None:
    """Usage from a provider's usage object or a token-count mapping; ``None`` if it has none.

    Understands OpenAI chat completions (``prompt_tokens``, cached and reasoning details),
    the OpenAI Responses API and Anthropic (``input_tokens``; Anthropic's excludes its cache
    reads and writes, which are added back so input includes them), and Gemini's
    ``usage_metadata`` (its candidate count excludes thinking tokens).
    """
    if counts is None:
        return None
    if _get(counts, "prompt_tokens") is not None or _get(counts, "completion_tokens") is not None:
        input_tokens = _count(counts, "prompt_tokens")
        output_tokens = _count(counts, "completion_tokens")
        cached = _count(_get(counts, "prompt_tokens_details"), "cached_tokens")
        reasoning = _count(_get(counts, "completion_tokens_details"), "reasoning_tokens")
        return _usage(input_tokens, output_tokens, cached, 0, reasoning)
    if _get(counts, "input_tokens") is not None or _get(counts, "output_tokens") is not None:
        input_tokens = _count(counts, "input_tokens")
        output_tokens = _count(counts, "output_tokens")
        read = _count(counts, "cache_read_input_tokens")
        write = _count(counts, "cache_creation_input_tokens")
        if read or write or _get(counts, "cache_read_input_tokens") is not None:
            input_tokens += read + write
        else:
            read = _count(_get(counts, "input_tokens_details"), "cached_tokens")
        reasoning = _count(_get(counts, "output_tokens_details"), "reasoning_tokens")
        return _usage(input_tokens, output_tokens, read, write, reasoning)
    if _get(counts, "prompt_token_count") is not None:
        thoughts = _count(counts, "thoughts_token_count")
        return _usage(
            _count(counts, "prompt_token_count"),
            _count(counts, "candidates_token_count") + thoughts,
            _count(counts, "cached_content_token_count"),
            0,
            thoughts,
        )
    return None


def _usage(input_tokens: int, output_tokens: int, read: int, write: int, reasoning: int) -> Usage:
    # Providers occasionally report details that do not add up; never let that refuse a
    # settle, the totals are what is billed.
    read = min(read, input_tokens)
    write = min(write, input_tokens - read)
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=min(reasoning, output_tokens),
        llm_calls=1,
    )


def usage_of_response(response: Any) -> Usage | None:
    """The usage a ``ChatResponse`` or ``CompletionResponse`` reports, ``None`` if none.

    Looks at ``raw`` (the provider's own response or last stream chunk) first, then at the
    token counts LlamaIndex copies into ``additional_kwargs``.
    """
    if response is None:
        return None
    raw = getattr(response, "raw", None)
    for counts in (_get(raw, "usage"), _get(raw, "usage_metadata")):
        usage = usage_from_counts(counts)
        if usage is not None:
            return usage
    return usage_from_counts(getattr(response, "additional_kwargs", None) or None)


def response_text(response: Any) -> str:
    """What a response generated, as text: its content and its tool calls' arguments."""
    if response is None:
        return ""
    message = getattr(response, "message", None)
    if message is None:
        text = getattr(response, "text", None)
        return text if isinstance(text, str) else ""
    pieces: list[str] = []
    for block in getattr(message, "blocks", None) or ():
        kind = getattr(block, "block_type", None)
        if kind == "text":
            pieces.append(block.text)
        elif kind == "thinking":
            pieces.append(block.content or "")
        elif kind == "tool_call":
            pieces.append(block.tool_name)
            pieces.append(_arguments(block.tool_kwargs))
    extra = getattr(message, "additional_kwargs", None) or {}
    pieces.extend(_call_texts(extra.get("tool_calls") or ()))
    return "".join(pieces)


def _call_texts(calls: Iterable[Any]) -> Iterable[str]:
    for call in calls:
        function = _get(call, "function")
        for value in (_get(function, "name"), _get(function, "arguments")):
            if isinstance(value, str):
                yield value


def error_outcome(error: BaseException, *, partial: bool) -> ErrorOutcome:
    """What an LLM call that ended with ``error`` costs: nothing, or an estimate.

    A refusal, or an HTTP error answer (4xx, 5xx: providers do not bill those), was not
    billed. Output already streamed, a timeout, a cancelled call, or a consumer that
    stopped reading may have been billed: settle an estimate, flagged as such. Any other
    error is taken to have happened before the request was answered.
    """
    if isinstance(error, BudgetExceeded):
        return "release"
    if partial:
        return "estimate"
    status = getattr(error, "status_code", None)
    if status is None:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return "release"
    if not isinstance(error, Exception):  # GeneratorExit, CancelledError, KeyboardInterrupt
        return "estimate"
    if any("Timeout" in cls.__name__ for cls in type(error).__mro__):
        return "estimate"
    return "release"
