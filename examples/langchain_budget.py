"""A LangChain model under a budget: calls are refused before they overspend.

Offline by default (the real ChatOpenAI client against allotment's scripted provider on
loopback); with OPENAI_API_KEY set and --live, against the OpenAI API.

    uv run python examples/langchain_budget.py [--live]
"""

from __future__ import annotations

import os
import sys
from typing import Any

import allotment
from allotment.testing import ScriptedProvider
from allotment_langchain import BudgetCallbackHandler, instrument, metered_http_client
from langchain_openai import ChatOpenAI


def model(provider: ScriptedProvider | None) -> ChatOpenAI:
    options: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "max_tokens": 100,  # the output bound each call reserves
        "max_retries": 2,
        "http_client": metered_http_client(timeout=30),  # SDK retries are metered too
    }
    if provider is not None:
        options.update(base_url=provider.base_url, api_key=provider.api_key)
    return ChatOpenAI(**options)


def main(live: bool) -> None:
    provider = None if live else ScriptedProvider().start()
    try:
        chat = model(provider)
        budget = allotment.Budget(usd="0.0005", llm_calls=3, name="example")

        # Explicitly, per run: the handler in the run's config.
        handler = BudgetCallbackHandler(budget)
        for question in ("What is a budget?", "And a hold?", "And a settle?", "One more?"):
            try:
                answer = chat.invoke(question, config={"callbacks": [handler]})
                print(f"{question:20s} -> {str(answer.content)[:50]!r}")
            except allotment.BudgetExceeded as refusal:
                print(f"{question:20s} -> refused before sending: {refusal.limit_name}")

        # Process-wide: every LangChain run is charged to the default budget.
        other = allotment.Budget(usd="0.01", name="instrumented")
        undo = instrument(other)
        try:
            chat.invoke("Charged without passing any callback.")
        finally:
            undo()
        print()
        print(budget.report())
        print(other.report())
    finally:
        if provider is not None:
            provider.stop()


if __name__ == "__main__":
    live = "--live" in sys.argv
    if live and not os.environ.get("OPENAI_API_KEY"):
        sys.exit("--live needs OPENAI_API_KEY")
    main(live)
