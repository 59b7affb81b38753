"""Incidents reproduced inside LlamaIndex and stopped by allotment-llamaindex (INCIDENTS.md
14, 15 and 16 [LLMI-003]).

Each test also proves: recorded spend <= cap; the fake provider's call count equals the
calls admitted; no open holds at the end.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import allotment
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "llamaindex"))
pytest.importorskip("llama_index.core", reason="the LlamaIndex incidents need llama-index-core")
pytest.importorskip("llama_index.llms.openai", reason="and llama-index-llms-openai")

from allotment.testing import Reply, ScriptedProvider, Usage
from allotment_llamaindex import instrument
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.callbacks import CallbackManager, CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llamaindex_fakes import (
    PRICES,
    CountingEmbedding,
    ScriptedLLM,
    close_llms,
    cost,
    openai_llm,
    restored_llamaindex,
)

pytestmark = [
    # Building workflow agents makes the workflows package touch pydantic's deprecated
    # instance attributes (inspect.getmembers). Not ours to fix.
    pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated"),
    pytest.mark.filterwarnings("ignore:The `__fields_set__` attribute is deprecated"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_"),
]


@pytest.fixture(autouse=True)
async def llamaindex_state() -> AsyncIterator[None]:
    with restored_llamaindex():
        yield
        await close_llms()


def _check(budget: allotment.Budget, cap: Decimal, admitted_by_provider: int) -> None:
    """The three facts every incident test proves."""
    report = budget.report()
    assert report.spent.usd is not None
    assert report.spent.usd <= cap
    assert report.spent.llm_calls == admitted_by_provider
    assert report.open_holds == 0


# -- 14: delegation fan-out race ------------------------------------------------------------

ESTIMATE = Decimal("0.00031")
COST = Decimal("0.00023")
LEFT = Decimal("0.00060")


class _FixedEstimate:
    """Every fake-1 call is estimated at 25 in / 2 out tokens: $0.00031 at fake-1's price."""

    @allotment.hookimpl(tryfirst=True)
    def allotment_estimate(self, call: allotment.Call) -> allotment.Estimate | None:
        if call.kind != "llm" or call.model != "fake-1":
            return None
        return allotment.Estimate(
            usage=allotment.Usage(input_tokens=25, output_tokens=2, llm_calls=1)
        )


class _Reserves:
    """Records what every hold reserved."""

    def __init__(self) -> None:
        self.usd: list[Decimal | None] = []

    @allotment.hookimpl
    def allotment_event(self, event: allotment.Event) -> None:
        if event.kind == "reserve":
            self.usd.append(event.usd)


@pytest.fixture
def fixed_estimate() -> Iterator[_Reserves]:
    reserves = _Reserves()
    plugins = allotment.plugins()
    plugins.register(_FixedEstimate())
    plugins.register(reserves)
    try:
        yield reserves
    finally:
        for plugin in list(plugins.pm.get_plugins()):
            if isinstance(plugin, (_FixedEstimate, _Reserves)):
                plugins.unregister(plugin)


def _sub_agents(provider: ScriptedProvider) -> list[FunctionAgent]:
    llm = openai_llm(provider, model="fake-1", max_tokens=2)
    return [
        FunctionAgent(name=f"worker{i}", description="works", llm=llm, streaming=False)
        for i in range(3)
    ]


def _script_costing(provider: ScriptedProvider) -> None:
    # 20 in / 1 out at fake-1's price: $0.00023. The delay keeps all three calls in flight
    # together, so every check happens before any spend is recorded.
    provider.responder = lambda request: Reply.text("done", usage=Usage(20, 1), delay=0.02)


async def test_incident_14_fan_out_race_admits_exactly_one_of_three_sub_agents(
    fixed_estimate: _Reserves,
) -> None:
    """Three workflow agents start at once under one parent with $0.00060 left; each call
    is estimated at $0.00031 and costs $0.00023: exactly one is admitted, 30 of 30 times."""
    assert cost(25, 2) == ESTIMATE
    assert cost(20, 1) == COST
    with ScriptedProvider(default=None) as provider:
        _script_costing(provider)
        agents = _sub_agents(provider)
        undo = instrument()
        try:
            for trial in range(30):
                provider.reset()
                parent = allotment.Budget(usd=LEFT, name=f"parent{trial}", prices=PRICES)
                with parent.activate():
                    outcomes = await asyncio.gather(
                        *(a.run(user_msg="go") for a in agents), return_exceptions=True
                    )
                refused = [o for o in outcomes if isinstance(o, allotment.BudgetExceeded)]
                assert len(refused) == 2, (trial, outcomes)
                assert parent.spent.usd == COST, trial  # zero overshoot
                assert provider.calls == 1, trial
                _check(parent, LEFT, provider.calls)
                assert [c.spent.llm_calls for c in parent.report().children].count(1) == 1
        finally:
            undo()
    assert set(fixed_estimate.usd) == {ESTIMATE}


