"""The CrewAI interception hooks: where each point of a kickoff meets its run.

Before a model call: reserve, or raise a refusal CrewAI lets through. After it: the
LLM's completion event has usually settled it already (see ``_flight``); the hook ends
what is left. Before a tool call: end the model call that asked for it, reserve the tool
call, and for a delegation open the coworker's child budget. After it: settle the tool,
close the delegation, and stop the crew if a refusal inside the delegate came from above
the delegate's own budget. Task steps mark which agent a hook-less call belongs to and
close the task's child when it ends.

The hooks are plain functions: registered in a kickoff's scoped hooks (``crew_config``)
or globally (``instrument``), possibly both; each acts once per hook context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from allotment import Budget, BudgetExceeded, resolve

from ._config import CrewBudget, starter_of
from ._errors import refusal
from ._flight import Flight, current_flight, install_sink
from ._run import (
    PendingTool,
    Step,
    current_run,
    current_step,
    finish,
    pending_lock,
    pending_tools,
    reset,
)
from ._run import start as start_run
from ._translate import coworker_of, llm_call, tool_call, tool_usage, was_blocked

_SEEN = "_allotment_seen"


def _first(ctx: Any) -> bool:
    """True the first time this hook context is seen (a hook may be registered both
    globally and in a kickoff's scope)."""
    if getattr(ctx, _SEEN, False):
        return False
    with contextlib.suppress(AttributeError, TypeError):
        setattr(ctx, _SEEN, True)
    return True


def _role(agent: Any) -> str | None:
    role = getattr(agent, "role", None)
    return role if isinstance(role, str) else None


def _task_name(task: Any) -> str | None:
    name = getattr(task, "name", None)
    return name if isinstance(name, str) else None


def _tool_schemas(executor: Any) -> list[Any] | None:
    """The tool schemas an executor sends with native tool calling (they are input too)."""
    state = getattr(executor, "state", None)
    if state is not None and getattr(state, "use_native_tools", False):
        tools = getattr(executor, "_openai_tools", None)
        if isinstance(tools, list):
            return tools
    return None


# -- model calls -------------------------------------------------------------------------


def before_model(ctx: Any) -> None:
    """``pre_model_call``: reserve the call on its budget, or refuse it."""
    if not _first(ctx):
        return
    run = current_run.get()
    executor = getattr(ctx, "executor", None)
    node: Budget | None
    if run is not None:
        run.close_flights(executor)
        node = run.node_for(getattr(ctx, "agent", None), getattr(ctx, "task", None))
    else:
        node = resolve(None)
        if node is None:
            return
        install_sink()  # outside a kickoff; inert once no call is in flight
    stale = current_flight.get()
    if stale is not None and stale.open:
        stale.close()
    call = llm_call(
        ctx.llm,
        ctx.messages,
        _tool_schemas(executor),
        agent=_role(getattr(ctx, "agent", None)),
        task=_task_name(getattr(ctx, "task", None)),
    )
    try:
        hold = node.reserve(call)
    except BudgetExceeded as err:
        if run is not None:
            run.note(err)
        raise refusal(err) from None
    except Exception as err:
        # CrewAI would swallow it and send the call unmetered: refuse instead.
        raise refusal(err) from None
    flight = Flight(hold, ctx.llm, executor)
    current_flight.set(flight)
    if run is not None:
        run.add_flight(flight)


def after_model(ctx: Any) -> None:
    """``post_model_call`` (text replies only): end the call if no event did."""
    if not _first(ctx):
        return
    flight = current_flight.get()
    if flight is not None and flight.open and flight.executor is getattr(ctx, "executor", None):
        flight.replied = True
        flight.close()


# -- tool calls --------------------------------------------------------------------------


def before_tool(ctx: Any) -> None:
    """``pre_tool_call``: reserve the tool call; a delegation opens the coworker's child."""
    if not _first(ctx):
        return
    run = current_run.get()
    node: Budget | None = resolve(None) if run is None else None
    if run is None and node is None:
        return
    agent = getattr(ctx, "agent", None)
    task = getattr(ctx, "task", None)
    tool_input = ctx.tool_input
    pending = PendingTool(run, tool_input)
    try:
        if run is not None:
            # The model call that asked for this tool is over (tool-call turns get no
            # after-model hook).
            run.close_flights(getattr(agent, "agent_executor", None))
            node = run.node_for(agent, task)
        assert node is not None
        call = tool_call(ctx.tool_name, agent=_role(agent), task=_task_name(task))
        try:
            pending.hold = node.reserve(call)
        except BudgetExceeded as err:
            if run is not None:
                run.note(err)
            raise
    except Exception as err:
        # CrewAI only blocks the tool for a refusal raised here; the after-hook raises it
        # again, to stop the crew.
        pending.refused = refusal(err)
        raise pending.refused from None
    finally:
        with pending_lock:
            pending_tools[id(tool_input)] = pending
    coworker = coworker_of(ctx.tool_name, tool_input) if run is not None else None
    if coworker is not None and run is not None:
        try:
            pending.delegation = run.delegate(node, coworker, agent, ctx.tool_name)
        except BudgetExceeded as err:
            pending.hold.release()
            pending.hold = None
            pending.refused = refusal(err)
            raise pending.refused from None


def after_tool(ctx: Any) -> None:
    """``post_tool_call``: settle the tool call and close a delegation; raise a refusal
    that must stop the crew (CrewAI only blocks a tool whose before-hook refused)."""
    if not _first(ctx):
        return
    with pending_lock:
        pending = pending_tools.pop(id(ctx.tool_input), None)
    if pending is None:
        return
    above = None
    if pending.delegation is not None:
        above = pending.delegation.close()
        if pending.run is not None:
            with pending.run.lock:
                if pending.delegation in pending.run.delegations:
                    pending.run.delegations.remove(pending.delegation)
    hold = pending.hold
    if hold is not None and not hold.ended:
        if was_blocked(getattr(ctx, "tool_result", None)):
            hold.release()  # another hook blocked it: it never ran
        else:
            hold.settle(tool_usage(ctx.tool_name))
    if pending.refused is not None:
        raise pending.refused
    if above is not None:
        raise refusal(above)


# -- steps and the execution boundary -----------------------------------------------------


def before_step(ctx: Any) -> None:
    """``pre_step``: a task starts; hook contexts without an agent belong to it."""
    if not _first(ctx) or getattr(ctx, "kind", None) != "task":
        return
    run = current_run.get()
    if run is not None and ctx.task is not None:
        run.steps[id(ctx.task)] = current_step.set(Step(run, ctx.agent, ctx.task))


def after_step(ctx: Any) -> None:
    """``post_step``: a task ended; its child closes and its unspent escrow returns."""
    if not _first(ctx) or getattr(ctx, "kind", None) != "task":
        return
    run = current_run.get()
    if run is not None and ctx.task is not None:
        run.end_task(ctx.task)
        token = run.steps.pop(id(ctx.task), None)
        if token is not None:
            reset(current_step, token)


def on_start(ctx: Any) -> None:
    """``execution_start`` (``instrument`` only): open a run, charged to the current
    budget, for a crew that has no ``crew_config`` of its own, or for ``Agent.kickoff()``
    outside a crew (its executor is the flow that starts)."""
    if not _first(ctx) or resolve(None) is None:
        return
    crew = getattr(ctx, "crew", None)
    if crew is not None:
        if starter_of(getattr(crew, "before_kickoff_callbacks", None)) is None:
            start_run(CrewBudget(), crew)
        return
    flow = getattr(ctx, "flow", None)
    agent = _solo_agent(flow)
    if agent is not None:
        start_run(CrewBudget(), flow, agent=agent)


def _solo_agent(flow: Any) -> Any:
    """The agent whose ``kickoff()`` runs ``flow``, if it is such an executor."""
    from crewai.agents.agent_executor import AgentExecutor

    if isinstance(flow, AgentExecutor) and flow.crew is None:
        return flow.agent
    return None


def on_input(ctx: Any) -> None:
    """``input``: the crew is known now; open its run's node."""
    if not _first(ctx):
        return
    run = current_run.get()
    crew = getattr(ctx, "crew", None)
    if run is not None and crew is not None and run.crew is None:
        run.bind(crew)


def on_end(ctx: Any) -> None:
    """``execution_end`` (dispatched on success and failure): finish the crew's run."""
    if not _first(ctx):
        return
    owner = getattr(ctx, "crew", None) or getattr(ctx, "flow", None)
    if owner is not None:
        finish(owner)


# -- registration ---------------------------------------------------------------------------


def table() -> dict[Any, Callable[[Any], None]]:
    """Each interception point with its hook."""
    from crewai.hooks.dispatch import InterceptionPoint as P

    return {
        P.EXECUTION_START: on_start,
        P.INPUT: on_input,
        P.EXECUTION_END: on_end,
        P.PRE_MODEL_CALL: before_model,
        P.POST_MODEL_CALL: after_model,
        P.PRE_TOOL_CALL: before_tool,
        P.POST_TOOL_CALL: after_tool,
        P.PRE_STEP: before_step,
        P.POST_STEP: after_step,
    }


def enter_scope() -> Callable[[], None] | None:
    """Add the hooks to this context's scoped hooks for the rest of a kickoff (keeping
    any scoped hooks already there); returns how to leave. ``None`` if they are there.

    Scoped hooks are read at each call, so they reach agents built before the crew was
    configured; global hooks are copied into each executor when it is built.
    """
    from crewai.hooks.dispatch import InterceptionPoint, get_scoped_hooks, scoped_hooks

    if before_model in get_scoped_hooks(InterceptionPoint.PRE_MODEL_CALL):
        return None
    hooks = table()
    hooks.pop(InterceptionPoint.EXECUTION_START)  # the kickoff has started
    scope = {
        point: [*get_scoped_hooks(point), *([hooks[point]] if point in hooks else [])]
        for point in InterceptionPoint
    }
    manager = scoped_hooks(scope)
    manager.__enter__()

    def leave() -> None:
        # From a different context the scope cannot be reset; it ends with that context.
        with contextlib.suppress(ValueError):
            manager.__exit__(None, None, None)

    return leave


def register_global() -> Callable[[], None]:
    """Register every hook globally; returns the undo."""
    from crewai.hooks.dispatch import register, unregister

    hooks = table()
    for point, hook in hooks.items():
        register(point, hook)

    def undo() -> None:
        for point, hook in hooks.items():
            unregister(point, hook)

    return undo
