"""Delegation: a coworker runs on a child budget carved from its delegator's."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from allotment.testing import Reply, ToolCall
from allotment_crewai import CrewBudgetExceeded, crew_config
from crewai import Agent, Crew, Process, Task


def agent(role: str, llm: Any, **kw: Any) -> Agent:
    kw.setdefault("goal", f"do the {role.lower()} work")
    kw.setdefault("backstory", f"an experienced {role.lower()}")
    return Agent(role=role, llm=llm, **kw)


def delegate(coworker: str, what: str = "find the facts") -> Reply:
    return Reply.tool_call(
        "delegate_work_to_coworker",
        {"task": what, "context": "for the report", "coworker": coworker},
    )


def hierarchical(manager: Any, *coworkers: Agent, **config: Any) -> Crew:
    report = Task(name="report", description="write the report", expected_output="a report")
    return Crew(
        agents=list(coworkers),
        tasks=[report],
        process=Process.hierarchical,
        manager_llm=manager,
        **config,
    )


def test_a_coworker_runs_on_a_child_of_the_managers_budget_closed_when_it_returns(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    during: list[Decimal | None] = []
    manager = llm()
    manager.add(delegate("researcher"), "the report")
    worker = llm()
    worker.responder = lambda request: during.append(b.remaining.usd)  # type: ignore[func-returns-value]
    researcher = agent("Researcher", worker)
    crew = hierarchical(manager, researcher, **crew_config(b, per_agent={"Researcher": "0.10"}))

    out = crew.kickoff()

    assert out.raw == "the report"
    assert (manager.calls, worker.calls) == (2, 1)
    assert during == [Decimal("0.875")]  # 1 - manager's first call - the escrowed $0.10
    report = b.report()
    child = report.find("run/crew/Crew Manager/report/Researcher")
    assert child.closed
    assert child.limits["usd"] == Decimal("0.1")
    assert child.spent.usd == Decimal("0.025")
    assert child.spent.llm_calls == 1
    manager_own = report.find("run/crew/Crew Manager").spent.llm_calls - child.spent.llm_calls
    assert manager_own == 2
    assert b.remaining.usd == Decimal("0.925")
    assert b.spent.llm_calls == manager.calls + worker.calls


def test_a_refusal_by_the_delegates_own_budget_stays_inside_the_delegate(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("1.00")
    manager = llm()
    manager.add(delegate("Researcher"), "report written without more research")
    worker = llm(default=Reply.tool_call("search", {"query": "more"}))
    researcher = agent("Researcher", worker, tools=[search_tool], max_iter=10)
    crew = hierarchical(
        manager, researcher, **crew_config(b, per_agent={"Researcher": {"llm_calls": 2}})
    )

    out = crew.kickoff()

    assert out.raw == "report written without more research"
    assert worker.calls == 2
    told = manager.requests[-1].text
    assert "Researcher" in told
    assert "llm_calls" in told
    child = b.report().find("run/crew/Crew Manager/report/Researcher")
    assert child.refusals == 1
    assert child.spent.llm_calls == 2
    assert b.spent.llm_calls == manager.calls + worker.calls
    assert b.report().open_holds == 0


def test_the_crews_own_budget_still_stops_the_crew_when_a_delegate_reaches_it(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    b = budget("0.08")
    manager = llm()
    manager.add(delegate("Researcher"), "never reached")
    worker = llm(default=Reply.tool_call("search", {"query": "more"}))
    researcher = agent("Researcher", worker, tools=[search_tool], max_iter=10)
    crew = hierarchical(manager, researcher, **crew_config(b))

    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()

    assert info.value.path == "run"
    assert manager.calls == 1
    assert worker.calls == 2
    assert b.spent.usd == Decimal("0.075") <= Decimal("0.08")
    assert b.spent.llm_calls == manager.calls + worker.calls
    assert b.report().open_holds == 0


def test_asking_a_coworker_in_a_sequential_crew_opens_a_delegation_child(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    asker_llm = llm()
    asker_llm.add(
        Reply.tool_call(
            "ask_question_to_coworker",
            {"question": "what is x?", "context": "c", "coworker": "Expert"},
        ),
        "x is known now",
    )
    expert_llm = llm()
    expert_llm.add("x is 42")
    asker = agent("Writer", asker_llm, allow_delegation=True)
    expert = agent("Expert", expert_llm)
    write = Task(name="write", description="write", expected_output="text", agent=asker)
    crew = Crew(agents=[asker, expert], tasks=[write], **crew_config(b))

    crew.kickoff()

    report = b.report()
    child = report.find("run/crew/Writer/write/Expert")
    assert child.closed
    assert child.spent.llm_calls == 1
    assert "x is 42" in asker_llm.requests[-1].text
    assert b.spent.llm_calls == 3


def test_parallel_delegations_run_on_separate_children_in_separate_threads(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    manager = llm()
    manager.add(
        Reply.tool_calls(
            *(
                ToolCall(
                    "delegate_work_to_coworker",
                    {"task": f"part {n}", "context": "c", "coworker": f"Researcher {n}"},
                    id=f"call_{n}",
                )
                for n in "ABC"
            )
        ),
        "merged",
    )
    shared = llm()
    workers = [agent(f"Researcher {n}", shared) for n in "ABC"]
    crew = hierarchical(manager, *workers, **crew_config(b))

    crew.kickoff()

    threads = {r.thread for r in shared.requests}
    assert len(threads) == 3
    assert threading.get_ident() not in threads
    node = b.report().find("run/crew/Crew Manager/report")
    assert sorted(c.name for c in node.children) == ["Researcher A", "Researcher B", "Researcher C"]
    assert all(c.closed and c.spent.llm_calls == 1 for c in node.children)
    assert b.spent.llm_calls == 5


def test_a_nested_delegation_is_a_grandchild_and_its_refusal_stays_where_it_happened(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    from crewai.tools.agent_tools.agent_tools import AgentTools

    b = budget("1.00")
    manager = llm()
    manager.add(delegate("Lead"), "done")
    lead_llm = llm()
    lead_llm.add(delegate("Junior", "the small part"), "lead done")
    junior_llm = llm(default=Reply.tool_call("search", {"query": "more"}))
    junior = agent("Junior", junior_llm, tools=[search_tool], max_iter=5)
    lead = agent("Lead", lead_llm, tools=AgentTools(agents=[junior]).tools())
    crew = hierarchical(
        manager, lead, junior, **crew_config(b, per_agent={"Junior": {"llm_calls": 1}})
    )

    out = crew.kickoff()

    assert out.raw == "done"
    assert (manager.calls, lead_llm.calls, junior_llm.calls) == (2, 2, 1)
    report = b.report()
    grandchild = report.find("run/crew/Crew Manager/report/Lead/Junior")
    assert grandchild.closed
    assert grandchild.spent.llm_calls == 1
    assert grandchild.refusals == 1
    assert "llm_calls" in lead_llm.requests[-1].text  # the lead read its junior's refusal
    assert report.find("run/crew/Crew Manager/report/Lead").closed
    assert b.spent.llm_calls == 5
    assert b.report().open_holds == 0


def test_the_child_limits_hook_sets_a_delegations_limits_when_none_are_configured(
    budget: Any, llm: Any, search_tool: Any
) -> None:
    import allotment

    seen: list[allotment.Spawn] = []

    class OneCallPerDelegation:
        @allotment.hookimpl
        def allotment_child_limits(
            self, parent: Any, spawn: allotment.Spawn
        ) -> allotment.Limits | None:
            seen.append(spawn)
            if spawn.how == "delegation":
                return allotment.Limits(llm_calls=1)
            return None

    b = budget("1.00")
    manager = llm()
    manager.add(delegate("Researcher"), "done")
    worker = llm(default=Reply.tool_call("search", {"query": "more"}))
    crew = hierarchical(manager, agent("Researcher", worker, tools=[search_tool]), **crew_config(b))
    policy = OneCallPerDelegation()
    allotment.plugins().register(policy)
    try:
        crew.kickoff()
    finally:
        allotment.plugins().unregister(policy)

    assert [(s.how, s.framework) for s in seen] == [
        ("crew", "crewai"),
        ("agent", "crewai"),
        ("task", "crewai"),
        ("delegation", "crewai"),
    ]
    assert seen[-1].metadata["delegator"] == "Crew Manager"
    child = b.report().find("run/crew/Crew Manager/report/Researcher")
    assert child.limits == {"llm_calls": 1}
    assert child.refusals == 1
    assert worker.calls == 1
