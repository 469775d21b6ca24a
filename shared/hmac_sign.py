"""HMAC helpers: signing cached values and webhook bodies, constant-time verification."""

from __future__ import annotations

import base64
import hashlib
import hmac


def sign(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(key: bytes, payload: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(key, payload), signature)


def sign_b64(key: bytes, payload: bytes) -> str:
    return base64.b64encode(hmac.new(key, payload, hashlib.sha256).digest()).decode()


def pack_signed(key: bytes, payload: bytes) -> bytes:
    """``<hex signature>.<payload>``: what the Redis cache stores."""
    return sign(key, payload).encode() + b"." + payload


def unpack_signed(key: bytes, blob: bytes) -> bytes | None:
    """The payload if its signature holds, else None (the caller discards and rebuilds)."""
    signature, sep, payload = blob.partition(b".")
    if not sep:
        return None
    try:
        ok = verify(key, payload, signature.decode("ascii"))
    except UnicodeDecodeError:
        return None
    return payload if ok else None
