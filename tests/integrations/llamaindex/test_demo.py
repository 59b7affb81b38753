"""The demo and the example run offline, deterministically, and end as they say."""

from __future__ import annotations

import io
import runpy
import sys
from pathlib import Path

import allotment
import pytest
from rich.console import Console

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "llamaindex_workflow.py"


def test_the_demo_runs_offline_and_ends_refused_at_the_researcher(tmp_path: Path) -> None:
    from allotment_llamaindex._demo import main

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    out = io.StringIO()
    main(ledger=url, live=False, model=None, console=Console(file=out, width=160))
    text = out.getvalue()
    assert "Refused" in text
    assert "budget 'llamaindex/researcher' refused a call" in text
    # The run is on the ledger for `allotment report`, the researcher closed, refused once.
    ledger = allotment.plugins().ledger(url)
    [root] = [r for r in ledger.roots() if r.name == "llamaindex"]
    tree = {s.name: s for s in ledger.tree(root.id)}
    assert tree["researcher"].closed
    assert tree["researcher"].refusals == 1
    assert tree["writer"].closed


def test_the_example_runs_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "Refused before sending: budget 'article/researcher'" in out
    assert "writer -> handoff" in out
