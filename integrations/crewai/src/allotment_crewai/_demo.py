"""``allotment demo --framework crewai``: a hierarchical crew under a dollar budget.

The manager delegates to a researcher and a writer, each delegation on a child budget
carved from the manager's, and keeps asking for more until the crew's budget refuses.
Offline, CrewAI's own OpenAI provider talks to allotment's scripted provider on
loopback; ``--live`` uses the real API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import allotment
from allotment import Budget, BudgetExceeded, Event

if TYPE_CHECKING:
    from allotment.testing import Reply, Request, ScriptedProvider
    from rich.console import Console

CAP = {False: Decimal("0.0012"), True: Decimal("0.02")}
"""The crew's budget, offline and live."""
PER_CALL_OUTPUT = 200
"""max_tokens of every model call: what each hold reserves for output."""

_PLAN = (
    ("Researcher", "Find three facts about reserve-then-settle budgets for LLM agents."),
    ("Writer", "Draft a three-sentence brief from the researcher's facts."),
    ("Researcher", "Double-check those facts against a second source."),
    ("Writer", "Tighten the brief; every word must earn its place."),
)


def main(*, ledger: str, live: bool, model: str | None, console: Console) -> None:
    """Run the demo; raises if the budget did not hold."""
    _quiet_crewai()
    cap = CAP[live]
    budget = Budget(cap, name="crewai-demo", ledger=ledger)
    name = model or "gpt-4o-mini"
    console.print(
        f"A hierarchical CrewAI crew: the manager delegates to a researcher and a writer. "
        f"Budget [bold]{allotment_usd(cap)}[/bold] for the whole crew; each delegation runs "
        f"on a child budget carved from the manager's. Model: {name}"
        f"{' (live)' if live else ', scripted offline by allotment.testing.ScriptedProvider'}."
    )
    progress = _Progress(console, budget.path)
    allotment.plugins().register(progress)
    crewai_log = logging.getLogger("crewai")
    level = crewai_log.level
    crewai_log.setLevel(logging.CRITICAL)  # CrewAI logs each refusal as an error of its own
    try:
        with _provider(live) as provider:
            crew = _crew(budget, name, provider)
            try:
                out = crew.kickoff()
            except BudgetExceeded as err:
                _explain(console, err)
            else:
                console.print(f"\nThe crew finished within its budget:\n  {str(out.raw)[:300]}")
            calls = provider.calls if provider is not None else None
    finally:
        crewai_log.setLevel(level)
        allotment.plugins().unregister(progress)
    from allotment._report import render

    report = budget.report()
    console.print(render(report, title="the budget tree, one child per kickoff, agent and task"))
    _check(budget, cap, calls, console)


def allotment_usd(amount: Decimal) -> str:
    return f"${amount.normalize():f}"


# -- the crew ---------------------------------------------------------------------------


def _crew(budget: Budget, model: str, provider: ScriptedProvider | None) -> Any:
    from crewai import LLM, Agent, Crew, Process, Task
    from crewai.tools import tool

    from . import crew_config

    def llm() -> Any:
        options: dict[str, Any] = {"max_tokens": PER_CALL_OUTPUT}
        if provider is not None:
            options.update(base_url=provider.base_url, api_key=provider.api_key)
        return LLM(model=f"openai/{model}", **options)

    @tool("search")
    def search(query: str) -> str:
        """Search the web and return short snippets."""
        return (
            "1. A hold reserves an upper bound before each call. "
            "2. Settling charges what the provider reported. "
            "3. Unspent escrow returns when a child budget closes."
        )

    researcher = Agent(
        role="Researcher",
        goal="Find accurate facts quickly.",
        backstory="A careful analyst who cites sources.",
        llm=llm(),
        tools=[search],
    )
    writer = Agent(
        role="Writer",
        goal="Write short, clear prose.",
        backstory="An editor who hates filler.",
        llm=llm(),
    )
    brief = Task(
        name="brief",
        description="Produce a short, well-checked brief on reserve-then-settle budgets.",
        expected_output="A three-sentence brief.",
    )
    return Crew(
        agents=[researcher, writer],
        tasks=[brief],
        process=Process.hierarchical,
        manager_llm=llm(),
        **crew_config(budget, per_agent={"Researcher": "0.0006", "Writer": "0.0004"}),
    )


@contextlib.contextmanager
def _provider(live: bool) -> Iterator[ScriptedProvider | None]:
    if live:
        yield None
        return
    from allotment.testing import ScriptedProvider

    with ScriptedProvider(responder=_respond) as provider:
        yield provider


