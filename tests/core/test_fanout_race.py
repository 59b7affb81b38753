"""INCIDENTS.md #14, the delegation fan-out race, under asyncio, threads and processes.

Three sub-agents start at once under one parent with $0.00060 left; each call is estimated
at $0.00031 and costs $0.00023. With allotment each sub-agent reserves the estimate on its
own (unlimited) child budget, so on the parent, before its call; exactly one fits. The
naive control checks ``spent + estimate <= cap`` before the call and records the cost
after it, as most agent frameworks do, and all three pass the check.

The trial runners are shared with ``tests/benchmarks/test_fanout_race.py``, which prints
the outcome tables.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import runpy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest
from allotment import Budget, BudgetExceeded, Usage
from allotment._sqlite import SqliteLedger

CAP = Decimal("0.00100")
EARLIER = Decimal("0.00040")
"""Spent by the parent before the sub-agents start, so that $0.00060 is left."""
LEFT = CAP - EARLIER
ESTIMATE = Decimal("0.00031")
COST = Decimal("0.00023")
AGENTS = 3
TRIALS = 30

Pause = Literal["barrier", "sleep"]
"""How a thread or process simulates its network call: wait until every sub-agent has
made its attempt (all calls in flight together), or just ``time.sleep(0)``."""


@dataclass(frozen=True)
class Trial:
    """One fan-out: how many sub-agents' calls were sent, and what they spent."""

    admitted: int
    spent: Decimal

    @property
    def overshoot(self) -> bool:
        return self.spent > LEFT


def parent_with_sixty_left(**kw: Any) -> Budget:
    """A parent budget capped at $0.00100 that has already spent $0.00040."""
    parent = Budget(usd=CAP, **kw)
    parent.hold(Usage(usd=EARLIER, llm_calls=1)).settle(Usage(usd=EARLIER, llm_calls=1))
    return parent


def spent_in_trial(parent: Budget) -> Decimal:
    usd = parent.spent.usd
    assert usd is not None
    return usd - EARLIER


def reserve(agent: Budget) -> Any:
    """The sub-agent's pre-flight: hold the estimate, or None if refused."""
    try:
        return agent.hold(Usage(usd=ESTIMATE, llm_calls=1))
    except BudgetExceeded:
        return None


def charge(hold: Any) -> None:
    hold.settle(Usage(usd=COST, llm_calls=1))


class Naive:
    """The control: check spend plus estimate against the cap, call, then record."""

    def __init__(self) -> None:
        self.spent = EARLIER
        self.admitted = 0
        self._lock = threading.Lock()

    def check(self) -> bool:
        return self.spent + ESTIMATE <= CAP

    def record(self) -> None:
        with self._lock:  # recording itself is safe; the check before the call is not
            self.spent += COST
            self.admitted += 1

    def trial(self) -> Trial:
        return Trial(self.admitted, self.spent - EARLIER)


# -- asyncio -----------------------------------------------------------------------------------


async def asyncio_trial() -> tuple[Trial, Trial]:
    """One fan-out of three tasks: (allotment, naive)."""
    parent = parent_with_sixty_left(name="parent")
    agents = [parent.allot(f"agent-{k}") for k in range(AGENTS)]

    async def budgeted(agent: Budget) -> int:
        hold = reserve(agent)
        if hold is None:
            return 0
        await asyncio.sleep(0)  # the model call
        charge(hold)
        return 1

    naive = Naive()

    async def unguarded() -> None:
        if naive.check():
            await asyncio.sleep(0)  # the model call
            naive.record()

    admitted = sum(await asyncio.gather(*(budgeted(a) for a in agents)))
    await asyncio.gather(*(unguarded() for _ in range(AGENTS)))
    return Trial(admitted, spent_in_trial(parent)), naive.trial()


async def asyncio_trials(trials: int = TRIALS) -> tuple[list[Trial], list[Trial]]:
    results = [await asyncio_trial() for _ in range(trials)]
    return [a for a, _ in results], [n for _, n in results]


# -- threads -----------------------------------------------------------------------------------


