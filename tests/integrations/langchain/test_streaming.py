"""Streams: charged from streamed usage when there is some, estimated (and warned about)
when there is none, cut within one chunk of passing their hold, and settled when the
consumer stops early."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, ScriptedProvider
from allotment_langchain import (
    BudgetCallbackHandler,
    BudgetHardStop,
    StreamCutOff,
    StreamUsageWarning,
)
from langchain_fakes import PRICES, fake_chat, no_open_holds, reply

ChatFactory = Any

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."


def long_text(tokens: int, provider: ScriptedProvider) -> str:
    """Text of at least ``tokens`` tokens as the provider counts them."""
    text = SENTENCE
    while provider.tokenizer.count(text) < tokens:
        text = text + " " + SENTENCE
    return text


def test_streamed_usage_is_charged_exactly(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """ChatOpenAI(stream_usage=True) against a custom base_url: the usage chunk is what is
    charged, not an estimate."""
    provider.add(Reply.text("a short streamed answer"))
    budget = allotment.Budget(usd="1", name="run")
    model = chat_openai(stream_usage=True, max_tokens=100)
    text = "".join(
        str(c.content)
        for c in model.stream("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})
    )
    assert text == "a short streamed answer"
    record = provider.requests[-1]
    assert record.include_usage
    assert record.usage is not None
    spent = budget.spent
    assert not spent.estimated
    assert (spent.input_tokens, spent.output_tokens) == (
        record.usage.prompt_tokens,
        record.usage.completion_tokens,
    )
    assert no_open_holds(budget)


def test_stream_without_usage_warns_once_and_is_charged_an_estimate(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """Without stream_usage a ChatOpenAI on a custom base_url streams no usage: the
    handler warns (once per handler) and charges an estimate flagged as such, which is
    at least what the provider billed for output."""
    provider.add(Reply.text("first streamed answer"), Reply.text("second streamed answer"))
    budget = allotment.Budget(usd="1", name="run")
    handler = BudgetCallbackHandler(budget)
    model = chat_openai(max_tokens=100)

    def stream_twice() -> None:
        for _ in range(2):
            list(model.stream("hi", config={"callbacks": [handler]}))

    with pytest.warns(StreamUsageWarning, match="stream_usage=True") as warned:
        stream_twice()
    assert len([w for w in warned if issubclass(w.category, StreamUsageWarning)]) == 1
    assert all(not r.include_usage and r.usage is None for r in provider.requests)
    spent = budget.spent
    assert spent.estimated
    assert spent.llm_calls == 2
    billed = provider.billed_usage
    assert spent.output_tokens >= billed.completion_tokens
    assert spent.input_tokens >= billed.prompt_tokens
    assert spent.usd is not None
    assert spent.usd > 0
    assert no_open_holds(budget)


def test_a_stream_past_its_hold_is_cut_within_one_chunk(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """A provider that ignores max_tokens=200 and streams ~2,000 tokens is cut at the chunk
    that passes 200: the consumer sees at most one chunk beyond the bound."""
    provider.add(Reply.text(long_text(2000, provider)))
    budget = allotment.Budget(usd="1", name="run")
    handler = BudgetCallbackHandler(budget)
    model = chat_openai(stream_usage=True, max_tokens=200)
    received: list[str] = []

    def consume() -> None:
        for chunk in model.stream("write a lot", config={"callbacks": [handler]}):
            received.append(str(chunk.content))

    with pytest.raises(StreamCutOff) as caught:
        consume()
    count = provider.tokenizer.count
    seen = count("".join(received))
    assert seen <= 200
    assert seen >= 200 - max(count(c) for c in received if c) - 1
    assert caught.value.limit == 200
    assert caught.value.spent > 200
    spent = budget.spent
    assert spent.estimated
    assert 200 < spent.output_tokens <= 200 + 5
    assert no_open_holds(budget)
    assert handler.refusals[-1] is caught.value


def test_hard_stop_cuts_a_stream_with_a_base_exception() -> None:
    """With hard_stop=True the cut is a BudgetHardStop carrying the StreamCutOff."""
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    chat, _ = fake_chat([reply("word " * 400)], max_tokens=20, stream_usage=False)
    with pytest.raises(BudgetHardStop) as caught:
        list(
            chat.stream("hi", config={"callbacks": [BudgetCallbackHandler(budget, hard_stop=True)]})
        )
    assert isinstance(caught.value.error, StreamCutOff)
    assert no_open_holds(budget)


def test_breaking_out_of_a_stream_settles_what_was_streamed() -> None:
    """A consumer that breaks early closes the generator (GeneratorExit, no usage): the
    call is charged for what was streamed, flagged, and nothing stays held."""
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, provider = fake_chat([reply("alpha beta gamma delta epsilon")], max_tokens=100)
    for i, _ in enumerate(chat.stream("hi", config={"callbacks": [handler]})):
        if i == 2:
            break
    assert provider.calls == 1
    spent = budget.spent
    assert spent.llm_calls == 1
    assert spent.estimated
    # "alpha", " ", "beta": nine bytes, charged at one token per byte at most.
    assert spent.output_tokens == len("alpha beta")
    assert no_open_holds(budget)
    assert handler.open_runs == 0


def test_breaking_out_of_an_async_stream_settles_what_was_streamed() -> None:
    """The same for astream() closed by aclosing()."""
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    handler = BudgetCallbackHandler(budget)
    chat, _ = fake_chat([reply("alpha beta gamma delta")], max_tokens=100)

    async def consume() -> None:
        stream = chat.astream("hi", config={"callbacks": [handler]})
        async with aclosing(stream) as chunks:  # type: ignore[type-var]
            async for _ in chunks:
                break

    asyncio.run(consume())
    assert budget.spent.llm_calls == 1
    assert budget.spent.estimated
    assert no_open_holds(budget)
    assert handler.open_runs == 0


async def test_astream_with_usage_is_charged_exactly(
    provider: ScriptedProvider, chat_openai: ChatFactory
) -> None:
    """astream() over the real async client settles the streamed usage."""
    provider.add(Reply.text("async streamed answer"))
    budget = allotment.Budget(usd="1", name="run")
    model = chat_openai(stream_usage=True, max_tokens=50)
    async for _ in model.astream("hi", config={"callbacks": [BudgetCallbackHandler(budget)]}):
        pass
    record = provider.requests[-1]
    assert record.usage is not None
    assert budget.spent.output_tokens == record.usage.completion_tokens
    assert not budget.spent.estimated
    assert no_open_holds(budget)


def test_streamed_tool_call_arguments_count_as_output() -> None:
    """A stream that only calls a tool (no text) still counts its argument tokens."""
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    chat, _ = fake_chat(
        [reply("", tool_calls=[("search", {"query": "x" * 120})], reported=False)],
        max_tokens=500,
    )
    list(chat.stream("hi", config={"callbacks": [BudgetCallbackHandler(budget)]}))
    assert budget.spent.output_tokens >= 120
    assert budget.spent.estimated


def test_langgraph_messages_streaming_is_charged_once() -> None:
    """graph.stream(stream_mode="messages") makes the model stream (LangGraph's own
    handler asks for it): the call is settled once, from its usage."""
    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph

    chat, provider = fake_chat(default=reply("word " * 30, input_tokens=10, output_tokens=30))
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda s: {"messages": [chat.invoke(s["messages"])]})
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    config: Any = {"callbacks": [BudgetCallbackHandler(budget)]}
    chunks = list(
        graph.compile().stream(
            {"messages": [HumanMessage("hi")]}, stream_mode="messages", config=config
        )
    )
    assert len(chunks) > 30
    assert provider.calls == 1
    assert (budget.spent.llm_calls, budget.spent.output_tokens) == (1, 30)
    assert not budget.spent.estimated
    assert no_open_holds(budget)


def test_v3_stream_events_are_metered_and_cut_through_on_stream_event() -> None:
    """stream_events(version="v3") fires on_stream_event instead of on_llm_new_token:
    usage still settles, and a runaway stream is still cut."""
    chat, _ = fake_chat(default=reply("word " * 30, input_tokens=10, output_tokens=30))
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    events = list(
        chat.stream_events(
            "hi", version="v3", config={"callbacks": [BudgetCallbackHandler(budget)]}
        )
    )
    assert events
    assert (budget.spent.llm_calls, budget.spent.output_tokens) == (1, 30)

    runaway, _ = fake_chat(
        default=reply("word " * 300, reported=False), max_tokens=20, stream_usage=False
    )
    cut = allotment.Budget(usd="1", name="cut", prices=PRICES)

    def consume() -> None:
        for _ in runaway.stream_events(
            "hi", version="v3", config={"callbacks": [BudgetCallbackHandler(cut)]}
        ):
            pass

    with pytest.raises(StreamCutOff):
        consume()
    # No tokenizer for fake-1: cut at the chunk that takes the bytes streamed past 20
    # tokens at 8 bytes each (168 bytes), and charged one token per byte streamed.
    crossing = (20 + 1) * 8
    assert crossing <= cut.spent.output_tokens < crossing + len("word ") + 1
    assert cut.spent.estimated
    assert no_open_holds(cut)


async def test_astream_events_v2_settles_the_call() -> None:
    """astream_events(version="v2") streams the model under the hood: one settled call."""
    chat, _ = fake_chat(default=reply("a few words here", input_tokens=10, output_tokens=4))
    budget = allotment.Budget(usd="1", name="run", prices=PRICES)
    events = [
        e
        async for e in chat.astream_events(
            "hi", version="v2", config={"callbacks": [BudgetCallbackHandler(budget)]}
        )
    ]
    assert any(e["event"] == "on_chat_model_stream" for e in events)
    assert (budget.spent.llm_calls, budget.spent.output_tokens) == (1, 4)
    assert no_open_holds(budget)
