"""What a user configures for a crew: its budget and per-name limits."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from allotment import Budget, ConfigurationError, Limits


@dataclass(frozen=True, kw_only=True)
class CrewBudget:
    """A crew's budget and the limits of its parts, as ``crew_config`` received them.

    Each kickoff of the crew opens a child of ``budget`` for that run; agents, tasks and
    delegations get children of that (see ``docs/crewai.md``).
    """

    budget: Budget | None = None
    """The budget to charge; ``None``: the current budget when the crew kicks off
    (``with budget.activate():``, a flow's, or the one ``instrument(budget)`` set)."""
    per_agent: Mapping[str, object] = field(default_factory=dict)
    """Limits by agent role. An agent's own tasks share one child per kickoff; each
    delegation to it gets a child of its own with these limits."""
    per_task: Mapping[str, object] = field(default_factory=dict)
    """Limits by task name (or description), one child per task per kickoff."""
    tools: Mapping[str, int] = field(default_factory=dict)
    """Tool-call caps per tool name, per kickoff."""
    name: str | None = None
    """The run's name in the budget tree; by default the crew's name."""

    def __copy__(self) -> CrewBudget:
        return self  # it holds a budget handle, which is affine; the config is immutable

    def __deepcopy__(self, memo: object) -> CrewBudget:
        return self


def parse_limits(value: Mapping[str, object] | None, what: str) -> dict[str, object]:
    """Per-name limits, checked now (a typed error, nothing kept). They are kept in their
    short form and read again when the child opens, so a relative deadline counts from
    then."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{what} must map names to limits (a Limits, '0.10' or {{'llm_calls': 3}}), "
            f"not {type(value).__name__}"
        )
    out: dict[str, object] = {}
    for name, limits in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"{what} keys must be non-empty names, not {name!r}")
        Limits.of(limits, now=time.time())
        out[name] = limits
    return out


def parse_tools(value: Mapping[str, object] | None) -> dict[str, int]:
    """Per-tool caps, checked now."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"tools must map tool names to call caps, not {value!r}")
    caps = Limits.build(per_tool=value, now=0.0).per_tool
    return dict(caps)


def make(
    budget: Budget | None,
    per_agent: Mapping[str, object] | None,
    per_task: Mapping[str, object] | None,
    tools: Mapping[str, object] | None,
    name: str | None,
) -> CrewBudget:
    """A checked ``CrewBudget``."""
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigurationError(
            f"crew_config needs an allotment.Budget (or None for the current one), "
            f"not {type(budget).__name__}"
        )
    return CrewBudget(
        budget=budget,
        per_agent=parse_limits(per_agent, "per_agent"),
        per_task=parse_limits(per_task, "per_task"),
        tools=parse_tools(tools),
        name=name,
    )


CONFIG_ATTRIBUTE = "allotment_config"


def starter(config: CrewBudget) -> Callable[[Any], Any]:
    """The before-kickoff callback ``crew_config`` puts in a crew: it opens the run and
    returns the inputs unchanged. It carries the configuration, so a copied crew
    (``kickoff_for_each``) is budgeted the same way.
    """

    def start(inputs: Any) -> Any:
        from ._run import start as start_run

        start_run(config)
        return inputs

    # CrewAI warns about callbacks it cannot checkpoint by import path, and a closure is
    # one. Named after ``restored``, a checkpointed crew restores with that instead.
    start.__module__ = __name__
    start.__name__ = start.__qualname__ = restored.__name__
    setattr(start, CONFIG_ATTRIBUTE, config)
    return start


def restored(inputs: Any) -> Any:
    """What a crew restored from a CrewAI checkpoint runs in place of its ``crew_config``
    callback (a budget handle cannot be checkpointed): the budget current at kickoff."""
    from ._run import start as start_run

    start_run(CrewBudget())
    return inputs


def starter_of(callbacks: object) -> CrewBudget | None:
    """The configuration of the ``crew_config`` callback among a crew's before-kickoff
    callbacks, if there is one."""
    if isinstance(callbacks, list):
        for callback in callbacks:
            config = getattr(callback, CONFIG_ATTRIBUTE, None)
            if isinstance(config, CrewBudget):
                return config
            if callback is restored:
                return CrewBudget()
    return None


def no_budget() -> ConfigurationError:
    return ConfigurationError(
        "this crew has no budget to charge: pass one to crew_config(budget), or kick it "
        "off inside `with budget.activate():` (or after instrument(budget))"
    )


def crew_config(
    budget: Budget | None = None,
    *,
    per_agent: Mapping[str, object] | None = None,
    per_task: Mapping[str, object] | None = None,
    tools: Mapping[str, object] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """What to spread into a crew so that each kickoff runs under ``budget``:
    ``Crew(agents=..., tasks=..., **crew_config(budget))``.

    Every model call of the crew (its manager's too) is reserved before it is sent and
    settled from the LLM's own usage; a refusal leaves ``kickoff()`` as a
    ``CrewBudgetExceeded`` (an ``allotment.BudgetExceeded`` and a CrewAI ``HookAborted``).

    :param budget: the budget to charge; ``None`` charges the budget current at kickoff.
    :param per_agent: limits by agent role (``{"Researcher": "0.10"}`` or
        ``{"Researcher": {"llm_calls": 4}}``), escrowed from the run.
    :param per_task: limits by task name, one child per task.
    :param tools: tool-call caps per tool name, per kickoff (``{"search": 3}``).
    :param name: the run's name in the budget tree (default: the crew's name).
    :return: ``{"before_kickoff_callbacks": [...]}``; to keep callbacks of your own, add
        them to that list.
    """
    config = make(budget, per_agent, per_task, tools, name)
    return {"before_kickoff_callbacks": [starter(config)]}
