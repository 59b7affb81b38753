"""Sub-agents behind AgentTool and TeamTool: a child budget per call (limits from the
middleware's ``children`` or the child-limits hook), charged to the parent, closed when
the inner run ends, refused alone, and nothing held when the parent is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, Request, ScriptedProvider, ToolCall
from allotment_autogen import BudgetMiddleware
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_agentchat.tools import AgentTool, TeamTool
from autogen_core import CancellationToken, SingleThreadedAgentRuntime

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


def respond(request: Request) -> Reply:
    """The boss delegates (once); everyone else answers in text."""
    first = str(request.messages[0].get("content", ""))
    if first.startswith("You are boss.") and (request.last_message or {}).get("role") == "user":
        names = [t["function"]["name"] for t in request.tools]
        return Reply.tool_calls(*(ToolCall(n, {"task": "look it up"}) for n in names))
    return Reply.text("found it")


def agent(name: str, client: Any, **kwargs: Any) -> AssistantAgent:
    return AssistantAgent(name, model_client=client, system_message=f"You are {name}.", **kwargs)


async def run(
    budget: allotment.Budget,
    boss: AssistantAgent,
    token: CancellationToken | None = None,
    **middleware: Any,
) -> Any:
    rt = SingleThreadedAgentRuntime(intervention_handlers=[BudgetMiddleware(budget, **middleware)])
    rt.start()
    try:
        team = RoundRobinGroupChat([boss], runtime=rt, max_turns=1)
        return await asyncio.wait_for(team.run(task="Research.", cancellation_token=token), TIMEOUT)
    finally:
        await rt.stop()


@pytest.fixture
def scripted(provider: ScriptedProvider) -> ScriptedProvider:
    provider.responder = respond
    provider.default = None
    return provider


async def test_an_agent_tool_runs_on_a_child_budget_charged_to_its_caller(
    scripted: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client(max_tokens=100)
    researcher = agent("researcher", client)
    boss = agent("boss", client, tools=[AgentTool(researcher)])
    budget = allotment.Budget(usd="1.00", name="run")
    await run(budget, boss, children={"researcher": "0.30"})
    report = budget.report()
    child = report.find("run/boss/researcher")
    assert child.limits == {"usd": Decimal("0.30")}
    assert child.closed
    assert child.spent.llm_calls == 1
    assert report.allotted_usd == 0  # its unspent escrow came back
    assert report.find("boss").spent.llm_calls == 2  # its own call and the sub-agent's
    assert report.find("boss").spent.tools == (("researcher", 1),)
    assert budget.spent.llm_calls == 2
    assert_ledger_is_the_provider_log(budget, scripted)
    assert researcher._model_client is client


async def test_a_sub_agent_over_its_own_limit_is_refused_alone(
    scripted: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client(max_tokens=100)
    researcher = agent("researcher", client)
    boss = agent("boss", client, tools=[AgentTool(researcher)])
    budget = allotment.Budget(usd="1.00", name="run")
    result = await run(budget, boss, children={"researcher": {"llm_calls": 0}})
    child = budget.report().find("run/boss/researcher")
    assert child.refusals == 1
    assert child.spent.llm_calls == 0
    # The boss was told, as a tool error, and its run finished normally.
    assert "run/boss/researcher" in result.messages[-1].content
    assert budget.spent.llm_calls == 1
    assert_ledger_is_the_provider_log(budget, scripted)


async def test_parallel_agent_tools_get_separate_children(
    scripted: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client(max_tokens=100)
    tools = [AgentTool(agent(n, client)) for n in ("alpha", "beta", "gamma")]
    boss = agent("boss", client, tools=tools)
    budget = allotment.Budget(usd="1.00", name="fan")
    await run(budget, boss, children={n: "0.10" for n in ("alpha", "beta", "gamma")})
    report = budget.report()
    for name in ("alpha", "beta", "gamma"):
        child = report.find(f"fan/boss/{name}")
        assert child.closed
        assert child.spent.llm_calls == 1
    assert budget.spent.llm_calls == 4
    assert_ledger_is_the_provider_log(budget, scripted)


async def test_a_team_tool_runs_its_inner_team_on_a_child(
    scripted: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client(max_tokens=100)
    inner = RoundRobinGroupChat(
        [agent("drafter", client), agent("checker", client)],
        termination_condition=MaxMessageTermination(3),
        name="writers",
    )
    tool = TeamTool(inner, name="writers", description="A team that writes.")
    boss = agent("boss", client, tools=[tool])
    budget = allotment.Budget(usd="1.00", name="run")
    await run(budget, boss, children={"writers": "0.20"})
    child = budget.report().find("run/boss/writers")
    assert child.closed
    assert child.spent.llm_calls == 2
    assert budget.spent.llm_calls == 3
    assert_ledger_is_the_provider_log(budget, scripted)


class PolicyPlugin:
    """A child-limits policy: every agent tool gets 2 calls."""

    @allotment.hookimpl
    def allotment_child_limits(
        self, parent: allotment.Budget, spawn: allotment.Spawn
    ) -> allotment.Limits | None:
        if spawn.how == "agent_tool" and spawn.framework == "autogen":
            return allotment.Limits(llm_calls=2)
        return None


@pytest.fixture
def policy() -> Iterator[None]:
    plugin = PolicyPlugin()
    allotment.plugins().register(plugin)
    try:
        yield
    finally:
        allotment.plugins().unregister(plugin)


@pytest.mark.usefixtures("policy")
async def test_without_configured_limits_the_child_limits_hook_decides(
    scripted: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client(max_tokens=100)
    boss = agent("boss", client, tools=[AgentTool(agent("researcher", client))])
    budget = allotment.Budget(usd="1.00", name="run")
    await run(budget, boss)
    assert budget.report().find("run/boss/researcher").limits == {"llm_calls": 2}
    assert_ledger_is_the_provider_log(budget, scripted)


async def test_cancelling_the_parent_reaches_the_sub_agent_and_nothing_stays_held(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = lambda request: (
        respond(request)
        if str(request.messages[0].get("content", "")).startswith("You are boss.")
        else Reply.text("slow", delay=5.0)
    )
    client = openai_client(max_tokens=100)
    boss = agent("boss", client, tools=[AgentTool(agent("researcher", client))])
    budget = allotment.Budget(usd="1.00", name="run")
    token = CancellationToken()
    running = asyncio.ensure_future(run(budget, boss, token, children={"researcher": "0.30"}))
    while provider.attempts < 2:  # the sub-agent's request is with the provider
        await asyncio.sleep(0.01)
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    report = budget.report()
    assert report.open_holds == 0
    assert report.find("run/boss/researcher").closed
    assert report.allotted_usd == 0
    assert budget.spent.llm_calls == provider.attempts == 2
