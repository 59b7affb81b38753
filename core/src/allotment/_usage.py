"""What a call spent: tokens by kind, calls, and its cost."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal

from ._money import MAX_COUNT, MAX_USD, to_count, to_decimal

_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "llm_calls",
    "tool_calls",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    """Usage of one call, or a sum of calls.

    Token counts follow the OpenAI convention: ``input_tokens`` includes cache reads and
    writes, ``output_tokens`` includes reasoning tokens. The ``cache_*`` and ``reasoning``
    fields are the parts, so nothing is priced twice.
    """

    input_tokens: int = 0
    """Tokens sent, cache reads and writes included."""
    output_tokens: int = 0
    """Tokens generated, reasoning tokens included."""
    cache_read_tokens: int = 0
    """The part of ``input_tokens`` read from the provider's prompt cache."""
    cache_write_tokens: int = 0
    """The part of ``input_tokens`` written to the provider's prompt cache."""
    reasoning_tokens: int = 0
    """The part of ``output_tokens`` spent on hidden reasoning."""
    llm_calls: int = 0
    """Model calls."""
    tool_calls: int = 0
    """Tool calls."""
    tools: tuple[tuple[str, int], ...] = ()
    """Tool calls per tool name, as sorted ``(name, count)`` pairs."""
    usd: Decimal | None = None
    """Cost in dollars; ``None`` when unknown (never silently $0)."""
    estimated: bool = False
    """True when the provider reported no usage and these numbers are our estimate."""

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            # Plain in-range ints (nearly always) skip the full check; the rest are
            # validated and normalised (5.0 becomes 5) or refused.
            if type(value) is not int or not 0 <= value <= MAX_COUNT:
                object.__setattr__(self, name, to_count(value, what=name))
        if self.cache_read_tokens + self.cache_write_tokens > self.input_tokens:
            from ._errors import InvalidAmount

            raise InvalidAmount(
                f"cache tokens ({self.cache_read_tokens} read + {self.cache_write_tokens} written) "
                f"exceed input_tokens ({self.input_tokens}); input_tokens must include them"
            )
        if self.reasoning_tokens > self.output_tokens:
            from ._errors import InvalidAmount

            raise InvalidAmount(
                f"reasoning_tokens ({self.reasoning_tokens}) exceed output_tokens "
                f"({self.output_tokens}); output_tokens must include them"
            )
        usd = self.usd
        if usd is not None and (
            type(usd) is not Decimal or not usd.is_finite() or not 0 <= usd <= MAX_USD
        ):
            object.__setattr__(self, "usd", to_decimal(usd, what="usd"))
        for name, count in self.tools:
            to_count(count, what=f"tool_calls for {name!r}")

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def with_cost(self, usd: Decimal | None) -> Usage:
        """The same usage with its cost set."""
        if usd is not None and not isinstance(usd, Decimal):
            return replace(self, usd=usd)  # validate what is not already a Decimal
        # The counts were validated when this usage was made; copy without re-checking,
        # since this runs twice on every call's hot path.
        new = object.__new__(Usage)
        for name in _FIELDS:
            object.__setattr__(new, name, getattr(self, name))
        object.__setattr__(new, "usd", usd)
        return new

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        tools = dict(self.tools)
        for name, count in other.tools:
            tools[name] = tools.get(name, 0) + count
        usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            llm_calls=self.llm_calls + other.llm_calls,
            tool_calls=self.tool_calls + other.tool_calls,
            tools=tuple(sorted(tools.items())),
            usd=usd,
            estimated=self.estimated or other.estimated,
        )


_FIELDS = tuple(f for f in Usage.__slots__ if f != "usd")


@dataclass(frozen=True, kw_only=True, slots=True)
class Estimate:
    """A pre-flight upper bound of what a call can spend, before pricing."""

    usage: Usage
    """Upper bounds per token kind (and the call counts the call will use)."""
    exact_input: bool = False
    """True when input tokens were counted with the model's own tokenizer."""
    notes: tuple[str, ...] = field(default=())
    """How the bound was made, for reports and debugging."""
