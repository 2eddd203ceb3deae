"""The CA certificates of DPS instances behind the ``CaCertificates`` port, over Azure Resource Manager with
``azure-mgmt-iothubprovisioningservices``.

The client is pinned to api-version 2022-02-05, the newest stable one in the published specs
(``Microsoft.Devices/stable/2022-02-05/iotdps.json``). Each instance is addressed by its ARM id
(``DPS_INSTANCES[].resourceId``); ARM itself by ``ARM_ENDPOINT`` (https://management.azure.com on Azure, the
local stack's emulator locally). The caller's identity needs a management role on the instance that writes
certificates (Contributor); reading them takes Reader.
"""

from __future__ import annotations

import re

from azure.core import MatchConditions

from handlers.dps_pool import DpsInstance
from handlers.ports import CaCertificate

from .errors import translated

API_VERSION = "2022-02-05"
_RESOURCE_ID = re.compile(r"/subscriptions/(?P<subscription>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/"
                          r"Microsoft\.Devices/provisioningServices/(?P<name>[^/]+)", re.IGNORECASE)


def _certificate(resource) -> CaCertificate:
    properties = resource.properties
    return CaCertificate(name=resource.name, thumbprint=(properties.thumbprint or "").upper(),
                         verified=bool(properties.is_verified), etag=resource.etag or "",
                         pem=properties.certificate or None)


class DpsCaCertificates:
    def __init__(self, credential, arm_endpoint: str, *, connection_verify: str | None = None):
        self._credential, self._endpoint = credential, arm_endpoint
        self._options = {"connection_verify": connection_verify} if connection_verify else {}
        self._clients: dict[str, object] = {}

    def _where(self, dps: DpsInstance):
        from azure.mgmt.iothubprovisioningservices import IotDpsClient

        match = _RESOURCE_ID.fullmatch(dps.resource_id or "")
        if match is None:
            raise ValueError(f"DPS instance {dps.name}: resourceId {dps.resource_id!r} "
                             "is not a provisioning service id")
        subscription = match["subscription"]
        if subscription not in self._clients:
            self._clients[subscription] = IotDpsClient(self._credential, subscription, base_url=self._endpoint,
                                                       api_version=API_VERSION, **self._options)
        return self._clients[subscription].dps_certificate, match["group"], match["name"]

    def get(self, dps: DpsInstance, name: str) -> CaCertificate | None:
        from handlers.errors import NotFound

        operations, group, service = self._where(dps)
        try:
            with translated(f"CA certificate {name} on {dps.name}"):
                return _certificate(operations.get(name, group, service))
        except NotFound:
            return None

    def upload(self, dps: DpsInstance, name: str, pem: str, etag: str | None) -> CaCertificate:
        from azure.mgmt.iothubprovisioningservices import models

        operations, group, service = self._where(dps)
        body = models.CertificateResponse(properties=models.CertificateProperties(certificate=pem.encode(),
                                                                                  is_verified=False))
        condition = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        with translated(f"CA certificate {name} on {dps.name}: upload"):
            return _certificate(operations.create_or_update(group, service, name, body, **condition))

    def verification_code(self, dps: DpsInstance, name: str, etag: str) -> tuple[str, str]:
        operations, group, service = self._where(dps)
        with translated(f"CA certificate {name} on {dps.name}: verification code"):
            answer = operations.generate_verification_code(name, group, service, etag=etag,
                                                           match_condition=MatchConditions.IfNotModified)
        return answer.properties.verification_code, answer.etag

    def verify(self, dps: DpsInstance, name: str, etag: str, proof_pem: str) -> CaCertificate:
        from azure.mgmt.iothubprovisioningservices import models

        operations, group, service = self._where(dps)
        with translated(f"CA certificate {name} on {dps.name}: verify"):
            return _certificate(operations.verify_certificate(
                name, group, service, models.VerificationCodeRequest(certificate=proof_pem), etag=etag,
                match_condition=MatchConditions.IfNotModified))

    def list(self, dps: DpsInstance) -> list[CaCertificate]:
        operations, group, service = self._where(dps)
        with translated(f"CA certificates of {dps.name}"):
            return [_certificate(c) for c in operations.list(group, service).value or []]
