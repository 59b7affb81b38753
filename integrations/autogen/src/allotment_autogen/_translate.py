"""Pure translations between AutoGen's model-client objects and allotment's kernel values.

Nothing here imports AutoGen: messages, results and clients are read by their documented
attributes (``type``, ``content``, ``source``...), so the functions stay cheap and testable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import allotment

_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientFacts:
    """What a model client tells us about the calls it makes."""

    model: str | None
    """The model name sent to the provider, when the client exposes it."""
    provider: str | None
    """``openai``, ``azure``, ``anthropic``... when the client's module says so."""
    max_output_tokens: int | None
    """The output cap configured on the client (``max_tokens``), if any."""
    name_prefixes: bool
    """Whether the client prefixes message text with ``"<source> said:"``."""
    stream_usage_option: bool
    """Whether the client speaks OpenAI's ``stream_options`` (usage in streams)."""
    stream_options_set: bool
    """Whether the client was configured with its own ``stream_options`` (they decide)."""
    caches: bool
    """Whether the client is a ``ChatCompletionCache``, whose hits cost nothing."""


def client_chain(client: Any) -> list[Any]:
    """``client`` and the clients it wraps (caches, budget wrappers), outermost first."""
    chain = [client]
    while len(chain) < 16:  # a wrapper cycle would be a bug elsewhere; do not spin on it
        if _is_class(client, "BudgetedChatCompletionClient"):
            client = client.inner
        elif _is_class(client, "ChatCompletionCache"):
            client = getattr(client, "client", None)
        else:
            break
        if client is None:
            break
        chain.append(client)
    return chain


def facts_of(client: Any, *, model: str | None = None, provider: str | None = None) -> ClientFacts:
    """Facts about ``client``; ``model`` and ``provider`` override what it exposes."""
    chain = client_chain(client)
    leaf = chain[-1]
    for wrapper in chain[:-1]:
        # A budget wrapper inside knows the model its user named for pricing.
        facts = getattr(wrapper, "facts", None)
        if isinstance(facts, ClientFacts):
            model = model or facts.model
            provider = provider or facts.provider
    args = getattr(leaf, "_create_args", None)
    args = args if isinstance(args, Mapping) else {}
    found = args.get("model")
    return ClientFacts(
        model=model or (found if isinstance(found, str) else None),
        provider=provider or provider_of(leaf),
        max_output_tokens=max_tokens_of(args),
        name_prefixes=bool(getattr(leaf, "_add_name_prefixes", False)),
        stream_usage_option=_is_class(leaf, "BaseOpenAIChatCompletionClient"),
        stream_options_set="stream_options" in args,
        caches=any(_is_class(c, "ChatCompletionCache") for c in chain),
    )


def provider_of(client: Any) -> str | None:
    """The provider id pricing should use, from the client's class."""
    cls = type(client)
    module = cls.__module__
    if ".openai" in module:
        return "azure" if cls.__name__.startswith("Azure") else "openai"
    for name in ("anthropic", "ollama", "azure", "llama_cpp"):
        if f".{name}" in module:
            return "azure" if name == "azure" else name
    return None


def max_tokens_of(args: Mapping[str, Any]) -> int | None:
    """The output cap in a client's or a request's create arguments."""
    for key in _MAX_TOKEN_KEYS:
        value = args.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _is_class(obj: Any, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


# -- requests ------------------------------------------------------------------------------


def call_of(
    messages: Sequence[Any],
    tools: Sequence[Any],
    json_output: Any,
    extra_create_args: Mapping[str, Any],
    facts: ClientFacts,
    *,
    agent: str | None,
) -> allotment.Call:
    """The kernel's description of one ``create``/``create_stream`` request."""
    sent, images = messages_of(messages, name_prefixes=facts.name_prefixes)
    schemas: list[Any] = [tool_schema(t) for t in tools]
    if isinstance(json_output, type):
        # Structured output ships the model's JSON schema with the request.
        schemas.append(json_output)
    model = extra_create_args.get("model")
    return allotment.Call(
        kind="llm",
        model=model if isinstance(model, str) else facts.model,
        provider=facts.provider,
        messages=sent,
        tools=schemas,
        images=images,
        max_output_tokens=max_tokens_of(extra_create_args) or facts.max_output_tokens,
        agent=agent,
    )


def tool_schema(tool: Any) -> Any:
    """A tool as the schema that is sent (AutoGen ``Tool`` objects carry it in ``schema``)."""
    schema = getattr(tool, "schema", None)
    return schema if isinstance(schema, Mapping) else tool


def messages_of(
    messages: Sequence[Any], *, name_prefixes: bool = False
) -> tuple[list[dict[str, Any]], list[allotment.Image]]:
    """AutoGen ``LLMMessage`` objects as OpenAI-style dicts, and the images they carry."""
    out: list[dict[str, Any]] = []
    images: list[allotment.Image] = []
    for message in messages:
        kind = getattr(message, "type", None)
        content = getattr(message, "content", None)
        source = getattr(message, "source", None)
        if kind == "SystemMessage":
            out.append({"role": "system", "content": content})
        elif kind == "UserMessage":
            out.append(
                {
                    "role": "user",
                    "name": source,
                    "content": _user_content(content, source, name_prefixes, images),
                }
            )
        elif kind == "AssistantMessage":
            entry: dict[str, Any] = {"role": "assistant", "name": source}
            if isinstance(content, str):
                entry["content"] = _prefixed(content, source, name_prefixes)
            else:
                entry["tool_calls"] = [_function_call(c) for c in content or ()]
            thought = getattr(message, "thought", None)
            if thought:
                entry["reasoning"] = thought
            out.append(entry)
        elif kind == "FunctionExecutionResultMessage":
            for result in content or ():
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": getattr(result, "call_id", ""),
                        "name": getattr(result, "name", ""),
                        "content": getattr(result, "content", ""),
                    }
                )
        else:
            # An unknown message type still costs what it says.
            out.append({"content": content if content is not None else str(message)})
    return out, images


