"""The demo: offline, deterministic, and the budget holds."""

from __future__ import annotations

import io

from allotment_crewai import _demo
from rich.console import Console


def test_the_demo_stops_a_delegating_crew_at_its_budget_and_shows_the_tree() -> None:
    out = io.StringIO()

    _demo.main(ledger="memory://", live=False, model=None, console=Console(file=out, width=220))

    text = out.getvalue()
    assert "The crew was stopped" in text
    assert "CrewBudgetExceeded" in text
    assert "Researcher#2" in text  # delegations ran on child budgets
    assert "Writer#2" in text
    assert "the provider answered" in text
    assert "nothing held" in text
