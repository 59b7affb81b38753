"""A deterministic corpus of prompts for estimator tests and benchmarks.

``make_corpus(seed)`` builds chat requests of several shapes (English prose, wide JSON
tool schemas, CJK/Cyrillic/Arabic/emoji text, pasted base64, long multi-turn histories
with tool calls), all from ``random.Random(seed)``, so every run sees the same prompts.
``reference_tokens`` counts a prompt the way OpenAI bills a chat request, given a text
tokenizer, to stand in for the provider's reported usage.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Prompt", "make_corpus", "reference_tokens"]

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "can",
    "has",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "if",
    "out",
    "up",
    "what",
    "about",
    "into",
    "than",
    "them",
    "its",
    "only",
    "some",
    "could",
    "other",
    "time",
    "new",
    "budget",
    "agent",
    "model",
    "token",
    "reserve",
    "settle",
    "ledger",
    "limit",
    "price",
    "estimate",
    "call",
    "tool",
    "output",
    "input",
    "cache",
    "reasoning",
    "schema",
    "request",
    "response",
    "function",
    "argument",
    "parallel",
    "retry",
    "error",
    "because",
    "although",
    "nevertheless",
    "particularly",
    "internationalization",
    "configuration",
    "implementation",
    "approximately",
    "responsibility",
    "characteristics",
]

_CYRILLIC = [
    "бюджет",
    "агент",
    "модель",
    "запрос",
    "ответ",
    "цена",
    "лимит",
    "токен",
    "вызов",
    "инструмент",
    "данные",
]
_ARABIC = [
    "ميزانية",
    "وكيل",
    "نموذج",
    "طلب",
    "استجابة",
    "سعر",
    "حد",
    "رمز",
    "استدعاء",
    "أداة",
    "بيانات",
]
_EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "✨", "🧪", "💸", "🤖", "❤️", "🏳️‍🌈"]


@dataclass(frozen=True)
class Prompt:
    """One chat request: OpenAI-style messages and tool schemas."""

    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)


def _prose(rng: random.Random, words: int) -> str:
    out: list[str] = []
    sentence = 0
    for _ in range(words):
        w = rng.choice(_WORDS)
        if sentence == 0:
            w = w.capitalize()
        out.append(w)
        sentence += 1
        if sentence > rng.randint(6, 18):
            out[-1] += rng.choice([".", ".", "?", "!", ";", ","])
            sentence = 0 if out[-1][-1] in ".?!" else sentence
        elif rng.random() < 0.03:
            out.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
    return " ".join(out) + "."


def _cjk(rng: random.Random, chars: int) -> str:
    out = []
    for i in range(chars):
        out.append(
            chr(rng.randint(0x4E00, 0x9FFF))
            if rng.random() < 0.8
            else chr(rng.randint(0x3041, 0x3096))
        )
        if i % rng.randint(8, 30) == 0:
            out.append("。")
    return "".join(out)


def _multilingual(rng: random.Random, words: int) -> str:
    parts: list[str] = []
    for _ in range(words):
        r = rng.random()
        if r < 0.25:
            parts.append(rng.choice(_CYRILLIC))
        elif r < 0.5:
            parts.append(rng.choice(_ARABIC))
        elif r < 0.65:
            parts.append("".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 4))))
        elif r < 0.85:
            parts.append(_cjk(rng, rng.randint(2, 12)))
        else:
            parts.append(rng.choice(_WORDS))
    return " ".join(parts)


def _base64_blob(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.randbytes(size)).decode()


def _schema(rng: random.Random, width: int) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for i in range(width):
        name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{i}"
        kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "object"])
        prop: dict[str, Any]
        if kind == "enum":
            prop = {
                "type": "string",
                "enum": [rng.choice(_WORDS) for _ in range(rng.randint(2, 8))],
            }
        elif kind == "array":
            prop = {"type": "array", "items": {"type": rng.choice(["string", "integer"])}}
        elif kind == "object":
            prop = {
                "type": "object",
                "properties": {f"k{j}": {"type": "string"} for j in range(rng.randint(1, 4))},
            }
        else:
            prop = {"type": kind}
        if rng.random() < 0.7:
            prop["description"] = _prose(rng, rng.randint(3, 20))
        props[name] = prop
    return {
        "type": "function",
        "function": {
            "name": f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}",
            "description": _prose(rng, rng.randint(5, 40)),
            "parameters": {
                "type": "object",
                "properties": props,
                "required": sorted(rng.sample(sorted(props), k=min(len(props), 3))),
            },
        },
    }


def _system(rng: random.Random) -> dict[str, Any]:
    return {"role": "system", "content": _prose(rng, rng.randint(20, 120))}


def _english(rng: random.Random) -> Prompt:
    return Prompt(
        "english", [_system(rng), {"role": "user", "content": _prose(rng, rng.randint(30, 600))}]
    )


def _tools(rng: random.Random) -> Prompt:
    tools = [_schema(rng, rng.randint(5, 40)) for _ in range(rng.randint(1, 6))]
    return Prompt(
        "tools", [_system(rng), {"role": "user", "content": _prose(rng, rng.randint(5, 60))}], tools
    )


def _intl(rng: random.Random) -> Prompt:
    return Prompt(
        "multilingual",
        [_system(rng), {"role": "user", "content": _multilingual(rng, rng.randint(20, 400))}],
    )


def _cjk_prompt(rng: random.Random) -> Prompt:
    return Prompt("cjk", [{"role": "user", "content": _cjk(rng, rng.randint(50, 1500))}])


def _b64(rng: random.Random) -> Prompt:
    text = f"Decode this: {_base64_blob(rng, rng.randint(100, 6000))}\nWhat is it?"
    return Prompt("base64", [_system(rng), {"role": "user", "content": text}])


def _history(rng: random.Random) -> Prompt:
    messages: list[dict[str, Any]] = [_system(rng)]
    tools = [_schema(rng, rng.randint(2, 8)) for _ in range(rng.randint(0, 3))]
    for turn in range(rng.randint(2, 12)):
        pick = rng.random()
        user = (
            _prose(rng, rng.randint(5, 120))
            if pick < 0.7
            else _multilingual(rng, rng.randint(5, 60))
        )
        messages.append({"role": "user", "content": user})
        if tools and rng.random() < 0.5:
            call_id = f"call_{turn}_{rng.randint(0, 10**9)}"
            fn = rng.choice(tools)["function"]["name"]
            args = json.dumps(
                {rng.choice(_WORDS): rng.choice(_WORDS) for _ in range(rng.randint(1, 5))}
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": fn, "arguments": args},
                        }
                    ],
                }
            )
            result = json.dumps({"result": _prose(rng, rng.randint(5, 80)), "ok": True})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        reply = (
            [{"type": "text", "text": _prose(rng, rng.randint(10, 200))}]
            if rng.random() < 0.3
            else _prose(rng, rng.randint(10, 200))
        )
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": _prose(rng, rng.randint(3, 40))})
    return Prompt("history", messages, tools)


_MAKERS: dict[str, Callable[[random.Random], Prompt]] = {
    "english": _english,
    "tools": _tools,
    "multilingual": _intl,
    "cjk": _cjk_prompt,
    "base64": _b64,
    "history": _history,
}
KINDS = tuple(_MAKERS)


def make_corpus(
    seed: int = 20_240_601, n: int = 60, kinds: tuple[str, ...] = KINDS
) -> list[Prompt]:
    """``n`` prompts cycling through ``kinds``, the same for the same seed."""
    rng = random.Random(seed)
    return [_MAKERS[kinds[i % len(kinds)]](rng) for i in range(n)]


def _text_of(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content if part.get("type") == "text"]


def reference_tokens(prompt: Prompt, count: Callable[[str], int]) -> int:
    """Prompt tokens as OpenAI bills a chat request: 3 per message, 1 per name, 3 to prime
    the reply, the tokens of every value sent, tool schemas as their JSON."""
    total = 3
    for message in prompt.messages:
        total += 3 + count(message["role"])
        for piece in _text_of(message.get("content")):
            total += count(piece)
        if "name" in message:
            total += 1 + count(message["name"])
        for call in message.get("tool_calls") or []:
            total += count(call["function"]["name"]) + count(call["function"]["arguments"])
    for tool in prompt.tools:
        total += count(json.dumps(tool, separators=(",", ":"), ensure_ascii=False))
    return total
