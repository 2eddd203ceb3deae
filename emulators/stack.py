"""All emulated services in one process: Key Vault, IoT Hub registry, N DPS instances and the DPS
device-registration endpoint, each on its own loopback port, behind one generated CA."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from .core import EmulatorServer, Faults
from .dps import DpsDeviceEndpoint, DpsInstance
from .iothub import IotHubEmulator
from .keyvault import KeyVaultEmulator
from .tls import make_server_identity


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class DpsInfo:
    name: str
    endpoint: str  # service API, e.g. https://127.0.0.1:PORT
    id_scope: str
    connection_string: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "endpoint": self.endpoint, "idScope": self.id_scope,
                "connectionString": self.connection_string}


class EmulatorStack:
    """``with EmulatorStack(state_dir) as stack:`` - everything up; ``stack.describe()`` says where."""

    def __init__(self, state_dir: Path, *, dps_instances: int = 1, max_groups_per_dps: int = 100):
        self.state_dir = Path(state_dir)
        self.identity = make_server_identity()
        self.keyvault = KeyVaultEmulator()
        self.iothub = IotHubEmulator(shared_access_key=_key())
        self.dps: list[DpsInstance] = [
            DpsInstance(name=f"dps{i + 1}", id_scope=f"0ne{secrets.token_hex(4).upper()}", shared_access_key=_key(),
                        hub=self.iothub, max_groups=max_groups_per_dps)
            for i in range(dps_instances)
        ]
        self.device_endpoint = DpsDeviceEndpoint({d.id_scope: d for d in self.dps})
        self.servers: dict[str, EmulatorServer] = {}

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "emulators-ca.pem"

    def start(self) -> EmulatorStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ca_path.write_bytes(self.identity.ca_pem)
        try:
            self._serve("keyvault", self.keyvault.routes())
            hub_server = self._serve("iothub", self.iothub.routes())
            self.iothub.hostname = f"127.0.0.1:{hub_server.port}"
            for dps in self.dps:
                dps.endpoint = self._serve(dps.name, dps.routes()).url
            self._serve("dps-device", self.device_endpoint.routes(), client_auth=True)
        except Exception:
            self.stop()
            raise
        (self.state_dir / "emulators.json").write_text(json.dumps(self.describe(), indent=2))
        return self

    def _serve(self, name: str, routes, client_auth: bool = False) -> EmulatorServer:
        server = EmulatorServer(name, routes, self.identity, client_auth=client_auth).start()
        self.servers[name] = server
        return server

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def faults(self, service: str, **settings) -> None:
        """Set injected faults on one service (``keyvault``, ``iothub``, ``dps1``..., ``dps-device``)."""
        self.servers[service].gate.faults = Faults.from_dict(settings)

    def clear_faults(self) -> None:
        for server in self.servers.values():
            server.gate.faults = Faults()

    @property
    def keyvault_url(self) -> str:
        return self.servers["keyvault"].url

    @property
    def device_endpoint_url(self) -> str:
        return self.servers["dps-device"].url

    @property
    def iothub_connection_string(self) -> str:
        return (f"HostName={self.iothub.hostname};SharedAccessKeyName=iothubowner;"
                f"SharedAccessKey={self.iothub.shared_access_key}")

    def dps_info(self) -> list[DpsInfo]:
        return [DpsInfo(d.name, d.endpoint, d.id_scope,
                        f"HostName={d.endpoint.removeprefix('https://')};SharedAccessKeyName=provisioningserviceowner;"
                        f"SharedAccessKey={d.shared_access_key}") for d in self.dps]

    def describe(self) -> dict:
        """Where everything is. Holds the emulators' SAS keys: write it only to the git-ignored state dir."""
        return {
            "caPath": str(self.ca_path),
            "keyVaultUrl": self.keyvault_url,
            "iotHub": {"hostname": self.iothub.hostname, "connectionString": self.iothub_connection_string},
            "dps": [d.as_dict() for d in self.dps_info()],
            "dpsDeviceEndpoint": self.device_endpoint_url,
            "admin": {name: f"{server.url}/_emulator/faults" for name, server in self.servers.items()},
        }

    def __enter__(self) -> EmulatorStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
