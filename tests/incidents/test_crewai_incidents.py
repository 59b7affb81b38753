"""CrewAI incidents from the catalogue (INCIDENTS.md 11-15), reproduced on real crews with
a scripted model, and stopped. Every scenario also checks: recorded spend <= cap, the
model's call count equals the calls admitted, no open holds at the end."""

# CrewAI must see the environment below before it is first imported.
# ruff: noqa: E402

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

# CrewAI reads these at import and kickoff (telemetry, trace uploads, the PyPI version
# check and the first-run prompt would reach the network or wait for input).
for _key, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
    "CREWAI_TESTING": "true",
    "CREWAI_STORAGE_DIR": os.path.join(tempfile.gettempdir(), "allotment-crewai-incidents"),
}.items():
    os.environ.setdefault(_key, _value)

with warnings.catch_warnings():
    # crewai 1.15 trips an ImportWarning of its own (crewai.rag.embeddings) on import.
    warnings.simplefilter("ignore", ImportWarning)
    from crewai import Agent, Crew, Process, Task
    from crewai.hooks import (
        HookAborted,
        register_before_tool_call_hook,
        unregister_before_tool_call_hook,
    )
    from crewai.tools import BaseTool

import allotment
from allotment import Budget, Estimate, Price
from allotment.testing import Reply, ScriptedProvider, ToolCall, Usage
from allotment_crewai import CrewBudgetExceeded, crew_config
from allotment_crewai.testing import ScriptedLLM

pytestmark = [
    # CrewAI 1.15 warns from its own code while agents are built (deprecated fields).
    pytest.mark.filterwarnings("ignore:function_calling_llm is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:deprecated$:DeprecationWarning"),
]

PRICES = {"fake-1": Price(input_mtok="10", output_mtok="30")}


class Search(BaseTool):
    name: str = "search"
    description: str = "Search the web for a query."
    runs: int = 0

    def _run(self, query: str = "") -> str:
        self.runs += 1
        return f"results for {query!r}"


def agent(role: str, llm: Any, **kw: Any) -> Agent:
    kw.setdefault("goal", f"do the {role.lower()} work")
    kw.setdefault("backstory", f"an experienced {role.lower()}")
    return Agent(role=role, llm=llm, **kw)


def scripted(**kw: Any) -> ScriptedLLM:
    kw.setdefault("model", "fake-1")
    kw.setdefault("max_tokens", 500)
    kw.setdefault("usage", Usage(1000, 500))
    return ScriptedLLM(**kw)


def assert_held_the_line(budget: Budget, cap: Decimal, *models: Any) -> None:
    """The three checks every scenario makes."""
    spent = budget.spent
    assert spent.usd is not None
    assert spent.usd <= cap
    assert sum(m.calls for m in models) == spent.llm_calls  # called == admitted
    report = budget.report()
    assert report.open_holds == 0
    assert budget.held.llm_calls == 0


# -- 11 ------------------------------------------------------------------------------------


def test_crai_011_an_agent_past_max_iter_is_stopped_by_our_call_cap() -> None:
    """[CRAI-011 #3847, CRAI-001] max_iter=2 whose model never gives a final answer:
    CrewAI makes a third call anyway (max_iter=N allows N+1); our cap of 2 stops it."""

    def never_done(request: Any) -> Reply:
        # a tool call whenever tools are offered; the forced last call offers none
        if request.tools:
            return Reply.tool_call("search", {"query": "one more time"})
        return Reply.text("still searching")

    control_model = scripted()
    control_model.responder = never_done
    control = Budget("1.00", name="control", prices=PRICES)
    looper = agent("Researcher", control_model, tools=[Search()], max_iter=2)
    research = Task(name="research", description="research", expected_output="facts", agent=looper)
    Crew(agents=[looper], tasks=[research], **crew_config(control)).kickoff()
    assert control_model.calls == 3  # max_iter=2 did not hold

    cap = Decimal("1.00")
    b = Budget(cap, name="run", prices=PRICES)
    model = scripted()
    model.responder = never_done
    tool = Search()
    looper = agent("Researcher", model, tools=[tool], max_iter=2)
    research = Task(name="research", description="research", expected_output="facts", agent=looper)
    crew = Crew(
        agents=[looper],
        tasks=[research],
        **crew_config(b, per_agent={"Researcher": {"llm_calls": 2}}),
    )

    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()

    assert (info.value.path, info.value.limit_name) == ("run/crew/Researcher", "llm_calls")
    assert model.calls == 2
    assert tool.runs == 2
    assert_held_the_line(b, cap, model)


