"""``BudgetMiddleware``: one intervention handler that budgets every team on a runtime."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import allotment
from autogen_core import AgentId, DefaultInterventionHandler, DropMessage, MessageContext

from . import _teams
from ._bind import Binding, bound_within
from ._caps import check_caps
from ._meter import no_budget, pick
from ._typed import remember


class BudgetMiddleware(DefaultInterventionHandler):
    """Runtime middleware: ``SingleThreadedAgentRuntime(intervention_handlers=[mw])``.

    When a team on that runtime starts (its ``GroupChatStart``), the middleware binds the
    team to ``budget`` for the run: each participant gets a child budget named after it
    (capped by ``per_agent[name]``, caps that do not escrow, so they may add up to more
    than the team has), every model client of the team is wrapped in a
    ``BudgetedChatCompletionClient`` on that child (the agents', a selector's speaker
    selection, a society of mind's and its inner team's, sub-agents' behind agent and
    team tools), tool calls and Swarm handoffs are metered as tool calls, and sub-agents
    (``AgentTool``, ``TeamTool``, a society of mind's inner team) get a child per run
    through ``budget.spawn`` with ``children[name]`` as their limits (escrowed). When the
    run ends the team is restored and the children close, returning unspent escrow.

    A budget with nothing left refuses at the start (``team.run()`` raises it); a refusal
    mid-run stops the team and ``team.run()`` raises the typed ``BudgetExceeded``.

    Args:
        budget: the team's budget; ``None`` uses the active budget when a team starts.
        per_agent: caps per agent name: a ``Limits``, a dollar amount (``"0.10"``), or a
            mapping (``{"llm_calls": 2}``). The selector's name is its manager's,
            ``SelectorGroupChatManager`` unless renamed.
        children: limits per sub-agent name (the agent tool's or team tool's name, or a
            society of mind's inner team name); others ask the ``allotment_child_limits``
            hook, else share their parent's limits.
    """

    def __init__(
        self,
        budget: allotment.Budget | None = None,
        *,
        per_agent: Mapping[str, object] | None = None,
        children: Mapping[str, object] | None = None,
    ) -> None:
        if budget is not None and not isinstance(budget, allotment.Budget):
            raise allotment.ConfigurationError(
                f"budget must be an allotment.Budget or None, not {type(budget).__name__}"
            )
        now = budget.clock.now() if budget is not None else time.time()
        self._budget = budget
        self._per_agent = check_caps(per_agent, now=now)
        self._children = check_caps(children, now=now)
        _teams.hold_for(self)

    @property
    def budget(self) -> allotment.Budget | None:
        """The budget teams on this runtime charge (``None``: the active one)."""
        return self._budget

    async def on_send(
        self, message: Any, *, message_context: MessageContext, recipient: AgentId
    ) -> Any | type[DropMessage]:
        """Bind a team when its run starts; raising here reaches ``team.run()`` as is."""
        from autogen_agentchat.teams._group_chat._events import GroupChatStart

        if isinstance(message, GroupChatStart):
            await self._start(recipient)
        return message

    async def _start(self, recipient: AgentId) -> None:
        run = _teams.running(recipient.key)
        if run is None:
            raise remember(
                allotment.ConfigurationError(
                    f"BudgetMiddleware saw a team start ({recipient.type}) that it cannot "
                    f"find, so it cannot budget it; start teams with team.run() or "
                    f"team.run_stream()"
                )
            )
        if bound_within(run.team):
            return  # a nested team sharing this runtime: its outer team's binding covers it
        budget = pick(self._budget, run.active)
        if budget is None:
            raise no_budget(f"team {getattr(run.team, 'name', '')!r}")
        _preflight(budget, run.team)
        binding = Binding(per_agent=self._per_agent, children=self._children)
        try:
            await binding.team(run.team, budget)
        except BaseException:
            binding.close()
            raise
        run.on_end.append(binding.close)


def _preflight(budget: allotment.Budget, team: Any) -> None:
    """Refuse to start a team on a budget that cannot pay for one call."""
    name = getattr(team, "name", "")
    if budget.closed:
        raise remember(
            allotment.BudgetClosed(
                f"budget {budget.path!r} is closed; team {name!r} was not started",
                path=budget.path,
                limit_name="closed",
            )
        )
    left = budget.remaining
    for dim in ("usd", "llm_calls"):
        value = getattr(left, dim)
        if value is not None and value <= 0:
            raise remember(
                allotment.BudgetExceeded(
                    f"budget {budget.path!r} has no {dim} left; team {name!r} was not "
                    f"started and nothing was sent. Raise the limit, or give the team a "
                    f"larger share",
                    path=budget.path,
                    limit_name=dim,
                    limit=None,
                    spent=None,
                    held=None,
                    asked=None,
                )
            )
