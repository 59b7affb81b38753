"""The SQLite ledger, and the ledger algorithms it shares with the memory ledger.

Tests taking the ``reopen``/``ledger`` fixtures run on both backends. For sqlite each
``reopen()`` is a new ``SqliteLedger`` on the same file, as a restarted process would open
it; for memory it is the same ledger, so the same assertions check both backends agree.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from allotment import _backends
from allotment._errors import ConfigurationError, LedgerError
from allotment._ledger import Ledger, NodeSpec, NodeState
from allotment._memory import MemoryLedger
from allotment._sqlite import SqliteLedger

DAY = 86400.0
DAY1 = 1_699_920_000.0 + 3600.0  # 2023-11-14 01:00 UTC
DAY2 = DAY1 + DAY
DAY3 = DAY2 + DAY

Reopen = Callable[[], Ledger]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def sqlite_ledgers(db_url: str) -> Iterator[Callable[..., SqliteLedger]]:
    """Opens SqliteLedgers on one file and closes them all afterwards."""
    opened: list[SqliteLedger] = []

    def make(url: str = db_url, **kw: float) -> SqliteLedger:
        led = SqliteLedger(url, **kw)  # type: ignore[arg-type]
        opened.append(led)
        return led

    yield make
    for led in opened:
        led.close()


@pytest.fixture(params=["memory", "sqlite"])
def reopen(request: pytest.FixtureRequest, sqlite_ledgers: Callable[..., SqliteLedger]) -> Reopen:
    if request.param == "memory":
        memory = MemoryLedger()
        return lambda: memory
    return sqlite_ledgers


@pytest.fixture
def ledger(reopen: Reopen) -> Ledger:
    return reopen()


def root(ledger: Ledger, usd: int = 100, now: float = DAY1, **kw: object) -> NodeState:
    state = ledger.open(NodeSpec("svc", None, {"usd": usd}, **kw), now)  # type: ignore[arg-type]
    assert isinstance(state, NodeState)
    return state


def child(ledger: Ledger, parent: str, name: str, usd: int, now: float = DAY1) -> str:
    state = ledger.open(NodeSpec(name, parent, {"usd": usd}), now)
    assert isinstance(state, NodeState), state
    return state.id


def spend(ledger: Ledger, node: str, hold: str, usd: int, now: float = DAY1) -> None:
    assert ledger.reserve(node, hold, {"usd": usd}, now, None) is None
    assert ledger.settle(hold, {"usd": usd}, now).status == "settled"


def money(state: NodeState) -> tuple[object, ...]:
    return (dict(state.spent), dict(state.held), dict(state.committed), state.open_holds)


# -- the algorithms, on both backends ------------------------------------------------------


def test_root_is_found_by_name_and_keeps_its_spend_across_reopen(reopen: Reopen) -> None:
    """Opening a root by an existing name (in a new ledger instance on the same storage)
    returns the same node with the new limits and the spend recorded before."""
    first = reopen()
    root(first, usd=100)
    spend(first, "svc", "h1", 30)
    second = reopen()
    again = root(second, usd=200, now=DAY1 + 10)
    assert again.id == "svc"
    assert again.limits == {"usd": 200}
    assert again.spent == {"usd": 30}
    assert [r.id for r in second.roots()] == ["svc"]


def test_child_escrows_its_limit_and_close_returns_the_unspent_part(ledger: Ledger) -> None:
    """Opening a child takes its whole limit from the parent; closing it returns what it
    did not spend, and closing a subtree closes the deepest nodes first, once."""
    root(ledger, usd=100)
    a = child(ledger, "svc", "a", 40)
    b = child(ledger, a, "b", 10)
    assert ledger.state("svc").committed == {"usd": 40}
    assert ledger.state("svc").available("usd") == 60
    spend(ledger, b, "h1", 4)
    spend(ledger, a, "h2", 6)
    assert ledger.state("svc").committed == {"usd": 40}  # inside the escrow
    assert ledger.state("svc").spent == {"usd": 10}
    assert ledger.close(a, DAY1 + 1) == [b, a]
    assert ledger.close(a, DAY1 + 2) == []
    svc = ledger.state("svc")
    assert svc.committed == {"usd": 10}
    assert svc.available("usd") == 90
    assert ledger.state(b).closed
    assert ledger.state(a).closed


def test_escrowed_child_spends_even_when_the_parent_is_otherwise_full(ledger: Ledger) -> None:
    """A child's reservations need only its own escrow: the parent's other spend cannot
    take it away, and the parent cannot spend it."""
    root(ledger, usd=100)
    a = child(ledger, "svc", "a", 30)
    spend(ledger, "svc", "own", 70)
    refused = ledger.reserve("svc", "more", {"usd": 1}, DAY1, None)
    assert refused is not None
    assert refused.kind == "limit"
    assert ledger.reserve(a, "in-escrow", {"usd": 30}, DAY1, None) is None


def test_refusal_changes_nothing(ledger: Ledger) -> None:
    """A refused reservation or child leaves every amount as it was, names the limit that
    tripped, and leaves no hold behind; only the refusal counter moves."""
    root(ledger, usd=100)
    a = child(ledger, "svc", "a", 30)
    assert ledger.reserve("svc", "h1", {"usd": 60}, DAY1, None) is None
    before = {n: money(ledger.state(n)) for n in ("svc", a)}
    refusal = ledger.reserve("svc", "h2", {"usd": 11}, DAY1, None)
    assert refusal is not None
    assert (refusal.kind, refusal.node, refusal.dim) == ("limit", "svc", "usd")
    assert (refusal.limit, refusal.spent, refusal.held, refusal.asked) == (100, 0, 90, 11)
    refused_child = ledger.open(NodeSpec("b", "svc", {"usd": 11}), DAY1)
    assert not isinstance(refused_child, NodeState)
    assert refused_child.kind == "limit"
    assert {n: money(ledger.state(n)) for n in ("svc", a)} == before
    assert ledger.state("svc").children == (a,)
    assert ledger.state("svc").refusals == 2
    assert ledger.settle("h2", {"usd": 11}, DAY1).status == "unknown"


def test_settle_twice_charges_once(ledger: Ledger) -> None:
    """A second settle or a release after settle charges nothing; ids never reserved
    settle as unknown and do not release."""
    root(ledger)
    assert ledger.reserve("svc", "h1", {"usd": 10}, DAY1, None) is None
    first = ledger.settle("h1", {"usd": 8}, DAY1)
    assert (first.status, first.node) == ("settled", "svc")
    assert ledger.settle("h1", {"usd": 8}, DAY1 + 1).status != "settled"
    assert ledger.release("h1", DAY1 + 2) is False
    svc = ledger.state("svc")
    assert (svc.spent, svc.held, svc.committed, svc.open_holds) == ({"usd": 8}, {}, {"usd": 8}, 0)
    assert ledger.settle("never", {"usd": 1}, DAY1).status == "unknown"
    assert ledger.release("never", DAY1) is False


def test_release_charges_nothing_and_frees_the_hold(ledger: Ledger) -> None:
    """Releasing an open hold returns its amount to every ancestor and charges nothing."""
    root(ledger, usd=100)
    a = child(ledger, "svc", "a", 50)
    assert ledger.reserve(a, "h1", {"usd": 50}, DAY1, None) is None
    assert ledger.release("h1", DAY1) is True
    assert ledger.release("h1", DAY1) is False
    assert money(ledger.state(a)) == ({}, {}, {"usd": 0}, 0)
    assert ledger.reserve(a, "h2", {"usd": 50}, DAY1, None) is None


def test_settle_reports_overrun_and_charges_it_in_full(ledger: Ledger) -> None:
    """Usage above the hold is charged in full, up the chain, and reported per dimension."""
    root(ledger, usd=100)
    a = child(ledger, "svc", "a", 20)
    assert ledger.reserve(a, "h1", {"usd": 10, "llm_calls": 1}, DAY1, None) is None
    result = ledger.settle("h1", {"usd": 25, "llm_calls": 1}, DAY1)
    assert (result.status, result.node, dict(result.overrun)) == ("settled", a, {"usd": 15})
    assert ledger.state(a).spent == {"usd": 25, "llm_calls": 1}
    assert ledger.state(a).committed["usd"] == 25
    assert ledger.state("svc").committed["usd"] == 25  # the child went 5 past its escrow


def test_reserve_reclaims_expired_holds_when_a_limit_refuses(ledger: Ledger) -> None:
    """A hold whose ttl passed still counts until a reservation would be refused on a
    limit; then it is released (charging nothing) and the reservation admitted."""
    root(ledger, usd=100)
    assert ledger.reserve("svc", "stale", {"usd": 80}, DAY1, 10.0) is None
    assert ledger.reserve("svc", "keep", {"usd": 10}, DAY1, None) is None
    early = ledger.reserve("svc", "early", {"usd": 50}, DAY1 + 5, None)
    assert early is not None
    assert early.kind == "limit"  # ttl not yet passed
    assert ledger.reserve("svc", "small", {"usd": 5}, DAY1 + 20, None) is None  # fits: no sweep
    assert ledger.state("svc").held == {"usd": 95}
    assert ledger.reserve("svc", "late", {"usd": 50}, DAY1 + 20, None) is None
    assert ledger.state("svc").held == {"usd": 65}
    assert ledger.settle("stale", {"usd": 80}, DAY1 + 21).status != "settled"
    assert ledger.state("svc").spent == {}
    assert ledger.expire(DAY1 + 10_000) == []  # holds without a ttl never expire


def test_expire_ends_only_holds_whose_ttl_passed(ledger: Ledger) -> None:
    """expire(now) releases exactly the holds with expires_at <= now, once."""
    root(ledger, usd=100)
    a = child(ledger, "svc", "a", 50)
    assert ledger.reserve(a, "short", {"usd": 10}, DAY1, 5.0) is None
    assert ledger.reserve("svc", "long", {"usd": 20}, DAY1, 50.0) is None
    assert ledger.expire(DAY1 + 4.9) == []
    assert ledger.expire(DAY1 + 5.0) == ["short"]
    assert ledger.expire(DAY1 + 6.0) == []
    assert ledger.state(a).held == {}
    assert ledger.state("svc").held == {"usd": 20}
    assert ledger.release("short", DAY1 + 7) is False
    assert ledger.expire(DAY1 + 60) == ["long"]
    assert money(ledger.state("svc")) == ({}, {}, {"usd": 50}, 0)


def test_period_rollover_across_restarts(reopen: Reopen) -> None:
    """A daily root's cap holds within a day across restarts, and the next day's first
    operation starts it fresh with the previous day's spend in the past."""
    first = reopen()
    root(first, usd=100, period="day")
    spend(first, "svc", "d1-a", 60)
    second = reopen()
    root(second, usd=100, now=DAY1 + 3600, period="day")
    over = second.reserve("svc", "d1-b", {"usd": 50}, DAY1 + 3600, None)
    assert over is not None
    assert (over.kind, over.spent) == ("limit", 60)
    spend(second, "svc", "d1-c", 40, now=DAY1 + 3600)
    third = reopen()
    spend(third, "svc", "d2-a", 100, now=DAY2)
    svc = third.state("svc")
    assert svc.period_start == DAY2 - 3600  # midnight UTC
    assert svc.spent == {"usd": 100}
    full = third.reserve("svc", "d2-b", {"usd": 1}, DAY2 + 60, None)
    assert full is not None
    assert full.kind == "limit"


