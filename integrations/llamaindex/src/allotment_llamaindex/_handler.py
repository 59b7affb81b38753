"""The callback handler: reserve before each LLM, embedding and tool call, settle after.

LlamaIndex calls legacy ``CallbackManager`` handlers without a ``try``: an exception raised
in ``on_event_start(CBEventType.LLM)`` comes out of ``chat``, ``stream_chat``,
``complete``, structured prediction and whole agent runs, before the request is sent.
That is the enforcement point. Which budget a call is charged to (the agent that made it,
the tool or query it serves) is read from the instrumentation span tree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from allotment import AllotmentError, Budget, Hold, Usage, resolve
from llama_index.core.callbacks.base import global_stack_trace_ids
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.schema import CBEventType
from llama_index.core.instrumentation.span import active_span_id

from . import _spans, _streams
from ._scopes import Scopes
from ._spans import Segment
from ._tokens import count_tokens
from ._translate import (
    ADDITIONAL_KWARGS,
    CHUNKS,
    COMPLETION,
    EXCEPTION,
    RESPONSE,
    SERIALIZED,
    embedding_call,
    error_outcome,
    llm_call,
    model_of,
    request_stream_usage,
    response_text,
    tool_call,
    tool_name_of,
    usage_of_response,
    wants_stream_usage,
)

log = logging.getLogger("allotment.llamaindex")

_ZERO = Decimal(0)

METERED = frozenset({CBEventType.LLM, CBEventType.EMBEDDING, CBEventType.FUNCTION_CALL})
_IGNORED = [t for t in CBEventType if t not in METERED]
_LLM_TRACES = frozenset({"chat", "completion"})
"""The trace ids LlamaIndex's LLM decorators open around each call."""

_outer: ContextVar[str | None] = ContextVar("allotment_llamaindex_outer_llm", default=None)
"""The latest LLM event started in this context, to recognise calls nested inside it."""


@dataclass(slots=True)
class _Pending:
    hold: Hold
    span_id: str | None
    model: str | None
    texts: Sequence[str] = ()
    tool: str | None = None
    adopted: bool = field(default=False)
    """An inner event of the same request settles this hold."""
    wrapper: bool = field(default=False)
    """Its LLM only called another model: release the hold, the inner calls are charged."""


def _nested_llm() -> bool:
    """Whether this LLM event runs inside another LLM call (``CustomLLM.chat`` calls its
    own ``complete``; wrappers call the model they wrap): one request, two events."""
    traces = global_stack_trace_ids.get()
    return len(traces) > 1 and sum(1 for t in traces if t in _LLM_TRACES) > 1


def _agent_of(path: Sequence[Segment]) -> str | None:
    for segment in reversed(path):
        if segment.kind == "agent":
            return segment.name
    return None


