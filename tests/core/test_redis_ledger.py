"""The Redis ledger: the same accounting as the memory and SQLite ledgers, one atomic
script per operation on the server, and what happens when the server is slow, gone,
restarted, or a reply is lost.

Everything runs against a real ``redis-server`` this module starts on a free loopback port
(skipped, saying why, where the binary is missing); each test uses its own key prefix.
The backend-agnostic tests of ``test_sqlite_ledger.py`` run here again, on Redis.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import inspect
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from allotment import Budget, BudgetExceeded, ManualClock, Usage, _backends
from allotment._capability import (
    CapabilityError,
    export_token,
    ledger_identity,
    read_token,
    redeem_token,
)
from allotment._errors import ConfigurationError, InvalidAmount, LedgerError
from allotment._ledger import Ledger, NodeSpec, NodeState, Refusal, Settled
from allotment._memory import MemoryLedger
from allotment._redis import FAILED_OPEN, LedgerUnreachable, RedisLedger
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis_server
from redis_server import NOW, RedisServer


def _shared_module() -> ModuleType:
    path = Path(__file__).with_name("test_sqlite_ledger.py")
    spec = importlib.util.spec_from_file_location("_allotment_shared_ledger_tests", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shared = _shared_module()
root, child, spend, money = shared.root, shared.child, shared.spend, shared.money

SHARED_TESTS = sorted(
    name
    for name, fn in vars(shared).items()
    if name.startswith("test_")
    and inspect.isfunction(fn)
    and set(inspect.signature(fn).parameters) in ({"ledger"}, {"reopen"})
)
"""The tests written against any ``Ledger`` (they take only ``ledger`` or ``reopen``);
collected here too, so they run with this module's Redis fixtures."""
globals().update({name: getattr(shared, name) for name in SHARED_TESTS})