def test_child_open_across_rollovers_keeps_only_its_escrow(ledger: Ledger) -> None:
    """Regression: an escrowed child that stays open over several period boundaries costs
    its root exactly its escrow each period, and closing it frees all of it (roll_period
    used to re-add the child's past spend at every boundary and closing never freed it)."""
    root(ledger, usd=100, period="day")
    a = child(ledger, "svc", "a", 30)
    spend(ledger, a, "a1", 10)
    spend(ledger, "svc", "s1", 5)
    spend(ledger, "svc", "s2", 7, now=DAY2)
    spend(ledger, a, "a2", 5, now=DAY2)
    too_much = ledger.reserve("svc", "d3-a", {"usd": 71}, DAY3, None)
    assert too_much is not None
    assert too_much.kind == "limit"
    assert ledger.reserve("svc", "d3-b", {"usd": 70}, DAY3, None) is None
    assert ledger.release("d3-b", DAY3)
    assert ledger.close(a, DAY3) == [a]
    assert ledger.state("svc").committed.get("usd", 0) == 0
    assert ledger.reserve("svc", "d3-c", {"usd": 100}, DAY3, None) is None


def test_rate_window_is_kept_across_restarts(reopen: Reopen) -> None:
    """Admitted calls stay in a rate window after a restart, so the window still binds."""
    first = reopen()
    spec = NodeSpec("svc", None, {}, rates=(("llm_calls", 2, 60.0),))
    assert isinstance(first.open(spec, DAY1), NodeState)
    for i in range(2):
        assert first.reserve("svc", f"r{i}", {"llm_calls": 1}, DAY1 + i, None) is None
        assert first.settle(f"r{i}", {"llm_calls": 1}, DAY1 + i).status == "settled"
    second = reopen()
    refused = second.reserve("svc", "r2", {"llm_calls": 1}, DAY1 + 10, None)
    assert refused is not None
    assert refused.kind == "rate"
    assert refused.retry_after == pytest.approx(50.0)
    assert second.reserve("svc", "r3", {"llm_calls": 1}, DAY1 + 60.5, None) is None


