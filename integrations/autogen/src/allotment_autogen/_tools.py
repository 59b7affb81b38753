"""Tool calls under a budget: workbench calls, sub-agents run as tools, and handoffs.

A workbench's ``call_tool`` (and ``call_tool_stream``) is replaced on the instance, so the
agent's own isinstance checks and streaming path stay as they were. A refused tool call
comes back to the model as an error result, as AutoGen's workbench does with a tool's
exception; the model then decides, and its next call is refused if the budget is out.
A refused handoff cannot come back as an error (AutoGen hands off whatever the tool
returns) nor raise (the agent would wait forever for its tool task): it ends the team
through a termination condition, and ``team.run()`` raises the refusal.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from decimal import Decimal
from typing import Any

import allotment

from ._meter import pick, reserve

Undo = Callable[[], None]


class SubAgent:
    """A tool that runs an agent or a team: each call gets its own child budget."""

    __slots__ = ("limits", "spawn")

    def __init__(self, spawn: allotment.Spawn, limits: object) -> None:
        self.spawn = spawn
        self.limits = limits

    def open(self, parent: allotment.Budget) -> allotment.Budget:
        from ._typed import remember

        try:
            return parent.spawn(self.spawn, limits=self.limits)
        except allotment.AllotmentError as err:
            raise remember(err) from None


def tool_call(name: str, agent: str | None, **metadata: Any) -> allotment.Call:
    """The kernel's description of one tool call."""
    return allotment.Call(kind="tool", tool_name=name, agent=agent, metadata=metadata)


def tool_usage(name: str) -> allotment.Usage:
    """What one tool call spent. Priced at $0 explicitly: a tool call has no token price,
    and an unpriced settle would turn the whole budget's dollar total into "unknown"."""
    return allotment.Usage(tool_calls=1, tools=((name, 1),), usd=Decimal(0))


def refused(name: str, error: BaseException) -> Any:
    """The error result AutoGen's workbench would give for a tool that raised ``error``."""
    from autogen_core.tools import TextResultContent, ToolResult

    return ToolResult(name=name, result=[TextResultContent(content=str(error))], is_error=True)


def undo_setting(obj: Any, attr: str, replacement: Any) -> Undo:
    """Undo for setting ``obj.attr = replacement`` on the instance; call it before setting."""
    had = attr in vars(obj)
    previous = vars(obj).get(attr)

    def undo() -> None:
        if vars(obj).get(attr) is not replacement:
            return  # someone replaced it after us; theirs stays
        if had:
            setattr(obj, attr, previous)
        else:
            delattr(obj, attr)

    return undo


def wrap_workbench(
    workbench: Any, budget: allotment.Budget, agent: str | None, subagents: Mapping[str, SubAgent]
) -> list[Undo]:
    """Meter every tool call of ``workbench`` on ``budget`` (or on the active sub-agent
    budget beneath it); tools in ``subagents`` run under a child budget per call."""
    undos: list[Undo] = []
    original_call = workbench.call_tool

    async def call_tool(
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: Any = None,
        call_id: str | None = None,
    ) -> Any:
        owner = pick(budget) or budget
        try:
            hold = await reserve(owner, tool_call(name, agent, call_id=call_id))
            child = _open(subagents.get(name), owner, hold)
        except allotment.AllotmentError as err:
            # Raising here would leave the agent waiting for its tool task forever.
            return refused(name, err)
        try:
            if child is None:
                return await original_call(name, arguments, cancellation_token, call_id)
            with child.activate():
                return await original_call(name, arguments, cancellation_token, call_id)
        finally:
            hold.settle(tool_usage(name))
            if child is not None:
                child.close()

    undos.append(undo_setting(workbench, "call_tool", call_tool))
    workbench.call_tool = call_tool

    original_stream = getattr(workbench, "call_tool_stream", None)
    if callable(original_stream):

        async def call_tool_stream(
            name: str,
            arguments: Mapping[str, Any] | None = None,
            cancellation_token: Any = None,
            call_id: str | None = None,
        ) -> AsyncGenerator[Any, None]:
            owner = pick(budget) or budget
            try:
                hold = await reserve(owner, tool_call(name, agent, call_id=call_id))
                child = _open(subagents.get(name), owner, hold)
            except allotment.AllotmentError as err:
                yield refused(name, err)
                return
            # The sub-agent runs inside this generator's steps, in its consumer's context
            # (a task AutoGen makes for this one tool call): the child stays active there
            # until the stream ends.
            active = child.activate() if child is not None else None
            if active is not None:
                active.__enter__()
            try:
                async for item in original_stream(name, arguments, cancellation_token, call_id):
                    yield item
            finally:
                if active is not None:
                    # A stream closed by the garbage collector runs this in another context.
                    with contextlib.suppress(ValueError):
                        active.__exit__(None, None, None)
                hold.settle(tool_usage(name))
                if child is not None:
                    child.close()

        undos.append(undo_setting(workbench, "call_tool_stream", call_tool_stream))
        workbench.call_tool_stream = call_tool_stream
    return undos


def _open(
    sub: SubAgent | None, owner: allotment.Budget, hold: allotment.Hold
) -> allotment.Budget | None:
    if sub is None:
        return None
    try:
        return sub.open(owner)
    except BaseException:
        hold.release()  # the tool never ran
        raise


def wrap_handoff(
    tool: Any,
    budget: allotment.Budget,
    agent: str | None,
    target: str | None,
    stop: Callable[[allotment.AllotmentError], None],
) -> Undo:
    """Meter a handoff tool as a tool call named after it (``transfer_to_<target>``), so
    handoffs show per name in reports and can be capped with ``per_tool``.

    It must not raise: AutoGen runs tool calls in a task whose failure leaves the agent
    waiting forever. A refused handoff calls ``stop`` (which ends the team before the
    target speaks, and makes ``team.run()`` raise the refusal) and tells the model why.
    """
    original = tool.run_json
    name = str(getattr(tool, "name", "handoff"))

    async def run_json(
        args: Mapping[str, Any], cancellation_token: Any, call_id: str | None = None
    ) -> Any:
        owner = pick(budget) or budget
        handoff = {"source": agent, "target": target}
        try:
            hold = await reserve(owner, tool_call(name, agent, handoff=handoff))
        except allotment.AllotmentError as err:
            stop(err)
            return str(err)
        try:
            return await original(args, cancellation_token, call_id=call_id)
        finally:
            hold.settle(tool_usage(name))

    undo = undo_setting(tool, "run_json", run_json)
    tool.run_json = run_json
    return undo
