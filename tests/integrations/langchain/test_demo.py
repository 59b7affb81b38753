"""The README's first command: `allotment demo` runs the LangChain demo offline, explains
the refusal that stopped the runaway researcher, and leaves a ledger whose report shows
the whole tree with nothing held."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def console_script() -> str:
    found = shutil.which("allotment", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the allotment console script is not installed next to this Python")
    return found


def test_the_demo_runs_offline_and_its_ledger_reports_the_tree(tmp_path: Path) -> None:
    """Exit 0; the refusal is explained (which budget, which limit, spent and left); the
    writer still wrote; `allotment report --json` shows briefing/researcher/writer,
    the researcher refused, every budget closed and nothing held."""
    ledger = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    env.pop("OPENAI_API_KEY", None)
    demo = subprocess.run(
        [console_script(), "demo", "--framework", "langchain", "--ledger", ledger],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "why the researcher stopped" in out
    assert "Budget briefing/researcher refused the researcher's next model call" in out
    assert "Limit: usd $0.00200" in out
    assert "left $0." in out
    assert "the writer still wrote it" in out
    assert "EU AI Act" in out
    assert "Error in BudgetCallbackHandler" not in demo.stderr  # the demo explains it instead

    report = subprocess.run(
        [console_script(), "report", ledger, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    (tree,) = json.loads(report.stdout)
    assert tree["name"] == "briefing"
    children = {c["name"]: c for c in tree["children"]}
    assert set(children) == {"researcher", "writer"}
    assert children["researcher"]["refusals"] == 1
    assert children["researcher"]["spent"]["llm_calls"] >= 3
    assert children["writer"]["spent"]["llm_calls"] == 1
    nodes = [tree, *tree["children"]]
    assert all(n["open_holds"] == 0 and n["closed"] for n in nodes)
    assert float(tree["spent"]["usd"]) <= float(tree["limits"]["usd"])
    # The supervisor's own calls: ask the researcher, ask the writer, answer.
    assert tree["spent"]["llm_calls"] == sum(c["spent"]["llm_calls"] for c in nodes[1:]) + 3
