"""Kernel throughput: reserve+settle pairs per second, against a lock-protected counter.

Prints numbers and asserts none. Run with
``uv run pytest tests/benchmarks --benchmarks -s -k kernel_throughput``.

Targets, for reference: at most 5 µs per in-memory pair and at most 3x the plain counter.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import runpy
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from allotment import Budget, Call, Usage
from allotment._ledger import NodeSpec
from allotment._memory import MemoryLedger

TARGET_US = 5.0
TARGET_RATIO = 3.0
PAIRS = 20_000
REPEATS = 5

BOUND = Usage(usd=Decimal("0.00031"), llm_calls=1, input_tokens=1_200, output_tokens=256)
ACTUAL = Usage(usd=Decimal("0.00023"), llm_calls=1, input_tokens=1_100, output_tokens=180)
CALL = Call(
    model="gpt-4o-mini",
    messages=[
        {"role": "system", "content": "You are a careful research assistant."},
        {"role": "user", "content": "Summarise the three findings below in one paragraph."},
    ],
    max_output_tokens=256,
)
CALL_USAGE = Usage(input_tokens=40, output_tokens=180, llm_calls=1)


class LockedCounter:
    """The baseline: the same check-and-add on integer nano-dollars under one lock."""

    def __init__(self, cap: int) -> None:
        self.cap, self.spent, self.held = cap, 0, 0
        self._lock = threading.Lock()

    def reserve(self, amount: int) -> bool:
        with self._lock:
            if self.spent + self.held + amount > self.cap:
                return False
            self.held += amount
            return True

    def settle(self, amount: int, actual: int) -> None:
        with self._lock:
            self.held -= amount
            self.spent += actual


def best_us_per_pair(pair: Callable[[], None], n: int = PAIRS) -> float:
    """The fastest of REPEATS runs of ``n`` pairs, in µs per pair."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(n):
            pair()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def big_budget(**kw: Any) -> Budget:
    return Budget(usd=900_000_000, name="bench", **kw)


def leaf_of(root: Budget, depth: int, *, escrow: bool) -> Budget:
    node = root
    for i, name in enumerate("abcdefgh"[:depth]):
        usd = 800_000_000 - i * 1_000_000 if escrow else None
        node = node.allot(name, usd=usd)
    return node


def memory_rows() -> list[tuple[str, float]]:
    counter = LockedCounter(10**18)
    bound_nano, actual_nano = 310_000, 230_000

    def counter_pair() -> None:
        if counter.reserve(bound_nano):
            counter.settle(bound_nano, actual_nano)

    rows = [("lock-protected counter (baseline)", best_us_per_pair(counter_pair))]

    ledger = MemoryLedger()
    ledger.open(NodeSpec("bench", None, {"usd": 10**18}), 0.0)
    held = {"usd": 310_000, "llm_calls": 1, "input_tokens": 1_200, "output_tokens": 256}
    used = {"usd": 230_000, "llm_calls": 1, "input_tokens": 1_100, "output_tokens": 180}
    ids = itertools.count()

    def ledger_pair() -> None:
        hold = f"h{next(ids)}"
        ledger.reserve("bench", hold, held, 0.0, None)
        ledger.settle(hold, used, 0.0)

    rows.append(
        ("MemoryLedger.reserve + settle alone (no Budget, Hold)", best_us_per_pair(ledger_pair))
    )

    root = big_budget()
    rows.append(("hold(Usage) + settle, root", best_us_per_pair(lambda: _pair(root))))

    def fresh_usage_pair() -> None:
        h = root.hold(Usage(usd=Decimal("0.00031"), llm_calls=1, input_tokens=1_200))
        h.settle(Usage(usd=Decimal("0.00023"), llm_calls=1, input_tokens=1_100))

    rows.append(("hold + settle, new Usage objects each call", best_us_per_pair(fresh_usage_pair)))

    def call_pair() -> None:
        root.reserve(CALL).settle(CALL_USAGE)

    rows.append(("reserve(Call) + settle: estimate + price", best_us_per_pair(call_pair, 5_000)))

    for escrow in (True, False):
        tree = big_budget()
        leaf = leaf_of(tree, 5, escrow=escrow)
        label = f"hold + settle on {leaf.path} ({'escrowed' if escrow else 'no own limits'})"
        rows.append((label, best_us_per_pair(functools.partial(_pair, leaf))))
    return rows


