"""Budgets: affine handles on ledger nodes, and the reserve-then-settle call lifecycle."""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from ._call import Call
from ._clock import Clock, SystemClock
from ._context import _current
from ._errors import (
    AffineError,
    BudgetClosed,
    BudgetExceeded,
    ConfigurationError,
    DeadlineExceeded,
    HoldEnded,
    InvalidAmount,
    RateWindowExceeded,
    UnknownPrice,
)
from ._events import Event, EventKind
from ._ledger import Ledger, NodeSpec, NodeState, Refusal
from ._limits import Limits, Spawn
from ._money import from_nano, to_decimal, to_nano
from ._plugins import Plugins, plugins
from ._pricing import Price
from ._usage import Estimate, Usage

if TYPE_CHECKING:
    from ._report import Report

UnknownPricePolicy = Literal["fail", "allow"]

_TOKEN_DIMS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "llm_calls",
    "tool_calls",
)


# -- hold ids: unique across threads and processes, cheap to make -----------------------

_ids = itertools.count(1)
_id_pid = -1
_id_prefix = ""


def _hold_id() -> str:
    global _id_pid, _id_prefix
    if _id_pid != os.getpid():  # a forked child must not reuse its parent's ids
        _id_pid = os.getpid()
        _id_prefix = os.urandom(6).hex()
    return f"{_id_prefix}-{next(_ids)}"


# -- usage <-> ledger amounts -----------------------------------------------------------


def amounts_of(usage: Usage, usd_nano: int | None, *, markers: bool) -> dict[str, int]:
    """Ledger amounts for ``usage``; ``markers`` adds the estimated/unpriced counters."""
    out: dict[str, int] = {}
    for dim in _TOKEN_DIMS:
        value = getattr(usage, dim)
        if value:
            out[dim] = value
    total = usage.input_tokens + usage.output_tokens
    if total:
        out["total_tokens"] = total
    for tool, count in usage.tools:
        if count:
            out[f"tool:{tool}"] = count
    if usd_nano:
        out["usd"] = usd_nano
    if markers:
        if usage.estimated:
            out["estimated_calls"] = 1
        if usd_nano is None:
            out["unpriced_calls"] = 1
    return out


def usage_of(amounts: Mapping[str, int]) -> Usage:
    """The Usage a ledger's amounts stand for (``usd`` is None if any call was unpriced)."""
    tools = tuple(sorted((d[5:], x) for d, x in amounts.items() if d.startswith("tool:") and x))
    return Usage(
        input_tokens=amounts.get("input_tokens", 0),
        output_tokens=amounts.get("output_tokens", 0),
        cache_read_tokens=amounts.get("cache_read_tokens", 0),
        cache_write_tokens=amounts.get("cache_write_tokens", 0),
        reasoning_tokens=amounts.get("reasoning_tokens", 0),
        llm_calls=amounts.get("llm_calls", 0),
        tool_calls=amounts.get("tool_calls", 0),
        tools=tools,
        usd=None if amounts.get("unpriced_calls") else from_nano(amounts.get("usd", 0)),
        estimated=bool(amounts.get("estimated_calls")),
    )


# -- what a whole tree shares -------------------------------------------------------------


class _Tree:
    """Configuration shared by a root budget and all its descendants."""

    __slots__ = ("clock", "hold_ttl", "ledger", "plugins", "prices", "unknown_price")

    def __init__(
        self,
        ledger: Ledger,
        plugins: Plugins,
        clock: Clock,
        prices: Mapping[str, Price],
        unknown_price: UnknownPricePolicy | Price,
        hold_ttl: float | None,
    ) -> None:
        self.ledger = ledger
        self.plugins = plugins
        self.clock = clock
        self.prices = dict(prices)
        self.unknown_price = unknown_price
        self.hold_ttl = hold_ttl

    def price(
        self, model: str | None, provider: str | None, usage: Usage, *, reserving: bool
    ) -> Decimal | None:
        if model is not None:
            override = self.prices.get(model)
            if override is not None:
                cost: Decimal | None = override.cost(usage, reserving=reserving)
                return cost
        cost = self.plugins.price(model, provider, usage, reserving)
        if cost is None and isinstance(self.unknown_price, Price):
            cost = self.unknown_price.cost(usage, reserving=reserving)
        return cost


# -- budgets ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Remaining:
    """What a budget can still spend, the tightest of it and its ancestors.
    ``None`` means unlimited."""

    usd: Decimal | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    llm_calls: int | None = None
    tool_calls: int | None = None
    per_tool: Mapping[str, int] | None = None


