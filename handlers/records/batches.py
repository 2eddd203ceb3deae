"""A device batch, ``batches/{customerId}/{batchName}.json``, its chunks and chunk messages: the paths a batch
may name, where its records, outputs and reports go, and its settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pki.keys import KeyType

from .. import batch_format
from ..errors import InvalidMessage
from ..messages import Fields, decode_json_message
from .customers import check_customer_id

MAX_BATCH_NAME = 200


@dataclass(frozen=True)
class BatchSettings:
    input_container: str = "device-batches"
    results_container: str = "device-batches-results"
    output_container: str = "device-certificates"
    chunk_rows: int = 500
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    default_key_type: KeyType = KeyType.EC_P256
    default_validity_days: int = 365
    inflight: int = 16
    chunk_lease_s: float = 120.0  # renewed while a chunk runs; a crashed worker's chunk is free this long after


@dataclass(frozen=True)
class BatchRef:
    customer_id: str
    batch_name: str

    @classmethod
    def from_path(cls, path: str, settings: BatchSettings) -> BatchRef:
        """The batch a blob path names, checked before any storage call: the path decides where the batch's records,
        outputs and reports go, so it must name exactly one customer's folder."""
        container, _, rest = path.partition("/")
        customer_id, _, batch_name = rest.partition("/")
        if container != settings.input_container or not customer_id or not batch_name:
            raise InvalidMessage("path", f"{path!r} must be {settings.input_container}/{{customerId}}/{{batchName}}")
        return cls.checked(customer_id, batch_name)

    @classmethod
    def checked(cls, customer_id: str, batch_name: str) -> BatchRef:
        """``InvalidMessage`` unless the customer id is one and the name is a plain relative name: no empty, ``.`` or
        ``..`` segment (SDKs and proxies normalise those, and the result could land in another customer's folder),
        no ``\\ ? #`` or control characters."""
        check_customer_id(customer_id, where=" in the path")
        if len(batch_name) > MAX_BATCH_NAME or any(c in batch_name for c in "\\?#") or not batch_name.isprintable():
            raise InvalidMessage("batchName", f"must be at most {MAX_BATCH_NAME} printable characters, without \\ ? #")
        if any(segment in ("", ".", "..") for segment in batch_name.split("/")):
            raise InvalidMessage("batchName", f"{batch_name!r} has an empty, '.' or '..' path segment")
        batch_format.batch_format(batch_name)
        return cls(customer_id, batch_name)

    @property
    def document(self) -> str:
        return f"batches/{self.customer_id}/{self.batch_name}.json"

    def input_path(self, settings: BatchSettings) -> str:
        return f"{settings.input_container}/{self.customer_id}/{self.batch_name}"

    def report_path(self, settings: BatchSettings, suffix: str) -> str:
        return f"{settings.results_container}/{self.customer_id}/{self.batch_name}.{suffix}"

    def output_path(self, settings: BatchSettings, device_id: str, suffix: str) -> str:
        """A device's one output blob: ``{deviceId}.pfx`` or ``{deviceId}.pem`` under the batch's own prefix."""
        return f"{settings.output_container}/{self.customer_id}/{self.batch_name}/{device_id}.{suffix}"

    def chunk_document(self, n: int) -> str:
        return f"batches/{self.customer_id}/{self.batch_name}/chunks/{n:06d}.json"

    @property
    def secret_name(self) -> str:
        digest = hashlib.sha256(f"{self.customer_id}/{self.batch_name}".encode()).hexdigest()[:16]
        return f"batch-{self.customer_id}-{digest}"[:127]


@dataclass(frozen=True)
class ChunkMessage:
    customer_id: str
    batch_name: str
    chunk: int

    @classmethod
    def parse(cls, raw: bytes | str) -> ChunkMessage:
        """A ``batch-chunks`` message (the intake sends them; a forged one names no other customer's path)."""
        fields = Fields(decode_json_message(raw))
        customer_id = fields.text("customerId", required=True, max_length=63)
        batch_name = fields.text("batchName", required=True, max_length=200)
        chunk = fields.integer("chunk", required=True, minimum=0)
        fields.reject_unknown()
        BatchRef.checked(customer_id, batch_name)  # a forged message names no path outside one customer's folder
        return cls(customer_id, batch_name, chunk)
