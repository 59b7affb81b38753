"""Hook specifications: every extension point of allotment, grouped by lifecycle.

Hooks are called with keyword arguments only, so an implementation may accept any
subset of a spec's parameters and specs can grow without breaking plugins. Implement
them with ``@allotment.hookimpl`` and register the plugin through the ``allotment``
entry-point group, or with ``allotment.plugins().register(obj)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._budget import Budget
    from ._call import Call
    from ._errors import BudgetExceeded
    from ._events import Event
    from ._ledger import Ledger
    from ._limits import Limits, Spawn
    from ._usage import Estimate, Usage

PROJECT = "allotment"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- storage ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def allotment_ledger(url: str) -> Ledger | None:
    """Open the ledger for ``url`` (``memory://``, ``sqlite:///runs.db``, ...).

    :param url: the ledger URL the user gave; the scheme picks the backend.
    :return: a ledger, or ``None`` if this plugin does not handle the scheme.
        Stops at the first non-None result.
    """


# -- before a call -------------------------------------------------------------------


@hookspec(firstresult=True)
def allotment_estimate(call: Call) -> Estimate | None:
    """Bound from above what ``call`` can use, before it is sent.

    The bound is reserved on the budget and every ancestor; a bound that is too low
    is still charged in full at settle time (and reported as an overrun).

    :param call: the call about to be made.
    :return: an upper bound, or ``None`` to let the next estimator answer.
        Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def allotment_price(
    model: str | None, provider: str | None, usage: Usage, reserving: bool
) -> Decimal | None:
    """Price ``usage`` of ``model`` in dollars.

    :param model: the model name as the provider knows it.
    :param provider: the provider id, when known.
    :param usage: the tokens to price; each kind is priced once (cache and reasoning
        tokens are parts of input and output).
    :param reserving: True when pricing an upper bound for a hold: price output at the
        higher of the output and reasoning rates.
    :return: the cost, or ``None`` if this plugin does not know the model.
        Stops at the first non-None result; if none answers, the price is unknown.
    """


@hookspec
def allotment_before_call(budget: Budget, call: Call) -> None:
    """Inspect a call about to be reserved; raise ``BudgetExceeded`` (or a subclass) to veto.

    :param budget: the budget the call will be charged to.
    :param call: the call.
    """


# -- after a call ----------------------------------------------------------------------


@hookspec
def allotment_after_call(
    budget: Budget, call: Call, usage: Usage, estimate: Estimate | None
) -> None:
    """Observe a settled call (adaptive estimators learn here).

    :param budget: the budget it was charged to.
    :param call: the call.
    :param usage: what it used, priced; ``usage.estimated`` when the provider gave none.
    :param estimate: the pre-flight estimate its hold was made from, if any.
    """


@hookspec
def allotment_budget_exceeded(budget: Budget, error: BudgetExceeded) -> None:
    """Observe a refusal (alerting, logging). Do not raise.

    :param budget: the budget whose call was refused.
    :param error: the refusal, naming the scope, limit, spent, held and asked.
    """


# -- sub-agents ------------------------------------------------------------------------


@hookspec(firstresult=True)
def allotment_child_limits(parent: Budget, spawn: Spawn) -> Limits | None:
    """Choose the limits of a child budget for a sub-agent an integration detected.

    :param parent: the budget of the agent that spawns.
    :param spawn: what was detected: the sub-agent's name, how it was spawned, and the
        framework.
    :return: limits for the child (escrowed from the parent), or ``None`` to let the next
        policy answer. Stops at the first non-None result.
    """


# -- observation -----------------------------------------------------------------------


@hookspec
def allotment_event(event: Event) -> None:
    """Receive every ledger event: reserve, settle, release, refusal, overrun, child open
    and close. Audit sinks and exporters implement this. Do not raise.

    :param event: the event.
    """


SPEC_NAMES: Sequence[str] = (
    "allotment_ledger",
    "allotment_estimate",
    "allotment_price",
    "allotment_before_call",
    "allotment_after_call",
    "allotment_budget_exceeded",
    "allotment_child_limits",
    "allotment_event",
)
