"""Signing with a key that never leaves its key store.

``cryptography``'s builders accept any Python subclass of ``EllipticCurvePrivateKey`` /
``RSAPrivateKey`` and call its ``sign()`` with the whole to-be-signed bytes. The stand-in
classes here hash locally and hand the digest to a ``SignFn`` with Azure Key Vault's
semantics (``sign(algorithm, digest)``, REST "keys/sign"):

- ES256/ES384 return the raw ``r || s`` (JWS, RFC 7518 section 3.4); X.509 needs the DER
  ``ECDSA-Sig-Value`` (RFC 5480 section 2.2.3). Unconverted, the builder accepts the bytes
  silently and every verifier rejects the certificate, so the conversion lives here, once.
- The hash is tied to the curve: ES256 = P-256 + SHA-256, ES384 = P-384 + SHA-384.
- RS256 is PKCS#1 v1.5; PS256 is PSS with MGF1 of the same hash and salt = digest length.

``software_signer`` gives a local key the same semantics, so software keys (tests, the
local key store, the Key Vault emulator) go through exactly the path Key Vault keys do.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from .errors import SigningError
from .keys import PrivateKey, PublicKey

SignFn = Callable[[str, bytes], bytes]
"""``sign(algorithm, digest) -> signature`` with Key Vault's algorithm names and formats."""

_EC_ALGORITHMS = {"secp256r1": ("ES256", hashes.SHA256), "secp384r1": ("ES384", hashes.SHA384)}
_HASH_SUFFIX = {"sha256": "256", "sha384": "384", "sha512": "512"}
_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def ec_algorithm(curve: ec.EllipticCurve) -> tuple[str, hashes.HashAlgorithm]:
    """Key Vault algorithm and the only hash it allows for a curve."""
    try:
        name, hash_cls = _EC_ALGORITHMS[curve.name]
    except KeyError:
        raise SigningError(f"curve {curve.name} is not supported; use P-256 or P-384") from None
    return name, hash_cls()


def signature_hash(public_key: PublicKey) -> hashes.HashAlgorithm:
    """The hash a certificate signed by this key uses (SHA-256 for RSA, the curve's for EC)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ec_algorithm(public_key.curve)[1]
    return hashes.SHA256()


def _digest(data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        return data, algorithm._algorithm  # noqa: SLF001 - Prehashed exposes no public accessor
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


def _not_exportable(*_args, **_kwargs):
    raise TypeError("this key lives in a key store and cannot be exported or used for anything but sign()")


class RemoteEcKey(ec.EllipticCurvePrivateKey):
    """An EC private key whose ``sign`` is a call to a key store (ES256/ES384)."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey, sign: SignFn, *, verify: bool = True):
        self._public_key = public_key
        self._sign = sign
        self._verify = verify
        self._algorithm, self._hash = ec_algorithm(public_key.curve)

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise SigningError(f"only ECDSA is supported, not {type(signature_algorithm).__name__}")
        digest, hash_algorithm = _digest(data, signature_algorithm.algorithm)
        if hash_algorithm.name != self._hash.name:
            raise SigningError(
                f"{self._algorithm} signs with {self._hash.name.upper()} only, not {hash_algorithm.name.upper()}"
            )
        raw = self._sign(self._algorithm, digest)
        size = (self.key_size + 7) // 8
        if len(raw) != 2 * size:
            raise SigningError(f"{self._algorithm} signature must be {2 * size} bytes (r||s), got {len(raw)}")
        der = utils.encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
        if self._verify:
            try:
                self._public_key.verify(der, digest, ec.ECDSA(utils.Prehashed(hash_algorithm)))
            except InvalidSignature:
                raise SigningError(f"{self._algorithm} signature does not verify with the key's public key") from None
        return der

    exchange = private_numbers = private_bytes = _not_exportable

    def __copy__(self) -> RemoteEcKey:
        return self

    def __deepcopy__(self, memo: dict) -> RemoteEcKey:
        return self


