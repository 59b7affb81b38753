"""CrewAI's own OpenAI provider over HTTP, against the scripted provider on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import allotment
import pytest
from allotment import Budget
from allotment.testing import Failure, Reply, ScriptedProvider
from allotment_crewai import CrewBudgetExceeded, crew_config
from crewai import LLM, Agent, Crew, Task

MODEL = "gpt-4o-mini"


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    with ScriptedProvider(default=None) as p:
        yield p


def openai_llm(provider: ScriptedProvider, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 300)
    return LLM(model=f"openai/{MODEL}", base_url=provider.base_url, api_key=provider.api_key, **kw)


def one_agent_crew(llm: Any, budget: Budget, tools: list[Any] | None = None, **kw: Any) -> Crew:
    researcher = Agent(
        role="Researcher", goal="find facts", backstory="careful", llm=llm, tools=tools or []
    )
    research = Task(
        name="research", description="research x", expected_output="facts", agent=researcher
    )
    return Crew(agents=[researcher], tasks=[research], **crew_config(budget), **kw)


def priced(usage: allotment.Usage) -> Decimal | None:
    return allotment.plugins().price(MODEL, "openai", usage, False)


def assert_ledger_equals_provider_log(budget: Budget, provider: ScriptedProvider) -> None:
    billed = provider.billed_usage
    spent = budget.spent
    assert spent.llm_calls == provider.calls
    assert (spent.input_tokens, spent.output_tokens) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    assert spent.usd == priced(
        allotment.Usage(input_tokens=billed.prompt_tokens, output_tokens=billed.completion_tokens)
    )
    assert budget.report().open_holds == 0


def test_the_native_openai_provider_is_metered_and_the_ledger_equals_the_provider_log(
    provider: ScriptedProvider, search_tool: Any
) -> None:
    b = Budget(usd="0.50", name="run")
    provider.add(Reply.tool_call("search", {"query": "x"}), Reply.text("the facts"))
    llm = openai_llm(provider)
    assert type(llm).__name__ == "OpenAICompletion"  # CrewAI's native SDK path, no LiteLLM

    out = one_agent_crew(llm, b, [search_tool]).kickoff()

    assert out.raw == "the facts"
    assert provider.calls == 2
    assert search_tool.runs == 1
    assert provider.requests[0].tools  # the tool schemas were sent, and reserved for
    assert_ledger_equals_provider_log(b, provider)
    assert not b.spent.estimated


def test_streamed_calls_settle_from_the_usage_the_stream_reports(
    provider: ScriptedProvider, search_tool: Any
) -> None:
    b = Budget(usd="0.50", name="run")
    provider.add(Reply.tool_call("search", {"query": "x"}), Reply.text("streamed facts here"))

    out = one_agent_crew(openai_llm(provider, stream=True), b, [search_tool]).kickoff()

    assert "streamed facts" in out.raw
    assert all(r.stream and r.include_usage for r in provider.requests)
    assert_ledger_equals_provider_log(b, provider)
    assert not b.spent.estimated


def test_a_stream_that_reports_no_usage_is_charged_its_estimate_flagged(
    provider: ScriptedProvider,
) -> None:
    b = Budget(usd="0.50", name="run")
    provider.add(Reply.text("facts", stream_usage=False))

    one_agent_crew(openai_llm(provider, stream=True), b).kickoff()

    assert provider.calls == 1
    report = b.report()
    assert report.estimated_calls == 1
    assert report.spent.llm_calls == 1
    assert b.spent.usd is not None
    assert b.spent.usd > 0
    assert b.spent.output_tokens == 300  # the hold's bound: max_tokens


def test_a_crew_in_stream_mode_is_metered_too(provider: ScriptedProvider) -> None:
    b = Budget(usd="0.50", name="run")
    provider.add(Reply.text("chunked facts"))

    streaming = one_agent_crew(openai_llm(provider, stream=True), b, stream=True).kickoff()
    chunks = list(streaming)

    assert chunks
    assert "chunked facts" in streaming.result.raw
    assert_ledger_equals_provider_log(b, provider)


def test_an_attempt_the_provider_throttles_is_retried_inside_one_hold_and_charged_once(
    provider: ScriptedProvider,
) -> None:
    b = Budget(usd="0.50", name="run")
    provider.fail(429).add(Reply.text("facts"))

    one_agent_crew(openai_llm(provider), b).kickoff()

    assert provider.attempts == 2
    assert provider.calls == 1
    assert_ledger_equals_provider_log(b, provider)


def test_a_refused_call_never_reaches_the_provider(provider: ScriptedProvider) -> None:
    b = Budget(usd="0.0001", name="run")

    with pytest.raises(CrewBudgetExceeded) as info:
        one_agent_crew(openai_llm(provider), b).kickoff()

    assert provider.attempts == 0
    assert info.value.limit_name == "usd"
    assert info.value.path == "run"
    assert b.spent.usd == 0
    assert b.report().open_holds == 0


def test_a_provider_error_is_not_charged(provider: ScriptedProvider) -> None:
    b = Budget(usd="0.50", name="run")
    provider.add(Failure.http(400, message="bad request"), Reply.text("facts"))

    one_agent_crew(openai_llm(provider), b).kickoff()

    assert provider.attempts == 2
    assert provider.calls == 1
    assert_ledger_equals_provider_log(b, provider)
