"""The pure translations between LangChain's callback arguments and allotment values."""

from __future__ import annotations

import sys
from pathlib import Path

import allotment
import httpx
import pytest
from allotment_langchain import BudgetHardStop
from allotment_langchain._subagents import budget_name, marker_of, subgraph_name, task_depth
from allotment_langchain._tokens import approximate, charged_tokens, counter
from allotment_langchain._translate import (
    chunk_text,
    event_text,
    event_usage,
    generated_text,
    llm_call,
    max_tokens_of,
    message_payload,
    model_of,
    reached_provider,
    reported_usage,
    streams_without_usage,
    usage_from_metadata,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, LLMResult


def test_model_name_prefers_langsmith_metadata_then_invocation_params() -> None:
    """ls_model_name wins; ChatOpenAI's model/model_name params are the fallback."""
    assert model_of({"ls_model_name": "gpt-4o"}, {"model": "other"}) == "gpt-4o"
    assert model_of({}, {"model_name": "gpt-4o-mini"}) == "gpt-4o-mini"
    assert model_of({}, {}) is None


def test_max_tokens_is_read_under_every_providers_name_and_validated() -> None:
    """max_tokens, max_completion_tokens (ChatOpenAI), max_output_tokens, ls_max_tokens;
    non-integers are ignored rather than crashing the start callback."""
    assert max_tokens_of({}, {"max_completion_tokens": 50}) == 50
    assert max_tokens_of({}, {"max_output_tokens": 70}) == 70
    assert max_tokens_of({"ls_max_tokens": 90}, {}) == 90
    assert max_tokens_of({}, {"max_tokens": "a lot"}) is None
    assert max_tokens_of({}, {"max_tokens": True}) is None


def test_messages_become_role_content_payloads_with_tool_calls() -> None:
    """Human/AI/system/tool messages map to the roles providers are sent; tool calls and
    tool results keep their names, ids and arguments (they are billed input)."""
    ai = AIMessage("", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "c1"}])
    assert message_payload(HumanMessage("hi")) == {"role": "user", "content": "hi"}
    assert message_payload(SystemMessage("be brief"))["role"] == "system"
    assert message_payload(ai)["tool_calls"] == [{"id": "c1", "name": "search", "args": {"q": "x"}}]
    tool = message_payload(ToolMessage("result", tool_call_id="c1", name="search"))
    assert (tool["role"], tool["tool_call_id"], tool["name"]) == ("tool", "c1", "search")
    assert message_payload("a plain prompt") == "a plain prompt"


def test_an_llm_call_carries_model_tools_and_output_cap() -> None:
    """The kernel call has what the estimator and pricing need."""
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    call = llm_call(
        [HumanMessage("hi")],
        {"ls_model_name": "gpt-4o-mini", "ls_provider": "openai"},
        {"max_completion_tokens": 64, "tools": tools},
        agent="researcher",
        run_id="r1",
    )
    assert (call.model, call.provider, call.max_output_tokens, call.agent) == (
        "gpt-4o-mini",
        "openai",
        64,
        "researcher",
    )
    assert list(call.tools) == tools


def test_usage_metadata_maps_cache_and_reasoning_as_parts() -> None:
    """LangChain's usage_metadata keeps cache and reasoning inside input and output."""
    usage = usage_from_metadata(
        {
            "input_tokens": 100,
            "output_tokens": 50,
            "input_token_details": {"cache_read": 60, "cache_creation": 10},
            "output_token_details": {"reasoning": 30},
        }
    )
    assert usage == allotment.Usage(
        input_tokens=100,
        output_tokens=50,
        cache_read_tokens=60,
        cache_write_tokens=10,
        reasoning_tokens=30,
        llm_calls=1,
    )


def test_reported_usage_reads_messages_then_llm_output_and_treats_zeros_as_none() -> None:
    """ChatGeneration usage_metadata first; completion LLMs' token_usage next; an all-zero
    report is no report."""
    message = AIMessage(
        "x", usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    )
    assert reported_usage(LLMResult(generations=[[ChatGeneration(message=message)]])) is not None
    legacy = LLMResult(
        generations=[[]],
        llm_output={"token_usage": {"prompt_tokens": 5, "completion_tokens": 6}},
    )
    assert reported_usage(legacy) == allotment.Usage(input_tokens=5, output_tokens=6, llm_calls=1)
    zeros = AIMessage(
        "x", usage_metadata={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    )
    assert reported_usage(LLMResult(generations=[[ChatGeneration(message=zeros)]])) is None
    assert reported_usage(LLMResult(generations=[])) is None


def test_generated_and_streamed_text_include_tool_call_arguments() -> None:
    """What a reply generated includes tool calls; a streamed chunk's text includes its
    tool-call argument fragment and content blocks."""
    ai = AIMessage("text", tool_calls=[{"name": "search", "args": {"q": "abc"}, "id": "1"}])
    text = generated_text(LLMResult(generations=[[ChatGeneration(message=ai)]]))
    assert "text" in text
    assert "search" in text
    assert "abc" in text
    chunk = ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            tool_call_chunks=[{"name": "search", "args": '{"q":', "id": "1", "index": 0}],
        )
    )
    assert chunk_text("", chunk) == 'search{"q":'
    assert (
        chunk_text([{"type": "text", "text": "hi"}, {"type": "thinking", "thinking": "hm"}], None)
        == "hihm"
    )


