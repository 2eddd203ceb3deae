"""Concrete clients from settings, for the edges that wire them (function_app, pkictl, devhost)."""

from __future__ import annotations

from urllib.parse import urlsplit

from handlers.ports import KeyStore
from settings import Settings

from .local_keystore import LocalKeyStore
from .storage import blob_service, ca_path


def credential(settings: Settings):
    """The app's credential for Key Vault, DPS and IoT Hub (``clients.identity.app_credential``)."""
    from .identity import app_credential

    return app_credential(settings)


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def _vault_options(settings: Settings, vault_url: str) -> dict:
    # Key Vault's challenge names the resource https://vault.azure.net and the SDK checks that the vault's host
    # ends in .vault.azure.net (azure/keyvault/keys/_shared/challenge_auth_policy.py). A loopback vault cannot
    # pass that check; everything else (challenge, tenant, token for vault.azure.net) runs as on Azure.
    return {"connection_verify": ca_path(settings), "verify_challenge_resource": not _loopback(vault_url)}


def key_store(settings: Settings) -> KeyStore:
    """Key Vault when ``KEY_VAULT_URL`` is set: the root key (``ROOT_CA_KEY_NAME``) in ``ROOT_CA_KEY_VAULT_URL``,
    the customers' keys in ``KEY_VAULT_URL`` (``RootApartKeyStore``). Otherwise the development-only local key
    store."""
    if not settings.key_vault_url:
        passphrase = settings.local_keystore_passphrase
        return LocalKeyStore(settings.local_keystore_dir, passphrase.encode() if passphrase else None)
    from .keyvault import KeyVaultKeyStore, RootApartKeyStore
    from .signers import SigningPeers

    if not settings.root_key_vault_url:  # load_settings refuses this; a hand-made Settings must not merge the two
        raise ValueError("root_key_vault_url: the root key needs a vault of its own (ROOT_CA_KEY_VAULT_URL)")
    credential_ = credential(settings)

    state = blob_service(settings).get_container_client(settings.state_container)

    def vault(url: str) -> KeyVaultKeyStore:  # each vault has its own sign limit, so its own rate limiter
        return KeyVaultKeyStore(url, credential_, sign_rate_per_s=settings.key_vault_sign_rate_per_s,
                                signers=SigningPeers(state, url), hardware_protected=settings.key_protection == "hsm",
                                **_vault_options(settings, url))

    return RootApartKeyStore(settings.root_key_name, root=vault(settings.root_key_vault_url),
                             intermediates=vault(settings.key_vault_url))


def secrets_store(settings: Settings, keys: KeyStore):
    """Key Vault secrets (in ``KEY_VAULT_URL``, never the root vault) when set; otherwise next to the local key
    store."""
    if not settings.key_vault_url:
        from .local_keystore import LocalSecrets

        return LocalSecrets(keys)
    from .keyvault import KeyVaultSecrets

    return KeyVaultSecrets(settings.key_vault_url, credential(settings),
                           **_vault_options(settings, settings.key_vault_url))


def enrollment_groups(settings: Settings):
    from .dps import DpsEnrollmentGroups

    return DpsEnrollmentGroups.for_pool(settings.dps_pool, connection_strings=settings.dps_connection_strings,
                                        credential=credential(settings), connection_verify=ca_path(settings),
                                        max_groups=settings.dps_max_groups)


def ca_certificates(settings: Settings):
    """The DPS instances' CA certificates, through Azure Resource Manager (``ARM_ENDPOINT``)."""
    from .dps_certificates import DpsCaCertificates

    return DpsCaCertificates(credential(settings), settings.arm_endpoint, connection_verify=ca_path(settings))


def hub_registries(settings: Settings):
    from .iothub import IotHubRegistries

    return IotHubRegistries(connection_strings=settings.iot_hub_connection_strings, credential=credential(settings),
                            ops_per_min=settings.iot_hub_registry_ops_per_min, connection_verify=ca_path(settings))


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
