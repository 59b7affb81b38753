"""Which agent, tool or query a call belongs to, read from LlamaIndex's instrumentation spans.

Every span handler on the dispatcher sees each span open with its parent, its bound
arguments and its instance. Workflow steps carry their event (``AgentSetup`` names the
agent, ``ToolCall`` the tool), so walking up from the span an LLM call runs in tells which
agent made it, whether it happened inside another agent's tool call (an agent used as a
tool), and which query it serves.

Attribution only: the dispatcher swallows whatever a span handler raises, so nothing here
can stop a call. Stopping happens in the callback handler.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from llama_index.core.agent.workflow import AgentWorkflow
from llama_index.core.agent.workflow.base_agent import BaseWorkflowAgent
from llama_index.core.agent.workflow.workflow_events import (
    AgentInput,
    AgentOutput,
    AgentSetup,
    ToolCall,
)
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]  # re-exported without __all__
from llama_index.core.instrumentation.span import SimpleSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.workflow import Workflow
from pydantic import PrivateAttr

from . import _coverage

SegmentKind = Literal["agent", "tool", "query"]

_AGENT_EVENTS = (AgentInput, AgentSetup, AgentOutput)
_EMBED_ARGS = {
    "get_query_embedding": "query",
    "aget_query_embedding": "query",
    "get_text_embedding": "text",
    "aget_text_embedding": "text",
    "get_text_embedding_batch": "texts",
    "aget_text_embedding_batch": "texts",
}
_QUERY_METHODS = {
    "query": "query",
    "aquery": "query",
    "retrieve": "retrieve",
    "aretrieve": "retrieve",
}
_UUID_SUFFIX = 37
"""Span ids are ``Class.method-<uuid4>``: a dash and 36 characters."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One level of attribution between a budget and a call."""

    kind: SegmentKind
    """``agent`` (a workflow agent's turn), ``tool`` (inside a tool call) or ``query``."""
    name: str
    """The agent's name, the tool's name, or ``query`` / ``retrieve``."""
    key: tuple[str, ...]
    """Tells this scope apart from others of the same name."""
    closes: str
    """The span whose end closes this scope."""
    how: str
    """How the scope was spawned, for ``allotment.Spawn``."""


class _Span:
    __slots__ = ("batch", "caller", "kind", "multi", "name", "parent", "run", "started", "texts")

    def __init__(self, parent: str | None, run: str | None) -> None:
        self.parent = parent
        self.run = run
        """The enclosing workflow run's span id."""
        self.kind: str | None = None
        self.name: str | None = None
        """Agent, tool or query name; for a run, the agent whose turn it is."""
        self.caller: str | None = None
        """For a tool call: the agent that called it."""
        self.multi = False
        """For a run: whether it is a multi-agent workflow (agents take turns by handoff)."""
        self.texts: list[str] | None = None
        self.batch: int | None = None
        self.started = 0


def _method(span_id: str) -> str:
    return span_id[:-_UUID_SUFFIX].rpartition(".")[2]


