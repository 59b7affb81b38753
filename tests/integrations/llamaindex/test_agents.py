"""Workflow agents: each call charged to the agent that made it, handoffs, tools, sub-agents.

Every test runs LlamaIndex's real agents and OpenAI class against the scripted provider,
and checks that the ledger equals the provider's request log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, Request, ScriptedProvider, ToolCall
from allotment_llamaindex import BudgetCallbackHandler, _instrument, _spans, instrument
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llamaindex_fakes import assert_ledger_matches_provider, openai_llm, provider_usage

# Building a workflow agent makes the workflows package list the agent's members with
# inspect.getmembers, which touches pydantic's deprecated instance attributes; ReActAgent
# calls ctx.is_running inside a step, which workflows deprecates. Neither is ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:is_running called from within a step"),
    pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated"),
    pytest.mark.filterwarnings("ignore:The `__fields_set__` attribute is deprecated"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_"),
]


@pytest.fixture
def budget() -> Iterator[allotment.Budget]:
    b = allotment.Budget(usd="0.05", name="run")
    yield b
    b.close()


def _search_tool(log: list[str]) -> Any:
    def search(query: str) -> str:
        """Search the web for a query."""
        log.append(query)
        return f"three facts about {query}"

    return search


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


async def test_a_function_agent_is_charged_on_a_child_named_after_it(
    provider: ScriptedProvider, budget: allotment.Budget
) -> None:
    searched: list[str] = []
    agent = FunctionAgent(
        name="solo",
        description="answers",
        llm=openai_llm(provider, max_tokens=64),
        tools=[_search_tool(searched)],
    )
    provider.add(Reply.tool_call("search", {"query": "llamas"}), Reply.text("Llamas hum."))
    undo = instrument(budget)
    try:
        result = await agent.run(user_msg="Tell me about llamas.")
        # Nothing is kept once the run is over: no span, no open child, no pending call.
        assert _spans.tracker().kept() == 0
        handler = _instrument.active()
        assert handler is not None
        assert (handler._scopes.open, handler.pending) == (0, 0)
    finally:
        undo()
    assert str(result) == "Llamas hum."
    solo = budget.report().find("solo")
    assert (solo.spent.llm_calls, solo.spent.tool_calls, solo.spent.tools) == (
        2,
        1,
        (("search", 1),),
    )
    assert solo.closed  # closed when the run ended
    assert all(r.include_usage for r in provider.requests)  # agents stream: usage was asked for
    assert_ledger_matches_provider(budget, provider)


async def test_a_react_agent_is_charged_on_a_child_named_after_it(
    provider: ScriptedProvider, budget: allotment.Budget
) -> None:
    searched: list[str] = []
    agent = ReActAgent(
        name="reasoner",
        description="thinks",
        llm=openai_llm(provider, max_tokens=64),
        tools=[_search_tool(searched)],
    )
    provider.add(
        Reply.text('Thought: I need facts.\nAction: search\nAction Input: {"query": "llamas"}'),
        Reply.text("Thought: I can answer now.\nAnswer: Llamas hum."),
    )
    undo = instrument(budget)
    try:
        result = await agent.run(user_msg="Tell me about llamas.")
    finally:
        undo()
    assert "Llamas hum." in str(result)
    assert searched == ["llamas"]
    reasoner = budget.report().find("reasoner")
    assert (reasoner.spent.llm_calls, reasoner.spent.tool_calls) == (2, 1)
    assert_ledger_matches_provider(budget, provider)


def _workflow(provider: ScriptedProvider, searched: list[str]) -> AgentWorkflow:
    llm = openai_llm(provider, max_tokens=64)
    researcher = FunctionAgent(
        name="researcher",
        description="finds facts",
        llm=llm,
        tools=[_search_tool(searched)],
        can_handoff_to=["writer"],
    )
    writer = FunctionAgent(name="writer", description="writes the article", llm=llm)
    return AgentWorkflow(agents=[researcher, writer], root_agent="researcher")


async def test_a_handoff_moves_spending_to_the_receiving_agents_budget(
    provider: ScriptedProvider, budget: allotment.Budget
) -> None:
    searched: list[str] = []
    workflow = _workflow(provider, searched)
    provider.add(
        Reply.tool_call("search", {"query": "llamas"}),
        Reply.tool_call("handoff", {"to_agent": "writer", "reason": "facts found"}),
        Reply.text("An article about llamas."),
    )
    undo = instrument(budget, children={"researcher": "0.01", "writer": "0.02"})
    try:
        result = await workflow.run(user_msg="Write about llamas.")
    finally:
        undo()
    assert str(result) == "An article about llamas."
    report = budget.report()
    researcher, writer = report.find("researcher"), report.find("writer")
    assert [c.name for c in report.children] == ["researcher", "writer"]  # siblings
    assert (researcher.spent.llm_calls, researcher.spent.tool_calls) == (2, 1)  # handoff: free
    assert (writer.spent.llm_calls, writer.spent.tool_calls) == (1, 0)
    assert researcher.limits["usd"] == allotment.Limits.of("0.01", now=0).usd
    assert researcher.closed
    assert writer.closed
    assert report.allotted_usd == 0  # their unspent escrow came back
    assert report.spent.usd == researcher.spent.usd + writer.spent.usd
    assert_ledger_matches_provider(budget, provider)


async def test_an_agent_over_its_own_limit_stops_the_workflow_typed(
    provider: ScriptedProvider, budget: allotment.Budget
) -> None:
    searched: list[str] = []
    workflow = _workflow(provider, searched)
    provider.add(Reply.tool_call("search", {"query": "llamas"}), Reply.text("never sent"))
    undo = instrument(budget, children={"researcher": {"llm_calls": 1}})
    try:
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await workflow.run(user_msg="Write about llamas.")
    finally:
        undo()
    assert refused.value.path == "run/researcher"
    assert refused.value.limit_name == "llm_calls"
    assert provider.calls == 1
    assert provider.pending == 1
    assert searched == ["llamas"]
    report = budget.report()
    assert (report.find("researcher").refusals, report.open_holds) == (1, 0)
    assert_ledger_matches_provider(budget, provider)


async def test_a_tool_over_its_cap_stops_the_run_before_the_tool_runs(
    provider: ScriptedProvider,
) -> None:
    budget = allotment.Budget(usd="0.05", per_tool={"search": 1}, name="run")
    searched: list[str] = []
    agent = FunctionAgent(
        name="solo",
        description="answers",
        llm=openai_llm(provider, max_tokens=64),
        tools=[_search_tool(searched)],
    )
    provider.add(
        Reply.tool_call("search", {"query": "first"}),
        Reply.tool_call("search", {"query": "second"}),
    )
    undo = instrument(budget)
    try:
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await agent.run(user_msg="Search twice.")
    finally:
        undo()
    assert refused.value.limit_name == "tool:search"
    assert searched == ["first"]  # the second search never ran
    assert budget.spent.tools == (("search", 1),)
    assert_ledger_matches_provider(budget, provider)


async def test_a_loop_on_a_failing_tool_ends_at_the_call_cap(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.05", llm_calls=3, name="run")
    attempts: list[str] = []

    def fetch(url: str) -> str:
        """Fetch a page."""
        attempts.append(url)
        raise ConnectionError("the page is down")

    agent = FunctionAgent(
        name="looper", description="fetches", llm=openai_llm(provider, max_tokens=64), tools=[fetch]
    )
    provider.responder = lambda request: Reply.tool_call("fetch", {"url": "https://x"})
    undo = instrument(budget)
    try:
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await agent.run(user_msg="Fetch the page.")
    finally:
        undo()
    assert refused.value.limit_name == "llm_calls"
    assert len(attempts) == 3  # each failed attempt still counted as a tool call
    assert budget.spent.tool_calls == 3
    assert_ledger_matches_provider(budget, provider)


def _expert_provider_script(request: Request) -> Reply:
    messages = request.messages
    system = _text(messages[0]) if messages and messages[0].get("role") == "system" else ""
    last = messages[-1]
    if "expert" in system:
        if last.get("role") == "tool":
            return Reply.text("Looked it up: 42.")
        if "hard" in _text(last):
            return Reply.tool_call("lookup", {"topic": "hard"})
        return Reply.text("Easy: 7.")
    if any(m.get("role") == "tool" for m in messages):
        return Reply.text("The experts answered.")
    return Reply.tool_calls(
        ToolCall("ask_expert", {"question": "an easy one"}, id="call_easy"),
        ToolCall("ask_expert", {"question": "a hard one"}, id="call_hard"),
    )


def _boss_and_expert(provider: ScriptedProvider) -> FunctionAgent:
    llm = openai_llm(provider, max_tokens=64)

    def lookup(topic: str) -> str:
        """Look a topic up."""
        return "42"

    expert = FunctionAgent(
        name="expert",
        description="answers hard questions",
        system_prompt="You are the expert.",
        llm=llm,
        tools=[lookup],
    )

    async def ask_expert(question: str) -> str:
        """Ask the expert a question."""
        return str(await expert.run(user_msg=question))

    return FunctionAgent(
        name="boss",
        description="delegates",
        system_prompt="You are the boss.",
        llm=llm,
        tools=[ask_expert],
    )


async def test_an_agent_used_as_a_tool_runs_on_a_child_carved_from_the_callers_budget(
    budget: allotment.Budget,
) -> None:
    with ScriptedProvider(responder=_expert_provider_script, default=None) as provider:
        boss = _boss_and_expert(provider)
        undo = instrument(budget, children={"ask_expert": "0.01"})
        try:
            await boss.run(user_msg="Ask the expert.")
        finally:
            undo()
        report = budget.report()
        boss_report = report.find("boss")
        calls = [c for c in boss_report.children if c.name.startswith("ask_expert")]
        assert len(calls) == 2  # one child per tool call, each under the calling agent
        assert all(c.limits["usd"] == allotment.Limits.of("0.01", now=0).usd for c in calls)
        experts = [c.find("expert") for c in calls]
        assert sorted(e.spent.llm_calls for e in experts) == [1, 2]  # easy: 1 call; hard: 2
        assert sum(e.spent.tool_calls for e in experts) == 1  # the hard one's lookup
        # boss's own calls: the fan-out and the summary, not its sub-agents'.
        own = boss_report.spent.llm_calls - sum(c.spent.llm_calls for c in calls)
        assert own == 2
        assert all(c.closed for c in calls)
        assert_ledger_matches_provider(budget, provider)


async def test_parallel_sub_agents_are_each_refused_alone_past_their_own_limit(
    budget: allotment.Budget,
) -> None:
    with ScriptedProvider(responder=_expert_provider_script, default=None) as provider:
        boss = _boss_and_expert(provider)
        undo = instrument(budget, children={"ask_expert": {"llm_calls": 1}})
        try:
            result = await boss.run(user_msg="Ask the expert.")
        finally:
            undo()
        assert str(result) == "The experts answered."  # the refusal came back to boss as text
        calls = [c for c in budget.report().find("boss").children if c.name.startswith("ask")]
        # The hard question's second call was refused where it was made: its expert.
        assert sorted(sum(r.refusals for _, r in c.walk()) for c in calls) == [0, 1]
        assert all(c.spent.llm_calls == 1 for c in calls)
        assert budget.report().open_holds == 0
        assert_ledger_matches_provider(budget, provider)


async def test_each_run_is_charged_to_the_budget_active_when_it_runs(
    provider: ScriptedProvider,
) -> None:
    agent = FunctionAgent(
        name="solo", description="answers", llm=openai_llm(provider, max_tokens=64)
    )
    first = allotment.Budget(usd="0.01", name="first")
    second = allotment.Budget(usd="0.01", name="second")
    provider.add(Reply.text("one"), Reply.text("two"), Reply.text("three"))
    undo = instrument()
    try:
        with first.activate():
            await agent.run(user_msg="a")
        with second.activate():
            await agent.run(user_msg="b")
            await agent.run(user_msg="c")
    finally:
        undo()
    assert (first.spent.llm_calls, second.spent.llm_calls) == (1, 2)
    assert len(second.report().find("second").children) == 2  # one child per run
    billed = provider_usage(provider)
    both = first.spent + second.spent
    assert (both.llm_calls, both.input_tokens, both.output_tokens) == (
        billed.llm_calls,
        billed.input_tokens,
        billed.output_tokens,
    )


async def test_the_handler_alone_attributes_agent_calls_without_instrument() -> None:
    """With LlamaIndex's own fake function-calling model, and no instrument()."""
    budget = allotment.Budget(llm_calls=3, name="mock")
    answered: list[str] = []

    def answer(messages: list[ChatMessage], **kwargs: Any) -> ChatMessage:
        answered.append(messages[-1].content or "")
        return ChatMessage(role="assistant", content="echo")

    llm = MockFunctionCallingLLM(
        response_generator=answer,
        callback_manager=CallbackManager([BudgetCallbackHandler(budget)]),
    )
    agent = FunctionAgent(name="mocked", description="echoes", llm=llm)
    await agent.run(user_msg="echo me")
    mocked = budget.report().find("mocked")
    assert mocked.spent.llm_calls == len(answered) == 1  # the ledger equals the model's log
    assert mocked.spent.estimated  # the mock reports no usage


