"""crew_config: every model call of a crew is reserved, then settled from its LLM's usage."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from decimal import Decimal
from typing import Any

import allotment
import pytest
from allotment.testing import Failure, Reply, Usage
from allotment_crewai import CrewBudgetExceeded, crew_config
from crewai import Agent, Crew, Task
from crewai.hooks import HookAborted


def agent(role: str, llm: Any, **kw: Any) -> Agent:
    kw.setdefault("goal", f"do the {role.lower()} work")
    kw.setdefault("backstory", f"an experienced {role.lower()}")
    return Agent(role=role, llm=llm, **kw)


def task(name: str, who: Agent, **kw: Any) -> Task:
    kw.setdefault("description", f"the {name} task")
    kw.setdefault("expected_output", "a short answer")
    return Task(name=name, agent=who, **kw)


def test_every_call_is_reserved_and_settled_from_the_llms_usage_and_the_ledger_equals_its_log(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("1.00")
    model = llm()
    model.tool("search", {"query": "q1"}).tool("search", {"query": "q2"}).add("final answer")
    researcher = agent("Researcher", model, tools=[search_tool])
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    out = crew.kickoff()

    assert out.raw == "final answer"
    assert model.calls == 3
    assert search_tool.runs == 2
    spent = b.spent
    billed = model.billed_usage
    assert (spent.llm_calls, spent.input_tokens, spent.output_tokens) == (
        model.calls,
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    assert spent.usd == Decimal("0.075")
    assert not spent.estimated
    assert spent.tool_calls == 2
    assert dict(spent.tools) == {"search": 2}
    report = b.report()
    assert report.find("run/crew/Researcher/research").spent.llm_calls == 3
    assert report.open_holds == 0
    assert b.held.llm_calls == 0


def test_a_refusal_leaves_kickoff_typed_and_is_not_retried(budget: Any, llm: Any) -> None:
    """The second call does not fit: kickoff raises a BudgetExceeded that is a HookAborted,
    CrewAI does not retry it (max_retry_limit), and it never reaches the model."""
    b = budget("0.03")
    model = llm()
    model.tool("search", {"query": "q"}).add("final answer")
    researcher = agent("Researcher", model, tools=[], max_retry_limit=3)
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    with pytest.raises(allotment.BudgetExceeded) as info:
        crew.kickoff()

    err = info.value
    assert isinstance(err, CrewBudgetExceeded)
    assert isinstance(err, HookAborted)
    assert err.path == "run"
    assert err.limit_name == "usd"
    assert err.spent == Decimal("0.025")
    assert "rate limit" not in str(err).lower()
    assert model.calls == 1
    assert b.spent.usd == Decimal("0.025") <= Decimal("0.03")
    assert b.report().open_holds == 0


def test_nothing_reaches_the_model_when_the_first_call_does_not_fit(budget: Any, llm: Any) -> None:
    b = budget("0.001")
    model = llm()
    researcher = agent("Researcher", model)
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()

    assert model.calls == 0
    assert info.value.asked > Decimal("0.001")
    assert "left $0.001" in str(info.value)
    assert b.spent.usd == 0
    assert b.report().open_holds == 0


def test_kickoff_async_is_refused_typed_as_well(budget: Any, llm: Any, search_tool: Any) -> None:
    b = budget("0.03")
    model = llm()
    model.tool("search", {"query": "q"}).add("final")
    writer = agent("Writer", model, tools=[search_tool], max_iter=3)
    crew = Crew(agents=[writer], tasks=[task("write", writer)], **crew_config(b))

    with pytest.raises(CrewBudgetExceeded):
        asyncio.run(crew.kickoff_async())

    assert model.calls == 1
    assert b.spent.llm_calls == 1
    assert b.report().open_holds == 0


def test_the_ledger_counts_a_shared_llm_once_where_crew_usage_metrics_counts_it_per_agent(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    shared = llm()
    first, second = agent("Researcher", shared), agent("Writer", shared)
    crew = Crew(
        agents=[first, second],
        tasks=[task("research", first), task("write", second)],
        **crew_config(b),
    )

    crew.kickoff()

    assert shared.calls == 2
    assert b.spent.llm_calls == 2
    assert b.spent.input_tokens == 2000
    assert crew.usage_metrics is not None
    assert crew.usage_metrics.prompt_tokens == 4000  # CrewAI's own figure, doubled


def test_spend_is_attributed_per_agent_and_per_task(budget: Any, llm: Any) -> None:
    b = budget("1.00")
    first, second = agent("Researcher", llm()), agent("Writer", llm(usage=Usage(2000, 100)))
    crew = Crew(
        agents=[first, second],
        tasks=[task("research", first), task("draft", second), task("polish", second)],
        **crew_config(b),
    )

    crew.kickoff()

    report = b.report()
    assert report.find("run/crew/Researcher").spent.usd == Decimal("0.025")
    writer = report.find("run/crew/Writer")
    assert writer.spent.usd == Decimal("0.046")
    assert [c.name for c in writer.children] == ["draft", "polish"]
    assert all(c.closed and c.spent.llm_calls == 1 for c in writer.children)
    assert b.spent.usd == Decimal("0.071")


def test_per_agent_limits_are_child_budgets_by_role(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("1.00")
    looping = llm(default=Reply.tool_call("search", {"query": "again"}))
    writer = agent("Writer", looping, tools=[search_tool], max_iter=10)
    crew = Crew(
        agents=[writer],
        tasks=[task("write", writer)],
        **crew_config(b, per_agent={"writer": {"llm_calls": 2, "usd": "0.10"}}),
    )

    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()

    assert (info.value.path, info.value.limit_name) == ("run/crew/Writer", "llm_calls")
    assert looping.calls == 2 == b.spent.llm_calls
    node = b.report().find("run/crew/Writer")
    assert node.limits["llm_calls"] == 2
    assert node.closed
    assert b.remaining.usd == Decimal("0.95")  # the unspent escrow came back


def test_per_task_children_close_when_their_task_ends_and_return_their_escrow(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    seen: list[Decimal | None] = []
    model = llm()
    model.responder = lambda request: seen.append(b.remaining.usd)  # type: ignore[func-returns-value]
    first = agent("Researcher", model)
    crew = Crew(
        agents=[first],
        tasks=[task("research", first), task("summary", first)],
        **crew_config(b, per_task={"research": "0.30", "summary": "0.20"}),
    )

    crew.kickoff()

    # During research its $0.30 is set aside; once it ended, the summary's $0.20 was.
    assert seen == [Decimal("0.70"), Decimal("0.775")]
    report = b.report()
    assert report.find("run/crew/Researcher/research").limits["usd"] == Decimal("0.3")
    assert b.remaining.usd == Decimal("0.95")


def test_tool_caps_refuse_the_call_past_the_cap_before_the_tool_runs_and_stop_the_crew(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("1.00")
    model = llm()
    for i in range(4):
        model.tool("search", {"query": f"q{i}"})
    researcher = agent("Researcher", model, tools=[search_tool])
    crew = Crew(
        agents=[researcher],
        tasks=[task("research", researcher)],
        **crew_config(b, tools={"search": 2}),
    )

    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()

    assert info.value.limit_name == "tool:search"
    assert search_tool.runs == 2
    assert b.spent.tool_calls == 2
    assert model.calls == 3 == b.spent.llm_calls
    assert b.report().open_holds == 0


def test_a_call_without_an_agent_in_its_hook_context_is_charged_to_the_running_task(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    """max_iter=2 allows a third, forced final-answer call; CrewAI makes it with no agent
    in the hook context. It is still the researcher's, on the research task."""
    b = budget("1.00")
    model = llm()
    model.tool("search", {"query": "a"}).tool("search", {"query": "b"}).add("forced final")
    researcher = agent("Researcher", model, tools=[search_tool], max_iter=2)
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    out = crew.kickoff()

    assert model.calls == 3
    assert model.requests[-1].agent is None
    assert "forced final" in out.raw
    assert b.report().find("run/crew/Researcher/research").spent.llm_calls == 3


