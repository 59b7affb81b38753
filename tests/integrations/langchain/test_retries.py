"""A refusal is neither retried into a loop nor hidden: what with_retry(), LangGraph's
RetryPolicy and ToolNode do with it, by default and with hard_stop=True."""

from __future__ import annotations

from typing import Any

import allotment
import pytest
from allotment_langchain import BudgetCallbackHandler, BudgetHardStop
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_fakes import PRICES, FakeChat, fake_chat, no_open_holds, reply
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import RetryPolicy

runs: list[str] = []


@tool
def fetch(url: str) -> str:
    """Fetch a page."""
    runs.append(url)
    return "page"


def agent(chat: FakeChat, *, handle_errors: bool, retry: RetryPolicy | None = None) -> Any:
    bound = chat.bind_tools([fetch])
    graph = StateGraph(MessagesState)
    graph.add_node(
        "agent", lambda s: {"messages": [bound.invoke(s["messages"])]}, retry_policy=retry
    )
    graph.add_node("tools", ToolNode([fetch], handle_tool_errors=handle_errors))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile()


def fetching_model() -> tuple[FakeChat, Any]:
    return fake_chat(
        default=reply("", tool_calls=[("fetch", {"url": "u"})], input_tokens=10, output_tokens=5)
    )


def test_with_retry_refires_the_start_but_every_attempt_is_refused_before_sending() -> None:
    """with_retry() retries any Exception, BudgetExceeded included: each attempt calls
    on_chat_model_start again and is refused there, so the provider gets nothing and the
    refusal still comes out after the last attempt."""
    budget = allotment.Budget(llm_calls=0, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat(default=reply("x"))
    with pytest.raises(allotment.BudgetExceeded):
        chat.with_retry(stop_after_attempt=4, wait_exponential_jitter=False).invoke(
            "hi", config={"callbacks": [handler]}
        )
    assert provider.calls == 0
    assert len(handler.refusals) == 4
    assert no_open_holds(budget)


def test_with_retry_stops_at_the_first_refusal_with_hard_stop() -> None:
    """BudgetHardStop is not an Exception, so with_retry() does not retry it."""
    budget = allotment.Budget(llm_calls=0, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, hard_stop=True)
    chat, provider = fake_chat(default=reply("x"))
    with pytest.raises(BudgetHardStop) as caught:
        chat.with_retry(stop_after_attempt=4, wait_exponential_jitter=False).invoke(
            "hi", config={"callbacks": [handler]}
        )
    assert isinstance(caught.value.error, allotment.BudgetExceeded)
    assert caught.value.limit_name == "llm_calls"
    assert len(handler.refusals) == 1
    assert provider.calls == 0


def test_langgraph_retry_policy_does_not_retry_a_refusal() -> None:
    """LangGraph's default RetryPolicy skips RuntimeError, which BudgetExceeded is."""
    budget = allotment.Budget(llm_calls=0, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat(default=reply("x"))
    graph = agent(
        chat, handle_errors=False, retry=RetryPolicy(max_attempts=5, initial_interval=0.001)
    )
    with pytest.raises(allotment.BudgetExceeded):
        graph.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [handler]})
    assert len(handler.refusals) == 1
    assert budget.report().refusals == 1
    assert provider.calls == 0


