"""Pure translations between LangChain's callback arguments and allotment's values."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from allotment import BudgetExceeded, Call, Usage

from ._errors import BudgetHardStop

_ROLES = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "function",
    "developer": "developer",
}
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens")
_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name")


def model_of(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    """The model name: LangSmith's ``ls_model_name``, else the invocation parameters'."""
    name = metadata.get("ls_model_name")
    if isinstance(name, str) and name:
        return name
    for key in _MODEL_KEYS:
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def max_tokens_of(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> int | None:
    """The request's output cap, whichever name the provider package gives it."""
    for key in _MAX_TOKEN_KEYS:
        value = _count(params.get(key))
        if value is not None:
            return value
    return _count(metadata.get("ls_max_tokens"))


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def tools_of(params: Mapping[str, Any]) -> Sequence[Any]:
    """Tool schemas bound to the model (they are sent, and billed, as input)."""
    tools = params.get("tools") or params.get("functions")
    return tools if isinstance(tools, list) else ()


def message_payload(message: Any) -> Any:
    """A LangChain message as the role/content mapping a provider is sent."""
    content = getattr(message, "content", None)
    if content is None:
        return message if isinstance(message, str) else str(message)
    kind = getattr(message, "type", "")
    payload: dict[str, Any] = {
        "role": _ROLES.get(kind) or getattr(message, "role", kind),
        "content": content,
    }
    calls = getattr(message, "tool_calls", None)
    if calls:
        payload["tool_calls"] = [
            {"id": c.get("id"), "name": c.get("name"), "args": c.get("args")} for c in calls
        ]
    extra = getattr(message, "additional_kwargs", None)
    if extra and "function_call" in extra:
        payload["function_call"] = extra["function_call"]
    name = getattr(message, "name", None)
    if name:
        payload["name"] = name
    call_id = getattr(message, "tool_call_id", None)
    if call_id:
        payload["tool_call_id"] = call_id
    return payload


def llm_call(
    messages: Sequence[Any],
    metadata: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    agent: str | None,
    run_id: Any,
) -> Call:
    """The kernel's description of a model call about to be sent."""
    provider = metadata.get("ls_provider")
    return Call(
        kind="llm",
        model=model_of(metadata, params),
        provider=provider if isinstance(provider, str) else None,
        messages=[message_payload(m) for m in messages],
        tools=tools_of(params),
        max_output_tokens=max_tokens_of(metadata, params),
        agent=agent,
        metadata={"framework": "langchain", "run_id": run_id},
    )


def tool_call(name: str, *, agent: str | None, run_id: Any) -> Call:
    """The kernel's description of a tool call about to run."""
    return Call(
        kind="tool",
        tool_name=name,
        agent=agent,
        metadata={"framework": "langchain", "run_id": run_id},
    )


def tool_usage(name: str) -> Usage:
    """What one run of tool ``name`` spends: one call, by name (the kernel prices it $0)."""
    return Usage(tool_calls=1, tools=((name, 1),))


# -- usage reported by the provider ------------------------------------------------------


def usage_from_metadata(usage: Mapping[str, Any]) -> Usage:
    """``AIMessage.usage_metadata`` as allotment usage (cache and reasoning are parts of
    input and output in both conventions)."""
    inputs = _tokens(usage.get("input_tokens"))
    outputs = _tokens(usage.get("output_tokens"))
    details_in = usage.get("input_token_details") or {}
    details_out = usage.get("output_token_details") or {}
    cache_read = _tokens(details_in.get("cache_read"))
    cache_write = _tokens(details_in.get("cache_creation"))
    reasoning = _tokens(details_out.get("reasoning"))
    return Usage(
        # A provider that reports details beyond its totals is trusted on the details.
        input_tokens=max(inputs, cache_read + cache_write),
        output_tokens=max(outputs, reasoning),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        llm_calls=1,
    )


def usage_from_token_usage(usage: Mapping[str, Any]) -> Usage:
    """An OpenAI-style ``llm_output["token_usage"]`` (completion-style LLMs) as usage."""
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    inputs = _tokens(usage.get("prompt_tokens"))
    outputs = _tokens(usage.get("completion_tokens"))
    cache_read = _tokens(details_in.get("cached_tokens"))
    reasoning = _tokens(details_out.get("reasoning_tokens"))
    return Usage(
        input_tokens=max(inputs, cache_read),
        output_tokens=max(outputs, reasoning),
        cache_read_tokens=cache_read,
        reasoning_tokens=reasoning,
        llm_calls=1,
    )


