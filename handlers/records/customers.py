"""The customer record, ``customers/{id}.json``: its id rule, statuses, JSON form, document name and index tags."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from ..errors import InvalidMessage
from ..ports import DocumentStore

# Lowercase letters, digits and '-', not at either end: it is the group id, the Key Vault key name
# suffix and the intermediate's CN (X.520 ub-common-name 64).
CUSTOMER_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_customer_id(value: str, *, where: str = "") -> str:
    """The one customer-id rule and its one wording (``InvalidMessage`` on ``customerId``); ``where`` says where the
    value was found ("in the path")."""
    if CUSTOMER_ID.fullmatch(value):
        return value
    hint = "; it must be lowercase" if CUSTOMER_ID.fullmatch(value.lower()) else ""
    raise InvalidMessage("customerId", f"{value!r}{where} is not a customer id (1-63 of a-z, 0-9 and '-', starting "
                         f"and ending with a letter or digit){hint}")


class CustomerStatus(StrEnum):
    """Onboarding's steps in order (each one resumable), then what commands and capacity make of a customer."""

    PENDING = "pending"
    KEY_CREATED = "key_created"
    CERTIFICATE_ISSUED = "certificate_issued"
    GROUP_CREATED = "group_created"
    ACTIVE = "active"
    DISABLED = "disabled"  # by disable-customer; onboarded all the same
    REJECTED = "rejected"  # no DPS instance had room; kept (key, intermediate) for a retry


ONBOARDING_STEPS = (CustomerStatus.PENDING, CustomerStatus.KEY_CREATED, CustomerStatus.CERTIFICATE_ISSUED,
                    CustomerStatus.GROUP_CREATED, CustomerStatus.ACTIVE)
ONBOARDED = (CustomerStatus.ACTIVE, CustomerStatus.DISABLED)


@dataclass(frozen=True)
class CustomerRecord:
    """``customers/{id}.json``: a customer's onboarding state, its DPS placement, its key and intermediate (the current
    one, and every one it replaced, newest first), its renewals, and what commands recorded (``other``: createdAt,
    updatedAt, lastCommand, devicesDisabled, reason, renewal...), kept as written. ``intermediate`` and the entries
    of ``previous_intermediates`` are ``pki.export.summary`` plus ``certificatePem`` (and ``issuerCertificatePem``,
    ``key`` once replaced)."""

    customer_id: str
    status: CustomerStatus
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dps: Mapping[str, str] = field(default_factory=dict)  # name, idScope; empty once rejected
    key: Mapping[str, str] | None = None  # Key Vault key name and version
    intermediate: Mapping[str, Any] | None = None
    previous_intermediates: tuple[Mapping[str, Any], ...] = ()
    renewals: tuple[Mapping[str, Any], ...] = ()
    lease: Mapping[str, str] | None = None
    other: Mapping[str, Any] = field(default_factory=dict)

    _FIELDS: ClassVar[dict[str, str]] = {
        "customerId": "customer_id", "status": "status", "parameters": "parameters", "dps": "dps", "key": "key",
        "intermediate": "intermediate", "previousIntermediates": "previous_intermediates", "renewals": "renewals",
        "lease": "lease"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CustomerRecord:
        known = {attr: data[key] for key, attr in cls._FIELDS.items() if key in data}
        return cls(**{**known, "status": CustomerStatus(data["status"]),
                      "previous_intermediates": tuple(data.get("previousIntermediates") or ()),
                      "renewals": tuple(data.get("renewals") or ())},
                   other={k: v for k, v in data.items() if k not in cls._FIELDS})

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"customerId": self.customer_id, "status": self.status.value,
                                "parameters": dict(self.parameters), "dps": dict(self.dps)}
        for key, value in (("key", self.key), ("intermediate", self.intermediate)):
            if value is not None:
                data[key] = value
        data["lease"] = self.lease  # null once released
        if self.previous_intermediates:
            data["previousIntermediates"] = list(self.previous_intermediates)
        if self.renewals:
            data["renewals"] = list(self.renewals)
        return {**data, **self.other}

    @property
    def document(self) -> str:
        return customer_document(self.customer_id)

    @property
    def tags(self) -> dict[str, str]:
        return {"kind": "customer", "customer": self.customer_id, "status": self.status.value,
                "dps": self.dps.get("name", "")}

    @property
    def intermediates(self) -> list[Mapping[str, Any]]:
        """Every intermediate the customer has had, the current one first."""
        return [*([self.intermediate] if self.intermediate else []), *self.previous_intermediates]

    def chain_above(self, serial: str | None, root_pem: str | None) -> list[str] | None:
        """The PEMs above a device certificate issued by intermediate ``serial``: that intermediate, then its issuer
        (as recorded with it, else ``root_pem``); ``None`` if the customer never had it."""
        for intermediate in self.intermediates:
            if serial and intermediate.get("serial") == serial:
                issuer = intermediate.get("issuerCertificatePem") or root_pem
                return [intermediate["certificatePem"], *([issuer] if issuer else [])]
        return None

    @property
    def onboarded(self) -> bool:
        return self.status in ONBOARDED

    @property
    def key_name(self) -> str:
        return key_name(self.customer_id)


def customer_document(customer_id: str) -> str:
    return f"customers/{customer_id}.json"


def key_name(customer_id: str) -> str:
    return f"customer-{customer_id}"


def customer_tags(data: Mapping[str, Any]) -> dict[str, str]:
    """The index tags of a customer record's JSON (``CustomerRecord.tags``)."""
    return CustomerRecord.from_json(data).tags


def list_customers(store: DocumentStore) -> Sequence[str]:
    return sorted(name.removeprefix("customers/").removesuffix(".json")
                  for name in store.find("\"kind\" = 'customer'"))
