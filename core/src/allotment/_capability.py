"""Capability tokens: the one way to move a budget node to another process or machine.

A token names one node of one ledger and the moment it expires, signed with HMAC-SHA256
under a key both sides hold: ``allot1.<payload>.<signature>`` (base64url JSON, then the
MAC of everything before it). Whoever redeems it gets the node's id and can reserve on it
through its own connection to the same ledger. A token is refused, with a
``CapabilityError`` saying why, when it is malformed, tampered with or signed with another
key, expired, meant for another ledger, already redeemed, or names a closed budget.

Redeeming is once only on a ledger that can record a claim atomically (``RedisLedger``
does, server-side, so across machines); on other ledgers it is once per process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from ._errors import AllotmentError, ConfigurationError
from ._ledger import Ledger

VERSION = "allot1"
MIN_KEY_BYTES = 16

Reason = Literal["malformed", "signature", "expired", "ledger", "unknown", "closed", "redeemed"]


class CapabilityError(AllotmentError, PermissionError):
    """A capability token was refused; ``reason`` says why. Nothing was changed."""

    def __init__(self, message: str, *, reason: Reason) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class Capability:
    """What a verified token grants."""

    ledger: str
    """The ledger's identity (its URL without credentials)."""
    node: str
    """The budget node's id."""
    issued_at: float
    expires_at: float
    nonce: str
    """Unique per token; a redeemed nonce is claimed so the token works once."""


def ledger_identity(ledger: Ledger) -> str:
    """How a token names a ledger: its ``identity`` if it has one, else its URL without
    user name and password (a token is signed, not encrypted)."""
    identity = getattr(ledger, "identity", None)
    if isinstance(identity, str):
        return identity
    parts = urlsplit(ledger.url)
    if parts.username is None and parts.password is None:
        return ledger.url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc))


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"a capability key must be at least {MIN_KEY_BYTES} random bytes "
            f"(e.g. os.urandom(32)), shared by the exporting and redeeming processes"
        )
    return bytes(key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def export_token(
    ledger: Ledger, node_id: str, key: bytes, ttl_seconds: float, *, now: float | None = None
) -> str:
    """A token that lets another process use budget ``node_id`` for ``ttl_seconds``.

    The node must exist and be open. ``now`` defaults to the wall clock."""
    key = _check_key(key)
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, (int, float))
        or not (math.isfinite(ttl_seconds) and ttl_seconds > 0)
    ):
        raise ConfigurationError(f"ttl_seconds must be a positive number, not {ttl_seconds!r}")
    state = _open_state(ledger, node_id)
    issued = time.time() if now is None else now
    payload = {
        "v": 1,
        "ledger": ledger_identity(ledger),
        "node": state.id,
        "iat": issued,
        "exp": issued + float(ttl_seconds),
        "nonce": os.urandom(16).hex(),
    }
    body = _b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_b64(_mac(key, signed))}"


def read_token(token: str, key: bytes, *, now: float | None = None) -> Capability:
    """Verify a token's signature and expiry (not the ledger) and say what it grants."""
    key = _check_key(key)
    if not isinstance(token, str) or token.count(".") != 2:
        raise CapabilityError("not a capability token", reason="malformed")
    version, body, signature = token.split(".")
    if version != VERSION:
        raise CapabilityError(f"unknown token version {version[:20]!r}", reason="malformed")
    try:
        given = _unb64(signature)
    except (binascii.Error, ValueError):
        raise CapabilityError("the token's signature is not base64", reason="malformed") from None
    if not hmac.compare_digest(given, _mac(key, f"{version}.{body}")):
        raise CapabilityError(
            "the token's signature does not match: it was altered, or signed with another key",
            reason="signature",
        )
    try:
        data: Any = json.loads(_unb64(body))
        cap = Capability(
            ledger=str(data["ledger"]),
            node=str(data["node"]),
            issued_at=float(data["iat"]),
            expires_at=float(data["exp"]),
            nonce=str(data["nonce"]),
        )
    except (ValueError, KeyError, TypeError) as e:  # signed but unreadable: a bug upstream
        raise CapabilityError(f"the token's payload is unreadable ({e})", reason="malformed") from e
    at = time.time() if now is None else now
    if at >= cap.expires_at:
        raise CapabilityError(
            f"the token for budget {cap.node!r} expired {at - cap.expires_at:.3g}s ago; "
            f"export a new one",
            reason="expired",
        )
    return cap


def redeem_token(
    token: str, key: bytes, ledger: Ledger, *, now: float | None = None, once: bool = True
) -> str:
    """Verify ``token`` for ``ledger`` and return the id of the budget node it names.

    With ``once`` (the default) the token is then used up: redeeming it again is refused.
    """
    cap = read_token(token, key, now=now)
    if cap.ledger != ledger_identity(ledger):
        raise CapabilityError(
            f"the token is for ledger {cap.ledger!r}, not {ledger_identity(ledger)!r}",
            reason="ledger",
        )
    _open_state(ledger, cap.node)
    if once:
        at = time.time() if now is None else now
        if not _claim(ledger, cap.nonce, cap.expires_at - at):
            raise CapabilityError(
                f"the token for budget {cap.node!r} was already redeemed; it works once",
                reason="redeemed",
            )
    return cap.node


def _open_state(ledger: Ledger, node_id: str) -> Any:
    try:
        state = ledger.state(node_id)
    except KeyError:
        raise CapabilityError(
            f"no budget {node_id!r} in ledger {ledger_identity(ledger)!r}", reason="unknown"
        ) from None
    if state.closed:
        raise CapabilityError(
            f"budget {node_id!r} is closed; a token cannot reopen it", reason="closed"
        )
    return state


_claims_lock = threading.Lock()
_claims: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()
"""Nonces redeemed in this process, per ledger without a claim of its own."""


def _claim(ledger: Ledger, nonce: str, ttl: float) -> bool:
    claim = getattr(ledger, "claim", None)
    if callable(claim):
        return bool(claim(f"token:{nonce}", ttl))
    with _claims_lock:
        seen = _claims.setdefault(ledger, {})
        if nonce in seen:
            return False
        seen[nonce] = ttl
        return True
