"""What BudgetCallbackHandler adds to a LangChain call: the same fake-model call without a
handler, with a handler that does nothing (LangChain's own dispatch cost), and with
BudgetCallbackHandler, in the same run. Prints microseconds; asserts nothing.

The variants are measured in alternation, round after round, and each keeps its best
round, so that load from other processes drifts through all of them alike.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import allotment
from allotment_langchain import BudgetCallbackHandler
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tools import tool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "langchain"))
from langchain_fakes import PRICES, fake_chat, reply

ROUNDS = 15
CALLS = 200


class NoOp(BaseCallbackHandler):
    """A handler that does nothing: what LangChain's callback dispatch alone costs."""

    raise_error = True
    run_inline = True


def best_us(variants: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best round of CALLS calls per variant, in microseconds per call."""
    for fn in variants.values():
        for _ in range(50):
            fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / CALLS * 1e6)
    return best


def show(what: str, t: dict[str, float]) -> None:
    line = (
        f"\n{what:20s} bare {t['bare']:7.1f} µs | no-op handler {t['noop']:7.1f} µs | "
        f"BudgetCallbackHandler {t['budget']:7.1f} µs | added {t['budget'] - t['bare']:6.1f} µs, "
        f"{t['budget'] - t['noop']:6.1f} µs over the no-op"
    )
    if "kernel" in t:
        line += f" (kernel reserve + settle alone: {t['kernel']:.1f} µs)"
    print(line)


def test_overhead_of_the_handler_on_invoke() -> None:
    """invoke() of a fake chat model: memory ledger, dollar cap, reported usage."""
    chat, _ = fake_chat(default=reply("benchmark answer", input_tokens=20, output_tokens=5))
    budget = allotment.Budget(usd="1000000", name="bench", prices=PRICES)
    handler = {"callbacks": [BudgetCallbackHandler(budget)]}
    noop = {"callbacks": [NoOp()]}
    call = allotment.Call(
        model="fake-1", messages=[{"role": "user", "content": "hello"}], max_output_tokens=500
    )
    used = allotment.Usage(input_tokens=20, output_tokens=5, llm_calls=1)
    show(
        "invoke",
        best_us(
            {
                "bare": lambda: chat.invoke("hello"),
                "noop": lambda: chat.invoke("hello", config=noop),  # type: ignore[arg-type]
                "budget": lambda: chat.invoke("hello", config=handler),  # type: ignore[arg-type]
                "kernel": lambda: budget.reserve(call).settle(used),
            }
        ),
    )


def test_overhead_of_the_handler_on_a_stream() -> None:
    """stream() of 16 chunks: counting each chunk is part of the cost."""
    chat, _ = fake_chat(
        default=reply(" ".join(["token"] * 8), input_tokens=20, output_tokens=16), max_tokens=500
    )
    budget = allotment.Budget(usd="1000000", name="bench", prices=PRICES)
    handler = {"callbacks": [BudgetCallbackHandler(budget)]}
    noop = {"callbacks": [NoOp()]}
    show(
        "stream (16 chunks)",
        best_us(
            {
                "bare": lambda: list(chat.stream("hello")),
                "noop": lambda: list(chat.stream("hello", config=noop)),  # type: ignore[arg-type]
                "budget": lambda: list(chat.stream("hello", config=handler)),  # type: ignore[arg-type]
            }
        ),
    )


def test_overhead_of_the_handler_on_a_tool_call() -> None:
    """A tool invoke: one tool-call hold and settle."""

    @tool
    def echo(text: str) -> str:
        """Echo."""
        return text

    budget = allotment.Budget(tool_calls=10**9, name="bench")
    handler = {"callbacks": [BudgetCallbackHandler(budget)]}
    noop = {"callbacks": [NoOp()]}
    show(
        "tool invoke",
        best_us(
            {
                "bare": lambda: echo.invoke({"text": "x"}),
                "noop": lambda: echo.invoke({"text": "x"}, config=noop),  # type: ignore[arg-type]
                "budget": lambda: echo.invoke({"text": "x"}, config=handler),  # type: ignore[arg-type]
            }
        ),
    )
