"""App settings, read once at start-up into frozen dataclasses.

The Functions host passes settings as environment variables; off Azure, ``local.settings.json``
``Values`` fill in what the environment does not set (as Core Tools does). A missing or
malformed setting fails at start-up with its name and the rule, never deep inside a handler.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from handlers.dps_pool import DpsInstance
from pki.keys import CA_ROOT_KEY_TYPES, KeyType

STORAGE = "AzureWebJobsStorage"
_CONTAINER = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")  # blob container naming rules
_KEY_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")  # Key Vault object names
_DPS_RESOURCE_ID = re.compile(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Devices/"
                              r"provisioningServices/[^/]+", re.IGNORECASE)
# Customers' intermediate keys: customer-{customerId} (handlers.records.key_name), compared lower-case.
CUSTOMER_KEY_PREFIX = "customer-"
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""

    def __init__(self, name: str, message: str):
        super().__init__(f"setting {name}: {message}")
        self.name = name


@dataclass(frozen=True)
class StorageSettings:
    """A storage connection as the Functions host reads one (learn.microsoft.com/azure/azure-functions/
    functions-reference#common-properties-for-identity-based-connections): either a connection string
    (account key or SAS), or identity-based service URIs with ``__credential`` / ``__clientId`` /
    ``__managedIdentityResourceId``."""

    connection_string: str | None = None
    blob_service_uri: str | None = None
    queue_service_uri: str | None = None
    credential: str | None = None  # "managedidentity", or None: DefaultAzureCredential
    client_id: str | None = None
    resource_id: str | None = None

    def __repr__(self) -> str:  # the connection string may carry an account key: never show it
        where = self.blob_service_uri or ("connection string" if self.connection_string else "unset")
        return f"StorageSettings({where})"


@dataclass(frozen=True)
class Settings:
    storage: StorageSettings
    client_id: str | None = None  # AZURE_CLIENT_ID: the user-assigned identity of Key Vault, DPS and IoT Hub calls
    state_container: str = "pki-state"
    key_vault_url: str | None = None  # KEY_VAULT_URL: the intermediates' keys and the batch PFX passwords
    root_key_vault_url: str | None = None  # ROOT_CA_KEY_VAULT_URL: the root key alone (docs/deploy.md, step 1)
    key_vault_sign_rate_per_s: float = 100.0
    key_protection: str = "software"  # KEY_VAULT_KEY_PROTECTION: hsm makes new CA keys EC-HSM / RSA-HSM
    emulator_ca_path: Path | None = None
    local_keystore_dir: Path = Path(".pki-local/keystore")
    local_keystore_passphrase: str | None = field(default=None, repr=False)
    root_key_name: str = "pki-root-ca"
    root_common_name: str = "IoT PKI Root CA"
    root_organization: str | None = None
    root_key_type: KeyType = KeyType.EC_P384
    root_validity_years: int = 20
    dps_pool: tuple[DpsInstance, ...] = ()
    dps_connection_strings: dict[str, str] = field(default_factory=dict, repr=False)
    intermediate_key_type: KeyType = KeyType.EC_P256
    intermediate_validity_days: int = 5 * 365
    renewal_min_interval_hours: int = 24
    dps_max_groups: int = 100
    batch_chunk_rows: int = 500
    batch_max_rows: int = 100_000
    batch_max_bytes: int = 64 * 1024 * 1024
    batch_inflight: int = 16
    batch_chunk_lease_s: float = 120.0
    device_key_type: KeyType = KeyType.EC_P256
    device_validity_days: int = 365
    dps_device_endpoint: str = "global.azure-devices-provisioning.net"
    arm_endpoint: str = "https://management.azure.com"
    iot_hub_connection_strings: dict[str, str] = field(default_factory=dict, repr=False)
    iot_hub_registry_ops_per_min: int = 100
    intermediate_renew_before_days: int = 90
    device_notice_before_days: int = 30
    device_renewals_per_day: int = 3
    device_renew_before_days: int = 60
    dps_allocation_webhook_url: str | None = field(default=None, repr=False)
    root_warn_before_days: int = 365


def storage_connection(env: Mapping[str, str], name: str = STORAGE) -> StorageSettings:
    """The storage connection ``name`` as the Functions host resolves it: the setting itself is a connection
    string; otherwise ``name__blobServiceUri`` / ``__queueServiceUri`` (or ``__serviceUri``, or
    ``__accountName`` for the public cloud) with ``__credential``, ``__clientId``, ``__managedIdentityResourceId``."""
    def value(suffix: str = "") -> str:
        return env.get(f"{name}{suffix}", "").strip()

    connection = value()
    if connection:
        parts = dict(p.split("=", 1) for p in connection.split(";") if "=" in p)
        if parts.get("UseDevelopmentStorage", "").lower() != "true" and not (
            ("AccountName" in parts and ("AccountKey" in parts or "SharedAccessSignature" in parts))
            or "BlobEndpoint" in parts
        ):
            raise SettingsError(name, "is not a storage connection string (needs AccountName and AccountKey, "
                                "BlobEndpoint, or UseDevelopmentStorage=true)")
        return StorageSettings(connection_string=connection)
    account, service_uri = value("__accountName"), value("__serviceUri")
    blob_uri, queue_uri = value("__blobServiceUri") or service_uri, value("__queueServiceUri")
    if account and not blob_uri:
        if not re.fullmatch(r"[a-z0-9]{3,24}", account):
            raise SettingsError(f"{name}__accountName", f"{account!r} is not a storage account name")
        blob_uri = f"https://{account}.blob.core.windows.net"
        queue_uri = queue_uri or f"https://{account}.queue.core.windows.net"
    if not blob_uri:
        raise SettingsError(name, "is not set: give a connection string, or "
                            f"{name}__accountName / __blobServiceUri for an identity-based connection")
    queue_uri = queue_uri or blob_uri.replace(".blob.", ".queue.")
    for suffix, uri in (("__blobServiceUri", blob_uri), ("__queueServiceUri", queue_uri)):
        if not uri.startswith("https://"):  # a bearer token is only ever sent over HTTPS (storage SDK rule)
            raise SettingsError(f"{name}{suffix}", f"{uri!r} must be an https:// URL")
    credential = value("__credential").lower() or None
    if credential not in (None, "managedidentity"):
        raise SettingsError(f"{name}__credential", f"{value('__credential')!r}: the only value is managedidentity")
    client_id, resource_id = value("__clientId") or None, value("__managedIdentityResourceId") or None
    if client_id and resource_id:
        raise SettingsError(f"{name}__clientId", "give __clientId or __managedIdentityResourceId, not both")
    if client_id and not _GUID.fullmatch(client_id):
        raise SettingsError(f"{name}__clientId", f"{client_id!r} is not a client id (a GUID)")
    return StorageSettings(blob_service_uri=blob_uri.rstrip("/"), queue_service_uri=queue_uri.rstrip("/"),
                           credential=credential, client_id=client_id, resource_id=resource_id)


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"{raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(name, f"must be between {low} and {high}, got {value}")
    return value


def _match(env: Mapping[str, str], name: str, default: str, pattern: re.Pattern, rule: str) -> str:
    value = env.get(name, "").strip() or default
    if not pattern.fullmatch(value):
        raise SettingsError(name, f"{value!r} {rule}")
    return value


def _json(env: Mapping[str, str], name: str, default):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise SettingsError(name, f"is not valid JSON ({exc})") from None


def _dps_pool(env: Mapping[str, str]) -> tuple[DpsInstance, ...]:
    raw = _json(env, "DPS_INSTANCES", [])
    rule = 'must be a JSON list of {"name", "endpoint", "idScope", "iotHubs": [...], "resourceId"}'
    if not isinstance(raw, list):
        raise SettingsError("DPS_INSTANCES", rule)
    pool = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - {"name", "endpoint", "idScope", "iotHubs", "resourceId"}:
            raise SettingsError("DPS_INSTANCES", f"item {index} {rule}")
        resource_id = item.get("resourceId")
        if resource_id is not None and not (isinstance(resource_id, str) and _DPS_RESOURCE_ID.fullmatch(resource_id)):
            raise SettingsError("DPS_INSTANCES", f"item {index}: resourceId must be /subscriptions/SUB/resourceGroups/"
                                                 "RG/providers/Microsoft.Devices/provisioningServices/NAME")
        name, endpoint, scope = item.get("name"), item.get("endpoint"), item.get("idScope")
        hubs = item.get("iotHubs", [])
        if not all(isinstance(v, str) and v for v in (name, endpoint, scope)):
            raise SettingsError("DPS_INSTANCES", f"item {index}: name, endpoint and idScope must be non-empty strings")
        if not endpoint.startswith("https://"):
            raise SettingsError("DPS_INSTANCES", f"item {index}: endpoint must be an https:// URL")
        if not isinstance(hubs, list) or not all(isinstance(h, str) and h for h in hubs):
            raise SettingsError("DPS_INSTANCES", f"item {index}: iotHubs must be a list of hub host names")
        pool.append(DpsInstance(name=name, endpoint=endpoint.rstrip("/"), id_scope=scope, iot_hubs=tuple(hubs),
                                resource_id=resource_id))
    if len({i.name for i in pool}) != len(pool):
        raise SettingsError("DPS_INSTANCES", "instance names must be unique")
    return tuple(pool)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed`` (the first is the default)."""
    value = env.get(name, "").strip().lower() or allowed[0]
    if value not in allowed:
        raise SettingsError(name, f"{value!r} must be {' or '.join(allowed)}")
    return value


def _https_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not value.startswith("https://"):
        raise SettingsError(name, f"{value!r} must be an https:// URL")
    return value.rstrip("/")


def _webhook_url(env: Mapping[str, str]) -> str | None:
    """``DPS_ALLOCATION_WEBHOOK_URL``: the app's ``/api/dps-allocation`` with its function key (``?code=``), as DPS
    calls it: https, or http on loopback for the local stack."""
    value = env.get("DPS_ALLOCATION_WEBHOOK_URL", "").strip() or None
    if value is None:
        return None
    split = urlsplit(value)
    loopback = split.scheme == "http" and split.hostname in ("127.0.0.1", "localhost", "::1")
    if split.scheme != "https" and not loopback:
        raise SettingsError("DPS_ALLOCATION_WEBHOOK_URL", "must be an https:// URL (http only on loopback)")
    if "code" not in parse_qs(split.query):
        raise SettingsError("DPS_ALLOCATION_WEBHOOK_URL", "must carry the function's key as ?code=...: DPS calls "
                            "the webhook with it (authLevel function)")
    return value


def _device_key_type(env: Mapping[str, str]) -> KeyType:
    try:
        return KeyType.parse(env.get("DEVICE_KEY_TYPE", "").strip() or "ec-p256", field="DEVICE_KEY_TYPE")
    except ValueError as exc:
        raise SettingsError("DEVICE_KEY_TYPE", str(exc).split(": ", 1)[-1]) from None


def _vault_url(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip() or None
    if value and not value.startswith("https://"):
        raise SettingsError(name, "must be an https:// vault URL such as https://myvault.vault.azure.net")
    return value.rstrip("/") if value else None


def _vault_urls(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``KEY_VAULT_URL`` and ``ROOT_CA_KEY_VAULT_URL``: both or neither, and two different vaults. The root key
    has a vault of its own because Azure RBAC is additive and an ordinary assignment cannot deny
    (learn.microsoft.com/azure/role-based-access-control/overview#multiple-role-assignments, deny-assignments): the
    app's Key Vault Crypto Officer on the intermediates' vault would reach a root key kept there."""
    key_vault_url, root_vault_url = _vault_url(env, "KEY_VAULT_URL"), _vault_url(env, "ROOT_CA_KEY_VAULT_URL")
    if key_vault_url and not root_vault_url:
        raise SettingsError("ROOT_CA_KEY_VAULT_URL", "is required with KEY_VAULT_URL: the root key lives in a vault "
                            "of its own, where the app may only read and sign with it (docs/deploy.md)")
    if root_vault_url and not key_vault_url:
        raise SettingsError("ROOT_CA_KEY_VAULT_URL", "is set but KEY_VAULT_URL is not: set both (Key Vault) or "
                            "neither (the development-only local key store)")
    if key_vault_url and key_vault_url.lower() == root_vault_url.lower():
        raise SettingsError("ROOT_CA_KEY_VAULT_URL", "must be another vault than KEY_VAULT_URL: in one vault the "
                            "app's roles on the intermediates' keys would reach the root key too")
    return key_vault_url, root_vault_url


def _root_key_name(env: Mapping[str, str]) -> str:
    name = _match(env, "ROOT_CA_KEY_NAME", "pki-root-ca", _KEY_NAME,
                  "is not a Key Vault key name (1-127 of a-z, A-Z, 0-9, '-')")
    # Customers' intermediate keys are named customer-{customerId} (handlers.records.key_name); Key Vault compares
    # names case-insensitively, so Customer-X is customer-x's key too. A root key there would be a customer's.
    if name.lower().startswith(CUSTOMER_KEY_PREFIX):
        raise SettingsError("ROOT_CA_KEY_NAME", f"{name!r} is in the {CUSTOMER_KEY_PREFIX}* namespace of customers' "
                            "intermediate keys; choose another name (default pki-root-ca)")
    return name


def load_settings(env: Mapping[str, str]) -> Settings:
    """Parse every setting this app reads; ``SettingsError`` names the first bad one."""
    key_vault_url, root_key_vault_url = _vault_urls(env)
    try:
        root_key_type = KeyType.parse(env.get("ROOT_CA_KEY_TYPE", "").strip() or "ec-p384",
                                      field="ROOT_CA_KEY_TYPE", allowed=CA_ROOT_KEY_TYPES)
    except ValueError as exc:
        raise SettingsError("ROOT_CA_KEY_TYPE", str(exc).split(": ", 1)[-1]) from None
    ca = env.get("EMULATOR_CA_PATH", "").strip()
    if ca and not Path(ca).is_file():
        raise SettingsError("EMULATOR_CA_PATH", f"{ca} is not a file (it is written by `pkictl local up`)")
    try:
        intermediate_key_type = KeyType.parse(env.get("INTERMEDIATE_KEY_TYPE", "").strip() or "ec-p256",
                                              field="INTERMEDIATE_KEY_TYPE", allowed=CA_ROOT_KEY_TYPES)
    except ValueError as exc:
        raise SettingsError("INTERMEDIATE_KEY_TYPE", str(exc).split(": ", 1)[-1]) from None
    connection_strings = _json(env, "DPS_CONNECTION_STRINGS", {})
    if not isinstance(connection_strings, dict) or not all(isinstance(v, str) for v in connection_strings.values()):
        raise SettingsError("DPS_CONNECTION_STRINGS", "must be a JSON object of instance name -> connection string")
    pool = _dps_pool(env)
    unknown = sorted(set(connection_strings) - {i.name for i in pool})
    if unknown:
        raise SettingsError("DPS_CONNECTION_STRINGS", f"names {', '.join(unknown)}, not in DPS_INSTANCES")
    hub_connections = _json(env, "IOT_HUB_CONNECTION_STRINGS", {})
    if not isinstance(hub_connections, dict) or not all(isinstance(v, str) for v in hub_connections.values()):
        raise SettingsError("IOT_HUB_CONNECTION_STRINGS", "must be a JSON object of hub host name -> connection string")
    client_id = env.get("AZURE_CLIENT_ID", "").strip() or None
    if client_id and not _GUID.fullmatch(client_id):
        raise SettingsError("AZURE_CLIENT_ID", f"{client_id!r} is not a client id (a GUID)")
    return Settings(
        storage=storage_connection(env),
        client_id=client_id,
        iot_hub_connection_strings=hub_connections,
        iot_hub_registry_ops_per_min=_int(env, "IOT_HUB_REGISTRY_OPS_PER_MIN", 100, 1, 100_000),
        intermediate_renew_before_days=_int(env, "INTERMEDIATE_RENEW_BEFORE_DAYS", 90, 1, 3650),
        device_notice_before_days=_int(env, "DEVICE_NOTICE_BEFORE_DAYS", 30, 1, 3650),
        device_renewals_per_day=_int(env, "DEVICE_RENEWALS_PER_DAY", 3, 1, 100),
        device_renew_before_days=_int(env, "DEVICE_RENEW_BEFORE_DAYS", 60, 1, 3650),
        dps_allocation_webhook_url=_webhook_url(env),
        root_warn_before_days=_int(env, "ROOT_WARN_BEFORE_DAYS", 365, 1, 36500),
        dps_pool=pool,
        dps_connection_strings=connection_strings,
        intermediate_key_type=intermediate_key_type,
        intermediate_validity_days=_int(env, "INTERMEDIATE_VALIDITY_DAYS", 5 * 365, 30, 30 * 365),
        renewal_min_interval_hours=_int(env, "RENEWAL_MIN_INTERVAL_HOURS", 24, 0, 24 * 365),
        dps_max_groups=_int(env, "DPS_MAX_GROUPS_PER_INSTANCE", 100, 1, 100),
        batch_chunk_rows=_int(env, "BATCH_CHUNK_ROWS", 500, 1, 5000),
        batch_max_rows=_int(env, "BATCH_MAX_ROWS", 100_000, 1, 1_000_000),
        batch_max_bytes=_int(env, "BATCH_MAX_BYTES", 64 * 1024 * 1024, 1024, 1024 ** 3),
        batch_inflight=_int(env, "BATCH_INFLIGHT", 16, 1, 256),
        batch_chunk_lease_s=float(_int(env, "BATCH_CHUNK_LEASE_SECONDS", 120, 5, 3600)),
        device_key_type=_device_key_type(env),
        device_validity_days=_int(env, "DEVICE_VALIDITY_DAYS", 365, 1, 30 * 365),
        dps_device_endpoint=env.get("DPS_DEVICE_ENDPOINT", "").strip() or "global.azure-devices-provisioning.net",
        arm_endpoint=_https_url(env, "ARM_ENDPOINT", "https://management.azure.com"),
        key_vault_sign_rate_per_s=float(_int(env, "KEY_VAULT_SIGN_RATE_PER_S", 100, 1, 4000)),
        key_protection=_choice(env, "KEY_VAULT_KEY_PROTECTION", ("software", "hsm")),
        emulator_ca_path=Path(ca) if ca else None,
        state_container=_match(env, "STATE_CONTAINER", "pki-state", _CONTAINER,
                               "is not a blob container name (3-63 of a-z, 0-9, '-')"),
        key_vault_url=key_vault_url,
        root_key_vault_url=root_key_vault_url,
        local_keystore_dir=Path(env.get("LOCAL_KEYSTORE_DIR", "").strip() or ".pki-local/keystore"),
        local_keystore_passphrase=env.get("LOCAL_KEYSTORE_PASSPHRASE") or None,
        root_key_name=_root_key_name(env),
        root_common_name=env.get("ROOT_CA_COMMON_NAME", "").strip() or "IoT PKI Root CA",
        root_organization=env.get("ROOT_CA_ORGANIZATION", "").strip() or None,
        root_key_type=root_key_type,
        root_validity_years=_int(env, "ROOT_CA_VALIDITY_YEARS", 20, 1, 50),
    )


def timespan(value, default: float | None) -> float | None:
    """A host.json TimeSpan ("hh:mm:ss", "mm:ss", seconds) in seconds; "-1" is unbounded (None)."""
    if value is None or value == "":
        return default
    if str(value).strip() == "-1":
        return None
    try:
        parts = [float(p) for p in str(value).split(":")]
    except ValueError:
        raise ValueError(f"{value!r} is not a time span (hh:mm:ss)") from None
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return parts[-3] * 3600 + parts[-2] * 60 + parts[-1]


def host_json(path: Path, env: Mapping[str, str]) -> dict:
    """``host.json`` as the Functions host reads it: the file (in the script root), with app settings named
    ``AzureFunctionsJobHost__path__to__setting`` overriding its values (learn.microsoft.com/azure/azure-functions/
    functions-host-json#override-hostjson-values; names are case-insensitive, as in .NET configuration)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as exc:
        raise SettingsError(str(path), f"is not JSON ({exc})") from None
    prefix = "azurefunctionsjobhost__"
    for name, value in sorted(env.items()):
        if not name.lower().startswith(prefix):
            continue
        *parents, leaf = name[len(prefix):].split("__")
        node = document
        for key in parents:
            existing = next((k for k in node if k.lower() == key.lower()), key)
            if not isinstance(node.get(existing), dict):
                node[existing] = {}
            node = node[existing]
        node[next((k for k in node if k.lower() == leaf.lower()), leaf)] = value
    return document


@dataclass(frozen=True)
class HostLimits:
    """What the Functions host allows one invocation: its time, and how many queue invocations of one function run
    at once on an instance (``batchSize + newBatchThreshold``; learn.microsoft.com/azure/azure-functions/
    functions-bindings-storage-queue-trigger#concurrency, functions-host-json#functiontimeout)."""

    function_timeout_s: float | None
    batch_size: int
    new_batch_threshold: int

    @property
    def queue_concurrency(self) -> int:
        return self.batch_size + self.new_batch_threshold

    @classmethod
    def of(cls, document: Mapping, cores: int | None = None) -> HostLimits:
        queues = (document.get("extensions") or {}).get("queues") or {}
        batch = int(queues.get("batchSize", 16))
        # Unset, newBatchThreshold is batchSize/2 times the instance's cores (QueuesOptions.NewBatchThreshold).
        threshold = int(queues["newBatchThreshold"]) if "newBatchThreshold" in queues else \
            batch // 2 * (cores or os.cpu_count() or 1)
        # Unset, functionTimeout is 30 minutes on Flex Consumption, Premium and Dedicated plans.
        return cls(timespan(document.get("functionTimeout"), 1800.0), batch, threshold)


def environment(local_settings: Path | None = Path("local.settings.json"),
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment over ``local.settings.json`` Values (environment wins, as in Azure)."""
    values: dict[str, str] = {}
    if local_settings is not None and local_settings.is_file():
        try:
            document = json.loads(local_settings.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SettingsError(str(local_settings), f"cannot be read as JSON ({exc})") from None
        raw = document.get("Values", {}) if isinstance(document, dict) else None
        if not isinstance(raw, dict):
            raise SettingsError(str(local_settings), "must be an object with a 'Values' object")
        values = {str(k): str(v) for k, v in raw.items()}
    values.update(os.environ if environ is None else environ)
    return values
