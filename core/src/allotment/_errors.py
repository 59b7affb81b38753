"""One error hierarchy under AllotmentError; every message says what happened and what to do."""

from __future__ import annotations

from decimal import Decimal
from typing import Any


class AllotmentError(Exception):
    """Base of every error allotment raises."""


class InvalidAmount(AllotmentError, ValueError):
    """A negative, non-finite, absurd or mistyped amount. Nothing was changed."""


class ConfigurationError(AllotmentError, ValueError):
    """A budget, plugin or ledger was configured in a way that cannot work."""


class UnknownLedger(ConfigurationError):
    """No ledger plugin handles this URL scheme."""


class AffineError(AllotmentError, TypeError):
    """A budget handle was copied or pickled; use ``budget.allot()`` or an exported token."""


class HoldEnded(AllotmentError, RuntimeError):
    """The hold was already settled, released or expired; nothing was charged again."""


class LedgerError(AllotmentError, RuntimeError):
    """The ledger failed or is unreachable. Fail-closed: no call was admitted."""


class PricingError(AllotmentError, LookupError):
    """A cost could not be determined."""


class BudgetExceeded(AllotmentError, RuntimeError):
    """A call was refused because it would exceed a limit.

    Subclasses RuntimeError so that retry helpers which skip RuntimeError (LangGraph's
    default ``RetryPolicy``) do not retry a refusal into a loop.

    Attributes:
        path: the budget that refused (``root/supervisor/researcher``).
        limit_name: the limit that tripped (``usd``, ``llm_calls``, ``tool_calls:search``...).
        limit: its value (Decimal for usd, int otherwise; None for deadline/closed).
        spent: spent on that limit so far.
        held: held by open reservations (including unspent escrow of open children).
        asked: what this call asked for.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        path: str = "",
        limit_name: str = "",
        limit: Any = None,
        spent: Any = None,
        held: Any = None,
        asked: Any = None,
    ) -> None:
        self.path = path
        self.limit_name = limit_name
        self.limit = limit
        self.spent = spent
        self.held = held
        self.asked = asked
        if message is None:
            message = self._describe()
        super().__init__(message)

    @property
    def scope(self) -> str:
        """Alias of ``path``: the budget scope that refused."""
        return self.path

    @property
    def remaining(self) -> Any:
        """What was left on the tripped limit when the call was refused."""
        if self.limit is None or self.spent is None or self.held is None:
            return None
        left = self.limit - self.spent - self.held
        return left if left > 0 else type(left)(0)

    def _describe(self) -> str:
        def show(v: Any) -> str:
            if self.limit_name == "usd" and isinstance(v, Decimal):
                from ._money import fmt_usd

                return fmt_usd(v)
            return str(v)

        return (
            f"budget {self.path!r} refused a call: {self.limit_name} would exceed its limit "
            f"(limit {show(self.limit)}, spent {show(self.spent)}, held {show(self.held)}, "
            f"left {show(self.remaining)}, this call asked for up to {show(self.asked)}). "
            f"Raise the limit, or allot this work a larger share."
        )

    def __reduce__(self) -> Any:
        # Errors cross process and thread-pool boundaries in frameworks: keep every field,
        # subclasses' too (retry_after, model), whatever their __init__ takes.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[BudgetExceeded], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class BudgetClosed(BudgetExceeded):
    """The budget was closed; it refuses every operation."""


class UnknownPrice(PricingError, BudgetExceeded):
    """No price is known for a model while a dollar cap applies (fail-closed).

    Set a price with ``Budget(prices={model: Price(...)})`` or allow unpriced calls
    with ``Budget(unknown_price="allow")`` (their cost is then reported as unknown).
    A refusal like any other, so integrations stop their framework on it the same way.
    """

    def __init__(self, model: str | None, path: str) -> None:
        self.model = model
        if model is None:
            message = (
                f"budget {path!r} has a dollar cap but this call names no model, so its cost "
                f"cannot be known; refusing it rather than counting it as $0. Make the "
                f"integration see the model name (e.g. model= on a wrapped client), or set "
                f"a fallback with Budget(unknown_price=Price(input_mtok=..., output_mtok=...))"
            )
        else:
            message = (
                f"no price known for model {model!r} and budget {path!r} has a dollar cap; "
                f"refusing the call rather than counting it as $0. Give a price with "
                f"Budget(prices={{{model!r}: Price(input_mtok=..., output_mtok=...)}}) "
                f"or allow it with unknown_price='allow'"
            )
        BudgetExceeded.__init__(self, message, path=path, limit_name="price")


class DeadlineExceeded(BudgetExceeded):
    """The budget's wall-clock deadline has passed."""


class RateWindowExceeded(BudgetExceeded):
    """A call did not fit a rate window within the allowed wait.

    ``retry_after`` says, in seconds, when it would have fitted.
    """

    def __init__(self, message: str | None = None, *, retry_after: float = 0.0, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)
