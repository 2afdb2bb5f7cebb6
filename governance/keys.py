"""The key ring and the envelope encryption of story values.

Layout (planned for erasure and rotation from day one):

* **Key-encryption keys (KEKs)**, versioned, live only in the key ring (a file
  with owner-only permissions in the data directory, or ``STORYVAULT_KEYRING``
  in production). They never touch the database.
* **Data keys (DEKs)**, one per customer and *scope*: ``main`` for the story,
  ``hold:<category>`` for each category under legal hold, so erasure can
  destroy ``main`` while a held scope survives until its hold ends. A DEK is
  stored wrapped by the current KEK (AES-256-GCM) with associated data naming
  the customer, scope, DEK id and KEK version: a wrapped key copied to another
  row does not unwrap. Rotation re-wraps DEKs only; no value is re-encrypted.
* **Values** are sealed with AES-256-GCM under their DEK, a fresh 96-bit nonce,
  and associated data binding customer, record, field/category and DEK id, so a
  ciphertext moved to another row, field or customer fails to decrypt.
* A root secret from which HKDF derives the blind-index key (e-mail lookups),
  the pseudonym key (audit subjects, ``hash`` masks) and the token pepper;
  deriving them separately means one leaking never reveals another.
* Ed25519 signing keys for tree heads, consent receipts and certificates.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "SEALED_FORMAT",
    "KeyRing",
    "KeyRingError",
    "SigningKey",
    "normalize_email",
    "open_value",
    "seal_value",
    "value_aad",
]

SEALED_FORMAT = 1
_NONCE = 12


class KeyRingError(Exception):
    """The key ring is missing, malformed, or does not fit the stored data."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise KeyRingError(f"key ring: {what} is not valid base64") from None


def normalize_email(email: str) -> str:
    """The form the blind index is computed over: trimmed, NFKC, case-folded."""
    return unicodedata.normalize("NFKC", email).strip().casefold()


def value_aad(customer_id: str, record_id: str, field_name: str, dek_id: str) -> bytes:
    # Binding all four means a ciphertext is only ever valid in the row, field
    # and customer it was written for, under the key it names.
    return f"sv:v1|{customer_id}|{record_id}|{field_name}|{dek_id}".encode()


def seal_value(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return bytes([SEALED_FORMAT]) + nonce + aead.encrypt(nonce, plaintext, aad)


def open_value(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 1 + _NONCE + 16 or blob[0] != SEALED_FORMAT:
        raise KeyRingError("stored value has an unknown format")
    try:
        return aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], aad)
    except InvalidTag:
        raise KeyRingError(
            "stored value does not decrypt: it was moved, altered, or its key is wrong"
        ) from None


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    created_at: str
    active: bool

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()


