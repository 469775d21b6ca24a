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


def verify(key: bytes, payload: bytes, signature: str) -> bool:
    # As bytes: compare_digest raises on a non-ASCII str, and a signature comes from a header anyone can send.
    return hmac.compare_digest(sign(key, payload).encode(), signature.encode("utf-8", "surrogatepass"))


def verify_text(key: bytes, payload: bytes, signature: bytes | str) -> bool:
    """``verify`` for a signature from outside (a header, a stored value): anything that is not a plain
    ASCII hex string fails instead of raising."""
    try:
        text = signature.decode("ascii") if isinstance(signature, bytes) else signature
        return hmac.compare_digest(sign(key, payload).encode("ascii"), text.encode("ascii"))
    except (UnicodeError, ValueError):
        return False


def sign_b64(key: bytes, payload: bytes) -> str:
    return base64.b64encode(hmac.new(key, payload, hashlib.sha256).digest()).decode()
