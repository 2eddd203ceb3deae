"""The pool of DPS instances and where a new customer goes.

A DPS instance holds at most 100 X.509 enrollment groups (DPS service limits), and this service
makes one group per customer, so customers spread over a pool. A new customer goes to the
instance with the fewest groups that still has room (and links every IoT hub it asks for); the
placement is recorded in the customer's record and never changes by itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pki.keys import KeyType

from .errors import CapacityExhausted, InvalidMessage

MAX_GROUPS_PER_DPS = 100


@dataclass(frozen=True)
class DpsInstance:
    name: str
    endpoint: str
    id_scope: str
    iot_hubs: tuple[str, ...]
    resource_id: str | None = None  # ARM id: where its CA certificates are managed (`pkictl root register`)


def choose_instance(pool: Sequence[DpsInstance], groups: Mapping[str, int], *, hubs: Sequence[str] | None = None,
                    exclude: frozenset[str] = frozenset(), limit: int = MAX_GROUPS_PER_DPS) -> DpsInstance:
    """The instance for a new group: fewest groups, below ``limit``, linking all ``hubs``; pool order breaks ties."""
    if not pool:
        raise CapacityExhausted("no DPS instance is configured (setting DPS_INSTANCES)")
    linking = [i for i in pool if not hubs or set(hubs) <= set(i.iot_hubs)]
    candidates = [i for i in linking if i.name not in exclude]
    if linking and not candidates:
        raise CapacityExhausted(f"every eligible DPS instance refused a new enrollment group as full "
                                f"({', '.join(sorted(exclude))}); add a DPS instance to DPS_INSTANCES")
    if not candidates:
        linked = "; ".join(f"{i.name}: {', '.join(i.iot_hubs) or 'none'}" for i in pool)
        raise InvalidMessage("iotHubs", f"no DPS instance links all of {', '.join(hubs or ())} (linked hubs: {linked})")
    with_room = [i for i in candidates if groups.get(i.name, 0) < limit]
    if not with_room:
        counts = ", ".join(f"{i.name} {groups.get(i.name, 0)}" for i in candidates)
        raise CapacityExhausted(f"every eligible DPS instance holds {limit} enrollment groups, DPS's limit ({counts}); "
                                "add a DPS instance to DPS_INSTANCES")
    return min(with_room, key=lambda i: (groups.get(i.name, 0), pool.index(i)))


@dataclass(frozen=True)
class OnboardingSettings:
    pool: tuple[DpsInstance, ...]
    intermediate_key_type: KeyType = KeyType.EC_P256
    intermediate_validity_days: int = 5 * 365
    renewal_min_interval: dt.timedelta = dt.timedelta(hours=24)  # renewals of one customer, unless forced
    max_groups_per_dps: int = MAX_GROUPS_PER_DPS  # DPS's limit; lower it to keep headroom for hand-made groups
    # The app's custom allocation webhook (with its function key): groups allocate through it, so devices can
    # renew their certificates in their registration payload (handlers/renewal.py). None: DPS allocates.
    allocation_webhook_url: str | None = field(default=None, repr=False)
