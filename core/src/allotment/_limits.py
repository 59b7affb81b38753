"""What a budget may spend: limits, rate windows, periods and sub-agent spawns."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from ._errors import ConfigurationError, InvalidAmount
from ._money import to_count, to_decimal, to_nano

PeriodName = Literal["hour", "day", "week", "month"]

_WINDOWS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE_DIMENSIONS = (
    "llm_calls",
    "tool_calls",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "usd",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Rate:
    """A sliding rate window: at most ``limit`` of ``on`` per ``per`` seconds.

    A call that does not fit waits until it does, for at most ``max_wait`` seconds, then
    fails with ``RateWindowExceeded``; it never hangs.
    """

    limit: int | Decimal
    """How much of ``on`` the window admits (dollars for ``usd``, else a count)."""
    per: float = 60.0
    """Window length in seconds (``"minute"``, ``"hour"``, ``"day"`` accepted)."""
    on: str = "llm_calls"
    """What is counted: ``llm_calls``, ``tool_calls``, ``*_tokens`` or ``usd``."""
    max_wait: float | None = None
    """Longest a call waits for room in the window before failing; by default the
    window's length, at most a minute."""

    def __post_init__(self) -> None:
        per: Any = self.per
        if isinstance(per, str):
            if per not in _WINDOWS:
                raise InvalidAmount(f"rate window {per!r}: use one of {sorted(_WINDOWS)}")
            object.__setattr__(self, "per", _WINDOWS[per])
        elif (
            isinstance(per, bool)
            or not isinstance(per, (int, float))
            or not (math.isfinite(per) and per > 0)
        ):
            raise InvalidAmount(f"rate window must be a positive number of seconds, not {per!r}")
        if self.on not in _RATE_DIMENSIONS:
            raise InvalidAmount(f"rate on {self.on!r}: use one of {list(_RATE_DIMENSIONS)}")
        if self.on == "usd":
            object.__setattr__(self, "limit", to_decimal(self.limit, what="rate limit"))
        else:
            object.__setattr__(self, "limit", to_count(self.limit, what="rate limit"))
        if not self.limit:
            raise InvalidAmount(
                "a rate window admitting nothing is a stop, not a rate: use a limit of 0 "
                "calls (llm_calls=0) to forbid calls"
            )
        if self.max_wait is None:
            object.__setattr__(self, "max_wait", min(float(self.per), 60.0))
        elif not (isinstance(self.max_wait, (int, float)) and 0 <= self.max_wait < math.inf):
            raise InvalidAmount(f"max_wait must be finite seconds >= 0, not {self.max_wait!r}")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``"20/minute"``, ``"100000 total_tokens/hour"`` or ``"$1/day"``."""
        m = re.fullmatch(r"\s*(\$?[\d.]+)\s*([a-z_]*)\s*/\s*([a-z]+)\s*", text)
        if not m:
            raise InvalidAmount(f"cannot read rate {text!r}; write e.g. '20/minute'")
        amount, on, per = m.groups()
        if amount.startswith("$"):
            return cls(limit=to_decimal(amount[1:]), per=per, on="usd")  # type: ignore[arg-type]
        return cls(limit=int(amount), per=per, on=on or "llm_calls")  # type: ignore[arg-type]

    def ledger_amount(self) -> int:
        """The window's limit in ledger units."""
        return to_nano(self.limit) if isinstance(self.limit, Decimal) else int(self.limit)


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Limits of one budget. ``None`` means unlimited, never 0."""

    usd: Decimal | None = None
    """Dollars."""
    input_tokens: int | None = None
    """Input tokens, cache included."""
    output_tokens: int | None = None
    """Output tokens, reasoning included."""
    total_tokens: int | None = None
    """Input plus output tokens."""
    llm_calls: int | None = None
    """Model calls."""
    tool_calls: int | None = None
    """Tool calls, all tools together."""
    per_tool: Mapping[str, int] = field(default_factory=dict)
    """Tool calls per tool name."""
    deadline: float | None = None
    """Wall-clock deadline, seconds since the epoch."""
    rate: tuple[Rate, ...] = ()
    """Sliding rate windows."""
    period: PeriodName | None = None
    """For long-running services: spend resets at each UTC period boundary."""

    @classmethod
    def build(
        cls,
        *,
        usd: object = None,
        input_tokens: object = None,
        output_tokens: object = None,
        total_tokens: object = None,
        llm_calls: object = None,
        tool_calls: object = None,
        per_tool: Mapping[str, object] | None = None,
        deadline: object = None,
        rate: object = None,
        period: object = None,
        now: float,
    ) -> Limits:
        """Validate user input into Limits; raises ``InvalidAmount`` and changes nothing."""

        def count(v: object, what: str) -> int | None:
            return None if v is None else to_count(v, what=what)

        return cls(
            usd=None if usd is None else to_decimal(usd, what="usd"),
            input_tokens=count(input_tokens, "input_tokens"),
            output_tokens=count(output_tokens, "output_tokens"),
            total_tokens=count(total_tokens, "total_tokens"),
            llm_calls=count(llm_calls, "llm_calls"),
            tool_calls=count(tool_calls, "tool_calls"),
            per_tool={
                str(k): to_count(v, what=f"tool_calls for {k!r}")
                for k, v in (per_tool or {}).items()
            },
            deadline=_deadline(deadline, now),
            rate=_rates(rate),
            period=_period(period),
        )

    @classmethod
    def of(cls, value: object, *, now: float) -> Limits:
        """Limits from a short form: a Limits, a dollar amount (``"0.10"``), or a mapping
        of keyword limits (``{"usd": "0.10", "llm_calls": 5}``)."""
        if isinstance(value, Limits):
            return value
        if isinstance(value, Mapping):
            allowed = {
                "usd",
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "llm_calls",
                "tool_calls",
                "per_tool",
                "deadline",
                "rate",
            }
            unknown = sorted(str(k) for k in value if k not in allowed)
            if unknown:
                raise ConfigurationError(
                    f"unknown limit {', '.join(map(repr, unknown))}; use {sorted(allowed)}"
                )
            return cls.build(**{str(k): v for k, v in value.items()}, now=now)
        return cls.build(usd=value, now=now)

    def amounts(self) -> dict[str, int]:
        """The capped dimensions in ledger units (usd in nano-dollars)."""
        out: dict[str, int] = {}
        if self.usd is not None:
            out["usd"] = to_nano(self.usd)
        for name in ("input_tokens", "output_tokens", "total_tokens", "llm_calls", "tool_calls"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for tool, value in self.per_tool.items():
            out[f"tool:{tool}"] = value
        return out

    @property
    def unlimited(self) -> bool:
        """True when nothing is capped."""
        return not self.amounts() and self.deadline is None and not self.rate


def _deadline(value: object, now: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise InvalidAmount("deadline datetime must be timezone-aware")
        return value.timestamp()
    if isinstance(value, dt.timedelta):
        return now + value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        # Small numbers are durations ("60 seconds from now"), large ones timestamps.
        return float(value) if value > 1e9 else now + float(value)
    raise InvalidAmount(f"deadline must be a datetime, timedelta or seconds, not {value!r}")


def _rates(value: object) -> tuple[Rate, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, Rate):
            out.append(item)
        elif isinstance(item, str):
            out.append(Rate.parse(item))
        else:
            raise InvalidAmount(f"rate must be a Rate or a string like '20/minute', not {item!r}")
    return tuple(out)


def _period(value: object) -> PeriodName | None:
    if value is None:
        return None
    if value in ("hour", "day", "week", "month"):
        return value  # type: ignore[return-value,unused-ignore]
    raise InvalidAmount(f"period must be 'hour', 'day', 'week' or 'month', not {value!r}")


def period_start(period: str, now: float) -> float:
    """Start (epoch seconds, UTC) of the period containing ``now``."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "week":
        start = (t - dt.timedelta(days=t.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise InvalidAmount(f"unknown period {period!r}")
    return start.timestamp()


@dataclass(frozen=True, kw_only=True, slots=True)
class Spawn:
    """A sub-agent an integration detected, passed to the child-limits hook."""

    name: str
    """The sub-agent's name (agent name, tool name, coworker role)."""
    how: str
    """How it was spawned: ``agent_tool``, ``subgraph``, ``delegation``, ``handoff``,
    ``metadata``."""
    framework: str
    """``langchain``, ``llamaindex``, ``autogen`` or ``crewai``."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Framework details an advanced policy may use."""
