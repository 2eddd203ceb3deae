"""Proof that no secret leaked: scan a local stack's storage (every blob of every container) and logs for
unencrypted private keys, access tokens (JWTs), the Key Vault secrets (PFX passwords), the identity endpoint's
header, and the storage, DPS and IoT Hub keys.

Used by the demo test and the soak run; the emulators and Azurite run in-process or under this stack, so
the scanner knows every secret there is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .stack import LocalStack

# Unencrypted private keys in any PEM form; "ENCRYPTED PRIVATE KEY" (a batch's device.key) is allowed.
_PRIVATE_PEM = re.compile(rb"-----BEGIN (?:RSA |EC )?PRIVATE KEY-----")
# A bearer token (header.payload.signature, base64url JSON): whoever holds one acts as its identity until it expires.
_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")


def secrets_of(stack: LocalStack) -> dict[str, str]:
    """Every secret value the stack holds, by a name that says what it is (never printed)."""
    vaults = (stack.emulators.keyvault, stack.emulators.rootvault)  # the root vault holds none: the app may not set
    values = {f"Key Vault secret #{i}": v for i, v in enumerate(v for vault in vaults for v in vault.secret_values())}
    values["storage account key"] = stack.azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    values["IoT Hub key"] = stack.emulators.iothub.shared_access_key
    values["identity endpoint header"] = stack.emulators.issuer.header
    for dps in stack.emulators.dps:
        values[f"{dps.name} key"] = dps.shared_access_key
    return {name: value for name, value in values.items() if len(value) >= 8}


def find_leaks(stack: LocalStack, texts: Iterable[tuple[str, str]] = ()) -> tuple[list[str], int]:
    """(Where each secret or private key was found, how many blobs and texts were scanned)."""
    secrets = {name: value.encode() for name, value in secrets_of(stack).items()}
    found: list[str] = []
    scanned = 0

    def check(where: str, data: bytes) -> None:
        if _PRIVATE_PEM.search(data):
            found.append(f"{where}: an unencrypted private key")
        if _JWT.search(data):
            found.append(f"{where}: an access token")
        for name, value in secrets.items():
            if value in data:
                found.append(f"{where}: the {name}")

    service = stack.azurite.blob_service()
    for container in service.list_containers():
        client = service.get_container_client(container.name)
        for blob in client.list_blobs():
            check(f"blob {container.name}/{blob.name}", client.download_blob(blob.name).readall())
            scanned += 1
    logs = [(str(p), p.read_text(errors="replace")) for p in Path(stack.state_dir).rglob("*.log")]
    for where, text in [*logs, *texts]:
        check(where, text.encode())
        scanned += 1
    return found, scanned
