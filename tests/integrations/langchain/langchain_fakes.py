"""Fake model providers for the LangChain tests: LangChain's own fake chat model, extended
to name its model, attach usage, stream tool calls, and count the calls that reach it."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import allotment
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict

FAKE_MODEL = "fake-1"
FAKE_PRICE = allotment.Price(input_mtok="10", output_mtok="30")
"""$10 per million input tokens, $30 per million output: 1,000 in / 500 out = $0.025."""
PRICES = {FAKE_MODEL: FAKE_PRICE}


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    """What ``fake-1`` charges for a call."""
    return (Decimal(input_tokens) * 10 + Decimal(output_tokens) * 30) / Decimal(1_000_000)


def usage(
    input_tokens: int = 1000,
    output_tokens: int = 500,
    *,
    cache_read: int = 0,
    cache_creation: int = 0,
    reasoning: int = 0,
) -> dict[str, Any]:
    """``AIMessage.usage_metadata`` as a provider package fills it in."""
    data: dict[str, Any] = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    if cache_read or cache_creation:
        data["input_token_details"] = {"cache_read": cache_read, "cache_creation": cache_creation}
    if reasoning:
        data["output_token_details"] = {"reasoning": reasoning}
    return data


def reply(
    content: str = "ok",
    *,
    tool_calls: Sequence[tuple[str, dict[str, Any]]] = (),
    input_tokens: int = 1000,
    output_tokens: int = 500,
    reported: bool = True,
    **details: int,
) -> AIMessage:
    """A scripted answer; ``reported=False`` leaves the usage out."""
    calls = [
        {"name": name, "args": args, "id": f"call_{i}_{name}", "type": "tool_call"}
        for i, (name, args) in enumerate(tool_calls)
    ]
    return AIMessage(
        content=content,
        tool_calls=calls,
        usage_metadata=usage(input_tokens, output_tokens, **details) if reported else None,  # type: ignore[arg-type]
    )


Script = Callable[[list[BaseMessage]], AIMessage]


class FakeProvider:
    """What the fake model talks to: answers from a list (then ``default``) or a function,
    and counts the calls that reached it."""

    def __init__(
        self, replies: Sequence[AIMessage] | Script = (), *, default: AIMessage | None = None
    ) -> None:
        self._script = replies if callable(replies) else None
        self._queue = [] if callable(replies) else list(replies)
        self._default = default
        self._lock = threading.Lock()
        self.requests: list[list[BaseMessage]] = []

    @property
    def calls(self) -> int:
        """Calls that reached the provider."""
        with self._lock:
            return len(self.requests)

    def answer(self, messages: list[BaseMessage]) -> AIMessage:
        with self._lock:
            self.requests.append(list(messages))
            queued = self._queue.pop(0) if self._queue else None
        if self._script is not None:
            return self._script(messages)  # outside the lock: scripts may wait for each other
        if queued is not None:
            return queued
        if self._default is None:
            raise AssertionError("the fake provider got a call its script did not expect")
        return self._default.model_copy()


class FakeChat(GenericFakeChatModel):
    """``GenericFakeChatModel`` with a model name (so the budget can price it), usage on
    replies and on the last streamed chunk, streamed tool calls, and a call counter."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    messages: Iterator[AIMessage | str] = iter(())
    provider: FakeProvider
    model: str = FAKE_MODEL
    max_tokens: int | None = 500
    stream_usage: bool = True
    chunk_words: int = 1

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self.provider.answer(messages))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        message = self.provider.answer(messages)
        text = message.content if isinstance(message.content, str) else ""
        words = [w for w in re.split(r"(\s+)", text) if w]
        step = max(1, self.chunk_words)
        for i in range(0, len(words), step):
            yield ChatGenerationChunk(message=AIMessageChunk(content="".join(words[i : i + step])))
        for index, call in enumerate(message.tool_calls):
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    tool_call_chunks=[
                        tool_call_chunk(
                            name=call["name"],
                            args=_json(call["args"]),
                            id=call["id"],
                            index=index,
                        )
                    ],
                )
            )
        last = AIMessageChunk(content="", chunk_position="last")
        if self.stream_usage and message.usage_metadata:
            last.usage_metadata = message.usage_metadata
        yield ChatGenerationChunk(message=last)

    @property
    def _llm_type(self) -> str:
        return "fake-usage-chat"


def _json(args: dict[str, Any]) -> str:
    import json

    return json.dumps(args)


def fake_chat(
    replies: Sequence[AIMessage] | Script = (),
    *,
    default: AIMessage | None = None,
    **fields: Any,
) -> tuple[FakeChat, FakeProvider]:
    """A fake model and the provider it calls."""
    provider = FakeProvider(replies, default=default)
    return FakeChat(provider=provider, **fields), provider


def no_open_holds(budget: allotment.Budget) -> bool:
    """True when nothing in the budget's tree is still held."""
    return all(node.open_holds == 0 for _, node in budget.report().walk())