def _respond(request: Request) -> Reply:
    """What the scripted model says, by who is asking and how far the work has got."""
    from allotment.testing import Reply

    system = str(request.messages[0].get("content", "")) if request.messages else ""
    results = sum(1 for m in request.messages if m.get("role") == "tool")
    if system.startswith("You are Crew Manager"):
        coworker, job = _PLAN[results % len(_PLAN)]
        arguments = {"task": job, "context": "A brief for engineers.", "coworker": coworker}
        return Reply.tool_call("delegate_work_to_coworker", arguments, id=f"call_m{results}")
    if system.startswith("You are Researcher") and results == 0:
        return Reply.tool_call("search", {"query": "reserve then settle budgets"}, id="call_s")
    if system.startswith("You are Researcher"):
        return Reply.text("Facts: a hold bounds each call; settling charges usage; escrow returns.")
    return Reply.text(
        "Each call first holds an upper bound of its cost. It then settles at what the "
        "provider reported. Children return what they did not spend."
    )


# -- what is shown ----------------------------------------------------------------------


class _Progress:
    """Prints the budget's events as they happen (an ``allotment_event`` plugin)."""

    def __init__(self, console: Console, root: str) -> None:
        self.console = console
        self.root = root

    @allotment.hookimpl
    def allotment_event(self, event: Event) -> None:
        if not event.path.startswith(self.root):
            return
        where = event.path[len(self.root) + 1 :] or event.path
        if event.kind == "settle" and event.usage is not None and event.usage.llm_calls:
            usd = "?" if event.usd is None else allotment_usd(event.usd)
            flag = " (estimated)" if event.usage.estimated else ""
            self.console.print(
                f"  [green]settled[/green] {usd:>10}{flag}  {event.usage.input_tokens:>5} in "
                f"{event.usage.output_tokens:>4} out  [dim]{where}[/dim]"
            )
        elif event.kind == "settle" and event.usage is not None and event.usage.tool_calls:
            self.console.print(f"  [blue]tool[/blue]    {event.model}  [dim]{where}[/dim]")
        elif event.kind == "open" and event.detail.get("escrow"):
            limits = event.detail.get("limits", {})
            usd = limits.get("usd")
            shown = allotment_usd(Decimal(usd) / 10**9) if usd else "its limits"
            self.console.print(f"  [cyan]opened[/cyan]  {where} with {shown} set aside")
        elif event.kind == "refuse":
            limit = event.detail.get("limit")
            self.console.print(f"  [red]refused[/red] a call at {where} ({limit})")


def _explain(console: Console, err: BudgetExceeded) -> None:
    if "allotting" in str(err):
        when = "when the manager delegated again: the coworker's child budget did not fit"
    elif err.limit_name.startswith("tool"):
        when = "before its next tool call"
    else:
        when = "before its next model call"
    console.print(
        f"\n[bold red]The crew was stopped {when}.[/bold red]\n{err}\n"
        f"The refusal came from [bold]{err.path}[/bold] on [bold]{err.limit_name}[/bold], "
        f"before anything was sent. It is a {type(err).__name__}: an "
        f"allotment.BudgetExceeded that is also a CrewAI HookAborted, so CrewAI neither "
        f"retried it nor fed it back to the agent as text, and it left kickoff() typed. "
        f"(A refusal by a delegation's own child budget stays with the delegate: the "
        f"manager is told and carries on.)"
    )


def _check(budget: Budget, cap: Decimal, calls: int | None, console: Console) -> None:
    spent = budget.spent
    report = budget.report()
    problems = []
    if spent.usd is None or spent.usd > cap:
        problems.append(f"spent {spent.usd} against a cap of {cap}")
    if report.open_holds:
        problems.append(f"{report.open_holds} holds still open")
    if calls is not None and calls != spent.llm_calls:
        problems.append(f"the provider answered {calls} calls, the ledger has {spent.llm_calls}")
    if problems:
        raise RuntimeError("the CrewAI demo's budget did not hold: " + "; ".join(problems))
    extra = f"; the provider answered {calls} calls, the ledger counts {calls}" if calls else ""
    console.print(
        f"Spent {allotment_usd(spent.usd or Decimal(0))} of {allotment_usd(cap)}, "
        f"nothing held{extra}."
    )


def _quiet_crewai() -> None:
    """No telemetry, trace prompts or version checks from CrewAI during the demo."""
    for key, value in {
        "CREWAI_DISABLE_TELEMETRY": "true",
        "CREWAI_DISABLE_TRACKING": "true",
        "OTEL_SDK_DISABLED": "true",
        "CREWAI_TRACING_ENABLED": "false",
        "CREWAI_DISABLE_VERSION_CHECK": "true",
        "CREWAI_STORAGE_DIR": os.path.join(tempfile.gettempdir(), "allotment-crewai-demo"),
    }.items():
        os.environ.setdefault(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CrewAI's own import-time and deprecation warnings
        import crewai  # noqa: F401
