"""Signed tree heads (RFC 9162 §4.10) with Ed25519.

The signature covers the RFC 9162 ``TreeHeadDataV2`` structure in TLS presentation
encoding (big-endian), with no extensions::

    uint64  timestamp       milliseconds since 1970-01-01T00:00:00Z  (8 bytes)
    uint64  tree_size                                                  (8 bytes)
    uint8   len(root_hash)  always 32                                  (1 byte)
    opaque  root_hash[32]   MTH of the first tree_size leaves          (32 bytes)
    uint16  len(extensions) always 0                                   (2 bytes)

i.e. 51 bytes: ``ts.to_bytes(8) + size.to_bytes(8) + b"\\x20" + root + b"\\x00\\x00"``.
An independent verifier rebuilds these bytes and checks the raw 64-byte Ed25519
signature (RFC 8032) with the public key named by ``key_id`` (published in the
service's JWKS). The message starts with eight bytes of a 64-bit timestamp whose top
byte is 0x00, so it can never be mistaken for a JWS signing input (ASCII); still, a
dedicated tree-head key is recommended.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit._merkle import HASH_SIZE

_UINT64_MAX = (1 << 64) - 1


def tree_head_signing_input(tree_size: int, root_hash: bytes, timestamp_ms: int) -> bytes:
    """The exact bytes a tree-head signature covers (TreeHeadDataV2, see module doc)."""
    if not (0 <= tree_size <= _UINT64_MAX and 0 <= timestamp_ms <= _UINT64_MAX):
        raise ValueError("tree size and timestamp are unsigned 64-bit integers")
    if len(root_hash) != HASH_SIZE:
        raise ValueError("a root hash is 32 bytes")
    return (
        timestamp_ms.to_bytes(8, "big")
        + tree_size.to_bytes(8, "big")
        + bytes([HASH_SIZE])
        + root_hash
        + b"\x00\x00"
    )


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A tree size, its root hash, when it was signed, and by which key."""

    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    signature: bytes
    key_id: str

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    def signing_input(self) -> bytes:
        return tree_head_signing_input(self.tree_size, self.root_hash, self.timestamp_ms)


def sign_tree_head(
    key: Ed25519PrivateKey, key_id: str, tree_size: int, root_hash: bytes, timestamp_ms: int
) -> SignedTreeHead:
    signature = key.sign(tree_head_signing_input(tree_size, root_hash, timestamp_ms))
    return SignedTreeHead(tree_size, root_hash, timestamp_ms, signature, key_id)


def verify_tree_head(head: SignedTreeHead, public_key: Ed25519PublicKey) -> bool:
    """Does ``head.signature`` verify over the head's signing input with ``public_key``?"""
    try:
        public_key.verify(head.signature, head.signing_input())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
