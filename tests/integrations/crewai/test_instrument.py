"""instrument(): every crew, agent and LLM call in the process, with an undo."""

from __future__ import annotations

from typing import Any

import pytest
from allotment_crewai import crew_config, instrument
from crewai import Agent, Crew, Task


def one_agent_crew(llm: Any, **config: Any) -> Crew:
    writer = Agent(role="Writer", goal="write", backstory="writes", llm=llm)
    return Crew(
        agents=[writer],
        tasks=[Task(name="write", description="write", expected_output="text", agent=writer)],
        **config,
    )


@pytest.mark.ledger_differs("the kickoff after undo is unmetered on purpose")
def test_instrument_meters_crews_whose_agents_were_built_before_it_until_undone(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    model = llm()
    crew = one_agent_crew(model)  # executors built now, before any hook exists

    undo = instrument(b)
    try:
        crew.kickoff()
        assert b.spent.llm_calls == 1
        assert b.report().find("run/crew/Writer/write").spent.llm_calls == 1
    finally:
        undo()

    crew.kickoff()
    assert model.calls == 2
    assert b.spent.llm_calls == 1


def test_instrument_twice_counts_each_call_once_and_undo_twice_is_harmless(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    first, second = instrument(b), instrument(b)
    try:
        model = llm()
        one_agent_crew(model).kickoff()  # built after: global and scoped hooks both reach it
    finally:
        first()
        first()
        second()
    assert model.calls == 1 == b.spent.llm_calls


@pytest.mark.parametrize("reporting", ["events", "nothing"])
def test_instrument_meters_a_standalone_agent_and_a_direct_llm_call(
    budget: Any, llm: Any, search_tool: Any, reporting: str
) -> None:
    b = budget("1.00")
    undo = instrument(b)
    try:
        model = llm(reporting=reporting)
        model.tool("search", {"query": "q"}).add("the answer")
        solo = Agent(role="Solo", goal="answer", backstory="alone", llm=model, tools=[search_tool])
        solo.kickoff("a question")
        model.call("hello")
    finally:
        undo()
    assert model.calls == 3
    assert b.spent.llm_calls == 3
    assert b.spent.tool_calls == 1
    report = b.report()
    assert report.find("run/Solo").spent.llm_calls == 2  # the agent's run, closed
    assert report.find("run/Solo").closed
    assert report.open_holds == 0
    if reporting == "events":
        assert b.spent.input_tokens == 3000
    else:
        assert report.estimated_calls == 3


def test_crew_config_wins_over_instrument(budget: Any, llm: Any) -> None:
    process_wide, own = budget("1.00", name="process"), budget("1.00", name="own")
    undo = instrument(process_wide)
    try:
        one_agent_crew(llm(), **crew_config(own)).kickoff()
    finally:
        undo()
    assert own.spent.llm_calls == 1
    assert process_wide.spent.llm_calls == 0


@pytest.mark.ledger_differs("the kickoff with no budget current is unmetered on purpose")
def test_instrument_without_a_budget_charges_the_active_one_and_else_meters_nothing(
    budget: Any, llm: Any
) -> None:
    b = budget("1.00")
    model = llm()
    undo = instrument()
    try:
        with b.activate():
            one_agent_crew(model).kickoff()
        one_agent_crew(model).kickoff()
    finally:
        undo()
    assert model.calls == 2
    assert b.spent.llm_calls == 1
