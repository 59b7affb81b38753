"""Fixtures for the LangChain integration tests: a scripted OpenAI-compatible provider for
the real ``ChatOpenAI`` client, and LangGraph agents built on the fake chat model."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from allotment.testing import ScriptedProvider

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    """A scripted OpenAI-compatible server on loopback; an empty script is an error, so a
    call nobody expected fails the test."""
    with ScriptedProvider(default=None) as p:
        yield p


@pytest.fixture
def chat_openai(provider: ScriptedProvider) -> Iterator[Callable[..., Any]]:
    """Build ``ChatOpenAI`` clients pointed at the scripted provider; their HTTP clients
    are closed after the test. ``metered=True`` gives them the metered transport."""
    from allotment_langchain import metered_http_async_client, metered_http_client
    from langchain_openai import ChatOpenAI

    clients: list[httpx.Client | httpx.AsyncClient] = []

    def build(*, metered: bool = False, timeout: float = 10.0, **kwargs: Any) -> ChatOpenAI:
        if metered:
            sync_client: httpx.Client = metered_http_client(timeout=timeout)
            async_client: httpx.AsyncClient = metered_http_async_client(timeout=timeout)
        else:
            sync_client = httpx.Client(timeout=timeout)
            async_client = httpx.AsyncClient(timeout=timeout)
        clients.extend((sync_client, async_client))
        kwargs.setdefault("model", "gpt-4o-mini")
        kwargs.setdefault("max_retries", 0)
        return ChatOpenAI(
            base_url=provider.base_url,
            api_key=provider.api_key,
            http_client=sync_client,
            http_async_client=async_client,
            timeout=timeout,
            **kwargs,
        )

    yield build
    for client in clients:
        if isinstance(client, httpx.Client):
            client.close()
        else:
            asyncio.run(client.aclose())


@pytest.fixture(autouse=True)
def _no_instrumentation_left() -> Iterator[None]:
    """Every test starts and ends without a process-wide handler or default budget."""
    from allotment_langchain import instrumented

    assert instrumented() is None
    yield
    assert instrumented() is None, "a test left allotment_langchain instrumented"
