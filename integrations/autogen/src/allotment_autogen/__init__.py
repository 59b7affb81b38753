"""allotment for AutoGen: budgeted model clients, runtime middleware, and instrument().

The names below load on first use: the ``allotment`` entry point imports this package,
and importing AutoGen is for the code that uses it, not for every budget in the process.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import BudgetedChatCompletionClient, BudgetedChatCompletionClientConfig
    from ._instrument import instrument
    from ._middleware import BudgetMiddleware

__all__ = [
    "BudgetMiddleware",
    "BudgetedChatCompletionClient",
    "BudgetedChatCompletionClientConfig",
    "instrument",
]

_HOME = {
    "BudgetMiddleware": "._middleware",
    "BudgetedChatCompletionClient": "._client",
    "BudgetedChatCompletionClientConfig": "._client",
    "instrument": "._instrument",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