def test_hold_id_in_use_and_unknown_nodes_raise(ledger: Ledger) -> None:
    """Reusing an open hold id is a LedgerError; an unknown node is a KeyError; a root
    name that is a child's id is a LedgerError; none of them changes anything."""
    root(ledger)
    a = child(ledger, "svc", "a", 10)
    assert ledger.reserve("svc", "h1", {"usd": 10}, DAY1, None) is None
    with pytest.raises(LedgerError, match="already in use"):
        ledger.reserve("svc", "h1", {"usd": 10}, DAY1, None)
    with pytest.raises(KeyError):
        ledger.reserve("nope", "h2", {"usd": 1}, DAY1, None)
    with pytest.raises(KeyError):
        ledger.state("nope")
    with pytest.raises(LedgerError, match="child"):
        ledger.open(NodeSpec(a, None, {}), DAY1)
    assert money(ledger.state("svc")) == ({}, {"usd": 10}, {"usd": 20}, 1)


def test_tree_lists_parents_before_children_and_roots_lists_roots(ledger: Ledger) -> None:
    """tree() is a preorder walk in opening order; roots() only the roots; children with
    the same name get distinct ids."""
    root(ledger)
    a = child(ledger, "svc", "w", 10)
    b = child(ledger, "svc", "w", 10)
    c = child(ledger, a, "x", 5)
    assert (a, b, c) == ("svc/w", "svc/w#2", "svc/w/x")
    assert [s.id for s in ledger.tree("svc")] == ["svc", a, c, b]
    assert [s.id for s in ledger.tree(a)] == [a, c]
    assert isinstance(ledger.open(NodeSpec("other", None, {}), DAY1), NodeState)
    assert [s.id for s in ledger.roots()] == ["svc", "other"]


