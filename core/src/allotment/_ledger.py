"""The ledger interface and the accounting every backend shares.

A ledger stores budget nodes and holds in integer units (nano-dollars, tokens, calls)
keyed by dimension name (``usd``, ``input_tokens``, ``llm_calls``, ``tool:search``...).
Each operation below acts on a node's whole ancestor chain and must be atomic; a
backend that keeps state remotely (Redis) does each in one round trip.

Accounting, per node and dimension:

- ``spent``: settled usage of the node's subtree.
- ``held``: open holds in the subtree.
- ``committed``: what counts against the node's limit: its own and unescrowed
  descendants' spent and held, plus for each open escrowed child the larger of that
  child's limit and its own committed. ``committed - spent - held`` is the unspent
  escrow of open children.

A charge of ``x`` on dimension ``d`` at a node adds ``x`` to its committed; on the way up,
an open child that caps ``d`` passes on only ``max(L, new) - max(L, old)``, which is zero
while it stays within its escrow. So a child's calls need only its own limit, and the
parent's money was taken once, when the child was opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ._limits import period_start

RefusalKind = Literal["limit", "rate", "deadline", "closed"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a ledger refused a reservation. Nothing was changed."""

    kind: RefusalKind
    node: str
    path: str
    dim: str
    limit: int | None = None
    spent: int | None = None
    held: int | None = None
    asked: int | None = None
    retry_after: float | None = None
    """For rate refusals: seconds until the call would fit; ``None`` if it never can."""


@dataclass(frozen=True, slots=True)
class Settled:
    """Outcome of a settle."""

    status: Literal["settled", "unknown", "ended"]
    node: str | None = None
    overrun: Mapping[str, int] = field(default_factory=dict)
    """Dimensions where the actual usage exceeded the hold, and by how much."""


