"""What allotment-llamaindex adds to each LLM call, in microseconds, same run.

Prints numbers and asserts none. Run with
``uv run pytest tests/benchmarks --benchmarks -s -k llamaindex_overhead``.

The model is an in-process scripted ``CustomLLM`` (no HTTP), so the numbers are the
integration's own cost: the callback, the span walk, translating the payload, the kernel's
estimate, price and reserve, and the settle. Compared: no budget at all; the passive span
tracker alone; an explicit ``BudgetCallbackHandler``; ``instrument()``; and, for calls made
inside an agent run, ``instrument()`` with per-agent attribution.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import allotment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "llamaindex"))

CALLS = 1_000
ROUNDS = 5


def _per_call_us(fn: Callable[[], object], calls: int = CALLS) -> float:
    """Best of ``ROUNDS`` mean microseconds per call (the least disturbed round)."""
    for _ in range(50):
        fn()
    means = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return min(means)


def test_llamaindex_overhead_per_llm_call() -> None:
    from allotment_llamaindex import BudgetCallbackHandler, _spans, _streams, instrument
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.core.callbacks import CallbackManager
    from llamaindex_fakes import PRICES, ScriptedLLM, restored_llamaindex

    messages = [ChatMessage(role="user", content="Summarise the quarterly report in a line.")]

    def budget() -> allotment.Budget:
        return allotment.Budget(usd="1000000", name="bench", prices=PRICES)

    rows: list[tuple[str, float, float, float]] = []
    kernel_budget = budget()
    call = allotment.Call(model="fake-1", messages=["Summarise the report."], max_output_tokens=64)
    used = allotment.Usage(input_tokens=10, output_tokens=2, llm_calls=1)
    kernel = _per_call_us(lambda: kernel_budget.reserve(call).settle(used))
    with restored_llamaindex():
        plain = ScriptedLLM(max_tokens=64)
        base_complete = _per_call_us(lambda: plain.complete("Summarise the report."))
        base_chat = _per_call_us(lambda: plain.chat(messages))
        base_stream = _per_call_us(lambda: list(plain.stream_complete("a b c d")))

        _spans.tracker()
        _streams.watcher()
        tracked = (
            _per_call_us(lambda: plain.complete("Summarise the report.")),
            _per_call_us(lambda: plain.chat(messages)),
            _per_call_us(lambda: list(plain.stream_complete("a b c d"))),
        )
        rows.append(("span tracker only", *tracked))

        handled = ScriptedLLM(
            max_tokens=64, callback_manager=CallbackManager([BudgetCallbackHandler(budget())])
        )
        rows.append(
            (
                "BudgetCallbackHandler",
                _per_call_us(lambda: handled.complete("Summarise the report.")),
                _per_call_us(lambda: handled.chat(messages)),
                _per_call_us(lambda: list(handled.stream_complete("a b c d"))),
            )
        )

        undo = instrument(budget())
        try:
            rows.append(
                (
                    "instrument()",
                    _per_call_us(lambda: plain.complete("Summarise the report.")),
                    _per_call_us(lambda: plain.chat(messages)),
                    _per_call_us(lambda: list(plain.stream_complete("a b c d"))),
                )
            )
        finally:
            undo()

    print()
    print(f"LlamaIndex, in-process scripted LLM, best of {ROUNDS} x {CALLS} calls")
    print(f"{'':24} {'complete':>12} {'chat':>12} {'stream':>12}   (us per call)")
    print(f"{'no budget':24} {base_complete:12.1f} {base_chat:12.1f} {base_stream:12.1f}")
    for name, complete, chat, stream in rows:
        print(f"{name:24} {complete:12.1f} {chat:12.1f} {stream:12.1f}")
    print(f"{'added (instrument)':24} ", end="")
    _, complete, chat, stream = rows[-1]
    print(
        f"{complete - base_complete:+12.1f} {chat - base_chat:+12.1f} {stream - base_stream:+12.1f}"
    )
    print(f"of which the kernel's reserve + settle of one call: {kernel:.1f} us")


def test_llamaindex_overhead_per_agent_llm_call() -> None:
    """An LLM call inside a FunctionAgent run, attributed to the agent's child budget."""
    import warnings

    from allotment_llamaindex import instrument
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.llms.mock import MockFunctionCallingLLM
    from llamaindex_fakes import restored_llamaindex

    runs = 100

    async def run_agents(agent: FunctionAgent) -> float:
        for _ in range(5):
            await agent.run(user_msg="hi")
        best = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(runs):
                await agent.run(user_msg="hi")
            best.append((time.perf_counter() - start) / runs * 1e6)
        return min(best)

    with restored_llamaindex(), warnings.catch_warnings():
        # workflows' inspection of the agent touches pydantic's deprecated attributes
        warnings.simplefilter("ignore", DeprecationWarning)
        agent = FunctionAgent(name="solo", description="echoes", llm=MockFunctionCallingLLM())
        plain = asyncio.run(run_agents(agent))
        budget = allotment.Budget(llm_calls=10**9, name="bench")
        undo = instrument(budget)
        try:
            budgeted = asyncio.run(run_agents(agent))
        finally:
            undo()
        calls = budget.spent.llm_calls
        children = len(budget.report().children)
    print()
    print(f"FunctionAgent run (1 LLM call, MockFunctionCallingLLM), best of 3 x {runs} runs")
    print(f"  no budget     {plain:10.1f} us per run")
    print(f"  instrument()  {budgeted:10.1f} us per run  ({budgeted - plain:+.1f} us)")
    print(f"  ({calls} calls metered on {children} per-run agent children)")
    print(f"  median of the two: {statistics.median([plain, budgeted]):.1f} us")
