"""BudgetMiddleware on a SingleThreadedAgentRuntime: whole teams budgeted, with the ledger
equal to the provider's own request log (speaker selection included), per-agent caps,
typed refusals out of team.run(), and nothing left held or patched after a run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, Request, ScriptedProvider
from allotment_autogen import BudgetedChatCompletionClient, BudgetMiddleware
from autogen_agentchat.agents import AssistantAgent, SocietyOfMindAgent
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.teams import (
    DiGraphBuilder,
    GraphFlow,
    RoundRobinGroupChat,
    SelectorGroupChat,
    Swarm,
)
from autogen_core import CancellationToken, SingleThreadedAgentRuntime

# AutoGen warns on every RPC whose handler returns None (GroupChatStart's does) as soon as
# any intervention handler is installed; the middleware cannot change that return value.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Intervention handler on_response returned None:RuntimeWarning"
)

SELECTOR = "You are in a role play game"
TIMEOUT = 20.0
PRICES = {"fake-1": allotment.Price(input_mtok="10", output_mtok="30")}


def routed(**replies: Callable[[Request], Reply]) -> Callable[[Request], Reply | None]:
    """A responder that answers by the system message's first words: ``writer=...``
    answers the agent whose system message is "You are writer."."""

    def respond(request: Request) -> Reply | None:
        first = request.messages[0].get("content", "") if request.messages else ""
        if isinstance(first, str) and first.startswith(SELECTOR) and "selector" in replies:
            return replies["selector"](request)
        for name, reply in replies.items():
            if isinstance(first, str) and first.startswith(f"You are {name}."):
                return reply(request)
        return None

    return respond


def says(text: str) -> Callable[[Request], Reply]:
    return lambda request: Reply.text(text)


def agent(name: str, client: Any, **kwargs: Any) -> AssistantAgent:
    return AssistantAgent(name, model_client=client, system_message=f"You are {name}.", **kwargs)


@asynccontextmanager
async def runtime(middleware: BudgetMiddleware) -> AsyncIterator[SingleThreadedAgentRuntime]:
    rt = SingleThreadedAgentRuntime(intervention_handlers=[middleware])
    rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


def assert_ledger_is_the_provider_log(budget: allotment.Budget, provider: ScriptedProvider) -> None:
    spent = budget.spent
    billed = provider.billed_usage
    assert spent.llm_calls == provider.calls == provider.attempts
    assert (spent.input_tokens, spent.output_tokens) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    assert not spent.estimated
    assert budget.report().open_holds == 0


async def test_a_round_robin_team_is_budgeted_per_agent_and_stopped_with_a_typed_error(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = routed(writer=says("draft"), critic=says("notes"))
    client = openai_client()
    budget = allotment.Budget(usd="1.00", llm_calls=10, name="team")
    middleware = BudgetMiddleware(budget, per_agent={"writer": {"llm_calls": 2}})
    writer, critic = agent("writer", client), agent("critic", client)
    async with runtime(middleware) as rt:
        team = RoundRobinGroupChat([writer, critic], runtime=rt)
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await asyncio.wait_for(team.run(task="Write a poem."), TIMEOUT)
    assert type(refused.value) is allotment.BudgetExceeded  # typed, not RuntimeError
    assert refused.value.path == "team/writer"
    assert refused.value.limit_name == "llm_calls"
    assert "agent cap" in str(refused.value)
    report = budget.report()
    assert report.find("writer").spent.llm_calls == 2
    assert report.find("critic").spent.llm_calls == 2
    assert report.find("writer").closed
    assert report.find("critic").closed
    assert_ledger_is_the_provider_log(budget, provider)
    # The run is over: the agents have their own clients back.
    assert writer._model_client is client
    assert critic._model_client is client


async def test_speaker_selection_calls_are_on_the_ledger_under_the_manager(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    turns = iter(["critic", "editor", "writer", "critic", "editor"] * 3)
    provider.responder = routed(
        selector=lambda request: Reply.text(next(turns)),
        writer=says("draft"),
        critic=says("notes"),
        editor=says("edits"),
    )
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="sel")
    agents: list[Any] = [
        agent(n, client, description=f"the {n}") for n in ("writer", "critic", "editor")
    ]
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = SelectorGroupChat(
            agents, model_client=client, runtime=rt, termination_condition=MaxMessageTermination(6)
        )
        result = await asyncio.wait_for(team.run(task="Write."), TIMEOUT)
    assert result.stop_reason is not None
    selector = budget.report().find("SelectorGroupChatManager")
    selections = sum(1 for r in provider.requests if r.messages[0]["content"].startswith(SELECTOR))
    assert selections >= 4
    assert selector.spent.llm_calls == selections
    assert_ledger_is_the_provider_log(budget, provider)
    assert team._model_client is client


async def test_a_society_of_mind_inner_team_runs_on_a_child_that_closes_after_it(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = routed(
        drafter=says("inner draft"),
        checker=says("inner check"),
    )
    provider.default = Reply.text("the society's answer")
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="run")
    inner = RoundRobinGroupChat(
        [agent("drafter", client), agent("checker", client)],
        termination_condition=MaxMessageTermination(3),
        name="inner",
    )
    society = SocietyOfMindAgent("society", team=inner, model_client=client)
    middleware = BudgetMiddleware(budget, children={"inner": "0.50"})
    async with runtime(middleware) as rt:
        team = RoundRobinGroupChat([society], runtime=rt, max_turns=1)
        await asyncio.wait_for(team.run(task="Think."), TIMEOUT)
    report = budget.report()
    child = report.find("run/society/inner")
    assert child.limits == {"usd": allotment.Budget(usd="0.50").limits.usd}
    assert child.closed
    assert child.spent.llm_calls == 2
    assert report.find("society").spent.llm_calls == 3  # and the society's own answer
    assert report.allotted_usd == 0  # the child's unspent escrow came back
    assert_ledger_is_the_provider_log(budget, provider)
    assert society._model_client is client


class Handoffs:
    """A plugin that records the handoffs it is told about, before each is reserved."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    @allotment.hookimpl
    def allotment_before_call(self, budget: allotment.Budget, call: allotment.Call) -> None:
        if "handoff" in call.metadata:
            self.seen.append((budget.path, call.metadata["handoff"]))


