"""instrument(): every AutoGen model client in the process metered without wrapping,
classes defined later included, team runs budgeted; idempotent, and undone completely."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, ScriptedProvider, ToolCall
from allotment_autogen import BudgetedChatCompletionClient, BudgetMiddleware, instrument
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import BaseGroupChat, RoundRobinGroupChat
from autogen_agentchat.tools import AgentTool
from autogen_core import SingleThreadedAgentRuntime
from autogen_core.models import ChatCompletionClient, UserMessage
from autogen_ext.models.openai._openai_client import BaseOpenAIChatCompletionClient
from autogen_ext.models.replay import ReplayChatCompletionClient

HI = [UserMessage(content="hi", source="user")]
PRICES = {"fake-1": allotment.Price(input_mtok="10", output_mtok="30")}
TIMEOUT = 20.0


@pytest.fixture
def undo_all() -> Iterator[list[Any]]:
    """Undo whatever a test instrumented, even when it fails half-way."""
    undos: list[Any] = []
    yield undos
    for undo in reversed(undos):
        undo()


def clients_pristine() -> bool:
    """No client class is patched (the team patch is held by live budget wrappers too)."""
    return (
        not hasattr(vars(BaseOpenAIChatCompletionClient)["create"], "__allotment_original__")
        and not hasattr(vars(ReplayChatCompletionClient)["create"], "__allotment_original__")
        and not hasattr(
            vars(BaseOpenAIChatCompletionClient)["create_stream"], "__allotment_original__"
        )
        and "__init_subclass__" not in vars(ChatCompletionClient)
    )


def teams_pristine() -> bool:
    """The team patch is gone once nothing holds it (budget wrappers and middlewares hold
    it for as long as they live)."""
    gc.collect()
    return BaseGroupChat.run_stream.__module__ != "allotment_autogen._teams"


async def test_a_bare_client_is_metered_and_the_undo_removes_every_patch(
    provider: ScriptedProvider, openai_client: Any, undo_all: list[Any]
) -> None:
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="global")
    undo = instrument(budget)
    undo_all.append(undo)
    await client.create(HI)
    chunks = [c async for c in client.create_stream(HI)]
    assert provider.requests[-1].include_usage  # the stream was asked for usage
    assert chunks
    assert budget.spent.llm_calls == provider.calls == 2
    billed = provider.billed_usage
    assert (budget.spent.input_tokens, budget.spent.output_tokens) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    undo()
    undo()  # a second undo is a no-op
    assert clients_pristine()
    assert teams_pristine()
    await client.create(HI)
    assert budget.spent.llm_calls == 2
    assert provider.calls == 3


async def test_instrumenting_twice_meters_once_and_needs_both_undos(
    undo_all: list[Any],
) -> None:
    first = allotment.Budget(prices=PRICES, name="first")
    second = allotment.Budget(prices=PRICES, name="second")
    undo_first, undo_second = instrument(first), instrument(second)
    undo_all.extend([undo_first, undo_second])
    client = BudgetedChatCompletionClient(ReplayChatCompletionClient(["a", "b"]), model="fake-1")
    await client.create(HI)
    assert (first.spent.llm_calls, second.spent.llm_calls) == (0, 1)  # the latest default
    undo_second()
    assert not clients_pristine()
    await client.create(HI)
    assert (first.spent.llm_calls, second.spent.llm_calls) == (1, 1)
    undo_first()
    assert clients_pristine()


async def test_client_classes_defined_later_are_metered(undo_all: list[Any]) -> None:
    budget = allotment.Budget(name="later", unknown_price="allow")
    undo_all.append(instrument(budget))

    class Echo(ReplayChatCompletionClient):
        async def create(self, messages: Any, **kwargs: Any) -> Any:
            return await super().create(messages, **kwargs)

    await Echo(["one"]).create(HI)
    assert budget.spent.llm_calls == 1  # once, though Echo's create calls Replay's


async def test_without_a_budget_calls_pass_through_until_one_is_active(
    undo_all: list[Any],
) -> None:
    undo_all.append(instrument())
    client = ReplayChatCompletionClient(["a", "b"])
    await client.create(HI)
    budget = allotment.Budget(unknown_price="allow")
    with budget.activate():
        await client.create(HI)
    assert budget.spent.llm_calls == 1


async def test_team_runs_get_sub_agent_children_and_typed_refusals(
    provider: ScriptedProvider, openai_client: Any, undo_all: list[Any]
) -> None:
    def respond(request: Any) -> Reply:
        if request.tools and request.last_message.get("role") == "user":
            return Reply.tool_calls(ToolCall("researcher", {"task": "look"}))
        return Reply.text("found")

    provider.responder = respond
    client = openai_client(max_tokens=50)
    budget = allotment.Budget(usd="1.00", llm_calls=2, name="process")
    undo_all.append(instrument(budget))
    researcher = AssistantAgent("researcher", model_client=client)
    boss = AssistantAgent("boss", model_client=client, tools=[AgentTool(researcher)])
    team = RoundRobinGroupChat([boss], max_turns=1)
    await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    report = budget.report()
    assert report.find("process/researcher").closed  # the sub-agent's child
    assert report.spent.llm_calls == provider.calls == 2
    assert report.spent.tools == (("researcher", 1),)
    await team.reset()
    with pytest.raises(allotment.BudgetExceeded):  # typed, out of run()
        await asyncio.wait_for(team.run(task="Again."), TIMEOUT)
    assert budget.spent.llm_calls == provider.calls == 2
    assert boss._model_client is client


@pytest.mark.filterwarnings(
    # AutoGen warns on every RPC whose handler returns None once an intervention handler
    # is installed; GroupChatStart's handler returns None.
    "ignore:Intervention handler on_response returned None:RuntimeWarning"
)
async def test_with_the_middleware_on_the_runtime_calls_are_not_counted_twice(
    provider: ScriptedProvider, openai_client: Any, undo_all: list[Any]
) -> None:
    client = openai_client()
    budget = allotment.Budget(usd="1.00", name="both")
    undo_all.append(instrument(budget))
    rt = SingleThreadedAgentRuntime(intervention_handlers=[BudgetMiddleware(budget)])
    rt.start()
    team = RoundRobinGroupChat(
        [AssistantAgent("writer", model_client=client)], runtime=rt, max_turns=2
    )
    await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
    await rt.stop()
    assert budget.spent.llm_calls == provider.calls == 2
    assert budget.report().find("writer").spent.llm_calls == 2


def test_instrument_refuses_what_is_not_a_budget() -> None:
    with pytest.raises(allotment.ConfigurationError):
        instrument("0.10")  # type: ignore[arg-type]
