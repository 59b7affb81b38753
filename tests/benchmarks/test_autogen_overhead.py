"""What the AutoGen integration adds to a model call: AutoGen's ReplayChatCompletionClient
bare, behind BudgetedChatCompletionClient, and patched by instrument(), in the same run.
Prints microseconds per call; asserts nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import allotment
from allotment_autogen import BudgetedChatCompletionClient, _translate, instrument
from autogen_core.models import CreateResult, LLMMessage, SystemMessage, UserMessage
from autogen_ext.models.replay import ReplayChatCompletionClient

ROUNDS = 7
CALLS = 400
PRICES = {"fake-1": allotment.Price(input_mtok="10", output_mtok="30")}
MESSAGES: list[LLMMessage] = [
    SystemMessage(content="You are a concise assistant."),
    UserMessage(content="Summarise the plot of a short story in one line.", source="user"),
]


def replay() -> ReplayChatCompletionClient:
    """A replay client with enough answers for every call the benchmark makes."""
    total = (ROUNDS + 1) * CALLS + 100
    return ReplayChatCompletionClient(["A benchmark answer of a few words."] * total)


async def per_call_us(call: Callable[[], Awaitable[Any]]) -> float:
    """Best of ROUNDS rounds of CALLS calls, in microseconds per call."""
    for _ in range(50):
        await call()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            await call()
        best = min(best, (time.perf_counter() - start) / CALLS)
    return best * 1e6


async def drain(stream: Any) -> CreateResult:
    last = None
    async for item in stream:
        last = item
    assert isinstance(last, CreateResult)
    return last


def report(name: str, bare: float, measured: dict[str, float]) -> None:
    parts = " | ".join(f"{k} {v:7.1f} µs (+{v - bare:6.1f})" for k, v in measured.items())
    print(f"\n{name:8s} bare replay {bare:7.1f} µs | {parts}")


def test_overhead_per_model_call() -> None:
    """create() and create_stream(), memory ledger, dollar cap, usage reported by the replay."""

    async def run() -> None:
        budget = allotment.Budget(
            usd="1000000", name="bench", prices=PRICES, unknown_price=PRICES["fake-1"]
        )
        bare_client = replay()
        wrapped = BudgetedChatCompletionClient(replay(), budget, model="fake-1")
        patched_client = replay()

        bare = await per_call_us(lambda: bare_client.create(MESSAGES))
        with_wrapper = await per_call_us(lambda: wrapped.create(MESSAGES))
        undo = instrument(budget)
        try:
            with_instrument = await per_call_us(lambda: patched_client.create(MESSAGES))
        finally:
            undo()
        report("create", bare, {"wrapper": with_wrapper, "instrument": with_instrument})

        bare_streamer = replay()
        wrapped_streamer = BudgetedChatCompletionClient(replay(), budget, model="fake-1")
        bare_s = await per_call_us(lambda: drain(bare_streamer.create_stream(MESSAGES)))
        wrapped_s = await per_call_us(lambda: drain(wrapped_streamer.create_stream(MESSAGES)))
        report("stream", bare_s, {"wrapper": wrapped_s})

        # The same kernel call the wrapper makes, without the wrapper: what is left of the
        # difference is the translation and the AutoGen-side bookkeeping.
        call = _translate.call_of(MESSAGES, (), None, {}, wrapped.facts, agent=None)
        used = allotment.Usage(input_tokens=20, output_tokens=8, llm_calls=1)

        async def kernel() -> None:
            (await budget.areserve(call)).settle(used)

        alone = await per_call_us(kernel)
        print(f"{'':8s} of which the kernel's areserve + settle of that call: {alone:6.1f} µs")
        assert budget.report().open_holds == 0

    asyncio.run(run())
