"""A CrewAI crew under one budget, with a limit per agent.

A researcher searches and a writer writes. The first kickoff finishes within budget and
the report shows what each agent and task spent. In the second, the researcher is stuck
in a search loop that CrewAI's max_iter would let run for 26 calls; its own limit of four
model calls refuses the fifth before it is sent, and kickoff() raises a typed refusal.

Offline by default: CrewAI's own OpenAI provider talks to allotment's scripted provider on
loopback.

    uv run python examples/crewai_crew.py
    OPENAI_API_KEY=sk-... uv run python examples/crewai_crew.py --live
"""

from __future__ import annotations

# CrewAI reads its telemetry settings when it is first imported, below them.
# ruff: noqa: E402
import argparse
import logging
import os
import warnings

for _key in ("CREWAI_DISABLE_TELEMETRY", "CREWAI_DISABLE_TRACKING", "OTEL_SDK_DISABLED"):
    os.environ.setdefault(_key, "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("CREWAI_DISABLE_VERSION_CHECK", "true")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # CrewAI's own import-time warnings
    from crewai import LLM, Agent, Crew, Task
    from crewai.tools import tool

import allotment
from allotment.testing import Reply, Request, ScriptedProvider
from allotment_crewai import crew_config


@tool("search")
def search(query: str) -> str:
    """Search the web and return short snippets."""
    return "Reserve-then-settle ledgers never overshoot a cap; check-then-record ones do."


def build(llm: LLM, budget: allotment.Budget) -> Crew:
    researcher = Agent(
        role="Researcher",
        goal="Find two solid facts.",
        backstory="A careful analyst.",
        llm=llm,
        tools=[search],
    )
    writer = Agent(
        role="Writer", goal="Write one clear paragraph.", backstory="An editor.", llm=llm
    )
    return Crew(
        agents=[researcher, writer],
        tasks=[
            Task(
                name="research",
                description="Research budget caps for LLM agents.",
                expected_output="Two facts.",
                agent=researcher,
            ),
            Task(
                name="write",
                description="Write a paragraph from the facts.",
                expected_output="One paragraph.",
                agent=writer,
            ),
        ],
        **crew_config(budget, per_agent={"Researcher": {"llm_calls": 4}, "Writer": "0.002"}),
    )


def scripted(stuck: bool) -> ScriptedProvider:
    """The offline model: the researcher searches twice (or forever), then answers."""

    def respond(request: Request) -> Reply:
        system = str(request.messages[0].get("content", ""))
        searches = sum(1 for m in request.messages if m.get("role") == "tool")
        if system.startswith("You are Researcher") and (stuck or searches < 2):
            return Reply.tool_call("search", {"query": f"budget caps, try {searches + 1}"})
        if system.startswith("You are Researcher"):
            return Reply.text("1. Holds are reserved before calls. 2. Settles charge usage.")
        return Reply.text("Budgets that reserve before each call cannot be overspent.")

    return ScriptedProvider(responder=respond)


def kickoff(title: str, llm: LLM, budget: allotment.Budget) -> None:
    print(f"\n== {title}")
    try:
        out = build(llm, budget).kickoff()
        print(f"finished: {out.raw}")
    except allotment.BudgetExceeded as err:  # a CrewBudgetExceeded, also a CrewAI HookAborted
        print(f"refused before sending: {err}")
    print(budget.report())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="use the real OpenAI API")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    logging.getLogger("crewai").setLevel(logging.CRITICAL)  # it logs each refusal as an error
    if args.live:
        llm = LLM(model=f"openai/{args.model}", max_tokens=300)
        kickoff("a crew under $0.02", llm, allotment.Budget("0.02", name="crew-example"))
        return
    for stuck, title in ((False, "a crew under $0.01"), (True, "the researcher gets stuck")):
        with scripted(stuck) as provider:
            llm = LLM(
                model=f"openai/{args.model}",
                base_url=provider.base_url,
                api_key=provider.api_key,
                max_tokens=300,
            )
            kickoff(title, llm, allotment.Budget("0.01", name="crew-example"))
            print(f"the provider answered {provider.calls} calls")


if __name__ == "__main__":
    main()
