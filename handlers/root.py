"""The active root CA as the use cases that sign with it read it (``root_ca`` creates it)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from pki.keys import PrivateKey
from pki.signing import remote_key

from .errors import NotFound
from .ports import DocumentStore, KeyRef, KeyStore

ROOT_DOCUMENT = "root-ca.json"


@dataclass(frozen=True)
class RootCa:
    certificate: x509.Certificate
    key: KeyRef
    record: dict


def load_root(store: DocumentStore, keys: KeyStore) -> RootCa:
    """The active root CA; ``NotFound`` telling how to make one."""
    doc = store.get(ROOT_DOCUMENT)
    if doc is None or doc.data.get("status") != "active":
        raise NotFound("no root CA yet: run `pkictl root create`")
    key = keys.get_key(doc.data["key"]["name"], doc.data["key"]["version"])
    return RootCa(x509.load_pem_x509_certificate(doc.data["certificatePem"].encode()), key, doc.data)


def root_signer(root: RootCa, keys: KeyStore) -> PrivateKey:
    """A stand-in private key that signs with the root's key in the key store."""
    return remote_key(root.key.public_key, keys.signer(root.key))