@pytest.fixture
def handoffs() -> Iterator[Handoffs]:
    plugin = Handoffs()
    allotment.plugins().register(plugin)
    try:
        yield plugin
    finally:
        allotment.plugins().unregister(plugin)


async def test_a_swarm_handoff_loop_is_metered_per_handoff_and_stopped_typed(
    provider: ScriptedProvider, openai_client: Any, handoffs: Handoffs
) -> None:
    provider.responder = routed(
        alice=lambda request: Reply.tool_call("transfer_to_bob"),
        bob=lambda request: Reply.tool_call("transfer_to_alice"),
    )
    client = openai_client()
    budget = allotment.Budget(usd="1.00", llm_calls=7, name="swarm")
    alice = agent("alice", client, handoffs=["bob"])
    bob = agent("bob", client, handoffs=["alice"])
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = Swarm([alice, bob], runtime=rt)
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await asyncio.wait_for(team.run(task="Loop."), TIMEOUT)
    assert refused.value.limit_name == "llm_calls"
    spent = budget.spent
    assert spent.llm_calls == 7
    # Each handoff is a tool call named after its handoff tool...
    assert dict(spent.tools) == {"transfer_to_bob": 4, "transfer_to_alice": 3}
    assert budget.report().find("alice").spent.tools == (("transfer_to_bob", 4),)
    # ...and plugins see who handed off to whom.
    assert handoffs.seen[:3] == [
        ("swarm/alice", {"source": "alice", "target": "bob"}),
        ("swarm/bob", {"source": "bob", "target": "alice"}),
        ("swarm/alice", {"source": "alice", "target": "bob"}),
    ]
    assert len(handoffs.seen) == 7
    assert_ledger_is_the_provider_log(budget, provider)


