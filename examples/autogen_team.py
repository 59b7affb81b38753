"""An AutoGen selector team under one budget, through one line of runtime middleware.

A lead, a writer and a critic who never approves take turns chosen by SelectorGroupChat's
speaker selection (those model calls are on the budget too). The lead can send a
researcher sub-agent (an AgentTool) out; each time it gets a child budget of its own.
There is no termination condition: the budget ends the run, and ``team.run()`` raises a
typed ``BudgetExceeded``. Offline by default: AutoGen's OpenAI client talks to
allotment's scripted provider on loopback.

    uv run python examples/autogen_team.py
    OPENAI_API_KEY=sk-... uv run python examples/autogen_team.py --live
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import warnings

import allotment
from allotment.testing import Reply, Request, ScriptedProvider, ToolCall
from allotment_autogen import BudgetMiddleware
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.messages import BaseChatMessage
from autogen_agentchat.teams import SelectorGroupChat
from autogen_agentchat.tools import AgentTool
from autogen_core import SingleThreadedAgentRuntime
from autogen_ext.models.openai import OpenAIChatCompletionClient

SELECTOR = "You are in a role play game"


def scripted() -> ScriptedProvider:
    """What the scripted model answers: the selector cycles lead, writer, critic; the lead
    sends the researcher out once, then everybody talks."""
    turns = itertools.cycle(["lead", "writer", "critic"])
    sent_out = False

    def respond(request: Request) -> Reply:
        nonlocal sent_out
        system = str(request.messages[0].get("content", "")) if request.messages else ""
        if system.startswith(SELECTOR):
            return Reply.text(next(turns))
        if system.startswith("You lead") and not sent_out:
            sent_out = True
            return Reply.tool_calls(ToolCall("researcher", {"task": "Find three facts."}))
        if system.startswith("You critique"):
            return Reply.text("Not good enough yet; tighten the second sentence.")
        return Reply.text("Here is a revised paragraph about budgets for agents.")

    return ScriptedProvider(responder=respond)


async def run(client: OpenAIChatCompletionClient, live: bool) -> None:
    budget = allotment.Budget(usd="0.0030", name="newsroom")
    middleware = BudgetMiddleware(
        budget,
        per_agent={"critic": {"llm_calls": 5}},  # a cap, not a share: it does not escrow
        children={"researcher": "0.0008"},  # the sub-agent's own dollars, escrowed per run
    )
    runtime = SingleThreadedAgentRuntime(intervention_handlers=[middleware])
    runtime.start()
    researcher = AssistantAgent(
        "researcher", model_client=client, system_message="You research. Be brief."
    )
    team = SelectorGroupChat(
        [
            AssistantAgent(
                "lead",
                model_client=client,
                tools=[AgentTool(researcher)],
                system_message="You lead. Use the researcher when facts are missing.",
                description="Plans the piece and asks for research.",
            ),
            AssistantAgent(
                "writer",
                model_client=client,
                system_message="You write. Revise the piece.",
                description="Writes and revises.",
            ),
            AssistantAgent(
                "critic",
                model_client=client,
                system_message="You critique. Never approve.",
                description="Critiques the piece.",
            ),
        ],
        model_client=client,
        runtime=runtime,
        # A safety net for live runs only: the budget is what stops this team.
        termination_condition=MaxMessageTermination(60) if live else None,
    )
    try:
        async for item in team.run_stream(task="Write a short piece on budgets for agents."):
            if isinstance(item, BaseChatMessage) and item.source != "user":
                print(f"{budget.spent.usd!s:>12} USD  {item.source}: {item.to_text()[:60]}")
    except allotment.BudgetExceeded as err:
        print(f"\nstopped: {err}")
    finally:
        await runtime.stop()
    print()
    print(budget.report())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="use the OpenAI API")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    # AutoGen warns on every RPC returning None once any intervention handler is installed,
    # and its runtime logs the refusal's traceback from every agent it passes; we print it.
    warnings.filterwarnings("ignore", "Intervention handler on_response returned None")
    logging.getLogger("autogen_core").setLevel(logging.CRITICAL)
    if args.live:
        client = OpenAIChatCompletionClient(model=args.model, max_tokens=200)
        asyncio.run(_with(client, live=True))
        return
    with scripted() as provider:
        client = OpenAIChatCompletionClient(
            model="gpt-4o-mini-2024-07-18",
            base_url=provider.base_url,
            api_key=provider.api_key,
            max_tokens=200,
        )
        asyncio.run(_with(client, live=False))


async def _with(client: OpenAIChatCompletionClient, *, live: bool) -> None:
    try:
        await run(client, live)
    finally:
        await client.close()


if __name__ == "__main__":
    main()