class SpanTracker(BaseSpanHandler[SimpleSpan]):
    """Keeps the open span tree, enough of it to attribute calls."""

    _spans: dict[str, _Span] = PrivateAttr(default_factory=dict)
    _on_end: dict[str, list[Callable[[str], None]]] = PrivateAttr(default_factory=dict)
    _end_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "AllotmentSpanTracker"

    # -- the dispatcher's side ---------------------------------------------------------

    def span_enter(
        self,
        id_: str,
        bound_args: Any,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        spans = self._spans
        parent = spans.get(parent_id) if parent_id is not None else None
        run = None
        if parent is not None:
            run = parent_id if parent.kind == "run" else parent.run
        span = _Span(parent_id, run)
        arguments = bound_args.arguments
        ev = arguments.get("ev")
        if ev is not None:
            if isinstance(ev, _AGENT_EVENTS):
                span.kind = "agent"
                span.name = ev.current_agent_name
                owner = spans.get(run) if run is not None else None
                if owner is not None:
                    owner.name = span.name
            elif type(ev) is ToolCall:
                span.kind = "tool"
                span.name = ev.tool_name
                owner = spans.get(run) if run is not None else None
                span.caller = owner.name if owner is not None else None
        elif instance is not None:
            self._classify(span, _method(id_), instance, arguments)
        spans[id_] = span

    def _classify(self, span: _Span, method: str, instance: Any, arguments: Any) -> None:
        if method == "run" and isinstance(instance, Workflow):
            span.kind = "run"
            if isinstance(instance, AgentWorkflow):
                span.multi = True
                span.name = instance.root_agent
            elif isinstance(instance, BaseWorkflowAgent):
                span.name = instance.name
        elif method in _QUERY_METHODS and isinstance(instance, (BaseQueryEngine, BaseRetriever)):
            span.kind = "query"
            span.name = _QUERY_METHODS[method]
        elif method in _EMBED_ARGS and isinstance(instance, BaseEmbedding):
            value = arguments.get(_EMBED_ARGS[method])
            if isinstance(value, str):
                span.kind, span.texts = "embed", [value]
            elif isinstance(value, list):
                span.kind, span.texts = "embed", value
                span.batch = instance.embed_batch_size
        elif isinstance(instance, BaseLLM):
            _coverage.check(type(instance))

    def span_exit(
        self,
        id_: str,
        bound_args: Any,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        span = self._spans.get(id_)
        if span is not None and span.kind == "run" and self._end_with_run(id_, result):
            return
        self._ended(id_)

    def span_drop(
        self,
        id_: str,
        bound_args: Any,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self._ended(id_)

    def _end_with_run(self, span_id: str, handler: Any) -> bool:
        """A workflow's ``run`` returns its handler at once and the run goes on in tasks:
        keep the span until the run's result is in."""
        task = getattr(handler, "_result_task", None)
        if not isinstance(task, asyncio.Future):
            wait = getattr(handler, "stop_event_result", None)
            if not callable(wait):
                return False
            try:
                task = asyncio.ensure_future(wait())
            except RuntimeError:  # no running loop: nothing will run the workflow here
                return False
        if task.done():
            return False
        task.add_done_callback(lambda _task: self._ended(span_id))
        return True

    def _ended(self, span_id: str) -> None:
        self._spans.pop(span_id, None)
        if span_id in self._on_end:
            with self._end_lock:
                callbacks = self._on_end.pop(span_id, ())
            for callback in callbacks:
                callback(span_id)

    def new_span(self, *args: Any, **kwargs: Any) -> None:  # span_enter does the work
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    # -- the handler's side ------------------------------------------------------------

    def on_end(self, span_id: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(span_id)`` when the span ends (at once if it is not open)."""
        if span_id not in self._spans:
            callback(span_id)
            return
        with self._end_lock:
            self._on_end.setdefault(span_id, []).append(callback)

    def path(self, span_id: str | None) -> tuple[Segment, ...]:
        """The scopes a call made in ``span_id`` belongs to, outermost first.

        An agent's turn is ``agent``; a call inside a tool call is ``tool`` under the
        calling agent (and whatever agent runs inside the tool comes under it); a query or
        retrieval not inside a tool is ``query``.
        """
        spans = self._spans
        segments: list[Segment] = []
        query: Segment | None = None
        sid = span_id
        while sid is not None:
            span = spans.get(sid)
            if span is None:
                break
            kind = span.kind
            if kind in {"agent", "tool"}:
                if kind == "tool":
                    segments.append(Segment("tool", span.name or "tool", (sid,), sid, "agent_tool"))
                    agent = span.caller
                else:
                    if query is not None:
                        segments.append(query)
                    agent = span.name
                query = None
                run_id = span.run
                run = spans.get(run_id) if run_id is not None else None
                if run is None or run_id is None:  # a step whose run began before tracking
                    sid = span.parent
                    continue
                if agent is not None:
                    how = "handoff" if run.multi else "metadata"
                    segments.append(Segment("agent", agent, (run_id, agent), run_id, how))
                # The rest of this run's spans say nothing more: go on from where it started.
                sid = run.parent
                continue
            if kind == "query":
                query = Segment("query", span.name or "query", (sid,), sid, "metadata")
            sid = span.parent
        if query is not None:
            segments.append(query)
        segments.reverse()
        return tuple(segments)

    def embedding_texts(self, span_id: str | None) -> list[str] | None:
        """The texts the next embedding event in ``span_id`` sends, when the span shows them.

        A batch call sends its texts ``embed_batch_size`` at a time, one event per batch, in
        order; the k-th event of the span sends the k-th slice.
        """
        span = self._spans.get(span_id) if span_id is not None else None
        if span is None or span.kind != "embed" or span.texts is None:
            return None
        k = span.started
        span.started += 1
        if span.batch:
            return span.texts[k * span.batch : (k + 1) * span.batch]
        return span.texts if k == 0 else None

    def kept(self) -> int:
        """How many spans are being kept (for leak checks)."""
        return len(self._spans)


_lock = threading.Lock()
_tracker: SpanTracker | None = None


def tracker() -> SpanTracker:
    """The process's tracker, added to the root dispatcher on first use."""
    global _tracker
    if _tracker is None:
        with _lock:
            if _tracker is None:
                t = SpanTracker()
                get_dispatcher().add_span_handler(t)
                _tracker = t
    return _tracker


def installed() -> bool:
    """Whether the tracker is on the root dispatcher."""
    return _tracker is not None


def uninstall() -> None:
    """Remove the tracker from the root dispatcher (the next ``tracker()`` adds a new one)."""
    global _tracker
    with _lock:
        if _tracker is not None:
            # By identity: pydantic models compare equal field by field.
            handlers = get_dispatcher().span_handlers
            handlers[:] = [h for h in handlers if h is not _tracker]
            _tracker = None
