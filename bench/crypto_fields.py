"""Per-field sealing cost: AES-256-GCM encrypt and decrypt with the vault's associated data.

.venv/bin/python -m bench.crypto_fields
"""

from __future__ import annotations

import secrets
import timeit

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import write_result
from governance.keys import open_value, seal_value, value_aad


def main() -> None:
    aead = AESGCM(secrets.token_bytes(32))
    aad = value_aad(
        "6f1c7e0e-8a53-4a8e-9d62-3f1b7a9e0c11",
        "email",
        "email",
        "2b0c1b3e-1111-4a8e-9d62-3f1b7a9e0c11",
    )
    results = {}
    for label, size in (("field_40B", 40), ("chapter_1KiB", 1024)):
        plain = secrets.token_bytes(size)
        sealed = seal_value(aead, plain, aad)
        n = 200_000
        enc = min(timeit.repeat(lambda p=plain: seal_value(aead, p, aad), number=n, repeat=5)) / n
        dec = min(timeit.repeat(lambda s=sealed: open_value(aead, s, aad), number=n, repeat=5)) / n
        results[label] = {"encrypt_us": round(enc * 1e6, 3), "decrypt_us": round(dec * 1e6, 3)}
        print(label, results[label])
    print("written to", write_result("crypto_fields", results))


if __name__ == "__main__":
    main()
