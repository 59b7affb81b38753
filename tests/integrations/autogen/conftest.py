"""Fixtures for the AutoGen integration: the scripted provider behind AutoGen's own OpenAI
client, and replay clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from allotment.testing import ScriptedProvider

MODEL = "gpt-4o-mini-2024-07-18"
"""A dated name: AutoGen warns when the provider echoes a model other than the one it
resolved the alias to, and the scripted provider echoes the request's."""

INFO: dict[str, Any] = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    with ScriptedProvider() as p:
        yield p


@pytest.fixture
async def openai_client(provider: ScriptedProvider) -> AsyncIterator[Callable[..., Any]]:
    """A factory of AutoGen ``OpenAIChatCompletionClient``s pointed at the provider; all are
    closed after the test (an open one leaks its connection as a ResourceWarning)."""
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("model", MODEL)
        kwargs.setdefault("max_retries", 0)
        client = OpenAIChatCompletionClient(
            base_url=provider.base_url, api_key=provider.api_key, **kwargs
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def replay() -> Callable[..., Any]:
    """A factory of ``ReplayChatCompletionClient``s that can call tools."""
    from autogen_ext.models.replay import ReplayChatCompletionClient

    def make(responses: list[Any]) -> Any:
        return ReplayChatCompletionClient(responses, model_info=INFO)  # type: ignore[arg-type]

    return make
