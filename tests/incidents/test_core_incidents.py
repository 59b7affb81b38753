"""Incidents the kernel stops on its own, whatever the framework (INCIDENTS.md 18, 19)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import allotment
from allotment import Budget, Usage

DAY = 86_400.0
T0 = 1_767_225_600.0 + 3_600  # 2026-01-01T01:00Z

SERVICE = textwrap.dedent(
    """
    import json, sys
    from decimal import Decimal
    import allotment

    ledger, now, attempts = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    budget = allotment.Budget(
        usd="5.00", period="day", name="service", ledger=ledger,
        clock=allotment.ManualClock(now),
    )
    admitted = 0
    for _ in range(attempts):
        try:
            hold = budget.hold(allotment.Usage(usd=Decimal("1.00"), llm_calls=1))
        except allotment.BudgetExceeded:
            continue
        hold.settle(allotment.Usage(usd=Decimal("1.00"), llm_calls=1))
        admitted += 1
    print(json.dumps({"admitted": admitted, "spent": str(budget.spent.usd)}))
    """
)


def _run_service(tmp_path: Path, ledger: str, now: float, attempts: int) -> dict[str, object]:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    out = subprocess.run(
        [sys.executable, str(script), ledger, str(now), str(attempts)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_dnsw_001_daily_cap_holds_across_process_restarts(tmp_path: Path) -> None:
    """A long-running service restarts three times on one day and once the next day:
    its spend adds up across restarts, the $5/day cap holds, and the next day starts fresh."""
    ledger = f"sqlite:///{tmp_path / 'service.db'}"
    first = _run_service(tmp_path, ledger, T0, 3)
    second = _run_service(tmp_path, ledger, T0 + 3_600, 3)
    third = _run_service(tmp_path, ledger, T0 + 7_200, 3)
    assert first == {"admitted": 3, "spent": "3"}
    assert second == {"admitted": 2, "spent": "5"}  # only what was left of the day
    assert third == {"admitted": 0, "spent": "5"}
    next_day = _run_service(tmp_path, ledger, T0 + DAY, 3)
    assert next_day == {"admitted": 3, "spent": "3"}
    state = allotment.plugins().ledger(ledger).state("service")
    assert state.open_holds == 0


def _storm(rate: allotment.Rate) -> tuple[list[float], list[allotment.RateWindowExceeded], float]:
    """123 calls in three bursts of 41 over 16 simulated minutes, made one after another."""
    clock = allotment.ManualClock()
    b = Budget(rate=rate, clock=clock)
    start = clock.now()
    admitted_at: list[float] = []
    refused: list[allotment.RateWindowExceeded] = []
    for burst_minute in (0, 8, 15):
        target = start + burst_minute * 60
        if clock.now() < target:
            clock.advance(target - clock.now())
        for _ in range(41):
            try:
                hold = b.hold(Usage(llm_calls=1))
            except allotment.RateWindowExceeded as err:
                refused.append(err)
                continue
            admitted_at.append(clock.now())
            hold.settle(Usage(llm_calls=1))
    assert b.spent.llm_calls == len(admitted_at)
    assert b.held.llm_calls == 0
    for t in admitted_at:  # no 60 s window ever admits more than 20
        assert sum(1 for u in admitted_at if t - 60 < u <= t) <= 20
    return admitted_at, refused, clock.now() - start


def test_lang_016_rate_window_123_calls_in_16_minutes_wait_or_fail_never_hang() -> None:
    """A retry storm of 123 calls in 16 simulated minutes against 20 calls/minute: with the
    default wait (one window) every call waits its turn and none is lost; a caller that
    allows only 5 s of waiting gets typed rate errors saying when the call would fit.
    Either way the storm ends: nothing hangs."""
    admitted, refused, took = _storm(allotment.Rate(limit=20, per="minute"))
    assert (len(admitted), len(refused)) == (123, 0)
    assert took < 18 * 60
    admitted, refused, took = _storm(allotment.Rate(limit=20, per="minute", max_wait=5))
    assert len(admitted) == 60  # one full window per burst
    assert len(refused) == 63
    assert all(5 < e.retry_after <= 60 for e in refused)
    assert all(isinstance(e, allotment.BudgetExceeded) for e in refused)
    assert "window" in str(refused[0])
    assert took < 16 * 60 + 5
