"""Prices: user rates, the price table, and the genai-prices default against its own data."""

from __future__ import annotations

import time
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pluggy
import pytest
from allotment import hookspecs
from allotment._errors import ConfigurationError, InvalidAmount
from allotment._pricing import GenaiPrices, Price, PriceTable
from allotment._usage import Usage
from genai_prices import data_snapshot

M = Decimal(1_000_000)


def _data_price(model_id: str, provider_id: str) -> Any:
    """The price record in force now, read straight from the bundled data."""
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == provider_id)
    model = next(m for m in provider.models if m.id == model_id)
    return model.get_prices(datetime.now(tz=UTC))


# -- Price ---------------------------------------------------------------------------------


def test_price_accepts_str_int_float_decimal_and_stores_decimal() -> None:
    p = Price(input_mtok="0.15", output_mtok=1, cache_read_mtok=0.075, reasoning_mtok=Decimal(2))
    assert p.input_mtok == Decimal("0.15")
    assert p.output_mtok == Decimal(1)
    assert p.cache_read_mtok == Decimal("0.075")
    assert p.cache_write_mtok is None
    assert p.reasoning_mtok == Decimal(2)
    assert all(isinstance(v, Decimal) for v in (p.input_mtok, p.output_mtok, p.cache_read_mtok))


@pytest.mark.parametrize("bad", [-1, "abc", float("nan"), True, None])
def test_price_refuses_bad_rates(bad: Any) -> None:
    with pytest.raises(InvalidAmount):
        Price(input_mtok=bad, output_mtok=1)


def test_price_is_frozen_and_comparable() -> None:
    p = Price(input_mtok="1", output_mtok="2")
    assert p == Price(input_mtok=1, output_mtok=2)
    with pytest.raises(AttributeError):
        p.input_mtok = Decimal(3)  # type: ignore[misc]


def test_price_cost_prices_each_token_kind_once_exactly() -> None:
    p = Price(
        input_mtok="3",
        output_mtok="15",
        cache_read_mtok="0.3",
        cache_write_mtok="3.75",
        reasoning_mtok="20",
    )
    u = Usage(
        input_tokens=10_000,
        cache_read_tokens=6_000,
        cache_write_tokens=1_000,
        output_tokens=2_000,
        reasoning_tokens=500,
    )
    expected = (
        3_000 * Decimal(3)
        + 6_000 * Decimal("0.3")
        + 1_000 * Decimal("3.75")
        + 1_500 * Decimal(15)
        + 500 * Decimal(20)
    ) / M
    assert p.cost(u) == expected
    # Reserving: a hold cannot tell reasoning from text, so all output at the higher rate.
    reserve = (4_000 * Decimal("3.75") + 6_000 * Decimal("0.3") + 2_000 * Decimal(20)) / M
    assert p.cost(u, reserving=True) == reserve


def test_price_defaults_cache_and_reasoning_to_base_rates() -> None:
    p = Price(input_mtok="2", output_mtok="8")
    u = Usage(input_tokens=1_000, cache_read_tokens=400, output_tokens=300, reasoning_tokens=100)
    assert p.cost(u) == (1_000 * Decimal(2) + 300 * Decimal(8)) / M
    assert p.cost(u, reserving=True) == p.cost(u)


def test_price_reserving_keeps_output_rate_when_reasoning_is_cheaper() -> None:
    p = Price(input_mtok="2", output_mtok="8", reasoning_mtok="3")
    u = Usage(output_tokens=1_000)
    assert p.cost(u, reserving=True) == 1_000 * Decimal(8) / M


def test_price_cost_is_exact_for_huge_counts_and_tiny_rates() -> None:
    p = Price(input_mtok="0.000000123456789", output_mtok="0.000000987654321")
    u = Usage(input_tokens=10**15 - 1, output_tokens=10**15 - 3)
    expected = (
        (10**15 - 1) * Decimal("0.000000123456789") + (10**15 - 3) * Decimal("0.000000987654321")
    ).scaleb(-6)
    assert p.cost(u) == expected
    assert p.cost(u).as_tuple().digits[-3:] == expected.as_tuple().digits[-3:]


# -- PriceTable ------------------------------------------------------------------------------


def test_price_table_matches_exact_and_provider_prefixed_names() -> None:
    mine = Price(input_mtok=1, output_mtok=2)
    prefixed = Price(input_mtok=5, output_mtok=6)
    table = PriceTable({"My-Model": mine, "acme/tuned": prefixed})
    u = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert table.get("my-model") is mine
    assert table.get("openai/my-model") is mine
    assert table.get("openai:my-model") is mine
    assert table.get("tuned", "acme") is prefixed
    assert table.get("acme/tuned") is prefixed
    assert table.get("tuned") is None
    assert table.get("my-model-2024-01-01") is None
    assert table.allotment_price(model="my-model", provider=None, usage=u, reserving=False) == 3
    assert table.allotment_price(model="other", provider=None, usage=u, reserving=False) is None
    assert table.allotment_price(model=None, provider=None, usage=u, reserving=False) is None
    table.remove("my-model")
    assert "my-model" not in table
    assert len(table) == 1


