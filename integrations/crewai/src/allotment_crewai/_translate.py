"""Pure translations between CrewAI's objects and allotment's values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from allotment import Call, Usage

DELEGATION_TOOLS = frozenset({"delegate_work_to_coworker", "ask_question_to_coworker"})
"""CrewAI's delegation tools, by their sanitized names (how hook contexts name them)."""

_BLOCKED_PREFIX = "Tool execution blocked by hook"


def model_of(llm: Any) -> tuple[str | None, str | None]:
    """The model name as the provider knows it, and the provider id.

    CrewAI's native providers keep the bare name (``gpt-4o-mini``) and the provider apart;
    LiteLLM-style names carry it as a prefix (``openai/gpt-4o-mini``).
    """
    if isinstance(llm, str):
        model: object = llm
        provider: object = None
    else:
        model = getattr(llm, "model", None)
        provider = getattr(llm, "provider", None)
    if not isinstance(model, str) or not model:
        return None, provider if isinstance(provider, str) else None
    prefix, sep, rest = model.partition("/")
    if sep and rest and (provider in (None, "", prefix)):
        return rest, prefix
    return model, provider if isinstance(provider, str) and provider else None


def max_output_of(llm: Any) -> int | None:
    """The output cap the LLM sends (``max_completion_tokens`` wins over ``max_tokens``,
    as CrewAI's OpenAI provider sends it)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(llm, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value >= 0 and value == int(value):
            return int(value)
    return None


def llm_call(
    llm: Any,
    messages: Sequence[Any],
    tools: Sequence[Any] | None,
    *,
    agent: str | None,
    task: str | None,
) -> Call:
    """The kernel's description of a model call a hook context is about to make."""
    model, provider = model_of(llm)
    return Call(
        kind="llm",
        model=model,
        provider=provider,
        # A snapshot: the executor keeps appending to its own list.
        messages=tuple(messages),
        tools=tuple(tools or ()),
        max_output_tokens=max_output_of(llm),
        agent=agent,
        metadata={"framework": "crewai", "task": task},
    )


def tool_call(tool_name: str, *, agent: str | None, task: str | None) -> Call:
    """The kernel's description of a tool call about to run."""
    return Call(
        kind="tool",
        tool_name=tool_name,
        agent=agent,
        metadata={"framework": "crewai", "task": task},
    )


def tool_usage(tool_name: str) -> Usage:
    """What one run of a tool spends: one call, and no model tokens, so $0 (without a
    cost the kernel would mark the whole budget's dollars unknown)."""
    return Usage(tool_calls=1, tools=((tool_name, 1),), usd=Decimal(0))


def usage_of(metrics: Any) -> Usage | None:
    """A CrewAI ``UsageMetrics`` of one call as allotment usage, or ``None`` when it
    reports no tokens (how providers that omit usage look).

    CrewAI follows the OpenAI convention like allotment does: prompt tokens include cached
    and cache-creation tokens, completion tokens include reasoning tokens. A provider whose
    parts exceed its totals is trusted on the parts.
    """
    if metrics is None:
        return None
    inputs = _count(getattr(metrics, "prompt_tokens", 0))
    outputs = _count(getattr(metrics, "completion_tokens", 0))
    cache_read = _count(getattr(metrics, "cached_prompt_tokens", 0))
    cache_write = _count(getattr(metrics, "cache_creation_tokens", 0))
    reasoning = _count(getattr(metrics, "reasoning_tokens", 0))
    if not (inputs or outputs or cache_read or cache_write or reasoning):
        return None
    return Usage(
        input_tokens=max(inputs, cache_read + cache_write),
        output_tokens=max(outputs, reasoning),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        llm_calls=1,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def budget_name(text: str, fallback: str) -> str:
    """``text`` made a valid budget name ('/' and '#' are the tree's separators)."""
    cleaned = " ".join(str(text).split()).replace("/", "_").replace("#", "_")
    return cleaned[:64] or fallback


def task_label(task: Any, position: int | None) -> str:
    """How a task is named in the budget tree: its ``name``, else its place in the crew."""
    name = getattr(task, "name", None)
    if isinstance(name, str) and name.strip():
        return budget_name(name, "task")
    if position is not None:
        return f"task {position}"
    return budget_name(str(getattr(task, "description", "") or ""), "task")


def limits_for(config: Mapping[str, Any], *keys: object) -> Any:
    """The first per-name limits configured for any of ``keys`` (``None`` if none)."""
    for key in keys:
        if isinstance(key, str) and key in config:
            return config[key]
    return None


def same_role(a: str, b: str) -> bool:
    """Whether two agent roles name the same agent, as CrewAI matches coworkers
    (case, repeated whitespace and quotes ignored)."""
    return _role_key(a) == _role_key(b)


def _role_key(role: str) -> str:
    return " ".join(role.split()).replace('"', "").casefold()


def coworker_of(tool_name: str, tool_input: Mapping[str, Any]) -> str | None:
    """The coworker a delegation tool call names, or ``None`` if it is not a delegation."""
    if tool_name not in DELEGATION_TOOLS:
        return None
    for key in ("coworker", "co_worker"):
        value = tool_input.get(key)
        if isinstance(value, str) and value.strip():
            if value.startswith("[") and value.endswith("]"):
                value = value[1:-1].split(",")[0]
            return value.strip().strip('"')
    return None


def was_blocked(tool_result: object) -> bool:
    """Whether a tool call's result is CrewAI's note that a hook blocked it (it never ran)."""
    return isinstance(tool_result, str) and tool_result.startswith(_BLOCKED_PREFIX)
