"""Budget overruns reported against LangChain and LangGraph (INCIDENTS.md 1-7 and 17),
reproduced offline inside the real frameworks and stopped by allotment_langchain.

Tests are named after the catalogue id (``test_lang_001_...``); scenarios without one are
named after their number in INCIDENTS.md (``test_incident_05_...``).

Every test also checks: recorded spend <= cap; the provider's call count equals the calls
the budget admitted; nothing is left held.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import allotment
import httpx
import pytest
from allotment.testing import Failure, Reply, ScriptedProvider
from allotment.testing import Usage as WireUsage
from allotment_langchain import (
    BudgetCallbackHandler,
    StreamCutOff,
    StreamUsageWarning,
    metered_http_client,
)
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import ToolException, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "langchain"))
from langchain_fakes import PRICES, FakeChat, cost, fake_chat, no_open_holds, reply

# -- shared pieces ----------------------------------------------------------------------------

# Long enough that the byte bound of the prompt covers the 1,000 input tokens the fake
# provider reports for every call (a sound hold), short enough for three calls to fit $0.09.
SQL_SYSTEM = (
    "You are a data analyst with a SQL tool. Answer questions about the orders database. " * 13
)


def checks(budget: allotment.Budget, cap: Decimal, provider_calls: int) -> None:
    """The three facts every incident test proves."""
    spent = budget.spent
    assert spent.usd is not None
    assert spent.usd <= cap
    assert provider_calls == spent.llm_calls
    assert no_open_holds(budget)


@tool
def run_sql(query: str) -> str:
    """Run a SQL query against the orders database."""
    sql_runs.append(query)
    raise ToolException("no such table: orders")


run_sql.handle_tool_error = True  # the tool reports its error to the model, which retries
sql_runs: list[str] = []


def sql_agent(chat: FakeChat) -> Any:
    """A LangGraph ReAct agent (model node + ToolNode) whose SQL tool always fails."""
    bound = chat.bind_tools([run_sql])
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda s: {"messages": [bound.invoke(s["messages"])]})
    graph.add_node("tools", ToolNode([run_sql]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile()


def sql_question() -> dict[str, Any]:
    return {"messages": [SystemMessage(SQL_SYSTEM), HumanMessage("How many orders last week?")]}


def retrying_model() -> tuple[FakeChat, Any]:
    return fake_chat(
        default=reply("", tool_calls=[("run_sql", {"query": "SELECT count(*) FROM orders"})]),
        max_tokens=500,
    )


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    with ScriptedProvider(default=None) as p:
        yield p


@pytest.fixture
def http() -> Iterator[list[httpx.Client]]:
    clients: list[httpx.Client] = []
    yield clients
    for client in clients:
        client.close()


def chat_openai(
    provider: ScriptedProvider, http: list[httpx.Client], *, metered: bool = False, **kw: Any
) -> Any:
    from langchain_openai import ChatOpenAI

    timeout = kw.pop("timeout", 10.0)
    client = metered_http_client(timeout=timeout) if metered else httpx.Client(timeout=timeout)
    http.append(client)
    return ChatOpenAI(
        base_url=provider.base_url,
        api_key=provider.api_key,
        http_client=client,
        timeout=timeout,
        **{"model": "gpt-4o-mini", "max_retries": 0, **kw},
    )


# -- 1. SQL retry loop [LANG-001, langgraph#6731] --------------------------------------------------


def test_lang_001_sql_retry_loop_stops_before_fourth_call() -> None:
    """Cap $0.09 and $0.025 a call: the agent keeps retrying its failing SQL tool; the 4th
    model call is refused before it is sent, after exactly 3 reached the provider, and no
    tool ran after the refusal."""
    sql_runs.clear()
    cap = Decimal("0.09")
    budget = allotment.Budget(usd=cap, name="analyst", prices=PRICES)
    chat, provider = retrying_model()
    with pytest.raises(allotment.BudgetExceeded) as caught:
        sql_agent(chat).invoke(
            sql_question(), config={"callbacks": [BudgetCallbackHandler(budget)]}
        )
    assert caught.value.limit_name == "usd"
    assert provider.calls == 3
    assert len(sql_runs) == 3  # one per admitted call; none after the refusal
    assert budget.spent.usd == 3 * cost(1000, 500) == Decimal("0.075")
    checks(budget, cap, provider.calls)


def test_lang_001_tiny_cap_sends_nothing_and_names_the_estimate() -> None:
    """Cap $0.01 cannot cover the first call's hold: nothing reaches the provider, and the
    error says what the call asked for and what was left."""
    sql_runs.clear()
    cap = Decimal("0.01")
    budget = allotment.Budget(usd=cap, name="analyst", prices=PRICES)
    chat, provider = retrying_model()
    with pytest.raises(allotment.BudgetExceeded) as caught:
        sql_agent(chat).invoke(
            sql_question(), config={"callbacks": [BudgetCallbackHandler(budget)]}
        )
    err = caught.value
    assert provider.calls == 0
    assert sql_runs == []
    assert err.remaining == cap
    assert err.asked > cap
    assert f"this call asked for up to ${err.asked.normalize()}" in str(err)
    assert "left $0.01" in str(err)
    checks(budget, cap, provider.calls)


# -- 2. After-the-fact guard overshoots ---------------------------------------------------------


class AfterTheFactGuard(BaseCallbackHandler):
    """The negative control: count cost after each call and refuse once it is over the
    cap, which is how framework step limits and usage checks work."""

    raise_error = True
    run_inline = True

    def __init__(self, cap: Decimal) -> None:
        self.cap = cap
        self.spent = Decimal(0)

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        if self.spent >= self.cap:
            raise RuntimeError(f"over budget: {self.spent} >= {self.cap}")

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        usage = response.generations[0][0].message.usage_metadata
        self.spent += cost(usage["input_tokens"], usage["output_tokens"])


def test_incident_02_after_the_fact_guard_overshoots_by_one_call_and_ours_does_not() -> None:
    """Same agent, same $0.09 cap: a guard that checks recorded spend before each call
    lets a 4th call through and ends at $0.10; the reservation stops at 3 calls, $0.075."""
    cap = Decimal("0.09")
    control_chat, control_provider = retrying_model()
    guard = AfterTheFactGuard(cap)
    with pytest.raises(RuntimeError, match="over budget"):
        sql_agent(control_chat).invoke(sql_question(), config={"callbacks": [guard]})
    assert control_provider.calls == 4
    assert guard.spent == Decimal("0.1") > cap

    budget = allotment.Budget(usd=cap, name="analyst", prices=PRICES)
    chat, provider = retrying_model()
    with pytest.raises(allotment.BudgetExceeded):
        sql_agent(chat).invoke(
            sql_question(), config={"callbacks": [BudgetCallbackHandler(budget)]}
        )
    assert provider.calls == control_provider.calls - 1
    checks(budget, cap, provider.calls)


# -- 3. Hidden client retries [LANG-024 #1094, LANG-025 #11500] --------------------------------


def test_lang_024_client_retries_after_rate_limits_bill_only_the_answer(
    provider: ScriptedProvider, http: list[httpx.Client]
) -> None:
    """ChatOpenAI(max_retries=2) against 429, 429, 200: the SDK retries where callbacks
    cannot see, the provider bills only the 200, and the budget charges exactly that, with
    the metered transport holding budget for each retry before it went out."""
    cap = Decimal("0.01")
    provider.fail(429, times=2).add(Reply.text("the answer"))
    budget = allotment.Budget(usd=cap, name="client")
    model = chat_openai(provider, http, metered=True, max_retries=2, max_tokens=50)
    assert (
        model.invoke("question", config={"callbacks": [BudgetCallbackHandler(budget)]}).content
        == "the answer"
    )
    assert provider.attempts == 3
    assert provider.billed == provider.calls == 1
    billed = provider.billed_usage
    assert (budget.spent.input_tokens, budget.spent.output_tokens) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    checks(budget, cap, provider.calls)


def test_lang_025_a_timed_out_attempt_the_sdk_retried_is_metered(
    provider: ScriptedProvider, http: list[httpx.Client]
) -> None:
    """A request times out and the SDK retries it. Callbacks see one call; the metered
    transport saw two attempts and charges the timed-out one its bound (a provider may have
    run and billed it), flagged estimated. Without the transport only one call is seen
    (tests/integrations/langchain/test_http_meter.py shows both)."""
    cap = Decimal("0.01")
    provider.add(Failure.timeout(5.0), Reply.text("second attempt"))
    budget = allotment.Budget(usd=cap, name="client")
    model = chat_openai(provider, http, metered=True, max_retries=1, max_tokens=50, timeout=0.5)
    model.invoke("question", config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert provider.attempts == 2
    assert budget.spent.llm_calls == 2  # both attempts the provider may bill
    assert budget.report().estimated_calls == 1
    spent = budget.spent.usd
    assert spent is not None
    assert spent <= cap
    assert no_open_holds(budget)


# -- 4. Streaming without usage [LANG-010 #18212] ---------------------------------------------


def test_lang_010_streams_without_usage_are_estimated_and_the_cap_holds(
    provider: ScriptedProvider, http: list[httpx.Client]
) -> None:
    """ChatOpenAI on a custom base_url streams no usage: every stream is charged an
    estimate (more than $0, flagged), and the cap still stops the loop."""
    answer = "A streamed answer of a dozen or so words, none of them counted by the server."
    for _ in range(40):
        provider.add(Reply.text(answer))
    cap = Decimal("0.0002")
    budget = allotment.Budget(usd=cap, name="stream")
    model = chat_openai(provider, http, max_tokens=40)
    handler = BudgetCallbackHandler(budget)
    streamed = 0

    def stream_until_refused() -> None:
        nonlocal streamed
        while True:
            list(model.stream("tell me", config={"callbacks": [handler]}))
            streamed += 1

    with pytest.warns(StreamUsageWarning), pytest.raises(allotment.BudgetExceeded):
        stream_until_refused()
    assert streamed >= 3
    assert all(r.usage is None for r in provider.requests)
    report = budget.report()
    assert report.estimated_calls == streamed
    assert report.spent.usd is not None
    assert report.spent.usd > 0
    assert report.spent.output_tokens >= provider.billed_usage.completion_tokens
    checks(budget, cap, provider.calls)


# -- 5. Mid-stream cut-off -------------------------------------------------------------------------


def test_incident_05_a_runaway_stream_is_cut_within_one_chunk_of_its_hold(
    provider: ScriptedProvider, http: list[httpx.Client]
) -> None:
    """A stream that would emit ~10,000 output tokens against a hold of 2,000 (max_tokens
    ignored by the server) is stopped at the chunk that crosses 2,000."""
    sentence = "Every chunk of this answer is one more word the budget has to pay for. "
    text = sentence
    while provider.tokenizer.count(text) < 10_000:
        text += sentence
    # Word by word, as providers stream at token boundaries (a chunk split mid-token would
    # count more tokens than the text has).
    provider.add(Reply.text(text))
    cap = Decimal("0.05")
    budget = allotment.Budget(usd=cap, name="stream")
    model = chat_openai(provider, http, max_tokens=2000, stream_usage=True)
    received: list[str] = []

    def consume() -> None:
        for chunk in model.stream(
            "write forever", config={"callbacks": [BudgetCallbackHandler(budget)]}
        ):
            received.append(str(chunk.content))

    with pytest.raises(StreamCutOff):
        consume()
    count = provider.tokenizer.count
    delivered = count("".join(received))
    biggest_chunk = max(count(c) for c in received if c)
    assert 2000 - biggest_chunk <= delivered <= 2000
    assert 2000 < budget.spent.output_tokens <= 2000 + biggest_chunk + 1
    assert budget.spent.estimated
    checks(budget, cap, provider.calls)


# -- 6. Reasoning tokens [LANG-004 #29779] -------------------------------------------------------


def test_lang_004_reasoning_tokens_are_charged_once_at_the_output_rate(
    provider: ScriptedProvider, http: list[httpx.Client]
) -> None:
    """o4-mini reports 1,000 output tokens of which 900 are reasoning: 1,000 output tokens
    are charged, once, at o4-mini's output rate ($4.40/M), not 1,900."""
    provider.add(
        Reply.text(
            "42", usage=WireUsage(prompt_tokens=200, completion_tokens=1000, reasoning_tokens=900)
        )
    )
    cap = Decimal("0.50")
    budget = allotment.Budget(usd=cap, name="reasoner")
    model = chat_openai(provider, http, model="o4-mini", max_tokens=2000)
    model.invoke("think hard", config={"callbacks": [BudgetCallbackHandler(budget)]})
    spent = budget.spent
    assert (spent.output_tokens, spent.reasoning_tokens) == (1000, 900)
    assert spent.usd == (200 * Decimal("1.10") + 1000 * Decimal("4.40")) / 10**6
    checks(budget, cap, provider.calls)


