"""``DocumentStore`` on Azure Blob Storage: JSON blobs, ETag-conditional writes, blob index tags."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from azure.core import MatchConditions
from azure.storage.blob import ContainerClient, ContentSettings

from handlers.errors import NotFound
from handlers.ports import Document

from .errors import translated

_JSON = ContentSettings(content_type="application/json")
# Blob index tags: at most 10 per blob, keys 1-128 and values 0-256 characters (Azure limits).
MAX_TAGS = 10


def _encode(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _check_tags(tags: Mapping[str, str] | None) -> dict[str, str] | None:
    if tags is None:
        return None
    if len(tags) > MAX_TAGS:
        raise ValueError(f"tags: at most {MAX_TAGS} index tags per blob, got {len(tags)}")
    return {str(k): str(v) for k, v in tags.items()}


class BlobDocumentStore:
    """JSON documents in one container; names are blob names (``customers/acme.json``)."""

    def __init__(self, container: ContainerClient):
        self._container = container

    def ensure_container(self) -> None:
        with translated(f"container {self._container.container_name}"):
            if not self._container.exists():
                try:
                    self._container.create_container()
                except Exception:  # lost a creation race; exists() below decides (and re-raises otherwise)
                    if not self._container.exists():
                        raise

    def get(self, name: str) -> Document | None:
        try:
            with translated(f"document {name}"):
                downloader = self._container.download_blob(name)
                body = downloader.readall()
        except NotFound:
            return None
        return Document(name=name, data=json.loads(body), etag=downloader.properties.etag)

    def create(self, name: str, data: Mapping[str, Any], *, tags: Mapping[str, str] | None = None) -> Document:
        with translated(f"document {name}"):
            result = self._container.get_blob_client(name).upload_blob(
                _encode(data), overwrite=False, tags=_check_tags(tags), content_settings=_JSON)
        return Document(name=name, data=dict(data), etag=result["etag"])

    def replace(self, current: Document, data: Mapping[str, Any], *,
                tags: Mapping[str, str] | None = None) -> Document:
        with translated(f"document {current.name}"):
            result = self._container.get_blob_client(current.name).upload_blob(
                _encode(data), overwrite=True, tags=_check_tags(tags),
                etag=current.etag, match_condition=MatchConditions.IfNotModified,
                content_settings=_JSON)
        return Document(name=current.name, data=dict(data), etag=result["etag"])

    def find(self, tag_filter: str) -> Iterator[str]:
        with translated(f"tag query {tag_filter}"):
            for blob in self._container.find_blobs_by_tags(tag_filter):
                yield blob.name