class RemoteRsaKey(rsa.RSAPrivateKey):
    """An RSA private key whose ``sign`` is a call to a key store (RS256/PS256 and friends)."""

    def __init__(self, public_key: rsa.RSAPublicKey, sign: SignFn, *, verify: bool = True):
        self._public_key = public_key
        self._sign = sign
        self._verify = verify

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    def sign(self, data: bytes, pad: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | utils.Prehashed) -> bytes:
        digest, hash_algorithm = _digest(data, algorithm)
        suffix = _HASH_SUFFIX.get(hash_algorithm.name)
        if suffix is None:
            raise SigningError(f"hash {hash_algorithm.name} is not supported; use SHA-256, SHA-384 or SHA-512")
        if isinstance(pad, padding.PKCS1v15):
            name = "RS" + suffix
        elif isinstance(pad, padding.PSS):
            # Key Vault's PS* use salt length = digest length; the certificate must say the same.
            salt = pad._salt_length  # noqa: SLF001 - PSS exposes no public accessor
            if not (salt is padding.PSS.DIGEST_LENGTH or salt == hash_algorithm.digest_size):
                raise SigningError("PSS salt length must equal the digest length (what Key Vault uses)")
            name = "PS" + suffix
        else:
            raise SigningError(f"padding {pad.name} is not supported; use PKCS#1 v1.5 or PSS")
        signature = self._sign(name, digest)
        if len(signature) != (self.key_size + 7) // 8:
            raise SigningError(f"{name} signature must be {(self.key_size + 7) // 8} bytes, got {len(signature)}")
        if self._verify:
            try:
                self._public_key.verify(signature, digest, _padding_for(name), utils.Prehashed(hash_algorithm))
            except InvalidSignature:
                raise SigningError(f"{name} signature does not verify with the key's public key") from None
        return signature

    decrypt = private_numbers = private_bytes = _not_exportable

    def __copy__(self) -> RemoteRsaKey:
        return self

    def __deepcopy__(self, memo: dict) -> RemoteRsaKey:
        return self


def remote_key(public_key: PublicKey, sign: SignFn, *, verify: bool = True) -> PrivateKey:
    """A stand-in private key for ``public_key`` that signs through ``sign``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return RemoteEcKey(public_key, sign, verify=verify)
    if isinstance(public_key, rsa.RSAPublicKey):
        return RemoteRsaKey(public_key, sign, verify=verify)
    raise TypeError(f"public_key must be an EC or RSA public key, not {type(public_key).__name__}")


def _padding_for(algorithm: str) -> padding.AsymmetricPadding:
    if algorithm.startswith("PS"):
        return padding.PSS(mgf=padding.MGF1(_HASHES[algorithm[2:]]()), salt_length=padding.PSS.DIGEST_LENGTH)
    return padding.PKCS1v15()


def software_signer(private_key: PrivateKey) -> SignFn:
    """A ``SignFn`` with Key Vault semantics over a local software key."""

    def sign(algorithm: str, digest: bytes) -> bytes:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            expected, hash_algorithm = ec_algorithm(private_key.curve)
            if algorithm != expected:
                raise SigningError(f"{algorithm} does not fit this key; use {expected}")
            if len(digest) != hash_algorithm.digest_size:
                raise SigningError(f"{algorithm} needs a {hash_algorithm.digest_size}-byte digest, got {len(digest)}")
            r, s = utils.decode_dss_signature(private_key.sign(digest, ec.ECDSA(utils.Prehashed(hash_algorithm))))
            size = (private_key.key_size + 7) // 8
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if algorithm[:2] not in ("RS", "PS") or algorithm[2:] not in _HASHES:
            raise SigningError(f"{algorithm} does not fit an RSA key; use RS256/384/512 or PS256/384/512")
        hash_algorithm = _HASHES[algorithm[2:]]()
        if len(digest) != hash_algorithm.digest_size:
            raise SigningError(f"{algorithm} needs a {hash_algorithm.digest_size}-byte digest, got {len(digest)}")
        return private_key.sign(digest, _padding_for(algorithm), utils.Prehashed(hash_algorithm))

    return sign