class _NaiveGuard(BaseCallbackHandler):
    """The negative control: check spent + estimate against the cap, record after the call."""

    def __init__(self, cap: Decimal) -> None:
        super().__init__([], [])
        self.cap = cap
        self.spent = Decimal(0)

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: Any = None,
        event_id: str = "",
        parent_id: str = "",
        **kw: Any,
    ) -> str:
        if event_type == CBEventType.LLM and self.spent + ESTIMATE > self.cap:
            raise RuntimeError("over the cap")
        return event_id

    def on_event_end(
        self, event_type: CBEventType, payload: Any = None, event_id: str = "", **kw: Any
    ) -> None:
        if event_type == CBEventType.LLM:
            self.spent += COST

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None, trace_map: Any = None) -> None:
        return None


async def test_incident_14_control_check_then_record_overspends_every_time() -> None:
    """The same race under a naive check-then-record guard: all three pass the check, and
    $0.00069 is spent against $0.00060, in 30 of 30 trials."""
    with ScriptedProvider(default=None) as provider:
        _script_costing(provider)
        agents = _sub_agents(provider)
        llm = agents[0].llm
        for trial in range(30):
            provider.reset()
            guard = _NaiveGuard(LEFT)
            llm.callback_manager = CallbackManager([guard])
            outcomes = await asyncio.gather(*(a.run(user_msg="go") for a in agents))
            assert len(outcomes) == 3
            assert provider.calls == 3, trial
            assert guard.spent == Decimal("0.00069") > LEFT, trial


# -- 15: child budget split and return ------------------------------------------------------


class _Closes:
    def __init__(self) -> None:
        self.returned: dict[str, int] = {}

    @allotment.hookimpl
    def allotment_event(self, event: allotment.Event) -> None:
        if event.kind == "close":
            self.returned[event.path] = event.detail["returned"].get("usd", 0)


async def test_incident_15_child_budgets_split_and_return_unspent_escrow() -> None:
    """A parent with $1.00 gives each of three sub-agents $0.30; each spends $0.10; when
    they finish, $0.20 of each comes back and the parent shows $0.30 spent, per child."""
    closes = _Closes()
    allotment.plugins().register(closes)
    try:
        with ScriptedProvider(default=None) as provider:
            # 4,000 in / 2,000 out at fake-1's price: $0.10.
            provider.responder = lambda request: Reply.text("done", usage=Usage(4000, 2000))
            llm = openai_llm(provider, model="fake-1", max_tokens=2000)
            agents = [
                FunctionAgent(name=name, description="works", llm=llm, streaming=False)
                for name in ("alpha", "beta", "gamma")
            ]
            parent = allotment.Budget(usd="1.00", name="parent", prices=PRICES)
            # The request is as long as what it is billed for, so each hold covers its cost.
            task = "x" * 4000
            undo = instrument(parent, children={a.name: "0.30" for a in agents})
            try:
                await asyncio.gather(*(a.run(user_msg=task) for a in agents))
            finally:
                undo()
            report = parent.report()
            assert report.spent.usd == Decimal("0.30")
            assert parent.remaining.usd == Decimal("0.70")
            assert report.allotted_usd == 0
            for child in report.children:
                assert child.limits["usd"] == Decimal("0.30")
                assert child.spent.usd == Decimal("0.10") == cost(4000, 2000)
                assert child.closed
                assert closes.returned[child.path] == 200_000_000  # $0.20, in nano-dollars
            assert sorted(c.name for c in report.children) == ["alpha", "beta", "gamma"]
            _check(parent, Decimal("1.00"), provider.calls)
    finally:
        allotment.plugins().unregister(closes)


# -- 16 [LLMI-003]: no cost figure for a query engine run ------------------------------------


def test_llmi_003_query_engine_spend_in_report() -> None:
    """A query engine run under a $0.02 budget: each query's LLM spend is metered and shows
    in the report (never $0), and the cap stops the queries that no longer fit."""
    cap = Decimal("0.02")
    budget = allotment.Budget(usd=cap, name="rag", prices=PRICES)
    llm = ScriptedLLM(max_tokens=50, default=("An answer.", 400, 20))  # $0.0046 a query
    embed = CountingEmbedding()
    docs = [
        Document(text="Llamas are camelids from South America. They hum when anxious."),
        Document(text="Alpacas are smaller than llamas and are bred for their fibre."),
    ]
    answers: list[str] = []

    def ask_until_refused(engine: Any) -> None:
        for _ in range(10):
            answers.append(str(engine.query("What are llamas?")))

    undo = instrument(budget)
    try:
        index = VectorStoreIndex.from_documents(docs, embed_model=embed)
        engine = index.as_query_engine(llm=llm, similarity_top_k=1)
        with pytest.raises(allotment.BudgetExceeded) as refused:
            ask_until_refused(engine)
    finally:
        undo()
    answered = len(answers)
    assert refused.value.limit_name == "usd"
    report = budget.report()
    queries = [c for c in report.children if c.name == "query"]
    assert len(queries) == answered + 1  # the refused query's scope shows too
    for q in queries[:answered]:
        assert q.spent.llm_calls == 1
        assert q.spent.usd is not None
        assert q.spent.usd >= cost(400, 20) > 0
        # The LLM call was settled from the model's usage; only the query's embedding (its
        # model reports none) is an estimate.
        assert q.estimated_calls == 1
    assert answered >= 2
    print(report)
    _check(budget, cap, llm.calls)
