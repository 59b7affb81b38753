"""Fake model providers for the LlamaIndex tests.

Two kinds: LlamaIndex's real OpenAI class talking HTTP to allotment's scripted provider
(``openai_llm``), and a scripted ``CustomLLM`` (``ScriptedLLM``) that answers in process,
reports usage in ``raw`` like a provider would, and counts the calls that reach it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import allotment
from allotment.testing import ScriptedProvider
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.embeddings.mock_embed_model import MockEmbedding
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.llms.openai import OpenAI
from pydantic import Field, PrivateAttr

FAKE_MODEL = "fake-1"
FAKE_PRICE = allotment.Price(input_mtok="10", output_mtok="30")
"""$10 per million input tokens, $30 per million output: 1,000 in / 500 out = $0.025."""
FAKE_EMBEDDING = "fake-embed"
PRICES = {
    FAKE_MODEL: FAKE_PRICE,
    FAKE_EMBEDDING: allotment.Price(input_mtok="20", output_mtok="0"),
}


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    """What ``fake-1`` charges for a call."""
    return (Decimal(input_tokens) * 10 + Decimal(output_tokens) * 30) / Decimal(1_000_000)


class ScriptedOpenAI(OpenAI):
    """LlamaIndex's OpenAI class, unchanged except that it accepts any model name (the
    upstream class refuses names it has no context size for, like ``fake-1``)."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=128_000,
            num_output=self.max_tokens or -1,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model,
        )


_made: list[OpenAI] = []


def openai_llm(provider: ScriptedProvider, model: str = "gpt-4o-mini", **kwargs: Any) -> OpenAI:
    """An OpenAI LLM on the scripted provider; no client retries, so each attempt shows.
    ``close_llms()`` closes its HTTP clients."""
    cls = OpenAI if model.startswith("gpt-") else ScriptedOpenAI
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 10.0)
    llm = cls(model=model, api_base=provider.base_url, api_key=provider.api_key, **kwargs)
    _made.append(llm)
    return llm


async def close_llms() -> None:
    """Close the HTTP clients of every LLM ``openai_llm`` made (in the loop that used them)."""
    while _made:
        llm = _made.pop()
        if llm._aclient is not None:
            await llm._aclient.close()
        if llm._client is not None:
            llm._client.close()


def provider_usage(provider: ScriptedProvider) -> allotment.Usage:
    """What the provider billed, as allotment usage (cached and reasoning parts included)."""
    total = allotment.Usage()
    for record in provider.requests:
        charged = record.charged
        if record.billed and charged is not None:
            total = total + allotment.Usage(
                input_tokens=charged.prompt_tokens,
                output_tokens=charged.completion_tokens,
                cache_read_tokens=charged.cached_tokens or 0,
                reasoning_tokens=charged.reasoning_tokens or 0,
                llm_calls=1,
                usd=Decimal(0),
            )
    return total


def assert_ledger_matches_provider(budget: allotment.Budget, provider: ScriptedProvider) -> None:
    """The budget recorded exactly the calls and tokens the provider billed."""
    billed = provider_usage(provider)
    spent = budget.spent
    assert spent.llm_calls == provider.calls == billed.llm_calls
    assert (spent.input_tokens, spent.output_tokens) == (billed.input_tokens, billed.output_tokens)
    assert not spent.estimated
    assert budget.report().open_holds == 0


