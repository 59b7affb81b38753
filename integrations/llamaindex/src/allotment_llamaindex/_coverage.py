"""Which LLM classes the callback manager cannot see, so that users are told, loudly.

A budget can refuse an LLM call only from ``on_event_start``, which LlamaIndex fires from
the ``llm_chat_callback`` / ``llm_completion_callback`` decorators. An LLM class that
overrides ``chat`` or ``complete`` without them sends requests no handler hears about.
"""

from __future__ import annotations

import inspect
import threading
import warnings
import weakref
from collections.abc import Iterator

METHODS = (
    "chat",
    "achat",
    "stream_chat",
    "astream_chat",
    "complete",
    "acomplete",
    "stream_complete",
    "astream_complete",
)
_WRAPPERS = frozenset(
    {
        "wrapped_llm_chat",
        "wrapped_async_llm_chat",
        "wrapped_llm_predict",
        "wrapped_async_llm_predict",
        "dummy_wrapper",
        "async_dummy_wrapper",
    }
)
"""Names of the functions the two LlamaIndex callback decorators return."""


class UncoveredLLMWarning(UserWarning):
    """An LLM class sends requests that no callback handler hears of, so no budget can
    refuse them."""


_checked: weakref.WeakSet[type] = weakref.WeakSet()
_lock = threading.Lock()


def _goes_through_callbacks(function: object) -> bool:
    for _ in range(16):  # span and other decorators wrap the callback wrapper
        code = getattr(function, "__code__", None)
        if code is not None and code.co_name in _WRAPPERS:
            return True
        inner = getattr(function, "__wrapped__", None)
        if inner is None or isinstance(inner, bool):
            return False
        function = inner
    return False


def uncovered_methods(cls: type) -> list[str]:
    """The LLM entry points of ``cls`` that bypass the callback manager."""
    if inspect.isabstract(cls):
        return []
    return [
        name
        for name in METHODS
        if callable(getattr(cls, name, None)) and not _goes_through_callbacks(getattr(cls, name))
    ]


def check(cls: type) -> list[str]:
    """Warn once per class about entry points that bypass the callback manager."""
    if cls in _checked:
        return []
    with _lock:
        if cls in _checked:
            return []
        _checked.add(cls)
    missing = uncovered_methods(cls)
    if missing:
        names = ", ".join(f"{cls.__qualname__}.{m}" for m in missing)
        warnings.warn(
            f"allotment-llamaindex cannot budget {names}: these methods do not go through "
            f"LlamaIndex's callback manager (they lack @llm_chat_callback() / "
            f"@llm_completion_callback()), so their requests are sent without a reservation "
            f"and never counted. Decorate them, or call the model through a covered method.",
            UncoveredLLMWarning,
            stacklevel=3,
        )
    return missing


def loaded_llm_classes() -> Iterator[type]:
    """Every LLM class defined so far."""
    from llama_index.core.base.llms.base import BaseLLM

    stack = list(BaseLLM.__subclasses__())
    seen: set[type] = set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        yield cls


def check_loaded() -> dict[str, list[str]]:
    """Warn about every loaded LLM class that bypasses the callback manager."""
    found = {}
    for cls in loaded_llm_classes():
        missing = check(cls)
        if missing:
            found[cls.__qualname__] = missing
    return found
