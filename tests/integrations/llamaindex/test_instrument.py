"""instrument(): every callback manager, whatever was built when; idempotent; undone cleanly."""

from __future__ import annotations

import gc
from typing import Any

import allotment
import pytest
from allotment_llamaindex import BudgetCallbackHandler, UncoveredLLMWarning, _instrument, instrument
from llama_index import core
from llama_index.core import Settings
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler
from llamaindex_fakes import PRICES, ScriptedLLM


def _budget(name: str = "run") -> allotment.Budget:
    return allotment.Budget(name=name, prices=PRICES)


def test_llms_built_before_and_after_instrument_are_both_budgeted() -> None:
    before = ScriptedLLM()
    budget = _budget()
    undo = instrument(budget)
    try:
        after = ScriptedLLM()
        before.complete("a")
        after.complete("b")
        assert budget.spent.llm_calls == 2
    finally:
        undo()


def test_llms_are_budgeted_whatever_callback_manager_they_hold() -> None:
    early = ScriptedLLM()  # keeps its own empty manager, made before any setting
    Settings.callback_manager = CallbackManager([])
    late = ScriptedLLM()  # shares Settings' handler list
    traced = ScriptedLLM(callback_manager=CallbackManager([LlamaDebugHandler()]))
    budget = _budget()
    undo = instrument(budget)
    try:
        for llm in (early, late, traced):
            llm.complete("x")
        assert budget.spent.llm_calls == 3
    finally:
        undo()
    # Nothing global was set: Settings and the global handler are as they were.
    assert Settings._callback_manager is not None
    assert Settings._callback_manager.handlers == []
    assert core.global_handler is None


def test_a_refused_call_is_reported_to_no_other_handler() -> None:
    debug = LlamaDebugHandler()
    llm = ScriptedLLM(max_tokens=10, callback_manager=CallbackManager([debug]))
    undo = instrument(allotment.Budget(llm_calls=0, name="none", prices=PRICES))
    try:
        with pytest.raises(allotment.BudgetExceeded):
            llm.complete("x")
    finally:
        undo()
    assert llm.calls == 0
    assert debug.get_llm_inputs_outputs() == []


def test_instrument_twice_counts_once_and_the_newest_wins() -> None:
    first, second = _budget("first"), _budget("second")
    llm = ScriptedLLM()
    undo_first = instrument(first)
    undo_second = instrument(second)
    try:
        llm.complete("a")
        assert (first.spent.llm_calls, second.spent.llm_calls) == (0, 1)
        undo_second()
        llm.complete("b")
        assert (first.spent.llm_calls, second.spent.llm_calls) == (1, 1)
    finally:
        undo_second()
        undo_first()
    llm.complete("c")
    assert (first.spent.llm_calls, second.spent.llm_calls) == (1, 1)
    assert llm.calls == 3


def test_undo_restores_the_patched_methods_and_is_safe_to_repeat() -> None:
    start = CallbackManager.__dict__["on_event_start"]
    undo = instrument(_budget())
    assert CallbackManager.__dict__["on_event_start"] is not start
    undo()
    undo()
    assert CallbackManager.__dict__["on_event_start"] is start
    assert not _instrument.instrumented()


def test_a_manager_with_its_own_budget_handler_is_left_to_it() -> None:
    ambient, own = _budget("ambient"), _budget("own")
    llm = ScriptedLLM(callback_manager=CallbackManager([BudgetCallbackHandler(own)]))
    undo = instrument(ambient)
    try:
        llm.complete("a")
    finally:
        undo()
    assert (ambient.spent.llm_calls, own.spent.llm_calls) == (0, 1)


def test_a_handler_that_hears_an_event_twice_counts_it_once() -> None:
    budget = _budget()
    handler = BudgetCallbackHandler(budget)
    llm = ScriptedLLM(callback_manager=CallbackManager([handler, handler]))
    llm.complete("a")
    assert budget.spent.llm_calls == 1
    assert budget.report().open_holds == 0


def test_undo_settles_calls_still_streaming_so_no_hold_stays_open() -> None:
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    llm = ScriptedLLM(max_tokens=50, replies=[("a b c d", 10, 4)])
    undo = instrument(budget)
    stream = llm.stream_complete("x")
    next(stream)
    assert budget.report().open_holds == 1
    undo()
    report = budget.report()
    assert report.open_holds == 0
    assert report.spent.estimated
    assert report.spent.output_tokens == 50
    list(stream)  # finishing the stream later charges nothing more
    assert budget.spent.llm_calls == 1


def test_instrument_warns_about_llm_classes_that_bypass_the_callback_manager() -> None:
    class BypassLLM(ScriptedLLM):
        def complete(
            self, prompt: str, formatted: bool = False, **kwargs: Any
        ) -> CompletionResponse:
            return CompletionResponse(text="sent without a reservation")

    with pytest.warns(UncoveredLLMWarning, match=r"BypassLLM\.complete"):
        undo = instrument(_budget())
    undo()
    del BypassLLM
    gc.collect()


def test_a_coverage_warning_raised_as_an_error_leaves_llamaindex_untouched() -> None:
    class SilentLLM(ScriptedLLM):
        def chat(self, messages: Any, **kwargs: Any) -> Any:
            raise AssertionError("never called")

    start = CallbackManager.__dict__["on_event_start"]
    with pytest.raises(UncoveredLLMWarning, match=r"SilentLLM\.chat"):
        instrument(_budget())  # this session turns warnings into errors
    assert CallbackManager.__dict__["on_event_start"] is start
    assert not _instrument.instrumented()
    del SilentLLM
    gc.collect()


def test_llm_classes_that_go_through_callbacks_raise_no_warning() -> None:
    from allotment_llamaindex._coverage import uncovered_methods
    from llama_index.core.llms.mock import MockFunctionCallingLLM, MockLLM
    from llama_index.llms.openai import OpenAI

    for cls in (ScriptedLLM, MockLLM, MockFunctionCallingLLM, OpenAI):
        assert uncovered_methods(cls) == [], cls


@pytest.mark.parametrize("limits", ["ten cents", -1, {"usd": "0.1", "llm_calls": -2}])
def test_bad_child_limits_are_refused_up_front_and_change_nothing(limits: object) -> None:
    start = CallbackManager.__dict__["on_event_start"]
    with pytest.raises(allotment.InvalidAmount):
        instrument(_budget(), children={"researcher": limits})
    with pytest.raises(allotment.InvalidAmount):
        BudgetCallbackHandler(children={"researcher": limits})
    assert CallbackManager.__dict__["on_event_start"] is start
    assert not _instrument.instrumented()


def test_reset_undoes_every_instrument_at_once() -> None:
    start = CallbackManager.__dict__["on_event_start"]
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    instrument(budget)
    instrument(budget)
    stream = ScriptedLLM(max_tokens=5).stream_complete("x")
    next(stream)
    _instrument.reset()
    assert CallbackManager.__dict__["on_event_start"] is start
    assert not _instrument.instrumented()
    assert budget.report().open_holds == 0


def test_instrument_sets_the_default_budget_until_undone() -> None:
    budget = _budget()
    undo = instrument(budget)
    assert allotment.current() is budget
    undo()
    assert allotment.current() is None
    instrument(budget)
    _instrument.reset()
    assert allotment.current() is None
