"""Errors and warnings the LangChain integration raises on top of the kernel's."""

from __future__ import annotations

from typing import Any

from allotment import BudgetExceeded


class StreamCutOff(BudgetExceeded):
    """A streamed response went past the output tokens its hold covers, so the stream was
    stopped at that chunk. What was streamed is charged (flagged estimated); the cap holds.

    It happens when a provider ignores ``max_tokens``, or when the request set none and
    the model wrote more than the bound the estimator reserved. Set ``max_tokens`` on the
    model (or a larger bound) if the output was legitimate.
    """


class BudgetHardStop(BaseException):
    """A refusal raised as a ``BaseException``, for ``BudgetCallbackHandler(hard_stop=True)``.

    LangChain's ``with_retry()``, ``ToolNode(handle_tool_errors=True)``, tool error handlers
    and most user code catch ``Exception``; this passes through all of them, so one refusal
    ends the whole run. It is not an ``allotment.BudgetExceeded`` (that is an ``Exception``):
    catch ``BudgetHardStop`` itself, and read the refusal from ``.error``.
    """

    def __init__(self, error: BudgetExceeded) -> None:
        super().__init__(str(error))
        self.error = error
        """The refusal: ``path``, ``limit_name``, ``limit``, ``spent``, ``held``, ``asked``."""

    @property
    def path(self) -> str:
        """The budget that refused."""
        return self.error.path

    @property
    def limit_name(self) -> str:
        """The limit that tripped."""
        return self.error.limit_name

    @property
    def remaining(self) -> Any:
        """What was left on that limit."""
        return self.error.remaining

    def __reduce__(self) -> Any:
        return (type(self), (self.error,))


class StreamUsageWarning(UserWarning):
    """A model streams without reporting usage, so what it spends is our estimate.

    ``ChatOpenAI`` asks for streamed usage only when it talks to the default OpenAI URL;
    with a custom ``base_url`` set ``stream_usage=True`` (if the server supports
    ``stream_options``) to have streams charged exactly.
    """
