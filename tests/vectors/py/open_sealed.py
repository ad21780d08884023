#!/usr/bin/env python3
"""Opens a lease's sealed scratch key, written from docs/workloads.md
("The renter's copy of the key") alone.

Usage:
    python3 open_sealed.py PRIVATE_KEY_FILE LEASE_ID SEALED_BASE64

PRIVATE_KEY_FILE holds the renter's X25519 private key in base64 (`wg genkey`).
Prints the volume's password. Only the `cryptography` package is used.
"""

import base64
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

INFO = b"warden/v1 sealed scratch key"


def open_sealed(private: bytes, lease_id: str, sealed: bytes) -> bytes:
    if len(sealed) < 48:
        raise ValueError("too short")
    e_pub, ct = sealed[:32], sealed[32:]
    key = X25519PrivateKey.from_private_bytes(private)
    r_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = key.exchange(X25519PublicKey.from_public_bytes(e_pub))
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=e_pub + r_pub, info=INFO).derive(shared)
    return ChaCha20Poly1305(k).decrypt(b"\0" * 12, ct, lease_id.encode())


def main() -> None:
    path, lease_id, sealed = sys.argv[1:4]
    with open(path) as f:
        private = base64.b64decode(f.read().strip())
    print(open_sealed(private, lease_id, base64.b64decode(sealed)).decode())


if __name__ == "__main__":
    main()