def test_v3_stream_events_are_read_for_text_and_usage() -> None:
    """on_stream_event deltas carry text; message-finish carries usage."""
    assert (
        event_text({"event": "content-block-delta", "delta": {"type": "text-delta", "text": "ab"}})
        == "ab"
    )
    assert event_text({"event": "message-start"}) == ""
    finish = {"event": "message-finish", "usage": {"input_tokens": 2, "output_tokens": 3}}
    assert event_usage(finish) == allotment.Usage(input_tokens=2, output_tokens=3, llm_calls=1)


def test_only_chat_openai_on_a_custom_url_without_stream_usage_is_warned_about() -> None:
    """The warning condition: ChatOpenAI, custom base_url, no stream_usage anywhere."""
    custom = {
        "id": ["langchain", "chat_models", "openai", "ChatOpenAI"],
        "kwargs": {"openai_api_base": "http://x"},
    }
    assert streams_without_usage(custom, {})
    assert not streams_without_usage(custom, {"stream_options": {"include_usage": True}})
    assert not streams_without_usage(custom, {"stream_usage": True})
    asked = {**custom, "kwargs": {"openai_api_base": "http://x", "stream_usage": True}}
    assert not streams_without_usage(asked, {})
    default_url = {"id": custom["id"], "kwargs": {}}
    assert not streams_without_usage(default_url, {})
    assert not streams_without_usage({"id": ["x", "ChatAnthropic"], "kwargs": {}}, {})
    assert not streams_without_usage(None, {})


def test_failed_calls_are_classified_by_whether_the_provider_was_reached() -> None:
    """An error status or a refused connection did not reach (or bill); a refusal of
    ours did not either; a timeout or anything else is unknown."""
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    http_error = httpx.HTTPStatusError(
        "429", request=request, response=httpx.Response(429, request=request)
    )
    assert reached_provider(http_error) is False
    assert reached_provider(status_error(status_code=500)) is False
    assert reached_provider(httpx.ConnectError("refused")) is False
    wrapped = RuntimeError("client error")
    wrapped.__cause__ = httpx.ConnectError("refused")
    assert reached_provider(wrapped) is False
    assert reached_provider(allotment.BudgetExceeded("no")) is False
    assert reached_provider(BudgetHardStop(allotment.BudgetExceeded("no"))) is False
    assert reached_provider(httpx.ReadTimeout("slow")) is None
    assert reached_provider(ValueError("parse")) is None


def status_error(**fields: object) -> Exception:
    error = Exception("status")
    for key, value in fields.items():
        setattr(error, key, value)
    return error


def test_sub_agent_markers_depths_and_names() -> None:
    """Metadata markers, LangGraph namespace depth, and budget-safe names."""
    assert marker_of({"allotment": {"agent": "writer", "limits": "0.1"}}) == ("writer", "0.1")
    assert marker_of({"allotment": "critic"}) == ("critic", None)
    assert marker_of({"allotment": {"agent": "  "}}) == (None, None)
    assert marker_of(None) == (None, None)
    assert task_depth({"langgraph_checkpoint_ns": "a:1|b:2"}) == 2
    assert task_depth({"langgraph_checkpoint_ns": "a:1"}) == 1
    assert task_depth({}) == 0
    assert subgraph_name("analyst", "node") == "analyst"
    assert subgraph_name("LangGraph", "research") == "research"
    assert subgraph_name("LangGraph", None) == "subgraph"
    assert budget_name("a/b#c") == "a_b_c"
    assert budget_name(" ") == "agent"


def test_stream_cut_counts_never_run_ahead_and_charged_counts_never_fall_behind() -> None:
    """Without a tokenizer (an unknown model) the count that cuts streams stays at or
    below the real token count and the count that charges stays at or above it, on every
    text of the shared corpus (prose, tool JSON, CJK, base64, histories), with o200k_base
    and cl100k_base standing in for the unknown tokenizer."""
    exact, o200k = counter("gpt-4o-mini")
    _, cl100k = counter("gpt-4")
    if not exact:
        pytest.skip("tiktoken has no o200k_base offline here; nothing to compare against")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from corpus import make_corpus

    texts = [
        m["content"]
        for prompt in make_corpus(20_240_601, n=120)
        for m in prompt.messages
        if isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"]
    ]
    texts += ["def f(x):\n    return x**2\n" * 20, "日本語のテキストです。" * 30]
    assert len(texts) > 100
    for text in texts:
        raw = len(text.encode())
        for real in (o200k(text), cl100k(text)):
            assert approximate(raw) <= real <= charged_tokens(text, "some-unknown-model")
