"""Budgets as a tree: escrow, reserve/settle/release, limits, affine handles, errors."""

from __future__ import annotations

import contextvars
import copy
import pickle
import threading
from decimal import Decimal
from pathlib import Path

import allotment
import pytest
from allotment import Budget, Usage
from allotment._capability import CapabilityError


def bound(usd: str, **kw: int) -> Usage:
    return Usage(usd=Decimal(usd), llm_calls=kw.pop("llm_calls", 1), **kw)


def test_reserve_then_settle_charges_actual_and_frees_the_hold() -> None:
    b = Budget(usd="1.00")
    h = b.hold(bound("0.30", input_tokens=100, output_tokens=50))
    assert b.held.usd == Decimal("0.3")
    assert b.remaining.usd == Decimal("0.7")
    h.settle(Usage(input_tokens=80, output_tokens=20, llm_calls=1, usd=Decimal("0.12")))
    assert b.spent.usd == Decimal("0.12")
    assert b.spent.input_tokens == 80
    assert b.spent.total_tokens == 100
    assert b.held.usd == Decimal(0)
    assert b.remaining.usd == Decimal("0.88")


def test_refusal_names_scope_limit_spent_held_and_asked_and_changes_nothing() -> None:
    b = Budget(usd="0.10", name="run")
    b.hold(bound("0.06"))
    before = b.state()
    with pytest.raises(allotment.BudgetExceeded) as info:
        b.hold(bound("0.05"))
    err = info.value
    assert isinstance(err, RuntimeError)
    assert (err.path, err.limit_name) == ("run", "usd")
    assert err.limit == Decimal("0.1")
    assert err.spent == Decimal(0)
    assert err.held == Decimal("0.06")
    assert err.asked == Decimal("0.05")
    assert "'run'" in str(err)
    assert "$0.05" in str(err)
    after = b.state()
    assert after.committed == before.committed
    assert after.held == before.held
    assert after.refusals == before.refusals + 1


def test_child_escrow_is_taken_at_once_and_unspent_part_returns_on_close() -> None:
    parent = Budget(usd="1.00", name="root")
    child = parent.allot("researcher", usd="0.30")
    assert parent.remaining.usd == Decimal("0.7")
    child.hold(bound("0.10")).settle(bound("0.10"))
    assert parent.spent.usd == Decimal("0.1")
    assert parent.remaining.usd == Decimal("0.7")  # still inside the escrow
    child.close()
    assert parent.remaining.usd == Decimal("0.9")
    assert parent.spent.usd == Decimal("0.1")


def test_child_cannot_spend_more_than_its_escrow_even_if_parent_has_money() -> None:
    parent = Budget(usd="1.00")
    child = parent.allot("c", usd="0.10")
    with pytest.raises(allotment.BudgetExceeded) as info:
        child.hold(bound("0.11"))
    assert info.value.path == "budget/c"


def test_parent_cannot_spend_a_childs_escrow() -> None:
    parent = Budget(usd="1.00")
    parent.allot("c", usd="0.80")
    with pytest.raises(allotment.BudgetExceeded):
        parent.hold(bound("0.21"))
    parent.hold(bound("0.20"))


def test_allot_more_than_is_left_is_refused_with_a_typed_error() -> None:
    parent = Budget(usd="0.50")
    with pytest.raises(allotment.BudgetExceeded) as info:
        parent.allot("big", usd="0.60")
    assert "allotting 'big'" in str(info.value)
    assert parent.remaining.usd == Decimal("0.5")


def test_unlimited_child_spend_counts_on_every_ancestor() -> None:
    root = Budget(usd="0.10", llm_calls=3)
    mid = root.allot("mid")
    leaf = mid.allot("leaf")
    for _ in range(3):
        leaf.hold(bound("0.01")).settle(bound("0.01"))
    with pytest.raises(allotment.BudgetExceeded) as info:
        leaf.hold(bound("0.01"))
    assert info.value.limit_name == "llm_calls"
    assert info.value.path == "budget"
    assert root.spent.llm_calls == mid.spent.llm_calls == leaf.spent.llm_calls == 3


