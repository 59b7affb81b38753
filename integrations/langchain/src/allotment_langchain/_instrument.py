"""``instrument()``: the handler on every LangChain run in the process, with an undo."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from allotment import Budget, ConfigurationError, set_default

from ._handler import BudgetCallbackHandler, installed


class _ProcessWide:
    """What ``register_configure_hook`` reads a handler from.

    LangChain asks for a ``ContextVar`` and calls only its ``get()``. A real ContextVar
    set by ``instrument()`` would not reach threads started without a copied context
    (raw ``threading.Thread``, most worker pools) and could not be unset from another
    context; this reads the one process-wide installation instead.
    """

    def get(self) -> BudgetCallbackHandler | None:
        return installed.handler


class _Installation:
    __slots__ = ("budget", "children", "handler", "pop_default", "undo")

    def __init__(
        self,
        handler: BudgetCallbackHandler,
        budget: Budget | None,
        children: Mapping[str, object] | None,
        pop_default: Callable[[], None] | None,
    ) -> None:
        self.handler = handler
        self.budget = budget
        self.children = dict(children or {})
        self.pop_default = pop_default
        self.undo = _undo_for(self)


_lock = threading.Lock()
_hook_registered = False
_current: _Installation | None = None


def instrument(
    budget: Budget | None = None, *, children: Mapping[str, object] | None = None
) -> Callable[[], None]:
    """Charge every LangChain and LangGraph run in this process to a budget.

    Adds a ``BudgetCallbackHandler`` to every callback manager LangChain builds (not
    twice where one is passed explicitly: the explicit one wins). With ``budget``, it also
    becomes the process default (``allotment.set_default``); runs inside ``with
    other.activate():`` are charged to ``other``. ``children`` gives limits per sub-agent
    name.

    Calling it again with the same arguments changes nothing and returns the same undo.
    The undo removes the handler and the default; calling it twice is a no-op.
    """
    global _hook_registered, _current
    with _lock:
        if _current is not None:
            if _current.budget is budget and _current.children == dict(children or {}):
                return _current.undo
            raise ConfigurationError(
                "allotment_langchain is already instrumented with another budget or other "
                "children limits; call the undo that instrument() returned before "
                "instrumenting again"
            )
        if not _hook_registered:
            from langchain_core.tracers.context import register_configure_hook

            # Registered once for the process (LangChain has no way to unregister); the
            # handler class makes LangChain skip it where a handler is passed explicitly.
            register_configure_hook(
                _ProcessWide(),  # type: ignore[arg-type]
                True,
                BudgetCallbackHandler,
            )
            _hook_registered = True
        handler = BudgetCallbackHandler(None, children=children)
        handler._instrumented = True
        pop = set_default(budget) if budget is not None else None
        _current = _Installation(handler, budget, children, pop)
        installed.handler = handler
        return _current.undo


def _undo_for(installation: _Installation) -> Callable[[], None]:
    def undo() -> None:
        global _current
        with _lock:
            if _current is not installation:
                return
            _current = None
            installed.handler = None
            if installation.pop_default is not None:
                installation.pop_default()

    return undo


def instrumented() -> BudgetCallbackHandler | None:
    """The handler ``instrument()`` installed, or ``None``."""
    return installed.handler