class ScriptedLLM(CustomLLM):
    """A completion model that answers from a script and reports usage in ``raw``.

    Each reply is ``(text, input_tokens, output_tokens)``; ``usage=False`` reports none.
    Streams yield the text word by word, usage on the last chunk only.
    """

    model_name: str = FAKE_MODEL
    max_tokens: int | None = None
    replies: list[tuple[str, int, int]] = Field(default_factory=list)
    default: tuple[str, int, int] | None = ("ok", 10, 2)
    usage: bool = True
    _calls: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.model_name, num_output=self.max_tokens or -1)

    @property
    def calls(self) -> int:
        """Requests that reached the model."""
        return self._calls

    def _next(self) -> tuple[str, int, int]:
        with self._lock:
            self._calls += 1
            if self.replies:
                return self.replies.pop(0)
        if self.default is None:
            raise AssertionError("ScriptedLLM: no reply left for an extra call")
        return self.default

    def _raw(self, input_tokens: int, output_tokens: int) -> dict[str, Any] | None:
        if not self.usage:
            return None
        return {"usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens}}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, input_tokens, output_tokens = self._next()
        return CompletionResponse(text=text, raw=self._raw(input_tokens, output_tokens))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        text, input_tokens, output_tokens = self._next()
        words = _words(text)

        def gen() -> Iterator[CompletionResponse]:
            so_far = ""
            for i, word in enumerate(words):
                so_far += word
                last = i == len(words) - 1
                raw = self._raw(input_tokens, output_tokens) if last else None
                yield CompletionResponse(text=so_far, delta=word, raw=raw)

        return gen()


class CountingEmbedding(MockEmbedding):
    """LlamaIndex's MockEmbedding, named ``fake-embed``, counting the batches it embeds."""

    model_name: str = FAKE_EMBEDDING
    _batches: list[list[str]] = PrivateAttr(default_factory=list)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("embed_dim", 8)
        super().__init__(**kwargs)

    @property
    def batches(self) -> list[list[str]]:
        """The texts of each request that reached the model."""
        return self._batches

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        self._batches.append(list(texts))
        return [self._get_vector() for _ in texts]

    def _get_query_embedding(self, query: str) -> list[float]:
        self._batches.append([query])
        return self._get_vector()

    def _get_text_embedding(self, text: str) -> list[float]:
        self._batches.append([text])
        return self._get_vector()

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._get_text_embeddings(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def _words(text: str) -> Sequence[str]:
    pieces = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(pieces)]


def replies(*items: Iterable[Any]) -> list[tuple[str, int, int]]:
    """Script entries for ``ScriptedLLM``."""
    return [tuple(item) for item in items]  # type: ignore[misc]


@contextmanager
def restored_llamaindex() -> Iterator[None]:
    """Run a test, then put back LlamaIndex's global state: Settings, the global handler,
    the classes ``instrument()`` patches and the root dispatcher's handlers. Fails the test
    if ``instrument()`` was left on or its undo did not restore the classes."""
    from allotment_llamaindex import _instrument, _spans, _streams
    from llama_index import core
    from llama_index.core import Settings
    from llama_index.core.agent.workflow import AgentWorkflow
    from llama_index.core.agent.workflow.base_agent import BaseWorkflowAgent
    from llama_index.core.callbacks.base import CallbackManager
    from llama_index.core.instrumentation import get_dispatcher

    def methods() -> tuple[object, ...]:
        return (
            CallbackManager.__dict__["on_event_start"],
            CallbackManager.__dict__["on_event_end"],
            BaseWorkflowAgent.__dict__["_call_tool"],
            AgentWorkflow.__dict__["_call_tool"],
        )

    saved = (Settings._callback_manager, Settings._llm, Settings._embed_model)
    handler = core.global_handler
    before = methods()
    root = get_dispatcher()
    span_handlers, event_handlers = list(root.span_handlers), list(root.event_handlers)
    try:
        yield
    finally:
        left_on = _instrument.instrumented()
        if left_on:  # a failed test may leave it on; put the classes back regardless
            _instrument.reset()
        _spans.uninstall()
        _streams.uninstall()
        Settings._callback_manager, Settings._llm, Settings._embed_model = saved
        core.global_handler = handler
        root.span_handlers[:] = span_handlers
        root.event_handlers[:] = event_handlers
    assert not left_on, "the test left instrument() on"
    assert allotment.current() is None, "the test left a default or active budget behind"
    assert methods() == before, "instrument()'s undo did not restore LlamaIndex's classes"
