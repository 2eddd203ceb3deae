"""Storage requests counted at the ports, for one run of a use case: what a chunk costs is recorded with it (the
batch record's ``storage``), so ``bench batch`` and operators read writes and reads per device from the state."""

from __future__ import annotations

import threading
from typing import Any

_READS = frozenset({"get", "find", "properties", "stream", "read_range"})
_WRITES = frozenset({"create", "replace", "put", "delete", "assemble"})


class Tally:
    """Counts the calls made through the ports it wraps (thread-safe: a chunk issues on a thread pool)."""

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self._lock = threading.Lock()

    def wrap(self, port: Any) -> Any:
        """``port`` (a DocumentStore, InputFiles or OutputFiles) with every read and write counted."""
        return _Counted(port, self)

    def count(self, name: str) -> None:
        with self._lock:
            if name in _READS:
                self.reads += 1
            elif name in _WRITES:
                self.writes += 1

    def as_dict(self, *, extra_writes: int = 0) -> dict[str, int]:
        with self._lock:
            return {"reads": self.reads, "writes": self.writes + extra_writes}


class _Counted:
    def __init__(self, port: Any, tally: Tally):
        self._port, self._tally = port, tally

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._port, name)
        if name not in _READS and name not in _WRITES:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._tally.count(name)
            return attribute(*args, **kwargs)
        return counted
