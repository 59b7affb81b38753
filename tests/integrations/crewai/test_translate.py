"""The pure translations between CrewAI's objects and allotment's values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from allotment_crewai import _translate as t
from crewai.types.usage_metrics import UsageMetrics


@pytest.mark.parametrize(
    ("model", "provider", "expected"),
    [
        ("gpt-4o-mini", "openai", ("gpt-4o-mini", "openai")),  # CrewAI's native providers
        ("openai/gpt-4o-mini", "openai", ("gpt-4o-mini", "openai")),  # LiteLLM-style names
        ("anthropic/claude-sonnet-4-5", None, ("claude-sonnet-4-5", "anthropic")),
        ("accounts/fireworks/models/x", "fireworks", ("accounts/fireworks/models/x", "fireworks")),
        ("fake-1", "", ("fake-1", None)),
    ],
)
def test_model_and_provider_are_read_as_the_provider_names_them(
    model: str, provider: str | None, expected: tuple[str | None, str | None]
) -> None:
    assert t.model_of(SimpleNamespace(model=model, provider=provider)) == expected


def test_the_output_cap_is_what_the_llm_sends() -> None:
    assert t.max_output_of(SimpleNamespace(max_completion_tokens=None, max_tokens=500)) == 500
    assert t.max_output_of(SimpleNamespace(max_completion_tokens=200, max_tokens=500)) == 200
    assert t.max_output_of(SimpleNamespace(max_tokens=512.0)) == 512
    assert t.max_output_of(SimpleNamespace(max_tokens=None)) is None
    assert t.max_output_of(SimpleNamespace(max_tokens=True)) is None


def test_usage_keeps_cache_and_reasoning_as_parts_and_zeros_mean_unreported() -> None:
    metrics = UsageMetrics.from_provider_dict(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 300,
            "cached_prompt_tokens": 400,
            "reasoning_tokens": 200,
        }
    )
    usage = t.usage_of(metrics)
    assert usage is not None
    assert (usage.input_tokens, usage.cache_read_tokens) == (1000, 400)
    assert (usage.output_tokens, usage.reasoning_tokens) == (300, 200)
    assert usage.llm_calls == 1
    assert t.usage_of(UsageMetrics.from_provider_dict({"total_tokens": 0})) is None
    assert t.usage_of(None) is None
    # parts larger than the totals: trusted on the parts
    odd = t.usage_of(SimpleNamespace(prompt_tokens=10, completion_tokens=5, reasoning_tokens=9))
    assert odd is not None
    assert odd.output_tokens == 9


def test_delegations_are_recognised_with_the_coworker_they_name() -> None:
    assert t.coworker_of("delegate_work_to_coworker", {"coworker": "Researcher"}) == "Researcher"
    assert t.coworker_of("ask_question_to_coworker", {"co_worker": '"Writer"'}) == "Writer"
    assert t.coworker_of("delegate_work_to_coworker", {"coworker": "[Lead, Junior]"}) == "Lead"
    assert t.coworker_of("search", {"coworker": "Researcher"}) is None
    assert t.coworker_of("delegate_work_to_coworker", {"task": "x"}) is None


def test_roles_match_as_crewai_matches_coworkers() -> None:
    assert t.same_role("Senior  Researcher", 'senior "researcher"')
    assert not t.same_role("Researcher", "Writer")


def test_names_are_valid_budget_names() -> None:
    assert t.budget_name("a/b#c", "x") == "a_b_c"
    assert t.budget_name("   ", "agent") == "agent"
    assert t.budget_name("x" * 100, "y") == "x" * 64
    assert t.task_label(SimpleNamespace(name="research"), 1) == "research"
    assert t.task_label(SimpleNamespace(name=None, description="d"), 2) == "task 2"
    assert t.was_blocked("Tool execution blocked by hook. Tool: search")
    assert not t.was_blocked("results")
