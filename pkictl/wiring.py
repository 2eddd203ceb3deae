"""Concrete clients for the CLI, built from settings (environment over local.settings.json)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from clients.local_keystore import LocalKeyStore
from clients.storage import state_store
from handlers.ports import DocumentStore, KeyStore
from settings import Settings, SettingsError, load_settings


@dataclass(frozen=True)
class Wiring:
    settings: Settings
    store: DocumentStore
    keys: KeyStore


def wire(env: Mapping[str, str]) -> Wiring:
    settings = load_settings(env)
    if settings.key_vault_url:
        raise SettingsError("KEY_VAULT_URL", "is set, but this version signs with the local key store only "
                            "(Key Vault signing arrives with customer onboarding); unset it for now")
    passphrase = env.get("LOCAL_KEYSTORE_PASSPHRASE", "").encode() or None
    keys = LocalKeyStore(settings.local_keystore_dir, passphrase)
    return Wiring(settings=settings, store=state_store(settings), keys=keys)


def default_env() -> dict[str, str]:
    from settings import environment

    return environment(environ=os.environ)
