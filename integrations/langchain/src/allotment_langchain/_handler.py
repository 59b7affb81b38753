"""The callback handler: reserve before every model and tool call, settle after."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn
from uuid import UUID

from allotment import (
    Budget,
    BudgetExceeded,
    Call,
    ConfigurationError,
    Hold,
    Limits,
    RateWindowExceeded,
    Spawn,
    resolve,
)
from langchain_core.callbacks import BaseCallbackHandler

from ._errors import BudgetHardStop, StreamCutOff, StreamUsageWarning
from ._runs import Kind, LLMRun, Run, Scope, ToolRun, active_llm_run
from ._subagents import budget_name, marker_of, node_of, subgraph_name, task_depth
from ._tokens import charged_tokens, exact_for
from ._translate import (
    cache_hit,
    chunk_text,
    event_text,
    event_usage,
    generated_text,
    llm_call,
    reached_provider,
    reported_usage,
    streams_without_usage,
    tool_call,
    tool_usage,
)

log = logging.getLogger("allotment.langchain")

_claims: dict[UUID, BudgetCallbackHandler] = {}
"""Runs taken by an explicitly passed handler. When a run has two handlers (one given to a
model's constructor inside an instrumented run), the first explicit one charges it and the
instrumented one stands aside, so nothing is reserved twice."""


class _Installed:
    """The handler ``instrument()`` installed process-wide, if any."""

    handler: BudgetCallbackHandler | None = None


installed = _Installed()


class BudgetCallbackHandler(BaseCallbackHandler):
    """Puts every LangChain model and tool call through an allotment budget.

    Before a call it reserves an upper bound of the call's cost and raises
    ``allotment.BudgetExceeded`` if the budget cannot cover it, so nothing is sent; after
    it, it settles the provider's usage (or an estimate, flagged, when none is reported).
    Streams are cut within one chunk of passing their hold's output bound. Sub-agents
    (an agent run as a tool, a LangGraph subgraph, or a run with ``{"allotment": {"agent":
    name}}`` metadata) get child budgets, limited by ``children[name]`` when given.

    ``budget`` is the budget to charge; without one, ``allotment.current()`` when the
    top-level run starts (then the process default). ``hard_stop=True`` raises refusals as
    ``BudgetHardStop`` (a ``BaseException``) so no ``except Exception`` can hide them.

    The handler is synchronous and runs inline on purpose: LangChain ignores errors from
    async handlers on sync paths, and from any handler without ``raise_error``.
    """

    raise_error = True
    run_inline = True

    def __init__(
        self,
        budget: Budget | None = None,
        *,
        children: Mapping[str, object] | None = None,
        hard_stop: bool = False,
    ) -> None:
        super().__init__()
        if budget is not None and not isinstance(budget, Budget):
            raise ConfigurationError(
                f"budget must be an allotment.Budget or None, not {type(budget).__name__}"
            )
        self._budget = budget
        self._children = _checked_children(children)
        self._hard_stop = bool(hard_stop)
        self._runs: dict[UUID, Run] = {}
        self._lock = threading.Lock()
        self._refusals: deque[BudgetExceeded] = deque(maxlen=1000)
        self._latched: dict[UUID, dict[str, BudgetExceeded]] = {}
        self._warned = False
        self._instrumented = False

    # A handler is a service, not a value: frameworks that copy their configuration must
    # keep pointing at the same ledger state (budgets refuse to be copied anyway).
    def __copy__(self) -> BudgetCallbackHandler:
        return self

    def __deepcopy__(self, memo: object) -> BudgetCallbackHandler:
        return self

    def __repr__(self) -> str:
        target = self._budget.path if self._budget is not None else "current budget"
        return f"<BudgetCallbackHandler {target!r}{' hard_stop' if self._hard_stop else ''}>"

    # -- what users read ----------------------------------------------------------------------

    @property
    def budget(self) -> Budget | None:
        """The explicit budget, or ``None`` to use the current one."""
        return self._budget

    @property
    def children(self) -> Mapping[str, object]:
        """Limits per sub-agent name."""
        return dict(self._children)

    @property
    def hard_stop(self) -> bool:
        """Whether refusals are raised as ``BudgetHardStop``."""
        return self._hard_stop

    @property
    def refusals(self) -> tuple[BudgetExceeded, ...]:
        """Every refusal this handler raised, oldest first (the last 1000), including the
        ones a framework caught and turned into a message."""
        return tuple(self._refusals)

    @property
    def open_runs(self) -> int:
        """Runs started and not yet ended (0 once everything finished)."""
        return len(self._runs)

    # -- chains and retrievers: the run tree ----------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._claim(run_id):
            return
        name = kwargs.get("name") or (serialized or {}).get("name") or ""
        run = self._begin("chain", run_id, parent_run_id, name, metadata)
        if run is not None:
            self._runs[run_id] = run

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(self._end(run_id), run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(self._end(run_id), run_id)

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._claim(run_id):
            return
        name = kwargs.get("name") or (serialized or {}).get("name") or "retriever"
        run = self._begin("retriever", run_id, parent_run_id, name, metadata)
        if run is not None:
            self._runs[run_id] = run

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(self._end(run_id), run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(self._end(run_id), run_id)

    # -- tools ----------------------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._claim(run_id):
            return
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        run = self._begin("tool", run_id, parent_run_id, name, metadata)
        if run is None:
            return
        assert isinstance(run, ToolRun)
        budget = run.scope.budget
        try:
            latched = self._latched_refusal(run, budget)
            if latched is not None:
                raise latched
            hold = _reserve(budget, tool_call(name, agent=run.scope.name, run_id=run_id))
        except BudgetExceeded as err:
            # Raised before the tool's own try: no on_tool_error follows, so tidy up here.
            self._abandon(run, run_id)
            self._raise(run, err)
        run.hold = hold
        self._runs[run_id] = run

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._tool_done(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        # The tool ran, even if it failed: it counts as a call.
        self._tool_done(run_id)

    def _tool_done(self, run_id: UUID) -> None:
        run = self._end(run_id)
        if isinstance(run, ToolRun):
            try:
                run.hold.settle(tool_usage(run.name))
            except Exception:  # never break the run after the tool already ran
                log.exception("allotment could not settle tool call %r", run.name)
        self._finish(run, run_id)

    # -- models ---------------------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._llm_start(
            serialized, messages[0] if messages else [], run_id, parent_run_id, metadata, kwargs
        )

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._llm_start(serialized, prompts, run_id, parent_run_id, metadata, kwargs)

    def _llm_start(
        self,
        serialized: dict[str, Any] | None,
        messages: Sequence[Any],
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        if not self._claim(run_id):
            return
        md = metadata or {}
        name = kwargs.get("name") or (serialized or {}).get("name") or "llm"
        run = self._begin("llm", run_id, parent_run_id, name, md)
        if run is None:
            return
        assert isinstance(run, LLMRun)
        params = kwargs.get("invocation_params") or {}
        budget = run.scope.budget
        try:
            latched = self._latched_refusal(run, budget)
            if latched is not None:
                raise latched
            call = llm_call(messages, md, params, agent=run.scope.name, run_id=run_id)
            hold = _reserve(budget, call)
        except BudgetExceeded as err:
            # Raised before the model's own try: no on_llm_error follows for this run, nor
            # for the earlier prompts of the same generate() call, so release those too.
            if kwargs.get("batch_size", 1) > 1:
                self._release_batch(parent_run_id, params)
            self._abandon(run, run_id)
            self._raise(run, err)
        run.start(call, hold, params, serialized)
        self._runs[run_id] = run
        active_llm_run.set(run)

    def on_llm_new_token(
        self,
        token: Any,
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        run = self._runs.get(run_id)
        if isinstance(run, LLMRun):
            self._streamed(run, chunk_text(token, chunk))

    def on_stream_event(
        self,
        event: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        run = self._runs.get(run_id)
        if not isinstance(run, LLMRun) or not isinstance(event, Mapping):
            return
        usage = event_usage(event)
        if usage is not None:
            run.reported = usage
        if event.get("event") == "content-block-delta":
            self._streamed(run, event_text(event))

    def _streamed(self, run: LLMRun, text: str) -> None:
        run.chunks += 1
        first = run.chunks == 1
        if first and not self._warned and streams_without_usage(run.serialized, run.params):
            self._warned = True
            warnings.warn(
                StreamUsageWarning(
                    "ChatOpenAI with a custom base_url streams without usage, so allotment "
                    "charges an estimate of each stream (flagged in reports). Pass "
                    "stream_usage=True to ChatOpenAI if the server supports stream_options."
                ),
                stacklevel=2,
            )
        if text:
            run.add_streamed(text)
        bound = run.hold.output_tokens
        if run.output_tokens > bound and not run.cut:
            run.cut = True
            err = StreamCutOff(
                f"budget {run.scope.budget.path!r} stopped a stream from {run.call.model!r}: it "
                f"emitted {run.output_tokens} output tokens, more than the {bound} its hold "
                f"covers. What was streamed is charged. Set max_tokens on the model to what "
                f"you need (the provider may be ignoring it), or give the call a larger bound.",
                path=run.scope.budget.path,
                limit_name="output_tokens",
                limit=bound,
                spent=run.output_tokens,
                held=0,
                asked=run.output_tokens,
            )
            self._refusals.append(err)
            if self._hard_stop:
                raise BudgetHardStop(err) from err
            raise err

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._end(run_id)
        if isinstance(run, LLMRun):
            _clear_active(run)
            try:
                if cache_hit(response):
                    run.release()  # answered from LangChain's cache: nothing was sent
                else:
                    self._settle(run, response)
            except Exception:
                # Never raise here: the call is paid for. Charge the bound instead, so the
                # spend is not lost; the next start refuses if it went over.
                log.exception("allotment could not settle a %r call; charging its bound", run.name)
                _settle_bounds(run)
        self._finish(run, run_id)

    def _settle(self, run: LLMRun, response: Any) -> None:
        usage = reported_usage(response) or run.reported
        estimate = 0
        if usage is None:
            model = run.call.model
            generated = charged_tokens(generated_text(response), model)
            estimate = run.output_estimate(generated, exact=exact_for(model))
        run.settle(usage, estimate)

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        response: Any = None,
        **kwargs: Any,
    ) -> None:
        run = self._end(run_id)
        if not isinstance(run, LLMRun):
            self._finish(run, run_id)
            return
        _clear_active(run)
        try:
            partial = reported_usage(response) if response is not None else None
            run.fail(reached_provider(error), partial, exact=exact_for(run.call.model))
        except Exception:
            log.exception("allotment could not settle failed call %r; charging its bound", run.name)
            _settle_bounds(run)
        self._finish(run, run_id)
        if run.refusal is not None and not isinstance(error, (BudgetExceeded, BudgetHardStop)):
            # The metered transport refused an SDK retry with a synthetic 400; the refusal,
            # not the client error made of it, is what the caller must see.
            self._raise(run, run.refusal)

    # -- the run tree ---------------------------------------------------------------------------

    def _claim(self, run_id: UUID) -> bool:
        """Whether this handler charges the run (see ``_claims``)."""
        if self._instrumented:
            return run_id not in _claims
        if _claims.setdefault(run_id, self) is not self:
            return False
        other = installed.handler
        if other is not None and other is not self:
            other._stand_aside(run_id)
        return True

    def _stand_aside(self, run_id: UUID) -> None:
        """Drop a run an explicit handler has taken (its start already ran here)."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        try:
            if isinstance(run, LLMRun):
                _clear_active(run)
                run.release()
            elif isinstance(run, ToolRun):
                run.hold.release()
        except Exception:
            log.exception("allotment could not release a hold it handed over")
        self._finish(run, run_id)

    def _begin(
        self,
        kind: Kind,
        run_id: UUID,
        parent_run_id: UUID | None,
        name: str,
        metadata: Mapping[str, Any] | None,
    ) -> Run | None:
        """The state of a starting run: where it is charged, and any sub-agent it opens."""
        parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
        marker, marker_limits = marker_of(metadata)
        depth = task_depth(metadata)
        if parent is None:
            budget = resolve(self._budget)
            if budget is None:
                return None
            scope = Scope(budget, None, None)
            root = run_id
        else:
            scope = parent.scope
            root = parent.root
        cls = LLMRun if kind == "llm" else ToolRun if kind == "tool" else Run
        run = cls(kind, name, parent_run_id, root, scope, marker, depth, node_of(metadata))
        if marker is not None and (parent is None or parent.marker != marker):
            run.scope = self._open(run, scope, marker, "metadata", marker_limits, run_id)
        elif kind == "chain" and parent is not None:
            if parent.kind == "tool":
                # An agent (or any runnable) invoked from inside a tool: the agent-as-tool
                # pattern. It is named after the tool the supervisor called.
                run.scope = self._open(
                    run, scope, budget_name(parent.name), "agent_tool", None, run_id
                )
            elif parent.kind == "chain" and depth > parent.depth >= 1:
                # A node one namespace deeper than its parent graph run: that graph is a
                # subgraph running inside a node. Its run gets the child, opened once.
                run.scope = self._subgraph(parent, parent_run_id)
        return run

    def _subgraph(self, graph: Run, graph_id: UUID | None) -> Scope:
        with self._lock:
            if graph.scope.owner != graph_id:
                graph.scope = self._open(
                    graph,
                    graph.scope,
                    subgraph_name(graph.name, graph.node),
                    "subgraph",
                    None,
                    graph_id,
                )
            return graph.scope

    def _open(
        self,
        run: Run,
        scope: Scope,
        name: str,
        how: str,
        limits: object,
        owner: UUID | None,
    ) -> Scope:
        """Open a child budget for a sub-agent and make it the scope of ``owner``'s runs."""
        if limits is None:
            limits = self._children.get(name)
        spawn = Spawn(name=name, how=how, framework="langchain", metadata={"run_id": owner})
        try:
            child = scope.budget.spawn(spawn, limits=limits)
        except BudgetExceeded as err:
            self._raise(run, err)
        return Scope(child, name, owner)

    def _end(self, run_id: UUID) -> Run | None:
        run = self._runs.pop(run_id, None)
        if not self._instrumented and _claims.get(run_id) is self:
            _claims.pop(run_id, None)
        if run is not None and run.root == run_id:
            self._latched.pop(run_id, None)
        return run

    def _finish(self, run: Run | None, run_id: UUID) -> None:
        """Close the sub-agent budget the ended run owned, if any."""
        if run is not None and run.scope.owner == run_id:
            try:
                run.scope.budget.close()
            except Exception:  # closing returns escrow; a failure must not fail the run
                log.exception("allotment could not close budget %r", run.scope.budget.path)

    def _abandon(self, run: Run, run_id: UUID) -> None:
        """Forget a run whose start is being refused (no end callback will come)."""
        self._end(run_id)
        self._finish(run, run_id)

    def _release_batch(self, parent_run_id: UUID | None, params: Mapping[str, Any]) -> None:
        for rid, other in list(self._runs.items()):
            if (
                isinstance(other, LLMRun)
                and other.parent == parent_run_id
                and other.params is params
                and not other.chunks
            ):
                self._runs.pop(rid, None)
                other.release()
                self._end(rid)
                self._finish(other, rid)

    # -- refusals -------------------------------------------------------------------------------

    def _latched_refusal(self, run: Run, budget: Budget) -> BudgetExceeded | None:
        """A refusal this trace already met on ``budget`` or an ancestor, raised again."""
        latched = self._latched.get(run.root)
        if not latched:
            return None
        node: Budget | None = budget
        while node is not None:
            earlier = latched.get(node.path)
            if earlier is not None:
                again = copy.copy(earlier)
                again.args = (
                    f"{earlier} [Refused again: a refusal stands until the top-level run "
                    f"ends, even if a framework caught it and carried on.]",
                )
                return again
            node = node.parent
        return None

    def _raise(self, run: Run, err: BudgetExceeded) -> NoReturn:
        self._refusals.append(err)
        if not isinstance(err, RateWindowExceeded) and run.root in self._runs:
            # ToolNode(handle_tool_errors=True) and similar turn a refusal into a message
            # and carry on; remembering it makes the next call in this trace refuse too.
            # (A refused top-level run has no trace left to remember it in.)
            self._latched.setdefault(run.root, {}).setdefault(err.path, err)
        if self._hard_stop:
            raise BudgetHardStop(err) from err
        raise err


def _reserve(budget: Budget, call: Call) -> Hold:
    """Reserve ``call``; on an event loop's thread, without waiting for a rate window.

    This handler is synchronous, and in async runs LangChain calls it on the loop's
    thread: a rate-window wait there would stall every task for up to ``max_wait``, so it
    is refused at once instead (``RateWindowExceeded.retry_after`` says when it fits).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return budget.reserve(call)
    return budget.reserve(call, wait=False)


def _clear_active(run: LLMRun) -> None:
    if active_llm_run.get() is run:
        active_llm_run.set(None)


def _settle_bounds(run: LLMRun) -> None:
    for hold in run.holds:
        if not hold.ended:
            try:
                hold.settle_estimate()
            except Exception:
                log.exception("allotment could not charge a hold's bound")


def _checked_children(children: Mapping[str, object] | None) -> dict[str, object]:
    """Per-name limits, checked now so that a typo fails at construction, not mid-run."""
    if children is None:
        return {}
    if not isinstance(children, Mapping):
        raise ConfigurationError(
            "children must map sub-agent names to limits, e.g. {'researcher': '0.10'}"
        )
    checked: dict[str, object] = {}
    for name, limits in children.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"a sub-agent name must be a non-empty string, not {name!r}")
        Limits.of(limits, now=time.time())  # raises InvalidAmount on a bad value
        checked[budget_name(name)] = limits
    return checked
