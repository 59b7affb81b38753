"""One model call between its reservation and its settlement.

The before-model hook reserves; the call then settles from the LLM's own report of what
it used. CrewAI's LLMs report each call's usage in the ``LLMCallCompletedEvent`` they
emit (the same dict they add to their lifetime counters), and a stream sink sees that
event synchronously, in the context of the call. Event-bus handlers would see it late
and on another thread, and the counters alone mix up calls made at the same time
through one shared LLM. So events settle; the counters' delta is the fallback for LLMs
that emit no events.
"""

from __future__ import annotations

import logging
import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from allotment import Budget, Call, Hold, Usage, current

from ._translate import model_of, usage_of

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("allotment.crewai")

_ending = threading.Lock()
_flying: dict[int, set[Flight]] = {}
"""Open flights by ``id`` of their LLM, to tell when its counters mix two calls."""


class Flight:
    """A reserved model call. It ends exactly once: settled with the usage its LLM
    reported, settled at its estimate (flagged) when a reply came without usage, or
    released when the call failed before any reply."""

    __slots__ = (
        "baseline",
        "executor",
        "failed",
        "hold",
        "llm",
        "node",
        "overlapped",
        "replied",
        "state",
    )

    def __init__(self, hold: Hold, llm: Any, executor: Any) -> None:
        self.hold = hold
        self.node: Budget = hold.budget
        self.llm = llm
        self.executor = executor
        self.baseline = counters(llm)
        self.failed = False
        """The LLM reported a failed attempt (it may still retry and succeed)."""
        self.replied = False
        """A reply reached CrewAI, with or without usage."""
        self.state = "open"
        """``open``; ``event`` once its LLM's completion event settled it; ``closed`` once
        something else did."""
        with _ending:
            others = _flying.setdefault(id(llm), set())
            self.overlapped = bool(others)
            """Another call went through the same LLM object meanwhile: its counters'
            delta is not this call's alone."""
            for other in others:
                other.overlapped = True
            others.add(self)

    def _claim(self, state: str) -> bool:
        with _ending:
            if self.state != "open":
                return False
            self.state = state
            others = _flying.get(id(self.llm))
            if others is not None:
                others.discard(self)
                if not others:
                    del _flying[id(self.llm)]
            return True

    @property
    def open(self) -> bool:
        return self.state == "open"

    def completed(self, usage: Any) -> None:
        """Settle from the completion event's usage dict (``None`` or zeros: an estimate)."""
        if not self._claim("event"):
            return
        _safely(self._settle, usage_of(_metrics(usage)))

    def close(self) -> None:
        """End the hold without a completion event: from the LLM's counters if they moved
        (and no other call through the same LLM could have moved them), else at its
        estimate if a reply came (or nothing says it failed), else released."""
        if not self._claim("closed"):
            return
        moved = None if self.overlapped else delta(self.llm, self.baseline)
        if moved is not None:
            _safely(self._settle, moved)
        elif self.failed and not self.replied:
            _safely(self.hold.release)
        else:
            # A reply without usage, or an LLM that reports nothing at all: never $0.
            _safely(self._settle, None)

    def _settle(self, usage: Usage | None) -> None:
        if usage is None:
            self.hold.settle_estimate()
        else:
            self.hold.settle(usage)


def _safely(fn: Callable[..., Any], *args: Any) -> None:
    # Settling runs inside CrewAI's event emission and hooks: a ledger failure must not
    # break the call that was already paid for. The hold stays for the ledger to expire.
    try:
        fn(*args)
    except Exception:
        log.exception("allotment: could not settle a CrewAI model call")


def counters(llm: Any) -> Any:
    """A snapshot of the LLM's lifetime usage counters (``None`` if it keeps none)."""
    summary = getattr(llm, "get_token_usage_summary", None)
    if summary is None:
        return None
    try:
        return summary()
    except Exception:
        return None


def delta(llm: Any, baseline: Any) -> Usage | None:
    """What the LLM's counters grew by since ``baseline``, as one call's usage."""
    if baseline is None:
        return None
    now = counters(llm)
    if now is None:
        return None
    try:
        return usage_of(now.delta_since(baseline))
    except Exception:
        return None


def _metrics(usage: Any) -> Any:
    if not usage:
        return None
    from crewai.types.usage_metrics import UsageMetrics

    if isinstance(usage, UsageMetrics):
        return usage
    if isinstance(usage, dict):
        return UsageMetrics.from_provider_dict(usage)
    return None


# -- the in-context flight and the sink that settles it ----------------------------------

current_flight: ContextVar[Flight | None] = ContextVar("allotment_crewai_flight", default=None)
"""The model call reserved in this context and not yet ended (or the last one that was)."""

sink_installed: ContextVar[bool] = ContextVar("allotment_crewai_sink", default=False)
"""Whether this context's stream sinks include ``sink``."""

_events: dict[str, type[Any]] = {}


def _event_types() -> dict[str, type[Any]]:
    if not _events:
        from crewai.events.types.llm_events import LLMCallCompletedEvent, LLMCallFailedEvent

        _events["completed"] = LLMCallCompletedEvent
        _events["failed"] = LLMCallFailedEvent
    return _events


def sink(source: Any, event: Any) -> None:
    """A CrewAI stream sink: sees every event emitted in this context, synchronously."""
    kind = type(event)
    events = _events
    if kind is not events["completed"] and kind is not events["failed"]:
        return
    try:
        flight = current_flight.get()
        if flight is not None and source is flight.llm:
            if kind is events["failed"]:
                flight.failed = True
                return
            if flight.open:
                flight.replied = True
                flight.completed(getattr(event, "usage", None))
                return
            if flight.state == "closed":
                return  # late: its hold was already ended at its estimate
        if kind is events["failed"]:
            return
        # A request no hold covers: another one inside the same call (CrewAI's
        # structured-output fallback, a summarisation that skips the hooks), or an LLM
        # the hooks never saw. Billed, so recorded where this context spends.
        node = flight.node if flight is not None else current()
        if node is not None:
            charge_unreserved(node, source, getattr(event, "usage", None))
    except Exception:
        log.exception("allotment: the CrewAI stream sink failed")


def install_sink() -> Callable[[], None] | None:
    """Add ``sink`` to this context's stream sinks once; returns how to take it out."""
    if sink_installed.get():
        return None
    _event_types()
    from crewai.events.stream_context import add_stream_sink, reset_stream_sinks

    sinks = add_stream_sink(sink)
    flag = sink_installed.set(True)

    def remove() -> None:
        try:
            sink_installed.reset(flag)
            reset_stream_sinks(sinks)
        except ValueError:  # a different context: it leaves with that context
            pass

    return remove


def charge_unreserved(node: Budget, llm: Any, usage: Any) -> None:
    """Record a billed call that no hold covered (it was never refusable)."""
    model, provider = model_of(llm)
    spent = usage_of(_metrics(usage)) or Usage(llm_calls=1, estimated=True)
    call = Call(model=model, provider=provider, metadata={"framework": "crewai"})
    _safely(lambda: node.charge(spent, call=call))
