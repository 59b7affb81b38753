"""``memory://``: the default ledger, one process, safe under threads and asyncio."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from ._errors import LedgerError
from ._ledger import (
    HoldRecord,
    NodeRecord,
    NodeSpec,
    NodeState,
    Refusal,
    Settled,
    do_charge,
    do_close,
    do_end,
    do_open_child,
    do_reserve,
    new_child,
    new_root,
    roll_period,
    update_root,
)


class MemoryLedger:
    """Ledger in this process's memory. Every operation runs under one lock and never
    blocks inside it, so it is safe from threads and from asyncio tasks alike."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeRecord] = {}
        self._holds: dict[str, HoldRecord] = {}

    def _chain(self, node: str) -> list[NodeRecord]:
        chain = []
        rec: NodeRecord | None = self._nodes[node]
        while rec is not None:
            chain.append(rec)
            rec = self._nodes[rec.parent] if rec.parent is not None else None
        return chain

    def _roll(self, chain: list[NodeRecord], now: float) -> None:
        root = chain[-1]
        if root.period is not None:
            roll_period(root, [self._nodes[c] for c in root.children], now)

    def open(self, spec: NodeSpec, now: float) -> NodeState | Refusal:
        with self._lock:
            if spec.parent is None:
                rec = self._nodes.get(spec.name)
                if rec is None:
                    rec = self._nodes[spec.name] = new_root(spec, now)
                elif rec.parent is not None:
                    raise LedgerError(f"{spec.name!r} names a child budget, not a root")
                else:
                    update_root(rec, spec, now)
                return rec.snapshot()
            parent_chain = self._chain(spec.parent)
            self._roll(parent_chain, now)
            rec = new_child(spec, parent_chain[0], self._nodes, now)
            refusal = do_open_child(parent_chain, rec, now)
            if refusal is not None:
                return refusal
            self._nodes[rec.id] = rec
            return rec.snapshot()

    def reserve(
        self, node: str, hold: str, amounts: Mapping[str, int], now: float, ttl: float | None
    ) -> Refusal | None:
        with self._lock:
            if hold in self._holds:
                raise LedgerError(f"hold id {hold!r} is already in use")
            chain = self._chain(node)
            self._roll(chain, now)
            record = HoldRecord(hold, node, dict(amounts), now, None if ttl is None else now + ttl)
            refusal = do_reserve(chain, record, now)
            if refusal is not None and refusal.kind == "limit" and self._expire(now):
                chain[0].refusals -= 1  # the retry decides; count one refusal at most
                refusal = do_reserve(chain, record, now)
            if refusal is None:
                self._holds[hold] = record
            return refusal

    def settle(self, hold: str, amounts: Mapping[str, int], now: float) -> Settled:
        with self._lock:
            record = self._holds.pop(hold, None)
            if record is None:
                return Settled("unknown")
            chain = self._chain(record.node)
            self._roll(chain, now)
            overrun = do_end(chain, record, amounts)
            return Settled("settled", record.node, overrun)

    def release(self, hold: str, now: float) -> bool:
        with self._lock:
            record = self._holds.pop(hold, None)
            if record is None:
                return False
            do_end(self._chain(record.node), record, None)
            return True

    def charge(self, node: str, amounts: Mapping[str, int], now: float) -> None:
        with self._lock:
            chain = self._chain(node)
            self._roll(chain, now)
            do_charge(chain, amounts)

    def close(self, node: str, now: float) -> list[str]:
        with self._lock:
            rec = self._nodes[node]
            if rec.closed:
                return []
            closed: list[str] = []
            self._close(rec, now, closed)
            return closed

    def _close(self, rec: NodeRecord, now: float, closed: list[str]) -> None:
        for child_id in rec.children:
            child = self._nodes[child_id]
            if not child.closed:
                self._close(child, now, closed)
        parent_chain = self._chain(rec.parent) if rec.parent is not None else []
        do_close(rec, parent_chain, now)
        closed.append(rec.id)

    def state(self, node: str) -> NodeState:
        with self._lock:
            return self._nodes[node].snapshot()

    def tree(self, root: str) -> list[NodeState]:
        with self._lock:
            out: list[NodeState] = []
            stack = [root]
            while stack:
                rec = self._nodes[stack.pop()]
                out.append(rec.snapshot())
                stack.extend(reversed(rec.children))
            return out

    def roots(self) -> list[NodeState]:
        with self._lock:
            return [r.snapshot() for r in self._nodes.values() if r.parent is None]

    def expire(self, now: float) -> list[str]:
        with self._lock:
            return self._expire(now)

    def _expire(self, now: float) -> list[str]:
        gone = [h for h in self._holds.values() if h.expires_at is not None and h.expires_at <= now]
        for h in gone:
            del self._holds[h.id]
            do_end(self._chain(h.node), h, None)
        return [h.id for h in gone]
