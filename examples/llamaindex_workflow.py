"""A LlamaIndex AgentWorkflow under one budget, with a limit per agent.

The researcher gathers facts and hands off to the writer; the writer sends it back for a
citation, and the citation tool always fails, so the researcher retries it until its own
budget refuses the next model call. Offline by default: LlamaIndex's OpenAI class talks to
allotment's scripted provider on loopback.

    uv run python examples/llamaindex_workflow.py
    OPENAI_API_KEY=sk-... uv run python examples/llamaindex_workflow.py --live
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import warnings

import allotment
from allotment.testing import Reply, ScriptedProvider, ToolCall
from allotment_llamaindex import instrument
from llama_index.core.agent.workflow import AgentOutput, AgentWorkflow, FunctionAgent
from llama_index.llms.openai import OpenAI


def search(query: str) -> str:
    """Search the web; returns short snippets."""
    return "Llamas hum when they are anxious, curious or tired (Llama Society, 2019)."


def fetch_citation(url: str) -> str:
    """Fetch a page to cite."""
    raise ConnectionError(f"{url} timed out")


def script(provider: ScriptedProvider) -> None:
    """What the scripted model answers: research, hand off, come back, then loop."""
    provider.add(
        Reply.tool_call("search", {"query": "why do llamas hum"}, id="call_search"),
        Reply.tool_call("handoff", {"to_agent": "writer", "reason": "facts found"}, id="call_h1"),
        Reply.tool_call("handoff", {"to_agent": "researcher", "reason": "cite it"}, id="call_h2"),
    )
    ids = itertools.count(1)
    provider.responder = lambda request: Reply.tool_calls(
        ToolCall("fetch_citation", {"url": "https://example.org/llamas"}, id=f"call_{next(ids)}")
    )


async def run(llm: OpenAI) -> None:
    researcher = FunctionAgent(
        name="researcher",
        description="Finds facts and citations.",
        system_prompt="You research facts. Cite a source for every claim.",
        llm=llm,
        tools=[search, fetch_citation],
        can_handoff_to=["writer"],
    )
    writer = FunctionAgent(
        name="writer",
        description="Writes the final text.",
        system_prompt="You write concise text from the researcher's facts.",
        llm=llm,
        can_handoff_to=["researcher"],
    )
    workflow = AgentWorkflow(agents=[researcher, writer], root_agent="researcher")

    budget = allotment.Budget(usd="0.01", name="article")
    # Each agent gets its own escrowed share; calls are charged to the agent that makes them.
    undo = instrument(budget, children={"researcher": "0.0012", "writer": "0.0010"})
    try:
        task = "Two sentences on why llamas hum, cited."
        handler = workflow.run(user_msg=task, max_iterations=50)
        async for event in handler.stream_events():
            if isinstance(event, AgentOutput):
                tools = ", ".join(c.tool_name for c in event.tool_calls) or "answers"
                print(f"{event.current_agent_name} -> {tools}")
        print("\nResult:", await handler)
    except allotment.BudgetExceeded as refusal:
        print(f"\nRefused before sending: {refusal}")
    finally:
        undo()
    print()
    print(budget.report())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="use the OpenAI API")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    # The workflows package inspects agents through pydantic's deprecated attributes.
    warnings.simplefilter("ignore", DeprecationWarning)
    if args.live:
        asyncio.run(run(OpenAI(model=args.model, max_tokens=256)))
        return
    with ScriptedProvider(default=None) as provider:
        script(provider)
        llm = OpenAI(
            model="gpt-4o-mini",
            api_base=provider.base_url,
            api_key=provider.api_key,
            max_tokens=256,
            max_retries=0,
        )
        asyncio.run(run(llm))
        print(f"\nThe provider answered {provider.calls} model calls.")


if __name__ == "__main__":
    main()
