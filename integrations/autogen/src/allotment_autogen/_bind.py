"""Binding a team to a budget for one run: where AutoGen keeps its model clients and tools.

AutoGen reads an agent's client and workbenches from the agent on every turn
(``AssistantAgent._model_client``, ``._workbench``, ``._handoff_tools``), a selector's
from the team and its manager (``SelectorGroupChat._model_client``), a society of mind's
from the agent with its inner team in ``._team``, and a sub-agent tool's runner in
``._task_runner``. A binding replaces each on its instance, remembers how to put it back,
and opens the budgets it charges; ``close()`` restores everything and closes them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import allotment

from . import _teams
from ._caps import cap_limits
from ._tools import SubAgent, undo_setting, wrap_handoff, wrap_workbench
from ._typed import remember

Undo = Callable[[], None]
Stop = Callable[[allotment.AllotmentError], None]


def _ignore(error: allotment.AllotmentError) -> None:
    """Outside a team a handoff ends the agent's run anyway; nothing to stop."""


_members: weakref.WeakSet[Any] = weakref.WeakSet()
"""Teams bound as part of another team's binding (nested teams, team tools)."""


def bound_within(team: Any) -> bool:
    """Whether ``team`` is bound as a member of a running team's binding."""
    return team in _members or _teams.nested(team)


