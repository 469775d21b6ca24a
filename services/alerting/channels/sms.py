"""SMS delivery through Twilio's Messages resource, or anything that speaks its shape.

``COINLYTICS_SMS_URL`` is the resource with the credentials in it
(``https://<sid>:<token>@api.twilio.com/2010-04-01/Accounts/<sid>/Messages.json``). The credentials are
taken out of the URL at start and sent as HTTP basic auth, so no URL we log or report carries them."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from services.alerting.channels import describe
from services.alerting.channels.outcome import DELIVERED, Outcome
from shared.http import parse_retry_after
from shared.settings import ConfigurationError

USER_AGENT = "Coinlytics-SMS/1.0 (+self-hosted market data)"
MAX_RESPONSE_BYTES = 16 * 1024
SMS_CHARS = 160
URL_HELP = (
    "COINLYTICS_SMS_URL: use https://<account sid>:<auth token>@<host>/2010-04-01/Accounts/<account sid>/Messages.json"
)
# GSM 03.38's basic character set: anything else switches the whole message to UCS-2 (70 characters a part).
GSM_CHARACTERS = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
    "abcdefghijklmnopqrstuvwxyzäöñüà"
)


def parse_sms_url(url: str) -> tuple[str, aiohttp.BasicAuth | None]:
    """The endpoint without credentials, and the credentials. Errors never repeat the URL: it holds a secret."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigurationError(URL_HELP) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ConfigurationError(URL_HELP)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{port}" if port is not None else host
    endpoint = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    if parts.username is None and parts.password is None:
        return endpoint, None
    login, password = unquote(parts.username or ""), unquote(parts.password or "")
    if not login or not password or ":" in login:
        raise ConfigurationError(URL_HELP + " (both the account sid and the auth token are needed)")
    try:
        return endpoint, aiohttp.BasicAuth(login, password)
    except ValueError:
        raise ConfigurationError(URL_HELP) from None


def gsm_safe(text: str) -> str:
    return "".join(char if char in GSM_CHARACTERS else "?" for char in text)


def sms_text(event: dict[str, Any]) -> str:
    """One GSM-7 segment (160 characters) saying what crossed what: the headline, the price, the time."""
    facts = describe(event)
    text = f"Coinlytics: {facts.headline}. Price {facts.price} at {facts.at}"
    if len(text) > SMS_CHARS:
        text = f"Coinlytics: {facts.headline}. Price {facts.price}"
    text = gsm_safe(text.replace("\r", " ").replace("\n", " "))
    return text if len(text) <= SMS_CHARS else text[: SMS_CHARS - 3] + "..."


def _provider_message(body: bytes) -> str | None:
    """Twilio's error object: ``{"code": 21211, "message": "The 'To' number ... is not valid", ...}``."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
        return None
    code = payload.get("code")
    suffix = f" (code {code})" if isinstance(code, int) and not isinstance(code, bool) else ""
    message: str = payload["message"]
    return message + suffix


async def _read_some(response: aiohttp.ClientResponse) -> bytes:
    """Up to MAX_RESPONSE_BYTES of the answer. The status already decided the outcome: a body that breaks
    off or stalls only costs the error message."""
    chunks: list[bytes] = []
    left = MAX_RESPONSE_BYTES
    try:
        while left > 0:
            chunk = await response.content.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    return b"".join(chunks)


class SmsSender:
    def __init__(self, url: str | None, sender: str, *, timeout: float = 10.0) -> None:
        self._endpoint: str | None = None
        self._auth: aiohttp.BasicAuth | None = None
        if url:
            self._endpoint, self._auth = parse_sms_url(url)
        self.sender = sender
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def configured(self) -> bool:
        return self._endpoint is not None

    async def start(self) -> None:
        if self._session is not None and not self._session.closed:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    def _scrub(self, text: str) -> str:
        """A provider may echo what it was sent; the auth token must not reach the delivery history."""
        if self._auth is not None:
            # The header's own form first: it contains the others once decoded, not as text.
            for secret in (self._auth.encode().removeprefix("Basic "), self._auth.password, quote(self._auth.password)):
                text = text.replace(secret, "***")
            # The account sid is public-ish, but no reason to show it; a very short one would only garble text.
            if len(self._auth.login) >= 4:
                text = text.replace(self._auth.login, "***")
        return text

    async def send(self, to: str, text: str, *, idempotency_key: str) -> Outcome:
        if self._endpoint is None:
            return Outcome("failed", "SMS channel unconfigured: set COINLYTICS_SMS_URL")
        await self.start()
        assert self._session is not None
        form = {"To": to, "From": self.sender, "Body": text}
        headers = {"I-Twilio-Idempotency-Token": idempotency_key}
        try:
            async with self._session.post(
                self._endpoint, data=form, headers=headers, auth=self._auth, allow_redirects=False
            ) as response:
                status, retry_after = response.status, response.headers.get("Retry-After")
                body = await _read_some(response)
        except TimeoutError:
            return Outcome("retry", f"no answer within {self.timeout:g}s")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return Outcome("retry", "connection refused")
            return Outcome("retry", self._scrub(f"connection failed: {exc.os_error.strerror or type(exc).__name__}"))
        except ValueError:
            # A header or form value aiohttp will not send (a newline in the idempotency key).
            return Outcome("failed", "invalid SMS request")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome("retry", f"request failed: {type(exc).__name__}")
        if 200 <= status < 300:
            return DELIVERED
        message = _provider_message(body)
        detail = self._scrub(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        if status == 429 or status >= 500:
            return Outcome("retry", detail, parse_retry_after(retry_after))
        if 300 <= status < 400:
            return Outcome("retry", f"HTTP {status}: redirect not followed")
        return Outcome("failed", detail)
