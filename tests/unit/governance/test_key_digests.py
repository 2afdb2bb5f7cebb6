"""The key ring's keyed digests: pseudonyms (logs, ledger, audit entries), token
digests (API keys, sessions) and blind indexes (e-mail lookups) are HMAC-SHA256
under their HKDF-derived keys, as an independent verifier holding the root key
recomputes them."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from governance.keys import KeyRing, normalize_email


def _expected(root: bytes, purpose: str, message: str) -> bytes:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"storyvault/{purpose}".encode()
    ).derive(root)
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def test_pseudonyms_and_token_digests_are_hmacs_under_their_derived_keys() -> None:
    ring = KeyRing.generate()
    ids = ["3ae2114a-6f49-4965-90bf-bcfd681ee390", "00000000-0000-4000-8000-000000000000"]
    # Each asked twice and interleaved: the keyed context is copied, never consumed.
    for _ in range(2):
        for cid in ids:
            want = "sp_" + _expected(ring.root, "pseudonym/v1", cid).hex()[:32]
            assert ring.pseudonym(cid) == want
            assert ring.token_digest(cid) == _expected(ring.root, "token/v1", cid).hex()
    # Blind indexes of e-mail addresses: over the normalised address.
    assert ring.blind_index(" Ann@Example.org ") == (
        _expected(ring.root, "blind-index/v1", normalize_email(" Ann@Example.org ")).hex()
    )
    assert ring.pseudonym(ids[0]) != ring.pseudonym(ids[1])
    # Another ring (another root key) gives other pseudonyms for the same customer.
    assert KeyRing.generate().pseudonym(ids[0]) != ring.pseudonym(ids[0])
    # The same ring loaded afresh (a restart, another worker) gives the same digests.
    again = KeyRing.from_json(ring.to_json())
    assert again.pseudonym(ids[0]) == ring.pseudonym(ids[0])
    assert again.token_digest(ids[1]) == ring.token_digest(ids[1])
