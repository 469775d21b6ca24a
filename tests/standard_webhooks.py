"""An independent check of Standard Webhooks signatures, written from the specification (not with the
`standardwebhooks` package the platform signs with), so a signing mistake cannot verify itself."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

TOLERANCE_SECONDS = 300


class SignatureRejected(AssertionError):
    pass


def signature_problem(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> str | None:
    """Why ``headers`` do not carry a valid signature of ``body`` under ``secret``, or None when they do.
    Header names are case-insensitive, as in HTTP."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as missing:
        return f"missing header {missing}"
    if not timestamp.isdigit():
        return "webhook-timestamp is not an integer"
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > TOLERANCE_SECONDS:
        return "webhook-timestamp outside the tolerance"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    # The header holds space-separated "<version>,<signature>" pairs; any v1 match is enough.
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(expected, value.encode()):
            return None
    return "no v1 signature matches"


def signature_valid(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> bool:
    return signature_problem(secret, headers, body, now=now) is None


def verify_standard_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> dict[str, Any]:
    """The parsed body of a validly signed delivery; raises ``SignatureRejected`` otherwise."""
    problem = signature_problem(secret, headers, body, now=now)
    if problem is not None:
        raise SignatureRejected(problem)
    parsed: dict[str, Any] = json.loads(body)
    return parsed
