"""Key types the service knows, local key generation and the rules for acceptable keys."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import InvalidInput

# RFC 8017 / NIST SP 800-131A: 2048 bits is the smallest RSA modulus still acceptable.
MIN_RSA_BITS = 2048
RSA_PUBLIC_EXPONENT = 65537

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyType(str, enum.Enum):
    """A key algorithm and size, spelled as in settings, messages and CLI flags."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @property
    def is_ec(self) -> bool:
        return self.value.startswith("ec-")

    @property
    def curve(self) -> ec.EllipticCurve:
        if self is KeyType.EC_P256:
            return ec.SECP256R1()
        if self is KeyType.EC_P384:
            return ec.SECP384R1()
        raise ValueError(f"{self.value} is not an EC key type")

    @property
    def rsa_bits(self) -> int:
        if self.is_ec:
            raise ValueError(f"{self.value} is not an RSA key type")
        return int(self.value.split("-")[1])

    @classmethod
    def parse(cls, value: str, *, field: str = "keyType", allowed: tuple[KeyType, ...] | None = None) -> KeyType:
        allowed = allowed or tuple(cls)
        names = ", ".join(k.value for k in allowed)
        try:
            key_type = cls(str(value).strip().lower())
        except ValueError:
            raise InvalidInput(field, f"{value!r} is not a key type; use one of {names}") from None
        if key_type not in allowed:
            raise InvalidInput(field, f"{key_type.value} is not allowed here; use one of {names}")
        return key_type

    @classmethod
    def of(cls, public_key: PublicKey) -> KeyType:
        """The key type of a public key; ``InvalidInput`` for a key the service does not use."""
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            for key_type in (cls.EC_P256, cls.EC_P384):
                if public_key.curve.name == key_type.curve.name:
                    return key_type
            raise InvalidInput("key", f"EC curve {public_key.curve.name} is not allowed; use P-256 or P-384")
        if isinstance(public_key, rsa.RSAPublicKey):
            for key_type in (cls.RSA_2048, cls.RSA_3072, cls.RSA_4096):
                if public_key.key_size == key_type.rsa_bits:
                    return key_type
            raise InvalidInput(
                "key", f"RSA-{public_key.key_size} is not allowed; use 2048, 3072 or 4096 bits"
            )
        raise InvalidInput("key", f"{type(public_key).__name__} keys are not allowed; use EC or RSA")


CA_ROOT_KEY_TYPES = (KeyType.EC_P384, KeyType.EC_P256, KeyType.RSA_3072, KeyType.RSA_4096)
DEVICE_KEY_TYPES = tuple(KeyType)


def generate_key(key_type: KeyType) -> PrivateKey:
    """A fresh software key (device keys; CA keys live in a key store)."""
    if key_type.is_ec:
        return ec.generate_private_key(key_type.curve)
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=key_type.rsa_bits)


def describe(public_key: PublicKey) -> str:
    """Human name of a key, e.g. ``EC P-256`` or ``RSA-2048``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384", "secp521r1": "EC P-521"}.get(
            public_key.curve.name, f"EC {public_key.curve.name}"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    return type(public_key).__name__
