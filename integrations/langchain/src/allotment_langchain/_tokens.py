"""Counting generated text as tokens, for streams and replies that report no usage.

With the model's tokenizer (OpenAI models, when tiktoken has it offline) both counts are
exact. Without it there are two different questions, so two answers:

- cutting a stream must not run ahead of the real count, or a legitimate answer is cut
  short: the bytes streamed so far are taken at eight per token (``approximate``). On
  prose, code, JSON and CJK text, tokenizers with 100k-200k vocabularies stay below seven
  bytes per token. The price is lateness: such a stream is cut at about 1.6 times its
  bound for English, later for CJK. A model that honours ``max_tokens`` never gets there.
- ``charged_tokens`` is what an estimate charges, so it must not fall short: one token
  per byte, the bound every byte-level BPE tokenizer respects.
"""

from __future__ import annotations

from collections.abc import Callable

# The kernel's estimator helpers are private; everything that touches them is in
# ``_counter`` so that a change there is a change here only.
from allotment import _estimate

BYTES_PER_TOKEN = 8

_counters: dict[str | None, tuple[bool, Callable[[str], int]]] = {}


def _counter(model: str | None) -> tuple[bool, Callable[[str], int]]:
    """(exact, count) for ``model``: its tokenizer's count, else UTF-8 bytes."""
    found = _counters.get(model)
    if found is None:
        name = _estimate.encoding_name(model)
        encoding = _estimate.load_encoding(name) if name else None
        if encoding is None:
            found = (False, _estimate._utf8_len)
        else:
            encode = encoding.encode_ordinary
            found = (True, lambda text: len(encode(text)))
        _counters[model] = found
    return found


def counter(model: str | None) -> tuple[bool, Callable[[str], int]]:
    """``(exact, count)``: ``model``'s tokenizer when tiktoken has it offline, else a
    count of UTF-8 bytes (an upper bound of tokens)."""
    return _counter(model)


def approximate(byte_count: int) -> int:
    """Tokens that ``byte_count`` bytes of text make at least, as streams are cut by."""
    return byte_count // BYTES_PER_TOKEN


def charged_tokens(text: str, model: str | None) -> int:
    """Tokens in ``text``, exact or else never less than the real count (for charging)."""
    if not text:
        return 0
    return _counter(model)[1](text)


def exact_for(model: str | None) -> bool:
    """Whether ``model``'s own tokenizer is available offline."""
    return _counter(model)[0]