def test_threads_sharing_a_ledger_conserve_spend(ledger: Ledger) -> None:
    """Four threads reserving and settling against one capped root: every admitted
    settle is counted once, nothing stays held, and the cap is never passed."""
    root(ledger, usd=1000)
    results: list[tuple[int, int]] = []

    def work(t: int) -> None:
        spent = refused = 0
        for k in range(60):
            hold = f"t{t}-{k}"
            if ledger.reserve("svc", hold, {"usd": 10}, DAY1, None) is None:
                actual = 3 + (k + t) % 8
                assert ledger.settle(hold, {"usd": actual}, DAY1).status == "settled"
                spent += actual
            else:
                refused += 1
        results.append((spent, refused))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 4
    svc = ledger.state("svc")
    total = sum(s for s, _ in results)
    assert svc.spent == {"usd": total}
    assert svc.committed == {"usd": total}
    assert (svc.held, svc.open_holds) == ({}, 0)
    assert total <= 1000
    assert sum(r for _, r in results) == svc.refusals > 0


# -- sqlite only ---------------------------------------------------------------------------


def test_settle_and_release_are_idempotent_across_instances(
    sqlite_ledgers: Callable[..., SqliteLedger],
) -> None:
    """A hold settled by one process's ledger is 'ended' for every other: a second settle
    or a release charges nothing; an id never reserved is 'unknown'."""
    a, b = sqlite_ledgers(), sqlite_ledgers()
    root(a)
    assert a.reserve("svc", "h1", {"usd": 10}, DAY1, None) is None
    assert b.settle("h1", {"usd": 7}, DAY1).status == "settled"
    again = a.settle("h1", {"usd": 7}, DAY1 + 1)
    assert (again.status, again.node, dict(again.overrun)) == ("ended", "svc", {})
    assert a.release("h1", DAY1 + 1) is False
    assert b.state("svc").spent == {"usd": 7}
    assert a.reserve("svc", "h2", {"usd": 10}, DAY1, None) is None
    assert b.release("h2", DAY1) is True
    assert a.settle("h2", {"usd": 10}, DAY1).status == "ended"
    assert a.settle("never", {"usd": 1}, DAY1).status == "unknown"
    with pytest.raises(LedgerError, match="already in use"):
        b.reserve("svc", "h1", {"usd": 1}, DAY1, None)  # ended ids stay taken
    assert money(b.state("svc")) == ({"usd": 7}, {}, {"usd": 7}, 0)


