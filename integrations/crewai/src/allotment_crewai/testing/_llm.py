"""A scripted ``crewai.BaseLLM``: replies from a script, usage reported like CrewAI's
native providers report it (lifetime counters and the completion event)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from allotment.testing import Failure, Reply, ToolCall, Usage

with warnings.catch_warnings():
    # crewai 1.15 trips an ImportWarning of its own (crewai.rag.embeddings) on import.
    warnings.simplefilter("ignore", ImportWarning)
    from crewai import BaseLLM
    from crewai.events.types.llm_events import LLMCallType
    from crewai.llms.base_llm import llm_call_context
    from pydantic import PrivateAttr

Reporting = Literal["events", "counters", "nothing"]
Responder = Callable[["LLMRequest"], Reply | Failure | None]


@dataclass(frozen=True)
class LLMRequest:
    """A call the LLM received."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[Any, ...]
    agent: str | None
    thread: int
    """``threading.get_ident()`` of the calling thread (CrewAI reuses thread names)."""

    @property
    def last(self) -> dict[str, Any]:
        """The final message (a tool result, a coworker's question...)."""
        return self.messages[-1] if self.messages else {}

    @property
    def text(self) -> str:
        """All message contents, joined."""
        return "\n".join(str(m.get("content") or "") for m in self.messages)


class _Log:
    """What a scripted LLM was told to say and what it was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.script: list[Reply | Failure] = []
        self.requests: list[LLMRequest] = []
        self.billed = Usage(0, 0)


class ScriptedLLM(BaseLLM):
    """Answers each call with the next scripted ``Reply`` (text or tool calls), else asks
    ``responder``, else gives ``default`` (a text, or a ``Reply``). A ``Failure`` raises a
    connection error (nothing billed). ``Reply.usage`` "auto" reports ``usage``.

    ``reporting`` says what it tells CrewAI: ``events`` (the completion event carries the
    usage and the counters grow, as CrewAI's providers do), ``counters`` (counters only,
    like a custom LLM that emits no events) or ``nothing``.
    """

    default: str | Reply = "Thought: I know the answer.\nFinal Answer: done"
    usage: Usage = Usage(100, 20)
    reporting: Reporting = "events"
    native_tools: bool = True
    context_window: int = 128_000
    responder: Responder | None = None
    """Asked for a reply when the script is empty (``None`` lets ``default`` answer)."""
    during_call: Callable[[LLMRequest], Any] | None = None
    """Called inside each call, after the hooks and before the reply (race tests)."""

    # One log for the LLM and every copy CrewAI makes of it (Crew.copy, kickoff_for_each).
    _log: _Log = PrivateAttr(default_factory=_Log)

    # -- scripting ---------------------------------------------------------------------

    def add(self, *items: Reply | Failure | str) -> ScriptedLLM:
        """Queue replies: a ``Reply``, a ``Failure``, or a string (a text reply)."""
        log = self._log
        with log.lock:
            log.script.extend(Reply.text(i) if isinstance(i, str) else i for i in items)
        return self

    def tool(self, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> ScriptedLLM:
        """Queue one tool-call reply."""
        return self.add(Reply.tool_call(name, arguments or {}, **kw))

    def tools(self, *calls: ToolCall, **kw: Any) -> ScriptedLLM:
        """Queue one reply calling several tools at once."""
        return self.add(Reply.tool_calls(*calls, **kw))

    @property
    def requests(self) -> list[LLMRequest]:
        """Every call received, in order."""
        log = self._log
        with log.lock:
            return list(log.requests)

    @property
    def calls(self) -> int:
        """How many calls were answered (billed)."""
        log = self._log
        with log.lock:
            return len(log.requests)

    @property
    def billed_usage(self) -> Usage:
        """What the answered calls would be billed, reported or not."""
        log = self._log
        with log.lock:
            return log.billed

    # -- BaseLLM -----------------------------------------------------------------------

    def supports_function_calling(self) -> bool:
        return self.native_tools

    def get_context_window_size(self) -> int:
        return self.context_window

    def get_input_tokens_count(
        self, messages: Any, tools: Any = None, response_model: Any = None
    ) -> int:
        text = (
            messages
            if isinstance(messages, str)
            else "".join(str(m.get("content") or "") for m in messages)
        )
        return (len(text) + 3) // 4

    def call(
        self,
        messages: str | list[Any],
        tools: list[Any] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Any] | None = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        msgs: list[Any] = (
            [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        )
        with llm_call_context():
            self._emit_call_started_event(
                messages=msgs, tools=tools, from_task=from_task, from_agent=from_agent
            )
            self._invoke_before_llm_call_hooks(msgs, from_agent)
            request = LLMRequest(
                messages=tuple(dict(m) for m in msgs),
                tools=tuple(tools or ()),
                agent=getattr(from_agent, "role", None),
                thread=threading.get_ident(),
            )
            item = self._next(request)
            if self.during_call is not None:
                self.during_call(request)
            if isinstance(item, Failure):
                self._emit_call_failed_event(
                    error=f"scripted failure: {item.kind}",
                    from_task=from_task,
                    from_agent=from_agent,
                )
                raise ConnectionError(f"scripted failure: {item.kind} {item.status or ''}".strip())
            usage = self.usage if item.usage == "auto" else item.usage
            log = self._log
            with log.lock:
                log.requests.append(request)
                if usage is not None:
                    log.billed = log.billed + usage
            reported = _wire(usage) if usage is not None else None
            if reported is not None and self.reporting != "nothing":
                self._track_token_usage_internal(reported)
            events = self.reporting == "events"
            if item.calls:
                answer: Any = [_openai_call(c, i) for i, c in enumerate(item.calls)]
                if events:
                    self._emit_call_completed_event(
                        response=answer,
                        call_type=LLMCallType.TOOL_CALL,
                        from_task=from_task,
                        from_agent=from_agent,
                        messages=msgs,
                        usage=reported,
                    )
                return answer
            text = item.content or ""
            if events:
                self._emit_call_completed_event(
                    response=text,
                    call_type=LLMCallType.LLM_CALL,
                    from_task=from_task,
                    from_agent=from_agent,
                    messages=msgs,
                    usage=reported,
                )
            return self._invoke_after_llm_call_hooks(msgs, text, from_agent)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def _next(self, request: LLMRequest) -> Reply | Failure:
        log = self._log
        with log.lock:
            if log.script:
                return log.script.pop(0)
        responder = self.responder
        if responder is not None:
            item = responder(request)
            if item is not None:
                return item
        return Reply.text(self.default) if isinstance(self.default, str) else self.default


def _wire(usage: Usage) -> dict[str, int]:
    """Usage as CrewAI's OpenAI provider puts it in its events and counters."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_prompt_tokens": usage.cached_tokens or 0,
        "reasoning_tokens": usage.reasoning_tokens or 0,
    }


def _openai_call(call: ToolCall, index: int) -> dict[str, Any]:
    return {
        "id": call.id or f"call_{index}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
