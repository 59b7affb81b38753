"""Fixtures for the LlamaIndex tests: LlamaIndex's global state is put back after each test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("llama_index.core", reason="the LlamaIndex tests need llama-index-core")
pytest.importorskip("llama_index.llms.openai", reason="they also need llama-index-llms-openai")

from allotment.testing import ScriptedProvider
from llamaindex_fakes import close_llms, restored_llamaindex


@pytest.fixture(autouse=True)
async def llamaindex_state() -> AsyncIterator[None]:
    """Restore Settings, the global handler, the patched classes and the dispatcher; close
    the test's HTTP clients in the loop that opened them."""
    with restored_llamaindex():
        yield
        await close_llms()


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    """A scripted OpenAI-compatible provider; a call beyond its script fails loudly."""
    with ScriptedProvider(default=None) as p:
        yield p