def test_expired_hold_is_recorded_as_expired(
    sqlite_ledgers: Callable[..., SqliteLedger], tmp_path: Path
) -> None:
    """Sweeping marks the hold row 'expired' with its end time, and a reservation admitted
    only thanks to the sweep counts no refusal."""
    led = sqlite_ledgers()
    root(led, usd=100)
    assert led.reserve("svc", "stale", {"usd": 100}, DAY1, 1.0) is None
    assert led.reserve("svc", "fresh", {"usd": 60}, DAY1 + 5, None) is None
    assert led.state("svc").refusals == 0
    with sqlite3.connect(tmp_path / "ledger.db") as raw:
        rows = raw.execute("SELECT id, state, ended_at FROM holds ORDER BY id").fetchall()
    raw.close()
    assert rows == [("fresh", "open", None), ("stale", "expired", DAY1 + 5)]


def test_bad_path_or_file_raises_ledger_error_naming_it(tmp_path: Path) -> None:
    """A missing directory, a directory, or a file that is not a database each fail at
    construction with a LedgerError naming the path; a malformed URL is a config error."""
    missing = tmp_path / "no-such-dir" / "ledger.db"
    with pytest.raises(LedgerError, match="no-such-dir"):
        SqliteLedger(f"sqlite:///{missing}")
    with pytest.raises(LedgerError, match="is a directory"):
        SqliteLedger(f"sqlite:///{tmp_path}")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file, not even close" * 100)
    with pytest.raises(LedgerError, match=r"junk\.db"):
        SqliteLedger(f"sqlite:///{junk}")
    for url in ("sqlite://ledger.db", "sqlite:///", "sqlite:///x.db?mode=ro"):
        with pytest.raises(ConfigurationError, match="sqlite"):
            SqliteLedger(url)


