"""INCIDENTS.md #14, the delegation fan-out race: outcome tables for asyncio, threads and
processes, allotment against the naive check-then-record control.

Prints numbers and asserts none. Run with
``uv run pytest tests/benchmarks --benchmarks -s -k fanout_race``. The trial runners are
those of ``tests/core/test_fanout_race.py``, which asserts the outcome.
"""

from __future__ import annotations

import importlib.util
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

SCENARIO = Path(__file__).parents[1] / "core" / "test_fanout_race.py"


def scenario() -> ModuleType:
    """The core test module, loaded under its own name (it is not a package module)."""
    name = "fanout_race_scenario"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCENARIO)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules[name]


def fmt(usd: Decimal) -> str:
    return f"${usd:.5f}"


def table(rows: list[tuple[str, str, list[Any]]], left: Decimal) -> None:
    print()
    print(f"three sub-agents, {fmt(left)} left, estimate $0.00031, cost $0.00023 per call")
    head = (
        f"{'mode':<22} {'control':<10} {'trials':>6} {'overshoots':>10} "
        f"{'admitted/trial':>15} {'spent/trial':>21}"
    )
    print(head)
    print("-" * len(head))
    for mode, control, trials in rows:
        admitted = [t.admitted for t in trials]
        spent = [t.spent for t in trials]
        span = f"{min(admitted)}-{max(admitted)}"
        money = f"{fmt(min(spent))}-{fmt(max(spent))}"
        overshoots = sum(t.overshoot for t in trials)
        print(f"{mode:<22} {control:<10} {len(trials):>6} {overshoots:>10} {span:>15} {money:>21}")


async def test_fanout_race_outcomes_per_mode(tmp_path: Path) -> None:
    """Prints, per concurrency mode, how often each control overshot, how many calls each
    trial admitted and what each trial spent."""
    s = scenario()
    rows: list[tuple[str, str, list[Any]]] = []
    budgeted, naive = await s.asyncio_trials()
    rows += [("asyncio", "naive", naive), ("asyncio", "allotment", budgeted)]
    for pause, label in (("barrier", "threads (barrier)"), ("sleep", "threads (sleep(0))")):
        budgeted, naive = s.thread_trials(pause=pause)
        rows += [(label, "naive", naive), (label, "allotment", budgeted)]
    budgeted, naive = s.process_trials(tmp_path)
    rows += [("processes (sqlite)", "naive", naive), ("processes (sqlite)", "allotment", budgeted)]
    table(rows, s.LEFT)
    print("threads (barrier): every call is in flight before any returns.")
    print("threads (sleep(0)): a call may return before another sub-agent reserves, and")
    print("then a second call fits in what is left (never more than is left).")
