"""A scripted OpenAI-compatible HTTP provider for tests and demos.

Typical use: ``with ScriptedProvider() as p: p.fail(429).add(Reply.text("hi"))``, then point
``openai.OpenAI(base_url=p.base_url, api_key=p.api_key)`` at it and inspect ``p.requests``.
"""

from ._script import Failure, RecordedRequest, Reply, Request, ToolCall, Usage
from ._server import DEFAULT_REPLY, Responder, ScriptedProvider
from ._tokens import APPROXIMATE, Tokenizer, approximate_tokenizer, default_tokenizer

__all__ = [
    "APPROXIMATE",
    "DEFAULT_REPLY",
    "Failure",
    "RecordedRequest",
    "Reply",
    "Request",
    "Responder",
    "ScriptedProvider",
    "Tokenizer",
    "ToolCall",
    "Usage",
    "approximate_tokenizer",
    "default_tokenizer",
]
