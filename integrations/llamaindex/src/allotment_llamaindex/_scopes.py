"""Child budgets for the agents, tools and queries calls are attributed to.

A child is opened on the first call made in its scope (so a tool that never calls a model
gets none), with the limits the user configured for its name, and closed when its span
ends, which returns its unspent escrow to the parent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from allotment import Budget, ConfigurationError, Limits, Spawn

from ._spans import Segment


def _safe_name(name: str) -> str:
    # Budget names cannot hold the path separators; agent and tool names can.
    cleaned = name.replace("/", "_").replace("#", "_").strip()
    return cleaned or "_"


class Scopes:
    """The child budgets one handler opened, by scope."""

    def __init__(
        self,
        children: Mapping[str, object] | None,
        on_end: Callable[[str, Callable[[str], None]], None],
    ) -> None:
        self.children = dict(children or {})
        for name, limits in self.children.items():
            if not isinstance(name, str):
                raise ConfigurationError(f"children are named by str, not {name!r}")
            # Checked now, so a typo fails here and not at the sub-agent's first call; kept
            # as given, so a relative deadline starts when the child opens.
            Limits.of(limits, now=time.time())
        self._on_end = on_end
        self._open: dict[tuple[str, ...], Budget] = {}
        self._closing: dict[str, list[tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def budget_for(self, base: Budget, path: Sequence[Segment]) -> Budget:
        """The budget a call in ``path`` is charged to, opening children as needed."""
        budget = base
        key: tuple[str, ...] = (base.id,)
        for segment in path:
            key = (*key, segment.kind, *segment.key)
            child = self._open.get(key)
            if child is None or child.closed:
                child = self._open_child(budget, key, segment)
            budget = child
        return budget

    def _open_child(self, parent: Budget, key: tuple[str, ...], segment: Segment) -> Budget:
        with self._lock:
            child = self._open.get(key)
            if child is not None and not child.closed:
                return child
            spawn = Spawn(
                name=_safe_name(segment.name),
                how=segment.how,
                framework="llamaindex",
                metadata={"scope": segment.kind, "name": segment.name},
            )
            child = parent.spawn(spawn, limits=self.children.get(segment.name))
            self._open[key] = child
            first = segment.closes not in self._closing
            self._closing.setdefault(segment.closes, []).append(key)
        if first:
            self._on_end(segment.closes, self.span_ended)
        return child

    def span_ended(self, span_id: str) -> None:
        """Close the children whose scope was this span."""
        with self._lock:
            keys = self._closing.pop(span_id, ())
            closing = [self._open.pop(k) for k in keys if k in self._open]
        for child in closing:
            child.close()

    def close_all(self) -> None:
        """Close every child still open (the handler is being retired)."""
        with self._lock:
            closing = list(self._open.values())
            self._open.clear()
            self._closing.clear()
        for child in closing:
            child.close()

    @property
    def open(self) -> int:
        """How many children are open."""
        return len(self._open)