def test_share_and_split_carve_fractions_of_what_is_left() -> None:
    root = Budget(usd="0.90", llm_calls=10)
    root.hold(bound("0.30", llm_calls=1))
    a = root.allot("a", split=3)
    assert a.limits.usd == Decimal("0.2")
    assert a.limits.llm_calls == 3
    b = root.allot("b", share="0.5")
    assert b.limits.usd == Decimal("0.2")  # half of the 0.40 left
    assert b.limits.llm_calls == 3


def test_sibling_names_get_distinct_paths() -> None:
    root = Budget(usd=1)
    one, two = root.allot("worker"), root.allot("worker")
    assert one.path == "budget/worker"
    assert two.path == "budget/worker#2"


def test_settle_above_hold_is_charged_in_full_and_reported_as_overrun() -> None:
    events: list[allotment.Event] = []

    class Sink:
        @allotment.hookimpl
        def allotment_event(self, event: allotment.Event) -> None:
            events.append(event)

    sink = Sink()
    allotment.plugins().register(sink)
    try:
        b = Budget(usd="1.00")
        b.hold(bound("0.10")).settle(bound("0.25"))
    finally:
        allotment.plugins().unregister(sink)
    assert b.spent.usd == Decimal("0.25")
    kinds = [e.kind for e in events]
    assert kinds == ["open", "reserve", "settle", "overrun"]
    overrun = events[-1]
    assert overrun.detail["excess"]["usd"] == 150_000_000


def test_hold_ends_exactly_once() -> None:
    b = Budget(usd="1.00")
    h = b.hold(bound("0.10"))
    h.settle(bound("0.05"))
    with pytest.raises(allotment.HoldEnded):
        h.settle(bound("0.05"))
    with pytest.raises(allotment.HoldEnded):
        h.release()
    assert b.spent.usd == Decimal("0.05")
    r = b.hold(bound("0.10"))
    r.release()
    with pytest.raises(allotment.HoldEnded):
        r.release()
    assert b.spent.usd == Decimal("0.05")
    assert b.held.usd == Decimal(0)


def test_hold_context_releases_on_error_and_settles_estimate_otherwise() -> None:
    b = Budget(usd="1.00")
    with pytest.raises(ValueError, match="boom"), b.hold(bound("0.10")):
        raise ValueError("boom")
    assert b.spent.usd == Decimal(0)
    with b.hold(bound("0.10", output_tokens=7)):
        pass
    assert b.spent.usd == Decimal("0.1")
    assert b.spent.estimated
    assert b.report().estimated_calls == 1


def test_budget_handles_cannot_be_copied_deepcopied_or_pickled() -> None:
    b = Budget(usd=1)
    with pytest.raises(allotment.AffineError):
        copy.copy(b)
    with pytest.raises(allotment.AffineError):
        copy.deepcopy(b)
    with pytest.raises(allotment.AffineError):
        pickle.dumps(b)
    with pytest.raises(allotment.AffineError):
        pickle.dumps(b.hold(bound("0.1")))


def test_closed_budget_refuses_every_operation() -> None:
    root = Budget(usd=1)
    child = root.allot("c", usd="0.5")
    grandchild = child.allot("g")
    child.close()
    for op in (
        lambda: child.hold(bound("0.01")),
        lambda: child.allot("x"),
        lambda: child.activate().__enter__(),
        lambda: child.charge(bound("0.01")),
    ):
        with pytest.raises(allotment.BudgetClosed):
            op()
    with pytest.raises(allotment.BudgetClosed):  # closing cascades to descendants
        grandchild.hold(bound("0.01"))
    child.close()  # closing twice is a no-op


def test_a_hold_admitted_before_close_can_still_settle() -> None:
    root = Budget(usd=1)
    child = root.allot("c", usd="0.5")
    h = child.hold(bound("0.2"))
    child.close()
    assert root.remaining.usd == Decimal("0.8")  # the open hold still counts
    h.settle(bound("0.1"))
    assert root.remaining.usd == Decimal("0.9")
    assert root.spent.usd == Decimal("0.1")


