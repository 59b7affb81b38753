"""@budgeted: the crew_config of @CrewBase projects."""

from __future__ import annotations

from typing import Any

import allotment
import pytest
from allotment_crewai import budgeted
from crewai import Agent, Crew, Task
from crewai.project import CrewBase, agent, crew, task


def make_project(model: Any, **options: Any) -> type:
    @CrewBase
    @budgeted(**options)
    class Newsroom:
        agents_config: dict[str, Any] = {}  # noqa: RUF012 - CrewBase reads these by name
        tasks_config: dict[str, Any] = {}  # noqa: RUF012

        def __init__(self, budget: allotment.Budget | None = None) -> None:
            self.budget = budget

        @agent
        def reporter(self) -> Agent:
            return Agent(role="Reporter", goal="report", backstory="reports", llm=model)

        @task
        def story(self) -> Task:
            return Task(
                name="story", description="a story", expected_output="text", agent=self.reporter()
            )

        @crew
        def crew(self) -> Crew:
            return Crew(agents=self.agents, tasks=self.tasks)

    return Newsroom


def test_a_budgeted_crewbase_crew_runs_under_the_instances_budget(budget: Any, llm: Any) -> None:
    b = budget("1.00")
    model = llm()
    newsroom = make_project(model, per_agent={"Reporter": {"llm_calls": 3}})

    newsroom(b).crew().kickoff()

    node = b.report().find("run/Newsroom/Reporter")  # CrewBase names the crew
    assert node.spent.llm_calls == 1 == model.calls
    assert node.limits["llm_calls"] == 3


def test_without_an_instance_budget_it_charges_the_current_one(budget: Any, llm: Any) -> None:
    b = budget("1.00")
    newsroom = make_project(llm())
    with b.activate():
        newsroom().crew().kickoff()
    assert b.spent.llm_calls == 1


def test_budgeted_above_crewbase_is_a_typed_error_that_says_where_it_goes() -> None:
    @CrewBase
    class Plain:
        agents_config: dict[str, Any] = {}  # noqa: RUF012
        tasks_config: dict[str, Any] = {}  # noqa: RUF012

    with pytest.raises(allotment.ConfigurationError, match="under @CrewBase"):
        budgeted()(Plain)
