"""BudgetedChatCompletionClient around AutoGen's real OpenAI client (over the scripted
provider) and its replay client: reserve before, settle after, release when not sent."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

import allotment
import openai
import pytest
from allotment._estimate import load_encoding
from allotment.testing import Failure, Reply, ScriptedProvider
from allotment_autogen import (
    BudgetedChatCompletionClient,
    BudgetedChatCompletionClientConfig,
    _translate,
)
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient, CreateResult, UserMessage

HI = [UserMessage(content="Say something short.", source="user")]
PRICES = {"fake-1": allotment.Price(input_mtok="10", output_mtok="30")}
LONG = " ".join(f"word{i}" for i in range(60))


def billed(provider: ScriptedProvider) -> tuple[int, int]:
    usage = provider.billed_usage
    return usage.prompt_tokens, usage.completion_tokens


def ledger(budget: allotment.Budget) -> tuple[int, int]:
    spent = budget.spent
    return spent.input_tokens, spent.output_tokens


async def drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_a_refused_call_never_reaches_the_provider(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    budget = allotment.Budget(usd="0.000001", name="tiny")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    with pytest.raises(allotment.BudgetExceeded) as refused:
        await client.create(HI)
    assert refused.value.path == "tiny"
    assert refused.value.limit_name == "usd"
    assert provider.attempts == 0
    assert budget.spent.llm_calls == 0
    assert budget.report().open_holds == 0


async def test_create_settles_the_usage_the_provider_reported(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    budget = allotment.Budget(usd="1.00", name="run")
    client = BudgetedChatCompletionClient(openai_client(), budget, agent="writer")
    result = await client.create(HI)
    assert isinstance(result, CreateResult)
    assert provider.calls == 1
    assert ledger(budget) == billed(provider)
    assert budget.spent.llm_calls == 1
    assert not budget.spent.estimated
    assert budget.spent.usd is not None
    assert budget.spent.usd > 0
    assert budget.report().open_holds == 0


async def test_a_stream_asks_for_usage_and_settles_it(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    items = await drain(client.create_stream(HI))
    assert isinstance(items[-1], CreateResult)
    assert provider.requests[-1].include_usage
    assert ledger(budget) == billed(provider)
    assert not budget.spent.estimated
    assert budget.report().open_holds == 0


@pytest.mark.parametrize("why", ["client turned usage off", "provider ignores the option"])
async def test_a_stream_without_usage_is_charged_as_a_flagged_estimate_never_free(
    provider: ScriptedProvider, openai_client: Any, why: str
) -> None:
    if why == "client turned usage off":
        inner = openai_client(stream_options={"include_usage": False})
        provider.add(Reply.text(LONG))
    else:
        inner = openai_client()
        provider.add(Reply.text(LONG, stream_usage=False))
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(inner, budget)
    items = await drain(client.create_stream(HI))
    assert items[-1].usage.prompt_tokens == 0  # AutoGen's 0/0 for "no usage"
    spent = budget.spent
    assert spent.estimated
    assert budget.report().estimated_calls == 1
    assert spent.usd is not None
    assert spent.usd > 0
    # The estimate bounds what the provider bills from above.
    prompt, completion = billed(provider)
    assert spent.input_tokens >= prompt
    assert spent.output_tokens >= completion
    assert budget.report().open_holds == 0


async def test_a_response_without_usage_is_estimated_not_free(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(Reply.text("Four words of reply.", usage=None))
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    await client.create(HI)
    assert budget.spent.estimated
    assert budget.spent.output_tokens >= 5
    assert budget.spent.usd is not None
    assert budget.spent.usd > 0


async def test_a_failed_call_is_released(provider: ScriptedProvider, openai_client: Any) -> None:
    provider.fail(400)
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    with pytest.raises(openai.BadRequestError):
        await client.create(HI)
    assert provider.attempts == 1
    assert provider.calls == 0
    assert budget.spent.llm_calls == 0
    assert budget.held.llm_calls == 0
    assert budget.report().open_holds == 0


async def test_cancelled_before_sending_is_released(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    token = CancellationToken()
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client.create(HI, cancellation_token=token)
    with pytest.raises(asyncio.CancelledError):
        await drain(client.create_stream(HI, cancellation_token=token))
    assert provider.attempts == 0
    assert budget.spent.llm_calls == 0
    assert budget.report().open_holds == 0


async def test_cancelled_in_flight_is_charged_its_bound_because_the_provider_bills_it(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(Reply.text("late", delay=1.0))
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    token = CancellationToken()
    call = asyncio.ensure_future(client.create(HI, cancellation_token=token))
    while provider.attempts == 0:
        await asyncio.sleep(0.01)
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert provider.calls == 1  # the provider answers, and bills, after the client left
    spent = budget.spent
    assert spent.llm_calls == 1
    assert spent.estimated
    prompt, completion = billed(provider)
    assert spent.input_tokens >= prompt
    assert spent.output_tokens >= completion
    assert budget.report().open_holds == 0


async def test_a_stream_the_consumer_stops_is_charged_for_what_was_streamed(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(Reply.text(LONG))
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(), budget)
    stream = client.create_stream(HI)
    seen = []
    async for item in stream:
        seen.append(item)
        if len(seen) == 3:
            break
    await stream.aclose()
    spent = budget.spent
    assert spent.llm_calls == 1
    assert spent.estimated
    assert spent.output_tokens >= 3
    assert budget.report().open_holds == 0


async def test_a_stream_running_past_its_hold_is_cut_within_a_chunk_and_charged(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    # The client asks for at most 5 tokens; this provider ignores max_tokens.
    provider.add(Reply.text(LONG))
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(max_tokens=5), budget)
    chunks: list[Any] = []

    async def consume() -> None:
        async for item in client.create_stream(HI):
            chunks.append(item)

    with pytest.raises(allotment.BudgetExceeded) as cut:
        await consume()
    assert cut.value.limit_name == "output_tokens"
    # Stopped within one chunk of crossing: what got through fits, one more chunk did not.
    o200k = load_encoding("o200k_base")
    assert o200k is not None
    streamed = len(o200k.encode("".join(chunks)))
    assert 0 < streamed <= 5 < streamed + len(o200k.encode(f" word{len(chunks)}"))
    assert budget.spent.output_tokens > 5
    assert budget.spent.estimated
    assert budget.report().open_holds == 0


async def test_cache_hits_cost_nothing(provider: ScriptedProvider, openai_client: Any) -> None:
    from autogen_ext.models.cache import ChatCompletionCache

    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(ChatCompletionCache(openai_client()), budget)
    first = await client.create(HI)
    assert not first.cached  # (the in-memory cache marks this very object cached on a hit)
    second = await client.create(HI)
    assert second.cached
    assert provider.calls == 1
    assert budget.spent.llm_calls == 1
    assert ledger(budget) == billed(provider)
    assert budget.report().open_holds == 0


async def test_replay_usage_is_settled_as_the_replay_reports_it(replay: Any) -> None:
    inner = replay(["one two three", "four five"])
    budget = allotment.Budget(usd="1.00", prices=PRICES)
    client = BudgetedChatCompletionClient(inner, budget, model="fake-1")
    await client.create(HI)
    await drain(client.create_stream(HI))
    total = inner.total_usage()
    assert (budget.spent.input_tokens, budget.spent.output_tokens) == (
        total.prompt_tokens,
        total.completion_tokens,
    )
    assert budget.spent.llm_calls == 2


async def test_a_client_without_a_model_name_fails_closed_under_a_dollar_cap(
    replay: Any,
) -> None:
    inner = replay(["never sent"])
    client = BudgetedChatCompletionClient(inner, allotment.Budget(usd="1.00"))
    with pytest.raises(allotment.UnknownPrice):
        await client.create(HI)
    assert inner.create_calls == []


async def test_without_any_budget_the_call_is_a_configuration_error(replay: Any) -> None:
    inner = replay(["never sent"])
    client = BudgetedChatCompletionClient(inner, model="fake-1")
    with pytest.raises(allotment.ConfigurationError, match="no budget"):
        await client.create(HI)
    assert inner.create_calls == []


async def test_the_active_budget_is_charged_and_a_sub_agent_child_wins_over_explicit(
    replay: Any,
) -> None:
    root = allotment.Budget(usd="1.00", prices=PRICES, name="root")
    floating = BudgetedChatCompletionClient(replay(["a"]), model="fake-1")
    with root.activate():
        await floating.create(HI)
    assert root.spent.llm_calls == 1

    bound = BudgetedChatCompletionClient(replay(["b", "c"]), root, model="fake-1")
    child = root.allot("sub")
    unrelated = allotment.Budget(name="unrelated")
    with child.activate():
        await bound.create(HI)  # the child is beneath the explicit budget: it is charged
    with unrelated.activate():
        await bound.create(HI)  # an unrelated active budget does not capture the call
    assert child.spent.llm_calls == 1
    assert unrelated.spent.llm_calls == 0
    assert root.spent.llm_calls == 3


async def test_a_wrapped_wrapper_charges_each_call_once(replay: Any) -> None:
    budget = allotment.Budget(usd="1.00", prices=PRICES)
    inner = BudgetedChatCompletionClient(replay(["x"]), budget, model="fake-1")
    outer = BudgetedChatCompletionClient(inner, budget)
    await outer.create(HI)
    assert outer.model == "fake-1"
    assert budget.spent.llm_calls == 1


async def test_clamp_lowers_max_tokens_to_what_the_remaining_dollars_afford(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    # $0.001 cannot hold gpt-4o-mini's 16,384-token maximum output ($0.0098).
    budget = allotment.Budget(usd="0.001")
    plain = BudgetedChatCompletionClient(openai_client(), budget)
    with pytest.raises(allotment.BudgetExceeded):
        await plain.create(HI)
    clamped = BudgetedChatCompletionClient(openai_client(), budget, clamp=True)
    await clamped.create(HI)
    sent = provider.requests[-1].json["max_tokens"]
    assert 0 < sent < 16_384
    # The largest output that fits what was left: one more token would not have.
    call = _translate.call_of(HI, (), None, {}, _translate.facts_of(clamped.inner), agent=None)
    _, fits = budget.estimate(dataclasses.replace(call, max_output_tokens=sent))
    _, over = budget.estimate(dataclasses.replace(call, max_output_tokens=sent + 1))
    assert fits is not None
    assert over is not None
    assert fits <= Decimal("0.001") < over
    assert budget.spent.usd is not None
    assert budget.spent.usd <= Decimal("0.001")


async def test_it_is_a_component_that_round_trips_without_its_budget(replay: Any) -> None:
    client = BudgetedChatCompletionClient(
        replay(["hello"]), allotment.Budget(), agent="writer", clamp=True, model="fake-1"
    )
    dumped = client.dump_component()
    assert dumped.provider == "allotment_autogen.BudgetedChatCompletionClient"
    config = BudgetedChatCompletionClientConfig.model_validate(dumped.config)
    assert (config.agent, config.clamp, config.model) == ("writer", True, "fake-1")
    loaded = ChatCompletionClient.load_component(dumped)
    assert isinstance(loaded, BudgetedChatCompletionClient)
    assert loaded.budget is None
    assert loaded.agent == "writer"
    assert loaded.clamp
    budget = allotment.Budget(usd="1.00", prices=PRICES)
    with budget.activate():
        result = await loaded.create(HI)
    assert result.content == "hello"
    assert budget.spent.llm_calls == 1


async def test_it_delegates_what_it_does_not_meter(replay: Any) -> None:
    inner = replay(["one two"])
    client = BudgetedChatCompletionClient(inner, allotment.Budget(prices=PRICES), model="fake-1")
    assert client.model_info == inner.model_info
    assert client.count_tokens(HI) == inner.count_tokens(HI)
    assert client.remaining_tokens(HI) == inner.remaining_tokens(HI)
    await client.create(HI)
    assert client.actual_usage() == inner.actual_usage()
    assert client.total_usage() == inner.total_usage()
    with pytest.warns(DeprecationWarning, match="capabilities is deprecated"):
        assert client.capabilities == inner.model_info
    await client.close()
    assert client.inner is inner
    assert "ReplayChatCompletionClient" in repr(client)


def test_bad_arguments_are_typed_errors(replay: Any) -> None:
    with pytest.raises(allotment.ConfigurationError, match="ChatCompletionClient"):
        BudgetedChatCompletionClient(object())  # type: ignore[arg-type]
    with pytest.raises(allotment.ConfigurationError, match=r"allotment\.Budget"):
        BudgetedChatCompletionClient(replay([]), "0.10")  # type: ignore[arg-type]


async def test_a_timed_out_request_is_released(
    provider: ScriptedProvider, openai_client: Any
) -> None:
    provider.add(Failure.timeout(5))
    budget = allotment.Budget(usd="1.00")
    client = BudgetedChatCompletionClient(openai_client(timeout=0.2), budget)
    with pytest.raises(openai.APITimeoutError):
        await client.create(HI)
    assert provider.calls == 0
    assert budget.spent.llm_calls == 0
    assert budget.report().open_holds == 0
