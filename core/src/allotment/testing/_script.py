"""What a scripted provider answers (replies, failures) and what it saw (requests)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Auto = Literal["auto"]
Outcome = Literal["ok", "error", "timeout", "disconnect", "malformed", "truncated"]
FailureKind = Literal["status", "timeout", "disconnect", "malformed", "truncated"]


def _check_count(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")


@dataclass(frozen=True)
class Usage:
    """Token usage as OpenAI reports it; cached and reasoning tokens are subsets.

    ``cached_tokens`` maps to ``usage.prompt_tokens_details.cached_tokens`` and
    ``reasoning_tokens`` to ``usage.completion_tokens_details.reasoning_tokens``;
    ``None`` leaves that details object out, as many compatible servers do.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = 0
    reasoning_tokens: int | None = 0

    def __post_init__(self) -> None:
        _check_count("prompt_tokens", self.prompt_tokens)
        _check_count("completion_tokens", self.completion_tokens)
        _check_count("cached_tokens", self.cached_tokens, optional=True)
        _check_count("reasoning_tokens", self.reasoning_tokens, optional=True)
        if self.cached_tokens is not None and self.cached_tokens > self.prompt_tokens:
            raise ValueError("cached_tokens are part of prompt_tokens and cannot exceed them")
        if self.reasoning_tokens is not None and self.reasoning_tokens > self.completion_tokens:
            raise ValueError(
                "reasoning_tokens are part of completion_tokens and cannot exceed them"
            )

    @property
    def total_tokens(self) -> int:
        """prompt_tokens + completion_tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            (self.cached_tokens or 0) + (other.cached_tokens or 0),
            (self.reasoning_tokens or 0) + (other.reasoning_tokens or 0),
        )

    def to_openai(self) -> dict[str, Any]:
        """The ``usage`` object of a chat completion."""
        data: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens is not None:
            data["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens, "audio_tokens": 0}
        if self.reasoning_tokens is not None:
            data["completion_tokens_details"] = {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            }
        return data


@dataclass(frozen=True)
class ToolCall:
    """One function call in a reply; ``arguments`` given as a string is sent verbatim.

    Without an ``id`` a fresh ``call_...`` id is made for every response that uses it.
    """

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON string OpenAI puts on the wire."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(dict(self.arguments), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Reply:
    """A successful (HTTP 200) answer.

    ``usage="auto"`` counts tokens, a ``Usage`` is reported as given, ``None`` sends no usage.
    ``model=None`` echoes the request's model. ``finish_reason=None`` means "tool_calls" when
    there are calls, else "stop". ``delay`` is seconds before the response starts;
    ``chunk_delay`` seconds between stream chunks. ``chunk_size`` (characters) or ``chunks``
    (count) split streamed text and arguments; by default text streams word by word.
    ``stream_usage=False`` omits the usage chunk even when the request asks for it.
    ``truncate_after`` cuts a stream after that many chunks (a body: halfway) and drops
    the connection.
    """

    content: str | None = None
    calls: tuple[ToolCall, ...] = ()
    usage: Usage | Auto | None = "auto"
    model: str | None = None
    finish_reason: str | None = None
    delay: float = 0.0
    chunk_size: int | None = None
    chunks: int | None = None
    chunk_delay: float = 0.0
    stream_usage: bool = True
    truncate_after: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.calls, tuple):
            object.__setattr__(self, "calls", tuple(self.calls))
        if self.usage is not None and self.usage != "auto" and not isinstance(self.usage, Usage):
            raise TypeError(f'usage must be a Usage, "auto" or None, got {self.usage!r}')
        if self.chunk_size is not None and self.chunks is not None:
            raise ValueError("give chunk_size or chunks, not both")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if self.chunks is not None and self.chunks < 1:
            raise ValueError("chunks must be at least 1")
        _check_count("truncate_after", self.truncate_after, optional=True)
        _check_seconds("delay", self.delay)
        _check_seconds("chunk_delay", self.chunk_delay)

    @property
    def effective_finish_reason(self) -> str:
        """The finish_reason that goes on the wire."""
        if self.finish_reason is not None:
            return self.finish_reason
        return "tool_calls" if self.calls else "stop"

    @classmethod
    def text(
        cls,
        content: str,
        *,
        usage: Usage | Auto | None = "auto",
        model: str | None = None,
        finish_reason: str | None = None,
        delay: float = 0.0,
        chunk_size: int | None = None,
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        stream_usage: bool = True,
        truncate_after: int | None = None,
    ) -> Reply:
        """An assistant message with text content."""
        return cls(
            content=content,
            usage=usage,
            model=model,
            finish_reason=finish_reason,
            delay=delay,
            chunk_size=chunk_size,
            chunks=chunks,
            chunk_delay=chunk_delay,
            stream_usage=stream_usage,
            truncate_after=truncate_after,
        )

    @classmethod
    def tool_call(
        cls,
        name: str,
        arguments: Mapping[str, Any] | str | None = None,
        *,
        id: str | None = None,
        content: str | None = None,
        usage: Usage | Auto | None = "auto",
        model: str | None = None,
        finish_reason: str | None = None,
        delay: float = 0.0,
        chunk_size: int | None = None,
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        stream_usage: bool = True,
        truncate_after: int | None = None,
    ) -> Reply:
        """An assistant message that calls one function."""
        call = ToolCall(name, {} if arguments is None else arguments, id)
        return cls.tool_calls(
            call,
            content=content,
            usage=usage,
            model=model,
            finish_reason=finish_reason,
            delay=delay,
            chunk_size=chunk_size,
            chunks=chunks,
            chunk_delay=chunk_delay,
            stream_usage=stream_usage,
            truncate_after=truncate_after,
        )

    @classmethod
    def tool_calls(
        cls,
        *calls: ToolCall,
        content: str | None = None,
        usage: Usage | Auto | None = "auto",
        model: str | None = None,
        finish_reason: str | None = None,
        delay: float = 0.0,
        chunk_size: int | None = None,
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        stream_usage: bool = True,
        truncate_after: int | None = None,
    ) -> Reply:
        """An assistant message with one or more (parallel) function calls."""
        if not calls:
            raise ValueError("tool_calls needs at least one ToolCall")
        return cls(
            content=content,
            calls=calls,
            usage=usage,
            model=model,
            finish_reason=finish_reason,
            delay=delay,
            chunk_size=chunk_size,
            chunks=chunks,
            chunk_delay=chunk_delay,
            stream_usage=stream_usage,
            truncate_after=truncate_after,
        )


_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", None, "You are not allowed to access this resource."),
    404: ("invalid_request_error", None, "Not found."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests (scripted). Please try again later.",
    ),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


@dataclass(frozen=True)
class Failure:
    """One failed request; each queued Failure is consumed by exactly one request.

    Build with the class methods. ``timeout`` holds the request open ``seconds`` (or until
    the provider stops) and then closes the connection without an answer. ``truncated``
    serves the default reply but drops the connection after ``after_chunks`` stream chunks
    (a non-streamed body is cut halfway). ``malformed`` and ``truncated`` answer 200.
    """

    kind: FailureKind
    status: int | None = None
    retry_after: float | None = None
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    seconds: float = 30.0
    after_chunks: int = 1

    def __post_init__(self) -> None:
        if self.kind == "status" and (self.status is None or not 400 <= self.status <= 599):
            raise ValueError(f"an HTTP failure needs a 4xx or 5xx status, got {self.status!r}")
        if self.retry_after is not None:
            _check_seconds("retry_after", self.retry_after)
        _check_seconds("seconds", self.seconds)
        _check_count("after_chunks", self.after_chunks)

    @classmethod
    def http(
        cls,
        status: int,
        *,
        retry_after: float | None = None,
        message: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
    ) -> Failure:
        """An HTTP error with an OpenAI error body; ``retry_after`` sets Retry-After headers."""
        return cls(
            "status",
            status=status,
            retry_after=retry_after,
            message=message,
            error_type=error_type,
            code=code,
        )

    @classmethod
    def rate_limit(cls, *, retry_after: float | None = 0.01, message: str | None = None) -> Failure:
        """HTTP 429; the short default Retry-After keeps retrying clients fast in tests."""
        return cls.http(429, retry_after=retry_after, message=message)

    @classmethod
    def server_error(cls, *, retry_after: float | None = None) -> Failure:
        """HTTP 500."""
        return cls.http(500, retry_after=retry_after)

    @classmethod
    def overloaded(cls, *, retry_after: float | None = None) -> Failure:
        """HTTP 503."""
        return cls.http(503, retry_after=retry_after)

    @classmethod
    def timeout(cls, seconds: float = 30.0) -> Failure:
        """Never answer: hold the request ``seconds``, then close the connection."""
        return cls("timeout", seconds=seconds)

    @classmethod
    def disconnect(cls) -> Failure:
        """Close the connection at once without sending a response."""
        return cls("disconnect")

    @classmethod
    def malformed(cls) -> Failure:
        """HTTP 200 whose JSON body (or first stream event) is not valid JSON."""
        return cls("malformed")

    @classmethod
    def truncated(cls, after_chunks: int = 1) -> Failure:
        """HTTP 200 with the default reply, cut off after ``after_chunks`` stream chunks."""
        return cls("truncated", after_chunks=after_chunks)

    def error_body(self) -> dict[str, Any]:
        """The OpenAI-style ``{"error": {...}}`` body of an HTTP failure."""
        status = self.status or 500
        default_type, default_code, default_message = _STATUS_ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
        )
        return error_body(
            self.message or default_message,
            self.error_type or default_type,
            self.code if self.code is not None else default_code,
        )


def error_body(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


@dataclass(frozen=True)
class Request:
    """An HTTP request as the provider parsed it; what a responder receives.

    ``headers`` have lower-case names; ``body`` is the parsed JSON (None if absent or invalid);
    ``time`` is ``time.time()`` on arrival; ``client_address`` tells connections apart.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    time: float
    client_address: tuple[str, int]

    @property
    def json(self) -> dict[str, Any]:
        """The body if it is a JSON object, else an empty dict."""
        return self.body if isinstance(self.body, dict) else {}

    @property
    def model(self) -> str | None:
        """The requested model."""
        model = self.json.get("model")
        return model if isinstance(model, str) else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Chat messages (empty for other endpoints)."""
        messages = self.json.get("messages")
        if not isinstance(messages, list):
            return []
        return [m for m in messages if isinstance(m, dict)]

    @property
    def last_message(self) -> dict[str, Any] | None:
        """The final chat message, e.g. to see whether a tool result just came back."""
        messages = self.messages
        return messages[-1] if messages else None

    @property
    def tools(self) -> list[dict[str, Any]]:
        """Tool definitions the request offered."""
        tools = self.json.get("tools")
        return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []

    @property
    def stream(self) -> bool:
        """Whether the client asked for server-sent events."""
        return self.json.get("stream") is True

    @property
    def include_usage(self) -> bool:
        """Whether the client sent ``stream_options: {"include_usage": true}``."""
        options = self.json.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(frozen=True)
class RecordedRequest(Request):
    """A request with what the provider did about it.

    ``status`` is None when no response was sent (timeout, disconnect). ``usage`` is what the
    client was told (None if nothing was reported); ``charged`` is what the provider would
    bill for a 200, whether or not it was reported.
    """

    status: int | None = None
    outcome: Outcome = "ok"
    usage: Usage | None = None
    charged: Usage | None = None
    served: Reply | Failure | None = None

    @property
    def billed(self) -> bool:
        """True when the provider answered 200 and so would charge for it."""
        return self.status == 200
