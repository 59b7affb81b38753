"""The package's surface: a lazy, sorted public API, an entry point that does not import
AutoGen, a team patch that lives only as long as its users, and a demo that tells the story."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import allotment
import allotment_autogen
import pytest
from rich.console import Console


def test_the_public_api_is_sorted_and_every_name_resolves() -> None:
    assert allotment_autogen.__all__ == sorted(allotment_autogen.__all__)
    for name in allotment_autogen.__all__:
        assert getattr(allotment_autogen, name) is not None
    assert set(allotment_autogen.__all__) <= set(dir(allotment_autogen))
    with pytest.raises(AttributeError):
        _ = allotment_autogen.NotAThing


def test_loading_the_plugin_does_not_import_autogen() -> None:
    script = textwrap.dedent(
        """
        import sys
        import allotment
        host = allotment.plugins()
        print(host.pm.get_plugin("autogen").__name__)
        print(sorted(m for m in sys.modules if m.startswith("autogen")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out == ["allotment_autogen._plugin", "[]"]


def test_the_team_patch_lives_exactly_as_long_as_its_holders(replay: Any) -> None:
    from allotment_autogen import BudgetedChatCompletionClient, BudgetMiddleware
    from autogen_agentchat.teams import BaseGroupChat

    def patched() -> bool:
        gc.collect()
        return BaseGroupChat.run_stream.__module__ == "allotment_autogen._teams"

    assert not patched()
    client = BudgetedChatCompletionClient(replay([]))
    middleware = BudgetMiddleware()
    assert patched()
    del client
    assert patched()
    del middleware
    assert not patched()


def test_the_demo_is_stopped_by_its_budget_and_explains_why() -> None:
    from allotment_autogen._demo import main

    out = io.StringIO()
    console = Console(file=out, width=150, color_system=None)
    main(ledger="memory://autogen-demo-test", live=False, model=None, console=console)
    text = out.getvalue()
    assert "raised BudgetExceeded, typed" in text
    assert "refused on usd" in text
    assert "The provider saw 8 calls; the ledger admitted 8" in text
    assert "writer" in text
    assert "critic" in text
    ledger = allotment.plugins().ledger("memory://autogen-demo-test")
    root = next(r for r in ledger.roots() if r.name == "autogen-demo")
    assert root.open_holds == 0


def test_the_example_runs_offline_and_is_stopped_by_its_budget() -> None:
    example = Path(__file__).resolve().parents[3] / "examples" / "autogen_team.py"
    out = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "stopped: budget 'newsroom/critic' (an agent cap) refused a call" in out
    assert "researcher: spent" in out
    assert "SelectorGroupChatManager: spent" in out
