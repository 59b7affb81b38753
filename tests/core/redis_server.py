"""A private ``redis-server`` for tests, and the worker processes the Redis tests spawn.

``RedisServer`` starts the real binary on a free loopback port with its own directory,
no persistence unless asked (``persistent=True``: append-only file fsynced on every
write, so data survives a crash), and can be killed and started again on the same port.
Worker functions live here, not in the test module, so spawned processes import only this
module and allotment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

BINARY = shutil.which("redis-server")
MISSING = (
    "redis-server is not on PATH, so the Redis ledger tests cannot run: install it "
    "(apt-get install redis-server, brew install redis) or let .ci/run do it"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        if BINARY is None:
            raise RuntimeError(MISSING)
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, prefix: str = "allotment:", **query: object) -> str:
        params = "&".join(f"{k}={v}" for k, v in {"prefix": prefix, **query}.items())
        return f"redis://{self.address}/0?{params}"

    def start(self) -> RedisServer:
        assert BINARY is not None
        args = [
            BINARY,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{log}")
            if self._answers():
                return self
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server on {self.address} did not answer within 10 s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGKILL (a crash: only what was fsynced survives) or SIGTERM."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(kill=True)


# -- workers, run in spawned processes ------------------------------------------------------

NOW = 1_767_225_600.0  # 2026-01-01T00:00Z, the ManualClock's default start


def fanout_worker(
    url: str, node: str, index: int, attempts: int, estimate: int, cost: int, barrier: Any
) -> None:
    """One process of the fan-out race: waits for every process, reserves ``attempts``
    holds of ``estimate`` on ``node`` as fast as it can, waits until every process has
    reserved, then settles each admitted hold at ``cost``. Exit code: 100 + holds admitted
    (an exception exits with 1)."""
    from allotment._redis import RedisLedger

    ledger = RedisLedger(url)
    try:
        admitted = []
        barrier.wait()
        for k in range(attempts):
            hold = f"p{index}-{k}"
            if ledger.reserve(node, hold, {"usd": estimate, "llm_calls": 1}, NOW, 600.0) is None:
                admitted.append(hold)
        barrier.wait()  # every reservation is in: the test reads the peak
        barrier.wait()
        for hold in admitted:
            settled = ledger.settle(hold, {"usd": cost, "llm_calls": 1}, NOW)
            assert settled.status == "settled", settled
    finally:
        ledger.close()
    os._exit(100 + len(admitted))


def holding_worker(url: str, token: str, key: bytes, hold: str, amount: int, ready: Any) -> None:
    """Redeems a capability token for a child budget, reserves ``amount`` on it with a
    30-second ttl, says so, and then hangs until it is killed."""
    from allotment._capability import redeem_token
    from allotment._redis import RedisLedger

    ledger = RedisLedger(url)
    node = redeem_token(token, key, ledger, now=NOW)
    refusal = ledger.reserve(node, hold, {"usd": amount}, NOW, 30.0)
    if refusal is not None:
        os._exit(3)
    ready.set()
    while True:
        time.sleep(60)


def pairs_worker(url: str, node: str, tag: str, seconds: float, barrier: Any, out: Any) -> None:
    """One benchmark client process: reserve+settle pairs on ``node`` for ``seconds``
    after every client is ready; puts the latency of each pair (seconds) on ``out``."""
    import time as clock

    from allotment._redis import RedisLedger
    from allotment._sqlite import SqliteLedger

    ledger = SqliteLedger(url) if url.startswith("sqlite:") else RedisLedger(url)
    estimate = {"usd": 310_000, "llm_calls": 1, "input_tokens": 1_200, "output_tokens": 256}
    actual = {"usd": 230_000, "llm_calls": 1, "input_tokens": 1_100, "output_tokens": 180}
    latencies = []
    ledger.state(node)  # connected before the clock starts
    barrier.wait()
    end = clock.perf_counter() + seconds
    k = 0
    while (start := clock.perf_counter()) < end:
        hold = f"{tag}-{k}"
        assert ledger.reserve(node, hold, estimate, NOW, 600.0) is None
        assert ledger.settle(hold, actual, NOW).status == "settled"
        latencies.append(clock.perf_counter() - start)
        k += 1
    out.put(latencies)
    ledger.close()
