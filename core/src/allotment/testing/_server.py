"""The scripted OpenAI-compatible HTTP server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from . import _wire
from ._script import (
    Failure,
    Outcome,
    RecordedRequest,
    Reply,
    Request,
    Usage,
    error_body,
)
from ._tokens import (
    Tokenizer,
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    default_tokenizer,
)

Responder = Callable[[Request], Reply | Failure | None]

DEFAULT_REPLY = Reply.text("This is a scripted reply.")
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
DEFAULT_API_KEY = "sk-allotment-scripted-not-a-real-key"

_GENERATION_PATHS: dict[str, _wire.Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
}
_EMBEDDINGS_PATH = "/v1/embeddings"
_MODELS_PATH = "/v1/models"
_MAX_BODY = 64 * 1024 * 1024
# Loopback only: a scripted provider must never be reachable from another machine.
_HOST = "127.0.0.1"


@dataclass
class _Plan:
    """What the handler sends; decided (and recorded) before any byte goes out."""

    action: Literal["json", "sse", "hang", "drop"]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    events: list[bytes] = field(default_factory=list)
    cut: int | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0


class ScriptedProvider:
    """An OpenAI-compatible server on 127.0.0.1 that answers from a script.

    Each chat or legacy completion request takes the next queued ``Reply`` or ``Failure``;
    with the queue empty it asks ``responder`` (if given, and it returns non-None), then
    uses ``default``. ``default=None`` makes an empty script answer HTTP 400
    ``script_exhausted``, so a test notices an extra call. Embeddings never use the queue.
    """

    def __init__(
        self,
        *,
        default: Reply | Failure | None = DEFAULT_REPLY,
        responder: Responder | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
        tokenizer: Tokenizer | None = None,
        api_key: str = DEFAULT_API_KEY,
        port: int = 0,
        embedding_dimensions: int = 16,
        verbose: bool = False,
    ) -> None:
        self.default = default
        self.responder = responder
        self.models = tuple(models)
        self.api_key = api_key
        self.embedding_dimensions = embedding_dimensions
        self.verbose = verbose
        self._tokenizer = tokenizer
        self._port = port
        self._lock = threading.Lock()
        self._queue: deque[Reply | Failure] = deque()
        self._log: list[RecordedRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ScriptedProvider:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError("ScriptedProvider is already running")
        # Loading tiktoken takes a few hundred ms; pay it here, not inside a client's timeout.
        _ = self.tokenizer
        server = _Server((_HOST, self._port), _Handler, self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            # stop() waits up to one poll interval for the serving loop to notice.
            kwargs={"poll_interval": 0.01},
            name=f"ScriptedProvider:{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake held requests and close every open connection."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> ScriptedProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("ScriptedProvider is not running; call start() or use `with`")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, for ``openai.OpenAI(base_url=...)``."""
        return f"http://{_HOST}:{self.port}/v1"

    @property
    def tokenizer(self) -> Tokenizer:
        """What ``usage="auto"`` counts with; ``tokenizer.name`` says which."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    # -- scripting -------------------------------------------------------------------------

    def add(self, *items: Reply | Failure) -> ScriptedProvider:
        """Queue replies or failures, each answering one request in order."""
        for item in items:
            if not isinstance(item, (Reply, Failure)):
                raise TypeError(f"expected Reply or Failure, got {type(item).__name__}")
        with self._lock:
            self._queue.extend(items)
        return self

    def fail(
        self,
        failure: int | Failure,
        *,
        times: int = 1,
        retry_after: float | None = None,
        message: str | None = None,
    ) -> ScriptedProvider:
        """Queue ``times`` failures: an HTTP status (429 gets a short Retry-After) or a Failure."""
        if isinstance(failure, Failure):
            if retry_after is not None or message is not None:
                raise ValueError("retry_after and message apply to a status code, not a Failure")
            item = failure
        elif failure == 429:
            item = Failure.rate_limit(
                retry_after=0.01 if retry_after is None else retry_after, message=message
            )
        else:
            item = Failure.http(failure, retry_after=retry_after, message=message)
        return self.add(*([item] * times))

    @property
    def pending(self) -> int:
        """How many queued items are not yet served."""
        with self._lock:
            return len(self._queue)

    def reset(self) -> None:
        """Forget recorded requests and drop queued items; default and responder stay."""
        with self._lock:
            self._queue.clear()
            self._log.clear()

    # -- what happened ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request so far; each is recorded before its answer is sent."""
        with self._lock:
            return list(self._log)

    @property
    def calls(self) -> int:
        """Chat and legacy completion requests answered 200 (truncated or malformed too)."""
        return sum(1 for r in self.requests if r.billed and r.path in _GENERATION_PATHS)

    @property
    def attempts(self) -> int:
        """Chat and legacy completion requests received, whatever the outcome."""
        return sum(1 for r in self.requests if r.path in _GENERATION_PATHS)

    @property
    def billed(self) -> int:
        """Requests the provider would charge for: every 200 on a model endpoint."""
        return sum(1 for r in self.requests if r.billed and r.charged is not None)

    @property
    def billed_usage(self) -> Usage:
        """Sum of what billed requests would be charged, reported to the client or not."""
        total = Usage(0, 0)
        for record in self.requests:
            if record.billed and record.charged is not None:
                total = total + record.charged
        return total

    # -- answering -------------------------------------------------------------------------

    def _plan(self, request: Request) -> _Plan:
        """Decide the response and record it; runs on the handler thread."""
        path = request.path
        if request.method == "GET" and path == _MODELS_PATH:
            listing = [self._model_object(m) for m in self.models]
            return self._json(request, 200, {"object": "list", "data": listing})
        if request.method == "GET" and path.startswith(_MODELS_PATH + "/"):
            name = unquote(path[len(_MODELS_PATH) + 1 :])
            if name in self.models:
                return self._json(request, 200, self._model_object(name))
            message = f"The model '{name}' does not exist or you do not have access to it."
            body = error_body(message, "invalid_request_error", "model_not_found")
            return self._json(request, 404, body, outcome="error")
        is_model_path = path in _GENERATION_PATHS or path == _EMBEDDINGS_PATH
        if request.method != "POST" or not is_model_path:
            message = f"Invalid URL ({request.method} {path})"
            body = error_body(message, "invalid_request_error")
            return self._json(request, 404, body, outcome="error")
        if not isinstance(request.body, dict):
            message = "We could not parse the JSON body of your request."
            body = error_body(message, "invalid_request_error")
            return self._json(request, 400, body, outcome="error")
        if request.model is None:
            body = error_body("you must provide a model parameter", "invalid_request_error")
            body["error"]["param"] = "model"
            return self._json(request, 400, body, outcome="error")
        if path == _EMBEDDINGS_PATH:
            return self._embeddings(request)
        return self._generation(request, _GENERATION_PATHS[path])

    def _next(self, request: Request) -> Reply | Failure | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        if self.responder is not None:
            item = self.responder(request)
            if item is not None:
                return item
        return self.default

    def _fallback_reply(self) -> Reply:
        return self.default if isinstance(self.default, Reply) else DEFAULT_REPLY

    def _generation(self, request: Request, endpoint: _wire.Endpoint) -> _Plan:
        try:
            item = self._next(request)
        except Exception as exc:
            message = f"responder raised {type(exc).__name__}: {exc}"
            body = error_body(message, "server_error", "responder_error")
            return self._json(request, 500, body, outcome="error")
        if item is None:
            message = "ScriptedProvider has no reply left (queue empty and default=None)."
            body = error_body(message, "invalid_request_error", "script_exhausted")
            return self._json(request, 400, body, outcome="error")
        if isinstance(item, Reply):
            cut = item.truncate_after is not None
            return self._reply(request, endpoint, item, item, outcome="truncated" if cut else "ok")
        if item.kind == "status":
            status = item.status or 500
            headers: dict[str, str] = {}
            if item.retry_after is not None:
                headers["retry-after"] = str(math.ceil(item.retry_after))
                headers["retry-after-ms"] = str(round(item.retry_after * 1000))
            return self._json(
                request, status, item.error_body(), outcome="error", headers=headers, served=item
            )
        if item.kind in ("timeout", "disconnect"):
            outcome: Outcome = "timeout" if item.kind == "timeout" else "disconnect"
            self._record(
                request, status=None, outcome=outcome, usage=None, charged=None, served=item
            )
            if item.kind == "timeout":
                return _Plan("hang", delay=item.seconds)
            return _Plan("drop")
        reply = self._fallback_reply()
        if item.kind == "truncated":
            reply = dataclasses.replace(reply, truncate_after=item.after_chunks)
            return self._reply(request, endpoint, reply, item, outcome="truncated")
        return self._reply(request, endpoint, reply, item, outcome="malformed")

    def _reply(
        self,
        request: Request,
        endpoint: _wire.Endpoint,
        reply: Reply,
        served: Reply | Failure,
        *,
        outcome: Outcome,
    ) -> _Plan:
        charged = self._usage(request, endpoint, reply)
        model = reply.model or request.model or ""
        created = int(request.time)
        stream = request.stream
        # As with OpenAI, a stream carries usage only when the request asks for it.
        usage_fields = request.include_usage and reply.stream_usage and reply.usage is not None
        wire_usage = charged if reply.usage is not None else None
        if endpoint == "chat":
            response_id = _wire.new_id("chatcmpl-")
            ids = _wire.tool_call_ids(reply.calls)
            if stream:
                chunks = _wire.chat_chunks(
                    reply,
                    id=response_id,
                    created=created,
                    model=model,
                    ids=ids,
                    usage=wire_usage,
                    usage_fields=usage_fields,
                )
            else:
                body = _wire.chat_completion(
                    reply, id=response_id, created=created, model=model, ids=ids, usage=wire_usage
                )
        else:
            response_id = _wire.new_id("cmpl-")
            if stream:
                chunks = _wire.completion_chunks(
                    reply,
                    id=response_id,
                    created=created,
                    model=model,
                    usage=wire_usage,
                    usage_fields=usage_fields,
                )
            else:
                body = _wire.completion(
                    reply, id=response_id, created=created, model=model, usage=wire_usage
                )
        if reply.usage is None or outcome == "malformed":
            reported = None
        elif stream:
            # The usage chunk is the last one; a cut stream reports usage only if it got there.
            cut = reply.truncate_after
            reached = cut is None or cut >= len(chunks)
            reported = charged if usage_fields and reached else None
        else:
            reported = charged if reply.truncate_after is None else None
        self._record(
            request, status=200, outcome=outcome, usage=reported, charged=charged, served=served
        )
        headers = {"x-request-id": _wire.new_id("req_")}
        if stream:
            events = [_sse(json.dumps(chunk)) for chunk in chunks]
            if outcome == "malformed":
                events[0] = _sse(json.dumps(chunks[0])[:-7])
            events.append(_sse("[DONE]"))
            return _Plan(
                "sse",
                headers=headers,
                events=events,
                cut=reply.truncate_after,
                delay=reply.delay,
                chunk_delay=reply.chunk_delay,
            )
        data = json.dumps(body).encode()
        if outcome == "malformed":
            data = data[: len(data) // 2]
        return _Plan(
            "json",
            headers=headers,
            body=data,
            cut=None if reply.truncate_after is None else len(data) // 2,
            delay=reply.delay,
        )

    def _usage(self, request: Request, endpoint: _wire.Endpoint, reply: Reply) -> Usage:
        if isinstance(reply.usage, Usage):
            return reply.usage
        tokenizer = self.tokenizer
        body = request.json
        if endpoint == "chat":
            prompt = count_chat_prompt(body, tokenizer)
        else:
            prompt = count_completion_prompt(body, tokenizer)
        completion = tokenizer.count(reply.content or "")
        for call in reply.calls:
            completion += tokenizer.count(call.name) + tokenizer.count(call.arguments_json)
        return Usage(prompt, completion)

    def _embeddings(self, request: Request) -> _Plan:
        body = request.json
        inputs = _wire.embedding_inputs(body.get("input"))
        dimensions = body.get("dimensions")
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            dimensions = self.embedding_dimensions
        prompt = count_embedding_input(body, self.tokenizer)
        usage = Usage(prompt, 0, cached_tokens=None, reasoning_tokens=None)
        payload = _wire.embeddings(
            inputs,
            model=request.model or "",
            dimensions=dimensions,
            base64_format=body.get("encoding_format") == "base64",
            prompt_tokens=prompt,
        )
        return self._json(request, 200, payload, usage=usage)

    def _json(
        self,
        request: Request,
        status: int,
        payload: dict[str, Any],
        *,
        outcome: Outcome = "ok",
        headers: dict[str, str] | None = None,
        usage: Usage | None = None,
        served: Failure | None = None,
    ) -> _Plan:
        self._record(
            request, status=status, outcome=outcome, usage=usage, charged=usage, served=served
        )
        all_headers = {"x-request-id": _wire.new_id("req_")}
        all_headers.update(headers or {})
        return _Plan("json", status=status, headers=all_headers, body=json.dumps(payload).encode())

    def _record(
        self,
        request: Request,
        *,
        status: int | None,
        outcome: Outcome,
        usage: Usage | None,
        charged: Usage | None,
        served: Reply | Failure | None,
    ) -> None:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=request.headers,
            body=request.body,
            time=request.time,
            client_address=request.client_address,
            status=status,
            outcome=outcome,
            usage=usage,
            charged=charged,
            served=served,
        )
        with self._lock:
            self._log.append(record)

    @staticmethod
    def _model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "allotment"}


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class _Server(ThreadingHTTPServer):
    """Threads per connection; tracks open connections so stop() can close idle keep-alives."""

    daemon_threads = True
    # stop() wakes and closes everything itself; joining here could wait on a held request.
    block_on_close = False
    # Many clients connect at once in tests; a short backlog would make some wait for SYN retries.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        provider: ScriptedProvider,
    ) -> None:
        self.provider = provider
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer are part of the scripts; only report when asked.
        if self.provider.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, each reply waits ~40 ms
    # for the client's delayed ACK.
    disable_nagle_algorithm = True
    server_version = "allotment-scripted/1"
    sys_version = ""
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.provider.verbose:
            sys.stderr.write(f"ScriptedProvider: {format % args}\n")

    def _handle(self) -> None:
        received = time.time()
        raw = self._read_body()
        if raw is None:
            self.close_connection = True
            return
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                body = None
        request = Request(
            method=self.command,
            path=urlsplit(self.path).path,
            headers={key.lower(): value for key, value in self.headers.items()},
            body=body,
            time=received,
            client_address=(str(self.client_address[0]), int(self.client_address[1])),
        )
        try:
            plan = self.server.provider._plan(request)
        except Exception:
            # A bug here must not look like a scripted failure: answer 500 and say so on stderr.
            traceback.print_exc()
            message = "ScriptedProvider failed internally; see the traceback on stderr."
            body = json.dumps(error_body(message, "server_error", "provider_bug")).encode()
            plan = _Plan("json", status=500, body=body)
        try:
            self._send(plan)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        """The request body, or None when it cannot be read and the connection must close."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError:
            return None
        if not 0 <= size <= _MAX_BODY:
            return None
        return self.rfile.read(size)

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the provider stops first; True when it is still running."""
        if seconds <= 0:
            return not self.server.stopping.is_set()
        return not self.server.stopping.wait(seconds)

    def _send(self, plan: _Plan) -> None:
        if plan.action in ("hang", "drop"):
            if plan.action == "hang":
                self._wait(plan.delay)
            self.close_connection = True
            return
        if not self._wait(plan.delay):
            self.close_connection = True
            return
        self.send_response(plan.status)
        for name, value in plan.headers.items():
            self.send_header(name, value)
        if plan.action == "json":
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(plan.body)))
            self.end_headers()
            if plan.cut is None:
                self.wfile.write(plan.body)
            else:
                self.wfile.write(plan.body[: plan.cut])
                self.close_connection = True
            return
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        # Chunked framing keeps the connection reusable and lets clients detect a cut stream.
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = plan.events
        if plan.cut is not None:
            events = events[: min(plan.cut, len(events) - 1)]
        for index, event in enumerate(events):
            if index and not self._wait(plan.chunk_delay):
                self.close_connection = True
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if plan.cut is not None:
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")
