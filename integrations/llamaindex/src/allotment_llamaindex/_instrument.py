"""``instrument()``: one budget handler on every callback manager and workflow agent.

An LLM keeps the ``CallbackManager`` it was built with, so handlers added to
``Settings.callback_manager`` or ``llama_index.core.global_handler`` later never reach
LLMs built earlier (and ``global_handler`` holds just one handler, the user's tracer's).
Patching ``CallbackManager.on_event_start`` / ``on_event_end`` on the class reaches every
manager, whenever it was made; a manager that already holds a ``BudgetCallbackHandler``
is left to it, so nothing is counted twice. Workflow agents' ``_call_tool`` is wrapped
for tool calls (see ``_tools``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from allotment import Budget, set_default
from llama_index.core.agent.workflow import AgentWorkflow
from llama_index.core.agent.workflow.base_agent import BaseWorkflowAgent
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType

from . import _coverage, _spans, _streams, _tools
from ._handler import METERED, BudgetCallbackHandler

_lock = threading.Lock()
_stack: list[BudgetCallbackHandler] = []
_routes: dict[str, BudgetCallbackHandler] = {}
"""Which handler reserved each open event, so its end finds it even after a newer
``instrument()`` took over."""
_retired: list[BudgetCallbackHandler] = []
"""Handlers undone while another ``instrument()`` stayed in force: their open calls still
end through ``_routes`` until the last undo."""
_saved: dict[tuple[type, str], Any] = {}
_undo_defaults: dict[int, Callable[[], None]] = {}
"""Per handler still in force, the undo of the process default it set."""
_installed_here: dict[str, bool] = {}


def active() -> BudgetCallbackHandler | None:
    """The handler of the latest ``instrument()`` still in force."""
    return _stack[-1] if _stack else None


def _has_own(handlers: list[Any]) -> bool:
    return any(isinstance(h, BudgetCallbackHandler) for h in handlers)


def _patched_start(original: Callable[..., str]) -> Callable[..., str]:
    def on_event_start(
        self: CallbackManager,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str | None = None,
        parent_id: str | None = None,
        **kwargs: Any,
    ) -> str:
        handler = _stack[-1] if _stack else None
        if handler is not None and event_type in METERED and not _has_own(self.handlers):
            # Choose the id here so the manager's handlers and ours share it.
            event_id = event_id or str(uuid.uuid4())
            # Before the manager's own handlers: a refused call is reported to none of them.
            handler.on_event_start(event_type, payload, event_id=event_id, parent_id="")
            if handler.reserved(event_id):
                _routes[event_id] = handler
        return original(self, event_type, payload, event_id, parent_id, **kwargs)

    on_event_start.__wrapped__ = original  # type: ignore[attr-defined]
    return on_event_start


def _patched_end(original: Callable[..., None]) -> Callable[..., None]:
    def on_event_end(
        self: CallbackManager,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if event_id is not None and _routes:
            handler = _routes.pop(event_id, None)
            if handler is not None:
                handler.on_event_end(event_type, payload, event_id=event_id)
        original(self, event_type, payload, event_id, **kwargs)

    on_event_end.__wrapped__ = original  # type: ignore[attr-defined]
    return on_event_end


def _apply() -> None:
    targets: list[tuple[type, str, Callable[[Any], Any]]] = [
        (CallbackManager, "on_event_start", _patched_start),
        (CallbackManager, "on_event_end", _patched_end),
        (BaseWorkflowAgent, "_call_tool", lambda f: _tools.budgeted(f, active)),
        (AgentWorkflow, "_call_tool", lambda f: _tools.budgeted(f, active)),
    ]
    for cls, name, wrap in targets:
        original = cls.__dict__[name]
        _saved[(cls, name)] = original
        setattr(cls, name, wrap(original))


def _remove() -> None:
    for (cls, name), original in _saved.items():
        setattr(cls, name, original)
    _saved.clear()


def instrumented() -> bool:
    """Whether an ``instrument()`` is in force."""
    return bool(_stack)


def instrument(
    budget: Budget | None = None, *, children: Mapping[str, object] | None = None
) -> Callable[[], None]:
    """Put every LlamaIndex LLM, embedding and workflow-agent tool call through a budget.

    ``budget`` becomes the process default (``allotment.set_default``): calls are charged
    to the budget active in their context (``with budget.activate():``), else to it.
    ``children`` gives per-agent, per-tool or per-scope limits by name, as for
    ``BudgetCallbackHandler``.

    Covers LLMs whatever their construction order (the callback manager class is patched,
    not a global setting), and warns with ``UncoveredLLMWarning`` about every loaded LLM
    class whose methods bypass the callback manager. Calling it again makes the newest
    call's settings win, with nothing counted twice; each call returns its own undo, which
    is safe to call more than once. The last undo restores LlamaIndex as it was.
    """
    if not _stack:
        # Before anything changes: where warnings are errors, this raises with nothing done.
        _coverage.check_loaded()
    handler = BudgetCallbackHandler(None, children=children)  # bad limits raise here
    with _lock:
        first = not _stack
        if first:
            _installed_here["tracker"] = not _spans.installed()
            _installed_here["watcher"] = not _streams.installed()
            _apply()
        _stack.append(handler)
    if budget is not None:
        _undo_defaults[id(handler)] = set_default(budget)
    _spans.tracker()
    _streams.watcher()
    done = threading.Event()

    def undo() -> None:
        with _lock:
            if done.is_set():
                return
            done.set()
            for i in range(len(_stack) - 1, -1, -1):
                if _stack[i] is handler:
                    del _stack[i]
                    break
            last = not _stack
            retiring = [handler]
            if last:
                _remove()
                _routes.clear()
                retiring.extend(_retired)
                _retired.clear()
            else:
                _retired.append(handler)
        undo_default = _undo_defaults.pop(id(handler), None)
        if undo_default is not None:
            undo_default()
        if last:
            # No manager will report the ends of calls still open: settle their bounds.
            for h in retiring:
                h.close()
            if _installed_here.pop("tracker", False):
                _spans.uninstall()
            if _installed_here.pop("watcher", False):
                _streams.uninstall()

    return undo


def reset() -> None:
    """Undo every ``instrument()`` still in force at once (for tests that failed midway)."""
    with _lock:
        retiring = [*_stack, *_retired]
        _stack.clear()
        _retired.clear()
        _routes.clear()
        if _saved:
            _remove()
    for handler in retiring:
        undo_default = _undo_defaults.pop(id(handler), None)
        if undo_default is not None:
            undo_default()
        handler.close()
