"""``allotment demo -f autogen``: a writer and a critic who never agree, under a budget.

Offline it runs against the scripted provider (AutoGen's real OpenAI client over HTTP on
loopback), so it is deterministic and takes seconds; ``live=True`` uses the OpenAI API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import allotment

if TYPE_CHECKING:
    from rich.console import Console

TEAM_USD = "0.00030"
"""The team's dollars: about ten small gpt-4o-mini calls."""
PER_AGENT: dict[str, object] = {"critic": {"llm_calls": 6}, "writer": "0.00025"}
"""Per-agent caps; they overlap the team's on purpose."""
MAX_TOKENS = 120

WRITER = "You are writer. Rewrite the slogan, taking the critic's notes into account."
CRITIC = "You are critic. Never approve; always ask for one more change."


def _scripted(request: Any) -> Any:
    from allotment.testing import Reply

    first = request.messages[0].get("content", "") if request.messages else ""
    turn = sum(1 for m in request.messages if m.get("role") == "assistant")
    if isinstance(first, str) and first.startswith("You are critic."):
        return Reply.text(f"Not yet. Change number {turn + 1}: make it punchier and shorter.")
    slogan = "budgets that never overspend, for agents that never stop."
    return Reply.text(f"Draft {turn + 1}: {slogan}")


def main(*, ledger: str, live: bool, model: str | None, console: Console) -> None:
    """Run the demo; raises if the budget did not stop the team within its cap."""
    with _quiet_runtime():
        asyncio.run(_main(ledger=ledger, live=live, model=model, console=console))


@contextlib.contextmanager
def _quiet_runtime() -> Iterator[None]:
    # AutoGen's runtime logs the refusal's traceback from every agent it reaches; the
    # demo explains the refusal itself.
    loggers = [logging.getLogger(name) for name in ("autogen_core", "autogen_agentchat")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # AutoGen warns for every RPC returning None once any intervention handler is
            # installed (see docs/autogen.md).
            warnings.filterwarnings(
                "ignore", "Intervention handler on_response returned None", RuntimeWarning
            )
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def _main(*, ledger: str, live: bool, model: str | None, console: Console) -> None:
    from allotment._report import render
    from allotment.testing import ScriptedProvider
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.conditions import MaxMessageTermination
    from autogen_agentchat.messages import BaseChatMessage
    from autogen_agentchat.teams import RoundRobinGroupChat
    from autogen_core import SingleThreadedAgentRuntime
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    from ._middleware import BudgetMiddleware

    budget = allotment.Budget(usd=TEAM_USD, name="autogen-demo", ledger=ledger)
    provider = None if live else ScriptedProvider(responder=_scripted).start()
    try:
        if provider is None:
            client = OpenAIChatCompletionClient(model=model or "gpt-4o-mini", max_tokens=MAX_TOKENS)
            where = f"the OpenAI API ({model or 'gpt-4o-mini'})"
        else:
            client = OpenAIChatCompletionClient(
                model="gpt-4o-mini-2024-07-18",
                base_url=provider.base_url,
                api_key=provider.api_key,
                max_tokens=MAX_TOKENS,
                max_retries=0,
            )
            where = "a scripted OpenAI-compatible provider on loopback"
        console.print(
            f"A [bold]writer[/bold] and a [bold]critic[/bold] who never approves, in a "
            f"round-robin team with no termination condition, calling {where}.\n"
            f"Team budget ${TEAM_USD}; per-agent caps {PER_AGENT} (they overlap the "
            f"team's: caps, not shares)."
        )
        middleware = BudgetMiddleware(budget, per_agent=PER_AGENT)
        runtime = SingleThreadedAgentRuntime(intervention_handlers=[middleware])
        runtime.start()
        team = RoundRobinGroupChat(
            [
                AssistantAgent("writer", model_client=client, system_message=WRITER),
                AssistantAgent("critic", model_client=client, system_message=CRITIC),
            ],
            runtime=runtime,
            # Only a safety net for live runs; the budget is what stops the team.
            termination_condition=MaxMessageTermination(40),
        )
        refusal: allotment.BudgetExceeded | None = None
        try:
            async for item in team.run_stream(task="Write a slogan for allotment."):
                if isinstance(item, BaseChatMessage) and item.source != "user":
                    spent = budget.spent
                    console.print(
                        f"  [dim]{spent.llm_calls:>2} calls, ${spent.usd}[/dim]  "
                        f"[bold]{item.source}[/bold]: {item.to_text()[:70]}"
                    )
        except allotment.BudgetExceeded as err:
            refusal = err
        finally:
            await runtime.stop()
            await client.close()
    finally:
        if provider is not None:
            provider.stop()
    _explain(console, budget, refusal, provider)
    console.print(render(budget.report(), title=f"budget tree in {ledger}"))
    _check(budget, refusal, provider)


def _explain(
    console: Console,
    budget: allotment.Budget,
    refusal: allotment.BudgetExceeded | None,
    provider: Any,
) -> None:
    if refusal is None:
        console.print("[yellow]The team ended before its budget ran out.[/yellow]")
        return
    console.print(
        f"\n[bold red]Stopped[/bold red]: team.run_stream() raised "
        f"[bold]{type(refusal).__name__}[/bold], typed, before the next call was sent.\n"
        f"  budget [bold]{refusal.path}[/bold] refused on [bold]{refusal.limit_name}[/bold]: "
        f"limit {refusal.limit}, spent {refusal.spent}, held {refusal.held}, "
        f"this call asked for up to {refusal.asked}.\n  {refusal}"
    )
    if provider is not None:
        console.print(
            f"The provider saw {provider.calls} calls; the ledger admitted "
            f"{budget.spent.llm_calls}, spending ${budget.spent.usd} of ${budget.limits.usd}."
        )


def _check(budget: allotment.Budget, refusal: Any, provider: Any) -> None:
    spent = budget.spent
    cap = budget.limits.usd
    if cap is None or spent.usd is None or spent.usd > cap:
        raise RuntimeError(f"the demo spent {spent.usd} against a cap of {cap}")
    if budget.report().open_holds:
        raise RuntimeError("the demo left holds open")
    if provider is not None:
        if refusal is None:
            raise RuntimeError("the budget did not stop the scripted team")
        if provider.calls != spent.llm_calls:
            raise RuntimeError(
                f"the provider saw {provider.calls} calls but the ledger has {spent.llm_calls}"
            )
    if spent.usd <= Decimal(0):
        raise RuntimeError("the demo recorded no spend")
