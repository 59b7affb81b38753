"""Sub-agents get child budgets: an agent run as a tool, a LangGraph subgraph, a run named
in metadata. Their spend counts on every ancestor, their own limits stop them alone, and
their escrow returns when they end."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import allotment
import pytest
from allotment_langchain import METADATA_KEY, BudgetCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_fakes import PRICES, FakeChat, cost, fake_chat, no_open_holds, reply
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition


def react(chat: FakeChat, tools: list[Any], name: str, *, handle_errors: bool = False) -> Any:
    """A minimal ReAct agent: a model node and a ToolNode in a loop."""
    bound = chat.bind_tools(tools)
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda s: {"messages": [bound.invoke(s["messages"])]})
    graph.add_node("tools", ToolNode(tools, handle_tool_errors=handle_errors))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(name=name)


@tool
def search(q: str) -> str:
    """Search the web."""
    return "no results"


def researcher_tool(inner: Any) -> Any:
    @tool
    def researcher(question: str) -> str:
        """Ask the research agent."""
        result = inner.invoke({"messages": [HumanMessage(question)]})
        return str(result["messages"][-1].content)

    return researcher


def test_an_agent_used_as_a_tool_is_charged_to_its_own_child_budget() -> None:
    """The supervisor's researcher tool runs a whole agent: its calls are charged to the
    child "researcher", which counts on the supervisor's budget too; the child closes and
    its unspent escrow returns."""
    inner_chat, inner = fake_chat(
        [
            reply("", tool_calls=[("search", {"q": "x"})], input_tokens=100, output_tokens=20),
            reply("found it", input_tokens=200, output_tokens=20),
        ]
    )
    research = react(inner_chat, [search], "research_agent")
    sup_chat, sup = fake_chat(
        [
            reply(
                "",
                tool_calls=[("researcher", {"question": "why"})],
                input_tokens=50,
                output_tokens=10,
            ),
            reply("done", input_tokens=80, output_tokens=10),
        ]
    )
    supervisor = react(sup_chat, [researcher_tool(research)], "supervisor")
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"researcher": "0.10"})
    out = supervisor.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [handler]})
    assert out["messages"][-1].content == "done"
    report = budget.report()
    child = report.find("researcher")
    assert child.path == "run/researcher"
    assert child.closed
    assert child.limits == {"usd": Decimal("0.10")}
    assert child.spent.llm_calls == 2
    assert child.spent.tool_calls == 1
    assert child.spent.usd == cost(100, 20) + cost(200, 20)
    assert report.spent.llm_calls == 4
    assert report.spent.usd == child.spent.usd + cost(50, 10) + cost(80, 10)
    assert report.allotted_usd == 0  # the escrow came back when the child closed
    assert (inner.calls, sup.calls) == (2, 2)
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_parallel_sub_agents_get_separate_children_and_are_refused_alone() -> None:
    """Two researcher calls run at once (ToolNode runs them on threads): each gets its own
    child; each is stopped by its own call limit, and the supervisor carries on."""
    both_running = threading.Barrier(2, timeout=5)

    def looping(messages: list[Any]) -> AIMessage:
        if len(messages) == 1:  # each sub-agent's first call waits for the other's
            both_running.wait()
        return reply(
            "", tool_calls=[("search", {"q": "again"})], input_tokens=100, output_tokens=10
        )

    inner_chat, inner = fake_chat(looping)
    research = react(inner_chat, [search], "research_agent")
    sup_chat, sup = fake_chat(
        [
            reply(
                "",
                tool_calls=[("researcher", {"question": "a"}), ("researcher", {"question": "b"})],
                input_tokens=50,
                output_tokens=10,
            ),
            reply("summary", input_tokens=50, output_tokens=10),
        ]
    )
    supervisor = react(sup_chat, [researcher_tool(research)], "supervisor", handle_errors=True)
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"researcher": {"llm_calls": 3}})
    out = supervisor.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [handler]})
    assert out["messages"][-1].content == "summary"
    children = budget.report().children
    assert sorted(c.path for c in children) == ["run/researcher", "run/researcher#2"]
    for child in children:
        assert child.spent.llm_calls == 3
        assert child.refusals == 1
        assert child.closed
    assert {r.path for r in handler.refusals} == {"run/researcher", "run/researcher#2"}
    assert inner.calls == 6
    assert budget.spent.llm_calls == inner.calls + sup.calls
    assert no_open_holds(budget)


def subgraph_parent(inner_chat: FakeChat, name: str | None) -> Any:
    sub = StateGraph(MessagesState)
    sub.add_node("think", lambda s: {"messages": [inner_chat.invoke(s["messages"])]})
    sub.add_edge(START, "think")
    sub.add_edge("think", END)
    compiled = sub.compile(name=name) if name else sub.compile()
    top_chat, _ = fake_chat(default=reply("top", input_tokens=10, output_tokens=5))
    top = StateGraph(MessagesState)
    top.add_node("plan", lambda s: {"messages": [top_chat.invoke(s["messages"])]})
    top.add_node("research", compiled)
    top.add_edge(START, "plan")
    top.add_edge("plan", "research")
    top.add_edge("research", END)
    return top.compile()


@pytest.mark.parametrize(("graph_name", "child"), [("analyst", "analyst"), (None, "research")])
def test_a_subgraph_node_is_charged_to_a_child_named_after_it(
    graph_name: str | None, child: str
) -> None:
    """A compiled graph added as a node runs one namespace deeper: its calls go to a child
    named after the subgraph (compile(name=...)), else after the node that runs it."""
    inner_chat, _ = fake_chat(default=reply("inner", input_tokens=20, output_tokens=5))
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    subgraph_parent(inner_chat, graph_name).invoke(
        {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
    )
    report = budget.report()
    node = report.find(child)
    assert node.path == f"run/{child}"
    assert node.spent.llm_calls == 1
    assert node.spent.usd == cost(20, 5)
    assert node.closed
    assert report.spent.llm_calls == 2
    assert len(report.children) == 1
    assert no_open_holds(budget)


def test_a_subgraph_over_its_limit_is_refused_while_its_parent_has_money() -> None:
    """children limits apply to subgraphs too: the subgraph's call is refused, though the
    parent budget could pay for it."""
    inner_chat, inner = fake_chat(default=reply("inner"))
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"analyst": {"llm_calls": 0}})
    with pytest.raises(allotment.BudgetExceeded, match="run/analyst"):
        subgraph_parent(inner_chat, "analyst").invoke(
            {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
        )
    assert inner.calls == 0
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_metadata_names_a_sub_agent_explicitly_with_its_limits() -> None:
    """Run metadata {"allotment": {"agent": ..., "limits": ...}} opens a child for that run
    and everything under it; nested runs inheriting the metadata share it."""
    chat, _ = fake_chat(default=reply("x", input_tokens=100, output_tokens=10))
    chain = chat | (lambda m: m.content) | chat
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    config: Any = {
        "callbacks": [handler],
        "metadata": {METADATA_KEY: {"agent": "summarizer", "limits": {"usd": "0.05"}}},
    }
    chain.invoke("go", config=config)
    report = budget.report()
    assert [c.path for c in report.children] == ["run/summarizer"]
    child = report.children[0]
    assert child.spent.llm_calls == 2
    assert child.limits == {"usd": Decimal("0.05")}
    assert child.closed
    assert no_open_holds(budget)


def test_child_limits_come_from_the_plugin_hook_when_not_configured() -> None:
    """Without children[name], the allotment_child_limits hook chooses the limits, and is
    told what was detected (name, how, framework)."""
    seen: list[allotment.Spawn] = []

    class Policy:
        @allotment.hookimpl
        def allotment_child_limits(
            self, parent: allotment.Budget, spawn: allotment.Spawn
        ) -> allotment.Limits | None:
            seen.append(spawn)
            return allotment.Limits(llm_calls=0)

    policy = Policy()
    allotment.plugins().register(policy)
    try:
        inner_chat, inner = fake_chat(default=reply("never"))
        budget = allotment.Budget(usd="1", name="run", prices=PRICES)
        with pytest.raises(allotment.BudgetExceeded, match="run/analyst"):
            subgraph_parent(inner_chat, "analyst").invoke(
                {"messages": [HumanMessage("go")]},
                config={"callbacks": [BudgetCallbackHandler(budget)]},
            )
    finally:
        allotment.plugins().unregister(policy)
    assert [(s.name, s.how, s.framework) for s in seen] == [("analyst", "subgraph", "langchain")]
    assert inner.calls == 0


def test_a_sub_agent_whose_escrow_does_not_fit_is_refused_before_it_starts() -> None:
    """Opening a child with more escrow than the parent has left is a refusal: the
    sub-agent never runs."""
    inner_chat, inner = fake_chat(default=reply("never"))
    budget = allotment.Budget(usd="0.05", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"analyst": "0.50"})
    with pytest.raises(allotment.BudgetExceeded, match="allotting 'analyst'"):
        subgraph_parent(inner_chat, "analyst").invoke(
            {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
        )
    assert inner.calls == 0
    assert no_open_holds(budget)


def test_children_limits_are_checked_when_the_handler_is_made() -> None:
    """A malformed limit fails at construction with a typed error, not mid-run."""
    with pytest.raises(allotment.InvalidAmount):
        BudgetCallbackHandler(children={"researcher": "ten cents"})
    with pytest.raises(allotment.ConfigurationError):
        BudgetCallbackHandler(children=["researcher"])  # type: ignore[arg-type]