# -- 7. Map-reduce summariser loop [LANG-002 #16251] -----------------------------------------------


class State(MessagesState):
    summaries: list[str]


def test_lang_002_map_reduce_collapse_loop_is_stopped_by_a_call_cap() -> None:
    """A map-reduce summariser with a tiny token_max: summaries never get short enough, so
    the collapse step loops (LangGraph's recursion limit is far away). A cap of 12 model
    calls stops it at exactly 12."""
    token_max = 10

    def never_shorter(messages: list[Any]) -> AIMessage:
        text = str(messages[-1].content)
        return reply(f"Summary: {text}", input_tokens=50, output_tokens=50)

    chat, provider = fake_chat(never_shorter, max_tokens=200)

    def summarize(text: str) -> str:
        return str(chat.invoke([HumanMessage(text)]).content)

    def map_docs(state: State) -> dict[str, Any]:
        docs = [
            f"document {n} reports quarterly sales by region and by product line" for n in range(3)
        ]
        return {"summaries": [summarize(d) for d in docs]}

    def collapse(state: State) -> dict[str, Any]:
        joined = " ".join(state["summaries"])
        return {"summaries": [summarize(joined[i : i + 60]) for i in range(0, len(joined), 60)]}

    def too_long(state: State) -> str:
        return "collapse" if sum(len(s.split()) for s in state["summaries"]) > token_max else END

    graph = StateGraph(State)
    graph.add_node("map", map_docs)
    graph.add_node("collapse", collapse)
    graph.add_edge(START, "map")
    graph.add_conditional_edges("map", too_long)
    graph.add_conditional_edges("collapse", too_long)
    app = graph.compile()

    cap_calls = 12
    budget = allotment.Budget(usd="1", llm_calls=cap_calls, name="summarise", prices=PRICES)
    with pytest.raises(allotment.BudgetExceeded, match="llm_calls"):
        app.invoke(
            {"messages": [], "summaries": []},
            config={"callbacks": [BudgetCallbackHandler(budget)], "recursion_limit": 10_000},
        )
    assert provider.calls == cap_calls
    checks(budget, Decimal("1"), provider.calls)