class Budget:
    """A budget: a node in a tree of budgets, held by exactly one handle.

    ``Budget(usd="0.50", llm_calls=40, name="run")`` makes a root on a fresh in-memory
    ledger; ``ledger="sqlite:///runs.db"`` keeps it on disk. A root on a shared ledger is
    found again by name: opening it with the same limits, or with none (to join it as it
    is), shares it; other limits raise ``ConfigurationError`` unless ``update_limits=True``
    says the owner means to change them. ``allot()`` carves out a child; ``activate()``
    makes it the current budget. Handles cannot be copied or pickled; a closed budget
    refuses every operation.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_id",
        "_limits",
        "_lock",
        "_moved",
        "_name",
        "_parent",
        "_path",
        "_tree",
        "_usd_capped",
    )

    _id: str
    _name: str
    _path: str
    _parent: Budget | None
    _limits: Limits
    _tree: _Tree
    _closed: bool
    _usd_capped: bool
    _lock: threading.Lock

    def __init__(
        self,
        usd: object = None,
        *,
        input_tokens: object = None,
        output_tokens: object = None,
        total_tokens: object = None,
        llm_calls: object = None,
        tool_calls: object = None,
        per_tool: Mapping[str, object] | None = None,
        deadline: object = None,
        rate: object = None,
        period: object = None,
        name: str = "budget",
        ledger: str | Ledger = "memory://",
        prices: Mapping[str, Price] | None = None,
        unknown_price: UnknownPricePolicy | Price = "fail",
        hold_ttl: float | None = None,
        clock: Clock | None = None,
        update_limits: bool = False,
    ) -> None:
        _check_name(name, root=True)
        if unknown_price not in ("fail", "allow") and not isinstance(unknown_price, Price):
            raise ConfigurationError(
                f"unknown_price must be 'fail', 'allow' or a Price, not {unknown_price!r}"
            )
        if prices is not None and not all(isinstance(p, Price) for p in prices.values()):
            raise ConfigurationError("prices must map model names to allotment.Price")
        clock = clock or SystemClock()
        limits = Limits.build(
            usd=usd,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
            llm_calls=llm_calls,
            tool_calls=tool_calls,
            per_tool=per_tool,
            deadline=deadline,
            rate=rate,
            period=period,
            now=clock.now(),
        )
        pl = plugins()
        store = pl.ledger(ledger) if isinstance(ledger, str) else ledger
        if hold_ttl is None and not store.url.startswith("memory:"):
            hold_ttl = 3600.0  # a process that dies mid-call must not hold money forever
        tree = _Tree(store, pl, clock, prices or {}, unknown_price, hold_ttl)
        spec = NodeSpec(
            name=name,
            parent=None,
            limits=limits.amounts(),
            rates=_rate_specs(limits),
            deadline=limits.deadline,
            period=limits.period,
        )
        spec, limits = _reopen(store, spec, limits, update_limits)
        state = store.open(spec, clock.now())
        assert isinstance(state, NodeState)  # roots are never refused
        self._setup(state, None, limits, tree)
        self._emit("open", detail={"limits": dict(spec.limits)})

    def _setup(self, state: NodeState, parent: Budget | None, limits: Limits, tree: _Tree) -> None:
        self._id = state.id
        self._name = state.name
        self._path = state.path
        self._parent = parent
        self._limits = limits
        self._tree = tree
        self._closed = False
        self._moved = False
        self._lock = threading.Lock()
        self._usd_capped = limits.usd is not None or (parent is not None and parent._usd_capped)

    # -- affine handles ------------------------------------------------------------------

    def __copy__(self) -> NoReturn:
        raise AffineError(
            f"budget {self._path!r} cannot be copied: one budget, one handle. "
            f"Use budget.allot(name, ...) to give work its own share"
        )

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__copy__()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise AffineError(
            f"budget {self._path!r} cannot be pickled; pass it to another process with an "
            f"exported capability token, not by copying"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Budget {self._path!r} {state}>"

    # -- identity --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The budget's own name."""
        return self._name

    @property
    def path(self) -> str:
        """Its path in the tree, ``root/supervisor/researcher`` (``#2`` marks a sibling of
        the same name)."""
        return self._path

    @property
    def id(self) -> str:
        """Its ledger id (the path)."""
        return self._id

    @property
    def parent(self) -> Budget | None:
        """The budget it was allotted from, ``None`` for a root."""
        return self._parent

    @property
    def limits(self) -> Limits:
        """Its own limits (ancestors' limits apply too)."""
        return self._limits

    @property
    def ledger(self) -> Ledger:
        """Where its state lives."""
        return self._tree.ledger

    @property
    def clock(self) -> Clock:
        """The clock the budget reads."""
        return self._tree.clock

    @property
    def closed(self) -> bool:
        """True once closed; a closed budget refuses every operation."""
        return self._closed

    def _check_open(self) -> None:
        if self._moved:
            raise BudgetClosed(
                f"budget {self._path!r} was exported to another process; this handle no "
                f"longer spends it",
                path=self._path,
                limit_name="closed",
            )
        if self._closed:
            raise BudgetClosed(
                f"budget {self._path!r} is closed; it refuses every operation",
                path=self._path,
                limit_name="closed",
            )

    # -- state -------------------------------------------------------------------------------

    def state(self) -> NodeState:
        """A snapshot of the ledger node."""
        return self._tree.ledger.state(self._id)

    @property
    def spent(self) -> Usage:
        """What this budget and its descendants have spent (settled)."""
        return usage_of(self.state().spent)

    @property
    def held(self) -> Usage:
        """What open holds of this budget and its descendants have reserved."""
        return usage_of(self.state().held)

    @property
    def remaining(self) -> Remaining:
        """What can still be spent here, given this budget's and its ancestors' limits."""
        avail: dict[str, int] = {}
        escrowed: set[str] = set()
        ledger = self._tree.ledger
        node: str | None = self._id
        while node is not None:
            st = ledger.state(node)
            for dim, limit in st.limits.items():
                if dim in escrowed:
                    continue
                left = max(0, limit - st.committed.get(dim, 0))
                avail[dim] = min(avail.get(dim, left), left)
            if st.parent is not None:
                escrowed.update(st.limits)  # the ancestors already set this aside
            node = st.parent
        tools = {d[5:]: x for d, x in avail.items() if d.startswith("tool:")}
        return Remaining(
            usd=from_nano(avail["usd"]) if "usd" in avail else None,
            input_tokens=avail.get("input_tokens"),
            output_tokens=avail.get("output_tokens"),
            total_tokens=avail.get("total_tokens"),
            llm_calls=avail.get("llm_calls"),
            tool_calls=avail.get("tool_calls"),
            per_tool=tools or None,
        )

    def report(self) -> Report:
        """The budget tree from here down: limits, spent, held, calls, tokens, refusals."""
        from ._report import build_report

        return build_report(self._tree.ledger.tree(self._id))

    # -- the tree --------------------------------------------------------------------------

    def allot(
        self,
        name: str,
        usd: object = None,
        *,
        input_tokens: object = None,
        output_tokens: object = None,
        total_tokens: object = None,
        llm_calls: object = None,
        tool_calls: object = None,
        per_tool: Mapping[str, object] | None = None,
        deadline: object = None,
        rate: object = None,
        share: object = None,
        split: int | None = None,
        limits: Limits | None = None,
    ) -> Budget:
        """Carve out a child budget, escrowed: its limits are taken from this budget now,
        only the child can spend them, and what it leaves returns when it closes.

        Give limits explicitly, or ``share=0.25`` (a fraction of what is left on every
        capped dimension), or ``split=3`` (an even third). With neither, the child has no
        limits of its own: its spend is attributed to it and counts against this budget's.
        """
        self._check_open()
        _check_name(name, root=False)
        now = self._tree.clock.now()
        explicit = Limits.build(
            usd=usd,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
            llm_calls=llm_calls,
            tool_calls=tool_calls,
            per_tool=per_tool,
            deadline=deadline,
            rate=rate,
            now=now,
        )
        if limits is not None:
            if not explicit.unlimited:
                raise ConfigurationError("give either limits= or individual limits, not both")
            explicit = limits
        if share is not None or split is not None:
            if share is not None and split is not None:
                raise ConfigurationError("give share= or split=, not both")
            if explicit.amounts():
                raise ConfigurationError(
                    "give a share (share= or split=) or explicit limits, not both"
                )
            fraction = _fraction(share, split)
            explicit = _shared(self.remaining, fraction, explicit)
        spec = NodeSpec(
            name=name,
            parent=self._id,
            limits=explicit.amounts(),
            rates=_rate_specs(explicit),
            deadline=explicit.deadline,
        )
        result = self._tree.ledger.open(spec, now)
        if isinstance(result, Refusal):
            err = self._error(result, asked_what=f"allotting {name!r}")
            self._emit("refuse", detail={"child": name, "limit": result.dim})
            self._tree.plugins.budget_exceeded(self, err)
            raise err
        child = Budget.__new__(Budget)
        child._setup(result, self, explicit, self._tree)
        child._emit("open", detail={"limits": dict(spec.limits), "escrow": bool(spec.limits)})
        return child

    def spawn(self, spawn: Spawn, limits: object = None) -> Budget:
        """Open a child for a sub-agent an integration detected.

        Its limits are ``limits`` when the user configured some for this sub-agent
        (a Limits, a dollar amount or a mapping), else the child-limits hook's answer,
        else none of its own (its spend still counts on every ancestor).
        """
        chosen = (
            Limits.of(limits, now=self._tree.clock.now())
            if limits is not None
            else self._tree.plugins.child_limits(self, spawn) or Limits()
        )
        name = spawn.name.replace("/", "_").replace("#", "_").strip() or spawn.how
        return self.allot(name, limits=chosen)

    def close(self) -> None:
        """Close this budget and its open descendants; unspent escrow returns to the parent.
        Open holds can still be settled. Closing twice is a no-op."""
        with self._lock:
            if self._closed:
                return
            # Closed only once the ledger agrees: a close that failed there can be retried.
            closed = self._tree.ledger.close(self._id, self._tree.clock.now())
            self._closed = True
        if closed and self._tree.plugins.wants_events:
            for node in closed:
                st = self._tree.ledger.state(node)
                self._tree.plugins.event(
                    Event(
                        kind="close",
                        path=st.path,
                        at=self._tree.clock.now(),
                        usage=usage_of(st.spent),
                        usd=usage_of(st.spent).usd,
                        detail={
                            "returned": {
                                d: max(0, lim - st.committed.get(d, 0))
                                for d, lim in st.limits.items()
                            }
                        },
                    )
                )

    def export(self, key: bytes, *, ttl: float = 3600.0) -> str:
        """Move this budget to another process or machine: a signed capability token
        (HMAC-SHA256 under ``key``) naming this budget, valid for ``ttl`` seconds.

        The other side calls ``Budget.attach(token, key=key)`` on the same ledger (SQLite
        on one machine, Redis across machines). This handle then refuses every operation:
        one budget, one spender. Children it had stay with this process.
        """
        from ._capability import export_token

        self._check_open()
        token = export_token(self._tree.ledger, self._id, key, ttl, now=self._tree.clock.now())
        self._moved = True
        self._emit("close", detail={"exported": True})
        return token

    @classmethod
    def attach(
        cls,
        token: str,
        *,
        key: bytes,
        ledger: str | Ledger | None = None,
        prices: Mapping[str, Price] | None = None,
        unknown_price: UnknownPricePolicy | Price = "fail",
        hold_ttl: float | None = None,
        clock: Clock | None = None,
    ) -> Budget:
        """Take over a budget exported by another process (see ``export``).

        ``ledger`` defaults to the one the token names (give it when the URL needs a
        password, which a token never carries). A tampered, expired, already redeemed or
        closed token raises ``CapabilityError`` and grants nothing.
        """
        from ._capability import read_token, redeem_token

        clock = clock or SystemClock()
        pl = plugins()
        if ledger is None:
            ledger = read_token(token, key, now=clock.now()).ledger
            if ledger.startswith("memory:"):
                raise ConfigurationError(
                    "the token names an in-memory ledger, which lives in one process: pass "
                    "ledger=<the exporting budget's .ledger>, or export from a sqlite:/// or "
                    "redis:// ledger to move a budget to another process"
                )
        store = pl.ledger(ledger) if isinstance(ledger, str) else ledger
        node = redeem_token(token, key, store, now=clock.now())
        if hold_ttl is None and not store.url.startswith("memory:"):
            hold_ttl = 3600.0
        tree = _Tree(store, pl, clock, prices or {}, unknown_price, hold_ttl)
        state = store.state(node)
        budget = cls.__new__(cls)
        budget._setup(state, None, _limits_of(state), tree)
        parent = state.parent
        while parent is not None and not budget._usd_capped:
            up = store.state(parent)
            budget._usd_capped = "usd" in up.limits
            parent = up.parent
        budget._emit("open", detail={"attached": True})
        return budget

    def __enter__(self) -> Budget:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def activate(self) -> Iterator[Budget]:
        """Make this the current budget for code run inside (``allotment.current()``).

        Context-local: asyncio tasks and ``contextvars.copy_context()`` threads started
        inside see it; raw threads do not.
        """
        self._check_open()
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    # -- the call lifecycle ------------------------------------------------------------------

    def estimate(self, call: Call) -> tuple[Estimate, Decimal | None]:
        """The upper bound a hold for ``call`` would reserve, and its price."""
        est = self._tree.plugins.estimate(call)
        if est is None:
            raise ConfigurationError(
                "no estimator answered; the default estimator plugin was unregistered"
            )
        usd = self._tree.price(call.model, call.provider, est.usage, reserving=True)
        if self._unpriced_refused(usd, call):
            self._emit("refuse", model=call.model, detail={"limit": "price"})
            raise UnknownPrice(call.model, self._path)
        return est, usd

    def _unpriced_refused(self, usd: Decimal | None, call: Call | None) -> bool:
        """Fail closed: an unpriced model call under a dollar cap is refused by default."""
        return (
            usd is None
            and self._usd_capped
            and (call is None or call.kind != "tool")
            and self._tree.unknown_price != "allow"
        )

    def affordable_output(self, call: Call) -> int | None:
        """Clamp policy: the most output tokens ``call`` can ask for given what is left.

        For integrations that can set the request's max output: sending this cap instead
        of the model's maximum lets a nearly spent budget still make a short call rather
        than be refused. ``None`` when nothing limits output; 0 when even the input does
        not fit.
        """
        left = self.remaining
        est = self._tree.plugins.estimate(replace(call, max_output_tokens=0))
        if est is None:
            raise ConfigurationError("no estimator answered")
        caps = [] if left.output_tokens is None else [left.output_tokens]
        if left.total_tokens is not None:
            caps.append(max(0, left.total_tokens - est.usage.input_tokens))
        if left.usd is not None:
            base = self._tree.price(call.model, call.provider, est.usage, reserving=True)
            probe = replace(est.usage, output_tokens=1_000_000)
            top = self._tree.price(call.model, call.provider, probe, reserving=True)
            if base is None or top is None:
                return 0 if self._unpriced_refused(None, call) else (min(caps) if caps else None)
            per_token = (top - base) / 1_000_000
            room = left.usd - base
            if room < 0:
                return 0
            if per_token > 0:
                caps.append(int((room / per_token).to_integral_value(ROUND_FLOOR)))
        if call.max_output_tokens is not None:
            caps.append(call.max_output_tokens)
        return min(caps) if caps else None

    def reserve(self, call: Call, *, wait: bool = True) -> Hold:
        """Reserve an upper bound of ``call`` on this budget and every ancestor.

        Raises ``BudgetExceeded`` (or ``UnknownPrice``, ``DeadlineExceeded``,
        ``RateWindowExceeded``) before anything is sent. A call that does not fit a rate
        window waits for it up to the window's ``max_wait``; with ``wait=False`` (for code
        running on an event loop's thread) it raises ``RateWindowExceeded`` at once, whose
        ``retry_after`` says when to try again.
        """
        self._check_open()
        self._tree.plugins.before_call(self, call)
        est, usd = self.estimate(call)
        return self._reserve(est.usage, usd, call, est, wait=wait)

    async def areserve(self, call: Call) -> Hold:
        """``reserve`` for asyncio: waits for rate windows without blocking the loop."""
        self._check_open()
        self._tree.plugins.before_call(self, call)
        est, usd = self.estimate(call)
        amounts = amounts_of(est.usage, None if usd is None else to_nano(usd), markers=False)
        waited = 0.0
        while True:
            hold_id = _hold_id()
            refusal = self._ledger_reserve(hold_id, amounts)
            if refusal is None:
                return self._admitted(hold_id, amounts, est.usage, usd, call, est)
            pause = self._wait_for(refusal, waited, est.usage, usd, call)
            await self._tree.clock.asleep(pause)
            waited += pause

    def hold(self, bound: Usage, *, call: Call | None = None, wait: bool = True) -> Hold:
        """Reserve an explicit upper bound (priced by ``bound.usd``, else by the price
        hook for ``call.model``), for integrations that make their own estimate."""
        self._check_open()
        usd = bound.usd
        if usd is None and call is not None:
            usd = self._tree.price(call.model, call.provider, bound, reserving=True)
        if self._unpriced_refused(usd, call):
            raise UnknownPrice(call.model if call else None, self._path)
        return self._reserve(bound, usd, call, None, wait=wait)

    def _reserve(
        self,
        bound: Usage,
        usd: Decimal | None,
        call: Call | None,
        est: Estimate | None,
        *,
        wait: bool = True,
    ) -> Hold:
        amounts = amounts_of(bound, None if usd is None else to_nano(usd), markers=False)
        waited = 0.0
        while True:
            hold_id = _hold_id()
            refusal = self._ledger_reserve(hold_id, amounts)
            if refusal is None:
                return self._admitted(hold_id, amounts, bound, usd, call, est)
            pause = self._wait_for(refusal, waited, bound, usd, call, wait=wait)
            self._tree.clock.sleep(pause)
            waited += pause

    def _ledger_reserve(self, hold_id: str, amounts: Mapping[str, int]) -> Refusal | None:
        tree = self._tree
        return tree.ledger.reserve(self._id, hold_id, amounts, tree.clock.now(), tree.hold_ttl)

    def _admitted(
        self,
        hold_id: str,
        amounts: dict[str, int],
        bound: Usage,
        usd: Decimal | None,
        call: Call | None,
        est: Estimate | None,
    ) -> Hold:
        reserved = bound if usd is bound.usd else bound.with_cost(usd)
        hold = Hold(self, hold_id, amounts, reserved, call, est)
        if self._tree.plugins.wants_events:
            self._emit("reserve", hold=hold_id, model=_model(call), usage=hold.reserved, usd=usd)
        return hold

    def _wait_for(
        self,
        refusal: Refusal,
        waited: float,
        bound: Usage,
        usd: Decimal | None,
        call: Call | None,
        *,
        wait: bool = True,
    ) -> float:
        """How long to wait before retrying a rate refusal; raises for any other."""
        if wait and refusal.kind == "rate" and refusal.retry_after is not None:
            max_wait = self._max_wait(refusal)
            pause = max(refusal.retry_after, 1e-3)
            if waited + pause <= max_wait:
                return pause
        err = self._error(refusal, usage=bound, usd=usd, waited=waited)
        self._emit(
            "refuse",
            model=_model(call),
            usage=bound,
            usd=usd,
            detail={"limit": refusal.dim, "refused_by": refusal.path, "kind": refusal.kind},
        )
        self._tree.plugins.budget_exceeded(self, err)
        raise err

    def _max_wait(self, refusal: Refusal) -> float:
        node: Budget | None = self
        while node is not None:
            if node._id == refusal.node:
                return max((r.max_wait or 0.0 for r in node._limits.rate), default=0.0)
            node = node._parent
        return 0.0

    def _error(
        self,
        refusal: Refusal,
        *,
        usage: Usage | None = None,
        usd: Decimal | None = None,
        waited: float = 0.0,
        asked_what: str | None = None,
    ) -> BudgetExceeded:
        if refusal.kind == "closed":
            return BudgetClosed(
                f"budget {refusal.path!r} is closed; it refuses every operation",
                path=refusal.path,
                limit_name="closed",
            )
        if refusal.kind == "deadline":
            return DeadlineExceeded(
                f"budget {refusal.path!r} is past its deadline; no more calls are admitted",
                path=refusal.path,
                limit_name="deadline",
            )

        def value(x: int | None) -> Any:
            if x is None:
                return None
            return from_nano(x) if refusal.dim.startswith("usd") else x

        kw: dict[str, Any] = dict(
            path=refusal.path,
            limit_name=refusal.dim,
            limit=value(refusal.limit),
            spent=value(refusal.spent),
            held=value(refusal.held),
            asked=value(refusal.asked),
        )
        if refusal.kind == "rate":
            retry = math.inf if refusal.retry_after is None else refusal.retry_after
            when = (
                "it never fits: it alone is larger than the window's limit"
                if math.isinf(retry)
                else f"it would fit in {_seconds(retry)}"
            )
            msg = (
                f"budget {refusal.path!r}: this call does not fit the window of "
                f"{refusal.dim} (limit {kw['limit']}, used {kw['spent']}, asked {kw['asked']}) "
                f"after waiting {_seconds(waited)}; {when}"
            )
            return RateWindowExceeded(msg, retry_after=retry, **kw)
        err = BudgetExceeded(**kw)
        if asked_what:
            err.args = (str(err).replace("refused a call", f"refused {asked_what}"),)
        return err

    def charge(self, usage: Usage, *, call: Call | None = None) -> Usage:
        """Record spend that had no hold (advisory seams); never refused. Returns the
        priced usage."""
        self._check_open()
        priced = self._priced(usage, call, None)
        amounts = amounts_of(priced, _nano_or_none(priced.usd), markers=True)
        self._tree.ledger.charge(self._id, amounts, self._tree.clock.now())
        self._emit("charge", model=_model(call), usage=priced, usd=priced.usd)
        return priced

    def _priced(self, usage: Usage, call: Call | None, hold: Hold | None) -> Usage:
        if usage.usd is not None:
            return usage
        if call is not None and call.kind == "tool" and not usage.total_tokens:
            return usage.with_cost(Decimal(0))  # a tool call costs calls, not dollars
        model = call.model if call else None
        provider = call.provider if call else None
        usd = self._tree.price(model, provider, usage, reserving=False)
        if usd is None and hold is not None and hold.reserved.usd is not None:
            # The hold was priced, the settle could not be: charge the hold, flagged.
            return replace(usage, usd=hold.reserved.usd, estimated=True)
        return usage.with_cost(usd)

    def _emit(
        self,
        kind: EventKind,
        *,
        hold: str | None = None,
        model: str | None = None,
        usage: Usage | None = None,
        usd: Decimal | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        pl = self._tree.plugins
        if pl.wants_events:
            pl.event(
                Event(
                    kind=kind,
                    path=self._path,
                    at=self._tree.clock.now(),
                    hold=hold,
                    model=model,
                    usage=usage,
                    usd=usd,
                    detail=detail or {},
                )
            )


class Hold:
    """A reservation made before a call. It ends exactly once: ``settle`` with the
    provider's usage, ``settle_estimate`` when the provider gave none, or ``release``
    when the call never reached the provider.

    As a context manager it releases on an exception and settles its estimate if the
    block ends without an explicit settle.
    """

    __slots__ = ("_amounts", "_ended", "budget", "call", "estimate", "id", "reserved", "settled")

    def __init__(
        self,
        budget: Budget,
        hold_id: str,
        amounts: dict[str, int],
        reserved: Usage,
        call: Call | None,
        estimate: Estimate | None,
    ) -> None:
        self.budget = budget
        self.id = hold_id
        self._amounts = amounts
        self.reserved = reserved
        """The upper bound held (with its price in ``usd``)."""
        self.call = call
        self.estimate = estimate
        self.settled: Usage | None = None
        """What was charged, once settled."""
        self._ended = False

    def __copy__(self) -> NoReturn:
        raise AffineError("a hold cannot be copied; it ends exactly once")

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__copy__()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise AffineError("a hold cannot be pickled; settle it in the process that made it")

    @property
    def ended(self) -> bool:
        """True once settled or released."""
        return self._ended

    @property
    def output_tokens(self) -> int:
        """The output tokens this hold covers (a stream may emit up to this many)."""
        return self.reserved.output_tokens

    def _check_open(self) -> None:
        if self._ended:
            raise HoldEnded(f"hold {self.id} on {self.budget.path!r} has already ended")

    def settle(self, usage: Usage) -> Usage:
        """Charge what the call actually used (priced if ``usage.usd`` is None).

        A cost above the hold is still charged in full and reported as an overrun.
        """
        if not isinstance(usage, Usage):
            raise InvalidAmount(f"settle needs an allotment.Usage, not {type(usage).__name__}")
        b = self.budget
        priced = b._priced(usage, self.call, self)
        amounts = amounts_of(priced, _nano_or_none(priced.usd), markers=True)
        self._check_open()
        tree = b._tree
        # Ended only once the ledger agrees: a settle that failed there can be retried,
        # and the ledger itself makes a concurrent second settle a no-op.
        result = tree.ledger.settle(self.id, amounts, tree.clock.now())
        self._ended = True
        if result.status != "settled":
            raise HoldEnded(f"hold {self.id} on {b.path!r} was not open ({result.status})")
        self.settled = priced
        if tree.plugins.wants_events:
            b._emit("settle", hold=self.id, model=_model(self.call), usage=priced, usd=priced.usd)
            if result.overrun:
                b._emit(
                    "overrun",
                    hold=self.id,
                    model=_model(self.call),
                    usage=priced,
                    usd=priced.usd,
                    detail={"excess": dict(result.overrun)},
                )
        if self.call is not None:
            tree.plugins.after_call(b, self.call, priced, self.estimate)
        return priced

    def settle_estimate(
        self, *, output_tokens: int | None = None, input_tokens: int | None = None
    ) -> Usage:
        """Settle when the provider reported no usage: charge the hold's bound (or the
        counts given), flagged as estimated so reports never show a silent $0."""
        r = self.reserved
        usage = Usage(
            input_tokens=r.input_tokens if input_tokens is None else input_tokens,
            output_tokens=r.output_tokens if output_tokens is None else output_tokens,
            llm_calls=r.llm_calls,
            tool_calls=r.tool_calls,
            tools=r.tools,
            estimated=True,
        )
        if output_tokens is None and input_tokens is None:
            usage = usage.with_cost(r.usd)
        return self.settle(usage)

    def release(self) -> None:
        """End the hold charging nothing: the call never reached the provider."""
        self._check_open()
        b = self.budget
        released = b._tree.ledger.release(self.id, b._tree.clock.now())
        self._ended = True
        if released:
            b._emit("release", hold=self.id, model=_model(self.call))
        else:
            raise HoldEnded(f"hold {self.id} on {b.path!r} was not open")

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._ended:
            return
        if exc_type is None:
            self.settle_estimate()
        else:
            self.release()


# -- helpers ------------------------------------------------------------------------------


def _model(call: Call | None) -> str | None:
    if call is None:
        return None
    return call.tool_name if call.kind == "tool" else call.model


def _nano_or_none(usd: Decimal | None) -> int | None:
    return None if usd is None else to_nano(usd)


def _reopen(store: Ledger, spec: NodeSpec, limits: Limits, update: bool) -> tuple[NodeSpec, Limits]:
    """Opening a root that already exists: join it, or refuse to silently change its caps.

    Several processes share a root by name; one that forgot a limit (or has a stale
    config) must not lift or lower the cap for all of them.
    """
    try:
        existing = store.state(spec.name)
    except KeyError:
        return spec, limits
    if existing.parent is not None or update:
        return spec, limits
    asks_nothing = not spec.limits and not spec.rates and spec.period is None
    if asks_nothing:
        joined = NodeSpec(
            name=spec.name,
            parent=None,
            limits=dict(existing.limits),
            rates=tuple(existing.rates),
            deadline=existing.deadline if spec.deadline is None else spec.deadline,
            period=existing.period,
        )
        return joined, replace(_limits_of(existing), deadline=joined.deadline)
    same = (
        dict(existing.limits) == dict(spec.limits)
        and tuple(existing.rates) == tuple(spec.rates)
        and existing.period == spec.period
    )
    if not same:
        raise ConfigurationError(
            f"budget {spec.name!r} already exists in {store.url} with limits "
            f"{_show(existing.limits)}, rates {list(existing.rates)}, period "
            f"{existing.period!r}; you asked for {_show(spec.limits)}, rates "
            f"{list(spec.rates)}, period {spec.period!r}. Open it with the same limits, or "
            f"with none to join it as it is, or pass update_limits=True to change them"
        )
    return spec, limits


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _show(amounts: Mapping[str, int]) -> dict[str, Any]:
    return {d: from_nano(x) if d == "usd" else x for d, x in amounts.items()}


def _limits_of(state: NodeState) -> Limits:
    """A node's own limits back from ledger units."""
    lim = state.limits
    return Limits(
        usd=from_nano(lim["usd"]) if "usd" in lim else None,
        input_tokens=lim.get("input_tokens"),
        output_tokens=lim.get("output_tokens"),
        total_tokens=lim.get("total_tokens"),
        llm_calls=lim.get("llm_calls"),
        tool_calls=lim.get("tool_calls"),
        per_tool={d[5:]: x for d, x in lim.items() if d.startswith("tool:")},
        deadline=state.deadline,
        period=state.period,  # type: ignore[arg-type]
    )


def _rate_specs(limits: Limits) -> tuple[tuple[str, int, float], ...]:
    return tuple((r.on, r.ledger_amount(), float(r.per)) for r in limits.rate)


def _check_name(name: object, *, root: bool) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"a budget name must be a non-empty string, not {name!r}")
    if "/" in name or "#" in name:
        raise ConfigurationError(f"budget name {name!r} must not contain '/' or '#'")