def test_crai_011_a_crew_call_cap_holds_with_crewais_default_max_iter() -> None:
    cap = Decimal("1.00")
    b = Budget(cap, llm_calls=4, name="run", prices=PRICES)
    model = scripted(default=Reply.tool_call("search", {"query": "again"}))
    looper = agent("Researcher", model, tools=[Search()])  # max_iter 25
    research = Task(name="research", description="research", expected_output="facts", agent=looper)

    with pytest.raises(CrewBudgetExceeded) as info:
        Crew(agents=[looper], tasks=[research], **crew_config(b)).kickoff()

    assert info.value.limit_name == "llm_calls"
    assert model.calls == 4
    assert_held_the_line(b, cap, model)


# -- 12 ------------------------------------------------------------------------------------


def test_crai_012_manager_ping_pong_is_held_by_the_delegates_budget_and_the_crews() -> None:
    """[CRAI-009 #2938, CRAI-008 #2838] The manager keeps asking a coworker the same
    question. Each delegation's child (1 call) refuses the coworker's second call, and
    the refusal goes back to the manager as text; the crew's cap (9 calls) stops it all:
    the next delegation cannot even get its child's one call set aside."""
    cap = Decimal("1.00")
    b = Budget(cap, llm_calls=9, name="run", prices=PRICES)
    ask = Reply.tool_call(
        "ask_question_to_coworker",
        {"question": "what is the answer?", "context": "again", "coworker": "Researcher"},
    )
    manager = scripted(default=ask)
    worker = scripted(default=Reply.tool_call("search", {"query": "the answer"}))
    researcher = agent("Researcher", worker, tools=[Search()])
    crew = Crew(
        agents=[researcher],
        tasks=[Task(name="answer", description="find the answer", expected_output="it")],
        process=Process.hierarchical,
        manager_llm=manager,
        **crew_config(b, per_agent={"Researcher": {"llm_calls": 1}}),
    )

    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()

    assert (info.value.path, info.value.limit_name) == ("run", "llm_calls")
    assert "allotting 'Researcher'" in str(info.value)
    report = b.report()
    task = report.find("run/crew/Crew Manager/answer")
    delegations = [c for c in task.children if c.name == "Researcher"]
    assert len(delegations) == 4
    # each delegation's child held: one call, and the second refused inside it
    assert all(d.closed and d.spent.llm_calls == 1 and d.refusals == 1 for d in delegations)
    by_agent = {
        "Crew Manager": task.spent.llm_calls - sum(d.spent.llm_calls for d in delegations),
        "Researcher": sum(d.spent.llm_calls for d in delegations),
    }
    assert by_agent == {"Crew Manager": 5, "Researcher": 4}
    assert (manager.calls, worker.calls) == (5, 4)
    assert b.spent.llm_calls == 9
    assert_held_the_line(b, cap, manager, worker)


# -- 13 ------------------------------------------------------------------------------------


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    with ScriptedProvider(default=None) as p:
        yield p


