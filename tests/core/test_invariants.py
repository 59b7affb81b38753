"""DESIGN.md's invariants as properties of random operation sequences.

A hypothesis state machine runs random reserve (``budget.hold``), settle (within the hold
and above it), release, repeated settle/release, allot (explicit limits, none, ``share``,
``split``) and close over a budget tree up to depth 3, on the memory and the SQLite
ledger. After every step it compares the kernel with a reference model kept here. The
model is a recursive definition, not ``_ledger``'s incremental escrow rule: a node's
committed amount is its own spent and held plus, per child, the larger of an open
escrowed child's limit and that child's committed amount (only the child's committed
amount once it is closed or when it does not cap the dimension). Money in the model is
``Decimal``; the ledger's integers are checked against it, and so is every ``Decimal``
the API returns.

The same conservation and exact-total properties are then checked under threads, asyncio
tasks and several processes sharing one SQLite file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import multiprocessing
import random
import runpy
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from allotment import (
    Budget,
    BudgetClosed,
    BudgetExceeded,
    Hold,
    HoldEnded,
    InvalidAmount,
    Ledger,
    LedgerError,
    NodeState,
    Usage,
)
from allotment._memory import MemoryLedger
from allotment._sqlite import SqliteLedger
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

Num = Decimal | int
Amounts = dict[str, Num]

DIMS = ("usd", "llm_calls", "input_tokens", "output_tokens", "total_tokens")
"""The dimensions a ``Usage`` of tokens, one call and a cost puts in the ledger."""

MAX_DEPTH = 3
MAX_NODES = 9
MAX_OPEN_HOLDS = 12

STATEFUL = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def dollars(nano: int) -> Decimal:
    """A whole number of nano-dollars as dollars, exactly."""
    return Decimal(nano).scaleb(-9)


def zero(dim: str) -> Num:
    return Decimal(0) if dim == "usd" else 0


def in_units(amounts: Amounts) -> dict[str, int]:
    """The ledger's integer form of model amounts (nano-dollars), zeros dropped."""
    out: dict[str, int] = {}
    for dim, value in amounts.items():
        whole = value
        if dim == "usd":
            whole = Decimal(value).scaleb(9)
            assert whole == whole.to_integral_value(), f"{value} is not whole nano-dollars"
        if whole:
            out[dim] = int(whole)
    return out


def nonzero(amounts: dict[str, int]) -> dict[str, int]:
    return {d: x for d, x in amounts.items() if x}


