"""The one composition root: concrete clients from settings, for the function app, pkictl, bench and tests."""

from __future__ import annotations

import datetime as dt
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path

from clients.audit import StoreAuditLog
from clients.blob_files import BlobFiles
from clients.dps import DpsEnrollmentGroups
from clients.dps_certificates import DpsCaCertificates
from clients.factory import DpsRegistrar, ca_certificates, enrollment_groups, hub_registries, key_store, secrets_store
from clients.iothub import IotHubRegistries
from clients.keyvault import sign_rate
from clients.metrics import MeteredAuditLog
from clients.storage import StorageQueues, blob_service, ca_path, state_store
from handlers.dps_pool import OnboardingSettings
from handlers.expiry_sweep import SweepSettings
from handlers.ports import AuditLog, DocumentStore, KeyStore, Ports, Secrets
from handlers.records import BatchSettings
from handlers.renewal import RenewalSettings
from settings import HostLimits, Settings, SettingsError, host_json, load_settings

APP_ROOT = Path(__file__).resolve().parent.parent  # the script root: function_app.py and host.json


class _Built:
    """A client built from the settings on first use, once, under a lock (the host runs invocations on threads)."""

    def __init__(self, build: Callable[[Services], object]):
        self._build = build

    def __set_name__(self, owner, name: str) -> None:
        self._name = name

    def __get__(self, services: Services | None, owner=None):
        if services is None:
            return self
        with services._lock:  # noqa: SLF001 - the descriptor is part of Services
            if self._name not in services.__dict__:
                services.__dict__[self._name] = self._build(services)
            return services.__dict__[self._name]


class Services:
    """The one composition root: the concrete client behind each port, built from ``settings`` on first use. The
    function app (``services()``), pkictl (``Cli.services``), the benchmarks and the tests all take their clients
    from here, so a command needing only storage builds no Key Vault or DPS client."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.RLock()

    store: DocumentStore = _Built(lambda s: state_store(s.settings))
    keys: KeyStore = _Built(lambda s: key_store(s.settings))
    groups: DpsEnrollmentGroups = _Built(lambda s: enrollment_groups(s.settings))
    audit: AuditLog = _Built(lambda s: MeteredAuditLog(StoreAuditLog(s.store)))  # each event also counted
    files: BlobFiles = _Built(lambda s: BlobFiles(blob_service(s.settings)))
    queue: StorageQueues = _Built(lambda s: StorageQueues(s.settings))
    secrets: Secrets = _Built(lambda s: secrets_store(s.settings, s.keys))
    registrar: DpsRegistrar = _Built(lambda s: DpsRegistrar(s.settings.dps_device_endpoint, ca_path(s.settings)))
    hubs: IotHubRegistries = _Built(lambda s: hub_registries(s.settings))
    ca_certificates: DpsCaCertificates = _Built(lambda s: ca_certificates(s.settings))

    @property
    def batches(self) -> BatchSettings:
        s = self.settings
        return BatchSettings(chunk_rows=s.batch_chunk_rows, max_rows=s.batch_max_rows, max_bytes=s.batch_max_bytes,
                             default_key_type=s.device_key_type, default_validity_days=s.device_validity_days,
                             inflight=s.batch_inflight, chunk_lease_s=s.batch_chunk_lease_s)

    @property
    def onboarding(self) -> OnboardingSettings:
        return OnboardingSettings(pool=self.settings.dps_pool,
                                  intermediate_key_type=self.settings.intermediate_key_type,
                                  intermediate_validity_days=self.settings.intermediate_validity_days,
                                  renewal_min_interval=dt.timedelta(hours=self.settings.renewal_min_interval_hours),
                                  max_groups_per_dps=self.settings.dps_max_groups,
                                  allocation_webhook_url=self.settings.dps_allocation_webhook_url)

    @property
    def commands(self) -> Ports:
        return Ports(store=self.store, keys=self.keys, dps=self.groups, hubs=self.hubs, files=self.files,
                     audit=self.audit, settings=self.onboarding)

    @property
    def renewals(self) -> RenewalSettings:
        return RenewalSettings(validity_days=self.settings.device_validity_days,
                               per_day=self.settings.device_renewals_per_day)

    @property
    def sweep(self) -> SweepSettings:
        s = self.settings
        return SweepSettings(renew_before_days=s.intermediate_renew_before_days,
                             notice_before_days=s.device_notice_before_days,
                             device_renew_before_days=s.device_renew_before_days,
                             root_warn_before_days=s.root_warn_before_days)


def build_services(settings: Settings) -> Services:
    if os.environ.get("WEBSITE_INSTANCE_ID") and not settings.key_vault_url:
        # On Azure a local key store would live on one instance's disk: CA keys must be in Key Vault.
        raise SettingsError("KEY_VAULT_URL", "is required when running on Azure Functions")
    return Services(settings)


def check_chunk_time(settings: Settings, limits: HostLimits) -> None:
    """A chunk must finish well inside ``functionTimeout`` (past it the host fails the invocation and the chunk
    starts over): at worst every chunk invocation the host runs at once on an instance shares this process's
    Key Vault sign rate, so one chunk takes up to rows x concurrent chunks / rate. "Well inside" is half."""
    if limits.function_timeout_s is None or not settings.key_vault_url:
        return  # no time limit; or a local key store, which signs without a rate cap
    rate = sign_rate(settings.intermediate_key_type, settings.key_vault_sign_rate_per_s,
                     settings.key_protection == "hsm")
    worst = settings.batch_chunk_rows * limits.queue_concurrency / rate
    if worst <= limits.function_timeout_s / 2:
        return
    fits = max(1, int(limits.function_timeout_s / 2 * rate / limits.queue_concurrency))
    raise SettingsError("BATCH_CHUNK_ROWS", (
        f"{settings.batch_chunk_rows} rows per chunk take up to {worst:.0f} s: up to {limits.queue_concurrency} "
        f"chunks run at once per instance (host.json batchSize {limits.batch_size} + newBatchThreshold "
        f"{limits.new_batch_threshold}) and share {rate:g} signs/s (KEY_VAULT_SIGN_RATE_PER_S, "
        f"{settings.intermediate_key_type.value} intermediates), more than half of functionTimeout "
        f"({limits.function_timeout_s:.0f} s). Set BATCH_CHUNK_ROWS to {fits} or less, or lower batchSize / "
        "newBatchThreshold"))


@functools.cache
def services() -> Services:
    """Built on first use (a bad setting fails the first invocation with its name, and every one after)."""
    settings = load_settings(os.environ)
    check_chunk_time(settings, HostLimits.of(host_json(APP_ROOT / "host.json", os.environ)))
    return build_services(settings)
