"""ChatOpenAI's own retries (inside the openai SDK, invisible to callbacks): what the
handler sees without help, and what the metered transport adds."""

from __future__ import annotations

from typing import Any

import allotment
import pytest
from allotment.testing import Failure, Reply, ScriptedProvider
from allotment_langchain import BudgetCallbackHandler

ChatFactory = Any


def run(model: Any, budget: allotment.Budget) -> Any:
    return model.invoke("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})


@pytest.mark.parametrize("metered", [False, True], ids=["plain", "metered"])
def test_rate_limited_attempts_are_not_charged_and_the_answer_is(
    provider: ScriptedProvider, chat_openai: ChatFactory, metered: bool
) -> None:
    """429, 429, 200: the provider bills only the 200, and so does the budget, whether or
    not the transport sees the retries."""
    provider.fail(429, times=2).add(Reply.text("finally"))
    budget = allotment.Budget(usd="1", name="run")
    assert (
        run(chat_openai(max_retries=2, max_tokens=20, metered=metered), budget).content == "finally"
    )
    assert provider.attempts == 3
    assert provider.billed == 1
    assert budget.spent.llm_calls == 1
    charged = provider.requests[-1].charged
    assert charged is not None
    assert (budget.spent.input_tokens, budget.spent.output_tokens) == (
        charged.prompt_tokens,
        charged.completion_tokens,
    )
    assert not budget.spent.estimated
    assert budget.report().open_holds == 0


def test_without_the_meter_a_timed_out_attempt_is_invisible(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """A request that times out and is retried by the SDK: callbacks see one call, so the
    budget records one; the timed-out attempt (which a real provider may have run and
    billed) is not seen. This is the gap the metered transport closes."""
    provider.add(Failure.timeout(5.0), Reply.text("second try"))
    budget = allotment.Budget(usd="1", name="run")
    model = chat_openai(max_retries=1, max_tokens=20, timeout=0.5)
    assert run(model, budget).content == "second try"
    assert provider.attempts == 2
    assert budget.spent.llm_calls == 1
    assert not budget.spent.estimated


def test_with_the_meter_a_timed_out_attempt_is_charged_its_bound(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """With the metered transport the timed-out attempt had its own hold; since nobody
    can tell whether it was billed, it is charged its bound, flagged estimated."""
    provider.add(Failure.timeout(5.0), Reply.text("second try"))
    budget = allotment.Budget(usd="1", name="run")
    model = chat_openai(max_retries=1, max_tokens=20, timeout=0.5, metered=True)
    assert run(model, budget).content == "second try"
    assert provider.attempts == 2
    spent = budget.spent
    assert spent.llm_calls == 2
    assert spent.estimated
    assert budget.report().estimated_calls == 1
    assert spent.output_tokens == 20 + provider.requests[-1].charged.completion_tokens  # type: ignore[union-attr]
    assert budget.report().open_holds == 0


def test_the_meter_refuses_a_retry_the_budget_cannot_cover(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """max_retries=5 is not trusted: with room for two attempts, the third is refused
    before it is sent and the caller gets the typed refusal, not a client error."""
    provider.fail(500, times=6, retry_after=0.01)
    budget = allotment.Budget(llm_calls=2, name="run")
    handler = BudgetCallbackHandler(budget)
    model = chat_openai(max_retries=5, max_tokens=20, metered=True)
    with pytest.raises(allotment.BudgetExceeded, match="llm_calls"):
        model.invoke("hi", config={"callbacks": [handler]})
    assert provider.attempts == 2
    assert budget.spent.llm_calls == 0  # a 500 is not billed
    assert budget.report().open_holds == 0
    assert handler.open_runs == 0


async def test_the_async_meter_meters_async_retries(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """The async transport does the same for ainvoke/astream."""
    provider.fail(429).add(Reply.text("async"))
    budget = allotment.Budget(usd="1", name="run")
    model = chat_openai(max_retries=2, max_tokens=20, metered=True, stream_usage=True)
    chunks = [
        c async for c in model.astream("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})
    ]
    assert "".join(str(c.content) for c in chunks) == "async"
    assert provider.attempts == 2
    assert budget.spent.llm_calls == 1
    assert not budget.spent.estimated
    assert budget.report().open_holds == 0


def test_the_meter_passes_through_requests_outside_a_metered_call(
    provider: ScriptedProvider,
) -> None:
    """Outside a model call the handler started (no budget, or other endpoints), the
    transport is a plain transport."""
    from allotment_langchain import metered_http_client

    provider.add(Reply.text("unmetered"))
    with metered_http_client() as client:
        response = client.post(
            f"{provider.base_url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {provider.api_key}"},
        )
        assert response.status_code == 200
        assert client.get(f"{provider.base_url}/models").status_code == 200
