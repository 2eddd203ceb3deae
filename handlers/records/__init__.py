"""The state records, one home each (a module per record): their types, document names, index tags, statuses and
identity rules.

- customer ``customers/{id}.json`` (``customers.CustomerRecord``, ``CustomerStatus``): statuses
  ``pending -> key_created -> certificate_issued -> group_created -> active`` (``onboarding``), ``disabled`` by a
  command, ``rejected`` when no DPS instance had room; tags ``kind=customer``, ``customer``, ``status``, ``dps``;
- device ``devices/{deviceId}.json`` (``devices.DeviceRecord``, ``DeviceStatus``), one per id across customers:
  ``issued``, ``disabled``, ``expired``; tags ``kind=device``, ``customer``, ``status``, ``notAfter``, ``issuer``;
- batch ``batches/{customerId}/{batchName}.json``, its chunks and chunk messages (``batches.BatchRef``,
  ``ChunkMessage``).
"""

from .batches import MAX_BATCH_NAME, BatchRef, BatchSettings, ChunkMessage
from .customers import (
    CUSTOMER_ID,
    ONBOARDED,
    ONBOARDING_STEPS,
    CustomerRecord,
    CustomerStatus,
    check_customer_id,
    customer_document,
    customer_tags,
    key_name,
    list_customers,
)
from .devices import DeviceRecord, DeviceStatus, IssuedBy, KeySource, device_document, device_tags, read_device

__all__ = [
    "CUSTOMER_ID", "MAX_BATCH_NAME", "ONBOARDED", "ONBOARDING_STEPS", "BatchRef", "BatchSettings", "ChunkMessage",
    "CustomerRecord", "CustomerStatus", "DeviceRecord", "DeviceStatus", "IssuedBy", "KeySource", "check_customer_id",
    "customer_document", "customer_tags", "device_document", "device_tags", "key_name", "list_customers", "read_device",
]