def _prefixed(text: str, source: Any, name_prefixes: bool) -> str:
    return f"{source} said:\n{text}" if name_prefixes and source else text


def _user_content(
    content: Any, source: Any, name_prefixes: bool, images: list[allotment.Image]
) -> Any:
    if isinstance(content, str):
        return _prefixed(content, source, name_prefixes)
    parts: list[dict[str, Any]] = []
    for part in content or ():
        if isinstance(part, str):
            parts.append({"type": "text", "text": _prefixed(part, source, name_prefixes)})
            continue
        size = getattr(getattr(part, "image", None), "size", None)
        if isinstance(size, tuple) and len(size) == 2:
            images.append(allotment.Image(width=int(size[0]), height=int(size[1])))
        else:
            images.append(allotment.Image())
    return parts


def _function_call(call: Any) -> dict[str, Any]:
    return {
        "id": getattr(call, "id", ""),
        "type": "function",
        "function": {
            "name": getattr(call, "name", ""),
            "arguments": getattr(call, "arguments", ""),
        },
    }


# -- results ---------------------------------------------------------------------------------


def usage_of(usage: Any) -> allotment.Usage | None:
    """A ``RequestUsage`` as kernel usage; ``None`` when the provider reported none.

    AutoGen fills in 0/0 when a response carried no usage (a stream without
    ``include_usage``, a server that omits it): that is "unknown", never "free".
    """
    if usage is None:
        return None
    prompt = getattr(usage, "prompt_tokens", 0) or 0
    completion = getattr(usage, "completion_tokens", 0) or 0
    if prompt <= 0 and completion <= 0:
        return None
    return allotment.Usage(
        input_tokens=max(0, int(prompt)), output_tokens=max(0, int(completion)), llm_calls=1
    )


def result_text(content: Any) -> str:
    """The generated part of a ``CreateResult``: text, or the tool calls' names and arguments."""
    if isinstance(content, str):
        return content
    pieces = []
    for call in content or ():
        pieces.append(str(getattr(call, "name", "")))
        arguments = getattr(call, "arguments", "")
        pieces.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
    return "".join(pieces)


# -- counting generated text -------------------------------------------------------------------

Counter = Callable[[str], int]
_counters: dict[str | None, tuple[Counter, Counter]] = {}


def counters(model: str | None) -> tuple[Counter, Counter]:
    """``(bound, seen)`` token counters for text ``model`` generates, made once per model.

    ``bound`` is an upper bound, for charging output the provider did not report: the
    model's own tokenizer when it is on disk, else UTF-8 bytes (every byte-level BPE
    token covers at least one byte). ``seen`` is close but not an upper bound, for noticing
    a stream that runs past its hold: a byte count would cut honest streams at a quarter
    of their allowance, so any known tokenizer serves, else four bytes a token.
    """
    found = _counters.get(model)
    if found is None:
        found = _counters[model] = _make_counters(model)
    return found


def _make_counters(model: str | None) -> tuple[Counter, Counter]:
    from allotment import _estimate

    name = _estimate.encoding_name(model)
    own = _estimate.load_encoding(name) if name else None
    near = own if own is not None else _estimate.load_encoding("o200k_base")

    def utf8(text: str) -> int:
        return len(text.encode("utf-8"))

    def quarter(text: str) -> int:
        return max(1, len(text.encode("utf-8")) // 4) if text else 0

    bound: Counter = utf8 if own is None else _length_in(own)
    seen: Counter = quarter if near is None else _length_in(near)
    return bound, seen


def _length_in(encoding: Any) -> Counter:
    encode = encoding.encode_ordinary  # text as sent, special-token strings included

    def count(text: str) -> int:
        return len(encode(text)) if text else 0

    return count


def bound_tokens(text: str, model: str | None) -> int:
    """An upper bound of the tokens in generated ``text`` (see ``counters``)."""
    return counters(model)[0](text)


def seen_tokens(text: str, model: str | None) -> int:
    """About how many tokens ``text`` is (see ``counters``)."""
    return counters(model)[1](text)
