"""Use case: a proof-of-possession certificate for a CA uploaded to DPS or IoT Hub.

DPS shows a verification code after the upload; a certificate with CN = that code, signed by
the CA's key, proves we hold the key. Its own key pair is throwaway and never stored.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from pki import profiles
from pki.keys import KeyType, generate_key

from .ports import DocumentStore, KeyStore
from .root import load_root, root_signer


def root_verification_certificate(code: str, *, store: DocumentStore, keys: KeyStore,
                                  now: dt.datetime) -> x509.Certificate:
    root = load_root(store, keys)
    throwaway = generate_key(KeyType.EC_P256)
    return profiles.issue_verification(ca=root.certificate, ca_key=root_signer(root, keys),
                                       public_key=throwaway.public_key(), code=code, now=now)
