"""``sqlite:///path.db``: a ledger in one SQLite file, shared by processes on one machine.

Every operation is one ``BEGIN IMMEDIATE`` transaction: it loads the node records it needs
(the ancestor chain; the root's children when a period rolls over; the subtree on close),
runs the accounting shared with every backend (``_ledger``), writes back the rows that
changed and commits. SQLite serialises writers across processes, so the accounting sees a
consistent ledger; a failure rolls the whole operation back. The file is in WAL mode with
``synchronous=FULL``, so a committed settle survives a crash or power loss.

``sqlite:///runs.db`` is relative to the working directory at construction,
``sqlite:////var/lib/app/runs.db`` is absolute, and ``sqlite:///:memory:`` is a private
database of one ``SqliteLedger`` object (not shared with other processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from ._errors import ConfigurationError, LedgerError
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
from ._limits import period_start

SCHEMA_VERSION = 1
PREFIX = "sqlite:///"
MEMORY = ":memory:"

_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS nodes ("
    " id TEXT PRIMARY KEY, parent TEXT, name TEXT NOT NULL, data TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS nodes_by_parent ON nodes (parent)",
    "CREATE TABLE IF NOT EXISTS holds ("
    " id TEXT PRIMARY KEY, node TEXT NOT NULL, amounts TEXT NOT NULL,"
    " created_at REAL NOT NULL, expires_at REAL,"
    " state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released', 'expired')),"
    " ended_at REAL)",
    "CREATE INDEX IF NOT EXISTS open_holds_by_expiry ON holds (expires_at) WHERE state = 'open'",
)

_CHAIN = """
WITH RECURSIVE up(id, parent, data, depth) AS (
    SELECT id, parent, data, 0 FROM nodes WHERE id = ?
    UNION ALL
    SELECT n.id, n.parent, n.data, up.depth + 1 FROM nodes AS n JOIN up ON n.id = up.parent
)
SELECT id, data FROM up ORDER BY depth
"""

_SUBTREE = """
WITH RECURSIVE down(id, data) AS (
    SELECT id, data FROM nodes WHERE id = ?
    UNION ALL
    SELECT n.id, n.data FROM nodes AS n JOIN down ON n.parent = down.id
)
SELECT id, data FROM down
"""


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///`` URL (``:memory:`` for an in-memory database)."""
    path = url[len(PREFIX) :] if url.startswith(PREFIX) else ""
    if not path or "?" in path or "#" in path:
        raise ConfigurationError(
            f"cannot read sqlite ledger URL {url!r}: write sqlite:///relative/path.db, "
            f"sqlite:////absolute/path.db or sqlite:///:memory: (three slashes, no query)"
        )
    return path


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
            conn.execute("ROLLBACK")