class Binding:
    """The changes one team run needs, and how to undo them.

    ``per_agent`` caps (by agent name) open each participant's child budget with caps that
    do not escrow; ``children`` limits (by sub-agent name) are passed to ``budget.spawn``
    for sub-agents, which escrows them. With ``participants=False`` the team's agents
    charge the team's budget directly (sub-agents still get children).
    """

    def __init__(
        self,
        *,
        per_agent: Mapping[str, object] | None = None,
        children: Mapping[str, object] | None = None,
        participants: bool = True,
    ) -> None:
        self._per_agent = dict(per_agent or {})
        self._children = dict(children or {})
        self._participants = participants
        self._undo: list[Undo] = []
        self._opened: list[allotment.Budget] = []
        self._seen: set[int] = set()
        self._closed = False

    def close(self) -> None:
        """Restore every replaced attribute, then close the budgets it opened."""
        if self._closed:
            return
        self._closed = True
        try:
            for undo in reversed(self._undo):
                undo()
        finally:
            for budget in reversed(self._opened):
                budget.close()

    # -- teams -----------------------------------------------------------------------------

    async def team(self, team: Any, budget: allotment.Budget) -> None:
        """Bind a team run on ``budget``: each participant (and a team-level model client,
        as the selector's) on its own child unless ``participants=False``."""
        self._seen.add(id(team))
        stop = await self._stopper(team)
        for member in getattr(team, "_participants", ()):
            name = str(getattr(member, "name", type(member).__name__))
            await self._member(member, self._participant(budget, name, team), stop)
        client = getattr(team, "_model_client", None)
        if client is not None:
            name = str(getattr(team, "_group_chat_manager_name", "manager"))
            await self._team_client(team, self._participant(budget, name, team), name)

    def _participant(self, budget: allotment.Budget, name: str, team: Any) -> allotment.Budget:
        if not self._participants and name not in self._per_agent:
            return budget
        try:
            if name in self._per_agent:
                limits = cap_limits(self._per_agent[name], now=budget.clock.now())
                child = budget.allot(name, limits=limits)
            else:
                spawn = allotment.Spawn(
                    name=name,
                    how="participant",
                    framework="autogen",
                    metadata={"team": getattr(team, "name", None)},
                )
                child = budget.spawn(spawn)
        except allotment.AllotmentError as err:
            raise remember(err) from None
        self._opened.append(child)
        return child

    async def _team_client(self, team: Any, budget: allotment.Budget, name: str) -> None:
        self._wrap_client(team, "_model_client", budget, name)
        manager = await _manager_of(team)
        if manager is not None:
            self._wrap_client(manager, "_model_client", budget, name)

    async def _inner_team(self, team: Any, budget: allotment.Budget) -> None:
        """A team run inside an agent (nested participant, team tool, society of mind):
        its agents charge ``budget``, or the child budget active while it runs."""
        if id(team) in self._seen:
            return
        self._seen.add(id(team))
        _members.add(team)
        self._undo.append(lambda: _members.discard(team))
        stop = await self._stopper(team)
        for member in getattr(team, "_participants", ()):
            await self._member(member, budget, stop)
        if getattr(team, "_model_client", None) is not None:
            name = str(getattr(team, "_group_chat_manager_name", "manager"))
            await self._team_client(team, budget, name)

    # -- agents ----------------------------------------------------------------------------

    async def _stopper(self, team: Any) -> Stop:
        """How to end ``team``'s run cleanly from inside a tool call: an
        ``ExternalTermination`` ORed into its termination condition (on the team, for a
        manager not built yet, and on its manager), set together with the refusal the
        run is to raise. Only teams whose agents hand off need one."""
        if not any(getattr(m, "_handoff_tools", None) for m in getattr(team, "_participants", ())):
            return _ignore
        from autogen_agentchat.conditions import ExternalTermination

        external = ExternalTermination()
        original = getattr(team, "_termination_condition", None)
        combined = external if original is None else original | external
        self._set(team, "_termination_condition", combined)
        manager = await _manager_of(team)
        if manager is not None and hasattr(manager, "_termination_condition"):
            self._set(manager, "_termination_condition", combined)

        def stop(error: allotment.AllotmentError) -> None:
            _teams.stop_with(team, error)
            external.set()

        return stop

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        self._undo.append(undo_setting(obj, attr, value))
        setattr(obj, attr, value)

    async def _member(
        self, member: Any, budget: allotment.Budget, stop: Stop | None = None
    ) -> None:
        from autogen_agentchat.teams import BaseGroupChat

        stop = stop or _ignore
        if id(member) in self._seen:
            return
        if isinstance(member, BaseGroupChat):
            await self._inner_team(member, budget)
            return
        self._seen.add(id(member))
        name = getattr(member, "name", None)
        self._wrap_client(member, "_model_client", budget, name)
        workbenches = getattr(member, "_workbench", None)
        if isinstance(workbenches, (list, tuple)):
            for workbench in workbenches:
                await self._workbench(workbench, budget, name)
        handoffs = getattr(member, "_handoffs", None)
        for tool in getattr(member, "_handoff_tools", ()) or ():
            target = _handoff_target(handoffs, tool)
            self._undo.append(wrap_handoff(tool, budget, name, target, stop))
        inner = getattr(member, "_team", None)
        if isinstance(inner, BaseGroupChat):
            inner_name = str(getattr(inner, "name", "team"))
            spawn = allotment.Spawn(
                name=inner_name,
                how="subgraph",
                framework="autogen",
                metadata={"agent": name, "kind": "society_of_mind"},
            )
            limits = self._children.get(inner_name, self._children.get(str(name)))
            self._undo.append(_teams.nest(inner, _teams.SubTeam(budget, spawn, limits)))
            await self._inner_team(inner, budget)
        wrapped = getattr(member, "_wrapped_agent", None)
        if wrapped is not None:
            await self._member(wrapped, budget, stop)

    async def _workbench(self, workbench: Any, budget: allotment.Budget, agent: Any) -> None:
        from autogen_agentchat.tools import TeamTool
        from autogen_agentchat.tools._task_runner_tool import TaskRunnerTool

        if id(workbench) in self._seen:
            return
        self._seen.add(id(workbench))
        subagents: dict[str, SubAgent] = {}
        renamed = {v: k for k, v in getattr(workbench, "_override_name_to_original", {}).items()}
        for tool in getattr(workbench, "_tools", ()) or ():
            if not isinstance(tool, TaskRunnerTool):
                continue
            runner = getattr(tool, "_task_runner", None)
            tool_name = renamed.get(tool.name, tool.name)
            runner_name = str(getattr(runner, "name", tool.name))
            spawn = allotment.Spawn(
                name=tool_name,
                how="agent_tool",
                framework="autogen",
                metadata={
                    "agent": agent,
                    "runner": runner_name,
                    "kind": "team_tool" if isinstance(tool, TeamTool) else "agent_tool",
                },
            )
            limits = self._children.get(tool_name, self._children.get(runner_name))
            subagents[tool_name] = SubAgent(spawn, limits)
            if runner is not None:
                await self._member(runner, budget)
        self._undo.extend(wrap_workbench(workbench, budget, agent, subagents))

    def _wrap_client(self, obj: Any, attr: str, budget: allotment.Budget, agent: Any) -> None:
        from autogen_core.models import ChatCompletionClient

        from ._client import BudgetedChatCompletionClient

        current = getattr(obj, attr, None)
        if not isinstance(current, ChatCompletionClient):
            return
        if isinstance(current, BudgetedChatCompletionClient):
            # The user's wrapper keeps its settings; the run's budget takes its place.
            wrapped = current.rebind(budget, agent=current.agent or agent)
        else:
            wrapped = BudgetedChatCompletionClient(current, budget, agent=agent)
        self._set(obj, attr, wrapped)


def _handoff_target(handoffs: Any, tool: Any) -> str | None:
    if isinstance(handoffs, Mapping):
        for handoff in handoffs.values():
            if getattr(handoff, "name", None) == getattr(tool, "name", None):
                target = getattr(handoff, "target", None)
                return str(target) if target is not None else None
    return None


async def _manager_of(team: Any) -> Any:
    """The team's group chat manager instance on its runtime, when it can be had."""
    runtime = getattr(team, "_runtime", None)
    get = getattr(runtime, "try_get_underlying_agent_instance", None)
    topic = getattr(team, "_group_chat_manager_topic_type", None)
    key = getattr(team, "_team_id", None)
    if get is None or not isinstance(topic, str) or not isinstance(key, str):
        return None
    from autogen_core import AgentId

    try:
        return await get(AgentId(topic, key))
    except (LookupError, TypeError, ValueError):
        return None  # not registered yet: the manager is built later, from the team's client