def _pair(budget: Budget) -> None:
    budget.hold(BOUND).settle(ACTUAL)


def test_memory_pairs_per_second_against_a_locked_counter() -> None:
    """Prints µs per reserve+settle pair on the memory ledger (root, full Call path, leaf
    at depth 5) and the ratio to a lock-protected counter measured in the same run."""
    rows = memory_rows()
    base = rows[0][1]
    print()
    print(f"memory ledger, best of {REPEATS} runs ({PAIRS} pairs; 5000 for reserve(Call))")
    print(f"{'path':<62} {'µs/pair':>8} {'pairs/s':>10} {'x counter':>10}  targets")
    for label, us in rows:
        ratio = us / base
        if label.startswith("lock-protected"):
            verdict = ""
        else:
            verdict = (
                f"{'met' if us <= TARGET_US else 'missed'} ≤{TARGET_US:g}µs, "
                f"{'met' if ratio <= TARGET_RATIO else 'missed'} ≤{TARGET_RATIO:g}x"
            )
        print(f"{label:<62} {us:>8.2f} {1e6 / us:>10,.0f} {ratio:>10.1f}  {verdict}")


# -- SQLite, one and four processes --------------------------------------------------------

SQLITE_PAIRS = 400


def _sqlite_worker(url: str, start: Any, out: str) -> None:
    budget = Budget(usd=900_000_000, name="bench", ledger=url)
    budget.hold(BOUND).settle(ACTUAL)  # connection and schema outside the timing
    start.wait()
    t0 = time.perf_counter()
    for _ in range(SQLITE_PAIRS):
        budget.hold(BOUND).settle(ACTUAL)
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - t0}))


if __name__ == "__throughput_worker__":
    _sqlite_worker(*globals()["WORKER_ARGS"])


def sqlite_run(tmp_path: Path, processes: int) -> tuple[float, list[float]]:
    """Aggregate pairs/s of ``processes`` spawned processes started together on one file,
    and each one's own pairs/s."""
    url = f"sqlite:///{tmp_path / f'bench-{processes}.db'}"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    outs = [tmp_path / f"p{processes}-{i}.json" for i in range(processes)]
    procs = [
        ctx.Process(
            target=runpy.run_path,
            args=(__file__,),
            kwargs={
                "init_globals": {"WORKER_ARGS": (url, start, str(outs[i]))},
                "run_name": "__throughput_worker__",
            },
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * processes  # the run itself, not a timing
    seconds = [json.loads(o.read_text())["seconds"] for o in outs]
    return processes * SQLITE_PAIRS / max(seconds), [SQLITE_PAIRS / s for s in seconds]


def test_sqlite_pairs_per_second_with_one_and_four_processes(tmp_path: Path) -> None:
    """Prints reserve+settle pairs/s on one SQLite file (WAL, synchronous=FULL) for one
    process and for four processes sharing the file."""
    print()
    print(f"sqlite ledger, {SQLITE_PAIRS} pairs per process, one shared root")
    print(
        f"{'processes':>9} {'total pairs/s':>14} {'ms/pair (agg)':>14} {'per process pairs/s':>22}"
    )
    for n in (1, 4):
        total, each = sqlite_run(tmp_path, n)
        per = ", ".join(f"{x:,.0f}" for x in each)
        print(f"{n:>9} {total:>14,.0f} {1e3 / total:>14.3f} {per:>22}")
