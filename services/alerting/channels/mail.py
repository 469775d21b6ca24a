"""Alert emails: text and HTML bodies from templates, one-click unsubscribe (RFC 8058), and the signed token
in the unsubscribe link, which works without logging in and for nothing but that one alert's channel."""

from __future__ import annotations

import functools
import re
import uuid
from pathlib import Path
from typing import Any

import aiosmtplib
import jinja2

from services.alerting.channels import clean, describe
from services.alerting.channels.outcome import DELIVERED, Outcome
from services.alerting.email.service import EmailSender, EmailUnconfigured
from shared import hmac_sign

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
TOKEN_VERSION = "u1"  # noqa: S105 (a format tag, not a secret)
# Bound into every signature on top of the purpose key: a token is only ever an unsubscribe token.
TOKEN_PURPOSE = b"coinlytics/alert-unsubscribe:"
TOKEN_PATTERN = re.compile(r"u1\.([0-9a-f]{32})\.(0|[1-9][0-9]{0,3})\.([0-9a-f]{64})")
MAX_CHANNEL_INDEX = 9999


@functools.cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_alert_email(event: dict[str, Any], *, unsubscribe_url: str, alert_url: str) -> tuple[str, str, str]:
    """(subject, text, html) for one alert event."""
    facts = describe(event)
    subject = clean(f"Coinlytics alert: {facts.headline}", 200)
    context = {"facts": facts, "subject": subject, "unsubscribe_url": unsubscribe_url, "alert_url": alert_url}
    environment = _templates()
    text = environment.get_template("alert_email.txt").render(context)
    html = environment.get_template("alert_email.html").render(context)
    return subject, text, html


def render_unsubscribe_page(*, title: str, message: str, action: str | None = None) -> str:
    """The page behind an email's unsubscribe link: with ``action``, a confirmation whose button POSTs there
    (a mail scanner that opens every link must not unsubscribe anyone); without it, the outcome."""
    template = _templates().get_template("unsubscribe.html")
    return template.render(title=title, message=message, confirm=action is not None, action=action or "")


def unsubscribe_headers(unsubscribe_url: str) -> dict[str, str]:
    # RFC 8058: mail clients POST "List-Unsubscribe=One-Click" to the URL, with no page in between.
    return {"List-Unsubscribe": f"<{unsubscribe_url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def _smtp_outcome(code: int, message: str) -> Outcome:
    # SMTP's own rule (RFC 5321): 4yz is a transient refusal, 5yz a permanent one.
    detail = clean(f"SMTP {code}: {message}", 200)
    return Outcome("failed" if 500 <= code < 600 else "retry", detail)


async def send_alert_email(
    sender: EmailSender, to: str, subject: str, text: str, html: str, *, unsubscribe_url: str, message_id: str
) -> Outcome:
    """One attempt. Connection trouble, timeouts and 4xx replies are retried; 5xx replies (a refused
    recipient, a rejected message) are permanent. Trouble logging in to the relay is the operator's to fix,
    so it is retried too rather than failing every alert email at once."""
    try:
        await sender.send(
            to, subject, text, html=html, headers=unsubscribe_headers(unsubscribe_url), message_id=message_id
        )
    except EmailUnconfigured:
        return Outcome("failed", "email channel unconfigured: set COINLYTICS_SMTP_URL")
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients[0] if exc.recipients else None
        if refused is None:
            return Outcome("retry", "recipient refused")
        return _smtp_outcome(refused.code, refused.message)
    except (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPConnectResponseError) as exc:
        return Outcome("retry", clean(f"SMTP {exc.code}: {exc.message}", 200))
    except aiosmtplib.SMTPResponseException as exc:
        return _smtp_outcome(exc.code, exc.message)
    except (aiosmtplib.SMTPTimeoutError, TimeoutError):
        return Outcome("retry", "SMTP server timed out")
    except aiosmtplib.SMTPConnectError:
        return Outcome("retry", "could not connect to the SMTP server")
    except aiosmtplib.SMTPServerDisconnected:
        return Outcome("retry", "SMTP server disconnected")
    except aiosmtplib.SMTPException as exc:
        # STARTTLS or an extension the relay lacks: configuration, fixable without losing the email.
        return Outcome("retry", clean(f"SMTP: {exc}", 200))
    except OSError as exc:
        return Outcome("retry", clean(f"SMTP connection failed: {exc.strerror or type(exc).__name__}", 200))
    except ValueError as exc:
        # An address or header the email library refuses to write (a newline in it): never sendable.
        return Outcome("failed", clean(f"invalid email: {exc}", 200))
    return DELIVERED


def _token_payload(alert_id: uuid.UUID, channel_index: int) -> str:
    return f"{TOKEN_VERSION}.{alert_id.hex}.{channel_index}"


def unsubscribe_token(key: bytes, alert_id: uuid.UUID, channel_index: int) -> str:
    """``u1.<alert id hex>.<channel index>.<HMAC-SHA256 hex>``: URL-safe as is. ``key`` is the
    ``alert-unsubscribe`` purpose key, so no other signed value of ours can pass for one."""
    if not 0 <= channel_index <= MAX_CHANNEL_INDEX:
        raise ValueError(f"channel index must be within 0..{MAX_CHANNEL_INDEX}")
    payload = _token_payload(alert_id, channel_index)
    return f"{payload}.{hmac_sign.sign(key, TOKEN_PURPOSE + payload.encode())}"


def recipient_key(key: bytes, address: str) -> bytes:
    """The key a link for one address is signed with: a link made for alice@ no longer works once the
    channel at that position sends to bob@."""
    return hmac_sign.derive_key(key, "unsubscribe-to:" + address.strip().lower())


def token_target(token: str) -> tuple[uuid.UUID, int] | None:
    """The (alert id, channel index) a token claims, NOT verified: only to find the key to verify it with."""
    if not isinstance(token, str) or len(token) > 128:
        return None
    match = TOKEN_PATTERN.fullmatch(token)
    if match is None:
        return None
    return uuid.UUID(hex=match.group(1)), int(match.group(2))


def read_unsubscribe_token(key: bytes, token: str) -> tuple[uuid.UUID, int] | None:
    """The (alert id, channel index) a token was made for; None for anything tampered, malformed or
    signed with another key. Never raises."""
    if not isinstance(token, str) or len(token) > 128:
        return None
    match = TOKEN_PATTERN.fullmatch(token)
    if match is None:
        return None
    alert_hex, index, signature = match.groups()
    alert_id, channel_index = uuid.UUID(hex=alert_hex), int(index)
    if not hmac_sign.verify(key, TOKEN_PURPOSE + _token_payload(alert_id, channel_index).encode(), signature):
        return None
    return alert_id, channel_index
