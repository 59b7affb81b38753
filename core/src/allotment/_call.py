"""The description of a call an integration is about to make."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import InvalidAmount

CallKind = Literal["llm", "tool", "embedding"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Image:
    """An image sent to a model, described by size, not by its base64 length."""

    width: int | None = None
    """Pixels; ``None`` when unknown (the estimator then assumes the largest the provider takes)."""
    height: int | None = None
    """Pixels; ``None`` when unknown."""
    detail: str = "auto"
    """OpenAI-style detail level: ``low``, ``high`` or ``auto``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Call:
    """What an integration is about to send, in framework-neutral terms.

    Integrations translate their framework's request into a ``Call``; the estimate hook
    turns it into an upper bound and the price hook into dollars.
    """

    kind: CallKind = "llm"
    """``llm``, ``tool`` or ``embedding``."""
    model: str | None = None
    """Model name as the provider knows it (``gpt-4o-mini``, ``claude-sonnet-4-5``)."""
    provider: str | None = None
    """Provider id when known (``openai``, ``anthropic``); helps pricing pick the right list."""
    messages: Sequence[Any] = ()
    """What is sent: strings, or role/content mappings, or framework message objects
    already flattened to text."""
    tools: Sequence[Any] = ()
    """Tool schemas sent with the request (they cost input tokens too)."""
    images: Sequence[Image] = ()
    """Images sent with the request."""
    max_output_tokens: int | None = None
    """The request's output cap, when it sets one."""
    tool_name: str | None = None
    """For tool calls: the tool's name (per-tool limits use it)."""
    agent: str | None = None
    """The agent making the call, when the integration knows it."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Anything else an integration wants plugins to see."""

    def __post_init__(self) -> None:
        for name in ("messages", "tools", "images"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, ())
            elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                if name == "messages" and isinstance(value, str):
                    object.__setattr__(self, name, (value,))
                else:
                    raise InvalidAmount(f"{name} must be a list, not {type(value).__name__}")
        if self.kind not in ("llm", "tool", "embedding"):
            raise InvalidAmount(
                f"call kind must be 'llm', 'tool' or 'embedding', not {self.kind!r}"
            )
        if self.max_output_tokens is not None and (
            isinstance(self.max_output_tokens, bool)
            or not isinstance(self.max_output_tokens, int)
            or self.max_output_tokens < 0
        ):
            raise InvalidAmount(
                f"max_output_tokens must be a non-negative int, got {self.max_output_tokens!r}"
            )
        if self.kind == "tool" and not self.tool_name:
            raise InvalidAmount("a tool call needs a tool_name")
