"""What allotment-crewai adds to each model call, in microseconds (printed, not asserted).

Run: ``uv run pytest tests/benchmarks/test_crewai_overhead.py -s --benchmarks``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

# CrewAI must see the environment below before it is first imported.
# ruff: noqa: E402
for _key, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
    "CREWAI_TESTING": "true",
    "CREWAI_STORAGE_DIR": os.path.join(tempfile.gettempdir(), "allotment-crewai-bench"),
}.items():
    os.environ.setdefault(_key, _value)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ImportWarning)  # crewai 1.15's own, at import
    from crewai import Agent, Crew, Task
    from crewai.tools import BaseTool

from allotment import Budget, Price
from allotment.testing import Reply, Usage
from allotment_crewai import crew_config, instrument
from allotment_crewai.testing import ScriptedLLM

pytestmark = [
    pytest.mark.filterwarnings("ignore:function_calling_llm is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:deprecated$:DeprecationWarning"),
]

PRICES = {"fake-1": Price(input_mtok="10", output_mtok="30")}
MESSAGES = [
    {"role": "system", "content": "You are a careful researcher. " * 20},
    {"role": "user", "content": "Find out what the budget kernel does, and say it briefly."},
]


class Search(BaseTool):
    name: str = "search"
    description: str = "Search the web for a query."

    def _run(self, query: str = "") -> str:
        return "results"


def _llm() -> ScriptedLLM:
    return ScriptedLLM(model="fake-1", max_tokens=500, usage=Usage(1000, 500))


def _per_call_us(run: Callable[[], int], repeats: int) -> float:
    """Median microseconds per model call over ``repeats`` runs (each returns its calls)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        calls = run()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def test_added_microseconds_per_direct_llm_call() -> None:
    """An LLM called directly (CrewAI's hooks dispatched inside the call). Printed: the
    call without hooks; with a no-op hook (what CrewAI's dispatch costs by itself, it
    emits a telemetry event per dispatch once any hook is registered); with allotment;
    and the kernel's own reserve + settle for the same call, measured alone."""
    from allotment import Call
    from allotment import Usage as Spent
    from crewai.hooks import (
        register_after_llm_call_hook,
        register_before_llm_call_hook,
        unregister_after_llm_call_hook,
        unregister_before_llm_call_hook,
    )

    calls = 300
    model = _llm()
    budget = Budget(1000, name="bench", prices=PRICES)

    def run() -> int:
        for _ in range(calls):
            model.call(MESSAGES)
        return calls

    def noop(context: Any) -> None:
        return None

    def with_noop_hooks() -> int:
        register_before_llm_call_hook(noop)
        register_after_llm_call_hook(noop)
        try:
            return run()
        finally:
            unregister_before_llm_call_hook(noop)
            unregister_after_llm_call_hook(noop)

    def metered() -> int:
        undo = instrument(budget)
        try:
            return run()
        finally:
            undo()

    def kernel_only() -> int:
        call = Call(model="fake-1", messages=tuple(MESSAGES), max_output_tokens=500)
        spent = Spent(input_tokens=1000, output_tokens=500, llm_calls=1)
        for _ in range(calls):
            budget.reserve(call).settle(spent)
        return calls

    for warm in (run, with_noop_hooks, metered, kernel_only):
        warm()
    samples: dict[str, list[float]] = {"bare": [], "noop": [], "ours": [], "kernel": []}
    for _ in range(5):  # interleaved, so drift hits all alike
        samples["bare"].append(_per_call_us(run, 1))
        samples["noop"].append(_per_call_us(with_noop_hooks, 1))
        samples["ours"].append(_per_call_us(metered, 1))
        samples["kernel"].append(_per_call_us(kernel_only, 1))
    bare, noop_us, ours, kernel = (statistics.median(samples[k]) for k in samples)
    print(
        f"\ncrewai direct LLM.call ({calls} calls x 5, median): {bare:.0f} us bare, "
        f"{noop_us:.0f} us with a no-op hook (+{noop_us - bare:.0f}, CrewAI's dispatch), "
        f"{ours:.0f} us with allotment (+{ours - bare:.0f}); of that the kernel's reserve "
        f"+ settle alone is {kernel:.0f} us, the integration's own "
        f"~{ours - noop_us - kernel:.0f} us"
    )


def test_added_microseconds_per_llm_call_in_a_crew() -> None:
    """A real crew: one agent that calls a tool 20 times, then answers. The difference
    per model call between kickoffs with and without crew_config, run in pairs."""
    turns = 20

    def crew_run(config: dict[str, Any]) -> Callable[[], int]:
        def run() -> int:
            llm = _llm()
            for i in range(turns):
                llm.add(Reply.tool_call("search", {"query": f"q{i}"}))
            llm.add("final")
            researcher = Agent(
                role="Researcher",
                goal="research",
                backstory="careful",
                llm=llm,
                tools=[Search()],
                max_iter=turns + 5,
            )
            research = Task(
                name="research", description="research", expected_output="x", agent=researcher
            )
            Crew(agents=[researcher], tasks=[research], **config).kickoff()
            return llm.calls

        return run

    budget = Budget(1000, name="bench", prices=PRICES)
    plain, metered = crew_run({}), crew_run(crew_config(budget))
    plain()
    metered()
    base, ours = [], []
    for _ in range(7):
        base.append(_per_call_us(plain, 1))
        ours.append(_per_call_us(metered, 1))
    diffs = [o - b for o, b in zip(ours, base, strict=True)]
    print(
        f"\ncrewai crew kickoff: {statistics.median(base):.0f} us per model call without, "
        f"{statistics.median(ours):.0f} us with allotment -> "
        f"+{statistics.median(diffs):.0f} us per call (median of 7 paired kickoffs of "
        f"{turns + 1} calls; spread {min(diffs):.0f}..{max(diffs):.0f} us)"
    )
