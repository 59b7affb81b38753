"""The one patch on AutoGen's teams: ``BaseGroupChat.run_stream`` (``run`` goes through it).

While installed it (1) re-raises the typed allotment error behind the ``RuntimeError`` a
team's runtime turns it into, so ``await team.run(...)`` raises ``BudgetExceeded``; (2)
keeps track of running teams, so the middleware can find the team a ``GroupChatStart``
is for and undo its binding when the run ends, however it ends; (3) raises the refusal
behind a run that was stopped by termination instead of returning its result; (4) opens the child
budget of a nested team (a ``SocietyOfMindAgent``'s) for the length of its run, active
in the context its runtime starts from, and closes it after. Installation is counted:
every user holds it, and the last one to let go restores the original.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import allotment

from ._typed import recover, remember

StartHook = Callable[["TeamRun"], Awaitable[None]]


class TeamRun:
    """One running ``run_stream`` of a team."""

    __slots__ = ("active", "on_end", "team")

    def __init__(self, team: Any) -> None:
        self.team = team
        self.active = allotment.current()
        """The budget active where the run was started (a runtime's handlers run in the
        context the runtime was started in, which may not have it)."""
        self.on_end: list[Callable[[], None]] = []
        """Called, last first, when the run ends (normally, by error, or cancelled)."""


class SubTeam:
    """A nested team that gets its own child budget for each of its runs."""

    __slots__ = ("limits", "owner", "spawn")

    def __init__(self, owner: allotment.Budget, spawn: allotment.Spawn, limits: object) -> None:
        self.owner = owner
        self.spawn = spawn
        self.limits = limits

    def open(self) -> allotment.Budget:
        from ._meter import pick

        parent = pick(self.owner) or self.owner
        try:
            return parent.spawn(self.spawn, limits=self.limits)
        except allotment.AllotmentError as err:
            raise remember(err) from None


# Reentrant: a holder's finalizer can run, through the garbage collector, while this
# thread already holds the lock.
_lock = threading.RLock()
_holders = 0
_original: Any = None
_active: dict[str, TeamRun] = {}
_subteams: weakref.WeakKeyDictionary[Any, SubTeam] = weakref.WeakKeyDictionary()
_start_hooks: list[StartHook] = []
_refused: weakref.WeakKeyDictionary[Any, allotment.AllotmentError] = weakref.WeakKeyDictionary()


def install() -> Callable[[], None]:
    """Hold the patch; the returned callable lets go (once)."""
    global _holders, _original
    try:
        from autogen_agentchat.teams import BaseGroupChat
    except ImportError:  # autogen-core alone: there are no teams to patch
        return lambda: None
    with _lock:
        if _holders == 0:
            _original = BaseGroupChat.__dict__["run_stream"]
            BaseGroupChat.run_stream = _run_stream  # type: ignore[method-assign]
        _holders += 1
    released = False

    def release() -> None:
        nonlocal released
        global _holders, _original
        with _lock:
            if released:
                return
            released = True
            _holders -= 1
            if _holders == 0 and _original is not None:
                from autogen_agentchat.teams import BaseGroupChat

                BaseGroupChat.run_stream = _original  # type: ignore[method-assign]
                _original = None

    return release


def hold_for(owner: object) -> None:
    """Hold the patch for as long as ``owner`` lives."""
    weakref.finalize(owner, install())


def installed() -> bool:
    """Whether the patch is in place."""
    return _holders > 0


def running(team_id: str) -> TeamRun | None:
    """The run of the team with this id, while it runs."""
    return _active.get(team_id)


def nest(team: Any, sub: SubTeam) -> Callable[[], None]:
    """Give ``team`` a child budget per run; the returned callable takes it back."""
    _subteams[team] = sub

    def undo() -> None:
        if _subteams.get(team) is sub:
            del _subteams[team]

    return undo


def nested(team: Any) -> bool:
    """Whether ``team`` runs as part of another team's binding."""
    return team in _subteams


def stop_with(team: Any, error: allotment.AllotmentError) -> None:
    """Make ``team``'s current run raise ``error`` when it ends (it was stopped cleanly,
    by a termination condition, because of ``error``)."""
    _refused[team] = remember(error)


def on_start(hook: StartHook) -> Callable[[], None]:
    """Call ``hook`` at the start of every team run; the returned callable removes it."""
    _start_hooks.append(hook)

    def undo() -> None:
        if hook in _start_hooks:
            _start_hooks.remove(hook)

    return undo


async def _run_stream(self: Any, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
    original = _original
    if original is None:  # released while a caller held the old attribute
        from autogen_agentchat.teams import BaseGroupChat

        original = BaseGroupChat.__dict__["run_stream"]
    from autogen_agentchat.base import TaskResult

    run = TeamRun(self)
    team_id = getattr(self, "_team_id", None)
    # A team already running (AutoGen refuses a second run) keeps its bookkeeping.
    outer = _active.get(team_id) if isinstance(team_id, str) else None
    if isinstance(team_id, str) and outer is None:
        _active[team_id] = run
        _refused.pop(self, None)
    child: allotment.Budget | None = None
    stream: AsyncGenerator[Any, None] | None = None
    try:
        if outer is None:
            for hook in list(_start_hooks):
                await hook(run)
        sub = _subteams.get(self)
        if sub is not None:
            child = sub.open()
        stream = original(self, *args, **kwargs)
        assert stream is not None
        first = True
        while True:
            try:
                if first and child is not None:
                    # The team's runtime copies this context when it starts, during the
                    # first step: its agents then see the child as the active budget.
                    with child.activate():
                        item = await anext(stream)
                else:
                    item = await anext(stream)
            except StopAsyncIteration:
                break
            first = False
            if isinstance(item, TaskResult):
                refusal = _refused.pop(self, None)
                if refusal is not None:
                    raise refusal
            yield item
    except RuntimeError as err:
        typed = recover(err)
        if typed is None:
            raise
        raise typed from err
    finally:
        try:
            if stream is not None:
                await stream.aclose()
        finally:
            if outer is None and isinstance(team_id, str):
                _active.pop(team_id, None)
            for undo in reversed(run.on_end):
                undo()
            if child is not None:
                child.close()
