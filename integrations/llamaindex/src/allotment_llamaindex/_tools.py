"""Tool calls of workflow agents, counted and capped.

LlamaIndex 0.14 fires no ``CBEventType.FUNCTION_CALL`` event: FunctionAgent, ReActAgent,
CodeActAgent and AgentWorkflow run tools through their ``_call_tool`` method, which turns
any ``Exception`` the tool raises into an error output the agent reads and goes on from.
Wrapping that method puts the reservation outside that ``try``: a refused tool call stops
the run with ``BudgetExceeded`` instead of becoming one more message to the model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ._handler import BudgetCallbackHandler

CallTool = Callable[[Any, Any, Any, dict[str, Any]], Awaitable[Any]]

HANDOFF = "handoff"
"""AgentWorkflow's own tool for passing control to another agent: not a tool anyone pays
for, and never counted."""


def budgeted(original: CallTool, handler: Callable[[], BudgetCallbackHandler | None]) -> CallTool:
    """``original`` (a ``_call_tool`` method) with each tool call reserved first."""

    async def _call_tool(self: Any, ctx: Any, tool: Any, tool_input: dict[str, Any]) -> Any:
        active = handler()
        name = tool.metadata.get_name()
        if active is None or name == HANDOFF:
            return await original(self, ctx, tool, tool_input)
        hold = active.reserve_tool(name)
        if hold is None:
            return await original(self, ctx, tool, tool_input)
        try:
            output = await original(self, ctx, tool, tool_input)
        except BaseException:
            # Only a pause for an external event or a cancellation gets here (the original
            # turns tool errors into outputs): the call did not complete.
            hold.release()
            raise
        active.settle_tool(hold, name)
        return output

    _call_tool.__wrapped__ = original  # type: ignore[attr-defined]
    _call_tool.__qualname__ = getattr(original, "__qualname__", "_call_tool")
    return _call_tool
