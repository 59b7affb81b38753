"""Events: what the kernel tells audit sinks and exporters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from ._usage import Usage

EventKind = Literal[
    "open",
    "close",
    "reserve",
    "settle",
    "release",
    "refuse",
    "overrun",
    "charge",
    "expire",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """One thing that happened to a budget."""

    kind: EventKind
    """``open``/``close`` (a budget), ``reserve``/``settle``/``release``/``expire`` (a hold),
    ``refuse`` (a call or child refused), ``overrun`` (settled above its hold),
    ``charge`` (spend recorded without a hold)."""
    path: str
    """The budget's path, ``root/supervisor/researcher``."""
    at: float
    """When, in seconds since the epoch."""
    hold: str | None = None
    """The hold's id, for hold events."""
    model: str | None = None
    """The model or tool the call was for."""
    usage: Usage | None = None
    """Usage reserved (reserve), charged (settle, charge) or asked (refuse)."""
    usd: Decimal | None = None
    """Dollars reserved, charged or asked; ``None`` when unknown."""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific facts: the refusal's limit, an overrun's excess, returned escrow."""
