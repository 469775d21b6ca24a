"""Sending email through SMTP (aiosmtplib) to COINLYTICS_SMTP_URL."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from shared.settings import ConfigurationError


class EmailUnconfigured(Exception):
    """No COINLYTICS_SMTP_URL: the channel reports itself unconfigured instead of failing."""


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    use_tls: bool
    start_tls: bool | None
    username: str | None
    password: str | None


def parse_smtp_url(url: str) -> SmtpTarget:
    """``smtp://[user:pass@]host[:port][?starttls=true]`` or ``smtps://...`` (implicit TLS, port 465)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigurationError("COINLYTICS_SMTP_URL: use smtp://host:port or smtps://host:port")
    query = parse_qs(parts.query)
    starttls = query.get("starttls", [""])[0].lower()
    return SmtpTarget(
        host=parts.hostname,
        port=parts.port or (465 if parts.scheme == "smtps" else 25),
        use_tls=parts.scheme == "smtps",
        # None lets aiosmtplib upgrade when the server offers STARTTLS.
        start_tls=True if starttls in ("1", "true", "yes") else (False if starttls in ("0", "false", "no") else None),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class EmailSender:
    def __init__(self, smtp_url: str | None, sender: str, *, timeout: float = 15.0) -> None:
        self.target = parse_smtp_url(smtp_url) if smtp_url else None
        self.sender = sender
        self.timeout = timeout

    @property
    def configured(self) -> bool:
        return self.target is not None

    async def send(self, to: str, subject: str, text: str, *, message_id: str | None = None) -> None:
        if self.target is None:
            raise EmailUnconfigured("email channel unconfigured: set COINLYTICS_SMTP_URL")
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = make_msgid(idstring=message_id, domain="coinlytics") if message_id else make_msgid()
        message.set_content(text)
        await aiosmtplib.send(
            message,
            hostname=self.target.host,
            port=self.target.port,
            use_tls=self.target.use_tls,
            start_tls=self.target.start_tls,
            username=self.target.username,
            password=self.target.password,
            timeout=self.timeout,
        )