def test_child_has_no_way_to_raise_its_own_limit() -> None:
    root = Budget(usd=1)
    child = root.allot("c", usd="0.1")
    with pytest.raises(AttributeError):
        child.limits.usd = Decimal(5)  # type: ignore[misc]
    grandchild_ask = child.allot
    with pytest.raises(allotment.BudgetExceeded):
        grandchild_ask("g", usd="0.2")
    assert not hasattr(child, "top_up")


@pytest.mark.parametrize(
    "bad",
    [-1, "-0.01", float("nan"), float("inf"), "abc", [1], True, Decimal("NaN"), 10**12],
)
def test_bad_amounts_are_refused_with_a_typed_error(bad: object) -> None:
    with pytest.raises(allotment.InvalidAmount):
        Budget(usd=bad)
    root = Budget(usd=1)
    with pytest.raises(allotment.InvalidAmount):
        root.allot("c", usd=bad)
    assert root.remaining.usd == Decimal(1)
    assert root.state().children == ()


def test_float_amounts_have_no_binary_noise() -> None:
    assert Budget(usd=0.1).limits.usd == Decimal("0.1")


def test_bad_counts_and_usage_are_typed_errors() -> None:
    with pytest.raises(allotment.InvalidAmount):
        Budget(llm_calls=-1)
    with pytest.raises(allotment.InvalidAmount):
        Usage(input_tokens=-5)
    with pytest.raises(allotment.InvalidAmount):
        Usage(input_tokens=10, cache_read_tokens=11)
    with pytest.raises(allotment.InvalidAmount):
        Usage(output_tokens=10, reasoning_tokens=11)
    b = Budget(usd=1)
    h = b.hold(bound("0.1"))
    with pytest.raises(allotment.InvalidAmount):
        h.settle({"usd": 1})  # type: ignore[arg-type]
    assert not h.ended
    h.release()


def test_unknown_ledger_url_is_a_typed_error() -> None:
    with pytest.raises(allotment.UnknownLedger):
        Budget(usd=1, ledger="postgres://nowhere")


def test_activate_sets_current_and_reaches_copy_context_threads() -> None:
    b = Budget(usd=1, name="ctx")
    assert allotment.current() is None
    seen: list[object] = []
    with b.activate():
        assert allotment.current() is b
        ctx = contextvars.copy_context()
        t = threading.Thread(target=lambda: seen.append(ctx.run(allotment.current)))
        t.start()
        t.join()
        raw = threading.Thread(target=lambda: seen.append(allotment.current()))
        raw.start()
        raw.join()
    assert seen == [b, None]
    assert allotment.current() is None


def test_per_tool_and_total_tool_call_limits() -> None:
    b = Budget(tool_calls=3, per_tool={"search": 1})
    search = Usage(tool_calls=1, tools=(("search", 1),))
    other = Usage(tool_calls=1, tools=(("calc", 1),))
    b.hold(search).settle(search)
    with pytest.raises(allotment.BudgetExceeded) as info:
        b.hold(search)
    assert info.value.limit_name == "tool:search"
    b.hold(other).settle(other)
    b.hold(other).settle(other)
    with pytest.raises(allotment.BudgetExceeded) as info:
        b.hold(other)
    assert info.value.limit_name == "tool_calls"


def test_deadline_refuses_after_it_passes() -> None:
    clock = allotment.ManualClock()
    b = Budget(llm_calls=10, deadline=60, clock=clock)
    b.hold(Usage(llm_calls=1)).release()
    clock.advance(61)
    with pytest.raises(allotment.DeadlineExceeded):
        b.hold(Usage(llm_calls=1))


def test_rate_window_waits_then_admits_and_never_hangs() -> None:
    clock = allotment.ManualClock()
    b = Budget(rate="20/minute", clock=clock)
    start = clock.now()
    for _ in range(123):
        b.hold(Usage(llm_calls=1)).settle(Usage(llm_calls=1))
    elapsed = clock.now() - start
    # 123 calls at 20/minute need six full windows of waiting: 6 simulated minutes.
    assert 5 * 60 < elapsed <= 6 * 60 + 1
    assert b.spent.llm_calls == 123


