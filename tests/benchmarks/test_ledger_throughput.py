"""Ledger throughput: reserve+settle pairs per second on a child budget (two-node chain),
with 1, 8 and 32 concurrent clients, for the Redis, SQLite and memory ledgers side by side
in one run; latency per pair, median and p99. Clients are threads sharing one ledger
object (every backend), then processes with a ledger each (Redis and SQLite).

Prints numbers and asserts none. Run with
``uv run pytest tests/benchmarks --benchmarks -s -k ledger_throughput`` (or ``-k redis``).
Redis is a local ``redis-server`` started for the run, persistence off; SQLite is a WAL
file with ``synchronous=FULL``; both numbers include the client's Python overhead.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from allotment._ledger import Ledger, NodeSpec, NodeState
from allotment._memory import MemoryLedger
from allotment._redis import RedisLedger
from allotment._sqlite import SqliteLedger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
import redis_server
from redis_server import NOW, RedisServer

CLIENTS = (1, 8, 32)
SECONDS = 1.0
"""Wall time each (ledger, clients) configuration runs for."""
ESTIMATE = {"usd": 310_000, "llm_calls": 1, "input_tokens": 1_200, "output_tokens": 256}
ACTUAL = {"usd": 230_000, "llm_calls": 1, "input_tokens": 1_100, "output_tokens": 180}


Row = tuple[float, float, float, int]


def chain(ledger: Ledger) -> tuple[str, str]:
    """A fresh root with an escrowed child; the child's id, and a tag for hold ids."""
    tag = uuid.uuid4().hex[:8]
    opened = ledger.open(NodeSpec(f"bench-{tag}", None, {"usd": 10**15}), NOW)
    assert isinstance(opened, NodeState)
    leaf = ledger.open(NodeSpec("worker", opened.id, {"usd": 10**14}), NOW)
    assert isinstance(leaf, NodeState)
    return leaf.id, tag


def summary(latencies: list[float], elapsed: float) -> Row:
    """Pairs per second, median and p99 µs per pair, and pairs done."""
    every = sorted(latencies)
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))]
    return len(every) / elapsed, statistics.median(every) * 1e6, p99 * 1e6, len(every)


def in_processes(url: str, ledger: Ledger, clients: int) -> Row:
    """``clients`` spawned processes, each with its own ledger on ``url``."""
    node, tag = chain(ledger)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(
            target=redis_server.pairs_worker,
            args=(url, node, f"{tag}-{i}", SECONDS, barrier, out),
        )
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    latencies = [x for _ in procs for x in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    return summary(latencies, SECONDS)  # each client ran SECONDS from the barrier


def in_threads(ledger: Ledger, clients: int) -> Row:
    """``clients`` threads sharing ``ledger``."""
    node, tag = chain(ledger)
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def work(i: int) -> None:
        mine = latencies[i]
        barrier.wait()
        end = time.perf_counter() + SECONDS
        k = 0
        while True:
            start = time.perf_counter()
            if start >= end:
                return
            hold = f"{tag}-{i}-{k}"
            assert ledger.reserve(node, hold, ESTIMATE, NOW, 600.0) is None
            assert ledger.settle(hold, ACTUAL, NOW).status == "settled"
            mine.append(time.perf_counter() - start)
            k += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return summary([x for mine in latencies for x in mine], elapsed)


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[dict[str, tuple[Callable[[], Ledger], str | None]]]:
    """By name (redis when redis-server exists, sqlite, memory): a ledger factory, and
    the URL other processes open it by (None for memory)."""
    opened: list[SqliteLedger | RedisLedger] = []
    server: RedisServer | None = None
    sqlite_url = f"sqlite:///{tmp_path / 'bench.db'}"

    def sqlite() -> Ledger:
        led = SqliteLedger(sqlite_url)
        opened.append(led)
        return led

    def redis() -> Ledger:
        assert server is not None
        led = RedisLedger(server.url(prefix="bench:"))
        opened.append(led)
        return led

    makers: dict[str, tuple[Callable[[], Ledger], str | None]] = {
        "sqlite": (sqlite, sqlite_url),
        "memory": (MemoryLedger, None),
    }
    if redis_server.BINARY is None:
        print(f"\nno Redis numbers: {redis_server.MISSING}")
    else:
        server = RedisServer(tmp_path / "redis").start()
        makers = {"redis": (redis, server.url(prefix="bench:")), **makers}
    try:
        yield makers
    finally:
        for led in opened:
            led.close()
        if server is not None:
            server.stop()


def test_ledger_throughput_redis_sqlite_memory(
    ledgers: dict[str, tuple[Callable[[], Ledger], str | None]],
) -> None:
    """Reserve+settle pairs per second and per-pair latency, for each ledger, client count
    and kind of client (prints a table; asserts nothing)."""
    rows = []
    for name, (make, url) in ledgers.items():
        ledger = make()
        for clients in CLIENTS:
            rows.append((name, "threads", clients, *in_threads(ledger, clients)))
        if url is not None:
            for clients in CLIENTS:
                rows.append((name, "processes", clients, *in_processes(url, ledger, clients)))
    print(f"\nreserve+settle pairs on a two-node chain, {SECONDS:g} s per row")
    print(f"{'ledger':<8}{'clients':>14}{'pairs/s':>10}{'median µs':>12}{'p99 µs':>14}{'pairs':>9}")
    for name, kind, clients, rate, median, p99, pairs in rows:
        print(
            f"{name:<8}{clients:>4} {kind:<9}{rate:>10,.0f}{median:>12,.1f}{p99:>14,.1f}{pairs:>9,}"
        )
