"""What a settled call charges: the provider's usage in every shape LangChain reports it,
or an estimate flagged as such when it reports none."""

from __future__ import annotations

from decimal import Decimal

import allotment
import pytest
from allotment.testing import Reply, ScriptedProvider
from allotment.testing import Usage as WireUsage
from allotment_langchain import BudgetCallbackHandler
from langchain_fakes import PRICES, cost, fake_chat, no_open_holds, reply


def settle_one(message: object, **fields: object) -> allotment.Budget:
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    chat, provider = fake_chat([message], **fields)  # type: ignore[list-item]
    chat.invoke("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert provider.calls == 1
    assert no_open_holds(budget)
    return budget


def test_reported_usage_is_charged_exactly_at_the_models_price() -> None:
    """1,000 input and 500 output tokens of fake-1 cost exactly $0.025, not estimated."""
    spent = settle_one(reply("hi", input_tokens=1000, output_tokens=500)).spent
    assert spent.usd == Decimal("0.025")
    assert (spent.input_tokens, spent.output_tokens, spent.llm_calls) == (1000, 500, 1)
    assert not spent.estimated


def test_cache_reads_and_writes_are_parts_of_input_and_priced_once() -> None:
    """usage_metadata input_token_details (cache_read, cache_creation) become the cache
    parts of input tokens; input_tokens is not inflated by them."""
    spent = settle_one(
        reply("hi", input_tokens=1000, output_tokens=10, cache_read=600, cache_creation=100)
    ).spent
    assert (spent.input_tokens, spent.cache_read_tokens, spent.cache_write_tokens) == (
        1000,
        600,
        100,
    )
    # fake-1 has no cache rates, so every input token is priced at the input rate once.
    assert spent.usd == cost(1000, 10)


def test_reasoning_tokens_are_part_of_output_and_charged_once() -> None:
    """output_token_details reasoning is a part of output_tokens, never added to it."""
    spent = settle_one(reply("hi", input_tokens=100, output_tokens=1000, reasoning=900)).spent
    assert (spent.output_tokens, spent.reasoning_tokens) == (1000, 900)
    assert spent.usd == cost(100, 1000)


def test_details_above_the_totals_are_trusted_rather_than_rejected() -> None:
    """A provider that reports more cache tokens than input tokens does not break the
    settle (on_llm_end must never raise): the details win."""
    spent = settle_one(reply("hi", input_tokens=10, output_tokens=5, cache_read=40)).spent
    assert (spent.input_tokens, spent.cache_read_tokens) == (40, 40)


@pytest.mark.parametrize("reported", ["none", "zeros"])
def test_a_reply_without_usage_is_charged_an_estimate_flagged_as_such(reported: str) -> None:
    """No usage (or all zeros, which several servers send for "unknown") is charged as an
    estimate: more than $0, flagged estimated, and within the hold."""
    message = reply("four words of text", reported=reported == "zeros")
    if reported == "zeros":
        message.usage_metadata = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    budget = settle_one(message, max_tokens=50)
    spent = budget.spent
    assert spent.estimated
    assert spent.usd is not None
    assert spent.usd > 0
    assert budget.report().estimated_calls == 1
    assert 0 < spent.output_tokens <= 50


def test_fake_messages_list_chat_model_without_usage_is_estimated() -> None:
    """LangChain's FakeMessagesListChatModel reports no usage and no model: with unpriced
    calls allowed and a call cap, the call is still counted (never silently free)."""
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage

    budget = allotment.Budget(llm_calls=1, name="run", unknown_price="allow")
    chat = FakeMessagesListChatModel(responses=[AIMessage("hello")])
    chat.invoke("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})
    spent = budget.spent
    assert spent.llm_calls == 1
    assert spent.estimated
    assert spent.usd is None
    assert budget.report().unpriced_calls == 1


def test_chat_openai_usage_with_cache_and_reasoning_is_priced_by_genai_prices(
    provider: ScriptedProvider, chat_openai: object
) -> None:
    """The real ChatOpenAI client's usage (cached prompt tokens, reasoning tokens) is
    settled exactly and priced at gpt-4o-mini's published rates."""
    wire = WireUsage(
        prompt_tokens=2000, completion_tokens=300, cached_tokens=1500, reasoning_tokens=200
    )
    provider.add(Reply.text("answer", usage=wire))
    budget = allotment.Budget(usd="1", name="run")
    model = chat_openai(max_tokens=400)  # type: ignore[operator]
    model.invoke("question", config={"callbacks": [BudgetCallbackHandler(budget)]})
    spent = budget.spent
    assert (spent.input_tokens, spent.cache_read_tokens) == (2000, 1500)
    assert (spent.output_tokens, spent.reasoning_tokens) == (300, 200)
    assert not spent.estimated
    expected = allotment.plugins().price(
        "gpt-4o-mini",
        "openai",
        allotment.Usage(
            input_tokens=2000,
            cache_read_tokens=1500,
            output_tokens=300,
            reasoning_tokens=200,
            llm_calls=1,
        ),
        False,
    )
    assert expected is not None
    assert spent.usd == expected
    # Cached input is cheaper: the same tokens uncached would cost more.
    assert (
        spent.usd < Decimal(2000) * Decimal("0.15") / 10**6 + Decimal(300) * Decimal("0.6") / 10**6
    )
    assert provider.calls == 1
    assert no_open_holds(budget)


def test_tool_calls_do_not_make_the_dollar_spend_unknown() -> None:
    """A tool call is counted (one call, by name) and priced at $0, so a budget that ran
    models and tools still reports its dollar spend."""
    from langchain_core.tools import tool

    @tool
    def ping(x: str) -> str:
        """Ping."""
        return x

    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, _ = fake_chat([reply("hi")])
    chat.invoke("hi", config={"callbacks": [handler]})
    ping.invoke({"x": "y"}, config={"callbacks": [handler]})
    spent = budget.spent
    assert spent.tool_calls == 1
    assert dict(spent.tools) == {"ping": 1}
    assert spent.usd == Decimal("0.025")
    assert budget.report().unpriced_calls == 0


def test_an_answer_from_langchains_cache_is_not_charged() -> None:
    """With an LLM cache, the second identical call is answered from the cache: the hold
    made at its start is released, so only the call that reached the provider counts."""
    from langchain_core.caches import InMemoryCache

    chat, provider = fake_chat(default=reply("cached answer", input_tokens=100, output_tokens=10))
    chat = chat.model_copy(update={"cache": InMemoryCache()})
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    first = chat.invoke("same question", config={"callbacks": [handler]})
    second = chat.invoke("same question", config={"callbacks": [handler]})
    assert first.content == second.content == "cached answer"
    assert provider.calls == 1
    assert budget.spent.llm_calls == 1
    assert budget.spent.usd == cost(100, 10)
    assert no_open_holds(budget)
