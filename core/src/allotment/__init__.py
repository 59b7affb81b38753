"""allotment: budget enforcement for LLM agents. Reserve before every call, settle after."""

from ._budget import Budget, Hold, Remaining
from ._call import Call, Image
from ._capability import CapabilityError
from ._clock import Clock, ManualClock, SystemClock
from ._context import current, resolve, set_default
from ._errors import (
    AffineError,
    AllotmentError,
    BudgetClosed,
    BudgetExceeded,
    ConfigurationError,
    DeadlineExceeded,
    HoldEnded,
    InvalidAmount,
    LedgerError,
    PricingError,
    RateWindowExceeded,
    UnknownLedger,
    UnknownPrice,
)
from ._estimate import AdaptiveEstimator, SoundEstimator
from ._events import Event
from ._ledger import Ledger, NodeState
from ._limits import Limits, Rate, Spawn
from ._plugins import plugins
from ._pricing import GenaiPrices, Price, PriceTable
from ._report import Report
from ._usage import Estimate, Usage
from .hookspecs import hookimpl

__all__ = [
    "AdaptiveEstimator",
    "AffineError",
    "AllotmentError",
    "Budget",
    "BudgetClosed",
    "BudgetExceeded",
    "Call",
    "CapabilityError",
    "Clock",
    "ConfigurationError",
    "DeadlineExceeded",
    "Estimate",
    "Event",
    "GenaiPrices",
    "Hold",
    "HoldEnded",
    "Image",
    "InvalidAmount",
    "Ledger",
    "LedgerError",
    "Limits",
    "ManualClock",
    "NodeState",
    "Price",
    "PriceTable",
    "PricingError",
    "Rate",
    "RateWindowExceeded",
    "Remaining",
    "Report",
    "SoundEstimator",
    "Spawn",
    "SystemClock",
    "UnknownLedger",
    "UnknownPrice",
    "Usage",
    "current",
    "hookimpl",
    "plugins",
    "resolve",
    "set_default",
]
