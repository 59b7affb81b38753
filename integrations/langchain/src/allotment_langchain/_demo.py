"""``allotment demo``: a LangGraph supervisor and two sub-agents under one dollar budget.

The researcher's search tool always fails, so it keeps retrying (the LANG-001 failure
mode); its child budget refuses the call that would overspend, the supervisor gets that
refusal as a tool error and moves on, and the writer still writes within what is left.
Offline (the default) it runs the real ``ChatOpenAI`` client against a scripted provider
on loopback; ``--live`` runs the same agents against the OpenAI API.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import allotment
from allotment import Budget, BudgetExceeded, Event
from allotment.testing import Reply, Request, ScriptedProvider, ToolCall

from ._handler import BudgetCallbackHandler

if TYPE_CHECKING:
    from rich.console import Console

CAP = "0.0100"
CHILDREN = {"researcher": "0.0020", "writer": "0.0030"}
DEFAULT_LIVE_MODEL = "gpt-4o-mini"
QUESTION = "Write a short briefing on what changed in the EU AI Act this year."

SUPERVISOR = (
    "You are the supervisor. First ask the researcher for facts, then ask the writer to "
    "write the briefing from the researcher's notes (or from what you know if research "
    "failed), then reply with the writer's briefing."
)
RESEARCHER = (
    "You are the researcher. Use web_search to find facts; if a search fails, try again "
    "with a better query. Reply with your notes only when you have sources."
)
WRITER = "You are the writer. Write a three-sentence briefing from the notes you are given."
BRIEFING = (
    "The EU AI Act's first obligations now apply: prohibited practices are banned and "
    "general-purpose model providers must publish training summaries. High-risk system "
    "rules phase in over the next two years. Research was cut short by its budget, so "
    "check the dates against the Official Journal before publishing."
)


# -- the agents ---------------------------------------------------------------------------------


def _react(model: Any, tools: list[Any], system: str, name: str) -> Any:
    """A ReAct agent as a LangGraph graph: a model node and a ToolNode in a loop."""
    from langchain_core.messages import SystemMessage
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    bound = model.bind_tools(tools)

    def think(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke([SystemMessage(system), *state["messages"]])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", think)
    # A failed sub-agent (its budget refused it) comes back as a tool error the agent
    # can read; the refusal is still recorded, and stands for that sub-agent.
    graph.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(name=name)


def build_supervisor(model: Any) -> Any:
    """The supervisor graph, with the researcher and the writer as agent tools."""
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import ToolException, tool

    @tool
    def web_search(query: str) -> str:
        """Search the web for recent sources."""
        raise ToolException(f"search backend timed out for {query!r}")

    web_search.handle_tool_error = True
    researcher_agent = _react(model, [web_search], RESEARCHER, "researcher_agent")
    writer_agent = _react(model, [], WRITER, "writer_agent")

    @tool
    def researcher(question: str) -> str:
        """Ask the research agent to collect facts with sources."""
        out = researcher_agent.invoke(
            {"messages": [HumanMessage(question)]}, config={"recursion_limit": 200}
        )
        return str(out["messages"][-1].content)

    @tool
    def writer(notes: str) -> str:
        """Ask the writing agent to write the briefing from notes."""
        out = writer_agent.invoke({"messages": [HumanMessage(notes)]})
        return str(out["messages"][-1].content)

    return _react(model, [researcher, writer], SUPERVISOR, "supervisor")


# -- the scripted provider's side of the conversation ---------------------------------------------


def respond(request: Request) -> Reply:
    """What the scripted model says, decided from the request alone (deterministic)."""
    system = str((request.messages[0] if request.messages else {}).get("content") or "")
    last = request.last_message or {}
    if system.startswith("You are the researcher"):
        attempt = sum(1 for m in request.messages if m.get("role") == "tool") + 1
        query = {"query": f"EU AI Act changes {attempt}"}
        # Fixed ids: they are sent back in every later request, so random ones would make
        # token counts (and where the budget stops) vary from run to run.
        return Reply.tool_call("web_search", query, id=f"call_search_{attempt}")
    if system.startswith("You are the writer"):
        return Reply.text(BRIEFING)
    if last.get("role") == "user":
        question = {"question": "What changed in the EU AI Act?"}
        return Reply.tool_call("researcher", question, id="call_researcher")
    called = [c for m in request.messages for c in (m.get("tool_calls") or ())]
    if called and called[-1]["function"]["name"] == "researcher":
        notes = "Research failed (budget refused); write from general knowledge."
        return Reply.tool_calls(ToolCall("writer", {"notes": notes}, id="call_writer"))
    return Reply.text(str(last.get("content") or BRIEFING))


# -- what the audience sees -----------------------------------------------------------------------


class _Progress:
    """An allotment event sink that prints each settled call and each refusal."""

    def __init__(self, console: Console, root: str) -> None:
        self.console = console
        self.root = root

    @allotment.hookimpl
    def allotment_event(self, event: Event) -> None:
        if not event.path.startswith(self.root):
            return
        who = event.path.split("/", 1)[1] if "/" in event.path else "supervisor"
        if event.kind == "settle" and event.usage is not None:
            if event.usage.tool_calls:
                self.console.print(f"  [dim]{who:>10}[/dim]  tool   {event.model}")
            else:
                cost = _usd(event.usd)
                self.console.print(
                    f"  [dim]{who:>10}[/dim]  model  {event.usage.input_tokens:>5} in "
                    f"{event.usage.output_tokens:>4} out  {cost}"
                )
        elif event.kind == "refuse":
            limit = event.detail.get("limit", "?")
            self.console.print(
                f"  [bold red]{who:>10}  refused[/bold red] the next call ({limit} limit)"
            )


@contextmanager
def _listening(plugin: object) -> Iterator[None]:
    plugins = allotment.plugins()
    plugins.register(plugin)
    # LangChain logs every exception a handler raises before re-raising it; the demo
    # explains the refusal itself, so that log line is noise here.
    manager_log = logging.getLogger("langchain_core.callbacks.manager")
    level = manager_log.level
    manager_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        manager_log.setLevel(level)
        plugins.unregister(plugin)


def _usd(value: Decimal | None) -> str:
    return "unknown" if value is None else f"${value:.5f}"


def _explain(console: Console, refusal: BudgetExceeded) -> None:
    from rich.panel import Panel

    asked = f"up to {_usd(refusal.asked)}" if isinstance(refusal.asked, Decimal) else "more"
    console.print(
        Panel(
            f"Budget [bold]{refusal.path}[/bold] refused the researcher's next model call "
            f"before it was sent.\nLimit: {refusal.limit_name} {_usd(refusal.limit)}; spent "
            f"{_usd(refusal.spent)}, held {_usd(refusal.held)}, left "
            f"{_usd(refusal.remaining)}; the call needed {asked}.\nThe researcher was "
            f"looping on a failing search tool. The supervisor got the refusal as a tool "
            f"error and went on to the writer, whose own budget still had room.",
            title="why the researcher stopped",
            border_style="red",
        )
    )


def _tree(console: Console, budget: Budget) -> None:
    from rich import box
    from rich.table import Table

    table = Table(
        title="the budget tree (llm/tool: calls; tokens: in/out; held: open holds)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("budget", no_wrap=True)
    for column in ("limit", "spent", "llm", "tool", "tokens", "refused", "held"):
        table.add_column(column, justify="right", no_wrap=True)
    for depth, node in budget.report().walk():
        limit = node.limits.get("usd")
        table.add_row(
            "  " * depth + node.name,
            "-" if limit is None else f"${limit}",
            _usd(node.spent.usd),
            str(node.spent.llm_calls),
            str(node.spent.tool_calls),
            f"{node.spent.input_tokens}/{node.spent.output_tokens}",
            f"[red]{node.refusals}[/red]" if node.refusals else "0",
            str(node.open_holds),
        )
    console.print(table)


# -- the demo -----------------------------------------------------------------------------------


def main(*, ledger: str, live: bool, model: str | None, console: Console) -> None:
    """Run the demo on ``ledger``; raise if the budget did not do what the demo shows."""
    budget = Budget(usd=CAP, ledger=ledger, name="briefing")
    handler = BudgetCallbackHandler(budget, children=CHILDREN)
    provider = None if live else ScriptedProvider(responder=respond, default=None).start()
    try:
        answer = _run(budget, handler, provider, model, console)
    finally:
        if provider is not None:
            provider.stop()
        budget.close()
    console.print()
    research_refusals = [r for r in handler.refusals if r.path.endswith("/researcher")]
    if research_refusals:
        _explain(console, research_refusals[0])
    console.print(f"\n[bold]The briefing[/bold] (the writer still wrote it):\n{answer}\n")
    _tree(console, budget)
    _check(budget, handler, answer, live=live)


def _run(
    budget: Budget,
    handler: BudgetCallbackHandler,
    provider: ScriptedProvider | None,
    model: str | None,
    console: Console,
) -> str:
    from langchain_openai import ChatOpenAI

    # A plain mapping: ChatOpenAI's pydantic aliases (max_tokens) are not visible to mypy.
    options: dict[str, Any] = {"max_tokens": 300}
    if provider is None:
        options.update(model=model or DEFAULT_LIVE_MODEL, max_retries=1)
        console.print(f"Live: {options['model']} on the OpenAI API.")
    else:
        options.update(
            model="gpt-4o-mini",
            base_url=provider.base_url,
            api_key=provider.api_key,
            max_retries=0,
        )
        console.print(
            "Offline: the real ChatOpenAI client against a scripted OpenAI-compatible "
            "provider on loopback (no network, no key)."
        )
    limits = ", ".join(f"{name} ${usd}" for name, usd in CHILDREN.items())
    console.print(f"Budget ${CAP} for the run; sub-agent budgets: {limits}.\n")
    with _listening(_Progress(console, budget.path)):
        out = build_supervisor(ChatOpenAI(**options)).invoke(
            {"messages": [("user", QUESTION)]}, config={"callbacks": [handler]}
        )
    return str(out["messages"][-1].content)


def _check(budget: Budget, handler: BudgetCallbackHandler, answer: str, *, live: bool) -> None:
    """The outcome the demo claims; a failure here is a bug, not a demo."""
    report = budget.report()
    problems = []
    if any(node.open_holds for _, node in report.walk()):
        problems.append("a hold was left open")
    if report.spent.usd is None or report.spent.usd > Decimal(CAP):
        problems.append(f"spent {report.spent.usd} against a cap of {CAP}")
    if not live:
        names = {node.name: node for _, node in report.walk()}
        if "researcher" not in names or names["researcher"].refusals < 1:
            problems.append("the researcher was not refused")
        if "writer" not in names or names["writer"].spent.llm_calls < 1:
            problems.append("the writer did not write")
        if not answer:
            problems.append("the supervisor gave no answer")
    if problems:
        raise RuntimeError("langchain demo failed: " + "; ".join(problems))
    if handler.open_runs:
        raise RuntimeError(f"langchain demo left {handler.open_runs} runs open")
