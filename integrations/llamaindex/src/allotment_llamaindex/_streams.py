"""What a stream had delivered when it stopped early.

A consumer that breaks out of a stream ends its callback event with ``GeneratorExit`` and
no response; the chunks it did receive were announced as instrumentation "in progress"
events. Keeping the latest of them, for the streams a handler is settling, lets that call
be charged for what was generated rather than for its whole hold. Observation only: an
instrumentation handler cannot stop anything.
"""

from __future__ import annotations

import threading
from typing import Any

from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]  # re-exported without __all__
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import (
    LLMChatInProgressEvent,
    LLMCompletionInProgressEvent,
)
from pydantic import PrivateAttr

_PROGRESS = (LLMChatInProgressEvent, LLMCompletionInProgressEvent)
_NOTHING = object()


class StreamWatcher(BaseEventHandler):
    """Remembers the latest chunk of each watched LLM span."""

    _latest: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "AllotmentStreamWatcher"

    def watch(self, span_id: str | None) -> None:
        if span_id is not None:
            self._latest.setdefault(span_id, _NOTHING)

    def forget(self, span_id: str | None) -> Any:
        """Stop watching ``span_id``; returns its latest chunk, or ``None``."""
        if span_id is None:
            return None
        latest = self._latest.pop(span_id, None)
        return None if latest is _NOTHING else latest

    def handle(self, event: Any, **kwargs: Any) -> None:
        if type(event) in _PROGRESS:
            span_id = event.span_id
            if span_id in self._latest:
                self._latest[span_id] = event.response


_lock = threading.Lock()
_watcher: StreamWatcher | None = None


def watcher() -> StreamWatcher:
    """The process's watcher, added to the root dispatcher on first use."""
    global _watcher
    if _watcher is None:
        with _lock:
            if _watcher is None:
                w = StreamWatcher()
                get_dispatcher().add_event_handler(w)
                _watcher = w
    return _watcher


def uninstall() -> None:
    """Remove the watcher from the root dispatcher (the next ``watcher()`` adds a new one)."""
    global _watcher
    with _lock:
        if _watcher is not None:
            # By identity: pydantic models compare equal field by field.
            handlers = get_dispatcher().event_handlers
            handlers[:] = [h for h in handlers if h is not _watcher]
            _watcher = None


def installed() -> bool:
    """Whether the watcher is on the root dispatcher."""
    return _watcher is not None
