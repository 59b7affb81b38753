"""Time, injectable so tests can simulate minutes of rate windows in milliseconds."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Where a budget reads the time and waits."""

    def now(self) -> float:
        """Seconds since the epoch."""

    def sleep(self, seconds: float) -> None:
        """Block this thread for ``seconds``."""

    async def asleep(self, seconds: float) -> None:
        """Suspend this task for ``seconds``."""


class SystemClock:
    """Wall-clock time."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to, or when someone waits on it.

    Waiting advances the clock instantly, so a test of a 20-calls-per-minute window over
    16 simulated minutes runs in milliseconds.
    """

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00Z
        self._now = start
        self._lock = threading.Lock()
        self.slept = 0.0
        """Total seconds waited on this clock."""

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            self.slept += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)
