"""Per-agent caps that do not escrow.

A team's agents take turns in one conversation, so their caps overlap by design: a team
cap of 6 calls with 2 per agent for 4 agents. A kernel child with limits escrows them
from the parent when it opens (4 x 2 > 6 would refuse the fourth agent outright), so a
per-agent cap is expressed instead as a rate window longer than any run: the kernel
checks it atomically with every reservation, takes nothing from the parent, and drops a
released hold from it. Refusals are then reported as the plain limit they stand for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import allotment

FOREVER = 100 * 365.25 * 86_400.0
"""Seconds in a window no run outlives: a rate over it is a plain cap."""

_SUFFIX = f" per {FOREVER:g}s"
_CAPPED = ("usd", "input_tokens", "output_tokens", "total_tokens", "llm_calls", "tool_calls")


def cap_limits(value: object, *, now: float) -> allotment.Limits:
    """Limits for an agent's child budget from the user's short form (a Limits, a dollar
    amount, or a mapping of keyword limits): each amount becomes a cap that does not
    escrow; per-tool limits, a deadline and rate windows are kept as given."""
    limits = allotment.Limits.of(value, now=now)
    rates = list(limits.rate)
    for dim in _CAPPED:
        amount = getattr(limits, dim)
        if amount is not None:
            rates.append(allotment.Rate(limit=amount, per=FOREVER, on=dim, max_wait=0.0))
    return allotment.Limits(per_tool=limits.per_tool, deadline=limits.deadline, rate=tuple(rates))


def check_caps(caps: Mapping[str, object] | None, *, now: float) -> dict[str, object]:
    """Validate a ``per_agent`` or ``children`` mapping now, so a typo fails at setup."""
    if caps is None:
        return {}
    if not isinstance(caps, Mapping):
        raise allotment.ConfigurationError(
            f"give per-agent limits as a mapping of agent name to limits, not {caps!r}"
        )
    for name, value in caps.items():
        if not isinstance(name, str) or not name:
            raise allotment.ConfigurationError(f"agent names must be strings, not {name!r}")
        allotment.Limits.of(value, now=now)
    return dict(caps)


def plain_refusal(error: allotment.BudgetExceeded) -> allotment.BudgetExceeded:
    """A refusal by a per-agent cap, said as the limit it is (not as a rate window)."""
    if not isinstance(error, allotment.RateWindowExceeded) or not error.limit_name.endswith(
        _SUFFIX
    ):
        return error
    fields: dict[str, Any] = dict(
        path=error.path,
        limit_name=error.limit_name[: -len(_SUFFIX)],
        limit=error.limit,
        spent=error.spent,
        held=error.held,
        asked=error.asked,
    )
    plain = allotment.BudgetExceeded(**fields)
    plain.args = (str(plain).replace(" refused a call:", " (an agent cap) refused a call:"),)
    return plain