def _in_threads(work: Callable[[int, Callable[[], None]], None], pause: Pause) -> None:
    start = threading.Barrier(AGENTS)
    in_flight = threading.Barrier(AGENTS)

    def wait() -> None:
        if pause == "barrier":
            in_flight.wait()
        else:
            time.sleep(0)

    def run(k: int) -> None:
        start.wait()
        work(k, wait)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(AGENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def thread_trial(pause: Pause) -> tuple[Trial, Trial]:
    """One fan-out of three threads started by a barrier: (allotment, naive)."""
    parent = parent_with_sixty_left(name="parent")
    agents = [parent.allot(f"agent-{k}") for k in range(AGENTS)]
    admitted = [0] * AGENTS

    def budgeted(k: int, wait: Callable[[], None]) -> None:
        hold = reserve(agents[k])
        wait()  # the model call; refused agents wait too, so every call is in flight
        if hold is not None:
            charge(hold)
            admitted[k] = 1

    naive = Naive()

    def unguarded(k: int, wait: Callable[[], None]) -> None:
        passed = naive.check()
        wait()
        if passed:
            naive.record()

    _in_threads(budgeted, pause)
    _in_threads(unguarded, pause)
    return Trial(sum(admitted), spent_in_trial(parent)), naive.trial()


def thread_trials(
    trials: int = TRIALS, pause: Pause = "barrier"
) -> tuple[list[Trial], list[Trial]]:
    results = [thread_trial(pause) for _ in range(trials)]
    return [a for a, _ in results], [n for _, n in results]


# -- processes on one SQLite ledger ------------------------------------------------------------


def _agent_process(url: str, k: int, trials: int, sync: Any, naive: Any, out: str) -> None:
    """One sub-agent process: per trial, reopen the trial's parent by name, open its own
    child, and at the start signal reserve, wait for the others (the call), settle; then
    the naive control against a shared counter in nano-dollars."""
    start, in_flight = sync
    admitted = []
    for t in range(trials):
        parent = Budget(usd=CAP, name=f"trial-{t}", ledger=url)
        agent = parent.allot(f"agent-{k}")
        start.wait()
        hold = reserve(agent)
        in_flight.wait()
        if hold is not None:
            charge(hold)
        admitted.append(int(hold is not None))
        start.wait()
        spent = naive[t]
        passed = spent + int(ESTIMATE.scaleb(9)) <= int(CAP.scaleb(9))
        in_flight.wait()
        if passed:
            with naive.get_lock():
                naive[t] += int(COST.scaleb(9))
                naive[trials + t] += 1
    Path(out).write_text(json.dumps(admitted))


if __name__ == "__fanout_agent__":
    _agent_process(*globals()["AGENT_ARGS"])


def process_trials(tmp_path: Path, trials: int = TRIALS) -> tuple[list[Trial], list[Trial]]:
    """``trials`` fan-outs of three spawned processes sharing one SQLite ledger."""
    url = f"sqlite:///{tmp_path / 'fanout.db'}"
    ledger = SqliteLedger(url)
    try:
        parents = [parent_with_sixty_left(name=f"trial-{t}", ledger=ledger) for t in range(trials)]
        ctx = multiprocessing.get_context("spawn")
        sync = (ctx.Barrier(AGENTS), ctx.Barrier(AGENTS))
        naive = ctx.Array("q", [int(EARLIER.scaleb(9))] * trials + [0] * trials)
        outs = [tmp_path / f"agent-{k}.json" for k in range(AGENTS)]
        procs = [
            ctx.Process(
                target=runpy.run_path,
                args=(__file__,),
                kwargs={
                    "init_globals": {"AGENT_ARGS": (url, k, trials, sync, naive, str(outs[k]))},
                    "run_name": "__fanout_agent__",
                },
            )
            for k in range(AGENTS)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * AGENTS
        admitted = [json.loads(o.read_text()) for o in outs]
        budgeted = [
            Trial(sum(a[t] for a in admitted), spent_in_trial(parents[t])) for t in range(trials)
        ]
        unguarded = [
            Trial(naive[trials + t], Decimal(naive[t]).scaleb(-9) - EARLIER) for t in range(trials)
        ]
        return budgeted, unguarded
    finally:
        ledger.close()


# -- the tests ---------------------------------------------------------------------------------


def assert_allotment_held(trials: list[Trial]) -> None:
    assert len(trials) == TRIALS
    assert [t.admitted for t in trials] == [1] * TRIALS
    assert [t.spent for t in trials] == [COST] * TRIALS
    assert not any(t.overshoot for t in trials)


def assert_naive_overshot(trials: list[Trial]) -> None:
    assert [t.admitted for t in trials] == [AGENTS] * TRIALS
    assert [t.spent for t in trials] == [Decimal("0.00069")] * TRIALS
    assert all(t.overshoot for t in trials)


async def test_asyncio_fanout_admits_exactly_one_and_the_naive_check_overshoots() -> None:
    """Under asyncio, in 30 of 30 trials allotment admits exactly one call and spends
    $0.00023 of the $0.00060 left, while the naive check-then-record control admits all
    three and spends $0.00069: the race is real, and the hold closes it."""
    budgeted, naive = await asyncio_trials()
    assert_allotment_held(budgeted)
    assert_naive_overshot(naive)


def test_threaded_fanout_admits_exactly_one_and_the_naive_check_overshoots() -> None:
    """Under threads released together, with every call in flight at once, allotment
    admits exactly one call in 30 of 30 trials; the naive control overshoots in each."""
    budgeted, naive = thread_trials(pause="barrier")
    assert_allotment_held(budgeted)
    assert_naive_overshot(naive)


def test_threaded_fanout_never_overshoots_when_calls_return_early() -> None:
    """With only ``time.sleep(0)`` for the call, a sub-agent may finish before another
    reserves, and then the second call fits in what is left; allotment still never
    spends more than is left."""
    budgeted, _ = thread_trials(pause="sleep")
    assert all(1 <= t.admitted <= 2 and not t.overshoot for t in budgeted)
    assert all(t.spent == COST * t.admitted for t in budgeted)


@pytest.mark.slow
def test_process_fanout_on_sqlite_admits_exactly_one_and_the_naive_check_overshoots(
    tmp_path: Path,
) -> None:
    """Three spawned processes sharing one SQLite ledger, each reopening the parent by
    name: exactly one call admitted and $0.00023 spent in 30 of 30 trials; the naive
    control on a shared counter overshoots in each."""
    budgeted, naive = process_trials(tmp_path)
    assert_allotment_held(budgeted)
    assert_naive_overshot(naive)
