"""Crews inside flows and crews side by side in threads."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

from allotment.testing import Reply, Usage
from allotment_crewai import crew_config, instrument
from crewai import Agent, Crew, Task
from crewai.flow.flow import Flow, listen, start


def one_agent_crew(llm: Any, role: str = "Writer", **config: Any) -> Crew:
    writer = Agent(role=role, goal="write", backstory="writes", llm=llm)
    return Crew(
        agents=[writer],
        tasks=[Task(name="write", description="write", expected_output="text", agent=writer)],
        **config,
    )


def test_a_crew_inside_a_flow_charges_the_budget_active_when_the_flow_kicks_off(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    model = llm()

    class Pipeline(Flow):  # type: ignore[type-arg]
        _skip_auto_memory = True  # a flow's own Memory imports lancedb (4 s); unused here

        @start()
        def draft(self) -> str:
            return str(one_agent_crew(model, "Drafter", **crew_config()).kickoff().raw)

        @listen(draft)
        def polish(self, text: str) -> str:
            return str(one_agent_crew(model, "Editor", **crew_config()).kickoff().raw)

    with b.activate():
        Pipeline().kickoff()

    report = b.report()
    assert [c.path for c in report.children] == ["run/crew", "run/crew#2"]
    assert report.find("run/crew/Drafter").spent.llm_calls == 1
    assert report.find("run/crew#2/Editor").spent.llm_calls == 1
    assert model.calls == 2 == b.spent.llm_calls


def test_instrument_meters_a_flows_crews_under_the_flows_budget(budget: Any, llm: Any) -> None:
    b = budget("1.00")
    model = llm()

    class Pipeline(Flow):  # type: ignore[type-arg]
        _skip_auto_memory = True  # a flow's own Memory imports lancedb (4 s); unused here

        @start()
        def draft(self) -> str:
            return str(one_agent_crew(model).kickoff().raw)

    undo = instrument()
    try:
        with b.activate():
            Pipeline().kickoff()
    finally:
        undo()
    assert b.spent.llm_calls == 1 == model.calls


def test_two_crews_in_threads_keep_separate_budgets_even_through_one_shared_llm(
    budget: Any, llm: Any
) -> None:
    """Each reply's usage says which crew asked; each budget is charged its own calls
    exactly (an LLM's lifetime counters would mix calls made at the same time)."""
    shared = llm()
    gate = threading.Barrier(2, timeout=10)

    def answer(request: Any) -> Reply:
        gate.wait()  # both crews are inside a call at once
        size = 100 if request.agent == "Alpha" else 200
        return Reply.text(f"{request.agent} done", usage=Usage(size, size // 10))

    shared.responder = answer
    alpha, beta = budget("1.00", name="alpha"), budget("1.00", name="beta")
    crews = [
        one_agent_crew(shared, "Alpha", **crew_config(alpha)),
        one_agent_crew(shared, "Beta", **crew_config(beta)),
    ]
    outputs: list[str] = []
    threads = [threading.Thread(target=lambda c=c: outputs.append(c.kickoff().raw)) for c in crews]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert sorted(outputs) == ["Alpha done", "Beta done"]
    assert (alpha.spent.input_tokens, alpha.spent.output_tokens) == (100, 10)
    assert (beta.spent.input_tokens, beta.spent.output_tokens) == (200, 20)
    assert alpha.spent.usd == Decimal("0.0013")
    assert beta.spent.usd == Decimal("0.0026")
    assert shared.calls == 2