def test_price_table_refuses_non_prices() -> None:
    with pytest.raises(ConfigurationError):
        PriceTable({"m": {"input_mtok": 1}})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError):
        PriceTable({"": Price(input_mtok=1, output_mtok=1)})


def test_price_table_answers_before_genai_prices() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(GenaiPrices())
    pm.register(PriceTable({"gpt-4o-mini": Price(input_mtok=100, output_mtok=100)}))
    u = Usage(input_tokens=1_000_000)
    cost = pm.hook.allotment_price(model="gpt-4o-mini", provider="openai", usage=u, reserving=False)
    assert cost == 100
    cost = pm.hook.allotment_price(model="gpt-4o", provider="openai", usage=u, reserving=False)
    assert cost == _data_price("gpt-4o", "openai").input_mtok


# -- GenaiPrices -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gp() -> GenaiPrices:
    return GenaiPrices()


def test_known_model_costs_the_rates_in_the_data(gp: GenaiPrices) -> None:
    data = _data_price("gpt-4o-mini", "openai")
    assert isinstance(data.input_mtok, Decimal)
    assert isinstance(data.cache_read_mtok, Decimal)
    u = Usage(input_tokens=12_345, cache_read_tokens=2_345, output_tokens=678)
    expected = (
        10_000 * data.input_mtok + 2_345 * data.cache_read_mtok + 678 * data.output_mtok
    ) / M
    assert gp.price("gpt-4o-mini", "openai", u) == expected
    assert gp.price("gpt-4o-mini", None, u) == expected


def test_cache_reads_are_priced_at_the_cache_rate_only(gp: GenaiPrices) -> None:
    data = _data_price("gpt-4o-mini", "openai")
    all_cached = Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000)
    assert gp.price("gpt-4o-mini", "openai", all_cached) == data.cache_read_mtok
    assert data.cache_read_mtok < data.input_mtok


def test_cache_writes_use_the_write_rate(gp: GenaiPrices) -> None:
    data = _data_price("claude-sonnet-4-5", "anthropic")
    u = Usage(input_tokens=1_000, cache_write_tokens=1_000)
    assert gp.price("claude-sonnet-4-5", "anthropic", u) == 1_000 * data.cache_write_mtok.base / M


