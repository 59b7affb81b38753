"""The ``allotment`` command: reports of a ledger, and the demo."""

from __future__ import annotations

import sys
from typing import Annotated

try:
    import typer
    from rich.console import Console
except ImportError:  # pragma: no cover - exercised only without the cli extra
    sys.exit("the allotment command needs its cli extra: pip install 'allotment[cli]'")

from ._errors import AllotmentError
from ._plugins import plugins
from ._report import build_report, render

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Budget enforcement for LLM agents: see what budgets spent, or run the demo.",
)


@app.command()
def report(
    url: Annotated[str, typer.Argument(help="Ledger URL, e.g. sqlite:///runs.db")],
    budget: Annotated[
        list[str] | None, typer.Option("--budget", "-b", help="Only these root budgets.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show every budget tree in a ledger: limits, spent, held, calls, tokens, refusals."""
    console = Console()
    try:
        if url.startswith("sqlite:///") and not _exists(url):
            raise AllotmentError(f"no ledger file at {url[len('sqlite:///') :]!r}")
        ledger = plugins().ledger(url)
        roots = [r for r in ledger.roots() if not budget or r.name in budget]
        if not roots:
            console.print(f"no budgets in {url}" + (f" named {budget}" if budget else ""))
            raise typer.Exit(1 if budget else 0)
        reports = [build_report(ledger.tree(r.id)) for r in roots]
    except AllotmentError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        import json

        print(json.dumps([r.to_dict() for r in reports], indent=2))
        return
    for r in reports:
        console.print(render(r, title=f"budget {r.name!r} in {url}"))


DEMO_GROUP = "allotment.demos"
"""Entry-point group where integrations offer a demo: ``main(*, ledger, live, model,
console) -> None``, raising on a failed outcome."""


@app.command()
def demo(
    framework: Annotated[
        list[str] | None,
        typer.Option("--framework", "-f", help="Run only these frameworks' demos."),
    ] = None,
    live: Annotated[
        bool, typer.Option("--live", help="Use a real provider (needs OPENAI_API_KEY).")
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", help="Model for --live (default gpt-4o-mini).")
    ] = None,
    ledger: Annotated[
        str, typer.Option("--ledger", help="Where the demo writes its budgets.")
    ] = "sqlite:///allotment-demo.db",
) -> None:
    """Run real agents under a budget (offline by default) and show what the budget did."""
    import os
    from importlib.metadata import entry_points

    console = Console()
    found = {ep.name: ep for ep in entry_points(group=DEMO_GROUP)}
    chosen = framework or sorted(found)
    missing = [name for name in chosen if name not in found]
    if missing or not chosen:
        console.print(
            f"[red]no demo for {missing or 'any framework'}[/red]; installed: "
            f"{sorted(found) or 'none'} (install allotment-langchain and friends)"
        )
        raise typer.Exit(2)
    if live and not os.environ.get("OPENAI_API_KEY"):
        console.print("[red]--live needs OPENAI_API_KEY[/red]; without --live the demo is offline")
        raise typer.Exit(2)
    if ledger.startswith("sqlite:///"):
        from pathlib import Path

        db = ledger[len("sqlite:///") :]
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
    for name in chosen:
        console.rule(f"[bold]{name}[/bold]")
        found[name].load()(ledger=ledger, live=live, model=model, console=console)
    console.print(
        f"\nThe ledger is in [bold]{ledger}[/bold]: see it with "
        f"[bold]allotment report {ledger}[/bold]"
    )


def _exists(url: str) -> bool:
    from pathlib import Path

    return Path(url[len("sqlite:///") :]).exists()


def main() -> None:
    """Entry point of the ``allotment`` console script."""
    app()
