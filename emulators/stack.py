"""All emulated services in one process: the token issuer (Microsoft Entra ID and the managed identity
endpoint), Key Vault, IoT Hub registry, N DPS instances and the DPS device-registration endpoint, each on its
own loopback port, behind one generated CA.

Key Vault is two vaults, as on Azure: ``keyvault`` (the customers' intermediate keys and the batch secrets) and
``rootvault`` (the root key alone, where the app may only read and sign with it: docs/deploy.md).

The local tenant has three principals, and each emulator holds the role assignments ``docs/deploy.md`` makes
on its Azure counterpart (``LOCAL_ROLES``; ``tests/test_deploy_roles.py`` checks the two agree):

- ``pki-app``: the Function App's user-assigned managed identity;
- ``pki-operator``: a person running the day-to-day ``pkictl`` commands; cannot sign with a CA key;
- ``pki-admin``: the PKI administrator, who creates the root CA and its proof of possession (``root create``,
  ``verification-cert``) and may run the expiry sweep by hand (``sweep run``: it renews intermediates).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .arm import ResourceManagerEmulator, arm_refusal
from .core import EmulatorServer, Faults, Refusal, key_vault_refusal
from .dps import DpsDeviceEndpoint, DpsInstance, dps_refusal
from .dps_mqtt import DpsMqttServer
from .identity import DPS, IOT_HUB, VAULT, EntraGuard, LocalIdentity, TokenIssuer
from .iothub import IotHubEmulator, hub_refusal
from .keyvault import KeyVaultEmulator
from .tls import ServerIdentity, make_server_identity

APP, OPERATOR, ADMIN = "pki-app", "pki-operator", "pki-admin"
# Role assignments by principal and resource, exactly as docs/deploy.md makes them. Resources: "keyvault" (the
# intermediates' keys and the batch secrets), "rootvault" (the root key alone), "dps" and "iothub" (each instance and
# each hub gets the same assignments); "storage" is the account, "container:NAME" / "queue:NAME" one container or
# queue of it (storage is not enforced: Azurite has no RBAC; tests/test_deploy_roles.py checks the names).
LOCAL_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    APP: {"storage": ("Storage Account Contributor", "Storage Blob Data Owner", "Storage Queue Data Contributor",
                      "Storage Table Data Contributor"),
          "keyvault": ("Key Vault Crypto Officer", "PKI Batch Secrets Writer"),
          "rootvault": ("PKI Root Key Signer",),  # custom: get + sign, nothing else (emulators/rbac.py)
          "dps": ("Device Provisioning Service Data Contributor",),
          "iothub": ("IoT Hub Registry Contributor", "IoT Hub Twin Contributor")},
    OPERATOR: {"container:pki-state": ("Storage Blob Data Owner",),  # tag queries (blobs/filter/action): Owner only
               "container:device-batches": ("Storage Blob Data Contributor",),
               "container:device-certificates": ("Storage Blob Data Reader",),
               "queue:customer-onboarding": ("Storage Queue Data Contributor",),
               "queue:pki-commands": ("Storage Queue Data Contributor",),
               "keyvault": ("Key Vault Reader", "Key Vault Secrets User"),
               "rootvault": ("Key Vault Reader",),
               # Reader (management plane): `root show` reads where the root is verified; Data Reader: `doctor --dps`
               "dps": ("Reader", "Device Provisioning Service Data Reader")},
    ADMIN: {"container:pki-state": ("Storage Blob Data Owner",),
            "queue:certificate-expiry-notices": ("Storage Queue Data Contributor",),
            "keyvault": ("Key Vault Crypto Officer",),
            "rootvault": ("Key Vault Crypto Officer",),
            # Contributor: uploading and verifying the root (`root register`) are management operations
            "dps": ("Device Provisioning Service Data Contributor", "Contributor")},
}


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only (0600), as the local key store writes keys: the mode is given when
    the file is made (``os.open``), so it is never world-readable; one an older run left wider is narrowed first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class DpsInfo:
    name: str
    endpoint: str  # service API, e.g. https://127.0.0.1:PORT
    id_scope: str
    connection_string: str = ""
    resource_id: str = ""  # its ARM id (CA certificates)

    def as_dict(self) -> dict:
        return {"name": self.name, "endpoint": self.endpoint, "idScope": self.id_scope,
                "connectionString": self.connection_string, "resourceId": self.resource_id}


class EmulatorStack:
    """``with EmulatorStack(state_dir) as stack:`` - everything up; ``stack.describe()`` says where."""

    def __init__(self, state_dir: Path, *, dps_instances: int = 1, max_groups_per_dps: int = 100,
                 tls: ServerIdentity | None = None, record: bool = False, vault_sku: str = "standard"):
        """``record``: keep every request and answer in ``exchanges`` (what the contract tests check).
        ``vault_sku``: both vaults' (infra/main.bicep's keyVaultSku; premium holds HSM-protected keys)."""
        self.state_dir = Path(state_dir)
        self.exchanges: list[dict] | None = [] if record else None
        self.tls = tls or make_server_identity()
        self.issuer = TokenIssuer()
        self.principals: dict[str, LocalIdentity] = {name: self.issuer.add_identity(name) for name in LOCAL_ROLES}
        self.keyvault = KeyVaultEmulator(self._guard(VAULT, "keyvault"), sku=vault_sku)
        # The root key's vault: another vault with its own role assignments, as on Azure (docs/deploy.md, step 1).
        self.rootvault = KeyVaultEmulator(self._guard(VAULT, "rootvault"), name="pkilocal-root", sku=vault_sku)
        self.iothub = IotHubEmulator(shared_access_key=_key(), guard=self._guard(IOT_HUB, "iothub"))
        self.dps: list[DpsInstance] = [
            DpsInstance(name=f"dps{i + 1}", id_scope=f"0ne{secrets.token_hex(4).upper()}", shared_access_key=_key(),
                        hub=self.iothub, guard=self._guard(DPS, "dps"), max_groups=max_groups_per_dps)
            for i in range(dps_instances)
        ]
        self.device_endpoint = DpsDeviceEndpoint({d.id_scope: d for d in self.dps})
        self.arm = ResourceManagerEmulator(self.issuer, self.dps)
        self.servers: dict[str, EmulatorServer] = {}

    def _guard(self, resource: str, service: str) -> EntraGuard:
        guard = EntraGuard(self.issuer, resource)
        for name, roles in LOCAL_ROLES.items():
            guard.roles.assign(self.principals[name].object_id, roles.get(service, ()))
        return guard

    def client_id(self, principal: str) -> str:
        return self.principals[principal].client_id

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "emulators-ca.pem"

    def start(self) -> EmulatorStack:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ca_path.write_bytes(self.tls.ca_pem)
        try:
            identity = EmulatorServer("identity", self.issuer.routes(), None,  # plain HTTP, as on Azure
                                      recorder=self.exchanges).start()
            self.servers["identity"] = identity
            self.issuer.endpoint = identity.url + "/msi/token"
            self._serve("keyvault", self.keyvault.routes(), key_vault_refusal)
            self._serve("rootvault", self.rootvault.routes(), key_vault_refusal)
            hub_server = self._serve("iothub", self.iothub.routes(), hub_refusal)
            self.iothub.hostname = f"127.0.0.1:{hub_server.port}"
            for dps in self.dps:
                dps.endpoint = self._serve(dps.name, dps.routes(), dps_refusal).url
            device = self._serve("dps-device", self.device_endpoint.routes(), dps_refusal, client_auth=True)
            # the same registrations over MQTT, as the device SDKs reach DPS; one quota for both
            self.servers["dps-mqtt"] = DpsMqttServer(self.device_endpoint, self.tls, device.gate).start()
            self._serve("arm", self.arm.routes(), arm_refusal)
        except Exception:
            self.stop()
            raise
        write_private(self.state_dir / "emulators.json", json.dumps(self.describe(), indent=2))  # holds SAS keys
        return self

    def _serve(self, name: str, routes, refusal: Refusal, client_auth: bool = False) -> EmulatorServer:
        server = EmulatorServer(name, routes, self.tls, client_auth=client_auth, recorder=self.exchanges,
                                refusal=refusal).start()
        self.servers[name] = server
        return server

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def faults(self, service: str, **settings) -> None:
        """Set injected faults on one service (``keyvault``, ``rootvault``, ``iothub``, ``dps1``..., ``dps-device``,
        which is the MQTT endpoint's as well)."""
        self.servers[service].gate.faults = Faults.from_dict(settings)

    def azure_quotas(self) -> None:
        """The documented default quotas, as rate caps (429 in each service's shape beyond them): DPS 1,000
        registrations and 1,000 service operations per minute per instance (learn.microsoft.com/azure/iot-dps/
        about-iot-dps#quotas-and-limits), IoT Hub S1 100 registry operations per minute per unit (iot-hub-devguide-
        quotas-throttling), Key Vault 4,000 EC signs per 10 s per vault (key-vault/general/service-limits)."""
        # a premium vault holds HSM keys, which Key Vault allows half the signs (2,000 per 10 s for EC and RSA-2048,
        # key-vault/general/service-limits): the stricter reading for the whole vault
        vault_rate = 400.0 if self.keyvault.sku == "standard" else 200.0
        for name, rate in ({"keyvault": vault_rate, "rootvault": vault_rate, "iothub": 100 / 60,
                            "dps-device": 1000 / 60} |
                           {d.name: 1000 / 60 for d in self.dps}).items():
            # Key Vault counts over any 10 s, as documented (Faults.window_s); the others keep the burst reading.
            self.servers[name].gate.faults = Faults(rate_per_s=rate, window_s=10.0 if "vault" in name else 0.0)

    def clear_faults(self) -> None:
        for server in self.servers.values():
            server.gate.faults = Faults()

    @property
    def keyvault_url(self) -> str:
        return self.servers["keyvault"].url

    @property
    def rootvault_url(self) -> str:
        return self.servers["rootvault"].url

    @property
    def arm_url(self) -> str:
        return self.servers["arm"].url

    @property
    def device_endpoint_url(self) -> str:
        return self.servers["dps-device"].url

    @property
    def device_mqtt_host(self) -> str:
        """The DPS MQTT endpoint's address (port 8883): a device SDK's ``provisioning_host``."""
        return self.servers["dps-mqtt"].host

    @property
    def iothub_connection_string(self) -> str:
        return (f"HostName={self.iothub.hostname};SharedAccessKeyName=iothubowner;"
                f"SharedAccessKey={self.iothub.shared_access_key}")

    def dps_info(self) -> list[DpsInfo]:
        return [DpsInfo(d.name, d.endpoint, d.id_scope,
                        f"HostName={d.endpoint.removeprefix('https://')};SharedAccessKeyName=provisioningserviceowner;"
                        f"SharedAccessKey={d.shared_access_key}", self.arm.resource_id(d)) for d in self.dps]

    def describe(self) -> dict:
        """Where everything is. Holds the emulators' SAS keys: write it only to the git-ignored state dir."""
        return {
            "caPath": str(self.ca_path),
            "identityEndpoint": self.issuer.endpoint, "identityHeader": self.issuer.header,
            "tenantId": self.issuer.tenant_id,
            "principals": {name: {"clientId": p.client_id, "objectId": p.object_id, "roles": LOCAL_ROLES[name]}
                           for name, p in self.principals.items()},
            "keyVaultUrl": self.keyvault_url, "rootKeyVaultUrl": self.rootvault_url,
            "iotHub": {"hostname": self.iothub.hostname, "connectionString": self.iothub_connection_string},
            "dps": [d.as_dict() for d in self.dps_info()],
            "dpsDeviceEndpoint": self.device_endpoint_url, "dpsMqttHost": self.device_mqtt_host,
            "armEndpoint": self.arm_url,
            "admin": {name: f"{server.url}/_emulator/faults" for name, server in self.servers.items()
                      if name != "dps-mqtt"},  # its quota is dps-device's
        }

    def __enter__(self) -> EmulatorStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
