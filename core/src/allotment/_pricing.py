"""Prices: per-token rates, a user table of them, and the genai-prices default.

Every cost is exact Decimal arithmetic over the token kinds of a ``Usage``, each kind priced
once: cache reads and writes are parts of ``input_tokens`` and reasoning is part of
``output_tokens``, so they replace the base rate on their share instead of adding to it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._money import to_decimal
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ._usage import Usage

__all__ = ["GenaiPrices", "Price", "PriceTable"]

Amount = Decimal | str | int | float
"""What a rate may be given as; it is stored as a Decimal."""

_MTOK = 6
"""Rates are per million tokens: a decimal shift, which keeps the division exact."""

_PRECISION = 60
"""Digits for cost arithmetic: counts up to 10**15 times rates with many decimals, summed,
fit with room to spare, so no intermediate result is ever rounded."""


def _optional_rate(value: Amount | None, what: str) -> Decimal | None:
    return None if value is None else to_decimal(value, what=what)


@dataclass(frozen=True, kw_only=True, slots=True, init=False)
class Price:
    """Dollars per million tokens of one model.

    ``Price(input_mtok="0.15", output_mtok="0.60", cache_read_mtok="0.075")``. Rates accept
    str, int, float or Decimal and are stored as Decimal. A ``None`` cache rate means cache
    tokens cost the input rate; a ``None`` reasoning rate means reasoning costs the output rate.
    """

    input_mtok: Decimal
    """Uncached input tokens."""
    output_mtok: Decimal
    """Output tokens that are not reasoning."""
    cache_read_mtok: Decimal | None
    """Input tokens read from the prompt cache; ``None``: the input rate."""
    cache_write_mtok: Decimal | None
    """Input tokens written to the prompt cache; ``None``: the input rate."""
    reasoning_mtok: Decimal | None
    """Hidden reasoning tokens; ``None``: the output rate."""

    def __init__(
        self,
        *,
        input_mtok: Amount,
        output_mtok: Amount,
        cache_read_mtok: Amount | None = None,
        cache_write_mtok: Amount | None = None,
        reasoning_mtok: Amount | None = None,
    ) -> None:
        # A frozen dataclass with its own __init__, so callers may pass "0.15" while the
        # attributes are typed, and stored, as Decimal.
        set_ = object.__setattr__
        set_(self, "input_mtok", to_decimal(input_mtok, what="input_mtok"))
        set_(self, "output_mtok", to_decimal(output_mtok, what="output_mtok"))
        set_(self, "cache_read_mtok", _optional_rate(cache_read_mtok, "cache_read_mtok"))
        set_(self, "cache_write_mtok", _optional_rate(cache_write_mtok, "cache_write_mtok"))
        set_(self, "reasoning_mtok", _optional_rate(reasoning_mtok, "reasoning_mtok"))

    def cost(self, usage: Usage, *, reserving: bool = False) -> Decimal:
        """Dollars for ``usage``, exactly.

        :param reserving: price an upper bound for a hold: all output at the higher of the
            output and reasoning rates, and input not known to be a cache read at the higher
            of the input and cache-write rates, since a hold cannot know either split.
        """
        return _token_cost(
            usage,
            input_rate=self.input_mtok,
            output_rate=self.output_mtok,
            cache_read_rate=self.cache_read_mtok,
            cache_write_rate=self.cache_write_mtok,
            reasoning_rate=self.reasoning_mtok,
            request_fee=None,
            reserving=reserving,
        )


def _token_cost(
    usage: Usage,
    *,
    input_rate: Decimal,
    output_rate: Decimal,
    cache_read_rate: Decimal | None,
    cache_write_rate: Decimal | None,
    reasoning_rate: Decimal | None,
    request_fee: Decimal | None,
    reserving: bool,
) -> Decimal:
    """The one place token kinds meet rates, shared by user prices and genai-prices data."""
    read = usage.cache_read_tokens
    written = usage.cache_write_tokens
    reasoning = usage.reasoning_tokens
    reasoning_at = output_rate if reasoning_rate is None else reasoning_rate
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        write_at = input_rate if cache_write_rate is None else cache_write_rate
        if reserving:
            # A hold cannot know which input tokens the provider will write to its cache,
            # and writes cost more than plain input: bound every input token by the dearer.
            per_mtok = (usage.input_tokens - read) * max(input_rate, write_at)
            per_mtok += read * (input_rate if cache_read_rate is None else cache_read_rate)
            per_mtok += usage.output_tokens * max(output_rate, reasoning_at)
        else:
            per_mtok = (
                (usage.input_tokens - read - written) * input_rate
                + read * (input_rate if cache_read_rate is None else cache_read_rate)
                + written * write_at
                + (usage.output_tokens - reasoning) * output_rate
                + reasoning * reasoning_at
            )
        total = per_mtok.scaleb(-_MTOK)
        if request_fee is not None:
            # A per-request fee is charged once per call, and a bare usage is one call.
            total += max(usage.llm_calls, 1) * request_fee
        return total


# -- user overrides ----------------------------------------------------------------------


def _split_prefix(name: str) -> tuple[str | None, str]:
    """``openai/gpt-4o`` and ``openai:gpt-4o`` -> (``openai``, ``gpt-4o``)."""
    for sep in ("/", ":"):
        head, found, tail = name.partition(sep)
        if found and head and tail:
            return head, tail
    return None, name


class PriceTable:
    """User prices by model name, answering before genai-prices.

    ``PriceTable({"my-finetune": Price(input_mtok=1, output_mtok=2)})``. Names match
    exactly (case-insensitively), and also with or without a provider prefix: an entry
    ``gpt-4o`` prices ``openai/gpt-4o`` and ``openai:gpt-4o``, and an entry ``openai/gpt-4o``
    prices ``gpt-4o`` when the call's provider is ``openai``. Dated snapshots are not folded
    into their alias: a snapshot can carry a different price, so name it explicitly.
    """

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices: dict[str, Price] = {}
        self._lock = threading.Lock()
        for model, price in (prices or {}).items():
            self.set(model, price)

    def set(self, model: str, price: Price) -> None:
        """Add or replace the price of ``model``."""
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError(f"a price table key must be a model name, not {model!r}")
        if not isinstance(price, Price):
            raise ConfigurationError(
                f"the price of {model!r} must be an allotment.Price, not {type(price).__name__}"
            )
        with self._lock:
            # Copy on write, so lookups read a dict nobody mutates without taking the lock.
            prices = dict(self._prices)
            prices[model.strip().lower()] = price
            self._prices = prices

    def remove(self, model: str) -> None:
        """Forget the price of ``model`` (no error if it had none)."""
        with self._lock:
            prices = dict(self._prices)
            prices.pop(model.strip().lower(), None)
            self._prices = prices

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.get(model) is not None

    def get(self, model: str, provider: str | None = None) -> Price | None:
        """The price that applies to ``model`` (from ``provider``), or ``None``."""
        prices = self._prices
        if not prices:
            return None
        for name in _table_names(model, provider):
            price = prices.get(name)
            if price is not None:
                return price
        return None

    @hookimpl(tryfirst=True)
    def allotment_price(
        self, model: str | None, provider: str | None, usage: Usage, reserving: bool
    ) -> Decimal | None:
        if model is None:
            return None
        price = self.get(model, provider)
        return None if price is None else price.cost(usage, reserving=reserving)


def _table_names(model: str, provider: str | None) -> Iterator[str]:
    name = model.strip().lower()
    yield name
    head, bare = _split_prefix(name)
    if head is not None:
        yield bare
    if provider:
        p = provider.strip().lower()
        yield f"{p}/{bare}"
        yield f"{p}:{bare}"


# -- genai-prices --------------------------------------------------------------------------


class _Tiered:
    """A rate that steps up once a request's total input crosses a threshold.

    genai-prices uses the "cliff" model: crossing a tier reprices every token of the
    request, and the threshold is exclusive.
    """

    __slots__ = ("base", "tiers")

    def __init__(self, base: Decimal, tiers: tuple[tuple[int, Decimal], ...]) -> None:
        self.base = base
        self.tiers = tiers

    def at(self, input_tokens: int) -> Decimal:
        rate = self.base
        for start, price in self.tiers:
            if input_tokens > start:
                rate = price
        return rate


_Rate = Decimal | _Tiered


def _at(rate: _Rate | None, input_tokens: int) -> Decimal | None:
    if rate is None or isinstance(rate, Decimal):
        return rate
    return rate.at(input_tokens)


@dataclass(frozen=True, slots=True)
class _Rates:
    """The rates of one genai-prices ``ModelPrice`` that a ``Usage`` can exercise."""

    model_id: str
    input: _Rate | None
    output: _Rate | None
    cache_read: _Rate | None
    cache_write: _Rate | None
    reasoning: _Rate | None
    request_fee: Decimal | None
    free: bool
    """The record has no rate at all: genai-prices lists the model as free of charge."""

    def cost(self, usage: Usage, *, reserving: bool) -> Decimal | None:
        if self.free:
            return Decimal(0)
        # Tiers follow total input, cache included (for a hold, the estimate's input).
        size = usage.input_tokens
        input_rate = _at(self.input, size)
        output_rate = _at(self.output, size)
        # A model without a token rate for a kind the usage has is not priced per token
        # (per character, per request only, audio...): unknown, never a silent $0.
        if input_rate is None:
            if usage.input_tokens:
                return None
            input_rate = Decimal(0)
        if output_rate is None:
            if usage.output_tokens:
                return None
            output_rate = Decimal(0)
        return _token_cost(
            usage,
            input_rate=input_rate,
            output_rate=output_rate,
            cache_read_rate=_at(self.cache_read, size),
            cache_write_rate=_at(self.cache_write, size),
            reasoning_rate=_at(self.reasoning, size),
            request_fee=self.request_fee,
            reserving=reserving,
        )


def _compile_rate(value: Any) -> _Rate | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    base = getattr(value, "base", None)
    tiers = getattr(value, "tiers", None)
    if isinstance(base, Decimal) and tiers is not None:
        steps = tuple(sorted((int(t.start), t.price) for t in tiers))
        return _Tiered(base, steps)
    raise TypeError(f"unexpected genai-prices rate {value!r}")


def _compile(model_id: str, model_price: Any) -> _Rates:
    def rate(key: str) -> _Rate | None:
        return _compile_rate(getattr(model_price, key, None))

    fee = getattr(model_price, "requests_kcount", None)
    return _Rates(
        model_id=model_id,
        input=rate("input_mtok"),
        output=rate("output_mtok"),
        cache_read=rate("cache_read_mtok"),
        cache_write=rate("cache_write_mtok"),
        reasoning=rate("output_reasoning_mtok"),
        request_fee=fee / 1000 if isinstance(fee, Decimal) else None,
        free=not any(
            value is not None for key, value in vars(model_price).items() if not key.startswith("_")
        ),
    )


_MISSING = object()


class GenaiPrices:
    """The default price plugin: the genai-prices data bundled with the installed package.

    Model names resolve as genai-prices resolves them (aliases, dated snapshots such as
    ``gpt-4o-2024-08-06``, its per-provider match rules), plus provider prefixes
    ``openai/gpt-4o`` and ``openai:gpt-4o``. An unknown model prices as ``None`` (unknown),
    never $0; so does a known model whose data has no token rate for a kind the usage
    has (models billed per audio hour or per character). A model whose record has no rate
    at all is listed as free (moderation, free Gemma) and costs $0. The data is never
    refreshed from the network here; if the application runs genai-prices' own
    ``UpdatePrices``, the refreshed snapshot is used.

    Standard prices apply: service tiers, batch discounts and other request-context price
    variants are not selected. Rates are taken from the price active now (prices with a
    start date or a time-of-day window); tiers are chosen by the usage's total input tokens.

    Resolution is cached per (model, provider), and the rates per price record, so pricing
    a known model is a dictionary lookup and a few Decimal products.
    """

    _MAX_CACHED = 4096
    """Distinct (model, provider) names remembered; a flood of unique names starts over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: object = None
        self._models: dict[tuple[str, str | None], Any] = {}
        self._rates: dict[int, tuple[Any, _Rates]] = {}

    def price(
        self, model: str | None, provider: str | None, usage: Usage, *, reserving: bool = False
    ) -> Decimal | None:
        """Dollars for ``usage`` of ``model``, or ``None`` if the data does not know it."""
        if not model:
            return None
        rates = self._rates_for(model, provider)
        return None if rates is None else rates.cost(usage, reserving=reserving)

    @hookimpl(trylast=True)
    def allotment_price(
        self, model: str | None, provider: str | None, usage: Usage, reserving: bool
    ) -> Decimal | None:
        return self.price(model, provider, usage, reserving=reserving)

    def model_id(self, model: str, provider: str | None = None) -> str | None:
        """The genai-prices model id ``model`` resolves to, or ``None``."""
        rates = self._rates_for(model, provider)
        return None if rates is None else rates.model_id

    def _rates_for(self, model: str, provider: str | None) -> _Rates | None:
        """The compiled rates in force now for ``model``, or ``None`` when unknown."""
        # Imported on first use: genai-prices loads pydantic, too slow for ``import allotment``.
        from genai_prices import data_snapshot

        snapshot = data_snapshot.get_snapshot()
        key = (model, provider)
        found = self._models.get(key, _MISSING) if snapshot is self._snapshot else _MISSING
        if found is _MISSING:
            found = _resolve(snapshot, model, provider)
            with self._lock:
                if snapshot is not self._snapshot:
                    # A refreshed snapshot invalidates every name and every compiled rate.
                    self._snapshot = snapshot
                    self._models = {}
                    self._rates = {}
                elif len(self._models) >= self._MAX_CACHED:
                    self._models = {}
                self._models[key] = found
        if found is None:
            return None
        model_info: Any = found
        # Without a price context genai-prices returns one of the model's own price records,
        # so its identity keys the compiled rates; the record is kept alive beside them.
        model_price = model_info.get_prices(datetime.now(tz=UTC))
        entry = self._rates.get(id(model_price))
        if entry is None or entry[0] is not model_price:
            compiled = _compile(model_info.id, model_price)
            with self._lock:
                self._rates[id(model_price)] = (model_price, compiled)
            return compiled
        rates: _Rates = entry[1]
        return rates


