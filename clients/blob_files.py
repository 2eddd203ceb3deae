"""Files in blob storage: batch inputs (streamed, read by byte range), per-device outputs, reports
assembled from parts without holding them in memory (staged blocks, committed in order)."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings

from handlers.errors import Conflict, NotFound

from .errors import translated


class BlobFiles:
    """``container/name`` paths over one storage account."""

    def __init__(self, service: BlobServiceClient):
        self._service = service
        self._known: set[str] = set()

    def _blob(self, path: str):
        container, _, name = path.partition("/")
        if not name:
            raise ValueError(f"{path!r}: expected container/name")
        return self._service.get_blob_client(container, name)

    def _ensure(self, path: str) -> None:
        container = path.partition("/")[0]
        if container in self._known:
            return
        try:
            self._service.get_container_client(container).create_container()
        except ResourceExistsError:
            pass
        self._known.add(container)

    def properties(self, path: str) -> tuple[int, str, dict[str, str]]:
        """Size, upload (``upload_of``) and metadata (keys lower-cased)."""
        with translated(f"blob {path}"):
            props = self._blob(path).get_blob_properties()
        return props.size, upload_of(props), {k.lower(): v for k, v in (props.metadata or {}).items()}

    def stream(self, path: str, upload: str | None = None) -> Iterator[bytes]:
        """The blob in chunks of a few MiB (never whole in memory); ``upload`` pins the upload (``Conflict``
        if the blob is another one now)."""
        with translated(f"blob {path}"):
            downloader = self._blob(path).download_blob(max_concurrency=1)
            _check_upload(path, downloader.properties, upload)
            yield from downloader.chunks()

    def read_range(self, path: str, start: int, end: int, upload: str | None = None) -> bytes:
        """Bytes ``start``..``end`` of the upload ``upload`` (``Conflict`` if the blob was overwritten)."""
        with translated(f"blob {path} bytes {start}-{end}"):
            downloader = self._blob(path).download_blob(offset=start, length=end - start)
            _check_upload(path, downloader.properties, upload)
            return downloader.readall()

    def create(self, path: str, stream: BinaryIO, metadata: dict[str, str]) -> None:
        """Upload ``stream`` (streamed, never whole in memory) as a new blob; ``AlreadyExists`` if ``path`` exists."""
        self._ensure(path)
        with translated(f"blob {path}"):
            self._blob(path).upload_blob(stream, overwrite=False, metadata=metadata)

    def created_event(self, path: str) -> dict:
        """The ``Microsoft.Storage.BlobCreated`` event Event Grid raises for the blob at ``path``, as it is now."""
        from .event_grid import blob_created_event

        blob = self._blob(path)
        with translated(f"blob {path}"):
            props = blob.get_blob_properties()
        return blob_created_event(container=blob.container_name, blob=blob.blob_name, url=blob.url, etag=props.etag,
                                  length=props.size, account=blob.account_name,
                                  content_type=props.content_settings.content_type or "")

    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._ensure(path)
        with translated(f"blob {path}"):
            self._blob(path).upload_blob(data, overwrite=True, content_settings=ContentSettings(content_type))

    def get(self, path: str) -> bytes:
        with translated(f"blob {path}"):
            return self._blob(path).download_blob().readall()

    def exists(self, path: str) -> bool:
        try:
            self.properties(path)
        except NotFound:
            return False
        return True

    def delete(self, path: str) -> None:
        try:
            with translated(f"blob {path}"):
                self._blob(path).delete_blob()
        except NotFound:
            pass

    def assemble(self, path: str, parts: Iterable[bytes], content_type: str) -> None:
        """Write ``path`` as the concatenation of ``parts``, one staged block each (at most 50,000)."""
        self._ensure(path)
        blob = self._blob(path)
        blocks = []
        with translated(f"blob {path}"):
            for index, part in enumerate(parts):
                data = part
                if not data:
                    continue
                block_id = base64.b64encode(f"{index:08d}".encode()).decode()
                blob.stage_block(block_id, data)
                blocks.append(BlobBlock(block_id=block_id))
            blob.commit_block_list(blocks, content_settings=ContentSettings(content_type))


def upload_of(properties) -> str:
    """Which upload a blob is: its creation time. An overwrite deletes and re-creates the blob (a new creation
    time, as Event Grid raises a new BlobCreated); metadata and tag changes keep it, though they change the ETag
    (learn.microsoft.com/rest/api/storageservices/get-blob-properties: x-ms-creation-time). An overwrite within
    the same second as the upload it replaces is not told apart."""
    return properties.creation_time.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_upload(path: str, properties, upload: str | None) -> None:
    if upload is not None and upload_of(properties) != upload:
        raise Conflict(f"blob {path}: overwritten since (uploaded {upload_of(properties)}, not {upload})")
