"""Signed tree heads verify independently over the documented encoding."""

from __future__ import annotations

import struct

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from audit import (
    SignedTreeHead,
    TransparencyLog,
    sign_tree_head,
    tree_head_signing_input,
    verify_tree_head,
)


def _independent_encoding(head: SignedTreeHead) -> bytes:
    # RFC 9162 TreeHeadDataV2: uint64 timestamp, uint64 tree_size,
    # opaque root_hash<32..255> (1-byte length), Extension extensions<0..2^16-1>.
    return struct.pack(">QQB32sH", head.timestamp_ms, head.tree_size, 32, head.root_hash, 0)


def test_signing_input_is_the_documented_51_bytes() -> None:
    root = bytes(range(32))
    encoded = tree_head_signing_input(7, root, 1_700_000_000_123)
    assert len(encoded) == 51
    assert (
        encoded
        == (1_700_000_000_123).to_bytes(8, "big")
        + (7).to_bytes(8, "big")
        + b"\x20"
        + root
        + b"\0\0"
    )


def test_signing_input_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        tree_head_signing_input(1, b"short", 0)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        tree_head_signing_input(-1, bytes(32), 0)


def test_sign_and_verify_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    head = sign_tree_head(key, "k", 3, bytes(32), 5)
    assert verify_tree_head(head, key.public_key())
    assert not verify_tree_head(head, Ed25519PrivateKey.generate().public_key())
    forged = SignedTreeHead(4, head.root_hash, head.timestamp_ms, head.signature, "k")
    assert not verify_tree_head(forged, key.public_key())


async def test_stored_tree_heads_verify_with_the_raw_public_key(
    audit_log: TransparencyLog, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    for batch in ([kit.make_entry(0)], [kit.make_entry(i) for i in range(1, 6)]):
        await audit_log.append(batch)
    head = await audit_log.latest_tree_head()
    assert head is not None
    assert head.tree_size == 6
    assert head.key_id == kit.key_id
    assert head.root_hash == await audit_log.root_at(6)
    # An independent verifier holds only the 32 raw public-key bytes (as in a JWK "x").
    raw = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    public_key = Ed25519PublicKey.from_public_bytes(raw)
    for size in (1, 6):
        stored = await audit_log.get_tree_head(size)
        public_key.verify(stored.signature, _independent_encoding(stored))
        tampered = bytearray(_independent_encoding(stored))
        tampered[-3] ^= 1
        with pytest.raises(InvalidSignature):
            public_key.verify(stored.signature, bytes(tampered))
