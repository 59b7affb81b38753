"""Typed refusals across AutoGen's runtime.

A team's runtime serialises an agent's exception into text and ``team.run()`` raises
``RuntimeError("BudgetExceeded: ...\\nTraceback: ...")``. Every allotment error this package
lets out is remembered here (the most recent few), so the team patch can find the original
behind such a RuntimeError and raise that instead.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import TypeVar

import allotment

E = TypeVar("E", bound=allotment.AllotmentError)

_KEEP = 64
_lock = threading.Lock()
_recent: OrderedDict[str, allotment.AllotmentError] = OrderedDict()


def _key(error: BaseException) -> str:
    # What AutoGen's SerializableException prints before its traceback.
    return f"{type(error).__name__}: {error}"


def remember(error: E) -> E:
    """Note ``error`` as one this package raised; returns it, to be raised."""
    key = _key(error)
    kept = _detached(error)
    with _lock:
        _recent[key] = kept
        _recent.move_to_end(key)
        while len(_recent) > _KEEP:
            _recent.popitem(last=False)
    return error


def _detached(error: E) -> E:
    """A copy of ``error`` without its traceback: a kept traceback would keep every frame
    it passed through alive, with their budgets, clients and teams."""
    try:
        clone = copy.copy(error)
    except Exception:  # an error that cannot be rebuilt is kept as it is
        return error
    # Subclasses' own fields (UnknownPrice.model, RateWindowExceeded.retry_after) are not
    # all in what pickling rebuilds; the instance dict has them.
    clone.__dict__.update(vars(error))
    clone.__traceback__ = None
    return clone


def recover(error: BaseException) -> allotment.AllotmentError | None:
    """The allotment error a runtime turned into ``error`` (a plain RuntimeError), if any."""
    if type(error) is not RuntimeError:
        return None
    text = str(error)
    with _lock:
        candidates = list(_recent.items())
    for key, original in reversed(candidates):
        if text == key or text.startswith(key + "\n"):
            # A fresh copy: raising the kept one would attach this traceback to it.
            return _detached(original)
    return None


def forget() -> None:
    """Drop every remembered error (tests reset with this)."""
    with _lock:
        _recent.clear()