def _fraction(share: object, split: int | None) -> Fraction:
    # A Fraction, not a Decimal: a third of $0.30 must be exactly $0.10, not $0.099999999.
    if split is not None:
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise InvalidAmount(f"split must be a positive int, not {split!r}")
        return Fraction(1, split)
    fraction = to_decimal(share, what="share")
    if not 0 < fraction <= 1:
        raise InvalidAmount(f"share must be in (0, 1], not {share!r}")
    return Fraction(fraction)


def _shared(left: Remaining, fraction: Fraction, explicit: Limits) -> Limits:
    def part(x: int | None) -> int | None:
        return None if x is None else x * fraction.numerator // fraction.denominator

    usd = None
    if left.usd is not None:
        nano = part(to_nano(left.usd))
        assert nano is not None
        usd = from_nano(nano)
    return Limits(
        usd=usd,
        input_tokens=part(left.input_tokens),
        output_tokens=part(left.output_tokens),
        total_tokens=part(left.total_tokens),
        llm_calls=part(left.llm_calls),
        tool_calls=part(left.tool_calls),
        per_tool={
            k: v
            for k, v in ((k, part(v)) for k, v in (left.per_tool or {}).items())
            if v is not None
        },
        deadline=explicit.deadline,
        rate=explicit.rate,
    )
