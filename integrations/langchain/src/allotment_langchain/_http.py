"""An httpx transport that meters every HTTP attempt of a model call, retries included.

``ChatOpenAI(max_retries=n)`` retries inside the openai SDK, where no callback sees it:
LangChain reports one call however many requests went out. Given to the model's HTTP
client, this transport holds budget for each retry before it is sent, refuses a retry the
budget cannot cover (with a 400 the SDK does not retry, which the handler turns back into
the refusal), and records what became of every attempt so the handler charges the ones
the provider may bill.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ._runs import LLMRun, Outcome, active_llm_run

_MODEL_PATHS = ("/chat/completions", "/completions", "/responses", "/messages", "/embeddings")


def _metered(request: httpx.Request) -> LLMRun | None:
    run = active_llm_run.get()
    if run is None or not run.open or request.method != "POST":
        return None
    return run if request.url.path.endswith(_MODEL_PATHS) else None


def _outcome(status: int) -> Outcome:
    return "billed" if status < 400 else "failed"


def _refused(request: httpx.Request, refusal: Exception) -> httpx.Response:
    body = {
        "error": {
            "message": f"allotment refused this retry before sending it: {refusal}",
            "type": "allotment_budget_exceeded",
            "param": None,
            "code": "budget_exceeded",
        }
    }
    return httpx.Response(
        400,
        # The openai SDK honours x-should-retry: a refusal must not be retried.
        headers={"content-type": "application/json", "x-should-retry": "false"},
        content=json.dumps(body).encode(),
        request=request,
    )


class MeteredTransport(httpx.BaseTransport):
    """Wraps a sync httpx transport (by default ``httpx.HTTPTransport()``) to meter each
    attempt of the model call running in this context."""

    def __init__(self, transport: httpx.BaseTransport | None = None) -> None:
        self._inner = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        run = _metered(request)
        if run is None:
            return self._inner.handle_request(request)
        index, refusal = run.begin_attempt()
        if refusal is not None:
            return _refused(request, refusal)
        try:
            response = self._inner.handle_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            run.end_attempt(index, "unsent")
            raise
        except BaseException:
            # Sent, and no answer: the provider may have run (and billed) it.
            run.end_attempt(index, "unknown")
            raise
        run.end_attempt(index, _outcome(response.status_code))
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncMeteredTransport(httpx.AsyncBaseTransport):
    """``MeteredTransport`` for ``httpx.AsyncClient``."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        run = _metered(request)
        if run is None:
            return await self._inner.handle_async_request(request)
        index, refusal = await run.abegin_attempt()
        if refusal is not None:
            return _refused(request, refusal)
        try:
            response = await self._inner.handle_async_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            run.end_attempt(index, "unsent")
            raise
        except BaseException:
            run.end_attempt(index, "unknown")
            raise
        run.end_attempt(index, _outcome(response.status_code))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def metered_http_client(
    *, transport: httpx.BaseTransport | None = None, **kwargs: Any
) -> httpx.Client:
    """An ``httpx.Client`` for ``ChatOpenAI(http_client=...)`` whose every attempt is
    metered; ``kwargs`` go to ``httpx.Client`` (timeouts, limits, ...)."""
    return httpx.Client(transport=MeteredTransport(transport), **kwargs)


def metered_http_async_client(
    *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``ChatOpenAI(http_async_client=...)``."""
    return httpx.AsyncClient(transport=AsyncMeteredTransport(transport), **kwargs)
