"""allotment for LlamaIndex: budgets for LLM calls, agents, agent workflows and query engines.

The names below are imported on first use: the ``allotment`` entry point loads this
package's plugin module, and importing LlamaIndex (seconds) must wait until it is needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._coverage import UncoveredLLMWarning
    from ._handler import BudgetCallbackHandler
    from ._instrument import instrument

__all__ = [
    "BudgetCallbackHandler",
    "UncoveredLLMWarning",
    "instrument",
]

_WHERE = {
    "BudgetCallbackHandler": "._handler",
    "UncoveredLLMWarning": "._coverage",
    "instrument": "._instrument",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