def test_a_failed_call_releases_its_hold_and_the_retry_is_reserved_afresh(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    model = llm()
    model.add(Failure.disconnect(), "final answer")
    researcher = agent("Researcher", model, max_retry_limit=2)
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    crew.kickoff()

    assert model.calls == 1
    assert b.spent.llm_calls == 1
    assert b.spent.usd == Decimal("0.025")
    assert b.report().open_holds == 0


@pytest.mark.parametrize("reporting", ["counters", "nothing"])
def test_an_llm_that_emits_no_events_is_settled_from_its_counters_or_estimated(
    budget: Any, llm: Any, search_tool: Any, reporting: str
) -> None:
    b = budget("1.00")
    model = llm(reporting=reporting)
    model.tool("search", {"query": "q"}).add("final")
    researcher = agent("Researcher", model, tools=[search_tool])
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    crew.kickoff()

    spent = b.spent
    assert spent.llm_calls == 2 == model.calls
    if reporting == "counters":
        assert (spent.input_tokens, spent.output_tokens) == (2000, 1000)
        assert not spent.estimated
    else:
        assert spent.estimated
        assert spent.usd is not None
        assert spent.usd > 0
        assert spent.output_tokens == 1000  # the holds' bound: max_tokens 500 each
    assert b.report().open_holds == 0


def test_a_reply_without_usage_is_charged_its_estimate_flagged_never_zero(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    model = llm()
    model.add(Reply.text("final", usage=None))
    writer = agent("Writer", model)
    crew = Crew(agents=[writer], tasks=[task("write", writer)], **crew_config(b))

    crew.kickoff()

    report = b.report()
    assert report.estimated_calls == 1
    assert b.spent.usd is not None
    assert b.spent.usd > 0


def test_kickoff_for_each_runs_every_input_on_a_child_of_its_own(budget: Any, llm: Any) -> None:
    b = budget("1.00")
    model = llm()
    writer = agent("Writer", model)
    crew = Crew(
        agents=[writer],
        tasks=[task("write", writer, description="write about {topic}")],
        **crew_config(b),
    )

    crew.kickoff_for_each([{"topic": "a"}, {"topic": "b"}, {"topic": "c"}])

    runs = b.report().children
    assert [r.name for r in runs] == ["crew", "crew", "crew"]
    assert [r.path for r in runs] == ["run/crew", "run/crew#2", "run/crew#3"]
    assert all(r.closed and r.spent.llm_calls == 1 for r in runs)
    assert b.spent.llm_calls == 3 == model.calls


def test_crew_config_without_a_budget_charges_the_current_one(budget: Any, llm: Any) -> None:
    b = budget("1.00")
    writer = agent("Writer", llm())
    crew = Crew(agents=[writer], tasks=[task("write", writer)], **crew_config())

    with b.activate():
        crew.kickoff()

    assert b.spent.llm_calls == 1
    with pytest.raises(allotment.ConfigurationError, match="no budget to charge"):
        crew.kickoff()


def test_bad_configuration_is_a_typed_error_before_anything_runs(budget: Any) -> None:
    with pytest.raises(allotment.InvalidAmount):
        crew_config(budget("1.00"), per_agent={"Writer": "-1"})
    with pytest.raises(allotment.ConfigurationError):
        crew_config("1.00")  # type: ignore[arg-type]
    with pytest.raises(allotment.ConfigurationError):
        crew_config(budget("1.00"), tools=["search"])  # type: ignore[arg-type]


def test_refusals_cross_processes_with_their_fields(budget: Any) -> None:
    import pickle

    from allotment_crewai._errors import refusal

    err = refusal(allotment.BudgetExceeded(path="run/crew", limit_name="usd", limit=Decimal(1)))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert (back.path, back.limit_name, back.limit, back.source) == (
        "run/crew",
        "usd",
        1,
        err.source,
    )
    assert isinstance(back, HookAborted)
    assert back.reason == str(err)


def test_importing_the_integration_does_not_import_crewai() -> None:
    code = textwrap.dedent(
        """
        import sys
        import allotment, allotment_crewai, allotment_crewai._plugin
        allotment.plugins()
        allotment_crewai.crew_config(allotment.Budget(1))
        assert "crewai" not in sys.modules, "crewai was imported"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_akickoff_runs_natively_async_and_is_metered_and_refused_the_same_way(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("0.06")
    model = llm()
    model.tool("search", {"query": "q"}).tool("search", {"query": "r"}).add("final")
    researcher = agent("Researcher", model, tools=[search_tool])
    crew = Crew(agents=[researcher], tasks=[task("research", researcher)], **crew_config(b))

    with pytest.raises(CrewBudgetExceeded):
        asyncio.run(crew.akickoff())

    assert model.calls == 2 == b.spent.llm_calls
    assert b.spent.usd == Decimal("0.05")
    assert b.report().open_holds == 0


def test_text_tool_calls_of_the_react_loop_are_metered_like_native_ones(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("1.00")
    model = llm(native_tools=False)
    model.add(
        'Thought: I should search.\nAction: search\nAction Input: {"query": "x"}',
        "Thought: I know.\nFinal Answer: the answer",
    )
    researcher = agent("Researcher", model, tools=[search_tool])
    crew = Crew(
        agents=[researcher],
        tasks=[task("research", researcher)],
        **crew_config(b, tools={"search": 1}),
    )

    out = crew.kickoff()

    assert out.raw == "the answer"
    assert search_tool.runs == 1
    assert b.spent.tool_calls == 1
    assert b.spent.llm_calls == 2 == model.calls
    assert not b.spent.estimated


def test_a_ledger_that_fails_refuses_the_call_instead_of_letting_crewai_send_it(
    budget: Any, llm: Any
) -> None:
    """CrewAI sends the call anyway when a hook raises anything but HookAborted; a ledger
    failure is raised as CrewLedgerError, which is both."""

    class BrokenLedger:
        @allotment.hookimpl
        def allotment_before_call(self, budget: Any, call: Any) -> None:
            raise allotment.LedgerError("the ledger is unreachable")

    b = budget("1.00")
    model = llm()
    writer = agent("Writer", model)
    crew = Crew(agents=[writer], tasks=[task("write", writer)], **crew_config(b))
    plugin = BrokenLedger()
    allotment.plugins().register(plugin)
    try:
        with pytest.raises(allotment.LedgerError) as info:
            crew.kickoff()
    finally:
        allotment.plugins().unregister(plugin)

    assert isinstance(info.value, HookAborted)
    assert isinstance(info.value, allotment.BudgetExceeded)
    assert "unreachable" in str(info.value)
    assert model.calls == 0


@pytest.mark.ledger_differs("the extra completion is a request the model's log does not list")
def test_a_billed_request_no_hold_covers_is_still_recorded(budget: Any, llm: Any) -> None:
    """A second completion inside one LLM call (CrewAI's structured-output fallback, a
    context summarisation that skips the hooks) is charged where the call was."""
    from crewai.events.types.llm_events import LLMCallType

    b = budget("1.00")
    model = llm()

    def extra_request(request: Any) -> None:
        model._emit_call_completed_event(
            response="summary",
            call_type=LLMCallType.LLM_CALL,
            usage={"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
        )

    model.during_call = extra_request
    writer = agent("Writer", model)
    Crew(agents=[writer], tasks=[task("write", writer)], **crew_config(b)).kickoff()

    spent = b.report().find("run/crew/Writer/write").spent
    assert (spent.input_tokens, spent.output_tokens) == (1050, 505)
    assert spent.llm_calls == 2
    assert b.report().open_holds == 0
