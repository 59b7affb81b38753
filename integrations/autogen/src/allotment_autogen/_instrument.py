"""``instrument()``: budget every AutoGen model client in the process."""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

import allotment

from . import _meter, _teams, _translate

Undo = Callable[[], None]

_WRAPPERS = frozenset({"BudgetedChatCompletionClient", "ChatCompletionCache"})
"""Clients that call another client: the one they call is metered, not them."""

_lock = threading.Lock()
_users = 0
_undo: list[Undo] = []
_facts: weakref.WeakKeyDictionary[Any, _translate.ClientFacts] = weakref.WeakKeyDictionary()


def _facts_of(client: Any) -> _translate.ClientFacts:
    """A client's facts, read once: its model and settings do not change after it is made."""
    try:
        return _facts[client]
    except KeyError:
        facts = _facts[client] = _translate.facts_of(client)
        return facts
    except TypeError:  # not weak-referenceable
        return _translate.facts_of(client)


def instrument(budget: allotment.Budget | None = None) -> Undo:
    """Meter every call of every AutoGen ``ChatCompletionClient`` on ``budget`` (the process
    default from now on; the budget active in a context still wins), and budget every
    team run: its sub-agents get child budgets, its tool calls are counted, and its
    refusals come out of ``team.run()`` typed.

    Client classes defined later are covered too. Calls made while no budget is active or
    set (``instrument()`` without one) pass through unmetered. Calling it again is
    harmless; each call returns its own undo, and the patches go when the last is undone.
    """
    global _users
    if budget is not None and not isinstance(budget, allotment.Budget):
        raise allotment.ConfigurationError(
            f"budget must be an allotment.Budget or None, not {type(budget).__name__}"
        )
    with _lock:
        if _users == 0:
            _undo.extend(_install())
        _users += 1
    pop_default = allotment.set_default(budget) if budget is not None else None
    done = False

    def undo() -> None:
        global _users
        nonlocal done
        with _lock:
            if done:
                return
            done = True
            if pop_default is not None:
                pop_default()
            _users -= 1
            if _users == 0:
                while _undo:
                    _undo.pop()()

    return undo


def instrumented() -> bool:
    """Whether ``instrument()`` is in effect."""
    return _users > 0


def _install() -> list[Undo]:
    from autogen_core.models import ChatCompletionClient

    undos: list[Undo] = [_teams.install(), _teams.on_start(_bind_run)]
    patched: list[tuple[type, str, Any]] = []

    def patch(cls: type) -> None:
        if cls.__name__ in _WRAPPERS:
            return
        for name, make in (("create", _metered_create), ("create_stream", _metered_stream)):
            original = cls.__dict__.get(name)
            if original is None or getattr(original, "__isabstractmethod__", False):
                continue
            if getattr(original, "__allotment_original__", None) is not None:
                continue
            replacement = make(original)
            replacement.__allotment_original__ = original
            setattr(cls, name, replacement)
            patched.append((cls, name, original))

    for cls in _subclasses(ChatCompletionClient):
        patch(cls)

    # Any: a class attribute set and deleted at run time, which type checkers do not model.
    base: Any = ChatCompletionClient
    had_hook = "__init_subclass__" in vars(base)
    previous_hook = vars(base).get("__init_subclass__")

    def init_subclass(cls: Any, /, **kwargs: Any) -> None:
        super(base, cls).__init_subclass__(**kwargs)
        patch(cls)

    base.__init_subclass__ = classmethod(init_subclass)

    def unpatch() -> None:
        if had_hook:
            base.__init_subclass__ = previous_hook
        else:
            del base.__init_subclass__
        for cls, name, original in reversed(patched):
            setattr(cls, name, original)
        patched.clear()

    undos.append(unpatch)
    return undos


def _subclasses(root: type) -> list[type]:
    found: list[type] = []
    stack: list[type] = list(root.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in found:
            found.append(cls)
            stack.extend(cls.__subclasses__())
    return found


def _metered_create(original: Any) -> Any:
    async def create(self: Any, messages: Any, *args: Any, **kwargs: Any) -> Any:
        budget = None if _meter.metering.get() else _meter.pick(None)
        if budget is None or args:
            return await original(self, messages, *args, **kwargs)
        facts = _facts_of(self)
        call = _translate.call_of(
            messages,
            kwargs.get("tools", ()),
            kwargs.get("json_output"),
            kwargs.get("extra_create_args") or {},
            facts,
            agent=None,
        )
        return await _meter.create(
            budget,
            call,
            facts,
            lambda: original(self, messages, **kwargs),
            kwargs.get("cancellation_token"),
        )

    create.__doc__ = original.__doc__
    create.__name__ = "create"
    return create


def _metered_stream(original: Any) -> Any:
    def create_stream(
        self: Any, messages: Any, *args: Any, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        budget = None if _meter.metering.get() else _meter.pick(None)
        if budget is None or args:
            result: AsyncGenerator[Any, None] = original(self, messages, *args, **kwargs)
            return result
        facts = _facts_of(self)
        extra = kwargs.get("extra_create_args") or {}
        call = _translate.call_of(
            messages, kwargs.get("tools", ()), kwargs.get("json_output"), extra, facts, agent=None
        )
        if (
            facts.stream_usage_option
            and not facts.stream_options_set
            and "stream_options" not in extra
            and kwargs.get("include_usage") is None
        ):
            kwargs = {
                **kwargs,
                "extra_create_args": {**extra, "stream_options": {"include_usage": True}},
            }
        return _meter.stream(
            budget,
            call,
            facts,
            lambda: original(self, messages, **kwargs),
            kwargs.get("cancellation_token"),
        )

    create_stream.__doc__ = original.__doc__
    create_stream.__name__ = "create_stream"
    return create_stream


async def _bind_run(run: _teams.TeamRun) -> None:
    """Budget a team run that nothing else budgets: sub-agents, tools, typed refusals."""
    from ._bind import Binding, bound_within
    from ._middleware import BudgetMiddleware

    team = run.team
    if bound_within(team):
        return
    handlers = getattr(getattr(team, "_runtime", None), "_intervention_handlers", None) or ()
    if any(isinstance(h, BudgetMiddleware) for h in handlers):
        return  # the runtime's middleware binds it, with its own per-agent settings
    budget = _meter.pick(None, run.active)
    if budget is None:
        return
    binding = Binding(participants=False)
    try:
        await binding.team(team, budget)
    except BaseException:
        binding.close()
        raise
    run.on_end.append(binding.close)
