"""Reports: a budget tree as values, as text, and as a rich table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._ledger import NodeState
from ._money import fmt_usd, from_nano


def _usage(amounts: Mapping[str, int]) -> Any:
    from ._budget import usage_of

    return usage_of(amounts)


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """One budget in a report, with its children."""

    name: str
    path: str
    closed: bool
    limits: Mapping[str, Any]
    """Own limits, dollars as Decimal (ancestors' limits apply too)."""
    spent: Any
    """``Usage`` settled in this subtree."""
    held: Any
    """``Usage`` reserved by open holds in this subtree."""
    allotted_usd: Decimal
    """Dollars escrowed to open children and not yet spent by them."""
    refusals: int
    """Calls or children refused at this budget."""
    open_holds: int
    estimated_calls: int
    """Settled calls whose usage was our estimate (the provider reported none)."""
    unpriced_calls: int
    """Settled calls whose cost is unknown (no price for the model)."""
    children: tuple[Report, ...] = ()

    def walk(self) -> Iterator[tuple[int, Report]]:
        """Every report in the tree with its depth, parents first."""
        stack: list[tuple[int, Report]] = [(0, self)]
        while stack:
            depth, node = stack.pop()
            yield depth, node
            stack.extend((depth + 1, c) for c in reversed(node.children))

    def find(self, name: str) -> Report:
        """The first report in the tree whose name or path is ``name``."""
        for _, node in self.walk():
            if name in (node.name, node.path):
                return node
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""

        def money(v: Decimal | None) -> str | None:
            return None if v is None else str(v)

        return {
            "name": self.name,
            "path": self.path,
            "closed": self.closed,
            "limits": {k: str(v) if isinstance(v, Decimal) else v for k, v in self.limits.items()},
            "spent": _usage_dict(self.spent),
            "held": _usage_dict(self.held),
            "allotted_usd": money(self.allotted_usd),
            "refusals": self.refusals,
            "open_holds": self.open_holds,
            "estimated_calls": self.estimated_calls,
            "unpriced_calls": self.unpriced_calls,
            "children": [c.to_dict() for c in self.children],
        }

    def __str__(self) -> str:
        lines = []
        for depth, r in self.walk():
            cap = fmt_usd(r.limits.get("usd")) if "usd" in r.limits else "-"
            lines.append(
                f"{'  ' * depth}{r.name}: spent {_spent_usd(r)} of {cap}, "
                f"{r.spent.llm_calls} llm calls, {r.spent.tool_calls} tool calls, "
                f"{r.spent.total_tokens} tokens, held {fmt_usd(r.held.usd)}, "
                f"refusals {r.refusals}{' (closed)' if r.closed else ''}"
            )
        return "\n".join(lines)


def _usage_dict(u: Any) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_tokens": u.cache_read_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "llm_calls": u.llm_calls,
        "tool_calls": u.tool_calls,
        "tools": dict(u.tools),
        "usd": None if u.usd is None else str(u.usd),
        "estimated": u.estimated,
    }


def _spent_usd(r: Report, *, short: bool = False) -> str:
    text = (_short_usd if short else fmt_usd)(r.spent.usd)
    if r.spent.usd is None:
        text = f"unknown ({r.unpriced_calls} unpriced)"
    elif r.estimated_calls:
        text += f" ({r.estimated_calls} est.)" if short else f" ({r.estimated_calls} estimated)"
    return text


def _short_usd(value: Decimal | None) -> str:
    """Dollars to four significant digits for tables (reports and JSON stay exact)."""
    if value is None or value == 0:
        return fmt_usd(value)
    digits = max(2, 4 - value.adjusted() - 1)
    rounded = value.quantize(Decimal(1).scaleb(-digits))
    return fmt_usd(rounded)


def build_report(states: Sequence[NodeState]) -> Report:
    """Assemble a report tree from ledger snapshots (parents before children)."""
    by_id = {s.id: s for s in states}

    def build(s: NodeState) -> Report:
        limits: dict[str, Any] = {}
        for dim, value in s.limits.items():
            limits[dim] = from_nano(value) if dim == "usd" else value
        return Report(
            name=s.name,
            path=s.path,
            closed=s.closed,
            limits=limits,
            spent=_usage({k: v for k, v in s.spent.items()}),
            held=_usage({k: v for k, v in s.held.items() if k != "unpriced_calls"}),
            allotted_usd=from_nano(max(0, s.allotted("usd"))),
            refusals=s.refusals,
            open_holds=s.open_holds,
            estimated_calls=s.spent.get("estimated_calls", 0),
            unpriced_calls=s.spent.get("unpriced_calls", 0),
            children=tuple(build(by_id[c]) for c in s.children if c in by_id),
        )

    return build(states[0])


def render(report: Report, title: str | None = None) -> Any:
    """A rich Table of the tree (needs the ``cli`` extra), compact enough for 80 columns."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("budget", no_wrap=True)
    for col in ("limit", "spent", "llm", "tools", "in/out", "refusals"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for depth, r in report.walk():
        table.add_row(
            ("  " * depth) + r.name,
            _limit_text(r.limits),
            _spent_usd(r, short=True),
            str(r.spent.llm_calls),
            str(r.spent.tool_calls),
            f"{r.spent.input_tokens}/{r.spent.output_tokens}",
            f"[red]{r.refusals}[/red]" if r.refusals else "0",
            _state_text(r),
        )
    return table


def _limit_text(limits: Mapping[str, Any]) -> str:
    if not limits:
        return "-"
    parts = [_short_usd(limits["usd"])] if "usd" in limits else []
    short = {"llm_calls": "calls", "tool_calls": "tools", "total_tokens": "tok"}
    parts += [f"{v} {short.get(k, k)}" for k, v in limits.items() if k != "usd"]
    return parts[0] + (f" +{len(parts) - 1}" if len(parts) > 1 else "")


def _state_text(r: Report) -> str:
    state = "closed" if r.closed else "open"
    if r.open_holds:
        state += f", {r.open_holds} held {_short_usd(r.held.usd)}"
    if r.allotted_usd:
        state += f", {_short_usd(r.allotted_usd)} escrow"
    return state