def test_tool_node_re_raises_a_tool_refusal_by_default() -> None:
    """ToolNode's default error handling only handles invalid tool arguments: a refused
    tool call ends the graph run with the refusal."""
    runs.clear()
    budget = allotment.Budget(per_tool={"fetch": 1}, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fetching_model()
    with pytest.raises(allotment.BudgetExceeded, match="tool:fetch"):
        agent(chat, handle_errors=False).invoke(
            {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
        )
    assert runs == ["u"]
    assert provider.calls == 2
    assert no_open_holds(budget)


def test_a_refusal_tool_node_hides_still_refuses_the_next_model_call() -> None:
    """ToolNode(handle_tool_errors=True) turns the refused tool call into an error
    ToolMessage and the agent carries on; the refusal is remembered for the run, so the
    next model call is refused and the run ends typed."""
    runs.clear()
    budget = allotment.Budget(per_tool={"fetch": 1}, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fetching_model()
    with pytest.raises(allotment.BudgetExceeded, match="Refused again") as caught:
        agent(chat, handle_errors=True).invoke(
            {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
        )
    assert caught.value.limit_name == "tool:fetch"
    assert runs == ["u"]
    # call 1 -> fetch runs; call 2 -> fetch refused, ToolNode makes it a message; the
    # call that would have sent that message to the model is refused.
    assert provider.calls == 2
    assert [r.limit_name for r in handler.refusals] == ["tool:fetch", "tool:fetch"]
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_hard_stop_passes_through_tool_node_error_handling() -> None:
    """With hard_stop=True the refused tool call is not turned into a message at all."""
    runs.clear()
    budget = allotment.Budget(per_tool={"fetch": 1}, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, hard_stop=True)
    chat, provider = fetching_model()
    with pytest.raises(BudgetHardStop):
        agent(chat, handle_errors=True).invoke(
            {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
        )
    assert provider.calls == 2
    assert runs == ["u"]
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_a_remembered_refusal_ends_with_its_top_level_run() -> None:
    """The refusal sticks for the run that met it, not forever: a new top-level run on the
    same budget is admitted again if the budget has room."""
    runs.clear()
    budget = allotment.Budget(per_tool={"fetch": 1}, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, _ = fetching_model()
    with pytest.raises(allotment.BudgetExceeded):
        agent(chat, handle_errors=True).invoke(
            {"messages": [HumanMessage("go")]}, config={"callbacks": [handler]}
        )
    answer, _ = fake_chat(default=reply("fine"))
    assert answer.invoke("new run", config={"callbacks": [handler]}).content == "fine"


def supervisor_with(helper: Any) -> tuple[Any, Any]:
    sup, sup_provider = fake_chat(
        [reply("", tool_calls=[("helper", {"task": "t"})]), reply("finished anyway")]
    )
    bound = sup.bind_tools([helper])
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda s: {"messages": [bound.invoke(s["messages"])]})
    graph.add_node("tools", ToolNode([helper], handle_tool_errors=True))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(), sup_provider


def test_a_sub_agents_refusal_stays_with_the_sub_agent() -> None:
    """When a sub-agent's own limit refuses and ToolNode turns that into a message, only
    the sub-agent's budget is marked: the supervisor's next call goes ahead."""
    from langchain_core.runnables import RunnableLambda

    inner, inner_provider = fake_chat(default=reply("inner"))
    sub_agent = RunnableLambda(lambda task: task) | inner

    @tool
    def helper(task: str) -> str:
        """Delegate a task."""
        return str(sub_agent.invoke(task).content)

    graph, sup_provider = supervisor_with(helper)
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"helper": {"llm_calls": 0}})
    out = graph.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [handler]})
    assert out["messages"][-1].content == "finished anyway"
    assert inner_provider.calls == 0
    assert sup_provider.calls == 2
    assert [r.path for r in handler.refusals] == ["run/helper"]
    assert budget.report().find("helper").refusals == 1
    assert no_open_holds(budget)


def test_a_model_called_by_a_plain_tool_is_charged_to_the_caller() -> None:
    """A tool function that calls a model directly (no chain, no graph) is not a
    sub-agent: the call is charged to the agent that called the tool."""
    inner, inner_provider = fake_chat(default=reply("inner"))

    @tool
    def helper(task: str) -> str:
        """Delegate a task."""
        return str(inner.invoke(task).content)

    graph, sup_provider = supervisor_with(helper)
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"helper": {"llm_calls": 0}})
    out = graph.invoke({"messages": [HumanMessage("go")]}, config={"callbacks": [handler]})
    assert out["messages"][-1].content == "finished anyway"
    assert (inner_provider.calls, sup_provider.calls) == (1, 2)
    assert budget.spent.llm_calls == 3
    assert budget.report().children == ()


def test_refusals_of_top_level_calls_leave_nothing_behind() -> None:
    """A long-lived handler that refuses many bare calls keeps no state for them."""
    budget = allotment.Budget(llm_calls=0, name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, _ = fake_chat(default=reply("x"))
    for _ in range(5):
        with pytest.raises(allotment.BudgetExceeded):
            chat.invoke("hi", config={"callbacks": [handler]})
    assert handler.open_runs == 0
    assert handler._latched == {}
    assert len(handler.refusals) == 5


async def test_a_rate_window_refuses_at_once_on_the_event_loop() -> None:
    """In async runs the handler runs on the loop's thread: a call over the rate window
    is refused at once with RateWindowExceeded (and when it would fit), instead of
    blocking every task on the loop while it waits."""
    import time

    budget = allotment.Budget(rate="1/minute", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat(default=reply("x"))
    await chat.ainvoke("first", config={"callbacks": [handler]})
    started = time.monotonic()
    with pytest.raises(allotment.RateWindowExceeded) as caught:
        await chat.ainvoke("second", config={"callbacks": [handler]})
    assert time.monotonic() - started < 5
    assert 0 < caught.value.retry_after <= 60
    assert provider.calls == 1
    assert handler._latched == {}  # a rate refusal is about timing; it is not remembered