def test_crai_013_a_provider_that_reports_no_usage_is_never_counted_as_zero(
    provider: ScriptedProvider,
) -> None:
    """[CRAI-007 #1606] Three replies without usage through CrewAI's OpenAI provider: the
    report is above $0, and says it is an estimate."""
    from crewai import LLM

    provider.add(
        Reply.tool_call("search", {"query": "a"}, usage=None),
        Reply.tool_call("search", {"query": "b"}, usage=None),
        Reply.text("the facts", usage=None),
    )
    cap = Decimal("0.50")
    b = Budget(cap, name="run")
    llm = LLM(
        model="openai/gpt-4o-mini",
        base_url=provider.base_url,
        api_key=provider.api_key,
        max_tokens=300,
    )
    researcher = agent("Researcher", llm, tools=[Search()])
    research = Task(
        name="research", description="research", expected_output="facts", agent=researcher
    )

    Crew(agents=[researcher], tasks=[research], **crew_config(b)).kickoff()

    report = b.report()
    assert provider.calls == 3
    assert all(r.usage is None for r in provider.requests)
    assert report.estimated_calls == 3
    assert report.spent.estimated
    assert report.spent.usd is not None
    assert report.spent.usd > 0
    assert report.spent.output_tokens == 900  # three holds' bound of max_tokens 300
    assert "estimated" in str(report) or report.estimated_calls
    assert provider.calls == b.spent.llm_calls
    assert b.spent.usd <= cap
    assert report.open_holds == 0


# -- 14 ------------------------------------------------------------------------------------


class ExactEstimates:
    """Estimates every model call at 22 in / 3 out ($0.00031), and counts refusals."""

    def __init__(self) -> None:
        self.refusals = 0
        self.two_refused = threading.Event()
        self.lock = threading.Lock()

    @allotment.hookimpl(tryfirst=True)
    def allotment_estimate(self, call: allotment.Call) -> Estimate | None:
        if call.kind != "llm":
            return None
        return Estimate(usage=allotment.Usage(input_tokens=22, output_tokens=3, llm_calls=1))

    @allotment.hookimpl
    def allotment_budget_exceeded(self, budget: Budget, error: Exception) -> None:
        with self.lock:
            self.refusals += 1
            if self.refusals >= 2:
                self.two_refused.set()


def fan_out_crew(manager: ScriptedLLM, workers: ScriptedLLM, **config: Any) -> Crew:
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
    return Crew(
        agents=[agent(f"Researcher {n}", workers) for n in "ABC"],
        tasks=[Task(name="report", description="write the report", expected_output="text")],
        process=Process.hierarchical,
        manager_llm=manager,
        **config,
    )


@pytest.fixture
def exact_estimates() -> Iterator[ExactEstimates]:
    plugin = ExactEstimates()
    allotment.plugins().register(plugin)
    yield plugin
    allotment.plugins().unregister(plugin)


@pytest.fixture
def three_at_once() -> Iterator[None]:
    """Hold the three parallel delegations at a gate until all three have started."""
    gate = threading.Barrier(3, timeout=10)

    def wait(context: Any) -> None:
        if context.tool_name == "delegate_work_to_coworker":
            gate.wait()

    register_before_tool_call_hook(wait)
    yield
    unregister_before_tool_call_hook(wait)


def test_crai_014_a_delegation_fan_out_race_admits_exactly_one_every_time(
    exact_estimates: ExactEstimates, three_at_once: None
) -> None:
    """Three coworkers the manager delegates to at once (CrewAI runs them in parallel
    threads) with $0.00060 left; each call is estimated $0.00031 and costs $0.00023.
    Exactly one is admitted, 30 trials out of 30; the other two refusals come from the
    crew's budget, so they stop the crew."""
    cost = Usage(20, 1)  # $0.00023 at fake-1's prices
    cap = Decimal("0.00083")  # the manager's first call, then $0.00060 left
    for trial in range(30):
        exact_estimates.refusals = 0
        exact_estimates.two_refused.clear()
        b = Budget(cap, name="run", prices=PRICES)
        manager, workers = scripted(usage=cost), scripted(usage=cost)
        # the admitted call stays in flight until the other two were refused
        workers.during_call = lambda request: exact_estimates.two_refused.wait(5)

        with pytest.raises(CrewBudgetExceeded) as info:
            fan_out_crew(manager, workers, **crew_config(b)).kickoff()

        assert info.value.path == "run", trial
        fan_out_spend = b.spent.usd - Decimal("0.00023")
        assert workers.calls == 1, trial
        assert fan_out_spend == Decimal("0.00023"), trial
        assert fan_out_spend <= Decimal("0.00060")  # zero overshoot
        assert exact_estimates.refusals == 2, trial
        assert_held_the_line(b, cap, manager, workers)


