"""Use case: a device's factory files, split from its one output blob and its records: ``cert.pem``, ``chain.pem``
(device, intermediate, root), ``root.pem`` and, when asked for a generated key, ``device.key`` (PKCS#8, unencrypted)
and ``device.pfx`` (when that is the output). ``pkictl device export`` writes them."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from pki import export
from pki.pem import load_certificates

from .errors import InvalidMessage, NotFound
from .ports import DocumentStore, InputFiles, Secrets
from .records import CustomerRecord, DeviceRecord, KeySource, customer_document, read_device
from .root import ROOT_DOCUMENT


def factory_files(customer_id: str, device_id: str, *, store: DocumentStore, files: InputFiles, secrets: Secrets,
                  with_key: bool) -> tuple[DeviceRecord, dict[str, bytes]]:
    """The device's record and files; ``NotFound`` for a device ``customer_id`` does not hold, ``InvalidMessage``
    (field ``key``) for a key that never left the device."""
    doc = read_device(store, customer_id, device_id)
    if doc is None:
        raise NotFound(f"no device {device_id!r} for customer {customer_id!r}")
    record = DeviceRecord.from_json(doc.data)
    certificate = record.certificate_pem_in(files).encode()
    if record.certificate_pem is None:  # written before the record kept its certificate: the chain file has it all
        chain = files.get(record.outputs["chain"])
    else:
        above = _above(record, store)
        if not above:
            raise NotFound(f"device {device_id}: intermediate {record.intermediate_serial} that issued it is not on "
                           f"customer {customer_id}'s record")
        chain = certificate + "".join(above).encode()
    written = {"cert.pem": certificate, "chain.pem": chain,
               "root.pem": export.cert_pem(load_certificates(chain, field="chain")[-1])}
    if not with_key:
        return record, written
    if record.key_source is not KeySource.GENERATED:
        raise InvalidMessage("key", f"the key of {device_id} never left the device (it sent a CSR)")
    password = _password(record, secrets)
    if record.outputs.get("pfx"):
        written["device.pfx"] = files.get(record.outputs["pfx"])
        key = pkcs12.load_key_and_certificates(written["device.pfx"], password)[0]
    else:
        # the key and the chain in one PEM: cryptography reads the key block and skips the certificates
        key = serialization.load_pem_private_key(files.get(record.outputs.get("pem") or record.outputs["key"]),
                                                 password)
    written["device.key"] = export.key_pem(key)
    return record, written


def certificate_on_file(record: DeviceRecord, *, files: InputFiles, secrets: Secrets) -> x509.Certificate:
    """The device certificate its output blob holds (the PFX opened with the batch's password, or the PEM's first
    certificate): what an audit compares with the record. A renewed device has no output blob: its certificate is
    the record's."""
    if not record.outputs:
        return x509.load_pem_x509_certificate(record.certificate_pem.encode())
    if record.outputs.get("pfx") and record.pfx_secret:
        return pkcs12.load_key_and_certificates(files.get(record.outputs["pfx"]), _password(record, secrets))[1]
    return load_certificates(files.get(record.outputs.get("pem") or record.outputs["certificate"]), field="output")[0]


def _password(record: DeviceRecord, secrets: Secrets) -> bytes:
    """The batch's PFX / key password, from the secret store only."""
    return secrets.get_secret(record.pfx_secret["name"], record.pfx_secret["version"]).encode()


def _above(record: DeviceRecord, store: DocumentStore) -> list[str] | None:
    customer = store.get(customer_document(record.customer_id))
    root = store.get(ROOT_DOCUMENT)
    if customer is None:
        return None
    return CustomerRecord.from_json(customer.data).chain_above(
        record.intermediate_serial, root.data.get("certificatePem") if root else None)
