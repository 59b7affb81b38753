"""instrument(): the handler on every run in the process, never twice on one run,
idempotent, and undone by the callable it returns."""

from __future__ import annotations

import threading

import allotment
import pytest
from allotment_langchain import BudgetCallbackHandler, instrument, instrumented
from langchain_core.messages import HumanMessage
from langchain_fakes import PRICES, fake_chat, no_open_holds, reply


@pytest.fixture
def budget() -> allotment.Budget:
    return allotment.Budget(usd="1", name="run", prices=PRICES)


def test_instrument_charges_runs_that_pass_no_callbacks(budget: allotment.Budget) -> None:
    """After instrument(budget), a plain invoke is charged to the budget, which is also
    the process default; the undo removes both."""
    chat, _ = fake_chat(default=reply("hi"))
    undo = instrument(budget)
    try:
        assert allotment.current() is budget
        assert isinstance(instrumented(), BudgetCallbackHandler)
        chat.invoke("hello")
        assert budget.spent.llm_calls == 1
    finally:
        undo()
    assert allotment.current() is None
    assert instrumented() is None
    chat.invoke("not charged")
    assert budget.spent.llm_calls == 1


def test_instrumented_refusals_stop_the_run(budget: allotment.Budget) -> None:
    """The process-wide handler refuses like an explicit one."""
    chat, provider = fake_chat(default=reply("hi"))
    tight = allotment.Budget(llm_calls=1, name="tight", prices=PRICES)
    undo = instrument(tight)
    try:
        chat.invoke("one")
        with pytest.raises(allotment.BudgetExceeded):
            chat.invoke("two")
    finally:
        undo()
    assert provider.calls == 1


def test_an_explicit_handler_is_not_doubled_by_instrument(budget: allotment.Budget) -> None:
    """A handler passed in config replaces the instrumented one for that run, so each call
    is reserved once, on the explicit handler's budget."""
    other = allotment.Budget(usd="1", name="other", prices=PRICES)
    chat, _ = fake_chat(default=reply("hi"))
    undo = instrument(budget)
    try:
        chat.invoke("x", config={"callbacks": [BudgetCallbackHandler(other)]})
    finally:
        undo()
    assert other.spent.llm_calls == 1
    assert budget.spent.llm_calls == 0


def test_a_constructor_handler_inside_an_instrumented_run_is_charged_once(
    budget: allotment.Budget,
) -> None:
    """A model built with callbacks=[handler] inside an instrumented chain gets both
    handlers from LangChain; the explicit one charges the call, the instrumented one
    stands aside and holds nothing."""
    other = allotment.Budget(usd="1", name="other", prices=PRICES)
    chat, provider = fake_chat(default=reply("hi"))
    chat = chat.model_copy(update={"callbacks": [BudgetCallbackHandler(other)]})
    chain = (lambda text: text.upper()) | chat
    undo = instrument(budget)
    try:
        chain.invoke("x")
    finally:
        undo()
    assert provider.calls == 1
    assert other.spent.llm_calls == 1
    assert budget.spent.llm_calls == 0
    assert no_open_holds(budget)
    assert no_open_holds(other)


def test_an_activated_budget_wins_over_the_instrumented_default(budget: allotment.Budget) -> None:
    """instrument(budget) sets the default; a run inside `with other.activate():` is
    charged to other (explicit > current > default)."""
    other = allotment.Budget(usd="1", name="other", prices=PRICES)
    chat, _ = fake_chat(default=reply("hi"))
    undo = instrument(budget)
    try:
        with other.activate():
            chat.invoke("x")
        chat.invoke("y")
    finally:
        undo()
    assert (other.spent.llm_calls, budget.spent.llm_calls) == (1, 1)


def test_instrument_reaches_raw_threads(budget: allotment.Budget) -> None:
    """A plain threading.Thread (no copied context) is instrumented too."""
    chat, _ = fake_chat(default=reply("hi"))
    undo = instrument(budget)
    try:
        worker = threading.Thread(target=lambda: chat.invoke([HumanMessage("from a thread")]))
        worker.start()
        worker.join(5)
    finally:
        undo()
    assert budget.spent.llm_calls == 1


def test_instrument_is_idempotent_and_its_undo_runs_once(budget: allotment.Budget) -> None:
    """The same arguments return the same undo and attach one handler; undo twice is a
    no-op; a different budget while instrumented is refused with what to do."""
    undo = instrument(budget, children={"researcher": "0.10"})
    try:
        handler = instrumented()
        assert instrument(budget, children={"researcher": "0.10"}) is undo
        assert instrumented() is handler
        with pytest.raises(allotment.ConfigurationError, match="call the undo"):
            instrument(allotment.Budget(name="other"))
        chat, _ = fake_chat(default=reply("hi"))
        chat.invoke("x")
        assert budget.spent.llm_calls == 1
    finally:
        undo()
    undo()
    assert instrumented() is None
    assert allotment.current() is None
    again = instrument()
    try:
        assert instrumented() is not None
    finally:
        again()


def test_instrument_without_a_budget_charges_the_active_one() -> None:
    """instrument() with no budget charges whatever budget is current, and does nothing
    for runs outside any budget."""
    run = allotment.Budget(usd="1", name="run", prices=PRICES)
    chat, provider = fake_chat(default=reply("hi"))
    undo = instrument()
    try:
        chat.invoke("outside any budget")
        with run.activate():
            chat.invoke("inside")
    finally:
        undo()
    assert provider.calls == 2
    assert run.spent.llm_calls == 1


def test_a_stale_undo_does_not_remove_a_newer_instrumentation(budget: allotment.Budget) -> None:
    """An undo from an earlier instrument() that was already undone leaves a later one in
    place."""
    first = instrument(budget)
    first()
    second = instrument(budget)
    try:
        first()
        assert instrumented() is not None
    finally:
        second()
