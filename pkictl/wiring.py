"""Concrete clients for the CLI, built from settings (environment over local.settings.json)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from clients.factory import key_store
from clients.storage import state_store
from handlers.ports import DocumentStore, KeyStore
from settings import Settings, load_settings


@dataclass(frozen=True)
class Wiring:
    settings: Settings
    store: DocumentStore
    keys: KeyStore


def wire(env: Mapping[str, str]) -> Wiring:
    settings = load_settings(env)
    keys = key_store(settings)
    return Wiring(settings=settings, store=state_store(settings), keys=keys)


def default_env() -> dict[str, str]:
    """The environment over local.settings.json Values; the Values are exported into this process's environment,
    as Core Tools does for the worker, so that azure-identity finds the local stack's identity endpoint."""
    from settings import environment

    values = environment(environ=os.environ)
    for name, value in values.items():
        os.environ.setdefault(name, value)
    return values
