"""Sending email through SMTP (aiosmtplib) to COINLYTICS_SMTP_URL."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from email import policy as email_policy
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.policy import Policy
from email.utils import formatdate, make_msgid
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from shared.settings import ConfigurationError

# Headers send() writes itself; a caller's copy would make a second, conflicting one.
RESERVED_HEADERS = frozenset(
    {"from", "to", "subject", "date", "message-id", "content-type", "content-transfer-encoding", "mime-version"}
)
# RFC 5322's hard limit for a line, folding whitespace or not.
MAX_HEADER_LINE = 998
# Headers holding one long URL that mail clients read as written.
UNFOLDED_HEADERS = ("list-unsubscribe", "list-unsubscribe-post")


class UnfoldedHeader(UnstructuredHeader, BaseHeader):
    """A header written on one line however long (within RFC 5322's 998). The email package folds a long
    word it can't break by RFC 2047-encoding it, and a List-Unsubscribe URL in encoded words is no URL."""

    def fold(self, *, policy: Policy) -> str:
        line = f"{self.name}: {self}"
        if line.isascii() and len(line) <= MAX_HEADER_LINE:
            return line + str(policy.linesep)
        return super().fold(policy=policy)


@functools.cache
def message_policy() -> Policy:
    registry = HeaderRegistry()
    for name in UNFOLDED_HEADERS:
        registry.map_to_type(name, UnfoldedHeader)
    return email_policy.default.clone(header_factory=registry)


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

    async def send(
        self,
        to: str,
        subject: str,
        text: str,
        *,
        message_id: str | None = None,
        html: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send one message: ``text`` alone, or with ``html`` as its alternative (multipart/alternative).
        ``headers`` adds headers such as List-Unsubscribe; one this method sets itself is a ValueError."""
        if self.target is None:
            raise EmailUnconfigured("email channel unconfigured: set COINLYTICS_SMTP_URL")
        message = EmailMessage(policy=message_policy())
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = make_msgid(idstring=message_id, domain="coinlytics") if message_id else make_msgid()
        for name, value in (headers or {}).items():
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name} is set by the sender itself")
            message[name] = value
        message.set_content(text)
        if html is not None:
            message.add_alternative(html, subtype="html")
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
