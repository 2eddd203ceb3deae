"""Concrete clients from settings, for the edges that wire them (function_app, pkictl, devhost)."""

from __future__ import annotations

from handlers.ports import KeyStore
from settings import Settings

from .local_keystore import LocalKeyStore


def credential(settings: Settings):
    """The emulators take any bearer token; Azure takes the managed identity (DefaultAzureCredential)."""
    if settings.emulator_ca_path:
        from .retry import StaticTokenCredential

        return StaticTokenCredential()
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def key_store(settings: Settings) -> KeyStore:
    """Key Vault when ``KEY_VAULT_URL`` is set; otherwise the development-only local key store."""
    if not settings.key_vault_url:
        passphrase = settings.local_keystore_passphrase
        return LocalKeyStore(settings.local_keystore_dir, passphrase.encode() if passphrase else None)
    from .keyvault import KeyVaultKeyStore

    local = settings.emulator_ca_path is not None
    return KeyVaultKeyStore(settings.key_vault_url, credential(settings),
                            connection_verify=str(settings.emulator_ca_path) if local else None,
                            # the emulator's challenge names vault.azure.net, not 127.0.0.1
                            verify_challenge_resource=not local,
                            sign_rate_per_s=settings.key_vault_sign_rate_per_s)


def secrets_store(settings: Settings, keys: KeyStore):
    """Key Vault secrets when ``KEY_VAULT_URL`` is set; otherwise next to the local key store."""
    if not settings.key_vault_url:
        from .local_keystore import LocalSecrets

        return LocalSecrets(keys)
    from .keyvault import KeyVaultSecrets

    local = settings.emulator_ca_path is not None
    return KeyVaultSecrets(settings.key_vault_url, credential(settings),
                           connection_verify=str(settings.emulator_ca_path) if local else None,
                           verify_challenge_resource=not local)


class DpsRegistrar:
    """Test registration through the device-side client (writes the key to a private temp file briefly)."""

    def __init__(self, endpoint: str, ca_path: str | None):
        self._endpoint, self._ca_path = endpoint, ca_path

    def register(self, id_scope: str, device_id: str, chain_pem: bytes, key_pem: bytes) -> str:
        import os
        import tempfile

        from .device_registration import register

        with tempfile.TemporaryDirectory(prefix="pki-register-") as folder:
            chain_path, key_path = os.path.join(folder, "chain.pem"), os.path.join(folder, "key.pem")
            for path, data in ((chain_path, chain_pem), (key_path, key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            result = register(self._endpoint, id_scope, device_id, chain_path, key_path, ca_path=self._ca_path)
        return result.assigned_hub or ""
