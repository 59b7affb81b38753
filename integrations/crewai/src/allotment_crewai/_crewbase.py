"""Budgets for ``@CrewBase`` projects: a class decorator that adds the before-kickoff
callback ``crew_config`` would."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from allotment import Budget, ConfigurationError

from ._config import CrewBudget, make, starter

T = TypeVar("T", bound=type)

BUDGET_ATTRIBUTE = "budget"
"""An instance attribute of this name, when set, is the budget the crew is charged to."""


def budgeted(
    budget: Budget | None = None,
    *,
    per_agent: Mapping[str, object] | None = None,
    per_task: Mapping[str, object] | None = None,
    tools: Mapping[str, object] | None = None,
    name: str | None = None,
) -> Callable[[T], T]:
    """Budget a ``@CrewBase`` class: each crew it builds runs under a budget.

    Put it under ``@CrewBase`` (CrewBase collects the before-kickoff method it adds)::

        @CrewBase
        @budgeted(per_agent={"Researcher": "0.10"})
        class ResearchCrew:
            def __init__(self, budget):
                self.budget = budget
            ...

        ResearchCrew(budget).crew().kickoff()

    The budget is ``budget`` if given here, else the instance's ``budget`` attribute,
    else the budget current at kickoff. Options are those of ``crew_config``.
    """
    base = make(budget, per_agent, per_task, tools, name)

    def decorate(cls: T) -> T:
        if getattr(cls, "is_crew_class", False):
            raise ConfigurationError(
                f"@budgeted must go under @CrewBase (it runs first): {cls.__name__} is "
                f"already a crew class"
            )

        def allotment_budget(self: Any, inputs: Any) -> Any:
            chosen = base.budget or getattr(self, BUDGET_ATTRIBUTE, None)
            if chosen is not None and not isinstance(chosen, Budget):
                raise ConfigurationError(
                    f"{type(self).__name__}.{BUDGET_ATTRIBUTE} must be an allotment.Budget, "
                    f"not {type(chosen).__name__}"
                )
            config = base if chosen is base.budget else _with_budget(base, chosen)
            return starter(config)(inputs)

        from crewai.project import before_kickoff

        cls.allotment_budget = before_kickoff(allotment_budget)  # type: ignore[attr-defined]
        return cls

    return decorate


def _with_budget(config: CrewBudget, budget: Budget | None) -> CrewBudget:
    return CrewBudget(
        budget=budget,
        per_agent=config.per_agent,
        per_task=config.per_task,
        tools=config.tools,
        name=config.name,
    )