def test_relative_url_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///name.db is a file in the current directory, sqlite:////abs an absolute
    path; both reach the same data, and url keeps what was given."""
    monkeypatch.chdir(tmp_path)
    rel = SqliteLedger("sqlite:///rel.db")
    absolute = SqliteLedger(f"sqlite:///{tmp_path / 'rel.db'}")
    try:
        assert rel.url == "sqlite:///rel.db"
        assert rel.path == str(tmp_path / "rel.db")
        root(rel)
        assert absolute.state("svc").limits == {"usd": 100}
    finally:
        rel.close()
        absolute.close()


def test_locked_database_fails_closed_or_succeeds_within_retries(
    sqlite_ledgers: Callable[..., SqliteLedger], tmp_path: Path
) -> None:
    """While another connection holds the write lock past the timeout and retries, an
    operation fails with LedgerError and changes nothing; a lock released while it is
    still retrying lets it through."""
    led = sqlite_ledgers(timeout=0.05, retries=3)
    root(led)
    raw = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None, check_same_thread=False)
    try:
        raw.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerError, match="locked"):
            led.reserve("svc", "h1", {"usd": 10}, DAY1, None)
        raw.execute("ROLLBACK")
        assert money(led.state("svc")) == ({}, {}, {}, 0)
        patient = sqlite_ledgers(timeout=0.05, retries=50)
        raw.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.3, raw.execute, ("ROLLBACK",))
        timer.start()
        try:
            assert patient.reserve("svc", "h1", {"usd": 10}, DAY1, None) is None
        finally:
            timer.join()
        assert led.state("svc").held == {"usd": 10}
    finally:
        raw.close()


def test_failure_mid_operation_rolls_back_everything(
    sqlite_ledgers: Callable[..., SqliteLedger], tmp_path: Path
) -> None:
    """If the database fails after part of a reservation was written (the hold row and the
    child's row, then the root's row), none of it stays and the error is a LedgerError."""
    led = sqlite_ledgers()
    root(led)
    a = child(led, "svc", "a", 50)
    raw = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    raw.execute(
        "CREATE TRIGGER fail_root BEFORE UPDATE ON nodes WHEN NEW.id = 'svc'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    before = {n: money(led.state(n)) for n in ("svc", a)}
    with pytest.raises(LedgerError, match="injected failure"):
        led.reserve(a, "h1", {"usd": 10}, DAY1, None)  # writes hold, a, then svc
    assert {n: money(led.state(n)) for n in ("svc", a)} == before
    assert led.settle("h1", {"usd": 1}, DAY1).status == "unknown"
    raw.execute("DROP TRIGGER fail_root")
    raw.close()
    assert led.reserve(a, "h1", {"usd": 10}, DAY1, None) is None  # the id was never taken
    assert led.state("svc").held == {"usd": 10}


def test_schema_version_mismatch_and_unstorable_meta_are_ledger_errors(
    sqlite_ledgers: Callable[..., SqliteLedger], tmp_path: Path
) -> None:
    """A file written by another schema version is refused; metadata that JSON cannot
    store is a LedgerError and creates no node."""
    led = sqlite_ledgers()
    with pytest.raises(LedgerError, match="JSON"):
        led.open(NodeSpec("svc", None, {}, meta={"x": object()}), DAY1)
    assert led.roots() == []
    raw = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(LedgerError, match="schema version 99"):
        sqlite_ledgers()


def test_journal_is_wal_and_writes_are_synchronous(
    sqlite_ledgers: Callable[..., SqliteLedger],
) -> None:
    """The file is in WAL mode and the ledger's connection syncs every commit (FULL)."""
    led = sqlite_ledgers()
    conn = led._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connection(
    sqlite_ledgers: Callable[..., SqliteLedger],
) -> None:
    """A ledger used before fork works in the child through a new connection (not the
    parent's), and keeps working in the parent afterwards."""
    led = sqlite_ledgers()
    root(led)
    spend(led, "svc", "parent-1", 10)
    inherited = led._conn
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            spend(led, "svc", "child-1", 5)
            code = 0 if led._conn is not inherited and led._conn is not None else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert led._conn is inherited
    spend(led, "svc", "parent-2", 1)
    assert led.state("svc").spent == {"usd": 16}


WORKERS = 4
PAIRS = 200
ROOT_USD = 2000  # well below what the workers ask for, so the root cap always binds
CHILD_USD = 300


