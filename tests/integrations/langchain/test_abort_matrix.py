"""A refusal stops every LangChain and LangGraph call path before the provider is reached."""

from __future__ import annotations

import asyncio
from typing import Any

import allotment
import pytest
from allotment_langchain import BudgetCallbackHandler, BudgetHardStop
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_fakes import PRICES, FakeChat, FakeProvider, fake_chat, no_open_holds, reply
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition


def exhausted() -> allotment.Budget:
    """A budget that admits no model call and no tool call."""
    return allotment.Budget(usd="0.001", tool_calls=0, name="run", prices=PRICES)


def assert_nothing_left(budget: allotment.Budget, handler: BudgetCallbackHandler) -> None:
    assert no_open_holds(budget)
    assert handler.open_runs == 0
    assert budget.spent.llm_calls == 0


def model() -> tuple[FakeChat, FakeProvider]:
    return fake_chat(default=reply("never sent"))


@tool
def lookup(q: str) -> str:
    """Look something up."""
    lookup_calls.append(q)
    return "found"


lookup_calls: list[str] = []


def agent(chat: FakeChat) -> Any:
    bound = chat.bind_tools([lookup])
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda s: {"messages": [bound.invoke(s["messages"])]})
    graph.add_node("tools", ToolNode([lookup]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile()


async def _anext_chunk(chat: FakeChat, config: Any) -> None:
    async for _ in chat.astream("hi", config=config):
        pass


async def _agent_ainvoke(chat: FakeChat, config: Any) -> None:
    await agent(chat).ainvoke({"messages": [HumanMessage("go")]}, config=config)


PATHS = {
    "invoke": lambda chat, config: chat.invoke("hi", config=config),
    "ainvoke": lambda chat, config: asyncio.run(chat.ainvoke("hi", config=config)),
    "stream": lambda chat, config: list(chat.stream("hi", config=config)),
    "astream": lambda chat, config: asyncio.run(_anext_chunk(chat, config)),
    "batch": lambda chat, config: chat.batch(["a", "b", "c"], config=config),
    "abatch": lambda chat, config: asyncio.run(chat.abatch(["a", "b"], config=config)),
    "generate": lambda chat, config: chat.generate(
        [[HumanMessage("a")], [HumanMessage("b")]], **config
    ),
    "langgraph invoke": lambda chat, config: agent(chat).invoke(
        {"messages": [HumanMessage("go")]}, config=config
    ),
    "langgraph stream": lambda chat, config: list(
        agent(chat).stream({"messages": [HumanMessage("go")]}, config=config)
    ),
    "langgraph ainvoke": lambda chat, config: asyncio.run(_agent_ainvoke(chat, config)),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("hard_stop", [False, True], ids=["refusal", "hard-stop"])
def test_a_refused_model_call_never_reaches_the_provider(path: str, hard_stop: bool) -> None:
    """On every call path, a model call the budget cannot cover raises (BudgetExceeded, or
    BudgetHardStop when asked) and the provider sees no request; nothing stays held."""
    budget = exhausted()
    handler = BudgetCallbackHandler(budget, hard_stop=hard_stop)
    chat, provider = model()
    expected = BudgetHardStop if hard_stop else allotment.BudgetExceeded
    with pytest.raises(expected) as caught:
        PATHS[path](chat, {"callbacks": [handler]})
    assert "usd would exceed its limit" in str(caught.value)
    assert provider.calls == 0
    assert_nothing_left(budget, handler)
    assert budget.report().refusals >= 1


def test_batch_admits_exactly_what_the_budget_covers_under_threads() -> None:
    """batch() runs prompts on threads: with room for one call, exactly one reaches the
    provider and the others are refused before sending."""
    budget = allotment.Budget(llm_calls=1, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat(default=reply("one"))
    results = chat.batch(
        ["a", "b", "c", "d"], config={"callbacks": [handler]}, return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, allotment.BudgetExceeded)]
    assert len(refused) == 3
    assert provider.calls == 1
    assert budget.spent.llm_calls == 1
    assert no_open_holds(budget)


def test_generate_releases_earlier_prompts_when_a_later_one_is_refused() -> None:
    """generate() starts every prompt before calling the model; when the second start is
    refused, the first prompt's hold is released (LangChain sends no error for it)."""
    budget = allotment.Budget(llm_calls=1, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat(default=reply("x"))
    with pytest.raises(allotment.BudgetExceeded):
        chat.generate([[HumanMessage("a")], [HumanMessage("b")]], callbacks=[handler])
    assert provider.calls == 0
    assert budget.held.llm_calls == 0
    assert no_open_holds(budget)
    assert handler.open_runs == 0


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_a_refused_tool_call_never_runs_the_tool(how: str) -> None:
    """A tool call over its limit raises before the tool's function runs."""
    budget = allotment.Budget(per_tool={"lookup": 1}, name="run")
    handler = BudgetCallbackHandler(budget)
    lookup_calls.clear()
    config: Any = {"callbacks": [handler]}
    lookup.invoke({"q": "first"}, config=config)
    again = (
        (lambda: lookup.invoke({"q": "second"}, config=config))
        if how == "invoke"
        else (lambda: asyncio.run(lookup.ainvoke({"q": "second"}, config=config)))
    )
    with pytest.raises(allotment.BudgetExceeded, match="tool:lookup"):
        again()
    assert lookup_calls == ["first"]
    assert budget.spent.tool_calls == 1
    assert dict(budget.spent.tools) == {"lookup": 1}
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_langgraph_agent_stops_before_the_call_that_would_overspend() -> None:
    """A LangGraph tool-calling loop runs until the budget refuses a model call: every
    admitted call reached the provider, the refused one did not, tools ran in between."""
    budget = allotment.Budget(llm_calls=3, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat(default=reply("", tool_calls=[("lookup", {"q": "again"})]))
    lookup_calls.clear()
    with pytest.raises(allotment.BudgetExceeded, match="llm_calls"):
        agent(chat).invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [handler]})
    assert provider.calls == 3
    assert budget.spent.llm_calls == 3
    assert len(lookup_calls) == 3
    assert budget.spent.tool_calls == 3
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_a_bare_generic_fake_chat_model_is_refused_under_a_dollar_cap() -> None:
    """LangChain's GenericFakeChatModel names no model, so no price is known: under a
    dollar cap the call is refused (fail closed) rather than counted as $0."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    budget = allotment.Budget(usd="1", name="run")
    handler = BudgetCallbackHandler(budget)
    chat = GenericFakeChatModel(messages=iter(["hello"]))
    with pytest.raises(allotment.UnknownPrice):
        chat.invoke("hi", config={"callbacks": [handler]})
    assert no_open_holds(budget)
