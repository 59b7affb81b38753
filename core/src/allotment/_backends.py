"""The ledgers allotment ships, as a default plugin: ``memory://``, ``sqlite:///path.db``
and ``redis://host:port/db``.

``memory://`` is a new, private ledger on every call; ``memory://NAME`` is the same ledger
for every caller in the process that uses that name. ``sqlite:///path.db`` opens one
``SqliteLedger`` per database file in the process, however the path is spelled.
``redis://`` and ``rediss://`` (TLS) open one ``RedisLedger`` per URL in the process; it
needs redis-py, imported only when such a URL is first used.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from ._ledger import Ledger
from ._memory import MemoryLedger
from ._sqlite import MEMORY, SqliteLedger, sqlite_path
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ._redis import RedisLedger

MEMORY_SCHEME = "memory://"
REDIS_SCHEMES = ("redis://", "rediss://")

_lock = threading.Lock()
_named: dict[str, MemoryLedger] = {}
_files: dict[str, SqliteLedger] = {}
_servers: dict[str, RedisLedger] = {}


@hookimpl
def allotment_ledger(url: str) -> Ledger | None:
    """``MemoryLedger`` for ``memory://``, ``SqliteLedger`` for ``sqlite:``, ``RedisLedger``
    for ``redis://`` and ``rediss://``, else None."""
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
    if url.startswith(REDIS_SCHEMES):
        from ._redis import RedisLedger  # redis-py is optional: import it only when used

        with _lock:  # constructing does not connect, so it is quick
            server = _servers.get(url)
            if server is None:
                server = _servers[url] = RedisLedger(url)
            return server
    return None


def _reset() -> None:
    """Forget named memory ledgers and close cached sqlite and redis ledgers (tests use
    this)."""
    with _lock:
        opened: list[SqliteLedger | RedisLedger] = [*_files.values(), *_servers.values()]
        _named.clear()
        _files.clear()
        _servers.clear()
    for ledger in opened:
        ledger.close()
