"""A ``KeyStore`` in a local folder, for development before Key Vault is wired in.

Keys are PKCS#8 encrypted at rest with a passphrase (``LOCAL_KEYSTORE_PASSPHRASE``, or a random
one kept in the folder with mode 0600), never printed, and sign with Key Vault's semantics
(raw r||s for EC) so everything above it runs the Key Vault code path. Not for production:
a production CA key belongs in Key Vault (DESIGN.md section 3).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import threading
from pathlib import Path

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization

from handlers.errors import NotFound
from handlers.ports import KeyRef
from pki.keys import KeyType, PrivateKey, generate_key
from pki.signing import SignFn, software_signer

_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")  # Key Vault's rule, so names carry over
_PASSPHRASE_FILE = ".passphrase"  # noqa: S105 - a file name, not a password


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, failing if it exists (no silent overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class LocalKeyStore:
    def __init__(self, directory: Path, passphrase: bytes | None = None):
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._passphrase = passphrase or self._load_or_make_passphrase()
        self._cache: dict[tuple[str, str], PrivateKey] = {}
        self._lock = threading.Lock()

    def _load_or_make_passphrase(self) -> bytes:
        path = self._dir / _PASSPHRASE_FILE
        if not path.exists():
            try:
                _write_private(path, secrets.token_urlsafe(32).encode())
            except FileExistsError:
                pass
        return path.read_bytes().strip()

    def _key_dir(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise ValueError(f"key name {name!r}: use 1-127 of a-z, A-Z, 0-9, '-'")
        return self._dir / name

    def create_key(self, name: str, key_type: KeyType) -> KeyRef:
        folder = self._key_dir(name)
        folder.mkdir(exist_ok=True, mode=0o700)
        key = generate_key(key_type)
        version = secrets.token_hex(16)  # Key Vault versions are 32 hex characters too
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(self._passphrase))
        _write_private(folder / f"{version}.pem", pem)
        with self._lock:
            (folder / "latest.tmp").write_text(version)
            os.replace(folder / "latest.tmp", folder / "latest")
            self._cache[(name, version)] = key
        return KeyRef(name=name, version=version, key_type=key_type, public_key=key.public_key())

    def _load(self, name: str, version: str | None) -> tuple[str, PrivateKey]:
        folder = self._key_dir(name)
        if version is None:
            try:
                version = (folder / "latest").read_text().strip()
            except FileNotFoundError:
                raise NotFound(f"key {name}: not found in {self._dir}") from None
        with self._lock:
            cached = self._cache.get((name, version))
        if cached is not None:
            return version, cached
        if not re.fullmatch(r"[0-9a-f]{32}", version):
            raise NotFound(f"key {name}/{version}: not found")
        try:
            pem = (folder / f"{version}.pem").read_bytes()
        except FileNotFoundError:
            raise NotFound(f"key {name}/{version}: not found in {self._dir}") from None
        try:
            key = serialization.load_pem_private_key(pem, self._passphrase)
        except (ValueError, TypeError):
            raise ValueError(f"key {name}/{version}: cannot be decrypted; "
                             "is LOCAL_KEYSTORE_PASSPHRASE right?") from None
        with self._lock:
            self._cache[(name, version)] = key
        return version, key

    def get_key(self, name: str, version: str | None = None) -> KeyRef:
        version, key = self._load(name, version)
        return KeyRef(name=name, version=version, key_type=KeyType.of(key.public_key()), public_key=key.public_key())

    def signer(self, key: KeyRef) -> SignFn:
        return software_signer(self._load(key.name, key.version)[1])


class LocalSecrets:
    """``Secrets`` in the local key store's folder, encrypted with its passphrase (development only)."""

    def __init__(self, keys: LocalKeyStore):
        self._keys = keys

    def _folder(self, name: str) -> Path:
        folder = self._keys._dir / "secrets" / self._keys._key_dir(name).name  # noqa: SLF001 - its own key store
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder

    def set_secret(self, name: str, value: str) -> str:
        version = secrets.token_hex(16)
        _write_private(self._folder(name) / version, self._fernet().encrypt(value.encode()))
        (self._folder(name) / "latest").write_text(version)
        return version

    def get_secret(self, name: str, version: str | None = None) -> str:
        folder = self._folder(name)
        try:
            version = version or (folder / "latest").read_text().strip()
            token = (folder / version).read_bytes()
        except (FileNotFoundError, ValueError):
            raise NotFound(f"secret {name}: not found") from None
        return self._fernet().decrypt(token).decode()

    def _fernet(self) -> Fernet:
        return Fernet(base64.urlsafe_b64encode(hashlib.sha256(self._keys._passphrase).digest()))  # noqa: SLF001 - its own key store