@dataclass
class KeyRing:
    """Versioned KEKs, the root secret and signing keys; see the module docstring."""

    root: bytes
    keks: dict[int, bytes]
    current_kek: int
    signing: list[SigningKey]
    retired_keks: set[int] = field(default_factory=set)
    path: Path | None = None
    # Caches of what the keys above determine: not part of a ring's value.
    _derived: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    _keyed: dict[str, crypto_hmac.HMAC] = field(default_factory=dict, repr=False, compare=False)

    # --- construction -------------------------------------------------
    @classmethod
    def generate(cls) -> KeyRing:
        seed = secrets.token_bytes(32)
        private = Ed25519PrivateKey.from_private_bytes(seed)
        return cls(
            root=secrets.token_bytes(32),
            keks={1: secrets.token_bytes(32)},
            current_kek=1,
            signing=[_signing_key(private, _now(), active=True)],
        )

    @classmethod
    def from_json(cls, text: str, *, path: Path | None = None) -> KeyRing:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise KeyRingError("key ring is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != 1:
            raise KeyRingError("key ring has an unknown format")
        try:
            keks = {int(v): _unb64(k, f"KEK {v}") for v, k in data["keks"].items()}
            current = int(data["current_kek"])
            root = _unb64(data["root"], "root")
            signing = [
                _signing_key(
                    Ed25519PrivateKey.from_private_bytes(_unb64(s["seed"], "signing seed")),
                    s["created_at"],
                    active=bool(s["active"]),
                )
                for s in data["signing"]
            ]
            retired = {int(v) for v in data.get("retired_keks", [])}
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyRingError(f"key ring is missing or has a malformed entry: {exc}") from None
        if current not in keks or any(len(k) != 32 for k in keks.values()) or len(root) != 32:
            raise KeyRingError("key ring: KEKs and root must be 32 bytes; current KEK must exist")
        if not any(s.active for s in signing):
            raise KeyRingError("key ring has no active signing key")
        return cls(root, keks, current, signing, retired, path)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "root": _b64(self.root),
                "keks": {str(v): _b64(k) for v, k in sorted(self.keks.items())},
                "current_kek": self.current_kek,
                "retired_keks": sorted(self.retired_keks),
                "signing": [
                    {
                        "kid": s.kid,
                        "seed": _b64(_seed(s.private)),
                        "created_at": s.created_at,
                        "active": s.active,
                    }
                    for s in self.signing
                ],
            },
            indent=2,
        )

    @classmethod
    def load_or_create(cls, data_dir: Path, env_json: str | None) -> tuple[KeyRing, bool]:
        """The ring from the environment, else from ``data_dir/keyring.json``, else a new one."""
        if env_json is not None:
            return cls.from_json(env_json), False
        path = data_dir / "keyring.json"
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise KeyRingError(f"{path} must be readable by its owner only (chmod 600)")
            return cls.from_json(path.read_text(), path=path), False
        ring = cls.generate()
        ring.path = path
        ring.save()
        return ring, True

    def save(self) -> None:
        if self.path is None:
            raise KeyRingError("this key ring came from the environment; store it there")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    # --- derived keys -------------------------------------------------
    def derived(self, purpose: str) -> bytes:
        key = self._derived.get(purpose)
        if key is None:
            key = HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=None,
                info=f"storyvault/{purpose}".encode(),
            ).derive(self.root)
            self._derived[purpose] = key
        return key

    def blind_index(self, email: str) -> str:
        """Keyed HMAC over the normalized address: lookups without plaintext at rest."""
        return self._hmac("blind-index/v1", normalize_email(email).encode()).hex()

    def _hmac(self, purpose: str, message: bytes) -> bytes:
        """HMAC-SHA256 under the derived key of ``purpose``, from a context keyed once
        and copied per call: 0.5 µs here against 1.8 µs for OpenSSL's one-shot HMAC,
        which sets the key up again each time (twice per gated read)."""
        keyed = self._keyed.get(purpose)
        if keyed is None:
            keyed = self._keyed[purpose] = crypto_hmac.HMAC(self.derived(purpose), hashes.SHA256())
        h = keyed.copy()
        h.update(message)
        return h.finalize()

    def pseudonym(self, customer_id: str) -> str:
        """The subject id used in logs, the ledger and audit entries."""
        return "sp_" + self._hmac("pseudonym/v1", customer_id.encode()).hex()[:32]

    def token_digest(self, secret: str) -> str:
        """Digest of a high-entropy secret (API key, session token, one-time code)."""
        return self._hmac("token/v1", secret.encode()).hex()

    # --- KEKs ---------------------------------------------------------
    def kek(self, version: int) -> AESGCM:
        key = self.keks.get(version)
        if key is None:
            raise KeyRingError(
                f"KEK version {version} is not in this key ring (wrong or outdated key ring)"
            )
        return AESGCM(key)

    def wrap(self, dek: bytes, aad: bytes) -> tuple[int, bytes]:
        return self.current_kek, seal_value(self.kek(self.current_kek), dek, aad)

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return open_value(self.kek(version), wrapped, aad)
        except KeyRingError:
            raise KeyRingError(
                f"a data key does not unwrap with KEK version {version}: the key ring does "
                "not belong to this database, or the wrapped key was altered"
            ) from None

    def add_kek(self) -> int:
        version = max(self.keks) + 1
        self.keks[version] = secrets.token_bytes(32)
        self.current_kek = version
        return version

    def retire_kek(self, version: int) -> None:
        if version == self.current_kek:
            raise KeyRingError("the current KEK cannot be retired")
        self.keks.pop(version, None)
        self.retired_keks.add(version)

    # --- signing ------------------------------------------------------
    @property
    def signing_key(self) -> SigningKey:
        return next(s for s in self.signing if s.active)

    def public_jwks(self) -> list[tuple[str, Ed25519PublicKey]]:
        return [(s.kid, s.public) for s in self.signing]


def _seed(private: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _signing_key(private: Ed25519PrivateKey, created_at: str, *, active: bool) -> SigningKey:
    from cryptography.hazmat.primitives import serialization

    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return SigningKey(
        kid="ed25519-" + hashlib.sha256(raw).hexdigest()[:16],
        private=private,
        created_at=created_at,
        active=active,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def describe(ring: KeyRing) -> dict[str, Any]:
    """Non-secret facts about the ring for readiness and integrity reports."""
    return {
        "current_kek": ring.current_kek,
        "kek_versions": sorted(ring.keks),
        "retired_keks": sorted(ring.retired_keks),
        "signing_kids": [s.kid for s in ring.signing],
    }
