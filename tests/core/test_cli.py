"""The ``allotment report`` command renders a ledger's budget trees."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import allotment
import pytest
from allotment import Budget, Usage


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "allotment", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "", "NO_COLOR": "1"},
    )


def test_report_shows_each_budget_with_limits_spent_calls_tokens_and_refusals(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    root = Budget(usd="1.00", name="nightly", ledger=url)
    with root.allot("researcher", usd="0.40") as child:
        child.hold(Usage(usd=Decimal("0.10"), llm_calls=1)).settle(
            Usage(input_tokens=1200, output_tokens=300, llm_calls=1, usd=Decimal("0.0625"))
        )
        with pytest.raises(allotment.BudgetExceeded):
            child.hold(Usage(usd=Decimal("0.50"), llm_calls=1))
    out = run("report", url)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "nightly" in text
    assert "researcher" in text
    assert "$0.0625" in text
    assert "1200/300" in text
    assert "closed" in text
    as_json = json.loads(run("report", url, "--json").stdout)
    child = as_json[0]["children"][0]
    assert child["refusals"] == 1
    assert child["spent"]["usd"] == "0.0625"
    assert as_json[0]["held"]["usd"] == "0"


def test_report_of_a_missing_file_says_so_and_fails(tmp_path: Path) -> None:
    out = run("report", f"sqlite:///{tmp_path / 'nope.db'}")
    assert out.returncode == 2
    assert "no ledger file" in out.stdout