class _HandoffPolicy:
    """A child-limits plugin: one model call for any agent reached by a handoff."""

    def __init__(self) -> None:
        self.spawns: list[allotment.Spawn] = []

    @allotment.hookimpl
    def allotment_child_limits(
        self, parent: allotment.Budget, spawn: allotment.Spawn
    ) -> allotment.Limits | None:
        self.spawns.append(spawn)
        return allotment.Limits(llm_calls=1) if spawn.how == "handoff" else None


async def test_agents_without_configured_limits_get_them_from_the_child_limits_hook(
    provider: ScriptedProvider, budget: allotment.Budget
) -> None:
    policy = _HandoffPolicy()
    allotment.plugins().register(policy)
    searched: list[str] = []
    provider.add(Reply.tool_call("search", {"query": "llamas"}), Reply.text("never sent"))
    undo = instrument(budget)
    try:
        with pytest.raises(allotment.BudgetExceeded) as refused:
            await _workflow(provider, searched).run(user_msg="Write about llamas.")
    finally:
        undo()
        allotment.plugins().unregister(policy)
    assert refused.value.path == "run/researcher"
    spawn = policy.spawns[0]
    assert (spawn.name, spawn.how, spawn.framework) == ("researcher", "handoff", "llamaindex")
    assert spawn.metadata["scope"] == "agent"
    assert_ledger_matches_provider(budget, provider)