def test_crai_014_the_naive_check_then_record_control_overshoots_every_time() -> None:
    """The same fan-out guarded by "spent + estimate <= cap" checked before each call and
    spend recorded after it: all three pass the check, $0.00069 against $0.00060."""
    cap, estimate, cost = Decimal("0.00060"), Decimal("0.00031"), Decimal("0.00023")
    for trial in range(30):
        spent = [Decimal(0)]
        lock = threading.Lock()
        in_call = threading.Barrier(3, timeout=10)

        def check(context: Any, spent: list[Decimal] = spent, lock: Any = lock) -> None:
            if context.agent is not None and context.agent.role.startswith("Researcher"):
                with lock:
                    if spent[0] + estimate > cap:
                        raise HookAborted("over the cap")

        def record(
            request: Any, spent: list[Decimal] = spent, lock: Any = lock, gate: Any = in_call
        ) -> None:
            gate.wait()  # all three are past the check before anyone records
            with lock:
                spent[0] += cost

        from crewai.hooks import register_before_llm_call_hook, unregister_before_llm_call_hook

        register_before_llm_call_hook(check)
        try:
            manager, workers = scripted(usage=Usage(20, 1)), scripted(usage=Usage(20, 1))
            workers.during_call = record
            fan_out_crew(manager, workers).kickoff()
        finally:
            unregister_before_llm_call_hook(check)
        assert workers.calls == 3, trial
        assert spent[0] == Decimal("0.00069") > cap, trial


# -- 15 ------------------------------------------------------------------------------------


def test_crai_015_child_budgets_split_and_return_what_they_did_not_spend() -> None:
    """Parent $1.00 allots $0.30 to each of three sub-agents (their tasks); each spends
    $0.10; as each finishes its $0.20 returns; the parent shows $0.30 spent, per child."""
    cap = Decimal("1.00")
    b = Budget(cap, name="run", prices=PRICES)
    seen: list[Decimal | None] = []
    models = []
    agents, tasks = [], []
    for name in ("a", "b", "c"):
        model = scripted(usage=Usage(4000, 2000), max_tokens=2000)  # $0.10 a call
        model.responder = lambda request: seen.append(b.remaining.usd)  # type: ignore[func-returns-value]
        models.append(model)
        who = agent(f"Agent {name.upper()}", model)
        agents.append(who)
        tasks.append(Task(name=name, description=f"part {name}", expected_output="x", agent=who))
    crew = Crew(
        agents=agents,
        tasks=tasks,
        **crew_config(b, per_task={"a": "0.30", "b": "0.30", "c": "0.30"}),
    )

    crew.kickoff()

    # during each task its $0.30 is set aside; what finished tasks left came back
    assert seen == [Decimal("0.70"), Decimal("0.60"), Decimal("0.50")]
    assert b.spent.usd == Decimal("0.30")
    assert b.remaining.usd == Decimal("0.70")
    report = b.report()
    children = [report.find(f"run/crew/Agent {n.upper()}/{n}") for n in "abc"]
    assert [c.limits["usd"] for c in children] == [Decimal("0.3")] * 3
    assert [c.spent.usd for c in children] == [Decimal("0.1")] * 3
    assert all(c.closed and c.allotted_usd == 0 for c in children)
    assert_held_the_line(b, cap, *models)