def call_amounts(usage: Usage) -> Amounts:
    """What the model expects a hold or a settle of ``usage`` to count, per dimension."""
    assert usage.usd is not None
    return {
        "usd": usage.usd,
        "llm_calls": usage.llm_calls,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def call(usd_nano: int, input_tokens: int = 0, output_tokens: int = 0, calls: int = 1) -> Usage:
    return Usage(
        usd=dollars(usd_nano),
        llm_calls=calls,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


# -- the reference model ---------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """A budget as the model sees it."""

    id: str
    parent: Node | None
    limits: Amounts
    budget: Budget
    depth: int
    children: list[Node] = field(default_factory=list)
    own_spent: Amounts = field(default_factory=dict)
    holds: list[OpenHold] = field(default_factory=list)
    closed: bool = False
    """Closed in the ledger (itself or through an ancestor)."""
    excess: Amounts = field(default_factory=dict)
    """What settles in this subtree charged above their holds."""

    def chain(self) -> Iterator[Node]:
        node: Node | None = self
        while node is not None:
            yield node
            node = node.parent

    def subtree(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            yield from c.subtree()

    def spent(self, dim: str) -> Num:
        return self.own_spent.get(dim, zero(dim)) + sum(
            (c.spent(dim) for c in self.children), zero(dim)
        )

    def held(self, dim: str) -> Num:
        own = sum((h.amounts[dim] for h in self.holds), zero(dim))
        return own + sum((c.held(dim) for c in self.children), zero(dim))

    def committed(self, dim: str) -> Num:
        own = self.own_spent.get(dim, zero(dim)) + sum(
            (h.amounts[dim] for h in self.holds), zero(dim)
        )
        return own + sum((c.counted_by_parent(dim) for c in self.children), zero(dim))

    def counted_by_parent(self, dim: str) -> Num:
        mine = self.committed(dim)
        if not self.closed and dim in self.limits:
            return max(self.limits[dim], mine)
        return mine

    def cap(self, dim: str) -> Node | None:
        """The node whose limit a charge here must fit: the nearest one that caps ``dim``
        (an escrowed node's ancestors gave up that money when it was opened)."""
        return next((m for m in self.chain() if dim in m.limits), None)

    def remaining(self, dim: str) -> Num | None:
        m = self.cap(dim)
        if m is None:
            return None
        return max(zero(dim), m.limits[dim] - m.committed(dim))

    def refusals(self, amounts: Amounts) -> set[tuple[str, str]]:
        """(path, limit) pairs that must refuse ``amounts`` charged here."""
        out = set()
        for dim, asked in amounts.items():
            m = self.cap(dim) if asked else None
            if m is not None and m.committed(dim) + asked > m.limits[dim]:
                out.add((m.id, dim))
        return out


@dataclass(eq=False)
class OpenHold:
    hold: Hold
    node: Node
    amounts: Amounts


def assert_refusal_values(err: BudgetExceeded, node: Node, asked: Amounts) -> None:
    """The error gives the refusing limit's exact limit, spent, held and asked amounts."""
    dim = err.limit_name
    m = next(m for m in node.chain() if m.id == err.path)
    assert err.limit == m.limits[dim]
    assert err.spent == m.spent(dim)
    assert err.held == m.committed(dim) - m.spent(dim)
    assert err.asked == asked[dim]
    for value in (err.limit, err.spent, err.held, err.asked):
        assert isinstance(value, Decimal if dim == "usd" else int)


# -- the state machine ---------------------------------------------------------------------

_root_names = itertools.count(1)

root_limits = st.fixed_dictionaries(
    {"usd": st.integers(100_000, 5_000_000)},
    optional={
        "llm_calls": st.integers(1, 12),
        "total_tokens": st.integers(200, 8_000),
        "input_tokens": st.integers(100, 5_000),
    },
)
pick = st.integers(0, 255)


class BudgetTreeMachine(RuleBasedStateMachine):
    """Random operations on one budget tree, checked step by step against the model."""

    def __init__(self, ledger: Callable[[], Ledger]) -> None:
        super().__init__()
        self.ledger = ledger()
        self.nodes: list[Node] = []
        self.open: list[OpenHold] = []
        self.ended: list[tuple[Hold, Usage | None]] = []
        self.settles: list[Usage] = []
        """Every successful settle, to total independently of the tree model."""
        self.names = itertools.count(1)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    # -- helpers

    def snapshot(self) -> dict[str, NodeState]:
        return {s.id: s for s in self.ledger.tree(self.root.id)}

    def assert_unchanged_but_refusals(
        self, before: dict[str, NodeState], at: Node, refusals: set[int]
    ) -> None:
        """Invariant 4: a refusal changes nothing but the refusal count where it was asked."""
        after = self.snapshot()
        assert after.keys() == before.keys()
        for node_id, old in before.items():
            new = after[node_id]
            assert dataclasses.replace(new, refusals=0) == dataclasses.replace(old, refusals=0)
            delta = new.refusals - old.refusals
            assert delta in (refusals if node_id == at.id else {0}), (node_id, delta)

    # -- rules

    @initialize(limits=root_limits)
    def open_root(self, limits: dict[str, int]) -> None:
        name = f"root{next(_root_names)}"
        counts: dict[str, Any] = {d: x for d, x in limits.items() if d != "usd"}
        budget = Budget(dollars(limits["usd"]), name=name, ledger=self.ledger, **counts)
        model_limits: Amounts = {"usd": dollars(limits["usd"]), **counts}
        self.nodes.append(Node(budget.id, None, model_limits, budget, 0))

    @precondition(lambda self: len(self.open) < MAX_OPEN_HOLDS)
    @rule(
        at=pick,
        usd=st.integers(0, 2_000_000),
        input_tokens=st.integers(0, 2_000),
        output_tokens=st.integers(0, 1_000),
    )
    def reserve(self, at: int, usd: int, input_tokens: int, output_tokens: int) -> None:
        self._reserve(self.nodes[at % len(self.nodes)], usd, input_tokens, output_tokens)

    @precondition(lambda self: len(self.open) < MAX_OPEN_HOLDS)
    @rule(
        at=pick,
        usd=st.integers(0, 200_000),
        input_tokens=st.integers(0, 300),
        output_tokens=st.integers(0, 200),
    )
    def reserve_small(self, at: int, usd: int, input_tokens: int, output_tokens: int) -> None:
        """Small bounds, so that trees fill up with holds before they refuse."""
        self._reserve(self.nodes[at % len(self.nodes)], usd, input_tokens, output_tokens)

    @precondition(lambda self: len(self.open) < MAX_OPEN_HOLDS)
    @rule(at=pick, edge=st.sampled_from([-1, 0, 1]))
    def reserve_at_the_edge(self, at: int, edge: int) -> None:
        """A bound of exactly what is left fits; one nano-dollar more does not."""
        node = self.nodes[at % len(self.nodes)]
        left = node.remaining("usd")
        assert isinstance(left, Decimal)
        self._reserve(node, max(0, in_units({"usd": left}).get("usd", 0) + edge), 0, 0)

    def _reserve(self, node: Node, usd: int, input_tokens: int, output_tokens: int) -> None:
        """Invariants 2 and 4: admitted exactly when the bound fits every limit it must;
        a refusal names the limit and changes nothing."""
        bound = call(usd, input_tokens, output_tokens)
        amounts = call_amounts(bound)
        before = self.snapshot()
        closed = next((m for m in node.chain() if m.closed), None)
        must_refuse = node.refusals(amounts)
        if node.budget.closed or closed is not None:
            with pytest.raises(BudgetClosed) as shut:
                node.budget.hold(bound)
            assert shut.value.path == (closed or node).id
            self.assert_unchanged_but_refusals(before, node, {0 if node.budget.closed else 1})
        elif must_refuse:
            with pytest.raises(BudgetExceeded) as info:
                node.budget.hold(bound)
            err = info.value
            assert not isinstance(err, BudgetClosed)
            assert (err.path, err.limit_name) in must_refuse
            assert_refusal_values(err, node, amounts)
            self.assert_unchanged_but_refusals(before, node, {1})
        else:
            hold = node.budget.hold(bound)
            assert hold.reserved == bound
            oh = OpenHold(hold, node, amounts)
            node.holds.append(oh)
            self.open.append(oh)

    def _settle(self, oh: OpenHold, actual: Usage) -> None:
        charged = oh.hold.settle(actual)
        assert charged == actual
        assert oh.hold.settled == actual
        self.open.remove(oh)
        oh.node.holds.remove(oh)
        got = call_amounts(actual)
        for dim, x in got.items():
            oh.node.own_spent[dim] = oh.node.own_spent.get(dim, zero(dim)) + x
            over = x - oh.amounts[dim]
            if over > 0:
                for m in oh.node.chain():
                    m.excess[dim] = m.excess.get(dim, zero(dim)) + over
        self.ended.append((oh.hold, actual))
        self.settles.append(actual)

    @precondition(lambda self: self.open)
    @rule(which=pick, data=st.data())
    def settle_within_hold(self, which: int, data: st.DataObject) -> None:
        """Invariant 5: the settled Decimal is charged exactly, everywhere up the tree."""
        oh = self.open[which % len(self.open)]
        r = oh.hold.reserved
        assert r.usd is not None
        actual = call(
            data.draw(st.integers(0, in_units({"usd": r.usd}).get("usd", 0)), label="usd"),
            data.draw(st.integers(0, r.input_tokens), label="input_tokens"),
            data.draw(st.integers(0, r.output_tokens), label="output_tokens"),
            data.draw(st.integers(0, r.llm_calls), label="llm_calls"),
        )
        self._settle(oh, actual)

    @precondition(lambda self: self.open)
    @rule(which=pick)
    def settle_at_the_bound(self, which: int) -> None:
        """A settle of exactly the bound charges it all (the edge of 'within the hold')."""
        oh = self.open[which % len(self.open)]
        self._settle(oh, oh.hold.reserved)

    @precondition(lambda self: self.open)
    @rule(which=pick, data=st.data())
    def settle_above_hold(self, which: int, data: st.DataObject) -> None:
        """A settle above its hold is charged in full (the estimate was not a bound)."""
        oh = self.open[which % len(self.open)]
        r = oh.hold.reserved
        assert r.usd is not None
        usd = in_units({"usd": r.usd}).get("usd", 0)
        actual = call(
            data.draw(st.integers(0, 2 * usd + 500_000), label="usd"),
            data.draw(st.integers(0, 2 * r.input_tokens + 100), label="input_tokens"),
            data.draw(st.integers(0, 2 * r.output_tokens + 100), label="output_tokens"),
            data.draw(st.integers(0, 2), label="llm_calls"),
        )
        self._settle(oh, actual)

    @precondition(lambda self: self.open)
    @rule(which=pick)
    def release(self, which: int) -> None:
        oh = self.open[which % len(self.open)]
        oh.hold.release()
        assert oh.hold.ended
        self.open.remove(oh)
        oh.node.holds.remove(oh)
        self.ended.append((oh.hold, None))

    @precondition(lambda self: self.ended)
    @rule(
        which=pick, again=st.sampled_from(["settle", "release", "ledger settle", "ledger release"])
    )
    def end_again(self, which: int, again: str) -> None:
        """Invariant 3: a hold ends once; settling or releasing it again raises HoldEnded
        and changes nothing, refusal counts included. The ledger refuses it too when asked
        directly by hold id (as another process holding the id would)."""
        hold, settled = self.ended[which % len(self.ended)]
        before = self.snapshot()
        if again == "ledger settle":
            assert self.ledger.settle(hold.id, {"usd": 1}, time.time()).status != "settled"
        elif again == "ledger release":
            assert self.ledger.release(hold.id, time.time()) is False
        else:
            end = (lambda: hold.settle(call(1))) if again == "settle" else hold.release
            with pytest.raises(HoldEnded):
                end()
        assert self.snapshot() == before
        assert hold.ended
        assert hold.settled == settled

    @precondition(lambda self: len(self.nodes) < MAX_NODES)
    @rule(
        at=pick,
        deepest=st.booleans(),
        how=st.sampled_from(["none", "usd", "usd+calls", "tokens", "share", "split", "bad"]),
        data=st.data(),
    )
    def allot(self, at: int, deepest: bool, how: str, data: st.DataObject) -> None:
        """Escrow: a child's limits are taken from its ancestors at once, or refused with
        nothing changed; a share never exceeds that fraction of what is left; a bad amount
        is a typed error that changes nothing, refusal counts included."""
        parents = [n for n in self.nodes if n.depth < MAX_DEPTH]
        if deepest:
            parent = max(reversed(parents), key=lambda n: (not n.closed, n.depth))
        else:
            parent = parents[at % len(parents)]
        name = f"n{next(self.names)}"
        if how == "bad":
            bad = data.draw(st.sampled_from(["-0.01", "NaN", "1e12", "abc"]), label="bad")
            before = self.snapshot()
            with pytest.raises(BudgetClosed if parent.budget.closed else InvalidAmount):
                parent.budget.allot(name, usd=bad)
            assert self.snapshot() == before
            return
        kw: dict[str, Any] = {}
        fraction: Fraction | None = None
        if how in ("usd", "usd+calls"):
            kw["usd"] = dollars(data.draw(st.integers(0, 3_000_000), label="child usd"))
        if how in ("usd+calls", "tokens"):
            kw["llm_calls"] = data.draw(st.integers(0, 8), label="child llm_calls")
        if how == "tokens":
            kw["total_tokens"] = data.draw(st.integers(0, 5_000), label="child total_tokens")
        if how == "share":
            share = Decimal(data.draw(st.integers(1, 10_000), label="share")).scaleb(-4)
            kw["share"], fraction = share, Fraction(share)
        if how == "split":
            split = data.draw(st.integers(1, 5), label="split")
            kw["split"], fraction = split, Fraction(1, split)
        limits: Amounts = {d: v for d, v in kw.items() if d in DIMS}
        before = self.snapshot()
        closed = next((m for m in parent.chain() if m.closed), None)
        if parent.budget.closed or closed is not None:
            with pytest.raises(BudgetClosed):
                parent.budget.allot(name, **kw)
            self.assert_unchanged_but_refusals(before, parent, {0})
            return
        must_refuse = parent.refusals(limits)
        if must_refuse:
            with pytest.raises(BudgetExceeded) as info:
                parent.budget.allot(name, **kw)
            err = info.value
            assert (err.path, err.limit_name) in must_refuse
            assert f"allotting {name!r}" in str(err)
            assert_refusal_values(err, parent, limits)
            self.assert_unchanged_but_refusals(before, parent, {1})
            return
        child = parent.budget.allot(name, **kw)
        assert child.id == f"{parent.id}/{name}"
        assert child.parent is parent.budget
        if fraction is not None:
            got = child.limits.amounts()
            expected_dims = {d for d in DIMS if parent.remaining(d) is not None}
            assert set(got) == expected_dims
            for dim in expected_dims:
                left = in_units({dim: parent.remaining(dim)}).get(dim, 0)  # type: ignore[dict-item]
                assert got[dim] <= math.floor(left * fraction), (dim, got[dim], left, fraction)
            limits = {d: (dollars(x) if d == "usd" else x) for d, x in got.items()}
        node = Node(child.id, parent, limits, child, parent.depth + 1)
        parent.children.append(node)
        self.nodes.append(node)

    @precondition(lambda self: any(not n.budget.closed for n in self.nodes[1:]))
    @rule(at=pick)
    def close(self, at: int) -> None:
        """Closing returns unspent escrow and closes descendants; closing twice is a no-op."""
        node = self.nodes[1 + at % (len(self.nodes) - 1)]
        node.budget.close()
        assert node.budget.closed
        for m in node.subtree():
            m.closed = True

    @precondition(lambda self: self.open)
    @rule(which=pick)
    def settle_with_bad_input(self, which: int) -> None:
        """Bad input gets a typed error and changes nothing: the hold stays open."""
        oh = self.open[which % len(self.open)]
        before = self.snapshot()
        with pytest.raises(InvalidAmount):
            oh.hold.settle({"usd": "0.01"})  # type: ignore[arg-type]
        assert not oh.hold.ended
        assert self.snapshot() == before

    # -- invariants

    @invariant()
    def ledger_matches_model(self) -> None:
        """Every node's spent, held and committed amounts, limits, open holds and closed
        flag equal the model's, in the ledger's integers."""
        states = self.snapshot()
        assert set(states) == {n.id for n in self.nodes}
        for n in self.nodes:
            s = states[n.id]
            assert s.limits == in_units_all(n.limits)
            assert s.spent == in_units({d: n.spent(d) for d in DIMS})
            assert s.held == in_units({d: n.held(d) for d in DIMS})
            assert nonzero(dict(s.committed)) == in_units({d: n.committed(d) for d in DIMS})
            assert s.open_holds == sum(len(m.holds) for m in n.subtree())
            assert s.closed == n.closed
            assert list(s.children) == [c.id for c in n.children]
            for dim in n.limits:
                allotted = n.committed(dim) - n.spent(dim) - n.held(dim)
                assert s.allotted(dim) == in_units({dim: allotted}).get(dim, 0)

    @invariant()
    def conservation(self) -> None:
        """Invariants 1 and 2: on every node and capped dimension, spent + held + unspent
        child escrow <= limit, and so settled <= limit, while every settle in its subtree
        stayed within its hold; otherwise the excess is bounded by what those settles
        charged above their holds, and no new reservation makes it worse."""
        states = self.snapshot()
        for n in self.nodes:
            s = states[n.id]
            for dim, limit in in_units_all(n.limits).items():
                over = in_units({dim: n.excess.get(dim, zero(dim))}).get(dim, 0)
                assert s.committed.get(dim, 0) <= limit + over, (n.id, dim)
                assert s.spent.get(dim, 0) <= limit + over, (n.id, dim)
                if not over:
                    assert s.available(dim) == limit - s.committed.get(dim, 0)

    @invariant()
    def money_is_exact(self) -> None:
        """Invariant 5: spent, held, remaining and the report's dollars are the Decimal
        sums the model computes, exactly."""
        for n in self.nodes:
            b = n.budget
            spent, held, left = b.spent, b.held, b.remaining
            assert spent.usd == n.spent("usd")
            assert held.usd == n.held("usd")
            for dim in ("llm_calls", "input_tokens", "output_tokens", "total_tokens"):
                assert getattr(spent, dim) == n.spent(dim)
                assert getattr(held, dim) == n.held(dim)
                assert getattr(left, dim) == n.remaining(dim)
            assert left.usd == n.remaining("usd")
            for value in (spent.usd, held.usd, left.usd):
                assert value is None or isinstance(value, Decimal)
        by_path = {n.id: n for n in self.nodes}
        for _, r in self.root.budget.report().walk():
            n = by_path[r.path]
            assert r.spent.usd == n.spent("usd")
            assert r.held.usd == n.held("usd")
            assert r.allotted_usd == max(
                Decimal(0), n.committed("usd") - n.spent("usd") - n.held("usd")
            )
            assert r.limits == n.limits

    def teardown(self) -> None:
        """End every hold and close the root: nothing stays held or escrowed, the root has
        spent exactly the sum of every settle, and every budget refuses from then on."""
        if not self.nodes:
            return
        for oh in list(self.open):
            self._settle(oh, oh.hold.reserved)
        self.root.budget.close()
        for m in self.root.subtree():
            m.closed = True
        self.ledger_matches_model()
        root = self.ledger.state(self.root.id)
        assert root.held == {}
        assert nonzero(dict(root.committed)) == nonzero(dict(root.spent))
        total = sum((u.usd for u in self.settles if u.usd is not None), Decimal(0))
        assert self.root.budget.spent.usd == total
        assert root.spent.get("llm_calls", 0) == sum(u.llm_calls for u in self.settles)
        for n in self.nodes:
            with pytest.raises(BudgetClosed):
                n.budget.hold(call(0))


def in_units_all(limits: Amounts) -> dict[str, int]:
    """Limits in ledger units, zero limits kept (a zero limit caps at zero)."""
    return {d: in_units({d: v}).get(d, 0) for d, v in limits.items()}


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    ledger = SqliteLedger(f"sqlite:///{tmp_path / 'l.db'}")
    yield ledger
    ledger.close()


def test_random_operations_keep_every_invariant_on_the_memory_ledger() -> None:
    """Invariants 1-5 hold after every step of random reserve/settle/release/allot/close
    sequences on trees up to depth 3 (memory ledger), checked against the model."""
    run_state_machine_as_test(lambda: BudgetTreeMachine(MemoryLedger), settings=STATEFUL)


def test_random_operations_keep_every_invariant_on_the_sqlite_ledger(
    sqlite_ledger: SqliteLedger,
) -> None:
    """The same properties on the SQLite ledger (every example a new root in one file)."""
    run_state_machine_as_test(
        lambda: BudgetTreeMachine(lambda: sqlite_ledger),
        settings=settings(STATEFUL, max_examples=40),
    )


# -- kernel bugs the properties above step around --------------------------------------------


@pytest.mark.parametrize(("split", "usd", "calls"), [(3, "0.30", 3), (3, "3", 6), (7, "0.07", 7)])
def test_split_gives_each_child_the_exact_floor_of_its_fraction(
    split: int, usd: str, calls: int
) -> None:
    """Money is exact: ``split=n`` gives floor(left / n) on every dimension. (Fails today:
    ``_fraction`` turns ``split`` into a 28-digit ``Decimal(1) / n`` that is below 1/n, and
    ``_shared`` floors the product, so split=3 of $0.30 gives $0.099999999 and split=3 of
    3 calls gives 0 calls.)"""
    root = Budget(usd=usd, llm_calls=calls)
    child = root.allot("part", split=split)
    left_nano = int(Decimal(usd).scaleb(9))
    assert child.limits.usd == dollars(left_nano // split)
    assert child.limits.llm_calls == calls // split


def test_a_settle_that_fails_in_the_ledger_can_be_retried(tmp_path: Path) -> None:
    """Exactly-once means once, not zero times: if the ledger fails during a settle (here:
    another connection holds the SQLite write lock past the timeout), the hold is still
    open, and settling it again charges it. (Fails today: ``Hold.settle`` marks the hold
    ended before the ledger call, so the retry raises HoldEnded, the spend is never
    recorded and the hold keeps its money until its ttl.)"""
    path = tmp_path / "l.db"
    ledger = SqliteLedger(f"sqlite:///{path}", timeout=0.05, retries=2)
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        budget = Budget(usd=1, name="run", ledger=ledger)
        hold = budget.hold(call(100_000_000))
        raw.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerError):
            hold.settle(call(50_000_000))
        raw.execute("ROLLBACK")
        assert not hold.ended
        hold.settle(call(50_000_000))
        assert budget.spent.usd == Decimal("0.05")
        assert budget.held.usd == 0
    finally:
        raw.close()
        ledger.close()


def test_a_close_that_fails_in_the_ledger_can_be_retried(tmp_path: Path) -> None:
    """A budget whose close failed in the ledger is still open, so closing it again
    returns its unspent escrow. (Fails today: ``Budget.close`` marks the handle closed
    before the ledger call, so the retry is a no-op and the escrow never returns.)"""
    path = tmp_path / "l.db"
    ledger = SqliteLedger(f"sqlite:///{path}", timeout=0.05, retries=2)
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        root = Budget(usd=1, name="run", ledger=ledger)
        child = root.allot("worker", usd="0.40")
        raw.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerError):
            child.close()
        raw.execute("ROLLBACK")
        child.close()
        assert child.closed == ledger.state(child.id).closed
        assert root.remaining.usd == Decimal(1)
    finally:
        raw.close()
        ledger.close()


# -- concurrency: threads -----------------------------------------------------------------------


def fixed_tree(ledger: Ledger, usd: str, calls: int) -> tuple[Budget, list[Budget]]:
    """A root capped at ``usd`` and ``calls``; a (30% escrowed) with a/x (a third of that,
    and 5% of the calls); b (no limits of its own) with b/y (half of what is left). Sized
    by each test so the caps start refusing partway through the run."""
    root = Budget(usd=usd, llm_calls=calls, name="shared", ledger=ledger)
    a = root.allot("a", usd=Decimal(usd) * Decimal("0.3"))
    x = a.allot("x", usd=Decimal(usd) * Decimal("0.1"), llm_calls=calls // 20)
    b = root.allot("b")
    y = b.allot("y", share="0.5")
    return root, [root, a, x, b, y]


def parent_id(node_id: str) -> str | None:
    head, sep, _ = node_id.rpartition("/")
    return head if sep else None


def subtree_sums(own: dict[str, Decimal], ids: list[str]) -> dict[str, Decimal]:
    """Each node's own settled dollars summed over its subtree, by path alone."""
    out = dict.fromkeys(ids, Decimal(0))
    for node_id, x in own.items():
        up: str | None = node_id
        while up is not None:
            out[up] = out.get(up, Decimal(0)) + x
            up = parent_id(up)
    return out


class Monitor:
    """Reads whole-tree snapshots while workers run and records every node whose committed
    amount passed its limit (a snapshot is one atomic ledger read)."""

    def __init__(self, ledger: Ledger, root: str) -> None:
        self.ledger, self.root = ledger, root
        self.violations: list[tuple[str, str, int, int]] = []
        self.snapshots = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            time.sleep(0.001)

    def check(self) -> None:
        for s in self.ledger.tree(self.root):
            for dim, limit in s.limits.items():
                if s.committed.get(dim, 0) > limit or s.spent.get(dim, 0) > limit:
                    self.violations.append((s.id, dim, s.committed.get(dim, 0), limit))
        self.snapshots += 1

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.check()


@dataclass
class Tally:
    """What one worker was admitted and charged, by node path."""

    settled: dict[str, Decimal] = field(default_factory=dict)
    calls: int = 0
    admitted: int = 0
    released: int = 0
    refused: int = 0

    def add(self, node: str, usd: Decimal) -> None:
        self.settled[node] = self.settled.get(node, Decimal(0)) + usd
        self.calls += 1

    def merge(self, other: Tally) -> None:
        for node, x in other.settled.items():
            self.settled[node] = self.settled.get(node, Decimal(0)) + x
        self.calls += other.calls
        self.admitted += other.admitted
        self.released += other.released
        self.refused += other.refused


def random_ops(rng: random.Random, nodes: list[Budget], ops: int, tally: Tally) -> None:
    """Reserve on random nodes (sometimes a child of its own, opened and closed here),
    keep a few holds open, and end each with a settle within its hold or a release."""
    open_holds: list[Hold] = []
    own: list[Budget] = []
    for _ in range(ops):
        r = rng.random()
        if r < 0.08 and len(own) < 2:
            parent = rng.choice(nodes)
            try:
                if rng.random() < 0.5:
                    own.append(parent.allot("eph", usd=dollars(rng.randint(0, 800_000))))
                else:
                    own.append(parent.allot("eph"))
            except BudgetExceeded:
                tally.refused += 1
        elif r < 0.12 and own:
            child = own.pop(rng.randrange(len(own)))
            for h in [h for h in open_holds if h.budget is child]:
                open_holds.remove(h)
                h.release()
                tally.released += 1
            child.close()
        elif r < 0.6 or not open_holds:
            target = rng.choice(nodes + own)
            try:
                open_holds.append(target.hold(call(rng.randint(1, 300_000))))
                tally.admitted += 1
            except BudgetExceeded:
                tally.refused += 1
        else:
            h = open_holds.pop(rng.randrange(len(open_holds)))
            if rng.random() < 0.2:
                h.release()
                tally.released += 1
            else:
                assert h.reserved.usd is not None
                actual = dollars(rng.randint(0, in_units({"usd": h.reserved.usd})["usd"]))
                h.settle(Usage(usd=actual, llm_calls=1))
                tally.add(h.budget.id, actual)
    for h in open_holds:
        h.release()
        tally.released += 1
    for child in own:
        child.close()


def check_totals(ledger: Ledger, root: Budget, nodes: list[Budget], tally: Tally) -> None:
    """Afterwards: nothing held, conservation on every node, and each node's spend the
    exact Decimal sum of the settles recorded in its subtree."""
    states = {s.id: s for s in ledger.tree(root.id)}
    sums = subtree_sums(tally.settled, list(states))
    for s in states.values():
        assert (s.held, s.open_holds) == ({}, 0), s.id
        for dim, limit in s.limits.items():
            assert s.committed.get(dim, 0) <= limit, (s.id, dim)
        assert s.spent.get("usd", 0) == in_units({"usd": sums[s.id]}).get("usd", 0), s.id
    for b in nodes:
        assert b.spent.usd == sums[b.id]
    assert root.spent.usd == sum(tally.settled.values(), Decimal(0))
    assert root.spent.llm_calls == tally.calls
    assert sum(s.refusals for s in states.values()) == tally.refused
    for b in reversed(nodes[1:]):
        b.close()
    after = root.state()
    assert nonzero(dict(after.committed)) == nonzero(dict(after.spent))


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Make the interpreter switch threads every few bytecodes, so races show up."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(saved)


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize(
    ("backend", "threads", "ops", "usd", "calls"),
    [("memory", 8, 1500, "0.4", 4000), ("sqlite", 4, 200, "0.03", 400)],
)
def test_threads_hammering_one_tree_conserve_and_total_exactly(
    backend: str, threads: int, ops: int, usd: str, calls: int, tmp_path: Path
) -> None:
    """Invariants 1, 3 and 5 under threads: N threads reserving, settling, releasing,
    allotting and closing on one tree never let a snapshot show committed > limit, and
    afterwards every node has spent exactly the Decimal sum of what the threads settled."""
    ledger: Ledger = (
        MemoryLedger() if backend == "memory" else SqliteLedger(f"sqlite:///{tmp_path / 'l.db'}")
    )
    try:
        root, nodes = fixed_tree(ledger, usd, calls)
        tallies = [Tally() for _ in range(threads)]
        errors: list[BaseException] = []
        start = threading.Barrier(threads)

        def work(i: int) -> None:
            try:
                start.wait()
                random_ops(random.Random(1000 + i), nodes, ops, tallies[i])
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        with Monitor(ledger, root.id) as monitor:
            workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
        assert errors == []
        assert monitor.violations == []
        assert monitor.snapshots > 1
        tally = Tally()
        for part in tallies:
            tally.merge(part)
        assert tally.admitted == tally.calls + tally.released
        assert tally.refused > 0  # the caps bound: the property was exercised
        check_totals(ledger, root, nodes, tally)
    finally:
        if isinstance(ledger, SqliteLedger):
            ledger.close()


# -- concurrency: asyncio -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_asyncio_tasks_reserving_across_awaits_conserve_and_total_exactly(
    backend: str, tmp_path: Path
) -> None:
    """Invariants 1 and 5 under asyncio: 300 tasks each reserve, await (the network call),
    then settle, three times over, on one tree: while they are suspended no node is over
    its limit, and afterwards the spend is the exact sum of what they settled."""
    ledger: Ledger = (
        MemoryLedger() if backend == "memory" else SqliteLedger(f"sqlite:///{tmp_path / 'l.db'}")
    )
    try:
        root, nodes = fixed_tree(ledger, "0.03", 300)
        monitor = Monitor(ledger, root.id)
        tally = Tally()
        suspended = 0
        most_suspended = 0

        async def task(i: int) -> None:
            nonlocal suspended, most_suspended
            rng = random.Random(i)
            for _ in range(3):
                target = rng.choice(nodes)
                try:
                    hold = target.hold(call(rng.randint(1, 300_000)))
                except BudgetExceeded:
                    tally.refused += 1
                    await asyncio.sleep(0)
                    continue
                tally.admitted += 1
                suspended += 1
                most_suspended = max(most_suspended, suspended)
                await asyncio.sleep(0)
                monitor.check()
                await asyncio.sleep(0)
                suspended -= 1
                if rng.random() < 0.2:
                    hold.release()
                    tally.released += 1
                else:
                    actual = dollars(rng.randint(0, 300_000))
                    actual = min(actual, hold.reserved.usd or Decimal(0))
                    hold.settle(Usage(usd=actual, llm_calls=1))
                    tally.add(target.id, actual)

        await asyncio.gather(*(task(i) for i in range(300)))
        assert monitor.violations == []
        assert most_suspended > 10  # holds really were open across awaits together
        assert tally.refused > 0
        assert tally.admitted == tally.calls + tally.released
        check_totals(ledger, root, nodes, tally)
    finally:
        if isinstance(ledger, SqliteLedger):
            ledger.close()


# -- concurrency: processes on one SQLite file --------------------------------------------------

PROCESSES = 4
PROCESS_OPS = 150
SHARED_USD = "0.03"


def _process_worker(url: str, index: int, out: str) -> None:
    """One process: reopen the shared root by name, try to open an escrowed child, run
    random operations on both, and record what it settled by node."""
    root = Budget(usd=SHARED_USD, name="shared", ledger=url)
    nodes = [root]
    tally = Tally()
    try:
        nodes.append(root.allot(f"w{index}", usd="0.004"))
    except BudgetExceeded:
        tally.refused += 1
    random_ops(random.Random(index), nodes, PROCESS_OPS, tally)
    for child in nodes[1:]:
        child.close()
    result = {
        "settled": {k: str(v) for k, v in tally.settled.items()},
        "calls": tally.calls,
        "admitted": tally.admitted,
        "released": tally.released,
        "refused": tally.refused,
    }
    Path(out).write_text(json.dumps(result))


if __name__ == "__invariants_worker__":
    _process_worker(*globals()["WORKER_ARGS"])


@pytest.mark.slow
def test_processes_sharing_one_sqlite_ledger_conserve_and_total_exactly(tmp_path: Path) -> None:
    """Invariants 1, 3 and 5 across processes: four spawned processes, each opening the
    root "shared" by name on one SQLite file, reserve/settle/release on it and on children;
    no snapshot taken meanwhile shows a node over its limit, and afterwards the root has
    spent exactly the Decimal sum of every process's settles, with nothing held."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = SqliteLedger(url)
    try:
        root = Budget(usd=SHARED_USD, name="shared", ledger=ledger)
        ctx = multiprocessing.get_context("spawn")
        outs = [tmp_path / f"worker-{i}.json" for i in range(PROCESSES)]
        procs = [
            ctx.Process(
                target=runpy.run_path,
                args=(__file__,),
                kwargs={
                    "init_globals": {"WORKER_ARGS": (url, i, str(outs[i]))},
                    "run_name": "__invariants_worker__",
                },
            )
            for i in range(PROCESSES)
        ]
        with Monitor(ledger, root.id) as monitor:
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * PROCESSES
        assert monitor.violations == []
        tally = Tally()
        for out in outs:
            r = json.loads(out.read_text())
            part = Tally(
                settled={k: Decimal(v) for k, v in r["settled"].items()},
                calls=r["calls"],
                admitted=r["admitted"],
                released=r["released"],
                refused=r["refused"],
            )
            tally.merge(part)
        assert tally.admitted == tally.calls + tally.released > 0
        check_totals(ledger, root, [root], tally)
        assert len(root.state().children) > 0
    finally:
        ledger.close()
