"""One kickoff of a crew: its part of the budget tree, and what is open in it.

A run is opened by the crew's before-kickoff callback (``crew_config``) or by the global
execution-start hook (``instrument``), and finished by the execution-end hook, which
CrewAI dispatches whether the kickoff succeeded or raised. The tree it opens::

    <budget>/<crew>                     one child per kickoff (tool caps live here)
             /<agent role>              one per agent per kickoff (``per_agent``)
                          /<task>       one per task (``per_task``), closed when it ends
                                 /<coworker>   one per delegation (``per_agent``)

Which node a call is charged to travels in ContextVars, because CrewAI runs each
executor step, parallel tool call and async task in a copy of the caller's context.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from typing import Any

from allotment import Budget, BudgetExceeded, Hold, Limits, Spawn, resolve

from ._config import CrewBudget, no_budget
from ._errors import refusal
from ._flight import Flight, install_sink
from ._translate import budget_name, limits_for, same_role, task_label

log = logging.getLogger("allotment.crewai")

current_run: ContextVar[Run | None] = ContextVar("allotment_crewai_run", default=None)
current_delegation: ContextVar[Delegation | None] = ContextVar(
    "allotment_crewai_delegation", default=None
)
current_step: ContextVar[Step | None] = ContextVar("allotment_crewai_step", default=None)


class Step:
    """A task being executed by an agent (CrewAI's pre-step point), for calls whose hook
    context names no agent (the forced final answer after ``max_iter``)."""

    __slots__ = ("agent", "run", "task")

    def __init__(self, run: Run, agent: Any, task: Any) -> None:
        self.run = run
        self.agent = agent
        self.task = task


class Delegation:
    """A coworker running on a child budget carved from its delegator's."""

    __slots__ = ("child", "closing", "parent", "refusals", "role", "run")

    def __init__(self, run: Run, child: Budget, role: str, parent: Delegation | None) -> None:
        self.run = run
        self.child = child
        self.role = role
        self.parent = parent
        self.refusals: list[BudgetExceeded] = []
        """Refusals inside the delegate; those from above its child stop the crew."""
        self.closing: list[Callable[[], None]] = []

    def close(self) -> BudgetExceeded | None:
        """Close the child (its unspent escrow returns); returns a refusal made above the
        child, which must stop the crew rather than stay with the delegate."""
        for undo in reversed(self.closing):
            _quietly(undo)
        self.closing.clear()
        _quietly(self.child.close)
        for err in self.refusals:
            if not within(err.path, self.child.path):
                if self.parent is not None:
                    self.parent.refusals.append(err)
                return err
        return None


class PendingTool:
    """A tool call between its before and after hooks."""

    __slots__ = ("delegation", "hold", "refused", "run", "tool_input")

    def __init__(self, run: Run | None, tool_input: Any) -> None:
        self.run = run
        self.tool_input = tool_input  # kept so its id() is not reused while pending
        self.hold: Hold | None = None
        self.refused: BudgetExceeded | None = None
        self.delegation: Delegation | None = None


pending_tools: dict[int, PendingTool] = {}
"""Tool calls in progress, by the id of the ``tool_input`` dict both hooks share."""
pending_lock = threading.Lock()


class Run:
    """One kickoff's budget tree and its open flights, tools and delegations."""

    def __init__(self, config: CrewBudget, budget: Budget) -> None:
        self.config = config
        self.budget = budget
        self.crew: Any = None
        """The crew, or the executor of the one agent the run is for."""
        self.solo: Any = None
        """That agent, for a run of one agent outside a crew."""
        self.node: Budget | None = None
        self.members: dict[str, Budget] = {}
        self.tasks: dict[int, tuple[Any, Budget]] = {}
        self.flights: list[Flight] = []
        self.delegations: list[Delegation] = []
        self.finished = False
        self.lock = threading.RLock()
        self.closing: list[Callable[[], None]] = []
        self.steps: dict[int, Token[Step | None]] = {}

    def __repr__(self) -> str:
        where = self.node.path if self.node is not None else self.budget.path
        return f"<crew run {where!r}{' finished' if self.finished else ''}>"

    # -- the tree ----------------------------------------------------------------------

    def bind(self, crew: Any, *, agent: Any = None) -> None:
        """Open the run's node once the crew is known (CrewAI's input point). A run of
        one agent outside a crew (``Agent.kickoff``) is bound to its executor instead."""
        with self.lock:
            if self.crew is not None or self.finished:
                return
            self.crew = crew
            self.solo = agent
            name = (
                self.config.name
                or (getattr(agent, "role", None) if agent is not None else None)
                or getattr(crew, "name", None)
                or "crew"
            )
            caps = self.config.tools
            if caps:
                from crewai.utilities.string_utils import sanitize_tool_name

                caps = {sanitize_tool_name(tool): cap for tool, cap in caps.items()}
            spawn = Spawn(
                name=budget_name(name, "crew"),
                how="crew" if agent is None else "agent",
                framework="crewai",
                metadata={"crew": getattr(crew, "id", None), "process": _process(crew)},
            )
            try:
                node = self.budget.spawn(spawn, limits=Limits(per_tool=caps) if caps else None)
            except BudgetExceeded as err:
                raise refusal(err) from None
            self.node = node
            self.closing.append(_entered(node.activate()))

    @property
    def root(self) -> Budget:
        return self.node if self.node is not None else self.budget

    def node_for(self, agent: Any, task: Any) -> Budget:
        """Where a call by ``agent`` on ``task`` is charged."""
        delegation = current_delegation.get()
        if delegation is not None and delegation.run is self:
            return delegation.child
        if agent is None:
            step = current_step.get()
            if step is not None and step.run is self:
                agent, task = step.agent, step.task
        if agent is None or self.node is None or agent is self.solo:
            return self.root
        return self.member(agent, task)

    def member(self, agent: Any, task: Any) -> Budget:
        role = str(getattr(agent, "role", None) or "agent")
        with self.lock:
            node = self.members.get(role)
            if node is None:
                node = self._open(
                    self.root, role, "agent", self._agent_limits(role), {"role": role}
                )
                self.members[role] = node
            if task is None:
                return node
            known = self.tasks.get(id(task))
            if known is not None and not known[1].closed:
                return known[1]
            label = task_label(task, self._position(task))
            limits = limits_for(
                self.config.per_task,
                getattr(task, "name", None),
                getattr(task, "description", None),
            )
            child = self._open(node, label, "task", limits, {"role": role, "task": label})
            self.tasks[id(task)] = (task, child)
            return child

    def end_task(self, task: Any) -> None:
        """A task ended: its child closes and its unspent escrow returns now."""
        with self.lock:
            known = self.tasks.get(id(task))
        if known is not None:
            _quietly(known[1].close)

    def delegate(self, delegator: Budget, coworker: str, by: Any, tool: str) -> Delegation:
        """Open a coworker's child of ``delegator`` and make it current in this context."""
        role = self._coworker_role(coworker)
        parent = current_delegation.get()
        child = self._open(
            delegator,
            role,
            "delegation",
            self._agent_limits(role),
            {"delegator": getattr(by, "role", None), "tool": tool},
        )
        delegation = Delegation(
            self, child, role, parent if parent and parent.run is self else None
        )
        token = current_delegation.set(delegation)
        delegation.closing.append(lambda: reset(current_delegation, token))
        delegation.closing.append(_entered(child.activate()))
        with self.lock:
            self.delegations.append(delegation)
        return delegation

    def _open(
        self, parent: Budget, name: str, how: str, limits: object, metadata: dict[str, Any]
    ) -> Budget:
        spawn = Spawn(name=budget_name(name, how), how=how, framework="crewai", metadata=metadata)
        try:
            return parent.spawn(spawn, limits=limits)
        except BudgetExceeded as err:
            self.note(err)
            raise refusal(err) from None

    def _agent_limits(self, role: str) -> object:
        config = self.config.per_agent
        if role in config:
            return config[role]
        for name, limits in config.items():
            if same_role(name, role):
                return limits
        return None

    def _coworker_role(self, name: str) -> str:
        for agent in getattr(self.crew, "agents", None) or ():
            role = getattr(agent, "role", None)
            if isinstance(role, str) and same_role(role, name):
                return role
        return name

    def _position(self, task: Any) -> int | None:
        tasks = getattr(self.crew, "tasks", None) or ()
        for i, candidate in enumerate(tasks, 1):
            if candidate is task:
                return i
        return None

    # -- what is open ------------------------------------------------------------------

    def note(self, err: BudgetExceeded) -> None:
        """Remember a refusal made inside a delegation: it is judged when the delegation
        ends (kept with the delegate, or raised again to stop the crew)."""
        delegation = current_delegation.get()
        if delegation is not None and delegation.run is self:
            delegation.refusals.append(err)

    def add_flight(self, flight: Flight) -> None:
        with self.lock:
            self.flights = [f for f in self.flights if f.open]
            self.flights.append(flight)

    def close_flights(self, executor: Any) -> None:
        """End the open model calls of ``executor`` that no completion event ended (its
        LLM reported nothing): the executor moved on, so each call is over."""
        if executor is None:
            return
        with self.lock:
            stale = [f for f in self.flights if f.executor is executor and f.open]
        for flight in stale:
            flight.close()

    def finish(self) -> None:
        """End everything the run opened: open calls, tool holds, delegations, nodes."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
            flights, self.flights = self.flights, []
            delegations, self.delegations = self.delegations, []
        for flight in flights:
            flight.close()
        with pending_lock:
            mine = [k for k, p in pending_tools.items() if p.run is self]
            tools = [pending_tools.pop(k) for k in mine]
        for pending in tools:
            if pending.hold is not None and not pending.hold.ended:
                _quietly(pending.hold.release)
        for delegation in delegations:
            delegation.close()
        for undo in reversed(self.closing):
            _quietly(undo)
        self.closing.clear()
        if self.node is not None:
            _quietly(self.node.close)


def _entered(manager: AbstractContextManager[Any]) -> Callable[[], None]:
    """Enter ``manager`` now; returns how to leave it (kept alive until then, so that a
    generator-based manager is not closed by the garbage collector meanwhile)."""
    manager.__enter__()

    def leave() -> None:
        # From another context the ContextVar inside cannot be reset; it ends with that one.
        with contextlib.suppress(ValueError):
            manager.__exit__(None, None, None)

    return leave


def reset(var: ContextVar[Any], token: Token[Any]) -> None:
    """Undo a ``var.set`` (a no-op from another context: the value ends with that one)."""
    with contextlib.suppress(ValueError):
        var.reset(token)


def within(path: str, root: str) -> bool:
    """Whether budget ``path`` is ``root`` or below it."""
    return path == root or path.startswith(root + "/")


def _process(crew: Any) -> str | None:
    process = getattr(crew, "process", None)
    return getattr(process, "value", None) or (str(process) if process is not None else None)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("allotment: could not close part of a CrewAI run")


# -- opening and finishing runs ----------------------------------------------------------


def start(config: CrewBudget, crew: Any = None, *, agent: Any = None) -> Run:
    """Open a run for a kickoff starting in this context."""
    budget = resolve(config.budget)
    if budget is None:
        raise no_budget()
    from ._hooks import enter_scope

    run = Run(config, budget)
    token = current_run.set(run)
    closing: list[Callable[[], None]] = [lambda: reset(current_run, token)]
    scope = enter_scope()
    if scope is not None:
        closing.append(scope)
    sink = install_sink()
    if sink is not None:
        closing.append(sink)
    run.closing.extend(closing)
    if crew is not None:
        run.bind(crew, agent=agent)
    return run


def finish(crew: Any) -> None:
    """Finish the run of ``crew`` open in this context (its execution ended)."""
    run = current_run.get()
    if run is None or run.finished:
        return
    if run.crew is not None and crew is not None and run.crew is not crew:
        return
    run.finish()
