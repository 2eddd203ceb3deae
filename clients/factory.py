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


def key_store(settings: Settings, *, local_passphrase: bytes | None = None) -> KeyStore:
    """Key Vault when ``KEY_VAULT_URL`` is set; otherwise the development-only local key store."""
    if not settings.key_vault_url:
        return LocalKeyStore(settings.local_keystore_dir, local_passphrase)
    from .keyvault import KeyVaultKeyStore

    local = settings.emulator_ca_path is not None
    return KeyVaultKeyStore(settings.key_vault_url, credential(settings),
                            connection_verify=str(settings.emulator_ca_path) if local else None,
                            # the emulator's challenge names vault.azure.net, not 127.0.0.1
                            verify_challenge_resource=not local,
                            sign_rate_per_s=settings.key_vault_sign_rate_per_s)