_FIRST_PARTY = ("openai", "anthropic", "google")


def _resolve(snapshot: Any, model: str, provider: str | None) -> Any:
    """The genai-prices ``ModelInfo`` for ``model``, or ``None``."""
    from genai_prices import data_snapshot

    name = model.strip().lower()
    wanted = provider.strip().lower() if provider else None
    candidates: list[tuple[str, str | None]] = []
    if wanted:
        candidates.append((name, wanted))
    head, bare = _split_prefix(name)
    if head is not None and data_snapshot.find_provider_by_id(snapshot.providers, head):
        candidates.append((bare, head))
    if head == "models":
        # Google's APIs report models as ``models/gemini-...``.
        candidates.append((bare, wanted))
        candidates.append((bare, None))
    # A provider genai-prices does not know (a proxy, a local server) still names a model
    # it may know; matching on the name alone is the next best thing.
    candidates.append((name, None))
    # genai-prices finds a provider from the name only for some families (not, say,
    # ``text-embedding-3-small``); the first-party lists are tried last.
    candidates.extend((name, first) for first in _FIRST_PARTY if first != wanted)
    for ref, provider_id in candidates:
        try:
            _, model_info = snapshot.find_provider_model(ref, None, provider_id, None)
        except (LookupError, ValueError):
            continue
        return model_info
    return None