# -- 17. Agent-as-tool sub-agents in parallel ------------------------------------------------------


def test_incident_17_parallel_sub_agents_each_get_a_child_refused_alone() -> None:
    """A LangGraph supervisor calls its researcher (an agent wrapped as a tool) twice at
    once. Each call gets its own child budget; both are charged to the supervisor's
    budget; each is refused alone at its own $0.045, and the supervisor finishes."""

    @tool
    def search(q: str) -> str:
        """Search."""
        return "nothing useful"

    inner_chat, inner = fake_chat(
        default=reply(
            "", tool_calls=[("search", {"q": "more"})], input_tokens=100, output_tokens=500
        )
    )
    bound = inner_chat.bind_tools([search])
    research = StateGraph(MessagesState)
    research.add_node("agent", lambda s: {"messages": [bound.invoke(s["messages"])]})
    research.add_node("tools", ToolNode([search]))
    research.add_edge(START, "agent")
    research.add_conditional_edges("agent", tools_condition)
    research.add_edge("tools", "agent")
    research_agent = research.compile(name="research_agent")

    @tool
    def researcher(question: str) -> str:
        """Ask the researcher."""
        out = research_agent.invoke({"messages": [HumanMessage(question)]})
        return str(out["messages"][-1].content)

    sup_chat, sup = fake_chat(
        [
            reply(
                "",
                tool_calls=[("researcher", {"question": "a"}), ("researcher", {"question": "b"})],
                input_tokens=100,
                output_tokens=100,
            ),
            reply("report written from what we have", input_tokens=300, output_tokens=100),
        ]
    )
    sup_bound = sup_chat.bind_tools([researcher])
    graph = StateGraph(MessagesState)
    graph.add_node("supervisor", lambda s: {"messages": [sup_bound.invoke(s["messages"])]})
    graph.add_node("tools", ToolNode([researcher], handle_tool_errors=True))
    graph.add_edge(START, "supervisor")
    graph.add_conditional_edges("supervisor", tools_condition)
    graph.add_edge("tools", "supervisor")

    cap = Decimal("0.50")
    child_cap = Decimal("0.045")
    budget = allotment.Budget(usd=cap, name="supervisor", prices=PRICES)
    handler = BudgetCallbackHandler(budget, children={"researcher": child_cap})
    out = graph.compile().invoke(
        {"messages": [HumanMessage("write a report")]}, config={"callbacks": [handler]}
    )
    assert out["messages"][-1].content == "report written from what we have"

    report = budget.report()
    children = report.children
    assert sorted(c.path for c in children) == ["supervisor/researcher", "supervisor/researcher#2"]
    for child in children:
        assert child.refusals == 1
        assert child.spent.usd is not None
        assert child.spent.usd <= child_cap
        assert child.spent.llm_calls == 2
        assert child.closed
    assert report.refusals == 0  # the supervisor itself was never refused
    assert report.spent.usd == sum(c.spent.usd for c in children) + cost(100, 100) + cost(300, 100)
    assert {r.path for r in handler.refusals} == {c.path for c in children}
    checks(budget, cap, inner.calls + sup.calls)
