"""The plugin host: pluggy behind a typed facade; only this module calls ``pm.hook``."""

from __future__ import annotations

import logging
import os
import threading
from decimal import Decimal
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs
from ._errors import UnknownLedger

if TYPE_CHECKING:
    from ._budget import Budget
    from ._call import Call
    from ._errors import BudgetExceeded
    from ._events import Event
    from ._ledger import Ledger
    from ._limits import Limits, Spawn
    from ._usage import Estimate, Usage

log = logging.getLogger("allotment")

DISABLE_ENV = "ALLOTMENT_DISABLE_PLUGINS"
"""Comma-separated entry-point names not to load; ``*`` loads no third-party plugin."""


class Plugins:
    """Typed calls into the hooks, so every call site is type-checked."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._events = pm.hook.allotment_event
        self._before = pm.hook.allotment_before_call
        self._after = pm.hook.allotment_after_call

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin object (and check its hooks exist)."""
        registered = self.pm.register(plugin, name)
        self.pm.check_pending()
        return registered

    def unregister(self, plugin: object) -> None:
        self.pm.unregister(plugin)

    def ledger(self, url: str) -> Ledger:
        ledger = self.pm.hook.allotment_ledger(url=url)
        if ledger is None:
            raise UnknownLedger(
                f"no ledger handles {url!r}; use memory://, sqlite:///path.db, or install a "
                f"plugin for that scheme"
            )
        return ledger  # type: ignore[no-any-return]

    def estimate(self, call: Call) -> Estimate | None:
        return self.pm.hook.allotment_estimate(call=call)  # type: ignore[no-any-return]

    def price(
        self, model: str | None, provider: str | None, usage: Usage, reserving: bool
    ) -> Decimal | None:
        return self.pm.hook.allotment_price(  # type: ignore[no-any-return]
            model=model, provider=provider, usage=usage, reserving=reserving
        )

    def before_call(self, budget: Budget, call: Call) -> None:
        if self._before.get_hookimpls():  # most processes have none: skip the dispatch
            self._before(budget=budget, call=call)

    def after_call(
        self, budget: Budget, call: Call, usage: Usage, estimate: Estimate | None
    ) -> None:
        if self._after.get_hookimpls():
            self._after(budget=budget, call=call, usage=usage, estimate=estimate)

    def budget_exceeded(self, budget: Budget, error: BudgetExceeded) -> None:
        try:
            self.pm.hook.allotment_budget_exceeded(budget=budget, error=error)
        except Exception:  # an observer must not turn a refusal into another error
            log.exception("allotment_budget_exceeded hook failed")

    def child_limits(self, parent: Budget, spawn: Spawn) -> Limits | None:
        return self.pm.hook.allotment_child_limits(  # type: ignore[no-any-return]
            parent=parent, spawn=spawn
        )

    @property
    def wants_events(self) -> bool:
        """Whether any plugin listens to events (events are built only then)."""
        return bool(self._events.get_hookimpls())

    def event(self, event: Event) -> None:
        try:
            self._events(event=event)
        except Exception:  # audit sinks observe; money operations already happened
            log.exception("allotment_event hook failed for %s", event.kind)


_lock = threading.Lock()
_plugins: Plugins | None = None


def _build() -> Plugins:
    from . import _backends, _estimate, _pricing

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_backends, "allotment.ledgers")
    pm.register(_pricing.GenaiPrices(), "allotment.prices")
    pm.register(_estimate.SoundEstimator(), "allotment.estimator")
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    if "*" not in disabled:
        for name in disabled:
            pm.set_blocked(name)
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return Plugins(pm)


def plugins() -> Plugins:
    """The process's plugin host, built on first use (default plugins, then entry points)."""
    global _plugins
    if _plugins is None:
        with _lock:
            if _plugins is None:
                _plugins = _build()
    return _plugins


def reset_plugins() -> None:
    """Forget the plugin host; the next ``plugins()`` builds it anew (tests use this)."""
    global _plugins
    with _lock:
        _plugins = None