async def test_handoffs_can_be_capped_like_tools(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = routed(
        alice=lambda request: Reply.tool_call("transfer_to_bob"),
        bob=lambda request: Reply.tool_call("transfer_to_alice"),
    )
    client = openai_client()
    budget = allotment.Budget(usd="1.00", per_tool={"transfer_to_bob": 2}, name="swarm")
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = Swarm(
            [agent("alice", client, handoffs=["bob"]), agent("bob", client, handoffs=["alice"])],
            runtime=rt,
        )
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await asyncio.wait_for(team.run(task="Loop."), TIMEOUT)
    assert refused.value.limit_name == "tool:transfer_to_bob"
    assert dict(budget.spent.tools)["transfer_to_bob"] == 2
    assert_ledger_is_the_provider_log(budget, provider)


async def test_every_node_of_a_graph_flow_is_charged_to_its_own_child(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = routed(A=says("a"), B=says("b"), C=says("c"))
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="flow")
    a, b, c = agent("A", client), agent("B", client), agent("C", client)
    graph = DiGraphBuilder()
    graph.add_node(a).add_node(b).add_node(c)
    graph.add_edge(a, b).add_edge(a, c)  # B and C run at once after A
    async with runtime(BudgetMiddleware(budget, per_agent={"B": "0.10"})) as rt:
        flow = GraphFlow([a, b, c], graph=graph.build(), runtime=rt)
        await asyncio.wait_for(flow.run(task="Go."), TIMEOUT)
    report = budget.report()
    assert [report.find(n).spent.llm_calls for n in "ABC"] == [1, 1, 1]
    assert_ledger_is_the_provider_log(budget, provider)


async def test_a_budget_with_nothing_left_refuses_at_the_start_and_nothing_is_sent(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client()
    budget = allotment.Budget(usd="1.00", llm_calls=1, name="spent")
    await BudgetedChatCompletionClient(client, budget).create([])  # uses the one call
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = RoundRobinGroupChat([agent("writer", client)], runtime=rt)
        with pytest.raises(allotment.BudgetExceeded, match="was not started"):
            await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    assert provider.calls == 1
    assert budget.spent.llm_calls == 1


async def test_teams_on_their_own_runtime_raise_typed_refusals_from_run_and_run_stream(
    replay: Any,
) -> None:
    budget = allotment.Budget(llm_calls=2, prices=PRICES)
    client = BudgetedChatCompletionClient(replay(["a"] * 5), budget, model="fake-1")
    team = RoundRobinGroupChat([AssistantAgent("writer", model_client=client)])
    with pytest.raises(allotment.BudgetExceeded) as from_run:
        await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    assert type(from_run.value) is allotment.BudgetExceeded
    await team.reset()
    with pytest.raises(allotment.BudgetExceeded):
        async for _ in team.run_stream(task="Again."):
            pass
    replayed = client.inner.total_usage()
    assert budget.spent.llm_calls == 2
    assert (budget.spent.input_tokens, budget.spent.output_tokens) == (
        replayed.prompt_tokens,
        replayed.completion_tokens,
    )


async def test_a_cancelled_team_leaves_nothing_held_and_closes_its_children(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.default = Reply.text("slow", delay=5.0)
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="cancel")
    token = CancellationToken()
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = RoundRobinGroupChat([agent("writer", client)], runtime=rt)
        run = asyncio.ensure_future(team.run(task="Go.", cancellation_token=token))
        while provider.attempts == 0:
            await asyncio.sleep(0.01)
        token.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, TIMEOUT)
    report = budget.report()
    assert report.open_holds == 0
    assert report.find("writer").closed
    assert budget.spent.llm_calls == provider.attempts == 1  # sent, so charged (estimated)


async def test_a_user_wrapped_client_is_rebound_not_charged_twice(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = routed(writer=says("draft"))
    budget = allotment.Budget(usd="1.00", name="team")
    mine = BudgetedChatCompletionClient(openai_client(), budget, agent="my-writer")
    writer = agent("writer", mine)
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = RoundRobinGroupChat([writer], runtime=rt, max_turns=2)
        await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    assert budget.report().find("writer").spent.llm_calls == 2
    assert_ledger_is_the_provider_log(budget, provider)
    assert writer._model_client is mine


async def test_the_middleware_uses_the_active_budget_when_given_none(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="active")
    async with runtime(BudgetMiddleware()) as rt:
        team = RoundRobinGroupChat([agent("writer", client)], runtime=rt, max_turns=1)
        with budget.activate():
            await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
        with pytest.raises(allotment.ConfigurationError, match="no budget"):
            await asyncio.wait_for(team.run(task="Again."), TIMEOUT)
    assert budget.report().find("writer").spent.llm_calls == 1
    assert_ledger_is_the_provider_log(budget, provider)


async def test_a_team_runs_again_under_a_new_run_with_fresh_children(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="again")
    middleware = BudgetMiddleware(budget, per_agent={"writer": {"llm_calls": 1}})
    async with runtime(middleware) as rt:
        team = RoundRobinGroupChat([agent("writer", client)], runtime=rt, max_turns=1)
        await asyncio.wait_for(team.run(task="One."), TIMEOUT)
        await asyncio.wait_for(team.run(task="Two."), TIMEOUT)
    names = [r.path for _, r in budget.report().walk()]
    assert names == ["again", "again/writer", "again/writer#2"]
    assert_ledger_is_the_provider_log(budget, provider)


def test_bad_middleware_settings_fail_at_construction() -> None:
    with pytest.raises(allotment.InvalidAmount):
        BudgetMiddleware(allotment.Budget(), per_agent={"writer": {"llm_calls": -1}})
    with pytest.raises(allotment.ConfigurationError):
        BudgetMiddleware(allotment.Budget(), children=["writer"])  # type: ignore[arg-type]
    with pytest.raises(allotment.ConfigurationError):
        BudgetMiddleware("0.10")  # type: ignore[arg-type]


async def test_a_per_agent_dollar_cap_refuses_that_agent_while_the_team_has_money(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.responder = routed(writer=says("draft"), critic=says("notes"))
    client = openai_client(max_tokens=20)
    budget = allotment.Budget(usd="1.00", name="team")
    middleware = BudgetMiddleware(budget, per_agent={"critic": "0.00003"})
    async with runtime(middleware) as rt:
        team = RoundRobinGroupChat([agent("writer", client), agent("critic", client)], runtime=rt)
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    assert refused.value.path == "team/critic"
    assert refused.value.limit_name == "usd"
    critic = budget.report().find("critic").spent
    assert critic.usd is not None
    assert critic.usd <= Decimal("0.00003")
    assert budget.remaining.usd is not None
    assert budget.remaining.usd > Decimal("0.99")
    assert_ledger_is_the_provider_log(budget, provider)


async def test_a_refusal_at_the_first_speaker_selection_reaches_run_typed_without_a_hang(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    client = openai_client()
    budget = allotment.Budget(usd="0.000001", name="poor")  # not even one selection call
    agents: list[Any] = [agent(n, client, description=n) for n in ("writer", "critic", "editor")]
    async with runtime(BudgetMiddleware(budget)) as rt:
        team = SelectorGroupChat(agents, model_client=client, runtime=rt)
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    assert refused.value.path == "poor"  # the budget whose limit refused
    assert budget.report().find("SelectorGroupChatManager").refusals == 1  # the caller
    assert provider.attempts == 0
    assert budget.report().open_holds == 0
