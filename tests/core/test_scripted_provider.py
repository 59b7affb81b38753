"""allotment.testing.ScriptedProvider, driven by the real openai client and by raw httpx."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from allotment.testing import (
    APPROXIMATE,
    Failure,
    Reply,
    Request,
    ScriptedProvider,
    ToolCall,
    Usage,
    approximate_tokenizer,
    default_tokenizer,
)
from allotment.testing._wire import split
from hypothesis import given, settings
from hypothesis import strategies as st

MODEL = "gpt-4o-mini"
HI = [{"role": "user", "content": "hi"}]
# With the approximate tokenizer: 3 priming + 3 per message + "user" (1) + "hi" (1).
HI_PROMPT_TOKENS = 8
# openai wraps a cut body read before it returns, but a cut while iterating a stream surfaces
# as the transport's own error.
CUT_STREAM = (openai.APIConnectionError, httpx.TransportError)


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    # Plain-HTTP loopback only; skipping certificate loading saves ~70 ms per client.
    with httpx.Client(verify=False) as c:
        yield c


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    with ScriptedProvider(tokenizer=approximate_tokenizer()) as p:
        yield p


@pytest.fixture
def client(provider: ScriptedProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=provider.base_url, api_key=provider.api_key, max_retries=0) as c:
        yield c


def sse_events(response: httpx.Response) -> list[str]:
    """The data fields of an SSE body, checking each event is framed as `data: ...\\n\\n`."""
    text = response.read().decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: ") :] for event in events]


# -- lifecycle ------------------------------------------------------------------------------


def test_start_stop_binds_an_ephemeral_loopback_port_and_frees_it(http: httpx.Client) -> None:
    p = ScriptedProvider()
    with pytest.raises(RuntimeError):
        _ = p.base_url
    p.start()
    port = p.port
    try:
        assert p.base_url == f"http://127.0.0.1:{port}/v1"
        assert port > 0
        assert p.api_key
        assert http.get(p.base_url + "/models").status_code == 200
        with pytest.raises(RuntimeError):
            p.start()
    finally:
        p.stop()
    assert not p.running
    with pytest.raises(httpx.ConnectError):
        http.get(f"http://127.0.0.1:{port}/v1/models")


def test_stop_wakes_a_held_request_and_returns_promptly(http: httpx.Client) -> None:
    p = ScriptedProvider().start()
    p.add(Failure.timeout(seconds=30))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            http.post(p.base_url + "/chat/completions", json={"model": MODEL}, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 5
    while not p.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    p.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 2
    assert not thread.is_alive()
    assert len(errors) == 1


def test_is_quiet_by_default(capfd: pytest.CaptureFixture[str], http: httpx.Client) -> None:
    with ScriptedProvider() as p:
        http.get(p.base_url + "/models")
        http.get(p.base_url + "/nope")
        p.add(Failure.disconnect())
        with pytest.raises(httpx.HTTPError):
            http.post(p.base_url + "/chat/completions", json={"model": MODEL})
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


# -- replies --------------------------------------------------------------------------------


def test_text_reply_reaches_the_openai_client_with_auto_usage(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("hello world"))
    response = client.chat.completions.create(model=MODEL, messages=HI)
    assert response.choices[0].message.content == "hello world"
    assert response.choices[0].finish_reason == "stop"
    assert response.model == MODEL
    assert response.object == "chat.completion"
    assert response.usage is not None
    assert response.usage.prompt_tokens == HI_PROMPT_TOKENS
    assert response.usage.completion_tokens == 3  # ceil(11 bytes / 4)
    assert response.usage.total_tokens == HI_PROMPT_TOKENS + 3
    (record,) = provider.requests
    assert record.path == "/v1/chat/completions"
    assert record.model == MODEL
    assert record.messages == HI
    assert record.status == 200
    assert not record.stream
    assert record.usage == Usage(HI_PROMPT_TOKENS, 3)
    assert provider.calls == 1


def test_auto_usage_grows_with_the_prompt(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    long = [{"role": "user", "content": "hi " * 100}]
    client.chat.completions.create(model=MODEL, messages=HI)
    client.chat.completions.create(model=MODEL, messages=long)
    short_usage, long_usage = (r.usage for r in provider.requests)
    assert short_usage is not None
    assert long_usage is not None
    assert long_usage.prompt_tokens >= short_usage.prompt_tokens + 70


def test_explicit_usage_maps_cached_and_reasoning_tokens_to_openai_details(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=20, cached_tokens=30, reasoning_tokens=5)
    provider.add(Reply.text("x", usage=usage))
    response = client.chat.completions.create(model=MODEL, messages=HI)
    assert response.usage is not None
    assert response.usage.prompt_tokens == 100
    assert response.usage.completion_tokens == 20
    assert response.usage.total_tokens == 120
    assert response.usage.prompt_tokens_details is not None
    assert response.usage.prompt_tokens_details.cached_tokens == 30
    assert response.usage.completion_tokens_details is not None
    assert response.usage.completion_tokens_details.reasoning_tokens == 5
    assert provider.requests[0].usage == usage


def test_usage_none_sends_no_usage_field_but_still_counts_as_charged(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    provider.add(Reply.text("hello world", usage=None))
    body = http.post(
        provider.base_url + "/chat/completions", json={"model": MODEL, "messages": HI}
    ).json()
    assert "usage" not in body
    (record,) = provider.requests
    assert record.usage is None
    assert record.charged == Usage(HI_PROMPT_TOKENS, 3)
    assert provider.billed_usage == Usage(HI_PROMPT_TOKENS, 3)


def test_usage_rejects_subsets_larger_than_their_totals() -> None:
    with pytest.raises(ValueError, match="cached_tokens"):
        Usage(prompt_tokens=1, completion_tokens=0, cached_tokens=2)
    with pytest.raises(ValueError, match="reasoning_tokens"):
        Usage(prompt_tokens=0, completion_tokens=1, reasoning_tokens=2)
    with pytest.raises(ValueError, match="non-negative"):
        Usage(prompt_tokens=-1, completion_tokens=0)


def test_single_tool_call_has_openai_shape_id_and_finish_reason(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.tool_call("search", {"q": "x"}))
    response = client.chat.completions.create(model=MODEL, messages=HI)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "search"
    assert json.loads(call.function.arguments) == {"q": "x"}


def test_parallel_tool_calls_keep_order_fixed_ids_and_raw_argument_strings(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(
        Reply.tool_calls(ToolCall("a", {"n": 1}, id="call_fixed"), ToolCall("b", '{"broken": '))
    )
    response = client.chat.completions.create(model=MODEL, messages=HI)
    calls = response.choices[0].message.tool_calls
    assert calls is not None
    assert [c.function.name for c in calls] == ["a", "b"]
    assert calls[0].id == "call_fixed"
    assert calls[1].function.arguments == '{"broken": '


def test_generated_tool_call_ids_are_fresh_for_each_response(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.default = Reply.tool_call("search")
    ids = set()
    for _ in range(3):
        response = client.chat.completions.create(model=MODEL, messages=HI)
        calls = response.choices[0].message.tool_calls
        assert calls is not None
        ids.add(calls[0].id)
    assert len(ids) == 3


def test_model_echo_override_and_finish_reason(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("cut", model="gpt-4o-mini-2024-07-18", finish_reason="length"))
    provider.add(Reply.text("echo"))
    first = client.chat.completions.create(model=MODEL, messages=HI)
    second = client.chat.completions.create(model="other-model", messages=HI)
    assert first.model == "gpt-4o-mini-2024-07-18"
    assert first.choices[0].finish_reason == "length"
    assert second.model == "other-model"


def test_queue_is_served_in_order_then_default_takes_over(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.default = Reply.text("fallback")
    provider.add(Reply.text("one"), Reply.text("two"))
    assert provider.pending == 2
    texts = [
        client.chat.completions.create(model=MODEL, messages=HI).choices[0].message.content
        for _ in range(4)
    ]
    assert texts == ["one", "two", "fallback", "fallback"]
    assert provider.pending == 0


def test_default_none_answers_script_exhausted_when_the_queue_runs_out() -> None:
    with (
        ScriptedProvider(default=None) as p,
        openai.OpenAI(base_url=p.base_url, api_key=p.api_key, max_retries=0) as c,
    ):
        p.add(Reply.text("only"))
        c.chat.completions.create(model=MODEL, messages=HI)
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.code == "script_exhausted"
    assert p.calls == 1


def test_responder_scripts_an_agent_that_keeps_calling_a_failing_tool() -> None:
    seen: list[str | None] = []

    def always_call_the_tool(request: Request) -> Reply:
        last = request.last_message
        seen.append(last["role"] if last else None)
        return Reply.tool_call("flaky_search", {"q": "again"})

    with (
        ScriptedProvider(responder=always_call_the_tool) as p,
        openai.OpenAI(base_url=p.base_url, api_key=p.api_key, max_retries=0) as c,
    ):
        messages: list[Any] = list(HI)
        for _ in range(3):
            response = c.chat.completions.create(model=MODEL, messages=messages)
            message = response.choices[0].message
            assert message.tool_calls is not None
            messages.append(message.model_dump(exclude_none=True))
            messages.append(
                {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "error"}
            )
        assert p.calls == 3
    assert seen == ["user", "tool", "tool"]


def test_queued_items_win_over_the_responder_and_none_falls_through_to_default(
    http: httpx.Client,
) -> None:
    with ScriptedProvider(
        responder=lambda r: Reply.text("dynamic") if r.model == "dyn" else None,
        default=Reply.text("default"),
    ) as p:
        p.add(Reply.text("queued"))

        def ask(model: str) -> str:
            response = http.post(
                p.base_url + "/chat/completions", json={"model": model, "messages": HI}
            )
            content: str = response.json()["choices"][0]["message"]["content"]
            return content

        assert [ask("dyn"), ask("dyn"), ask("plain")] == ["queued", "dynamic", "default"]


def test_responder_exception_becomes_a_500_naming_it(http: httpx.Client) -> None:
    def broken(request: Request) -> Reply:
        raise LookupError("no script for this")

    with ScriptedProvider(responder=broken) as p:
        response = http.post(p.base_url + "/chat/completions", json={"model": MODEL})
    assert response.status_code == 500
    assert "LookupError: no script for this" in response.json()["error"]["message"]


def test_delay_holds_the_response(provider: ScriptedProvider, client: openai.OpenAI) -> None:
    provider.add(Reply.text("slow", delay=0.2))
    started = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=HI)
    assert time.monotonic() - started >= 0.19


# -- streaming ------------------------------------------------------------------------------


def test_stream_without_include_usage_has_no_usage_chunk_and_ends_with_done(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    provider.add(Reply.text("hello big world"))
    with http.stream(
        "POST",
        provider.base_url + "/chat/completions",
        json={"model": MODEL, "messages": HI, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "hello big world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert provider.requests[0].usage is None
    assert provider.requests[0].charged is not None


def test_stream_with_include_usage_ends_with_an_empty_choices_usage_chunk(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("hello world"))
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content_chunks, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == HI_PROMPT_TOKENS
    assert last.usage.completion_tokens == 3
    assert all(c.usage is None for c in content_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "hello world"
    (record,) = provider.requests
    assert record.stream
    assert record.include_usage
    assert record.usage == Usage(HI_PROMPT_TOKENS, 3)


def test_stream_usage_false_omits_usage_even_when_requested(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("hello", stream_usage=False))
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert provider.requests[0].usage is None
    assert provider.billed_usage.completion_tokens == 2


def test_stream_with_explicit_usage_reports_it_in_the_final_chunk(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("x", usage=Usage(50, 7, cached_tokens=10)))
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (50, 7)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 10


def test_chunks_and_chunk_size_control_how_text_is_split(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("abcdefghij", chunks=3), Reply.text("abcdefghij", chunk_size=4))
    for expected in (["abcd", "efgh", "ij"], ["abcd", "efgh", "ij"]):
        stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices[0].delta.content]
        assert pieces == expected


def test_streamed_parallel_tool_calls_reassemble_to_the_scripted_calls(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(
        Reply.tool_calls(
            ToolCall("search", {"q": "budget enforcement"}),
            ToolCall("fetch", {"url": "https://example.invalid/x"}),
            chunk_size=5,
        )
    )
    names: dict[int, str] = {}
    ids: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    deltas = 0
    for chunk in client.chat.completions.create(model=MODEL, messages=HI, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for call in choice.delta.tool_calls or []:
            deltas += 1
            if call.id:
                ids[call.index] = call.id
            if call.function and call.function.name:
                names[call.index] = call.function.name
            if call.function and call.function.arguments:
                arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
    assert names == {0: "search", 1: "fetch"}
    assert all(i.startswith("call_") for i in ids.values())
    assert json.loads(arguments[0]) == {"q": "budget enforcement"}
    assert json.loads(arguments[1]) == {"url": "https://example.invalid/x"}
    assert deltas > 4  # the arguments really arrived in pieces
    assert finish == "tool_calls"


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=60),
    chunk_size=st.none() | st.integers(1, 10),
    chunks=st.none() | st.integers(1, 10),
)
def test_stream_splitting_never_loses_or_reorders_text(
    text: str, chunk_size: int | None, chunks: int | None
) -> None:
    if chunk_size is not None and chunks is not None:
        chunks = None
    reply = Reply.text(text, chunk_size=chunk_size, chunks=chunks)
    pieces = split(text, reply, words=True)
    assert "".join(pieces) == text
    assert all(pieces)
    if chunks is not None and text:
        assert len(pieces) <= chunks


# -- failures -------------------------------------------------------------------------------


def test_429_429_200_with_client_retries_is_three_requests_and_one_billed(
    provider: ScriptedProvider,
) -> None:
    provider.fail(429).fail(429).add(Reply.text("ok"))
    with openai.OpenAI(base_url=provider.base_url, api_key=provider.api_key, max_retries=2) as c:
        response = c.chat.completions.create(model=MODEL, messages=HI)
    assert response.choices[0].message.content == "ok"
    assert [r.status for r in provider.requests] == [429, 429, 200]
    assert [r.headers.get("x-stainless-retry-count") for r in provider.requests] == [
        "0",
        "1",
        "2",
    ]
    assert len(provider.requests) == 3
    assert provider.attempts == 3
    assert provider.billed == 1
    assert provider.calls == 1


def test_429_carries_retry_after_headers_and_an_openai_error_body(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    provider.fail(429, retry_after=1.5)
    response = http.post(provider.base_url + "/chat/completions", json={"model": MODEL})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1500"
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert set(error) == {"message", "type", "param", "code"}


def test_429_without_retries_raises_rate_limit_error(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.fail(429, times=1)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=HI)
    assert provider.billed == 0


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_reach_the_client_as_their_status(
    provider: ScriptedProvider, client: openai.OpenAI, status: int
) -> None:
    provider.fail(status)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert info.value.status_code == status
    assert provider.requests[0].outcome == "error"
    assert provider.billed == 0


def test_each_failure_is_consumed_by_exactly_one_request(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    provider.fail(503, times=2, retry_after=0.01).add(Failure.server_error())
    provider.add(Reply.text("ok"))
    statuses = [
        http.post(provider.base_url + "/chat/completions", json={"model": MODEL}).status_code
        for _ in range(5)
    ]
    assert statuses == [503, 503, 500, 200, 200]


def test_timeout_raises_api_timeout_error_and_is_not_billed(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Failure.timeout(seconds=5))
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(model=MODEL, messages=HI)
    assert time.monotonic() - started < 2
    (record,) = provider.requests
    assert record.outcome == "timeout"
    assert record.status is None
    assert provider.billed == 0


def test_disconnect_raises_a_connection_error(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Failure.disconnect())
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=HI)
    assert provider.requests[0].outcome == "disconnect"
    # The next request on a new connection is served normally.
    assert client.chat.completions.create(model=MODEL, messages=HI).choices


def test_malformed_body_raises_in_the_client_but_was_billed(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Failure.malformed())
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model=MODEL, messages=HI)
    assert provider.requests[0].outcome == "malformed"
    assert provider.requests[0].usage is None
    assert provider.billed == 1


def test_malformed_stream_event_raises_in_the_client(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Failure.malformed())
    stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    with pytest.raises(json.JSONDecodeError):
        list(stream)


def test_truncated_stream_delivers_some_chunks_then_fails_and_is_billed_unreported(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("one two three four five", truncate_after=3))
    received: list[str] = []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        stream=True,
        stream_options={"include_usage": True},
    )

    def consume() -> None:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(CUT_STREAM):
        consume()
    assert "".join(received) == "one two"  # role chunk, "one", " two"
    (record,) = provider.requests
    assert record.outcome == "truncated"
    assert record.usage is None
    assert record.charged is not None
    assert provider.billed == 1


def test_truncated_failure_cuts_the_default_reply(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Failure.truncated(after_chunks=1), Failure.truncated(), Reply.text("after"))
    with pytest.raises(CUT_STREAM):
        list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=HI)
    assert client.chat.completions.create(model=MODEL, messages=HI).choices[0].message.content == (
        "after"
    )
    assert [r.outcome for r in provider.requests] == ["truncated", "truncated", "ok"]


# -- request log ----------------------------------------------------------------------------


def test_request_log_records_body_flags_status_time_and_reset_clears_it(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    before = time.time()
    provider.add(Reply.text("queued-but-reset"), Reply.text("queued-but-reset"))
    http.post(
        provider.base_url + "/chat/completions",
        json={"model": MODEL, "messages": HI, "stream": True, "temperature": 0},
    ).read()
    (record,) = provider.requests
    assert record.method == "POST"
    assert record.body["temperature"] == 0
    assert record.stream
    assert not record.include_usage
    assert record.status == 200
    assert before <= record.time <= time.time()
    assert record.served == Reply.text("queued-but-reset")
    provider.reset()
    assert provider.requests == []
    assert provider.pending == 0
    assert provider.calls == 0


def test_requests_is_a_snapshot_not_a_live_view(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    snapshot = provider.requests
    http.get(provider.base_url + "/models")
    assert snapshot == []
    assert len(provider.requests) == 1


# -- other endpoints ------------------------------------------------------------------------


def test_unknown_path_is_404_with_an_openai_error_body(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    response = http.post(provider.base_url + "/nothing/here", json={})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {
            "message": "Invalid URL (POST /v1/nothing/here)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert http.get(provider.base_url + "/chat/completions").status_code == 404
    assert provider.billed == 0


def test_unparseable_request_body_and_missing_model_are_400(
    provider: ScriptedProvider, http: httpx.Client
) -> None:
    bad_json = http.post(provider.base_url + "/chat/completions", content=b"{nope")
    no_model = http.post(provider.base_url + "/chat/completions", json={"messages": HI})
    assert bad_json.status_code == 400
    assert no_model.status_code == 400
    assert no_model.json()["error"]["param"] == "model"
    assert provider.pending == 0
    assert provider.calls == 0


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_legacy_completions_plain_and_streamed_with_usage(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Reply.text("legacy text"), Reply.text("streamed legacy"))
    plain = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi there")
    assert plain.choices[0].text == "legacy text"
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == 2  # ceil(8 bytes / 4), no chat overhead
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "streamed legacy"
    assert chunks[-1].usage is not None
    assert provider.calls == 2


def test_embeddings_are_deterministic_unit_vectors_in_float_and_base64(
    provider: ScriptedProvider, client: openai.OpenAI
) -> None:
    provider.add(Failure.server_error())  # embeddings do not consume the chat script
    packed = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "a"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float", dimensions=4
    )
    vectors = [d.embedding for d in packed.data]
    assert len(vectors) == 3
    assert all(len(v) == provider.embedding_dimensions for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-5
    assert [len(d.embedding) for d in floats.data] == [4, 4]
    assert packed.usage.prompt_tokens == 3
    assert provider.pending == 1
    assert provider.billed == 2
    assert provider.calls == 0


# -- concurrency and connections ------------------------------------------------------------


def test_twenty_threads_each_get_their_own_answer() -> None:
    with ScriptedProvider(
        responder=lambda r: Reply.text(f"echo {r.messages[-1]['content']}"),
        tokenizer=approximate_tokenizer(),
    ) as p:
        failures: list[str] = []
        barrier = threading.Barrier(20)
        with openai.OpenAI(base_url=p.base_url, api_key=p.api_key, max_retries=0) as shared:

            def worker(n: int) -> None:
                barrier.wait()
                for k in range(3):
                    question = f"{n}-{k}"
                    response = shared.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": question}]
                    )
                    if response.choices[0].message.content != f"echo {question}":
                        failures.append(question)

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=20)
        assert failures == []
        assert p.calls == 60
        assert len({r.messages[-1]["content"] for r in p.requests}) == 60


def test_keep_alive_connection_is_reused_across_json_and_sse_responses(
    provider: ScriptedProvider,
) -> None:
    chat = provider.base_url + "/chat/completions"
    with httpx.Client(verify=False) as fresh:
        fresh.post(chat, json={"model": MODEL, "messages": HI}).raise_for_status()
        with fresh.stream("POST", chat, json={"model": MODEL, "stream": True}) as response:
            assert sse_events(response)[-1] == "[DONE]"
        fresh.get(provider.base_url + "/models").raise_for_status()
        assert fresh.post(provider.base_url + "/nope").status_code == 404
        fresh.post(chat, json={"model": MODEL, "messages": HI}).raise_for_status()
    ports = {r.client_address for r in provider.requests}
    assert len(provider.requests) == 5
    assert len(ports) == 1


# -- tokenizer ------------------------------------------------------------------------------


def test_auto_usage_counts_with_tiktoken_when_an_encoding_is_available_offline(
    http: httpx.Client,
) -> None:
    env_before = os.environ.get("TIKTOKEN_CACHE_DIR")
    tokenizer = default_tokenizer()
    if not tokenizer.exact:
        pytest.skip("no tiktoken encoding file on this machine; the fallback is tested below")
    import tiktoken

    encoding = tiktoken.get_encoding(tokenizer.name)
    text = "Budgets are enforced before every call, then settled."
    with ScriptedProvider() as p:
        p.add(Reply.text(text))
        body = http.post(
            p.base_url + "/chat/completions", json={"model": MODEL, "messages": HI}
        ).json()
    assert p.tokenizer.name in {"o200k_base", "cl100k_base"}
    assert body["usage"]["completion_tokens"] == len(encoding.encode(text))
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == env_before


def test_auto_tokenizer_falls_back_to_the_byte_approximation_without_cached_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    default_tokenizer.cache_clear()
    try:
        tokenizer = default_tokenizer()
        with ScriptedProvider() as p:
            assert p.tokenizer == tokenizer
    finally:
        default_tokenizer.cache_clear()
    assert tokenizer.name == APPROXIMATE
    assert not tokenizer.exact
    assert tokenizer.count("") == 0
    assert tokenizer.count("abcd") == 1
    assert tokenizer.count("abcde") == 2
    assert tokenizer.count("é" * 4) == 2  # UTF-8 bytes, not characters


def test_auto_tokenizer_borrows_llama_index_cache_only_while_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no cache of its own, tiktoken is pointed at llama-index's bundled files, briefly."""
    import hashlib

    cache = tmp_path / "llama_index" / "core" / "_static" / "tiktoken_cache"
    cache.mkdir(parents=True)
    # Regular packages, so they win over any installed llama_index on the path.
    (tmp_path / "llama_index" / "__init__.py").write_text("")
    (tmp_path / "llama_index" / "core" / "__init__.py").write_text("")
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"stand-in")
    seen_dirs: list[str | None] = []

    class FakeEncoding:
        def encode_ordinary(self, text: str) -> list[int]:
            return [0] * len(text.split())

    def get_encoding(name: str) -> FakeEncoding:
        assert name == "o200k_base"
        seen_dirs.append(os.environ.get("TIKTOKEN_CACHE_DIR"))
        return FakeEncoding()

    fake = types.ModuleType("tiktoken")
    fake.__spec__ = importlib.machinery.ModuleSpec("tiktoken", None)
    fake.get_encoding = get_encoding
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
        monkeypatch.delitem(sys.modules, name)
    default_tokenizer.cache_clear()
    try:
        tokenizer = default_tokenizer()
    finally:
        default_tokenizer.cache_clear()
        for name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
            del sys.modules[name]
    assert tokenizer.name == "o200k_base"
    assert tokenizer.exact
    assert tokenizer.count("three little words") == 3
    assert seen_dirs == [str(cache)]
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
