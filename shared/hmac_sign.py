"""HMAC helpers: signing cached values and webhook bodies, constant-time verification."""

from __future__ import annotations

import base64
import hashlib
import hmac


def derive_key(master: bytes, purpose: str) -> bytes:
    """A separate key per purpose from one configured secret (HMAC as a KDF, the label as its message)."""
    return hmac.new(master, b"coinlytics/v1/" + purpose.encode(), hashlib.sha256).digest()


def sign(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(key: bytes, payload: bytes, signature: bytes | str) -> bool:
    """Constant-time check of a signature from outside (a header anyone can send, a stored value): compared
    as bytes, since compare_digest raises on a non-ASCII str; anything undecodable is simply a mismatch."""
    try:
        given = signature if isinstance(signature, bytes) else signature.encode("utf-8", "surrogatepass")
    except UnicodeError:
        return False
    return hmac.compare_digest(sign(key, payload).encode(), given)


def sign_b64(key: bytes, payload: bytes) -> str:
    return base64.b64encode(hmac.new(key, payload, hashlib.sha256).digest()).decode()