Reopen = Callable[..., RedisLedger]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The redis-server binary, or a skip saying how to get one."""
    if redis_server.BINARY is None:
        print(f"\nskipping the Redis ledger tests: {redis_server.MISSING}")
        pytest.skip(redis_server.MISSING)
    return redis_server.BINARY


@pytest.fixture(scope="session")
def server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def url(server: RedisServer) -> str:
    return server.url(prefix=f"t{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def ledgers(url: str) -> Iterator[Reopen]:
    """Opens RedisLedgers (by default on this test's prefix) and closes them afterwards."""
    opened: list[RedisLedger] = []

    def make(at: str = url, **kw: Any) -> RedisLedger:
        led = RedisLedger(at, **kw)
        opened.append(led)
        return led

    yield make
    for led in opened:
        led.close()


@pytest.fixture
def reopen(ledgers: Reopen) -> Reopen:
    """Each call is a new client on the same keys, as a restarted process would open it."""
    return ledgers


@pytest.fixture
def ledger(reopen: Reopen) -> Ledger:
    return reopen()


@pytest.fixture
def raw(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    yield client
    client.close()


@pytest.fixture
def backends() -> Iterator[None]:
    _backends._reset()
    yield
    _backends._reset()


def test_the_backend_agnostic_ledger_tests_run_here_on_redis() -> None:
    """The shared tests were found (so the same properties are proved for Redis) and
    include the core ones; a rename in test_sqlite_ledger.py would fail here."""
    assert len(SHARED_TESTS) >= 14
    for name in (
        "test_child_escrows_its_limit_and_close_returns_the_unspent_part",
        "test_refusal_changes_nothing",
        "test_settle_twice_charges_once",
        "test_reserve_reclaims_expired_holds_when_a_limit_refuses",
        "test_period_rollover_across_restarts",
        "test_child_open_across_rollovers_keeps_only_its_escrow",
        "test_rate_window_is_kept_across_restarts",
        "test_threads_sharing_a_ledger_conserve_spend",
    ):
        assert name in SHARED_TESTS
        assert globals()[name] is getattr(shared, name)


# -- the protocol, Redis specifics ---------------------------------------------------------


def test_each_operation_is_one_round_trip_whatever_the_depth(
    server: RedisServer, url: str, raw: redis.Redis
) -> None:
    """A reserve, settle, release, charge, child opening, read, expire and close on a
    node four levels deep each send exactly one command, one EVALSHA, to the server."""
    sent = [0]

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent[0] += 1
            super().send_packed_command(command, check_health)

    client = _client(server, CountingConnection)
    led = RedisLedger(url, client=client)
    root(led, usd=1000, now=NOW)
    node = "svc"
    for name in ("a", "b", "c"):
        node = child(led, node, name, 100, now=NOW)

    def round_trips(action: Callable[[], object]) -> tuple[int, int]:
        calls = int(raw.info("commandstats")["cmdstat_evalsha"]["calls"])
        sent[0] = 0
        action()
        return sent[0], int(raw.info("commandstats")["cmdstat_evalsha"]["calls"]) - calls

    steps: list[Callable[[str], object]] = [
        lambda h: led.reserve(node, f"{h}-1", {"usd": 5}, NOW, 60.0),
        lambda h: led.settle(f"{h}-1", {"usd": 4}, NOW),
        lambda h: led.reserve(node, f"{h}-2", {"usd": 5}, NOW, None),
        lambda h: led.release(f"{h}-2", NOW),
        lambda h: led.charge(node, {"usd": 1}, NOW),
        lambda h: led.open(NodeSpec(h, node, {"usd": 10}), NOW),
        lambda h: led.tree("svc"),
        lambda h: led.expire(NOW),
    ]
    try:
        for step in steps:  # the first call of each script loads it into the server's cache
            step("warm")
        for step in steps:
            assert round_trips(lambda step=step: step("measured")) == (1, 1)
        assert round_trips(lambda: led.close("svc/a", NOW)) == (1, 1)
        assert led.state("svc").committed == {"usd": 10}
    finally:
        client.close()


def test_amounts_and_times_survive_the_round_trip_exactly(ledgers: Reopen) -> None:
    """Integers up to 2**53 - 1 and fractional timestamps come back bit for bit (Lua's
    cjson would round both to 14 digits)."""
    led = ledgers()
    at = NOW + 0.123456789
    big = 2**53 - 1
    assert isinstance(led.open(NodeSpec("svc", None, {"usd": big, "llm_calls": 7}), at), NodeState)
    assert led.reserve("svc", "h1", {"usd": big - 1, "llm_calls": 1}, at, 0.1) is None
    state = led.state("svc")
    assert state.limits == {"usd": big, "llm_calls": 7}
    assert state.held == {"usd": big - 1, "llm_calls": 1}
    assert state.created_at == at
    assert led.expire(at + 0.1) == ["h1"]


def test_expire_reports_holds_in_the_order_they_were_reserved(ledgers: Reopen) -> None:
    """Holds that expire together are reported oldest reservation first, as the memory
    and SQLite ledgers do, whatever their ttl or id."""
    led = ledgers()
    root(led, now=NOW)
    for hold, at, ttl in (("h9", NOW, 100.0), ("h10", NOW + 1, 50.0), ("a1", NOW + 2, 10.0)):
        assert led.reserve("svc", hold, {"usd": 1}, at, ttl) is None
    assert led.expire(NOW + 100) == ["h9", "h10", "a1"]


def test_root_metadata_is_merged_on_reopen_and_kept_exactly(ledgers: Reopen) -> None:
    """Reopening a root merges its metadata as the memory ledger does; values keep their
    JSON shape (empty lists and objects, big integers, floats) through the server."""
    meta_1 = {"owner": "ops", "tags": [], "limits": {}}
    meta_2 = {"tags": ["nightly", {}], "seed": 2**60, "ratio": 0.1}
    redis_ledger, memory = ledgers(), MemoryLedger()
    for led in (redis_ledger, memory):
        led.open(NodeSpec("svc", None, {"usd": 1}, meta=meta_1), NOW)
        led.open(NodeSpec("svc", None, {"usd": 2}, meta=meta_2), NOW + 1)
    assert redis_ledger.state("svc") == memory.state("svc")
    assert redis_ledger.state("svc").meta == {**meta_1, **meta_2}
    with pytest.raises(LedgerError, match="JSON"):
        redis_ledger.open(NodeSpec("other", None, {}, meta={"x": object()}), NOW)
    assert [r.id for r in redis_ledger.roots()] == ["svc"]


def test_reopening_a_root_with_another_configuration_matches_memory(ledgers: Reopen) -> None:
    """A root reopened by name takes its owner's current limits, rates, deadline and
    period (a period change restarts the period; dropping it clears it), and reopens if
    closed: field for field as the memory ledger does."""
    redis_ledger, memory = ledgers(), MemoryLedger()
    specs = [
        NodeSpec("svc", None, {"usd": 100}),
        NodeSpec("svc", None, {"usd": 50, "llm_calls": 3}, period="day", deadline=NOW + 9e4),
        NodeSpec("svc", None, {}, rates=(("llm_calls", 2, 60.0),), period="hour"),
        NodeSpec("svc", None, {"usd": 10}),
    ]
    for i, spec in enumerate(specs):
        at = NOW + 5000.0 * i
        if i == 3:
            assert redis_ledger.close("svc", at) == memory.close("svc", at) == ["svc"]
        opened = [led.open(spec, at) for led in (redis_ledger, memory)]
        assert opened[0] == opened[1]
        assert isinstance(opened[0], NodeState)
        assert opened[0].period == spec.period
    assert not redis_ledger.state("svc").closed


def test_amounts_beyond_two_to_the_53_are_refused_and_change_nothing(ledgers: Reopen) -> None:
    """An amount Lua could not keep exact is an InvalidAmount before anything is sent; a
    sum that would pass 2**53 - 1 is a LedgerError from the script, and nothing changes."""
    led = ledgers()
    assert isinstance(led.open(NodeSpec("svc", None, {}), NOW), NodeState)
    with pytest.raises(InvalidAmount, match=r"2\*\*53"):
        led.charge("svc", {"usd": 2**53}, NOW)
    led.charge("svc", {"usd": 2**53 - 1}, NOW)
    with pytest.raises(LedgerError, match=r"2\*\*53"):
        led.charge("svc", {"usd": 1}, NOW)
    with pytest.raises(LedgerError, match=r"2\*\*53"):
        led.reserve("svc", "h1", {"usd": 1}, NOW, None)
    assert money(led.state("svc")) == ({"usd": 2**53 - 1}, {}, {"usd": 2**53 - 1}, 0)
    assert led.settle("h1", {"usd": 1}, NOW).status == "unknown"


def test_ended_holds_are_tombstones_with_a_redis_ttl(
    ledgers: Reopen, raw: redis.Redis, url: str
) -> None:
    """An open hold never expires in Redis (only its ledger ttl ends it); an ended one is a
    tombstone kept tombstone_ttl seconds. Once a tombstone is gone a repeated settle is
    unknown and still charges nothing."""
    led = ledgers(tombstone_ttl=120)
    prefix = led.prefix
    root(led, now=NOW)
    assert led.reserve("svc", "h1", {"usd": 10}, NOW, 60.0) is None
    assert raw.ttl(f"{prefix}hold:h1") == -1
    assert raw.zscore(f"{prefix}expiry", "h1") == NOW + 60.0
    assert led.settle("h1", {"usd": 7}, NOW).status == "settled"
    assert 0 < raw.ttl(f"{prefix}hold:h1") <= 120
    assert raw.zscore(f"{prefix}expiry", "h1") is None
    assert led.settle("h1", {"usd": 7}, NOW).status == "ended"
    raw.delete(f"{prefix}hold:h1")
    assert led.settle("h1", {"usd": 7}, NOW).status == "unknown"
    assert led.release("h1", NOW) is False
    assert led.state("svc").spent == {"usd": 7}


def test_prefixes_keep_ledgers_apart_on_one_server(server: RedisServer, ledgers: Reopen) -> None:
    """Two prefixes on one server are two ledgers: same root names, separate money."""
    one = ledgers(server.url(prefix=f"one{uuid.uuid4().hex[:6]}:"))
    two = ledgers(server.url(prefix=f"two{uuid.uuid4().hex[:6]}:"))
    root(one, usd=100, now=NOW)
    root(two, usd=50, now=NOW)
    spend(one, "svc", "h1", 30, now=NOW)
    assert two.state("svc").spent == {}
    assert two.state("svc").limits == {"usd": 50}
    assert [r.id for r in one.roots()] == ["svc"]


def test_top_up_raises_a_roots_limit_and_read_finds_budgets_by_name(ledgers: Reopen) -> None:
    """top_up adds to a root's capped limits (unlimited ones stay unlimited), refuses
    children, closed roots and non-positive amounts; read(name) is the node's snapshot."""
    led = ledgers()
    root(led, usd=100, now=NOW)
    a = child(led, "svc", "a", 40, now=NOW)
    spend(led, "svc", "h1", 60, now=NOW)
    refused = led.reserve("svc", "h2", {"usd": 10}, NOW, None)
    assert isinstance(refused, Refusal)
    topped = led.top_up("svc", {"usd": 10, "llm_calls": 5}, NOW)
    assert topped.limits == {"usd": 110}
    assert led.reserve("svc", "h3", {"usd": 10}, NOW, None) is None
    assert led.read("svc") == led.state("svc")
    assert led.read(a).parent == "svc"
    with pytest.raises(LedgerError, match="child"):
        led.top_up(a, {"usd": 10}, NOW)
    with pytest.raises(KeyError):
        led.top_up("nope", {"usd": 10}, NOW)
    with pytest.raises(InvalidAmount):
        led.top_up("svc", {"usd": 0}, NOW)
    assert led.close("svc", NOW) == [a, "svc"]
    with pytest.raises(LedgerError, match="closed"):
        led.top_up("svc", {"usd": 10}, NOW)
    assert led.read("svc").limits == {"usd": 110}


def test_url_options_are_read_and_bad_ones_are_configuration_errors(server: RedisServer) -> None:
    """prefix, on_error, retries and tombstone_ttl come from the query (keywords win);
    the rest goes to redis-py; nonsense fails at construction, naming what is accepted;
    a password never shows in messages."""
    led = RedisLedger(
        server.url(prefix="p1:", on_error="open", retries=0, tombstone_ttl=60, socket_timeout=1)
    )
    try:
        assert (led.prefix, led.on_error, led.retries, led.tombstone_ttl) == ("p1:", "open", 0, 60)
        assert led._client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
        assert led.identity == f"redis://{server.address}/0?prefix=p1:"
    finally:
        led.close()
    assert RedisLedger(server.url(prefix="p1:"), prefix="p2:").prefix == "p2:"
    for bad in (
        server.url(on_error="maybe"),
        server.url(retries=-1),
        server.url(tombstone_ttl=0),
        f"redis://{server.address}/0?prefix=",
        server.url(bogus_option=1),
        "http://localhost:6379",
    ):
        with pytest.raises(ConfigurationError):
            RedisLedger(bad)
    secret = RedisLedger("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in secret.shown_url
    assert "s3cret" not in repr(secret)
    assert "s3cret" not in ledger_identity(secret)


@pytest.mark.usefixtures("backends")
def test_backends_plugin_opens_one_redis_ledger_per_url() -> None:
    """redis:// and rediss:// URLs give RedisLedgers, one per URL until reset."""
    hook = _backends.allotment_ledger
    first = hook("redis://127.0.0.1:1/0?prefix=a:")
    assert isinstance(first, RedisLedger)
    assert hook("redis://127.0.0.1:1/0?prefix=a:") is first
    assert hook("redis://127.0.0.1:1/0?prefix=b:") is not first
    assert isinstance(hook("rediss://127.0.0.1:1/0"), RedisLedger)
    _backends._reset()
    assert hook("redis://127.0.0.1:1/0?prefix=a:") is not first


@pytest.mark.usefixtures("backends")
def test_allotment_report_reads_a_redis_ledger(url: str) -> None:
    """A budget written through Budget(ledger="redis://...") shows in `allotment report`."""
    budget = Budget(usd="1.00", name="nightly", ledger=url, clock=ManualClock(NOW))
    with budget.allot("researcher", usd="0.40") as researcher:
        researcher.hold(Usage(usd=Decimal("0.10"), llm_calls=1)).settle(
            Usage(input_tokens=1200, output_tokens=300, llm_calls=1, usd=Decimal("0.0625"))
        )
        with pytest.raises(BudgetExceeded):
            researcher.hold(Usage(usd=Decimal("0.50"), llm_calls=1))
    out = subprocess.run(
        [sys.executable, "-m", "allotment", "report", url, "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "NO_COLOR": "1"},
    )
    assert out.returncode == 0, out.stderr + out.stdout
    (report,) = json.loads(out.stdout)
    assert report["name"] == "nightly"
    assert report["children"][0]["spent"]["usd"] == "0.0625"
    assert report["children"][0]["refusals"] == 1


# -- capability tokens ---------------------------------------------------------------------

KEY = b"k" * 32


def test_token_round_trip_names_one_node_and_the_ledger(ledgers: Reopen) -> None:
    """A token exported for a child is redeemed, by another client of the same ledger,
    as that child's id; it says which ledger and when it expires."""
    led = ledgers()
    root(led, now=NOW)
    a = child(led, "svc", "a", 40, now=NOW)
    token = export_token(led, a, KEY, 60, now=NOW)
    cap = read_token(token, KEY, now=NOW)
    assert (cap.node, cap.ledger, cap.expires_at) == (a, led.identity, NOW + 60)
    other = ledgers()
    assert redeem_token(token, KEY, other, now=NOW + 1) == a
    assert other.reserve(a, "h1", {"usd": 40}, NOW + 1, None) is None


def test_tampered_expired_foreign_replayed_or_closed_tokens_are_refused(
    ledgers: Reopen, server: RedisServer
) -> None:
    """Every way a token can be wrong gives a CapabilityError with its reason, and a
    refused redemption does not use the token up."""
    led = ledgers()
    root(led, now=NOW)
    a = child(led, "svc", "a", 40, now=NOW)
    b = child(led, "svc", "b", 10, now=NOW)
    token = export_token(led, a, KEY, 60, now=NOW)
    version, body, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged["node"] = b
    forged_body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    cases: list[tuple[str, Callable[[], object]]] = [
        ("signature", lambda: redeem_token(f"{version}.{forged_body}.{signature}", KEY, led)),
        ("signature", lambda: redeem_token(f"{version}.{body}.{flipped}", KEY, led, now=NOW)),
        ("signature", lambda: redeem_token(token, b"x" * 32, led, now=NOW)),
        ("malformed", lambda: redeem_token("not-a-token", KEY, led, now=NOW)),
        ("expired", lambda: redeem_token(token, KEY, led, now=NOW + 60)),
        ("ledger", lambda: redeem_token(token, KEY, ledgers(server.url(prefix="x:")), now=NOW)),
    ]
    for reason, attempt in cases:
        with pytest.raises(CapabilityError) as refused:
            attempt()
        assert refused.value.reason == reason
    assert redeem_token(token, KEY, led, now=NOW + 1) == a
    with pytest.raises(CapabilityError, match="already redeemed") as again:
        redeem_token(token, KEY, led, now=NOW + 2)
    assert again.value.reason == "redeemed"
    later = export_token(led, b, KEY, 60, now=NOW)
    led.close(b, NOW + 3)
    with pytest.raises(CapabilityError, match="closed") as closed:
        redeem_token(later, KEY, led, now=NOW + 4)
    assert closed.value.reason == "closed"
    with pytest.raises(CapabilityError, match="closed"):
        export_token(led, b, KEY, 60, now=NOW + 5)
    with pytest.raises(ConfigurationError):
        export_token(led, a, b"short", 60, now=NOW)


# -- properties, against the memory ledger and on their own --------------------------------

Op = tuple[str, int, int, int]

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "reserve",
                "reserve",
                "reserve",
                "settle",
                "settle",
                "release",
                "again",
                "allot",
                "allot",
                "close",
                "charge",
                "advance",
                "expire",
            ]
        ),
        st.integers(0, 1000),
        st.integers(0, 400),
        st.integers(0, 1000),
    ),
    max_size=40,
)


