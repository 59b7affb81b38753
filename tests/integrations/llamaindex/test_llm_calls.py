"""LLM calls through BudgetCallbackHandler: reserved before sending, settled from usage.

The OpenAI tests run LlamaIndex's real OpenAI class over HTTP against the scripted
provider; the others use LlamaIndex's MockLLM or a scripted CustomLLM.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import allotment
import openai
import pytest
from allotment.testing import Reply, ScriptedProvider, Usage
from allotment_llamaindex import BudgetCallbackHandler
from llama_index.core.base.llms.types import ChatMessage, CompletionResponse, LLMMetadata
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.mock import MockLLM
from llama_index.core.prompts import PromptTemplate
from llamaindex_fakes import (
    PRICES,
    ScriptedLLM,
    assert_ledger_matches_provider,
    cost,
    openai_llm,
    replies,
)
from pydantic import BaseModel

HI = [ChatMessage(role="user", content="Say hi.")]


def _handled(budget: allotment.Budget | None = None, **kwargs: object) -> CallbackManager:
    return CallbackManager([BudgetCallbackHandler(budget, **kwargs)])  # type: ignore[arg-type]


def test_chat_is_reserved_then_settled_from_the_response_usage(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("Hi!", usage=Usage(120, 30)))
    assert llm.chat(HI).message.content == "Hi!"
    spent = budget.spent
    assert (spent.input_tokens, spent.output_tokens, spent.llm_calls) == (120, 30, 1)
    # gpt-4o-mini: $0.15 per million input tokens, $0.60 per million output.
    assert spent.usd == Decimal("0.000036")
    assert_ledger_matches_provider(budget, provider)


def test_a_refused_chat_never_reaches_the_provider(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.000001", name="tiny")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("never sent"))
    with pytest.raises(allotment.BudgetExceeded) as refused:
        llm.chat(HI)
    assert refused.value.limit_name == "usd"
    assert provider.attempts == 0
    report = budget.report()
    assert (report.refusals, report.open_holds, report.spent.llm_calls) == (1, 0, 0)


def test_a_stream_asks_for_usage_and_is_settled_from_it(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("one two three four"))
    chunks = list(llm.stream_chat(HI))
    assert chunks[-1].message.content == "one two three four"
    assert provider.requests[0].include_usage
    assert_ledger_matches_provider(budget, provider)


def test_stream_usage_is_not_requested_when_turned_off(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget, stream_usage=False))
    provider.add(Reply.text("one two"))
    list(llm.stream_chat(HI))
    assert not provider.requests[0].include_usage
    assert budget.spent.estimated


def test_a_stream_without_usage_is_charged_a_flagged_estimate_within_its_hold(
    provider: ScriptedProvider,
) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("one two three four", stream_usage=False))
    list(llm.stream_chat(HI))
    spent = budget.spent
    assert spent.estimated
    assert spent.usd is not None
    assert spent.usd > 0
    # The output is counted from the streamed text (o200k: four words, four tokens).
    assert spent.output_tokens == 4
    assert spent.input_tokens >= provider.requests[0].charged.prompt_tokens  # type: ignore[union-attr]
    assert budget.report().estimated_calls == 1


async def test_async_chat_and_stream_are_budgeted(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("async"), Reply.text("async stream"))
    await llm.achat(HI)
    stream = await llm.astream_chat(HI)
    async for _ in stream:
        pass
    assert provider.requests[1].include_usage
    assert_ledger_matches_provider(budget, provider)


def test_complete_and_stream_complete_are_budgeted(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("done"), Reply.text("streamed done"))
    assert llm.complete("Finish this").text == "done"
    assert list(llm.stream_complete("Finish this"))[-1].text == "streamed done"
    assert_ledger_matches_provider(budget, provider)


def test_an_abandoned_stream_is_charged_for_what_it_delivered(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("alpha beta gamma delta epsilon zeta", stream_usage=False))
    stream = llm.stream_chat(HI)
    seen = [next(stream), next(stream), next(stream)]
    stream.close()  # the consumer stops reading: GeneratorExit ends the callback event
    assert seen[-1].message.content == "alpha beta"
    spent = budget.spent
    assert spent.estimated
    assert spent.llm_calls == 1
    assert spent.output_tokens == 2  # "alpha beta": what had arrived, not the 64 held
    assert budget.report().open_holds == 0


def test_an_http_error_releases_the_hold_and_charges_nothing(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.fail(500)
    with pytest.raises(openai.InternalServerError):
        llm.chat(HI)
    assert provider.attempts == 1
    assert provider.calls == 0
    report = budget.report()
    assert (report.spent.llm_calls, report.open_holds, report.held.usd) == (0, 0, 0)


class City(BaseModel):
    """A city."""

    name: str
    country: str


def test_structured_prediction_is_one_budgeted_call(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text('{"name": "Paris", "country": "France"}'))
    city = llm.structured_predict(City, PromptTemplate("Name a city in {country}."), country="FR")
    assert city == City(name="Paris", country="France")
    assert "response_format" in provider.requests[0].json
    assert_ledger_matches_provider(budget, provider)


def test_a_structured_output_schema_is_part_of_the_reservation() -> None:
    from allotment_llamaindex._translate import llm_call

    schema = {
        "type": "json_schema",
        "json_schema": {"name": "City", "schema": City.model_json_schema()},
    }
    plain = llm_call({"messages": HI, "serialized": {"model_name": "gpt-4o-mini"}})
    shaped = llm_call(
        {
            "messages": HI,
            "additional_kwargs": {"response_format": schema},
            "serialized": plain.metadata,
        }
    )
    budget = allotment.Budget(name="b")
    assert (
        budget.estimate(shaped)[0].usage.input_tokens > budget.estimate(plain)[0].usage.input_tokens
    )


def test_custom_llm_chat_is_one_call_settled_from_the_inner_completion_usage() -> None:
    """CustomLLM.chat calls its own complete: two callback events, one request."""
    budget = allotment.Budget(usd="0.05", name="run", prices=PRICES)
    llm = ScriptedLLM(
        max_tokens=500, replies=replies(("hello", 1000, 500)), callback_manager=_handled(budget)
    )
    llm.chat(HI)
    spent = budget.spent
    assert (llm.calls, spent.llm_calls, spent.input_tokens, spent.output_tokens) == (
        1,
        1,
        1000,
        500,
    )
    assert spent.usd == cost(1000, 500) == Decimal("0.025")
    assert not spent.estimated


def test_custom_llm_stream_chat_is_one_call_settled_from_its_last_chunk() -> None:
    budget = allotment.Budget(usd="0.01", name="run", prices=PRICES)
    llm = ScriptedLLM(
        max_tokens=10, replies=replies(("a b c", 30, 3)), callback_manager=_handled(budget)
    )
    assert list(llm.stream_chat(HI))[-1].message.content == "a b c"
    spent = budget.spent
    assert (spent.llm_calls, spent.input_tokens, spent.output_tokens) == (1, 30, 3)
    assert budget.report().open_holds == 0


def test_mock_llm_without_usage_is_charged_a_flagged_estimate_per_request() -> None:
    budget = allotment.Budget(llm_calls=5, name="run")
    llm = MockLLM(max_tokens=8, callback_manager=_handled(budget))
    llm.chat(HI)
    llm.complete("Say hi.")
    spent = budget.spent
    assert spent.llm_calls == 2
    assert spent.estimated
    assert spent.output_tokens > 0
    assert budget.report().estimated_calls == 2


def test_a_call_cap_stops_the_next_call_before_the_model_sees_it() -> None:
    budget = allotment.Budget(llm_calls=2, name="run", prices=PRICES)
    llm = ScriptedLLM(callback_manager=_handled(budget))
    llm.complete("one")
    llm.complete("two")
    with pytest.raises(allotment.BudgetExceeded) as refused:
        llm.complete("three")
    assert refused.value.limit_name == "llm_calls"
    assert llm.calls == 2


def test_an_unpriced_model_under_a_dollar_cap_fails_closed() -> None:
    budget = allotment.Budget(usd="1", name="run")
    llm = ScriptedLLM(model_name="house-model", callback_manager=_handled(budget))
    with pytest.raises(allotment.UnknownPrice, match="house-model"):
        llm.complete("hi")
    assert llm.calls == 0


def test_a_handler_without_a_budget_charges_the_active_one() -> None:
    first = allotment.Budget(name="first", prices=PRICES)
    second = allotment.Budget(name="second", prices=PRICES)
    llm = ScriptedLLM(callback_manager=_handled())
    with first.activate():
        llm.complete("a")
    with second.activate():
        llm.complete("b")
        llm.complete("c")
    llm.complete("no budget active: not metered")
    assert (first.spent.llm_calls, second.spent.llm_calls) == (1, 2)
    assert llm.calls == 4


def test_an_explicit_budget_wins_over_the_active_one() -> None:
    mine = allotment.Budget(name="mine", prices=PRICES)
    other = allotment.Budget(name="other", prices=PRICES)
    llm = ScriptedLLM(callback_manager=_handled(mine))
    with other.activate():
        llm.complete("a")
    assert (mine.spent.llm_calls, other.spent.llm_calls) == (1, 0)


def test_cached_and_reasoning_tokens_are_recorded_as_parts(provider: ScriptedProvider) -> None:
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, callback_manager=_handled(budget))
    provider.add(Reply.text("x", usage=Usage(100, 40, cached_tokens=60, reasoning_tokens=30)))
    llm.chat(HI)
    spent = budget.spent
    assert (spent.cache_read_tokens, spent.reasoning_tokens) == (60, 30)
    assert_ledger_matches_provider(budget, provider)


def test_client_retries_of_unbilled_errors_charge_only_the_billed_attempt(
    provider: ScriptedProvider,
) -> None:
    """One callback event covers the OpenAI client's own retries: a 429 (not billed) then a
    200 is one call, settled from the 200's usage."""
    budget = allotment.Budget(usd="0.01", name="run")
    llm = openai_llm(provider, max_tokens=64, max_retries=1, callback_manager=_handled(budget))
    provider.fail(429).add(Reply.text("after a retry", usage=Usage(50, 5)))
    assert llm.chat(HI).message.content == "after a retry"
    assert (provider.attempts, provider.calls) == (2, 1)
    assert_ledger_matches_provider(budget, provider)


