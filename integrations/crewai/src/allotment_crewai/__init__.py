"""allotment for CrewAI: budgets in the crew config, delegation as child budgets.

``Crew(agents=..., tasks=..., **crew_config(budget))``. CrewAI itself is imported only
when a crew runs (or a ``Crew*`` error class is first used).
"""

from typing import TYPE_CHECKING, Any

from ._config import CrewBudget, crew_config
from ._crewbase import budgeted
from ._instrument import instrument

if TYPE_CHECKING:
    from ._errors import (
        CrewBudgetClosed,
        CrewBudgetExceeded,
        CrewDeadlineExceeded,
        CrewLedgerError,
        CrewRateWindowExceeded,
        CrewUnknownPrice,
    )

__all__ = [
    "CrewBudget",
    "CrewBudgetClosed",
    "CrewBudgetExceeded",
    "CrewDeadlineExceeded",
    "CrewLedgerError",
    "CrewRateWindowExceeded",
    "CrewUnknownPrice",
    "budgeted",
    "crew_config",
    "instrument",
]


def __getattr__(name: str) -> Any:
    # The error classes derive from CrewAI's HookAborted: re-exported on first use.
    if name.startswith("Crew") and name in __all__:
        from . import _errors

        return getattr(_errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
