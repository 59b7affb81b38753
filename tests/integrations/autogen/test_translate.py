"""The pure translations: AutoGen messages, tools and results into kernel calls and usage."""

from __future__ import annotations

from typing import Any

import allotment
from allotment_autogen import BudgetedChatCompletionClient, _translate
from autogen_core import FunctionCall, Image
from autogen_core.models import (
    AssistantMessage,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    RequestUsage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import FunctionTool
from PIL import Image as PILImage
from pydantic import BaseModel


def test_every_message_kind_becomes_what_the_provider_is_sent() -> None:
    picture = Image.from_pil(PILImage.new("RGB", (640, 480)))
    messages = [
        SystemMessage(content="Be brief."),
        UserMessage(content=["Look:", picture], source="ann"),
        AssistantMessage(
            content=[FunctionCall(id="c1", name="zoom", arguments='{"x": 2}')],
            thought="I should zoom.",
            source="bot",
        ),
        FunctionExecutionResultMessage(
            content=[
                FunctionExecutionResult(content="zoomed", name="zoom", call_id="c1"),
                FunctionExecutionResult(content="again", name="zoom", call_id="c2"),
            ]
        ),
        AssistantMessage(content="Done.", source="bot"),
    ]
    sent, images = _translate.messages_of(messages)
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert sent[1] == {
        "role": "user",
        "name": "ann",
        "content": [{"type": "text", "text": "Look:"}],
    }
    assert images == [allotment.Image(width=640, height=480)]
    assert sent[2]["tool_calls"][0]["function"] == {"name": "zoom", "arguments": '{"x": 2}'}
    assert sent[2]["reasoning"] == "I should zoom."
    assert [m["tool_call_id"] for m in sent[3:5]] == ["c1", "c2"]  # one message per result
    assert sent[5] == {"role": "assistant", "name": "bot", "content": "Done."}


def test_name_prefixes_are_counted_when_the_client_adds_them() -> None:
    sent, _ = _translate.messages_of([UserMessage(content="hi", source="ann")], name_prefixes=True)
    assert sent[0]["content"] == "ann said:\nhi"


def test_a_call_carries_tool_schemas_structured_output_and_the_output_cap() -> None:
    async def lookup(city: str) -> str:
        return city

    class Answer(BaseModel):
        text: str

    tool = FunctionTool(lookup, description="Look a city up.")
    facts = _translate.ClientFacts(
        model="gpt-4o-mini",
        provider="openai",
        max_output_tokens=200,
        name_prefixes=False,
        stream_usage_option=True,
        stream_options_set=False,
        caches=False,
    )
    call = _translate.call_of([], [tool], Answer, {}, facts, agent="writer")
    assert call.tools[0] == tool.schema
    assert call.tools[1] is Answer
    assert (call.model, call.provider, call.agent) == ("gpt-4o-mini", "openai", "writer")
    assert call.max_output_tokens == 200
    override = _translate.call_of([], [], None, {"max_tokens": 5, "model": "o1"}, facts, agent=None)
    assert (override.max_output_tokens, override.model) == (5, "o1")


def test_zero_usage_means_unknown_not_free() -> None:
    assert _translate.usage_of(RequestUsage(prompt_tokens=0, completion_tokens=0)) is None
    assert _translate.usage_of(None) is None
    assert _translate.usage_of(RequestUsage(prompt_tokens=3, completion_tokens=0)) == (
        allotment.Usage(input_tokens=3, output_tokens=0, llm_calls=1)
    )


def test_the_generated_part_of_a_result_includes_tool_calls() -> None:
    calls = [FunctionCall(id="1", name="zoom", arguments='{"x":2}')]
    assert _translate.result_text(calls) == 'zoom{"x":2}'
    assert _translate.result_text("plain") == "plain"


def test_counts_bound_text_from_above_and_estimate_streams_closely() -> None:
    text = "Hello there, general Kenobi."
    exact = _translate.bound_tokens(text, "gpt-4o-mini")
    assert 0 < exact < len(text)  # the model's own tokenizer
    assert _translate.bound_tokens(text, "some-unknown-model") == len(text.encode())  # bytes
    assert _translate.seen_tokens(text, "some-unknown-model") <= exact + 2


def test_client_facts_come_from_the_client_under_caches_and_wrappers(replay: Any) -> None:
    from autogen_ext.models.cache import ChatCompletionCache
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    openai_client = OpenAIChatCompletionClient(
        model="gpt-4o-mini", api_key="sk-not-used", max_tokens=77, add_name_prefixes=True
    )
    facts = _translate.facts_of(ChatCompletionCache(openai_client))
    assert (facts.model, facts.provider, facts.max_output_tokens) == ("gpt-4o-mini", "openai", 77)
    assert facts.name_prefixes
    assert facts.stream_usage_option
    assert facts.caches
    wrapped = BudgetedChatCompletionClient(replay([]), model="fake-1", provider="acme")
    outer = _translate.facts_of(wrapped)
    assert (outer.model, outer.provider, outer.caches) == ("fake-1", "acme", False)
    assert not outer.stream_usage_option