def _worker(url: str, index: int, out: str) -> None:
    """One process: open a child escrow (or, if the root refuses it, work on the root
    alone), then PAIRS reserve/settle-or-release pairs alternating between the child and
    the shared root; record what it was admitted."""
    led = SqliteLedger(url)
    opened = led.open(NodeSpec("worker", "svc", {"usd": CHILD_USD}), DAY1)
    mine = opened.id if isinstance(opened, NodeState) else None
    settled = released = 0
    refused = 0 if mine else 1
    for k in range(PAIRS):
        node = mine if mine and k % 2 else "svc"
        hold = f"w{index}-{k}"
        if led.reserve(node, hold, {"usd": 10}, DAY1, None) is not None:
            refused += 1
        elif k % 7 == 0:
            assert led.release(hold, DAY1)
            released += 1
        else:
            actual = 3 + (k * 5 + index) % 8
            assert led.settle(hold, {"usd": actual}, DAY1).status == "settled"
            settled += actual
    if mine:
        assert led.close(mine, DAY1) == [mine]
    led.close()
    result = {
        "id": mine,
        "settled": settled,
        "released": released,
        "refused": refused,
        "admitted": PAIRS - refused + (0 if mine else 1),
    }
    Path(out).write_text(json.dumps(result))


if __name__ == "__allotment_worker__":
    _worker(*globals()["WORKER_ARGS"])


@pytest.mark.slow
def test_four_processes_conserve_spend_exactly(
    sqlite_ledgers: Callable[..., SqliteLedger], db_url: str, tmp_path: Path
) -> None:
    """Four spawned processes, each with its own SqliteLedger on one file, reserve and
    settle against a root whose cap admits only part of their calls: afterwards the root
    has spent exactly the sum of the admitted settles, within the cap, with nothing held,
    every refusal counted once, and every child opened got its own id."""
    led = sqlite_ledgers()
    root(led, usd=ROOT_USD)
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"worker-{i}.json" for i in range(WORKERS)]
    procs = [
        ctx.Process(
            target=runpy.run_path,
            args=(__file__,),
            kwargs={
                "init_globals": {"WORKER_ARGS": (db_url, i, str(outs[i]))},
                "run_name": "__allotment_worker__",
            },
        )
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    results = [json.loads(o.read_text()) for o in outs]
    total = sum(r["settled"] for r in results)
    svc = led.state("svc")
    assert svc.spent == {"usd": total}
    assert svc.committed == {"usd": total}
    assert (svc.held, svc.open_holds) == ({}, 0)
    assert 0 < total <= ROOT_USD
    assert svc.refusals > 0  # the root's own cap refused something
    children = [r["id"] for r in results if r["id"]]
    assert sorted(svc.children) == sorted(children)
    assert len(set(children)) == len(children) > 0
    refusals = svc.refusals + sum(led.state(c).refusals for c in children)
    assert refusals == sum(r["refused"] for r in results)
    with sqlite3.connect(tmp_path / "ledger.db") as raw:
        states = dict(raw.execute("SELECT state, count(*) FROM holds GROUP BY state").fetchall())
    raw.close()
    released = sum(r["released"] for r in results)
    admitted = sum(r["admitted"] for r in results)
    assert states == {"settled": admitted - released, "released": released}


# -- the default backends plugin -----------------------------------------------------------


@pytest.fixture
def backends() -> Iterator[None]:
    _backends._reset()
    yield
    _backends._reset()


@pytest.mark.usefixtures("backends")
def test_backends_plugin_picks_and_caches_ledgers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory:// is a new ledger each time and memory://NAME one per name (until reset);
    sqlite URLs for the same file share one SqliteLedger; other schemes are not ours."""
    hook = _backends.allotment_ledger
    assert isinstance(hook("memory://"), MemoryLedger)
    assert hook("memory://") is not hook("memory://")
    named = hook("memory://shared")
    assert isinstance(named, MemoryLedger)
    assert hook("memory://shared") is named
    assert hook("memory://other") is not named
    monkeypatch.chdir(tmp_path)
    rel = hook("sqlite:///a.db")
    assert isinstance(rel, SqliteLedger)
    assert hook(f"sqlite:///{tmp_path / 'a.db'}") is rel
    assert hook("sqlite:///b.db") is not rel
    memory_db = hook("sqlite:///:memory:")
    assert isinstance(memory_db, SqliteLedger)
    assert hook("sqlite:///:memory:") is not memory_db
    memory_db.close()
    assert hook("postgres://localhost/db") is None
    with pytest.raises(ConfigurationError):
        hook("sqlite://a.db")
    _backends._reset()
    assert hook("memory://shared") is not named
    assert hook("sqlite:///a.db") is not rel
