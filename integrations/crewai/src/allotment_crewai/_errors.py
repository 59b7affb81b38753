"""Refusals CrewAI lets through: kernel refusals that are also CrewAI ``HookAborted``.

CrewAI swallows any exception a hook raises except ``HookAborted``, and retries a call a
hook blocked by returning ``False``. So every refusal is re-raised as a class that is both
the kernel's refusal (``except allotment.BudgetExceeded`` still catches it) and a
``HookAborted`` (CrewAI neither retries nor swallows it; it leaves ``kickoff()`` typed).

The classes derive from a CrewAI class, so they are built on first use: importing this
module does not import CrewAI.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import allotment

if TYPE_CHECKING:
    from crewai.hooks import HookAborted

    class CrewBudgetExceeded(allotment.BudgetExceeded, HookAborted):
        """A refusal raised inside CrewAI."""

    class CrewBudgetClosed(allotment.BudgetClosed, CrewBudgetExceeded): ...

    class CrewDeadlineExceeded(allotment.DeadlineExceeded, CrewBudgetExceeded): ...

    class CrewRateWindowExceeded(allotment.RateWindowExceeded, CrewBudgetExceeded): ...

    class CrewUnknownPrice(allotment.UnknownPrice, CrewBudgetExceeded): ...

    class CrewLedgerError(allotment.LedgerError, CrewBudgetExceeded): ...


SOURCE = "allotment"
"""``HookAborted.source`` of every refusal, as CrewAI's telemetry and messages name it."""

# CrewAI's retry wrapper retries errors whose message reads like a provider throttle.
_RETRY_WORDS = re.compile(r"rate[\s_-]*limit|too many requests|throttl|resource exhausted", re.I)

_KINDS: tuple[tuple[str, type[allotment.AllotmentError]], ...] = (
    ("CrewBudgetClosed", allotment.BudgetClosed),
    ("CrewDeadlineExceeded", allotment.DeadlineExceeded),
    ("CrewRateWindowExceeded", allotment.RateWindowExceeded),
    ("CrewUnknownPrice", allotment.UnknownPrice),
    ("CrewLedgerError", allotment.LedgerError),
)
_DOCS = {
    "CrewBudgetExceeded": "A refusal raised inside CrewAI: an ``allotment.BudgetExceeded`` that "
    "is also a ``crewai.hooks.HookAborted``, so CrewAI neither retries nor swallows it.",
    "CrewBudgetClosed": "The budget (or the crew run's part of it) is closed.",
    "CrewDeadlineExceeded": "The budget's deadline has passed.",
    "CrewRateWindowExceeded": "The call did not fit a rate window within the allowed wait.",
    "CrewUnknownPrice": "No price is known for the model and a dollar cap applies.",
    "CrewLedgerError": "The ledger failed, so the call was refused rather than sent unmetered.",
}
_classes: dict[str, type[Any]] = {}


def _build() -> dict[str, type[Any]]:
    if _classes:
        return _classes
    from crewai.hooks import HookAborted

    namespace = {
        "__module__": __name__,
        "__reduce__": _reduce,
        "__doc__": _DOCS["CrewBudgetExceeded"],
    }
    base = type("CrewBudgetExceeded", (allotment.BudgetExceeded, HookAborted), namespace)
    built: dict[str, type[Any]] = {"CrewBudgetExceeded": base}
    for name, kernel in _KINDS:
        built[name] = type(name, (kernel, base), {"__module__": __name__, "__doc__": _DOCS[name]})
    for cls in built.values():
        cls.__qualname__ = cls.__name__
    _classes.update(built)
    globals().update(built)
    return _classes


def __getattr__(name: str) -> Any:
    if name in _DOCS:
        return _build()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _reduce(self: BaseException) -> Any:
    # Refusals cross thread pools and processes in CrewAI; keep every field, the
    # HookAborted ones too (the kernel's own reducer knows only its fields).
    return (_rebuild, (type(self).__name__, str(self), dict(self.__dict__)))


def _rebuild(name: str, message: str, state: dict[str, Any]) -> BaseException:
    cls: type[BaseException] = _build()[name]
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


def refusal(err: BaseException) -> CrewBudgetExceeded:
    """``err`` (a kernel refusal or a failure to reserve) as the refusal CrewAI lets through.

    The message keeps the kernel's (budget path, limit, spent, held, asked) and never
    reads like a provider throttle, which CrewAI would retry.
    """
    classes = _build()
    if isinstance(err, classes["CrewBudgetExceeded"]):
        crew_error: CrewBudgetExceeded = err
        return crew_error
    name = "CrewBudgetExceeded"
    for candidate, kernel in _KINDS:
        if isinstance(err, kernel):
            name = candidate
            break
    message = _RETRY_WORDS.sub("window", str(err))
    if not isinstance(err, allotment.BudgetExceeded):
        message = (
            f"allotment could not reserve this call ({type(err).__name__}: {message}); "
            f"refusing it rather than sending it unmetered"
        )
    cls: type[CrewBudgetExceeded] = classes[name]
    out = cls.__new__(cls)
    Exception.__init__(out, message)
    out.__dict__.update(getattr(err, "__dict__", {}))
    for field in ("path", "limit_name", "limit", "spent", "held", "asked"):
        if field not in out.__dict__:
            out.__dict__[field] = "" if field in ("path", "limit_name") else None
    if not isinstance(err, allotment.BudgetExceeded):
        out.limit_name = "ledger" if isinstance(err, allotment.LedgerError) else "error"
    out.reason = message
    out.source = SOURCE
    return out