def test_rate_window_fails_typed_past_the_bounded_wait() -> None:
    clock = allotment.ManualClock()
    b = Budget(rate=allotment.Rate(limit=2, per="minute", max_wait=5), clock=clock)
    b.hold(Usage(llm_calls=1))
    b.hold(Usage(llm_calls=1))
    with pytest.raises(allotment.RateWindowExceeded) as info:
        b.hold(Usage(llm_calls=1))
    assert 55 <= info.value.retry_after <= 60
    assert clock.slept == 0  # it did not wait for a window it could not reach in time


async def test_async_reserve_waits_for_rate_window_without_blocking() -> None:
    clock = allotment.ManualClock()
    b = Budget(rate="2/minute", clock=clock)
    call = allotment.Call(model="gpt-4o-mini", messages=["hi"], max_output_tokens=5)
    for _ in range(5):
        h = await b.areserve(call)
        h.settle(Usage(input_tokens=3, output_tokens=2, llm_calls=1))
    assert clock.slept >= 120
    assert b.spent.llm_calls == 5


def test_unknown_model_under_dollar_cap_fails_closed() -> None:
    b = Budget(usd=1)
    call = allotment.Call(model="no-such-model-xyz", messages=["hi"])
    with pytest.raises(allotment.UnknownPrice) as info:
        b.reserve(call)
    assert "no-such-model-xyz" in str(info.value)
    assert b.held.llm_calls == 0


def test_unknown_model_with_a_configured_price_is_admitted() -> None:
    price = allotment.Price(input_mtok="10", output_mtok="30")
    b = Budget(usd=1, prices={"fake-1": price})
    call = allotment.Call(model="fake-1", messages=["hi"], max_output_tokens=500)
    h = b.reserve(call)
    assert h.reserved.usd is not None
    assert h.reserved.usd > 0
    cost = h.settle(Usage(input_tokens=1000, output_tokens=500, llm_calls=1))
    assert cost.usd == Decimal("0.025")


def test_unknown_model_without_a_dollar_cap_is_reported_unknown_not_zero() -> None:
    b = Budget(llm_calls=5)
    call = allotment.Call(model="no-such-model-xyz", messages=["hi"], max_output_tokens=10)
    b.reserve(call).settle(Usage(input_tokens=5, output_tokens=5, llm_calls=1))
    assert b.spent.usd is None
    assert b.report().unpriced_calls == 1
    assert "unknown" in str(b.report())


def test_report_is_a_tree_with_per_child_breakdown() -> None:
    root = Budget(usd="1.00", name="run")
    for name in ("a", "b", "c"):
        with root.allot(name, usd="0.30") as child:
            child.hold(bound("0.10")).settle(bound("0.10"))
    report = root.report()
    assert [c.name for c in report.children] == ["a", "b", "c"]
    assert report.spent.usd == Decimal("0.3")
    assert all(c.spent.usd == Decimal("0.1") and c.closed for c in report.children)
    assert root.remaining.usd == Decimal("0.7")
    assert report.to_dict()["children"][0]["spent"]["usd"] == "0.1"


def test_tool_calls_settle_at_zero_dollars_known_not_unknown() -> None:
    b = Budget(usd=1, tool_calls=5)
    h = b.reserve(allotment.Call(kind="tool", tool_name="search"))
    h.settle(Usage(tool_calls=1, tools=(("search", 1),)))
    assert b.spent.usd == Decimal(0)
    assert b.report().unpriced_calls == 0


def test_reserve_without_waiting_raises_rate_error_at_once() -> None:
    clock = allotment.ManualClock()
    b = Budget(rate="1/minute", clock=clock)
    call = allotment.Call(model="gpt-4o-mini", messages=["hi"], max_output_tokens=5)
    b.reserve(call, wait=False).release()
    b.reserve(call, wait=False)
    with pytest.raises(allotment.RateWindowExceeded) as info:
        b.reserve(call, wait=False)
    assert clock.slept == 0
    assert info.value.retry_after > 0


def test_spawn_cleans_names_that_would_break_paths() -> None:
    b = Budget(usd=1)
    child = b.spawn(allotment.Spawn(name="tools/search#1", how="agent_tool", framework="x"))
    assert child.path == "budget/tools_search_1"


