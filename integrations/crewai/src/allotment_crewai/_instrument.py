"""Budgets for every crew in the process: CrewAI's global hooks, with an undo."""

from __future__ import annotations

import threading
from collections.abc import Callable

from allotment import Budget, ConfigurationError, set_default

_lock = threading.Lock()
_users = 0
_unregister: Callable[[], None] | None = None


def instrument(budget: Budget | None = None) -> Callable[[], None]:
    """Meter every CrewAI crew, agent and LLM call in the process.

    Crews without a ``crew_config`` of their own are charged to the current budget
    (``with budget.activate():``, else ``budget`` given here, which becomes the process
    default); with no budget current, calls run unmetered. Calling it again does not
    register the hooks twice. Returns the undo (calling it twice is harmless).

    Global hooks reach executors CrewAI builds after this call, and every crew kickoff
    (its hooks are scoped to the kickoff, so agents built earlier are covered too).
    """
    global _users, _unregister
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigurationError(f"instrument needs an allotment.Budget, not {budget!r}")
    from ._hooks import register_global

    with _lock:
        if _unregister is None:
            _unregister = register_global()
        _users += 1
    pop_default = set_default(budget) if budget is not None else None
    done = False

    def undo() -> None:
        global _users, _unregister
        nonlocal done
        with _lock:
            if done:
                return
            done = True
            if pop_default is not None:
                pop_default()
            _users -= 1
            if _users == 0 and _unregister is not None:
                _unregister()
                _unregister = None

    return undo