@pytest.mark.parametrize(
    ("alias", "snapshot"),
    [
        ("gpt-4o", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
    ],
)
def test_dated_snapshot_costs_the_same_as_its_alias(
    gp: GenaiPrices, alias: str, snapshot: str
) -> None:
    u = Usage(input_tokens=5_000, output_tokens=1_000)
    assert gp.price(alias, None, u) is not None
    assert gp.price(snapshot, None, u) == gp.price(alias, None, u)
    assert gp.model_id(snapshot) == gp.model_id(alias)


@pytest.mark.parametrize("name", ["openai/gpt-4o", "openai:gpt-4o", "OpenAI/GPT-4o", "gpt-4o"])
def test_provider_prefixes_resolve(gp: GenaiPrices, name: str) -> None:
    u = Usage(input_tokens=1_000, output_tokens=100)
    assert gp.price(name, None, u) == gp.price("gpt-4o", "openai", u)


def test_google_models_prefix_and_unknown_provider_fall_back_to_the_name(gp: GenaiPrices) -> None:
    u = Usage(input_tokens=1_000, output_tokens=100)
    expected = gp.price("gemini-2.5-pro", "google", u)
    assert expected is not None
    assert gp.price("models/gemini-2.5-pro", None, u) == expected
    assert gp.price("gemini-2.5-pro", "my-local-proxy", u) == expected


@pytest.mark.parametrize("name", ["no-such-model-xyz", "openai/no-such-model", "", "   "])
def test_unknown_model_is_none_never_zero(gp: GenaiPrices, name: str) -> None:
    u = Usage(input_tokens=1_000, output_tokens=100)
    assert gp.price(name, None, u) is None
    assert gp.allotment_price(model=name, provider="openai", usage=u, reserving=True) is None
    assert gp.price(None, None, u) is None


def test_models_without_token_rates_are_unknown_but_listed_free_models_cost_zero(
    gp: GenaiPrices,
) -> None:
    u = Usage(input_tokens=1_000, output_tokens=100)
    # whisper is priced per audio hour: tokens have no price, so the cost is unknown.
    assert gp.price("whisper-1", "openai", u) is None
    # The data lists moderation with no rate at all: free of charge.
    assert gp.price("omni-moderation-latest", "openai", u) == 0
    # An embedding model has an input rate and no output: pricing input alone works.
    emb = _data_price("text-embedding-3-small", "openai")
    assert gp.price("text-embedding-3-small", None, Usage(input_tokens=1_000)) == (
        1_000 * emb.input_mtok / M
    )


def test_reasoning_tokens_are_counted_once(gp: GenaiPrices) -> None:
    data = _data_price("gpt-5", "openai")
    assert data.output_reasoning_mtok is None
    u = Usage(input_tokens=100, output_tokens=1_000, reasoning_tokens=600)
    assert gp.price("gpt-5", "openai", u) == (100 * data.input_mtok + 1_000 * data.output_mtok) / M


def test_a_separate_reasoning_rate_applies_to_reasoning_only_and_reserving_uses_the_max(
    gp: GenaiPrices,
) -> None:
    data = _data_price("sonar-deep-research", "perplexity")
    out, reason = data.output_mtok, data.output_reasoning_mtok
    assert isinstance(reason, Decimal)
    assert out != reason
    fee = data.requests_kcount / 1000 if data.requests_kcount is not None else Decimal(0)
    u = Usage(input_tokens=100, output_tokens=1_000, reasoning_tokens=600)
    assert (
        gp.price("sonar-deep-research", "perplexity", u)
        == (100 * data.input_mtok + 400 * out + 600 * reason) / M + fee
    )
    hold = Usage(input_tokens=100, output_tokens=1_000)
    assert (
        gp.price("sonar-deep-research", "perplexity", hold, reserving=True)
        == (100 * data.input_mtok + 1_000 * max(out, reason)) / M + fee
    )


def test_tiered_model_picks_the_tier_by_total_input(gp: GenaiPrices) -> None:
    data = _data_price("gemini-2.5-pro", "google")
    tiered_in, tiered_out = data.input_mtok, data.output_mtok
    assert tiered_in.tiers
    assert tiered_out.tiers
    threshold = tiered_in.tiers[0].start
    small = Usage(input_tokens=threshold, output_tokens=1_000)
    large = Usage(input_tokens=threshold + 1, output_tokens=1_000)
    assert (
        gp.price("gemini-2.5-pro", "google", small)
        == (threshold * tiered_in.base + 1_000 * tiered_out.base) / M
    )
    assert (
        gp.price("gemini-2.5-pro", "google", large)
        == ((threshold + 1) * tiered_in.tiers[0].price + 1_000 * tiered_out.tiers[0].price) / M
    )
    # Cached input counts toward the tier: the tier follows the whole prompt.
    cached = Usage(input_tokens=threshold + 1, cache_read_tokens=threshold, output_tokens=0)
    assert (
        gp.price("gemini-2.5-pro", "google", cached)
        == (1 * tiered_in.tiers[0].price + threshold * data.cache_read_mtok.tiers[0].price) / M
    )


def _genai_usage(u: Usage) -> genai_prices.Usage:
    return genai_prices.Usage(
        input_tokens=u.input_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
        output_tokens=u.output_tokens,
        output_reasoning_tokens=u.reasoning_tokens,
    )


def test_agrees_with_genai_prices_calc_price_across_the_bundled_data(gp: GenaiPrices) -> None:
    """Every token-priced model of the big providers, small and tier-crossing usages."""
    usages = [
        Usage(input_tokens=1_234, output_tokens=567),
        Usage(
            input_tokens=9_000,
            cache_read_tokens=5_000,
            cache_write_tokens=1_000,
            output_tokens=3_000,
            reasoning_tokens=1_000,
        ),
        Usage(input_tokens=300_000, cache_read_tokens=100_000, output_tokens=20_000),
    ]
    checked = 0
    now = datetime.now(tz=UTC)
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id not in ("openai", "anthropic", "google", "perplexity", "mistral"):
            continue
        for model in provider.models:
            rates = model.get_prices(now)
            if getattr(rates, "input_mtok", None) is None:
                continue
            for u in usages:
                if getattr(rates, "output_mtok", None) is None and u.output_tokens:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        theirs = genai_prices.calc_price(
                            _genai_usage(u), model.id, provider_id=provider.id
                        ).total_price
                    except (LookupError, ValueError):
                        continue
                ours = gp.price(model.id, provider.id, u)
                assert ours == theirs, (provider.id, model.id, u)
                checked += 1
    assert checked > 100


def test_repeated_pricing_of_a_cached_model_is_fast(gp: GenaiPrices) -> None:
    u = Usage(input_tokens=2_000, cache_read_tokens=500, output_tokens=400)
    gp.price("gpt-4o-mini", "openai", u)
    n = 5_000
    start = time.perf_counter()
    for _ in range(n):
        gp.price("gpt-4o-mini", "openai", u, reserving=True)
    per_call = (time.perf_counter() - start) / n * 1e6
    print(f"GenaiPrices.price, cached model: {per_call:.1f} µs per call")
    # genai-prices' own calc_price takes tens of µs; a cached price must be far cheaper.
    assert per_call < 50
