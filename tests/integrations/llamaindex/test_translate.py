"""The pure translations: callback payloads to Calls, responses to Usage, errors to outcomes."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib

import allotment
import pytest
from allotment_llamaindex import _translate as t
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks.schema import EventPayload
from llama_index.core.tools import FunctionTool


def _png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(header))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def test_llm_call_reads_model_provider_output_cap_and_tools_from_the_payload() -> None:
    def search(q: str) -> str:
        """Search."""
        return q

    payload = {
        EventPayload.MESSAGES: [ChatMessage(role="user", content="hello")],
        EventPayload.ADDITIONAL_KWARGS: {"tools": [FunctionTool.from_defaults(search)]},
        EventPayload.SERIALIZED: {
            "class_name": "openai_llm",
            "model_name": "gpt-4o-mini",
            "num_output": 256,
        },
    }
    call = t.llm_call(payload, agent="researcher")
    assert (call.model, call.provider, call.max_output_tokens, call.agent) == (
        "gpt-4o-mini",
        "openai",
        256,
        "researcher",
    )
    assert call.tools[0]["function"]["name"] == "search"
    assert call.messages == [{"role": "user", "content": ["hello"]}]


def test_output_cap_takes_the_larger_of_the_llm_and_call_limits_and_ignores_minus_one() -> None:
    assert t.output_cap({"num_output": -1}, {}) is None
    assert t.output_cap({"num_output": 100}, {"max_tokens": 300}) == 300
    assert t.output_cap({"num_output": 500}, {"max_completion_tokens": 300}) == 500
    assert t.output_cap({}, {"max_tokens": True}) is None


def test_a_completion_prompt_becomes_one_user_message() -> None:
    call = t.llm_call({EventPayload.PROMPT: "Say hi", EventPayload.SERIALIZED: {}})
    assert call.messages == [{"role": "user", "content": "Say hi"}]
    assert call.model is None


def test_message_dict_keeps_every_block_that_is_sent() -> None:
    image = base64.b64encode(_png(64, 32))
    message = ChatMessage(
        role="assistant",
        blocks=[
            TextBlock(text="look"),
            ImageBlock(image=image, image_mimetype="image/png", detail="low"),
            ThinkingBlock(content="hmm"),
            ToolCallBlock(tool_call_id="c1", tool_name="search", tool_kwargs={"q": "x"}),
        ],
        additional_kwargs={"tool_call_id": "c0"},
    )
    plain = t.message_dict(message)
    assert plain["role"] == "assistant"
    assert plain["content"][0] == "look"
    assert plain["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert plain["content"][1]["image_url"]["detail"] == "low"
    assert plain["content"][2] == "hmm"
    assert plain["tool_calls"] == [{"name": "search", "arguments": '{"q":"x"}'}]
    assert plain["tool_call_id"] == "c0"
    # The estimator reads the image's size from its header, not its base64 length.
    est = allotment.Budget(name="b").estimate(allotment.Call(model="gpt-4o", messages=[plain]))
    assert any("images by rule" in note for note in est[0].notes)


def test_usage_of_an_openai_response_includes_cached_and_reasoning_parts() -> None:
    raw = {
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    }
    usage = t.usage_of_response(ChatResponse(message=ChatMessage(content="x"), raw=raw))
    assert usage == allotment.Usage(
        input_tokens=100,
        output_tokens=50,
        cache_read_tokens=40,
        reasoning_tokens=30,
        llm_calls=1,
    )


def test_usage_of_an_anthropic_response_adds_cache_tokens_back_into_input() -> None:
    counts = {
        "input_tokens": 10,
        "output_tokens": 5,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20,
    }
    usage = t.usage_from_counts(counts)
    assert usage is not None
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (130, 100, 20)


def test_usage_of_a_responses_api_or_gemini_response() -> None:
    responses = t.usage_from_counts(
        {"input_tokens": 50, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 20}}
    )
    assert responses is not None
    assert (responses.input_tokens, responses.cache_read_tokens) == (50, 20)
    gemini = t.usage_from_counts(
        {"prompt_token_count": 7, "candidates_token_count": 3, "thoughts_token_count": 4}
    )
    assert gemini is not None
    assert (gemini.output_tokens, gemini.reasoning_tokens) == (7, 4)


def test_usage_falls_back_to_additional_kwargs_token_counts_and_else_is_none() -> None:
    counted = CompletionResponse(
        text="x", additional_kwargs={"prompt_tokens": 3, "completion_tokens": 4}
    )
    usage = t.usage_of_response(counted)
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (3, 4)
    assert t.usage_of_response(CompletionResponse(text="x")) is None
    assert t.usage_of_response(CompletionResponse(text="x", raw={"usage": None})) is None


def test_response_text_has_content_and_tool_call_arguments() -> None:
    message = ChatMessage(
        role="assistant",
        blocks=[
            TextBlock(text="I will search. "),
            ToolCallBlock(tool_name="search", tool_kwargs="{}"),
        ],
    )
    assert t.response_text(ChatResponse(message=message)) == "I will search. search{}"
    assert t.response_text(CompletionResponse(text="done")) == "done"
    assert t.response_text(None) == ""


class _StatusError(Exception):
    status_code = 500


class _APITimeoutError(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "partial", "outcome"),
    [
        (allotment.BudgetExceeded(path="b", limit_name="usd"), False, "release"),
        (_StatusError(), False, "release"),
        (_APITimeoutError(), False, "estimate"),
        (GeneratorExit(), False, "estimate"),
        (asyncio.CancelledError(), False, "estimate"),
        (ValueError("bad input"), False, "release"),
        (ValueError("connection reset"), True, "estimate"),
    ],
)
def test_error_outcome_charges_only_what_may_have_been_billed(
    error: BaseException, partial: bool, outcome: str
) -> None:
    assert t.error_outcome(error, partial=partial) == outcome


def test_stream_usage_is_requested_only_for_classes_that_forward_it_safely() -> None:
    assert t.wants_stream_usage({"class_name": "openai_llm"})
    assert not t.wants_stream_usage({"class_name": "CustomLLM"})
    kwargs: dict[str, object] = {"stream_options": {"include_usage": False}}
    t.request_stream_usage(kwargs)
    assert kwargs["stream_options"] == {"include_usage": False}
