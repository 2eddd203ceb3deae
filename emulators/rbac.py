"""Azure RBAC as the emulators need it: built-in and custom role definitions (their data actions) and role
assignments.

Role definitions are the built-in ones, data action for data action, from
learn.microsoft.com/azure/role-based-access-control/built-in-roles (MicrosoftDocs/azure-docs
``articles/role-based-access-control/built-in-roles/{security,internet-of-things,storage}.md``); none of
them has ``notDataActions``. A data action matches a role's pattern the way Azure matches them: ``*`` stands
for any characters, and the comparison ignores case.

Assignments are per resource (one vault, one DPS instance, one hub): each emulator holds its own, and the
local stack assigns exactly what ``docs/deploy.md`` assigns (``emulators/stack.py``, checked by a test).
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable
from dataclasses import dataclass


def _matches(action: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(action.lower(), pattern.lower()) for pattern in patterns)


@dataclass(frozen=True)
class RoleDefinition:
    """``data_actions`` authorize data-plane operations; ``actions`` / ``not_actions`` management (ARM) ones."""

    name: str
    data_actions: tuple[str, ...]
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()

    def allows(self, action: str, *, management: bool = False) -> bool:
        if management:
            return _matches(action, self.actions) and not _matches(action, self.not_actions)
        return _matches(action, self.data_actions)


_KV = "Microsoft.KeyVault/vaults"
_DPS = "Microsoft.Devices/provisioningServices"
_HUB = "Microsoft.Devices/IotHubs"
_BLOBS = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
_QUEUES = "Microsoft.Storage/storageAccounts/queueServices/queues"

BUILT_IN_ROLES: dict[str, RoleDefinition] = {role.name: role for role in (
    # general.md: the management-plane roles (uploading and verifying a DPS CA certificate is an ARM operation)
    RoleDefinition("Contributor", (), actions=("*",), not_actions=(
        "Microsoft.Authorization/*/Delete", "Microsoft.Authorization/*/Write",
        "Microsoft.Authorization/elevateAccess/Action",
        "Microsoft.Blueprint/blueprintAssignments/write", "Microsoft.Blueprint/blueprintAssignments/delete",
        "Microsoft.Compute/galleries/share/action", "Microsoft.Purview/consents/write",
        "Microsoft.Purview/consents/delete", "Microsoft.Resources/deploymentStacks/manageDenySetting/action",
        "Microsoft.Subscription/cancel/action", "Microsoft.Subscription/enable/action")),
    RoleDefinition("Reader", (), actions=("*/read",)),
    # security.md
    RoleDefinition("Key Vault Administrator", (f"{_KV}/*",)),
    RoleDefinition("Key Vault Crypto Officer", (f"{_KV}/keys/*", f"{_KV}/keyrotationpolicies/*")),
    RoleDefinition("Key Vault Crypto User", tuple(f"{_KV}/keys/{a}" for a in (
        "read", "update/action", "backup/action", "encrypt/action", "decrypt/action", "wrap/action",
        "unwrap/action", "sign/action", "verify/action"))),
    RoleDefinition("Key Vault Secrets Officer", (f"{_KV}/secrets/*",)),
    RoleDefinition("Key Vault Secrets User", (f"{_KV}/secrets/getSecret/action", f"{_KV}/secrets/readMetadata/action")),
    RoleDefinition("Key Vault Reader", (f"{_KV}/*/read", f"{_KV}/secrets/readMetadata/action")),
    # internet-of-things.md
    RoleDefinition("Device Provisioning Service Data Contributor", (f"{_DPS}/*",)),
    RoleDefinition("Device Provisioning Service Data Reader", (f"{_DPS}/*/read",)),
    RoleDefinition("IoT Hub Data Contributor", (f"{_HUB}/*",)),
    RoleDefinition("IoT Hub Data Reader", (f"{_HUB}/*/read", f"{_HUB}/fileUpload/notifications/action")),
    RoleDefinition("IoT Hub Registry Contributor", (f"{_HUB}/devices/*",)),
    RoleDefinition("IoT Hub Twin Contributor", (f"{_HUB}/twins/*",)),
    # storage.md (not enforced: Azurite has no RBAC; listed so the documented assignments are checked by name).
    # Storage Account Contributor grants control-plane actions only (Microsoft.Storage/storageAccounts/*), no data
    # actions; the blob trigger needs it on AzureWebJobsStorage (azure-docs includes/functions-azurewebjobsstorage-
    # permissions.md).
    RoleDefinition("Storage Account Contributor", ()),
    RoleDefinition("Storage Table Data Contributor", tuple(
        f"Microsoft.Storage/storageAccounts/tableServices/tables/entities/{a}" for a in (
            "read", "write", "delete", "add/action", "update/action"))),
    RoleDefinition("Storage Blob Data Owner", (f"{_BLOBS}/*",)),
    RoleDefinition("Storage Blob Data Contributor", tuple(f"{_BLOBS}/{a}" for a in (
        "delete", "read", "write", "move/action", "add/action"))),
    RoleDefinition("Storage Blob Data Reader", (f"{_BLOBS}/read",)),
    RoleDefinition("Storage Queue Data Contributor", tuple(f"{_QUEUES}/messages/{a}" for a in (
        "delete", "read", "write", "process/action"))),
    RoleDefinition("Storage Queue Data Message Sender", (f"{_QUEUES}/messages/add/action",)),
)}


# Custom roles (learn.microsoft.com/azure/key-vault/general/rbac-guide#creating-custom-roles): not built in. Each is
# defined in docs/deploy.md as the JSON `az role definition create` takes, and tests/test_deploy_roles.py checks that
# JSON against these, data action for data action. The data action names are Key Vault's (built-in-roles/
# security.md, "Key Vault Crypto User" and "Key Vault Secrets Officer"; permissions/security.md, Microsoft.KeyVault;
# key-vault/general/rbac-guide). Key Vault Crypto User would also let the app back up, encrypt, decrypt, wrap and
# update the root key; Key Vault Secrets Officer would let it delete, back up and purge secrets.
CUSTOM_ROLES: dict[str, RoleDefinition] = {role.name: role for role in (
    # The app on the root vault: read the root key's public half and sign with it (KeyVaultKeyStore.get_key: GET
    # /keys/{name}/{version}; .signer: CryptographyClient.sign, which first reads the key). Nothing else.
    RoleDefinition("PKI Root Key Signer", (f"{_KV}/keys/read", f"{_KV}/keys/sign/action")),
    # The app on the intermediates' vault: each batch's PFX password (KeyVaultSecrets.set_secret: PUT
    # /secrets/{name}; .get_secret: GET /secrets/{name}/{version}). No delete, purge, backup or list.
    RoleDefinition("PKI Batch Secrets Writer", (f"{_KV}/secrets/setSecret/action", f"{_KV}/secrets/getSecret/action")),
)}
ROLES: dict[str, RoleDefinition] = {**BUILT_IN_ROLES, **CUSTOM_ROLES}


class RoleAssignments:
    """The role assignments on one resource, by principal object id. Thread-safe."""

    def __init__(self) -> None:
        self._roles: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def assign(self, principal_id: str, roles: Iterable[str]) -> None:
        unknown = [role for role in roles if role not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s): {', '.join(unknown)}; known: {', '.join(sorted(ROLES))}")
        with self._lock:
            self._roles.setdefault(principal_id, set()).update(roles)

    def roles_of(self, principal_id: str) -> set[str]:
        with self._lock:
            return set(self._roles.get(principal_id, ()))

    def allows(self, principal_id: str, action: str, *, management: bool = False) -> bool:
        return any(ROLES[role].allows(action, management=management) for role in self.roles_of(principal_id))
