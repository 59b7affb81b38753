"""The lifecycle of one metered model call: reserve, call, settle (or release).

Shared by ``BudgetedChatCompletionClient`` and by ``instrument()``'s patched clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

import allotment

from . import _translate
from ._caps import plain_refusal
from ._typed import remember

metering: ContextVar[bool] = ContextVar("allotment_autogen_metering", default=False)
"""True while a metered call runs its client: a client it wraps (or an instrumented
class's method it reaches) must not reserve the same call again."""


def pick(
    explicit: allotment.Budget | None, active: allotment.Budget | None = None
) -> allotment.Budget | None:
    """The budget to charge: ``explicit``, or the active budget (``allotment.current()``
    unless given) when it is a descendant of ``explicit`` (a sub-agent's child budget),
    or the active budget when none is explicit."""
    if active is None:
        active = allotment.current()
    if explicit is None or active is None or active is explicit:
        return explicit if explicit is not None else active
    node = active.parent
    while node is not None:
        if node is explicit:
            return active
        node = node.parent
    return explicit


def no_budget(what: str) -> allotment.ConfigurationError:
    return remember(
        allotment.ConfigurationError(
            f"{what} has no budget to charge: pass budget=, run it inside "
            f"`with budget.activate():`, or call allotment_autogen.instrument(budget)"
        )
    )


async def reserve(budget: allotment.Budget, call: allotment.Call) -> allotment.Hold:
    """``budget.areserve(call)``, with refusals remembered so a team can re-raise them typed."""
    try:
        return await budget.areserve(call)
    except allotment.BudgetExceeded as err:
        plain = plain_refusal(err)
        remember(plain)
        if plain is err:
            raise
        raise plain from None
    except allotment.AllotmentError as err:
        remember(err)
        raise


_PROBE = 1_000_000
"""Output tokens priced to find the price of one (prices are per million)."""


def clamped(
    budget: allotment.Budget, call: allotment.Call, extra: Mapping[str, Any]
) -> tuple[allotment.Call, Mapping[str, Any]]:
    """The call and create arguments with ``max_tokens`` lowered to what the budget's
    remaining dollars afford after the input (unchanged when there is no dollar cap, no
    price, or not even one output token is affordable: then the reservation refuses)."""
    left = budget.remaining.usd
    if left is None:
        return call, extra
    try:
        _, input_usd = budget.estimate(dataclasses.replace(call, max_output_tokens=0))
        probe = allotment.Call(model=call.model, provider=call.provider)
        _, none_usd = budget.estimate(dataclasses.replace(probe, max_output_tokens=0))
        _, many_usd = budget.estimate(dataclasses.replace(probe, max_output_tokens=_PROBE))
    except allotment.AllotmentError:
        return call, extra
    if input_usd is None or none_usd is None or many_usd is None or many_usd <= none_usd:
        return call, extra
    per_token = (many_usd - none_usd) / _PROBE
    affordable = math.floor((left - input_usd) / per_token)
    cap = call.max_output_tokens
    if affordable < 1 or (cap is not None and cap <= affordable):
        return call, extra
    return (
        dataclasses.replace(call, max_output_tokens=affordable),
        {**extra, "max_tokens": affordable},
    )


def settle(
    hold: allotment.Hold, result: Any, facts: _translate.ClientFacts, counted: int = 0
) -> None:
    """End ``hold`` from a ``CreateResult``: a cache hit is free, reported usage is charged,
    and a result without usage is charged as an estimate (input bound, counted output)."""
    if facts.caches and getattr(result, "cached", False):
        hold.release()
        return
    usage = _translate.usage_of(getattr(result, "usage", None))
    if usage is not None:
        hold.settle(usage)
        return
    text = _translate.result_text(getattr(result, "content", ""))
    output = max(counted, _translate.bound_tokens(text, hold.call.model if hold.call else None))
    hold.settle_estimate(output_tokens=output)


async def create(
    budget: allotment.Budget,
    call: allotment.Call,
    facts: _translate.ClientFacts,
    invoke: Callable[[], Awaitable[Any]],
    cancellation_token: Any,
) -> Any:
    """Run ``invoke`` (the inner client's ``create``) under a hold for ``call``."""
    hold = await reserve(budget, call)
    if cancellation_token is not None and cancellation_token.is_cancelled():
        hold.release()
        raise asyncio.CancelledError("cancelled before the request was sent")
    token = metering.set(True)
    try:
        result = await invoke()
    except asyncio.CancelledError:
        # The request may be with the provider, which bills what it finishes: charge the
        # bound rather than nothing.
        hold.settle_estimate()
        raise
    except BaseException:
        # An error response (or a request that never left) is not billed.
        hold.release()
        raise
    finally:
        metering.reset(token)
    settle(hold, result, facts)
    return result


async def stream(
    budget: allotment.Budget,
    call: allotment.Call,
    facts: _translate.ClientFacts,
    open_stream: Callable[[], AsyncGenerator[Any, None]],
    cancellation_token: Any,
) -> AsyncGenerator[Any, None]:
    """Run ``open_stream`` (the inner client's ``create_stream``) under a hold for ``call``;
    cut it, charged, once it has produced more output than the hold covers."""
    hold = await reserve(budget, call)
    if cancellation_token is not None and cancellation_token.is_cancelled():
        hold.release()
        raise asyncio.CancelledError("cancelled before the request was sent")
    bound, near = _translate.counters(call.model)
    seen = 0
    counted = 0
    chunks = 0
    token = metering.set(True)
    try:
        inner = open_stream()
    except BaseException:
        hold.release()  # the client refused the request before sending it
        raise
    finally:
        metering.reset(token)
    try:
        while True:
            token = metering.set(True)
            try:
                item = await anext(inner)
            except StopAsyncIteration:
                break
            finally:
                metering.reset(token)
            if isinstance(item, str):
                chunks += 1
                seen += near(item)
                counted += bound(item)
                if seen > hold.output_tokens:
                    await inner.aclose()
                    hold.settle_estimate(output_tokens=counted)
                    raise remember(_cut(budget, hold, seen))
                yield item
            else:
                settle(hold, item, facts, counted)
                yield item
    except BaseException as err:
        if not hold.ended:
            if chunks:
                # Cut mid-way (consumer stopped, cancelled, connection lost): the output
                # so far was generated, and the input was sent.
                hold.settle_estimate(output_tokens=counted)
            elif isinstance(err, asyncio.CancelledError):
                hold.settle_estimate()
            else:
                hold.release()
        raise
    finally:
        await inner.aclose()
    if not hold.ended:
        # A stream that ended without its CreateResult: charge what was seen.
        hold.settle_estimate(output_tokens=counted)


def _cut(budget: allotment.Budget, hold: allotment.Hold, seen: int) -> allotment.BudgetExceeded:
    err = allotment.BudgetExceeded(
        path=budget.path,
        limit_name="output_tokens",
        limit=hold.output_tokens,
        spent=seen,
        held=0,
        asked=seen,
    )
    err.args = (
        f"budget {budget.path!r} cut a stream after about {seen} output tokens: its hold "
        f"covered {hold.output_tokens}. Set max_tokens on the request (the provider ignored "
        f"it, or none was set and the estimate assumed {hold.output_tokens})",
    )
    return err