def _tokens(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def reported_usage(response: Any) -> Usage | None:
    """The usage a provider reported in an ``LLMResult``, or ``None`` if it reported none
    (or only zeros, which is how several servers say "unknown")."""
    usage = None
    generations = getattr(response, "generations", None) or ()
    if generations and generations[0]:
        message = getattr(generations[0][0], "message", None)
        metadata = getattr(message, "usage_metadata", None)
        if metadata:
            usage = usage_from_metadata(metadata)
    if usage is None:
        output = getattr(response, "llm_output", None) or {}
        token_usage = output.get("token_usage") if isinstance(output, Mapping) else None
        if isinstance(token_usage, Mapping) and token_usage:
            usage = usage_from_token_usage(token_usage)
    if usage is None or usage.total_tokens == 0:
        return None
    return usage


def cache_hit(response: Any) -> bool:
    """Whether LangChain answered from its LLM cache: it marks cached messages with a
    ``total_cost`` of 0 in their usage metadata (the provider was not called)."""
    generations = getattr(response, "generations", None) or ()
    if not generations or not generations[0]:
        return False
    message = getattr(generations[0][0], "message", None)
    usage = getattr(message, "usage_metadata", None)
    return isinstance(usage, Mapping) and usage.get("total_cost") == 0


# -- generated text, for estimates -------------------------------------------------------


def generated_text(response: Any) -> str:
    """Everything a response generated (text, reasoning, tool calls), as one string."""
    parts: list[str] = []
    generations = getattr(response, "generations", None) or ()
    for generation in generations[0] if generations else ():
        message = getattr(generation, "message", None)
        if message is None:
            parts.append(getattr(generation, "text", "") or "")
            continue
        _content_text(getattr(message, "content", ""), parts)
        for call in getattr(message, "tool_calls", None) or ():
            parts.append(call.get("name") or "")
            parts.append(json.dumps(call.get("args") or {}, default=str))
        extra = getattr(message, "additional_kwargs", None) or {}
        for key in ("function_call", "reasoning_content"):
            if key in extra:
                parts.append(json.dumps(extra[key], default=str))
    return "".join(parts)


def chunk_text(token: Any, chunk: Any) -> str:
    """The text a streamed chunk carries: content, reasoning and tool-call arguments."""
    message = getattr(chunk, "message", None)
    if (
        type(token) is str
        and not getattr(message, "tool_call_chunks", None)
        and not getattr(message, "additional_kwargs", None)
    ):
        return token  # nearly every chunk: plain text, nothing else to look at
    parts: list[str] = []
    _content_text(token, parts)
    if message is not None:
        for call in getattr(message, "tool_call_chunks", None) or ():
            parts.append(call.get("name") or "")
            parts.append(call.get("args") or "")
        extra = getattr(message, "additional_kwargs", None)
        if extra:
            for key in ("function_call", "reasoning_content"):
                value = extra.get(key)
                if value:
                    parts.append(value if isinstance(value, str) else json.dumps(value))
    return "".join(parts)


_TEXT_FIELDS = ("text", "thinking", "reasoning", "partial_json", "args", "arguments")


def _content_text(content: Any, parts: list[str]) -> None:
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, Mapping):
        for key in _TEXT_FIELDS:
            value = content.get(key)
            if isinstance(value, str):
                parts.append(value)
        inner = content.get("input")
        if isinstance(inner, (str, Mapping)) and inner:
            parts.append(inner if isinstance(inner, str) else json.dumps(inner, default=str))
    elif isinstance(content, Sequence):
        for item in content:
            _content_text(item, parts)


def event_text(event: Mapping[str, Any]) -> str:
    """The generated text in a v3 protocol stream event (``on_stream_event``)."""
    if event.get("event") != "content-block-delta":
        return ""
    delta = event.get("delta") or {}
    for key in ("text", "reasoning", "args", "data"):
        value = delta.get(key)
        if isinstance(value, str):
            return value
    fields = delta.get("fields")
    return json.dumps(fields, default=str) if fields else ""


def event_usage(event: Mapping[str, Any]) -> Usage | None:
    """Usage carried by a v3 ``message-finish`` event."""
    if event.get("event") != "message-finish" or not event.get("usage"):
        return None
    usage = usage_from_metadata(event["usage"])
    return usage if usage.total_tokens else None


# -- errors ------------------------------------------------------------------------------

_UNSENT = frozenset({"ConnectError", "ConnectTimeout", "ConnectionRefusedError"})


def reached_provider(error: BaseException) -> bool | None:
    """Whether a failed call got to the provider: False if it answered with an error
    status (providers do not bill those) or no connection was made, ``None`` when nobody
    can tell (a timeout, a dropped connection, a 200 that failed to parse)."""
    if isinstance(error, (BudgetExceeded, BudgetHardStop)):
        return False
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        status = getattr(exc, "status_code", None)
        if status is None:
            status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 400:
            return False
        if _UNSENT.intersection(c.__name__ for c in type(exc).__mro__):
            return False
        exc = exc.__cause__ or exc.__context__
    return None


# -- what a ChatOpenAI is configured to do -------------------------------------------------


def streams_without_usage(serialized: Mapping[str, Any] | None, params: Mapping[str, Any]) -> bool:
    """True for a ``ChatOpenAI`` on a custom base URL that does not ask for streamed usage
    (langchain-openai turns ``stream_usage`` on only for the default OpenAI URL)."""
    if not serialized:
        return False
    ids = serialized.get("id") or ()
    if not ids or ids[-1] != "ChatOpenAI":
        return False
    kwargs = serialized.get("kwargs") or {}
    custom_base = bool(kwargs.get("openai_api_base")) or "OPENAI_BASE_URL" in os.environ
    if not custom_base:
        return False
    options = params.get("stream_options")
    asked = (
        kwargs.get("stream_usage") is True
        or params.get("stream_usage") is True
        or (isinstance(options, Mapping) and options.get("include_usage") is True)
    )
    return not asked
