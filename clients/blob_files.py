"""Files in blob storage: batch inputs (streamed, read by byte range), per-device outputs, reports
assembled from parts without holding them in memory (staged blocks, committed in order)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings

from handlers.errors import NotFound

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
        """Size, ETag and metadata (keys lower-cased)."""
        with translated(f"blob {path}"):
            props = self._blob(path).get_blob_properties()
        return props.size, props.etag, {k.lower(): v for k, v in (props.metadata or {}).items()}

    def stream(self, path: str, etag: str | None = None) -> Iterator[bytes]:
        """The blob in chunks of a few MiB (never whole in memory); ``etag`` pins the version."""
        from azure.core import MatchConditions

        with translated(f"blob {path}"):
            kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
            downloader = self._blob(path).download_blob(max_concurrency=1, **kwargs)
            yield from downloader.chunks()

    def read_range(self, path: str, start: int, end: int, etag: str | None = None) -> bytes:
        """Bytes ``start``..``end`` of the version ``etag`` (``Conflict`` if the blob was overwritten)."""
        from azure.core import MatchConditions

        kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        with translated(f"blob {path} bytes {start}-{end}"):
            return self._blob(path).download_blob(offset=start, length=end - start, **kwargs).readall()

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