class _Tx:
    """One transaction's view of the ledger: each node is loaded once, and ``flush``
    writes back the nodes whose records changed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._nodes: dict[str, NodeRecord] = {}
        self._loaded: dict[str, str] = {}
        """The stored JSON of each node read, to tell changed records from unchanged."""

    def _load(self, node_id: str, text: str) -> NodeRecord:
        rec = self._nodes.get(node_id)
        if rec is None:
            rec = self._nodes[node_id] = NodeRecord.from_json(json.loads(text))
            self._loaded[node_id] = text
        return rec

    def find(self, node_id: str) -> NodeRecord | None:
        rec = self._nodes.get(node_id)
        if rec is not None:
            return rec
        row = self.conn.execute("SELECT data FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return None if row is None else self._load(node_id, str(row[0]))

    def node(self, node_id: str) -> NodeRecord:
        rec = self.find(node_id)
        if rec is None:
            raise KeyError(node_id)
        return rec

    def chain(self, node_id: str) -> list[NodeRecord]:
        """The node and its ancestors, the node first (``KeyError`` if unknown)."""
        if node_id not in self._nodes:
            for row in self.conn.execute(_CHAIN, (node_id,)):
                self._load(str(row[0]), str(row[1]))
        chain = [self.node(node_id)]
        while chain[-1].parent is not None:
            chain.append(self.node(chain[-1].parent))
        return chain

    def load_subtree(self, node_id: str) -> None:
        for row in self.conn.execute(_SUBTREE, (node_id,)):
            self._load(str(row[0]), str(row[1]))

    def children(self, rec: NodeRecord) -> list[NodeRecord]:
        if any(c not in self._nodes for c in rec.children):
            for row in self.conn.execute("SELECT id, data FROM nodes WHERE parent = ?", (rec.id,)):
                self._load(str(row[0]), str(row[1]))
        return [self.node(c) for c in rec.children]

    def __contains__(self, node_id: object) -> bool:
        """Whether a node id is taken (``new_child`` picks a free one)."""
        if not isinstance(node_id, str):
            return False
        if node_id in self._nodes:
            return True
        row = self.conn.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return row is not None

    def add(self, rec: NodeRecord) -> None:
        self._nodes[rec.id] = rec

    def flush(self) -> None:
        for node_id, rec in self._nodes.items():
            try:
                text = _dumps(rec.to_json())
            except (TypeError, ValueError) as e:
                raise LedgerError(
                    f"budget {rec.path!r} cannot be stored in the sqlite ledger: its metadata "
                    f"must be JSON-serialisable ({e}); nothing was changed"
                ) from e
            old = self._loaded.get(node_id)
            if old is None:
                self.conn.execute(
                    "INSERT INTO nodes (id, parent, name, data) VALUES (?, ?, ?, ?)",
                    (rec.id, rec.parent, rec.name, text),
                )
            elif text != old:
                self.conn.execute("UPDATE nodes SET data = ? WHERE id = ?", (text, node_id))

    # -- holds

    def hold(self, hold_id: str) -> tuple[HoldRecord, str] | None:
        row = self.conn.execute(
            "SELECT node, amounts, created_at, expires_at, state FROM holds WHERE id = ?",
            (hold_id,),
        ).fetchone()
        if row is None:
            return None
        node, amounts, created_at, expires_at, state = row
        record = HoldRecord(
            hold_id,
            str(node),
            dict(json.loads(amounts)),
            float(created_at),
            None if expires_at is None else float(expires_at),
        )
        return record, str(state)

    def insert_hold(self, hold: HoldRecord) -> None:
        self.conn.execute(
            "INSERT INTO holds (id, node, amounts, created_at, expires_at, state)"
            " VALUES (?, ?, ?, ?, ?, 'open')",
            (hold.id, hold.node, _dumps(hold.amounts), hold.created_at, hold.expires_at),
        )

    def end_hold(self, hold_id: str, state: str, now: float) -> None:
        self.conn.execute(
            "UPDATE holds SET state = ?, ended_at = ? WHERE id = ?", (state, now, hold_id)
        )

    def expired_holds(self, now: float) -> list[HoldRecord]:
        rows = self.conn.execute(
            "SELECT id, node, amounts, created_at, expires_at FROM holds"
            " WHERE state = 'open' AND expires_at IS NOT NULL AND expires_at <= ?"
            " ORDER BY created_at, rowid",
            (now,),
        ).fetchall()
        return [
            HoldRecord(str(i), str(n), dict(json.loads(a)), float(c), float(e))
            for i, n, a, c, e in rows
        ]


_ledgers: weakref.WeakSet[SqliteLedger] = weakref.WeakSet()
_inherited: list[sqlite3.Connection] = []
"""Connections a forked child inherited: never used again, and kept from being closed
(closing one could checkpoint or unlink files the parent still uses)."""


def _after_fork_in_child() -> None:
    for ledger in list(_ledgers):
        ledger._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SqliteLedger:
    """Ledger in a SQLite file; safe for threads and for processes on one machine.

    One connection per process, used under a lock; after a fork the child opens its own.
    A writer that finds the database busy waits up to ``timeout`` seconds, and an
    operation that still finds it locked is retried ``retries`` times before failing
    with ``LedgerError``. Ended holds are kept, so settling or releasing a hold twice is
    harmless from any process.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 5) -> None:
        self.url = url
        path = sqlite_path(url)
        self.path = path if path == MEMORY else os.path.abspath(path)
        self._timeout = timeout
        self._retries = max(1, retries)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        with self._lock:
            self._connection()  # a bad path fails here, not at the first call
        _ledgers.add(self)

    def __repr__(self) -> str:
        return f"SqliteLedger({self.url!r})"

    # -- connection

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's connection and lock, open anew on use."""
        if self._conn is not None:
            _inherited.append(self._conn)
            self._conn = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        if self.path != MEMORY:
            directory = os.path.dirname(self.path)
            if not os.path.isdir(directory):
                raise LedgerError(
                    f"cannot open the sqlite ledger {self.path!r}: directory {directory!r} "
                    f"does not exist; create it or choose another path"
                )
            if os.path.isdir(self.path):
                raise LedgerError(f"cannot open the sqlite ledger {self.path!r}: it is a directory")
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the sqlite ledger {self.path!r}: {e}") from e
        try:
            for attempt in range(self._retries):
                try:
                    self._prepare(conn)
                    break
                except sqlite3.OperationalError as e:
                    _rollback(conn)
                    if not _busy(e) or attempt == self._retries - 1:
                        raise
                    self._backoff(attempt)
        except sqlite3.Error as e:
            conn.close()
            raise LedgerError(f"cannot open the sqlite ledger {self.path!r}: {e}") from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif str(row[0]) != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"the sqlite ledger {self.path!r} has schema version {row[0]}; this "
                    f"version of allotment reads version {SCHEMA_VERSION} only"
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(1.0, 0.02 * 2**attempt) * (0.5 + random.random()))

    @overload
    def close(self) -> None: ...

    @overload
    def close(self, node: str, now: float) -> list[str]: ...

    def close(self, node: str | None = None, now: float | None = None) -> list[str] | None:
        """``close()`` closes this process's connection (the next operation reopens it);
        ``close(node, now)`` closes a budget node, as every ledger does."""
        if node is None and now is None:
            with self._lock:
                if self._conn is not None and self._pid == os.getpid():
                    self._conn.close()
                self._conn = None
            return None
        if node is None or now is None:
            raise TypeError("close() takes no arguments, or both node and now")
        return self._close_node(node, now)

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, what: str, op: Callable[[_Tx], _T], *, write: bool = True) -> _T:
        """Run ``op`` in one transaction, retrying while the database is locked."""
        if self._pid != os.getpid():
            self._forget_parent()
        with self._lock:
            attempt = 0
            while True:
                conn = self._connection()
                try:
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        tx = _Tx(conn)
                        result = op(tx)
                        if write:
                            tx.flush()
                        conn.execute("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
                    return result
                except sqlite3.OperationalError as e:
                    attempt += 1
                    if _busy(e) and attempt < self._retries:
                        self._backoff(attempt)
                        continue
                    raise LedgerError(
                        f"the sqlite ledger {self.path!r} failed to {what}: {e}; "
                        f"nothing was changed"
                    ) from e
                except sqlite3.Error as e:
                    raise LedgerError(
                        f"the sqlite ledger {self.path!r} failed to {what}: {e}; "
                        f"nothing was changed"
                    ) from e

    # -- the Ledger protocol

    def _roll(self, tx: _Tx, chain: list[NodeRecord], now: float) -> None:
        root = chain[-1]
        if root.period is None or root.period_start is None:
            return
        if period_start(root.period, now) <= root.period_start:
            return  # the common case: no need to load the root's children
        roll_period(root, tx.children(root), now)

    def open(self, spec: NodeSpec, now: float) -> NodeState | Refusal:
        def op(tx: _Tx) -> NodeState | Refusal:
            if spec.parent is None:
                rec = tx.find(spec.name)
                if rec is None:
                    rec = new_root(spec, now)
                    tx.add(rec)
                elif rec.parent is not None:
                    raise LedgerError(f"{spec.name!r} names a child budget, not a root")
                else:
                    update_root(rec, spec, now)
                return rec.snapshot()
            parent_chain = tx.chain(spec.parent)
            self._roll(tx, parent_chain, now)
            rec = new_child(spec, parent_chain[0], tx, now)
            refusal = do_open_child(parent_chain, rec, now)
            if refusal is not None:
                return refusal
            tx.add(rec)
            return rec.snapshot()

        return self._run(f"open budget {spec.name!r}", op)

    def reserve(
        self, node: str, hold: str, amounts: Mapping[str, int], now: float, ttl: float | None
    ) -> Refusal | None:
        def op(tx: _Tx) -> Refusal | None:
            if tx.hold(hold) is not None:
                raise LedgerError(f"hold id {hold!r} is already in use")
            chain = tx.chain(node)
            self._roll(tx, chain, now)
            record = HoldRecord(hold, node, dict(amounts), now, None if ttl is None else now + ttl)
            refusal = do_reserve(chain, record, now)
            if refusal is not None and refusal.kind == "limit" and self._sweep(tx, now):
                chain[0].refusals -= 1  # one reservation counts as at most one refusal
                refusal = do_reserve(chain, record, now)
            if refusal is None:
                tx.insert_hold(record)
            return refusal

        return self._run(f"reserve on {node!r}", op)

    def settle(self, hold: str, amounts: Mapping[str, int], now: float) -> Settled:
        def op(tx: _Tx) -> Settled:
            found = tx.hold(hold)
            if found is None:
                return Settled("unknown")
            record, state = found
            if state != "open":
                return Settled("ended", record.node)
            chain = tx.chain(record.node)
            self._roll(tx, chain, now)
            overrun = do_end(chain, record, amounts)
            tx.end_hold(hold, "settled", now)
            return Settled("settled", record.node, overrun)

        return self._run(f"settle hold {hold!r}", op)

    def release(self, hold: str, now: float) -> bool:
        def op(tx: _Tx) -> bool:
            found = tx.hold(hold)
            if found is None or found[1] != "open":
                return False
            do_end(tx.chain(found[0].node), found[0], None)
            tx.end_hold(hold, "released", now)
            return True

        return self._run(f"release hold {hold!r}", op)

    def charge(self, node: str, amounts: Mapping[str, int], now: float) -> None:
        def op(tx: _Tx) -> None:
            chain = tx.chain(node)
            self._roll(tx, chain, now)
            do_charge(chain, amounts)

        self._run(f"charge {node!r}", op)

    def _close_node(self, node: str, now: float) -> list[str]:
        def op(tx: _Tx) -> list[str]:
            rec = tx.node(node)
            if rec.closed:
                return []
            tx.load_subtree(node)
            closed: list[str] = []
            self._close_one(tx, rec, now, closed)
            return closed

        return self._run(f"close {node!r}", op)

    def _close_one(self, tx: _Tx, rec: NodeRecord, now: float, closed: list[str]) -> None:
        for child_id in rec.children:
            child = tx.node(child_id)
            if not child.closed:
                self._close_one(tx, child, now, closed)
        parent_chain = tx.chain(rec.parent) if rec.parent is not None else []
        do_close(rec, parent_chain, now)
        closed.append(rec.id)

    def state(self, node: str) -> NodeState:
        return self._run(f"read {node!r}", lambda tx: tx.node(node).snapshot(), write=False)

    def tree(self, root: str) -> list[NodeState]:
        def op(tx: _Tx) -> list[NodeState]:
            tx.load_subtree(root)
            out: list[NodeState] = []
            stack = [root]
            while stack:
                rec = tx.node(stack.pop())
                out.append(rec.snapshot())
                stack.extend(reversed(rec.children))
            return out

        return self._run(f"read the tree of {root!r}", op, write=False)

    def roots(self) -> list[NodeState]:
        def op(tx: _Tx) -> list[NodeState]:
            rows = tx.conn.execute(
                "SELECT data FROM nodes WHERE parent IS NULL ORDER BY rowid"
            ).fetchall()
            return [NodeRecord.from_json(json.loads(r[0])).snapshot() for r in rows]

        return self._run("list roots", op, write=False)

    def expire(self, now: float) -> list[str]:
        return self._run("expire holds", lambda tx: self._sweep(tx, now))

    def _sweep(self, tx: _Tx, now: float) -> list[str]:
        """Release every open hold whose ttl has passed, marking it expired."""
        gone = tx.expired_holds(now)
        for h in gone:
            do_end(tx.chain(h.node), h, None)
            tx.end_hold(h.id, "expired", now)
        return [h.id for h in gone]
