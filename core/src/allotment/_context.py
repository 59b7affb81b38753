"""The current budget: explicit, else the context's, else the process default."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._budget import Budget

_current: ContextVar[Budget | None] = ContextVar("allotment_current", default=None)
_default: list[Budget] = []


def current() -> Budget | None:
    """The budget activated in this context (``with budget.activate():``), else the
    process default set by an integration's ``instrument(budget)``, else ``None``."""
    budget = _current.get()
    if budget is not None:
        return budget
    return _default[-1] if _default else None


def resolve(explicit: Budget | None = None) -> Budget | None:
    """The budget a call should be charged to: explicit > current context > default."""
    return explicit if explicit is not None else current()


def set_default(budget: Budget) -> Callable[[], None]:
    """Make ``budget`` the process default until the returned undo is called.

    Integrations' ``instrument(budget)`` use this; the latest default wins.
    """
    _default.append(budget)
    return lambda: pop_default(budget)


def pop_default(budget: Budget) -> None:
    """Undo ``set_default(budget)``; a no-op if it is not there."""
    for i in range(len(_default) - 1, -1, -1):
        if _default[i] is budget:
            del _default[i]
            return
