"""Tool calls in a budgeted team: counted per tool, capped per tool, a refusal returned to
the model as an error result, and the next model call refused once the budget is out."""

from __future__ import annotations

import asyncio
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, Request, ScriptedProvider
from allotment_autogen import BudgetMiddleware
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core import SingleThreadedAgentRuntime

# AutoGen warns on every RPC whose handler returns None (GroupChatStart's does) as soon as
# any intervention handler is installed; the middleware cannot change that return value.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Intervention handler on_response returned None:RuntimeWarning"
)
TIMEOUT = 20.0


def assert_ledger_is_the_provider_log(budget: allotment.Budget, provider: ScriptedProvider) -> None:
    billed = provider.billed_usage
    assert budget.spent.llm_calls == provider.calls == provider.attempts
    assert (budget.spent.input_tokens, budget.spent.output_tokens) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    assert budget.report().open_holds == 0


def searcher(ran: list[str]) -> Any:
    async def search(query: str) -> str:
        """Search the web."""
        ran.append(query)
        return f"results for {query}"

    return search


async def run_team(budget: allotment.Budget, agent: AssistantAgent, **middleware: Any) -> Any:
    rt = SingleThreadedAgentRuntime(intervention_handlers=[BudgetMiddleware(budget, **middleware)])
    rt.start()
    try:
        team = RoundRobinGroupChat([agent], runtime=rt, max_turns=1)
        return await asyncio.wait_for(team.run(task="Find it."), TIMEOUT)
    finally:
        await rt.stop()


def tool_messages(request: Request) -> list[str]:
    return [str(m.get("content")) for m in request.messages if m.get("role") == "tool"]


async def test_tool_calls_are_counted_per_tool_on_the_agents_budget(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(
        Reply.tool_call("search", {"query": "a"}),
        Reply.tool_call("search", {"query": "b"}),
        Reply.text("done"),
    )
    ran: list[str] = []
    agent = AssistantAgent(
        "researcher", model_client=openai_client(), tools=[searcher(ran)], max_tool_iterations=3
    )
    budget = allotment.Budget(usd="1.00", name="tools")
    await run_team(budget, agent)
    assert ran == ["a", "b"]
    researcher = budget.report().find("researcher")
    assert researcher.spent.tool_calls == 2
    assert researcher.spent.tools == (("search", 2),)
    assert budget.spent.usd is not None  # tool calls are $0, not an unknown price
    assert budget.spent.llm_calls == 3
    assert_ledger_is_the_provider_log(budget, provider)


async def test_a_refused_tool_call_comes_back_to_the_model_as_an_error_result(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(
        Reply.tool_call("search", {"query": "a"}),
        Reply.tool_call("search", {"query": "b"}),
        Reply.text("I will stop searching."),
    )
    ran: list[str] = []
    agent = AssistantAgent(
        "researcher", model_client=openai_client(), tools=[searcher(ran)], max_tool_iterations=3
    )
    budget = allotment.Budget(usd="1.00", per_tool={"search": 1}, name="capped")
    result = await run_team(budget, agent)
    assert ran == ["a"]  # the second search never ran
    told = tool_messages(provider.requests[2])
    assert len(told) == 2
    assert "tool:search would exceed its limit" in told[1]
    assert result.messages[-1].content == "I will stop searching."
    assert budget.spent.tools == (("search", 1),)
    assert budget.report().find("researcher").refusals == 1
    assert budget.spent.llm_calls == 3
    assert_ledger_is_the_provider_log(budget, provider)


async def test_when_the_budget_is_out_the_next_model_call_is_refused(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(Reply.tool_call("search", {"query": "a"}), Reply.text("never sent"))
    ran: list[str] = []
    agent = AssistantAgent(
        "researcher", model_client=openai_client(), tools=[searcher(ran)], max_tool_iterations=2
    )
    budget = allotment.Budget(usd="1.00", llm_calls=1, name="out")
    with pytest.raises(allotment.BudgetExceeded) as refused:
        await run_team(budget, agent)
    assert refused.value.limit_name == "llm_calls"
    assert ran == ["a"]
    assert budget.spent.tool_calls == 1
    assert budget.spent.llm_calls == 1
    assert_ledger_is_the_provider_log(budget, provider)


async def test_a_tool_cap_per_agent_applies_to_that_agent_only(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(
        Reply.tool_call("search", {"query": "a"}),
        Reply.tool_call("search", {"query": "b"}),
        Reply.text("ok"),
    )
    ran: list[str] = []
    agent = AssistantAgent(
        "researcher", model_client=openai_client(), tools=[searcher(ran)], max_tool_iterations=3
    )
    budget = allotment.Budget(usd="1.00", name="agentcap")
    await run_team(budget, agent, per_agent={"researcher": {"tool_calls": 1}})
    assert ran == ["a"]
    assert "(an agent cap)" in tool_messages(provider.requests[2])[1]
    assert budget.report().find("researcher").spent.tool_calls == 1
    assert_ledger_is_the_provider_log(budget, provider)
