"""Per-run state: where a run is charged, and the holds of model and tool calls."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

from allotment import Budget, BudgetExceeded, Call, Hold, Usage

from ._tokens import approximate, counter

if TYPE_CHECKING:
    from uuid import UUID

log = logging.getLogger("allotment.langchain")

Kind = Literal["chain", "llm", "tool", "retriever"]
Outcome = Literal["pending", "billed", "failed", "unsent", "unknown", "refused"]
"""What happened to one HTTP attempt: ``billed`` (a 2xx answer), ``failed`` (the provider
answered 4xx/5xx, which providers do not bill), ``unsent`` (no connection was made),
``unknown`` (sent, no answer: a timeout or a dropped connection; the provider may bill it),
``refused`` (our budget refused the retry before it was sent)."""


class Scope:
    """The budget a subtree of runs is charged to: the root budget, or a sub-agent's child."""

    __slots__ = ("budget", "name", "owner")

    def __init__(self, budget: Budget, name: str | None, owner: UUID | None) -> None:
        self.budget = budget
        self.name = name
        """The sub-agent's name; ``None`` for the budget the top-level run resolved."""
        self.owner = owner
        """The run whose end closes this scope's budget; ``None`` if the handler did not
        open it."""


class Run:
    """Any run the handler tracks (chains, models, tools, retrievers)."""

    __slots__ = ("depth", "kind", "marker", "name", "node", "parent", "root", "scope")

    def __init__(
        self,
        kind: Kind,
        name: str,
        parent: UUID | None,
        root: UUID,
        scope: Scope,
        marker: str | None,
        depth: int,
        node: str | None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.parent = parent
        self.root = root
        """The top-level run of the trace (refusals are remembered per trace)."""
        self.scope = scope
        self.marker = marker
        """The ``{"allotment": {"agent": ...}}`` metadata name this run carries."""
        self.depth = depth
        """How many LangGraph namespaces deep the run is (0 outside any graph node)."""
        self.node = node
        """The LangGraph node the run is in, if any."""


class ToolRun(Run):
    """A tool call between ``on_tool_start`` and its end."""

    __slots__ = ("hold",)

    hold: Hold


class LLMRun(Run):
    """A model call between its start and its end, with one hold per HTTP attempt."""

    __slots__ = (
        "attempts",
        "call",
        "charged",
        "chunks",
        "count",
        "cut",
        "exact",
        "holds",
        "output_tokens",
        "params",
        "raw",
        "refusal",
        "reported",
        "serialized",
    )

    call: Call
    params: Mapping[str, Any]
    serialized: Mapping[str, Any] | None

    def start(self, call: Call, hold: Hold, params: Mapping[str, Any], serialized: Any) -> None:
        self.call = call
        self.exact, self.count = counter(call.model)
        self.holds = [hold]
        self.attempts: list[Outcome] = []
        """Outcomes of the HTTP attempts a metered transport saw (empty without one)."""
        self.params = params
        self.serialized = serialized
        self.chunks = 0
        self.output_tokens = 0
        """Streamed output as counted to cut the stream (never ahead of the real count)."""
        self.charged = 0
        """Streamed output as counted to charge it (never behind the real count)."""
        self.raw = 0
        """Streamed output as the model's tokenizer counts it, else in UTF-8 bytes."""
        self.cut = False
        self.refusal: BudgetExceeded | None = None
        """A retry the metered transport refused; raised in place of the provider error."""
        self.reported: Usage | None = None
        """Usage carried by a stream event, when the final message lacks it."""

    @property
    def hold(self) -> Hold:
        """The first hold, made in ``on_*_start``; its bound caps a stream."""
        return self.holds[0]

    @property
    def open(self) -> bool:
        return not self.holds[-1].ended

    def add_streamed(self, text: str) -> None:
        """Count a streamed chunk's text both ways (see ``_tokens``)."""
        self.raw += self.count(text)
        self.charged = self.raw
        self.output_tokens = self.raw if self.exact else approximate(self.raw)

    def output_estimate(self, generated: int = 0, *, exact: bool = False) -> int:
        """Output tokens to charge when the provider reported none. A count that is only a
        bound is capped at the hold's output bound, which the provider enforced, unless
        the stream went past it (then it did not)."""
        n = max(self.charged, generated)
        return n if exact or self.cut else min(n, self.hold.output_tokens)

    # -- attempts seen by the metered transport ------------------------------------------

    def begin_attempt(self) -> tuple[int, BudgetExceeded | None]:
        """Account for one HTTP attempt about to be sent; a retry needs a hold of its own."""
        index = len(self.attempts)
        if index == 0:
            self.attempts.append("pending")
            return index, None
        try:
            hold = self.scope.budget.reserve(self.call)
        except BudgetExceeded as err:
            self.attempts.append("refused")
            self.refusal = err
            return index, err
        self.holds.append(hold)
        self.attempts.append("pending")
        return index, None

    async def abegin_attempt(self) -> tuple[int, BudgetExceeded | None]:
        """``begin_attempt`` for async clients: waits for rate windows without blocking."""
        index = len(self.attempts)
        if index == 0:
            self.attempts.append("pending")
            return index, None
        try:
            hold = await self.scope.budget.areserve(self.call)
        except BudgetExceeded as err:
            self.attempts.append("refused")
            self.refusal = err
            return index, err
        self.holds.append(hold)
        self.attempts.append("pending")
        return index, None

    def end_attempt(self, index: int, outcome: Outcome) -> None:
        self.attempts[index] = outcome

    # -- ending the holds ----------------------------------------------------------------

    def _held_attempts(self) -> list[tuple[Hold, Outcome]]:
        """Each hold with the outcome of the attempt it covered (one unmetered attempt when
        no transport reported any)."""
        outcomes = [o for o in self.attempts if o != "refused"] or ["pending"]
        return list(zip(self.holds, outcomes, strict=False))

    def settle(self, usage: Usage | None, estimate: int) -> None:
        """End every hold after a successful call: the last billed attempt gets the
        provider's usage (or ``estimate`` output tokens, flagged), earlier ones their
        outcome's charge."""
        if not self.attempts and len(self.holds) == 1:  # no metered transport: one hold
            if usage is not None:
                self.holds[0].settle(usage)
            else:
                self.holds[0].settle_estimate(output_tokens=estimate)
            return
        held = self._held_attempts()
        final = max(
            (i for i, (_, o) in enumerate(held) if o in ("billed", "pending")),
            default=len(held) - 1,
        )
        for i, (hold, outcome) in enumerate(held):
            if i == final:
                if usage is not None:
                    hold.settle(usage)
                else:
                    hold.settle_estimate(output_tokens=estimate)
            else:
                _end_unreported(hold, outcome)

    def fail(self, reached: bool | None, usage: Usage | None, *, exact: bool = False) -> None:
        """End every hold after a failed call. ``reached`` says whether the (last) attempt
        got to the provider: True (charge what was streamed, flagged), False (release),
        None (unknown: charge the hold's bound, flagged)."""
        held = self._held_attempts()
        for i, (hold, outcome) in enumerate(held):
            if hold.ended:
                continue
            last = i == len(held) - 1
            if last and self.chunks:
                streamed = max(
                    self.output_estimate(exact=exact), usage.output_tokens if usage else 0
                )
                inputs = usage.input_tokens if usage and usage.input_tokens else None
                hold.settle_estimate(output_tokens=streamed, input_tokens=inputs)
            elif outcome != "pending":
                _end_unreported(hold, outcome)
            elif reached is False:
                hold.release()
            else:
                hold.settle_estimate()

    def release(self) -> None:
        """End every hold charging nothing: the call never reached the provider."""
        for hold in self.holds:
            if not hold.ended:
                hold.release()


def _end_unreported(hold: Hold, outcome: Outcome) -> None:
    """An attempt whose usage nobody reported: charge it if the provider may bill it."""
    if outcome in ("failed", "unsent"):
        hold.release()
    else:
        # billed (a 2xx that did not give us its usage), unknown (timed out) or pending
        # (no transport told us): the provider may have charged the whole bound.
        hold.settle_estimate()


active_llm_run: ContextVar[LLMRun | None] = ContextVar("allotment_langchain_llm_run", default=None)
"""The model call being made in this context, for the metered HTTP transport."""
