"""allotment for LangChain and LangGraph: reserve before every model and tool call.

The names below load on first use: the kernel's ``allotment`` entry point imports this
package (for its ``_plugin`` module) whenever a budget is made, and LangChain is for the
code that uses it, not for every budget in the process.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import BudgetHardStop, StreamCutOff, StreamUsageWarning
    from ._handler import BudgetCallbackHandler
    from ._http import (
        AsyncMeteredTransport,
        MeteredTransport,
        metered_http_async_client,
        metered_http_client,
    )
    from ._instrument import instrument, instrumented
    from ._subagents import METADATA_KEY

__all__ = [
    "METADATA_KEY",
    "AsyncMeteredTransport",
    "BudgetCallbackHandler",
    "BudgetHardStop",
    "MeteredTransport",
    "StreamCutOff",
    "StreamUsageWarning",
    "instrument",
    "instrumented",
    "metered_http_async_client",
    "metered_http_client",
]

_HOME = {
    "METADATA_KEY": "._subagents",
    "AsyncMeteredTransport": "._http",
    "BudgetCallbackHandler": "._handler",
    "BudgetHardStop": "._errors",
    "MeteredTransport": "._http",
    "StreamCutOff": "._errors",
    "StreamUsageWarning": "._errors",
    "instrument": "._instrument",
    "instrumented": "._instrument",
    "metered_http_async_client": "._http",
    "metered_http_client": "._http",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
