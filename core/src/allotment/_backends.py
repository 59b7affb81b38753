"""The ledgers allotment ships, as a default plugin: ``memory://`` and ``sqlite:///path.db``.

``memory://`` is a new, private ledger on every call; ``memory://NAME`` is the same ledger
for every caller in the process that uses that name. ``sqlite:///path.db`` opens one
``SqliteLedger`` per database file in the process, however the path is spelled.
"""

from __future__ import annotations

import os
import threading

from ._ledger import Ledger
from ._memory import MemoryLedger
from ._sqlite import MEMORY, SqliteLedger, sqlite_path
from .hookspecs import hookimpl

MEMORY_SCHEME = "memory://"

_lock = threading.Lock()
_named: dict[str, MemoryLedger] = {}
_files: dict[str, SqliteLedger] = {}


@hookimpl
def allotment_ledger(url: str) -> Ledger | None:
    """``MemoryLedger`` for ``memory://``, ``SqliteLedger`` for ``sqlite:``, else None."""
    if url.startswith(MEMORY_SCHEME):
        name = url[len(MEMORY_SCHEME) :]
        if not name:
            return MemoryLedger(url)
        with _lock:
            named = _named.get(name)
            if named is None:
                named = _named[name] = MemoryLedger(url)
            return named
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
        if path == MEMORY:
            return SqliteLedger(url)
        key = os.path.abspath(path)
        with _lock:
            cached = _files.get(key)
        if cached is not None:
            return cached
        opened = SqliteLedger(url)  # outside the lock: opening may wait for the file
        with _lock:
            cached = _files.setdefault(key, opened)
        if cached is not opened:
            opened.close()
        return cached
    return None


def _reset() -> None:
    """Forget named memory ledgers and close cached sqlite ledgers (tests use this)."""
    with _lock:
        files = list(_files.values())
        _named.clear()
        _files.clear()
    for ledger in files:
        ledger.close()
