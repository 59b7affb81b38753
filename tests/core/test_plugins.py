"""The plugin host: default plugins, entry points, the disable switch, typo'd hooks, events."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import allotment
import pluggy
import pytest
from allotment import Budget, Usage


def test_default_plugins_are_registered_like_third_party_ones() -> None:
    names = {name for name, _ in allotment.plugins().pm.list_name_plugin()}
    assert {"allotment.ledgers", "allotment.prices", "allotment.estimator"} <= names


def test_installed_integrations_are_found_through_the_entry_point_group() -> None:
    dists = {d.project_name for _, d in allotment.plugins().pm.list_plugin_distinfo()}
    assert "allotment-langchain" in dists


def test_a_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @allotment.hookimpl
        def allotment_evnt(self, event: object) -> None:  # misspelled on purpose
            raise AssertionError("never called")

    typo = Typo()
    try:
        with pytest.raises(pluggy.PluginValidationError, match="allotment_evnt"):
            allotment.plugins().register(typo)
    finally:
        if allotment.plugins().pm.is_registered(typo):
            allotment.plugins().unregister(typo)


def test_environment_variable_disables_entry_point_plugins() -> None:
    code = (
        "import allotment; pm = allotment.plugins().pm; "
        "print(sorted(d.project_name for _, d in pm.list_plugin_distinfo()))"
    )
    env_all = {"ALLOTMENT_DISABLE_PLUGINS": "*"}
    env_one = {"ALLOTMENT_DISABLE_PLUGINS": "langchain"}
    import os

    def run(extra: dict[str, str]) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    assert run(env_all) == "[]"
    assert "allotment-langchain" not in run(env_one)
    assert "allotment-langchain" in run({"ALLOTMENT_DISABLE_PLUGINS": ""})


def test_a_price_plugin_answers_for_its_model_and_an_estimate_plugin_can_tighten() -> None:
    class House:
        @allotment.hookimpl(tryfirst=True)
        def allotment_price(self, model: str | None, usage: Usage) -> Decimal | None:
            # implementations may take a subset of the spec's arguments
            return Decimal("0.001") * usage.llm_calls if model == "house-model" else None

    plugin = House()
    allotment.plugins().register(plugin)
    try:
        b = Budget(usd="0.01")
        hold = b.reserve(allotment.Call(model="house-model", messages=["hi"]))
        assert hold.reserved.usd == Decimal("0.001")
        hold.settle(Usage(input_tokens=3, output_tokens=1, llm_calls=1))
        assert b.spent.usd == Decimal("0.001")
    finally:
        allotment.plugins().unregister(plugin)


def test_before_call_hook_can_veto_and_nothing_is_held() -> None:
    class NoGpt4:
        @allotment.hookimpl
        def allotment_before_call(self, call: allotment.Call) -> None:
            if call.model == "gpt-4":
                raise allotment.BudgetExceeded("gpt-4 is not allowed here", path="policy")

    plugin = NoGpt4()
    allotment.plugins().register(plugin)
    try:
        b = Budget(usd=1)
        with pytest.raises(allotment.BudgetExceeded, match="not allowed"):
            b.reserve(allotment.Call(model="gpt-4", messages=["hi"]))
        assert b.held.llm_calls == 0
    finally:
        allotment.plugins().unregister(plugin)


def test_every_lifecycle_step_is_an_event_with_path_model_usage_and_cost() -> None:
    events: list[allotment.Event] = []

    class Sink:
        @allotment.hookimpl
        def allotment_event(self, event: allotment.Event) -> None:
            events.append(event)

    refusals: list[allotment.BudgetExceeded] = []

    class Alarm:
        @allotment.hookimpl
        def allotment_budget_exceeded(self, error: allotment.BudgetExceeded) -> None:
            refusals.append(error)

    sink, alarm = Sink(), Alarm()
    allotment.plugins().register(sink)
    allotment.plugins().register(alarm)
    try:
        price = {"fake-1": allotment.Price(input_mtok=10, output_mtok=30)}
        root = Budget(usd="0.10", name="run", prices=price)
        child = root.allot("worker", usd="0.06")
        call = allotment.Call(model="fake-1", messages=["x" * 100], max_output_tokens=500)
        child.reserve(call).settle(Usage(input_tokens=1000, output_tokens=500, llm_calls=1))
        child.reserve(call).release()
        with pytest.raises(allotment.BudgetExceeded):
            child.reserve(allotment.Call(model="fake-1", messages=["x"], max_output_tokens=10**6))
        child.charge(Usage(input_tokens=10, llm_calls=1), call=call)
        child.close()
    finally:
        allotment.plugins().unregister(sink)
        allotment.plugins().unregister(alarm)
    kinds = [(e.kind, e.path) for e in events]
    assert kinds == [
        ("open", "run"),
        ("open", "run/worker"),
        ("reserve", "run/worker"),
        ("settle", "run/worker"),
        ("overrun", "run/worker"),  # 1,000 in > the bound for 100 B
        ("reserve", "run/worker"),
        ("release", "run/worker"),
        ("refuse", "run/worker"),
        ("charge", "run/worker"),
        ("close", "run/worker"),
    ]
    settle = events[3]
    assert settle.model == "fake-1"
    assert settle.usd == Decimal("0.025")
    assert settle.usage is not None
    assert settle.usage.output_tokens == 500
    assert len(refusals) == 1
    assert refusals[0].path == "run/worker"


def test_failing_event_sink_does_not_break_money_operations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        @allotment.hookimpl
        def allotment_event(self, event: allotment.Event) -> None:
            raise OSError("disk full")

    plugin = Broken()
    allotment.plugins().register(plugin)
    try:
        b = Budget(usd=1)
        b.hold(Usage(usd=Decimal("0.1"), llm_calls=1)).settle(Usage(usd=Decimal("0.1")))
    finally:
        allotment.plugins().unregister(plugin)
    assert b.spent.usd == Decimal("0.1")
    assert "allotment_event hook failed" in caplog.text


def test_clamp_policy_gives_the_output_cap_the_budget_affords() -> None:
    price = {"fake-1": allotment.Price(input_mtok=10, output_mtok=30)}
    b = Budget(usd="0.0010", prices=price)
    call = allotment.Call(model="fake-1", messages=["hello"], max_output_tokens=100_000)
    cap = b.affordable_output(call)
    assert cap is not None
    assert 0 < cap < 100_000
    clamped = b.reserve(allotment.Call(model="fake-1", messages=["hello"], max_output_tokens=cap))
    assert clamped.reserved.usd is not None
    assert clamped.reserved.usd <= Decimal("0.0010")
    with pytest.raises(allotment.BudgetExceeded):
        b.reserve(allotment.Call(model="fake-1", messages=["hello"], max_output_tokens=cap + 50))
    clamped.release()
    assert Budget(output_tokens=300).affordable_output(call) == 300
    assert Budget().affordable_output(allotment.Call(model="fake-1", messages=["hi"])) is None