class BudgetCallbackHandler(BaseCallbackHandler):
    """A LlamaIndex callback handler that puts every LLM, embedding and tool call through
    an allotment budget.

    LLM calls are reserved before they are sent and refused with ``BudgetExceeded`` when
    they do not fit; they are settled from the response's usage, or settled with a flagged
    estimate when the provider reports none. Calls made by a workflow agent are charged to
    a child budget named after the agent; calls made inside a tool call to one named after
    the tool, under the calling agent; a query to one named ``query``. ``children`` gives
    such children limits by name (``{"researcher": "0.10"}``), else the
    ``allotment_child_limits`` hook decides, else they have none of their own.

    ``budget`` is the budget to charge; ``None`` charges ``allotment.current()``.
    ``stream_usage`` asks OpenAI streams to report usage (``stream_options``).

    Put it first in a manager's handlers, so a refused call is not reported as started to
    the handlers after it. ``instrument()`` attaches one to every callback manager.
    """

    def __init__(
        self,
        budget: Budget | None = None,
        *,
        children: Mapping[str, object] | None = None,
        stream_usage: bool = True,
    ) -> None:
        super().__init__(event_starts_to_ignore=_IGNORED, event_ends_to_ignore=_IGNORED)
        self.budget = budget
        self.stream_usage = stream_usage
        self._scopes = Scopes(children, lambda span, cb: _spans.tracker().on_end(span, cb))
        self._pending: dict[str, _Pending] = {}
        # Install the span tracker now, so that spans opened before the first call (an
        # agent run's) are known when that call is attributed.
        _spans.tracker()
        _streams.watcher()

    @property
    def children(self) -> Mapping[str, object]:
        """Limits for child budgets, by agent, tool or scope name."""
        return self._scopes.children

    @property
    def pending(self) -> int:
        """Calls reserved and not yet settled."""
        return len({id(p) for p in self._pending.values()})

    def reserved(self, event_id: str) -> bool:
        """Whether the event ``event_id`` holds a reservation of this handler."""
        return event_id in self._pending

    # -- BaseCallbackHandler ---------------------------------------------------------------

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        if event_id in self._pending:
            return event_id  # the same event again, through a manager nested in another
        if event_type == CBEventType.LLM:
            self._start_llm(payload or {}, event_id)
        elif event_type == CBEventType.EMBEDDING:
            self._start_embedding(payload or {}, event_id)
        elif event_type == CBEventType.FUNCTION_CALL:
            self._start_tool(payload or {}, event_id)
        return event_id

    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,
    ) -> None:
        pending = self._pending.pop(event_id, None)
        if pending is None or pending.hold.ended:
            return
        # Never raise here: the call has been made and paid for; a refusal comes at the
        # next start.
        try:
            if event_type == CBEventType.LLM:
                self._settle_llm(pending, payload or {})
            elif event_type == CBEventType.EMBEDDING:
                self._settle_embedding(pending, payload or {})
            else:
                self._settle_tool(pending, payload or {})
        except AllotmentError:
            log.exception("could not settle %s call on %s", event_type, pending.hold.budget)

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(
        self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None
    ) -> None:
        return None

    # -- where a call is charged -----------------------------------------------------------

    def _scope(self, base: Budget, span_id: str | None) -> tuple[Budget, tuple[Segment, ...]]:
        path = _spans.tracker().path(span_id)
        return self._scopes.budget_for(base, path), path

    # -- LLM calls -------------------------------------------------------------------------

    def _start_llm(self, payload: dict[str, Any], event_id: str) -> None:
        base = resolve(self.budget)
        if base is None:
            return
        if _nested_llm():
            outer = self._pending.get(_outer.get() or "")
            if outer is not None and not outer.adopted and not outer.hold.ended:
                serialized = payload.get(SERIALIZED) or {}
                if model_of(serialized) == outer.model:
                    # One request: the inner event settles the outer's hold with its usage.
                    outer.adopted = True
                    self._pending[event_id] = outer
                    return
                # A wrapper calling another model: the inner call is the request, priced as
                # its own model; the wrapper's hold is released when it ends.
                outer.wrapper = True
        span_id = active_span_id.get()
        budget, path = self._scope(base, span_id)
        call = llm_call(payload, agent=_agent_of(path))
        hold = budget.reserve(call)
        kwargs = payload.get(ADDITIONAL_KWARGS)
        serialized = payload.get(SERIALIZED) or {}
        if self.stream_usage and isinstance(kwargs, dict) and wants_stream_usage(serialized):
            request_stream_usage(kwargs)
        self._pending[event_id] = _Pending(hold, span_id, call.model)
        _streams.watcher().watch(span_id)
        _outer.set(event_id)

    def _settle_llm(self, pending: _Pending, payload: Mapping[str, Any]) -> None:
        hold = pending.hold
        partial = _streams.watcher().forget(pending.span_id)
        if pending.wrapper:
            hold.release()
            return
        error = payload.get(EXCEPTION)
        if error is not None:
            if error_outcome(error, partial=partial is not None) == "release":
                hold.release()
                return
            if partial is None:
                hold.settle_estimate()
                return
            response = partial
        else:
            response = payload.get(RESPONSE)
            if response is None:
                response = payload.get(COMPLETION)
        usage = usage_of_response(response) if error is None else None
        if usage is not None:
            hold.settle(usage)
        else:
            output = count_tokens(response_text(response), pending.model)
            hold.settle_estimate(output_tokens=output)

    # -- embeddings ------------------------------------------------------------------------

    def _start_embedding(self, payload: dict[str, Any], event_id: str) -> None:
        base = resolve(self.budget)
        if base is None:
            return
        span_id = active_span_id.get()
        texts = _spans.tracker().embedding_texts(span_id)
        budget, path = self._scope(base, span_id)
        serialized = payload.get(SERIALIZED) or {}
        # Texts unseen: hold the smallest bound there is, so a budget already at or over a
        # limit still refuses (a hold of nothing is admitted whatever was spent).
        sent = texts if texts is not None else [""]
        hold = budget.reserve(embedding_call(serialized, sent, agent=_agent_of(path)))
        self._pending[event_id] = _Pending(hold, None, model_of(serialized), texts=texts or ())

    def _settle_embedding(self, pending: _Pending, payload: Mapping[str, Any]) -> None:
        error = payload.get(EXCEPTION)
        if error is not None:
            if error_outcome(error, partial=False) == "release":
                pending.hold.release()
            else:
                pending.hold.settle_estimate()
            return
        chunks = payload.get(CHUNKS) or pending.texts
        tokens = sum(count_tokens(str(chunk), pending.model) for chunk in chunks)
        # Embedding models in LlamaIndex return vectors only: the count is ours, so flagged.
        pending.hold.settle(Usage(input_tokens=tokens, estimated=True))

    # -- tools -----------------------------------------------------------------------------

    def _start_tool(self, payload: dict[str, Any], event_id: str) -> None:
        name = tool_name_of(payload)
        if name is None:
            return
        hold = self.reserve_tool(name)
        if hold is not None:
            self._pending[event_id] = _Pending(hold, None, None, tool=name)

    def _settle_tool(self, pending: _Pending, payload: Mapping[str, Any]) -> None:
        # A tool that raised still ran: it counts.
        self.settle_tool(pending.hold, pending.tool or "")

    def reserve_tool(self, name: str) -> Hold | None:
        """Reserve one call of tool ``name`` for the agent running in this context.

        Raises ``BudgetExceeded`` when the tool call does not fit (a per-tool or tool-call
        limit, or a closed budget); returns ``None`` when no budget applies.
        """
        base = resolve(self.budget)
        if base is None:
            return None
        span_id = active_span_id.get()
        path = _spans.tracker().path(span_id)
        if path and path[-1].kind == "tool" and path[-1].closes == span_id:
            path = path[:-1]  # the tool call itself is the calling agent's
        budget = self._scopes.budget_for(base, path)
        return budget.reserve(tool_call(name, agent=_agent_of(path)))

    def settle_tool(self, hold: Hold, name: str) -> None:
        """Settle a tool hold: one call of ``name``."""
        # A tool call costs no model dollars. Left unpriced, the kernel would mark the
        # whole budget's dollar spend "unknown" in reports.
        hold.settle(Usage(tool_calls=1, tools=((name, 1),), usd=_ZERO))

    # -- retiring --------------------------------------------------------------------------

    def close(self) -> None:
        """Settle what is still reserved (with its flagged bound: the calls may have been
        made) and close the child budgets this handler opened."""
        pending = {id(p): p for p in self._pending.values()}
        self._pending.clear()
        for p in pending.values():
            if not p.hold.ended:
                try:
                    p.hold.settle_estimate()
                except AllotmentError:
                    log.exception("could not settle a pending hold on %s", p.hold.budget)
        self._scopes.close_all()