class Scenario:
    """Applies one list of operations to several ledgers, checking they answer alike."""

    def __init__(self, ledgers: list[Ledger], *, exceed: bool, period: str | None) -> None:
        self.ledgers = ledgers
        self.exceed = exceed
        self.now = NOW + 3600 * 20  # 20:00 UTC: a day boundary is a few hours away
        self.nodes = ["svc"]
        self.open_holds: list[tuple[str, str, dict[str, int]]] = []
        self.ended: list[str] = []
        self.settled: dict[str, int] = {}
        """usd charged per node by the holds settled (exactly-once bookkeeping)."""
        self.count = 0
        spec = NodeSpec(
            "svc",
            None,
            {"usd": 1000, "llm_calls": 40},
            rates=(("llm_calls", 6, 60.0), ("usd", 900, 31.0)),
            period=period,
        )
        self.same(lambda led: led.open(spec, self.now))

    def same(self, action: Callable[[Ledger], Any]) -> Any:
        results = [action(led) for led in self.ledgers]
        for other in results[1:]:
            assert other == results[0]
        return results[0]

    def trees(self) -> list[NodeState]:
        trees: list[NodeState] = self.same(lambda led: led.tree("svc"))
        return trees

    def fresh(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def step(self, op: Op) -> None:
        kind, a, b, c = op
        if kind == "reserve":
            node = self.nodes[a % len(self.nodes)]
            amounts = {"usd": b} if c % 4 == 3 else {"usd": b, "llm_calls": c % 2}
            ttl = (None, 30.0, 300.0)[c % 3]
            hold = self.fresh("h")
            if self.same(lambda led: led.reserve(node, hold, amounts, self.now, ttl)) is None:
                self.open_holds.append((hold, node, amounts))
        elif kind in ("settle", "release") and self.open_holds:
            hold, node, amounts = self.open_holds.pop(a % len(self.open_holds))
            if kind == "release":
                self.same(lambda led: led.release(hold, self.now))
            else:
                cap = 150 if self.exceed else 100
                actual = {"usd": amounts["usd"] * (c % (cap + 1)) // 100, "llm_calls": 1}
                results = [led.settle(hold, actual, self.now) for led in self.ledgers]
                settled = {r.status == "settled" for r in results}
                assert len(settled) == 1, results  # expired by the sweep on all, or on none
                if settled == {True}:
                    for r in results[1:]:
                        assert (r.node, dict(r.overrun)) == (results[0].node, results[0].overrun)
                    self.settled[node] = self.settled.get(node, 0) + actual["usd"]
            self.ended.append(hold)
        elif kind == "again" and self.ended:
            hold = self.ended[a % len(self.ended)]
            before = self.trees()
            for led in self.ledgers:
                assert led.settle(hold, {"usd": b}, self.now).status != "settled"
                assert led.release(hold, self.now) is False
            assert self.trees() == before  # exactly once: a repeat changes nothing
        elif kind == "allot" and len(self.nodes) < 8:
            parent = self.nodes[a % len(self.nodes)]
            limits = {"usd": b} if c % 4 else {}
            if c % 3 == 0:
                limits["llm_calls"] = c % 7
            deadline = self.now + 301.0 if c % 5 == 0 else None  # an advance lands on it
            spec = NodeSpec(f"n{c % 3}", parent, limits, deadline=deadline)
            opened = self.same(lambda led: led.open(spec, self.now))
            if isinstance(opened, NodeState):
                self.nodes.append(opened.id)
        elif kind == "close" and len(self.nodes) > 1:
            node = self.nodes[1 + a % (len(self.nodes) - 1)]
            self.same(lambda led: led.close(node, self.now))
        elif kind == "charge" and self.exceed:
            node = self.nodes[a % len(self.nodes)]
            self.same(lambda led: led.charge(node, {"usd": b, "tool:search": c % 2}, self.now))
        elif kind == "advance":
            self.now += (1.5, 29.0, 31.0, 301.0, 3600.0, 86400.0)[a % 6]  # 29 + 31 = 60
        elif kind == "expire":
            self.same(lambda led: led.expire(self.now))


@given(ops=OPS, period=st.sampled_from([None, "day"]))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_redis_answers_exactly_as_the_memory_ledger(
    server: RedisServer, ops: list[Op], period: str | None
) -> None:
    """Random reserve/settle (also above the hold)/release/repeat/allot (escrow, no
    escrow, deadlines)/close/charge/time/expire sequences on a root with two rate windows
    and maybe a daily period give the same answers and the same tree, field for field,
    on Redis as on the reference MemoryLedger after every step."""
    led = RedisLedger(server.url(prefix=f"d{uuid.uuid4().hex[:12]}:"))
    try:
        run = Scenario([MemoryLedger(), led], exceed=True, period=period)
        for op in ops:
            run.step(op)
            run.trees()
    finally:
        led.close()


SCRIPTED: dict[str, list[Op]] = {
    "a closed child's spend stays out of the next period": [
        ("allot", 0, 300, 1),
        ("reserve", 1, 120, 0),
        ("settle", 0, 0, 50),
        ("close", 0, 0, 0),
        ("advance", 5, 0, 0),
        ("reserve", 0, 400, 0),
        ("reserve", 0, 400, 0),
    ],
    "a window entry exactly a window old no longer counts": [
        ("reserve", 0, 400, 0),
        ("reserve", 0, 400, 0),
        ("advance", 2, 0, 0),
        ("reserve", 0, 400, 0),
        ("reserve", 0, 400, 0),
    ],
}


@pytest.mark.parametrize("name", sorted(SCRIPTED))
def test_edge_scenarios_match_the_memory_ledger(server: RedisServer, name: str) -> None:
    """Hand-picked sequences at the edges (period rollover after a child closed, a rate
    entry exactly at the window's edge) answer as on the memory ledger."""
    led = RedisLedger(server.url(prefix=f"e{uuid.uuid4().hex[:12]}:"))
    try:
        run = Scenario([MemoryLedger(), led], exceed=True, period="day")
        for op in SCRIPTED[name]:
            run.step(op)
            run.trees()
    finally:
        led.close()


@given(ops=OPS)
@settings(max_examples=150, deadline=None, derandomize=True)
def test_conservation_exactly_once_and_refusals_change_nothing(
    server: RedisServer, ops: list[Op]
) -> None:
    """On Redis alone, when settles stay within their holds: after every step every node
    has spent + held + unspent child escrow <= its limit on every capped dimension (and
    no negative escrow); each node's spent is exactly what the holds settled in its
    subtree charged, once; a refused reservation or child changes no amount."""
    led = RedisLedger(server.url(prefix=f"c{uuid.uuid4().hex[:12]}:"))
    try:
        run = Scenario([led], exceed=False, period=None)
        for op in ops:
            admitting = op[0] in ("reserve", "allot")
            if admitting:
                led.expire(run.now)  # so a refusal cannot reclaim expired holds on the way
                before = {s.id: money(s) for s in led.tree("svc")}
                counts = len(run.nodes), len(run.open_holds)
            run.step(op)
            after = led.tree("svc")
            if admitting and (len(run.nodes), len(run.open_holds)) == counts:
                assert {s.id: money(s) for s in after} == before  # refused: nothing moved
            for s in after:
                for dim, limit in s.limits.items():
                    assert s.committed.get(dim, 0) <= limit, (s.id, dim)
                    assert s.allotted(dim) >= 0, (s.id, dim)
                subtree = [n for n in run.settled if n == s.id or n.startswith(s.id + "/")]
                assert s.spent.get("usd", 0) == sum(run.settled[n] for n in subtree)
    finally:
        led.close()


# -- the fan-out race (INCIDENTS.md #14) ---------------------------------------------------

ESTIMATE = 310_000  # $0.00031 in nano-dollars
COST = 230_000  # $0.00023


def test_fan_out_race_of_8_processes_never_overshoots(ledgers: Reopen, url: str) -> None:
    """Eight processes reserve $0.00031 holds as fast as they can against one parent with
    $0.0060 left, all before anyone settles: exactly floor(0.0060 / 0.00031) = 19 are
    admitted, the peak held is within the parent's limit, and after the $0.00023 settles
    the parent has spent exactly 19 of them, nothing held, every other attempt refused."""
    procs, attempts, left = 8, 5, 6_000_000
    led = ledgers()
    root(led, usd=10**9, now=NOW)
    parent = child(led, "svc", "parent", left, now=NOW)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    workers = [
        ctx.Process(
            target=redis_server.fanout_worker,
            args=(url, parent, i, attempts, ESTIMATE, COST, barrier),
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=60)  # everyone connected: go
        barrier.wait(timeout=60)  # everyone reserved
        peak = led.state(parent)
        barrier.wait(timeout=60)  # settle
        for w in workers:
            w.join(timeout=60)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()
    codes = [w.exitcode for w in workers]
    assert all(code is not None and code >= 100 for code in codes), codes  # 100 + admitted
    admitted = sum(code - 100 for code in codes if code is not None)
    assert admitted == left // ESTIMATE == 19
    assert peak.held == {"usd": admitted * ESTIMATE, "llm_calls": admitted}
    assert peak.committed["usd"] <= left
    final = led.state(parent)
    assert final.spent == {"usd": admitted * COST, "llm_calls": admitted}
    assert (final.held, final.open_holds) == ({}, 0)
    assert final.refusals == procs * attempts - admitted
    assert led.state("svc").committed["usd"] == left  # the escrow, never more


async def test_fan_out_race_of_200_asyncio_sub_agents_never_overshoots(
    ledgers: Reopen,
) -> None:
    """Two hundred sub-agents (child budgets without limits of their own, so every call
    counts on the supervisor's $0.0310) reserve concurrently from asyncio tasks before
    any settles: exactly 100 = 0.0310 / 0.00031 are admitted, the peak is exactly the
    limit, and the supervisor ends with 100 settles of $0.00023 and nothing held."""
    led = ledgers()
    run = Budget(usd=1, name="fanout", ledger=led, clock=ManualClock(NOW))
    supervisor = run.allot("supervisor", usd=Decimal("0.0310"))
    agents = [supervisor.allot(f"agent-{i}") for i in range(200)]
    reserved = asyncio.Barrier(len(agents) + 1)
    go = asyncio.Event()

    async def sub_agent(agent: Budget) -> bool:
        try:
            hold = await asyncio.to_thread(agent.hold, Usage(usd=Decimal("0.00031"), llm_calls=1))
        except BudgetExceeded:
            hold = None
        await reserved.wait()
        await go.wait()
        if hold is not None:
            await asyncio.to_thread(hold.settle, Usage(usd=Decimal("0.00023"), llm_calls=1))
        return hold is not None

    tasks = [asyncio.create_task(sub_agent(a)) for a in agents]
    await asyncio.wait_for(reserved.wait(), timeout=60)
    peak = supervisor.state()
    go.set()
    admitted = sum(await asyncio.gather(*tasks))
    assert admitted == 31_000_000 // ESTIMATE == 100
    assert peak.held == {"usd": 31_000_000, "llm_calls": 100}
    assert peak.committed == {"usd": 31_000_000, "llm_calls": 100}
    final = supervisor.state()
    assert final.spent == {"usd": 100 * COST, "llm_calls": 100}
    assert (final.held, final.open_holds) == ({}, 0)
    assert sum(led.state(a.id).refusals for a in agents) == 100
    assert run.state().committed["usd"] == 31_000_000


# -- faults ----------------------------------------------------------------------------------


def test_killed_worker_hold_expires_after_its_ttl_and_the_money_returns(
    ledgers: Reopen, url: str
) -> None:
    """A process that redeemed a token for a child budget and holds $400 of its $500 is
    SIGKILLed: the hold still counts until its 30 s ttl, then expire() reports it and
    the whole escrow can be reserved again; the token cannot be redeemed twice."""
    led = ledgers()
    root(led, usd=1000, now=NOW)
    worker_budget = child(led, "svc", "worker", 500, now=NOW)
    key = os.urandom(32)
    token = export_token(led, worker_budget, key, 600, now=NOW)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(
        target=redis_server.holding_worker, args=(url, token, key, "w-hold", 400, ready)
    )
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.05):
            assert proc.is_alive(), f"the worker failed before holding (exit {proc.exitcode})"
            assert time.monotonic() < deadline, "the worker never reserved"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    assert led.state(worker_budget).held == {"usd": 400}
    refused = led.reserve(worker_budget, "too-soon", {"usd": 200}, NOW + 10, None)
    assert refused is not None
    assert refused.kind == "limit"
    assert led.expire(NOW + 29.9) == []
    assert led.expire(NOW + 30) == ["w-hold"]
    assert money(led.state(worker_budget)) == ({}, {}, {"usd": 0}, 0)
    assert led.reserve(worker_budget, "after", {"usd": 500}, NOW + 31, None) is None
    with pytest.raises(CapabilityError) as again:
        redeem_token(token, key, led, now=NOW + 32)
    assert again.value.reason == "redeemed"


def _quick(srv: RedisServer, prefix: str, **query: object) -> str:
    return srv.url(
        prefix=prefix, socket_timeout=0.5, socket_connect_timeout=0.5, retries=0, **query
    )


@pytest.mark.usefixtures("redis_binary")
def test_redis_restart_refuses_while_down_then_resumes_with_exact_totals(
    tmp_path: Path,
) -> None:
    """With the server killed mid-run every operation is a LedgerError naming the URL and
    nothing is admitted; restarted on the same port (append-only file, fsync always) the
    ledger reloads its scripts by itself, the hold open across the crash settles, and the
    totals are exact."""
    srv = RedisServer(tmp_path / "redis", persistent=True).start()
    led = RedisLedger(_quick(srv, "r:"))
    try:
        root(led, usd=1000, now=NOW)
        for i in range(3):
            spend(led, "svc", f"before-{i}", 10, now=NOW)
        assert led.reserve("svc", "across", {"usd": 50}, NOW, 600.0) is None
        srv.stop(kill=True)
        down: list[Callable[[], object]] = [
            lambda: led.reserve("svc", "while-down", {"usd": 5}, NOW, 600.0),
            lambda: led.settle("across", {"usd": 40}, NOW),
            lambda: led.state("svc"),
            lambda: led.open(NodeSpec("late", "svc", {"usd": 1}), NOW),
        ]
        for attempt in down:
            with pytest.raises(LedgerUnreachable, match=srv.address):
                attempt()
        srv.start()
        raw = redis.Redis(host="127.0.0.1", port=srv.port)
        try:
            assert raw.script_exists(led._scripts["settle"].sha) == [False]  # cache is gone
        finally:
            raw.close()
        assert led.settle("across", {"usd": 40}, NOW).status == "settled"
        assert led.settle("while-down", {"usd": 5}, NOW).status == "unknown"
        spend(led, "svc", "after", 20, now=NOW)
        svc = led.state("svc")
        assert svc.spent == {"usd": 30 + 40 + 20}
        assert (svc.held, svc.committed, svc.open_holds) == ({}, {"usd": 90}, 0)
    finally:
        led.close()
        srv.stop(kill=True)


def _client(srv: RedisServer, connection_class: type[redis.Connection], **kw: Any) -> redis.Redis:
    pool = redis.ConnectionPool(
        connection_class=connection_class, host="127.0.0.1", port=srv.port, socket_timeout=2, **kw
    )
    return redis.Redis.from_pool(pool)


def _losing_client(srv: RedisServer, lose: list[int], retries: int) -> redis.Redis:
    """A client whose next ``lose[0]`` replies are lost on the way back, after the server
    has run the command (the connection drops, as on a network fault)."""

    class LosingConnection(redis.Connection):
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            response = super().read_response(*args, **kwargs)
            if lose[0] > 0:
                lose[0] -= 1
                self.disconnect()
                raise redis.ConnectionError("test: the reply was lost on the way back")
            return response

    return _client(srv, LosingConnection, retry=Retry(NoBackoff(), retries))


def test_a_lost_reply_retried_by_the_client_is_applied_once(
    server: RedisServer, url: str, ledgers: Reopen
) -> None:
    """When the reply to a settle, reserve, charge, child opening, close, top-up or token
    claim is lost after the server ran it, redis-py re-sends the same call; its nonce
    makes the server answer as the first time, so nothing is counted twice."""
    lose = [0]
    client = _losing_client(server, lose, retries=2)
    led = RedisLedger(url, client=client)
    try:
        root(led, usd=1000, now=NOW)
        actions: list[tuple[str, Callable[[], object]]] = [
            ("reserve", lambda: led.reserve("svc", "h1", {"usd": 100}, NOW, None)),
            ("settle", lambda: led.settle("h1", {"usd": 120}, NOW)),
            ("charge", lambda: led.charge("svc", {"usd": 7}, NOW)),
            ("open", lambda: led.open(NodeSpec("a", "svc", {"usd": 50}), NOW)),
            ("close", lambda: led.close("svc/a", NOW)),
            ("top_up", lambda: led.top_up("svc", {"usd": 5}, NOW)),
            ("claim", lambda: led.claim("token-1", 60)),
        ]
        answers = {}
        for name, action in actions:
            lose[0] = 1
            answers[name] = action()
            assert lose[0] == 0, f"{name}: no reply was lost"
        assert answers["reserve"] is None
        settled = answers["settle"]
        assert isinstance(settled, Settled)
        assert (settled.status, dict(settled.overrun)) == ("settled", {"usd": 20})
        assert isinstance(answers["open"], NodeState)
        assert answers["close"] == ["svc/a"]
        assert answers["claim"] is True
        assert led.claim("token-1", 60) is False
        svc = led.state("svc")
        assert svc.children == ("svc/a",)
        assert svc.spent == {"usd": 127}
        assert svc.committed == {"usd": 127}
        assert svc.limits == {"usd": 1005}
    finally:
        led.close()
        client.close()


def test_a_settle_whose_reply_never_came_is_safe_to_repeat(
    server: RedisServer, url: str, raw: redis.Redis
) -> None:
    """Without client retries, a settle whose reply is lost, or that times out on a
    paused (slow) server, is a LedgerUnreachable; it may or may not have been applied,
    and settling again charges it exactly once either way."""
    lose = [0]
    client = _losing_client(server, lose, retries=0)
    led = RedisLedger(url, client=client)
    slow = RedisLedger(url + "&socket_timeout=0.15&retries=0")
    try:
        root(led, usd=1000, now=NOW)
        assert led.reserve("svc", "h1", {"usd": 10}, NOW, None) is None
        lose[0] = 1
        with pytest.raises(LedgerUnreachable):
            led.settle("h1", {"usd": 8}, NOW)
        assert led.settle("h1", {"usd": 8}, NOW).status == "ended"  # it had been applied
        assert slow.reserve("svc", "h2", {"usd": 10}, NOW, None) is None
        raw.client_pause(500, all=False)  # writes wait half a second
        with pytest.raises(LedgerUnreachable, match="did not answer"):
            slow.settle("h2", {"usd": 6}, NOW)
        time.sleep(0.6)
        assert slow.settle("h2", {"usd": 6}, NOW).status in ("settled", "ended")
        svc = led.state("svc")
        assert svc.spent == {"usd": 14}
        assert (svc.held, svc.open_holds) == ({}, 0)
    finally:
        raw.client_unpause()
        led.close()
        slow.close()
        client.close()


@pytest.mark.usefixtures("redis_binary")
def test_fail_open_admits_unrecorded_and_records_when_the_server_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With on_error=open and the server down, a reservation is admitted (None), counted
    in failed_open and logged; its settle and another hold's settle are queued; reads
    still fail. When the server is back the queue is re-sent once: the spend is recorded,
    flagged failed_open_calls, and a repeat changes nothing. The default policy refuses
    in the same outage."""
    srv = RedisServer(tmp_path / "redis", persistent=True).start()
    led = RedisLedger(_quick(srv, "fo:", on_error="open"))
    closed = RedisLedger(_quick(srv, "fo:"))
    try:
        root(led, usd=1000, now=NOW)
        a = child(led, "svc", "a", 500, now=NOW)
        assert led.reserve(a, "before", {"usd": 100}, NOW, 600.0) is None
        srv.stop(kill=True)
        with pytest.raises(LedgerUnreachable, match=srv.address):
            closed.reserve(a, "refused", {"usd": 1}, NOW, 600.0)
        with caplog.at_level(logging.WARNING, logger="allotment"):
            assert led.reserve(a, "during", {"usd": 30, "llm_calls": 1}, NOW, 600.0) is None
        assert led.failed_open == 1
        assert "failing open" in caplog.text
        assert led.settle("during", {"usd": 25, "llm_calls": 1}, NOW).status == "settled"
        assert led.settle("before", {"usd": 80}, NOW).status == "settled"
        assert led.pending == 2
        with pytest.raises(LedgerUnreachable):
            led.state(a)
        assert (closed.failed_open, closed.pending) == (0, 0)
        srv.start()
        state = led.state(a)  # the queue goes first
        assert led.pending == 0
        assert state.spent == {"usd": 105, "llm_calls": 1, FAILED_OPEN: 1}
        assert (state.held, state.open_holds) == ({}, 0)
        assert led.settle("before", {"usd": 80}, NOW).status == "ended"
        assert led.state("svc").spent == state.spent
        assert closed.settle("refused", {"usd": 1}, NOW).status == "unknown"
    finally:
        led.close()
        closed.close()
        srv.stop(kill=True)


def test_fail_open_reservation_that_reached_the_server_is_settled_once(
    server: RedisServer, url: str
) -> None:
    """Under fail-open, a reservation whose reply was lost is admitted as unrecorded, but
    it did reach the server: its settle then ends that hold as usual (no failed-open
    flag, nothing left held) and the usage is counted once."""
    lose = [0]
    client = _losing_client(server, lose, retries=0)
    led = RedisLedger(url, client=client, on_error="open")
    try:
        root(led, usd=100, now=NOW)
        lose[0] = 1
        assert led.reserve("svc", "h1", {"usd": 60}, NOW, 600.0) is None
        assert (lose[0], led.failed_open) == (0, 1)
        assert led.state("svc").held == {"usd": 60}  # it was recorded after all
        assert led.settle("h1", {"usd": 45}, NOW).status == "settled"
        svc = led.state("svc")
        assert (svc.spent, svc.held, svc.open_holds) == ({"usd": 45}, {}, 0)
        assert led.settle("h1", {"usd": 45}, NOW).status == "ended"
    finally:
        led.close()
        client.close()


def test_unreachable_server_fails_closed_without_leaking_the_password() -> None:
    """Nothing listening: reserve is a LedgerUnreachable naming host and port, never the
    password, and nothing is queued or admitted."""
    port = redis_server.free_port()
    led = RedisLedger(
        f"redis://user:s3cret@127.0.0.1:{port}/0?retries=0&socket_connect_timeout=0.5"
    )
    try:
        with pytest.raises(LedgerUnreachable, match=f"127.0.0.1:{port}") as refused:
            led.reserve("svc", "h1", {"usd": 1}, NOW, None)
        assert "s3cret" not in str(refused.value)
        assert (led.failed_open, led.pending) == (0, 0)
    finally:
        led.close()
