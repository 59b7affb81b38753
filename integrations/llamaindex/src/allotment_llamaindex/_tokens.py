"""Counting generated text, for settling calls whose provider reported no usage."""

from __future__ import annotations

from allotment import _estimate


def count_tokens(text: str, model: str | None) -> int:
    """Tokens in ``text``: by the model's own tokenizer when its encoding is on disk, else
    its UTF-8 bytes (no byte-level BPE token is shorter than a byte)."""
    if not text:
        return 0
    name = _estimate.encoding_name(model)
    encoding = _estimate.load_encoding(name) if name else None
    if encoding is None:
        return len(text.encode("utf-8", "surrogatepass"))
    return len(encoding.encode_ordinary(text))