def test_export_moves_a_budget_to_another_handle_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    key = b"k" * 32
    root = Budget(usd="1.00", name="run", ledger=url)
    worker = root.allot("worker", usd="0.40")
    token = worker.export(key, ttl=60)
    with pytest.raises(allotment.BudgetClosed, match="exported"):
        worker.hold(bound("0.01"))
    remote = Budget.attach(token, key=key)
    assert remote.path == "run/worker"
    assert remote.limits.usd == Decimal("0.4")
    remote.hold(bound("0.30")).settle(bound("0.25"))
    with pytest.raises(allotment.BudgetExceeded):
        remote.hold(bound("0.20"))
    assert root.spent.usd == Decimal("0.25")
    with pytest.raises(CapabilityError) as replay:
        Budget.attach(token, key=key)
    assert replay.value.reason == "redeemed"
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(CapabilityError):
        Budget.attach(tampered, key=key)
    remote.close()
    assert root.remaining.usd == Decimal("0.75")


def test_usage_normalises_whole_floats_and_refuses_bad_dollars() -> None:
    u = Usage(input_tokens=5.0, output_tokens=2)  # type: ignore[arg-type]
    assert type(u.input_tokens) is int
    for bad in (Decimal("-0.01"), Decimal("NaN"), Decimal("Infinity"), Decimal(10**10)):
        with pytest.raises(allotment.InvalidAmount):
            Usage(usd=bad)
    with pytest.raises(allotment.InvalidAmount):
        Usage(input_tokens=2.5)  # type: ignore[arg-type]


def test_reopening_a_shared_root_keeps_its_cap_unless_told_to_change_it(tmp_path: Path) -> None:
    """Processes share a persistent root by name: one that forgot the limit joins it as it
    is, one with other limits is refused; only update_limits=True changes them."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    owner = Budget(usd="0.01", name="shared", ledger=url)
    owner.hold(bound("0.008")).settle(bound("0.008"))
    joiner = Budget(name="shared", ledger=url)  # no limits given: join
    assert joiner.limits.usd == Decimal("0.01")
    with pytest.raises(allotment.BudgetExceeded):
        joiner.hold(bound("0.005"))
    same = Budget(usd="0.01", name="shared", ledger=url)
    assert same.remaining.usd == Decimal("0.002")
    with pytest.raises(allotment.ConfigurationError, match="update_limits=True"):
        Budget(usd="5", name="shared", ledger=url)
    assert owner.remaining.usd == Decimal("0.002")
    raised = Budget(usd="0.02", name="shared", ledger=url, update_limits=True)
    assert raised.remaining.usd == Decimal("0.012")


def test_short_form_limits_with_an_unknown_key_are_a_typed_error() -> None:
    with pytest.raises(allotment.ConfigurationError, match="bogus"):
        allotment.Limits.of({"bogus": 1}, now=0)
    b = Budget(usd=1)
    with pytest.raises(allotment.ConfigurationError):
        b.allot("z", split=2, usd="0.1")
    with pytest.raises(allotment.InvalidAmount):
        allotment.Rate.parse("0/minute")


def test_a_call_without_a_model_under_a_dollar_cap_says_what_to_do() -> None:
    b = Budget(usd=1)
    with pytest.raises(allotment.UnknownPrice, match="names no model"):
        b.reserve(allotment.Call(messages=None))  # type: ignore[arg-type]


def test_refusals_survive_pickling_with_every_field() -> None:
    """Frameworks move errors across processes and thread pools: nothing is lost."""
    rate = allotment.RateWindowExceeded("too soon", retry_after=12.5, path="run", limit_name="x")
    back = pickle.loads(pickle.dumps(rate))
    assert type(back) is allotment.RateWindowExceeded
    assert (back.retry_after, back.path, str(back)) == (12.5, "run", "too soon")
    price = pickle.loads(pickle.dumps(allotment.UnknownPrice("m-1", "run")))
    assert (price.model, price.path, price.limit_name) == ("m-1", "run", "price")
    b = Budget(usd="0.01", name="p")
    with pytest.raises(allotment.BudgetExceeded) as info:
        b.hold(bound("0.02"))
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.limit, again.asked, str(again)) == (
        Decimal("0.01"),
        Decimal("0.02"),
        str(info.value),
    )
