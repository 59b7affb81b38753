"""``allotment demo -f llamaindex``: an AgentWorkflow under a dollar budget with per-agent
children, where the researcher ends up looping on a tool that always fails.

Offline (the default) it runs LlamaIndex's real OpenAI class against allotment's scripted
provider, deterministically, in seconds. ``live=True`` uses the OpenAI API.
"""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import allotment
from allotment._report import render

if TYPE_CHECKING:
    from rich.console import Console

CAP = "0.0100"
CHILDREN = {"researcher": "0.0012", "writer": "0.0010"}
"""Per-agent limits, escrowed from the workflow's budget; what they leave comes back."""
MAX_TOKENS = 256
MAX_ITERATIONS = 50
"""Above LlamaIndex's default of 20, so that the budget, not the step count, ends the loop."""
TASK = "Write two sentences on why llamas hum, with a citation."


def _usd(value: Decimal | None) -> str:
    return "unknown" if value is None else f"${value:.6f}"


def _script(provider: Any) -> None:
    """The offline run: research, hand off, get sent back for a citation, then loop."""
    from allotment.testing import Reply, ToolCall

    provider.add(
        Reply.tool_calls(ToolCall("search", {"query": "why do llamas hum"}, id="call_search")),
        Reply.tool_calls(
            ToolCall(
                "handoff",
                {"to_agent": "writer", "reason": "facts gathered"},
                id="call_handoff_1",
            )
        ),
        Reply.tool_calls(
            ToolCall(
                "handoff",
                {"to_agent": "researcher", "reason": "the draft needs a citation"},
                id="call_handoff_2",
            )
        ),
    )
    ids = itertools.count(1)
    # From here the researcher retries the citation tool for as long as it is let.
    provider.responder = lambda request: Reply.tool_calls(
        ToolCall("fetch_citation", {"url": "https://example.org/llamas"}, id=f"call_{next(ids)}")
    )


def _workflow(llm: Any) -> Any:
    from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent

    def search(query: str) -> str:
        """Search the web; returns short snippets."""
        return "Llamas hum when they are anxious, curious or tired (Llama Society, 2019)."

    def fetch_citation(url: str) -> str:
        """Fetch a page to cite."""
        raise ConnectionError(f"{url} timed out")

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
    return AgentWorkflow(agents=[researcher, writer], root_agent="researcher")


async def _run(workflow: Any, budget: allotment.Budget, console: Console) -> Any:
    from llama_index.core.agent.workflow import AgentOutput, ToolCallResult

    handler = workflow.run(user_msg=TASK, max_iterations=MAX_ITERATIONS)
    try:
        async for event in handler.stream_events():
            if isinstance(event, AgentOutput):
                report = budget.report()
                agent = event.current_agent_name
                spent = next((c.spent.usd for c in report.children if c.name == agent), None)
                calls = ", ".join(c.tool_name for c in event.tool_calls) or "answers"
                console.print(
                    f"  [bold]{agent}[/bold] -> {calls}"
                    f"   [dim](agent spent {_usd(spent)}, run {_usd(report.spent.usd)})[/dim]"
                )
            elif isinstance(event, ToolCallResult) and event.tool_output.is_error:
                console.print(f"    [red]x[/red] {event.tool_name}: {event.tool_output.content}")
        return await handler
    except allotment.BudgetExceeded as refusal:
        return refusal


def main(*, ledger: str, live: bool, model: str | None, console: Console) -> None:
    """Run the demo; raises if the budget did not do its job."""
    import warnings

    from llama_index.llms.openai import OpenAI

    from ._instrument import instrument

    budget = allotment.Budget(usd=CAP, name="llamaindex", ledger=ledger)
    console.print(
        f"An AgentWorkflow (researcher, writer) under [bold]${CAP}[/bold], each agent with "
        f"its own escrowed limit {CHILDREN}. The citation tool always fails."
    )
    provider: Any = None
    if live:
        llm = OpenAI(model=model or "gpt-4o-mini", max_tokens=MAX_TOKENS, max_retries=0)
    else:
        from allotment.testing import ScriptedProvider

        provider = ScriptedProvider(default=None).start()
        _script(provider)
        llm = OpenAI(
            model="gpt-4o-mini",
            api_base=provider.base_url,
            api_key=provider.api_key,
            max_tokens=MAX_TOKENS,
            max_retries=0,
        )
    undo = instrument(budget, children=CHILDREN)
    try:
        with warnings.catch_warnings():
            # The workflows package inspects agents through pydantic's deprecated attributes.
            warnings.simplefilter("ignore", DeprecationWarning)
            outcome = asyncio.run(_run(_workflow(llm), budget, console))
    finally:
        undo()
        if provider is not None:
            provider.stop()
    report = budget.report()
    if isinstance(outcome, allotment.BudgetExceeded):
        console.print(
            f"\n[bold red]Refused[/bold red] before the call was sent: {outcome}\n"
            f"The researcher kept retrying a failing tool; its own budget "
            f"({outcome.path}) ran out, so its next model call was refused and the "
            f"workflow stopped with a typed BudgetExceeded. The writer's unspent escrow "
            f"went back to the run."
        )
    else:
        console.print(f"\n[bold green]Finished[/bold green]: {outcome}")
    console.print(render(report, title="budget tree"))
    _check(report, outcome, provider, live)


def _check(report: Any, outcome: object, provider: Any, live: bool) -> None:
    if report.open_holds:
        raise RuntimeError(f"{report.open_holds} holds were left open")
    if report.spent.usd is None or report.spent.usd > Decimal(CAP):
        raise RuntimeError(f"spent {report.spent.usd} against a cap of ${CAP}")
    if live:
        return
    if not isinstance(outcome, allotment.BudgetExceeded) or outcome.path != "llamaindex/researcher":
        raise RuntimeError(f"the offline run should end refused at the researcher, not {outcome!r}")
    if report.spent.llm_calls != provider.calls:
        raise RuntimeError(
            f"the ledger counted {report.spent.llm_calls} calls, the provider {provider.calls}"
        )