class _Router(CustomLLM):
    """A CustomLLM that answers by calling another model."""

    inner: ScriptedLLM

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="router-1", num_output=10)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self.inner.complete(prompt, formatted=formatted, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return self.inner.stream_complete(prompt, formatted=formatted, **kwargs)


def test_a_wrapper_llm_is_charged_as_the_model_it_calls_once() -> None:
    """Two events, two models, one request: the inner model's call is charged, at its own
    price; the wrapper's hold is released."""
    budget = allotment.Budget(
        usd="0.05",
        name="run",
        prices={**PRICES, "router-1": allotment.Price(input_mtok="1000", output_mtok="1000")},
    )
    inner = ScriptedLLM(max_tokens=10, replies=replies(("routed", 100, 10)))
    router = _Router(inner=inner, callback_manager=_handled(budget))
    inner.callback_manager = router.callback_manager
    assert router.complete("where to?").text == "routed"
    spent = budget.spent
    assert (inner.calls, spent.llm_calls) == (1, 1)
    assert spent.usd == cost(100, 10)  # fake-1's price, not the router's
    assert budget.report().open_holds == 0


def test_calls_from_many_threads_never_pass_the_cap() -> None:
    from concurrent.futures import ThreadPoolExecutor

    budget = allotment.Budget(llm_calls=5, name="run", prices=PRICES)
    llm = ScriptedLLM(max_tokens=10, callback_manager=_handled(budget))

    def call(i: int) -> bool:
        try:
            llm.complete(f"call {i}")
        except allotment.BudgetExceeded:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        admitted = sum(pool.map(call, range(40)))
    assert admitted == llm.calls == budget.spent.llm_calls == 5
    assert budget.report().open_holds == 0
