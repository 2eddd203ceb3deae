"""A device renews its own certificate through DPS with the Azure IoT device SDK for Python: the README's sample,
and the code ``tests/test_device_sdk.py`` runs against the local DPS (MQTT, port 8883).

    pip install azure-iot-device cryptography

The device re-registers over mutual TLS with the certificate it has, and puts a CSR for a new key in the
registration payload. The service's allocation webhook answers in the payload: ``{"pkiRenewal": {"status":
"issued", "certificate", "chain", "serial", "notAfter"}}``, or ``{"status": "refused", "reason"}`` (the device was
still registered with its current certificate). Nothing here is specific to this project but the payload's shape.
"""

from __future__ import annotations

import base64
import json

from azure.iot.device import X509, ProvisioningDeviceClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def register(provisioning_host: str, id_scope: str, registration_id: str, chain_file: str, key_file: str, *,
             payload: dict | None = None, server_verification_cert: str | None = None):
    """Register with DPS. ``chain_file``: the device's certificate, then its intermediate (and root), as the device
    sends them in the TLS handshake. On Azure ``provisioning_host`` is ``global.azure-devices-provisioning.net`` and
    ``server_verification_cert`` is not needed."""
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=provisioning_host, registration_id=registration_id, id_scope=id_scope,
        x509=X509(cert_file=chain_file, key_file=key_file), server_verification_cert=server_verification_cert)
    if payload is not None:
        client.provisioning_payload = payload
    return client.register()  # connects, registers, polls, disconnects; raises if DPS refuses the registration


def renew(provisioning_host: str, id_scope: str, registration_id: str, chain_file: str, key_file: str, *,
          server_verification_cert: str | None = None) -> tuple[dict, bytes]:
    """Ask for a new certificate: returns the service's ``pkiRenewal`` answer and the new key (PKCS#8 PEM, to be
    stored as the device stores its key; use it only with the certificate when the answer is ``issued``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
           .sign(key, hashes.SHA256()))
    request = {"pkiRenewal": {"csr": base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()}}
    result = register(provisioning_host, id_scope, registration_id, chain_file, key_file, payload=request,
                      server_verification_cert=server_verification_cert)
    state = result.registration_state
    payload = json.loads(state.response_payload) if state else None  # the SDK hands the payload back as JSON text
    answer = (payload or {}).get("pkiRenewal") or {
        "status": "refused", "reason": f"no renewal answer (registration {result.status})"}
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return answer, key_pem
