"""Small in-memory fakes of the ports, passed in where tests need no real storage."""

from __future__ import annotations

import copy
import itertools
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from handlers.errors import AlreadyExists, Conflict
from handlers.ports import Document

_TERM = re.compile(r"""\s*"([^"]+)"\s*(=|<|>|<=|>=)\s*'([^']*)'\s*""")


class MemoryDocumentStore:
    """DocumentStore with the same conditional-write semantics as blob storage."""

    def __init__(self) -> None:
        self._docs: dict[str, tuple[dict, str, dict]] = {}
        self._etags = itertools.count(1)
        self._lock = threading.Lock()
        self.writes = 0

    def get(self, name: str) -> Document | None:
        with self._lock:
            if name not in self._docs:
                return None
            data, etag, _ = self._docs[name]
            return Document(name, copy.deepcopy(data), etag)

    def create(self, name: str, data: Mapping[str, Any], *, tags: Mapping[str, str] | None = None) -> Document:
        with self._lock:
            if name in self._docs:
                raise AlreadyExists(f"document {name}: already exists")
            etag = f'"{next(self._etags)}"'
            self._docs[name] = (copy.deepcopy(dict(data)), etag, dict(tags or {}))
            self.writes += 1
            return Document(name, copy.deepcopy(dict(data)), etag)

    def replace(self, current: Document, data: Mapping[str, Any], *,
                tags: Mapping[str, str] | None = None) -> Document:
        with self._lock:
            if name_etag(self._docs, current.name) != current.etag:
                raise Conflict(f"document {current.name}: changed by someone else (ETag mismatch)")
            etag = f'"{next(self._etags)}"'
            self._docs[current.name] = (copy.deepcopy(dict(data)), etag, dict(tags or {}))
            self.writes += 1
            return Document(current.name, copy.deepcopy(dict(data)), etag)

    def find(self, tag_filter: str) -> Iterator[str]:
        terms = [_TERM.fullmatch(t) for t in re.split(r"\s+AND\s+", tag_filter)]
        if not all(terms):
            raise ValueError(f"unsupported tag filter {tag_filter!r}")
        ops = {"=": str.__eq__, "<": str.__lt__, ">": str.__gt__, "<=": str.__le__, ">=": str.__ge__}
        with self._lock:
            items = list(self._docs.items())
        for name, (_, _, tags) in sorted(items):
            if all(t[1] in tags and ops[t[2]](tags[t[1]], t[3]) for t in terms):
                yield name


def name_etag(docs: dict, name: str) -> str | None:
    return docs[name][1] if name in docs else None