@dataclass(frozen=True, slots=True)
class NodeState:
    """A read-only snapshot of a budget node."""

    id: str
    name: str
    path: str
    parent: str | None
    limits: Mapping[str, int]
    spent: Mapping[str, int]
    held: Mapping[str, int]
    committed: Mapping[str, int]
    rates: tuple[tuple[str, int, float], ...]
    deadline: float | None
    period: str | None
    period_start: float | None
    closed: bool
    refusals: int
    open_holds: int
    created_at: float
    closed_at: float | None
    children: tuple[str, ...]
    meta: Mapping[str, Any]

    def available(self, dim: str) -> int | None:
        """What the node's own limit leaves on ``dim``; ``None`` when it does not cap it."""
        limit = self.limits.get(dim)
        return None if limit is None else max(0, limit - self.committed.get(dim, 0))

    def allotted(self, dim: str) -> int:
        """Unspent escrow of open children on ``dim``."""
        return self.committed.get(dim, 0) - self.spent.get(dim, 0) - self.held.get(dim, 0)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What a ledger needs to open a node."""

    name: str
    parent: str | None
    limits: Mapping[str, int]
    rates: tuple[tuple[str, int, float], ...] = ()
    deadline: float | None = None
    period: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


class Ledger(Protocol):
    """Storage of budget nodes and holds. Every method is atomic across the ancestor chain."""

    url: str

    def open(self, spec: NodeSpec, now: float) -> NodeState | Refusal:
        """Open a node. A root (``parent is None``) is found by name or created, and its
        limits set to ``spec.limits``. A child gets a fresh id and its limits are taken
        from its ancestors as escrow; a Refusal if they do not fit."""

    def reserve(
        self, node: str, hold: str, amounts: Mapping[str, int], now: float, ttl: float | None
    ) -> Refusal | None:
        """Hold ``amounts`` on the node and every ancestor, or refuse and change nothing."""

    def settle(self, hold: str, amounts: Mapping[str, int], now: float) -> Settled:
        """End a hold, charging ``amounts`` (which may exceed it). Idempotent."""

    def release(self, hold: str, now: float) -> bool:
        """End a hold, charging nothing. False if it had already ended. Idempotent."""

    def charge(self, node: str, amounts: Mapping[str, int], now: float) -> None:
        """Record spend that had no hold (advisory seams). Never refused."""

    def close(self, node: str, now: float) -> list[str]:
        """Close the node and its open descendants; unspent escrow returns to the parent.
        Returns the ids closed (deepest first); empty if it was already closed."""

    def state(self, node: str) -> NodeState:
        """Snapshot of one node (``KeyError`` if unknown)."""

    def tree(self, root: str) -> list[NodeState]:
        """Snapshots of a node and all its descendants, parents before children."""

    def roots(self) -> list[NodeState]:
        """Snapshots of every root node."""

    def expire(self, now: float) -> list[str]:
        """End every hold whose owner let its ttl pass; returns their ids."""


# -- the shared accounting, over mutable records -----------------------------------------


@dataclass(slots=True)
class NodeRecord:
    """A node as a backend keeps it while an operation runs."""

    id: str
    name: str
    path: str
    parent: str | None
    limits: dict[str, int]
    rates: list[tuple[str, int, float]]
    deadline: float | None
    period: str | None
    period_start: float | None
    created_at: float
    spent: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    closed_at: float | None = None
    refusals: int = 0
    open_holds: int = 0
    children: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rate_log: list[list[Any]] = field(default_factory=list)
    """``[time, hold id, {dim: amount}]`` for each admitted call inside the longest window."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Spent per past period: ``{"start": ..., "spent": {...}}``."""
    carried: dict[str, int] = field(default_factory=dict)
    """For an open escrowed child of a periodic root: its spent at the root's last period
    boundary, which that root's earlier periods have already accounted for."""

    def snapshot(self) -> NodeState:
        return NodeState(
            id=self.id,
            name=self.name,
            path=self.path,
            parent=self.parent,
            limits=dict(self.limits),
            spent=dict(self.spent),
            held=dict(self.held),
            committed=dict(self.committed),
            rates=tuple(self.rates),
            deadline=self.deadline,
            period=self.period,
            period_start=self.period_start,
            closed=self.closed,
            refusals=self.refusals,
            open_holds=self.open_holds,
            created_at=self.created_at,
            closed_at=self.closed_at,
            children=tuple(self.children),
            meta=dict(self.meta),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "path": self.path,
            "parent": self.parent,
            "limits": self.limits,
            "rates": self.rates,
            "deadline": self.deadline,
            "period": self.period,
            "period_start": self.period_start,
            "created_at": self.created_at,
            "spent": self.spent,
            "held": self.held,
            "committed": self.committed,
            "closed": self.closed,
            "closed_at": self.closed_at,
            "refusals": self.refusals,
            "open_holds": self.open_holds,
            "children": self.children,
            "meta": self.meta,
            "rate_log": self.rate_log,
            "history": self.history,
            "carried": self.carried,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeRecord:
        rec = cls(**data)
        rec.rates = [(str(d), int(lim), float(w)) for d, lim, w in rec.rates]
        return rec


@dataclass(slots=True)
class HoldRecord:
    """An open hold."""

    id: str
    node: str
    amounts: dict[str, int]
    created_at: float
    expires_at: float | None


Chain = Sequence[NodeRecord]
"""A node and its ancestors, the node first."""


def check_chain(chain: Chain, now: float) -> Refusal | None:
    """Refuse if any node on the chain is closed or past its deadline."""
    for m in chain:
        if m.closed:
            return Refusal("closed", m.id, m.path, "closed")
        if m.deadline is not None and now >= m.deadline:
            return Refusal("deadline", m.id, m.path, "deadline")
    return None


def plan(
    chain: Chain, amounts: Mapping[str, int], *, check: bool
) -> tuple[list[tuple[NodeRecord, str, int]], Refusal | None]:
    """New committed values for adding ``amounts`` at ``chain[0]`` (escrow rule applied).

    With ``check``, the first increase past a limit gives a Refusal and no changes.
    """
    changes: list[tuple[NodeRecord, str, int]] = []
    append = changes.append
    for dim, asked in amounts.items():
        delta = asked
        for m in chain:
            old = m.committed.get(dim, 0)
            new = old + delta
            limit = m.limits.get(dim)
            if limit is None:
                append((m, dim, new))
                continue
            if check and delta > 0 and new > limit:
                spent = m.spent.get(dim, 0)
                return [], Refusal(
                    "limit",
                    m.id,
                    m.path,
                    dim,
                    limit=limit,
                    spent=spent,
                    held=old - spent,
                    asked=asked,
                )
            append((m, dim, new))
            if m.parent is not None and not m.closed:
                # An open child that caps this dimension passes on only what leaves its
                # escrow; within the escrow its ancestors already set the money aside.
                delta = max(limit, new) - max(limit, old)
                if not delta:
                    break
    return changes, None


def apply(changes: Iterable[tuple[NodeRecord, str, int]]) -> None:
    for m, dim, new in changes:
        m.committed[dim] = new


def add(target: dict[str, int], amounts: Mapping[str, int], sign: int = 1) -> None:
    get = target.get
    for dim, x in amounts.items():
        value = get(dim, 0) + sign * x
        if value:
            target[dim] = value
        else:
            target.pop(dim, None)


def check_rates(chain: Chain, amounts: Mapping[str, int], now: float) -> Refusal | None:
    """Refuse if ``amounts`` does not fit a rate window of any node on the chain."""
    for m in chain:
        if not m.rates:
            continue
        longest = max(w for _, _, w in m.rates)
        m.rate_log[:] = [e for e in m.rate_log if e[0] > now - longest]
        for dim, limit, window in m.rates:
            asked = amounts.get(dim, 0)
            if not asked:
                continue
            inside = [e for e in m.rate_log if e[0] > now - window]
            used = sum(e[2].get(dim, 0) for e in inside)
            if used + asked <= limit:
                continue
            retry: float | None = None
            if asked <= limit:
                need = used + asked - limit
                for t, _, amt in inside:  # oldest first
                    need -= amt.get(dim, 0)
                    if need <= 0:
                        retry = max(0.0, t + window - now)
                        break
            return Refusal(
                "rate",
                m.id,
                m.path,
                f"{dim} per {window:g}s",
                limit=limit,
                spent=used,
                held=0,
                asked=asked,
                retry_after=retry,
            )
    return None


def relog_rates(chain: Chain, hold: str, amounts: Mapping[str, int] | None) -> None:
    """Replace a hold's rate entries with its actual usage (or drop them on release)."""
    for m in chain:
        if not m.rates:
            continue
        for i, entry in enumerate(m.rate_log):
            if entry[1] == hold:
                if amounts is None:
                    del m.rate_log[i]
                else:
                    entry[2] = dict(amounts)
                break


def do_reserve(chain: Chain, hold: HoldRecord, now: float) -> Refusal | None:
    """Reserve ``hold`` on ``chain``; on refusal count it on the refusing node."""
    refusal = check_chain(chain, now) or check_rates(chain, hold.amounts, now)
    changes: list[tuple[NodeRecord, str, int]] = []
    if refusal is None:
        changes, refusal = plan(chain, hold.amounts, check=True)
    if refusal is not None:
        chain[0].refusals += 1
        return refusal
    apply(changes)
    for m in chain:
        add(m.held, hold.amounts)
        m.open_holds += 1
        if m.rates:
            m.rate_log.append([now, hold.id, dict(hold.amounts)])
    return None


def do_end(chain: Chain, hold: HoldRecord, actual: Mapping[str, int] | None) -> dict[str, int]:
    """Settle (``actual``) or release (``None``) an open hold; returns the overrun."""
    charged = actual or {}
    held = hold.amounts
    delta = {d: x - held.get(d, 0) for d, x in charged.items()}
    for d, x in held.items():
        if d not in charged:
            delta[d] = -x
    changes, _ = plan(chain, {d: x for d, x in delta.items() if x}, check=False)
    apply(changes)
    for m in chain:
        add(m.held, held, -1)
        add(m.spent, charged)
        m.open_holds -= 1
        if m.rates:
            relog_rates((m,), hold.id, actual)
    return {d: x for d, x in delta.items() if x > 0 and d in held}


def do_charge(chain: Chain, amounts: Mapping[str, int]) -> None:
    changes, _ = plan(chain, amounts, check=False)
    apply(changes)
    for m in chain:
        add(m.spent, amounts)


def do_open_child(parent_chain: Chain, rec: NodeRecord, now: float) -> Refusal | None:
    """Escrow a new child's limits from its ancestors (``parent_chain[0]`` is the parent)."""
    refusal = check_chain(parent_chain, now)
    if refusal is not None:
        return refusal
    changes, refusal = plan(parent_chain, rec.limits, check=True)
    if refusal is not None:
        parent_chain[0].refusals += 1
        return refusal
    apply(changes)
    parent_chain[0].children.append(rec.id)
    return None


def do_close(rec: NodeRecord, parent_chain: Chain, now: float) -> None:
    """Close one node (its open descendants must be closed first): return unspent escrow."""
    if parent_chain:
        delta = {
            d: rec.committed.get(d, 0) - max(limit, rec.committed.get(d, 0)) - rec.carried.get(d, 0)
            for d, limit in rec.limits.items()
        }
        rec.carried = {}
        changes, _ = plan(parent_chain, {d: x for d, x in delta.items() if x}, check=False)
        apply(changes)
    rec.closed = True
    rec.closed_at = now


def roll_period(rec: NodeRecord, children: Sequence[NodeRecord], now: float) -> bool:
    """Start a new period on a periodic root if ``now`` is past its boundary."""
    if rec.period is None or rec.period_start is None:
        return False
    start = period_start(rec.period, now)
    if start <= rec.period_start:
        return False
    rec.history.append({"start": rec.period_start, "spent": dict(rec.spent)})
    del rec.history[:-400]
    # Spend inside open escrowed children stays inside their escrow until they close;
    # only what they spent since the last boundary is in ``rec.spent``.
    inside: dict[str, int] = {}
    for c in children:
        if not c.closed:
            for d in c.limits:
                x = c.spent.get(d, 0)
                inside[d] = inside.get(d, 0) + x - c.carried.get(d, 0)
                if x:
                    c.carried[d] = x
    for d, x in rec.spent.items():
        rec.committed[d] = rec.committed.get(d, 0) - (x - inside.get(d, 0))
    rec.spent = {}
    rec.period_start = start
    return True


def new_root(spec: NodeSpec, now: float) -> NodeRecord:
    return NodeRecord(
        id=spec.name,
        name=spec.name,
        path=spec.name,
        parent=None,
        limits=dict(spec.limits),
        rates=list(spec.rates),
        deadline=spec.deadline,
        period=spec.period,
        period_start=period_start(spec.period, now) if spec.period else None,
        created_at=now,
        meta=dict(spec.meta),
    )


def update_root(rec: NodeRecord, spec: NodeSpec, now: float) -> None:
    """Reopening a root by name: its owner's current configuration wins."""
    rec.limits = dict(spec.limits)
    rec.rates = list(spec.rates)
    rec.deadline = spec.deadline
    if spec.period != rec.period:
        rec.period = spec.period
        rec.period_start = period_start(spec.period, now) if spec.period else None
    rec.closed = False
    rec.closed_at = None
    rec.meta.update(spec.meta)


def new_child(spec: NodeSpec, parent: NodeRecord, taken: set[str] | Any, now: float) -> NodeRecord:
    path = f"{parent.path}/{spec.name}"
    node_id, n = path, 1
    while node_id in taken:
        n += 1
        node_id = f"{path}#{n}"
    return NodeRecord(
        id=node_id,
        name=spec.name,
        path=node_id,
        parent=parent.id,
        limits=dict(spec.limits),
        rates=list(spec.rates),
        deadline=spec.deadline,
        period=None,
        period_start=None,
        created_at=now,
        meta=dict(spec.meta),
    )
