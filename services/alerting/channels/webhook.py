"""Webhook delivery, signed by the Standard Webhooks scheme (https://www.standardwebhooks.com).

One POST per call, at most ``timeout`` seconds in all, redirects not followed. Unless private targets are
allowed, the address actually connected to must be public: IP literals are judged before the request, and
names are judged by a resolver that drops non-public answers, so a name that resolves to something public
when the alert is saved and to 127.0.0.1 at delivery (DNS rebinding) is still refused."""

from __future__ import annotations

import binascii
import ipaddress
import math
import socket
from datetime import UTC, datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook
from yarl import URL

from services.alerting.channels.outcome import DELIVERED, Outcome
from services.alerting.ssrf import address_problem, literal_address
from shared.http import parse_retry_after

USER_AGENT = "Coinlytics-Webhooks/1.0 (+self-hosted market data)"
# Receivers answer with a status; a body is only drained so the connection can be reused.
MAX_RESPONSE_BYTES = 16 * 1024
MAX_MESSAGE_ID_CHARS = 256


class NonPublicAddress(OSError):
    """A webhook target resolved only to addresses we may not connect to. An OSError because that is what
    aiohttp expects from a resolver; it arrives wrapped in a ClientConnectorError."""


class PublicAddressResolver(AbstractResolver):
    """aiohttp's resolver with every non-public answer dropped; no public answer at all is an error."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        kept: list[ResolveResult] = []
        refused: list[str] = []
        for result in await self._inner.resolve(host, port, family):
            try:
                problem = address_problem(ipaddress.ip_address(result["host"]))
            except ValueError:
                problem = f"address {result['host']!r} is not an IP address"
            if problem is None:
                kept.append(result)
            else:
                refused.append(problem)
        if not kept:
            reason = refused[0] if refused else "no address"
            raise NonPublicAddress(f"{host.rstrip('.')}: {reason}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _looks_numeric(host: str) -> bool:
    # What HTTP clients treat as an address rather than a name (digits and dots, or anything with a colon).
    return ":" in host or host.replace(".", "").isdigit()


def url_problem(url: URL) -> str | None:
    """Why ``url`` is not something to POST to at all."""
    if url.scheme not in ("http", "https") or not url.host:
        return "invalid URL: use http:// or https:// with a host"
    host = url.host.rstrip(".")
    if literal_address(host) is None and _looks_numeric(host):
        # Neither a name nor an address we can judge, while the connecting side might still read it as one.
        return f"invalid URL: {host} is not a valid address"
    return None


def literal_problem(url: URL) -> str | None:
    """Why an IP-literal host may not be connected to. Checked before the request: aiohttp connects to
    literals without asking the resolver, so the resolver's filter never sees them."""
    address = literal_address((url.host or "").rstrip("."))
    return None if address is None else address_problem(address)


def _refusal(exc: BaseException) -> NonPublicAddress | None:
    """The resolver's refusal inside whatever aiohttp wrapped it in."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NonPublicAddress):
            return current
        if isinstance(current, aiohttp.ClientConnectorError) and isinstance(current.os_error, NonPublicAddress):
            return current.os_error
        current = current.__cause__ or current.__context__
    return None


def _connection_detail(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup failed for {exc.host}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS error: {exc.os_error}"
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"


def _valid_message_id(message_id: str) -> bool:
    return 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS and all(33 <= ord(char) < 127 for char in message_id)


def response_outcome(status: int, retry_after_header: str | None) -> Outcome:
    if 200 <= status < 300:
        return DELIVERED
    if status == 410:
        return Outcome("gone", "HTTP 410")
    if 300 <= status < 400:
        return Outcome("retry", f"HTTP {status}: redirect not followed")
    if status == 429 or status >= 500:
        return Outcome("retry", f"HTTP {status}", parse_retry_after(retry_after_header))
    # Standard Webhooks: any other answer is a failed attempt worth retrying (a receiver mid-deploy says 404).
    return Outcome("retry", f"HTTP {status}")


class WebhookSender:
    def __init__(self, *, allow_private: bool, timeout: float = 10.0, resolver: AbstractResolver | None = None) -> None:
        """``resolver`` replaces aiohttp's own for name lookups (tests use it to stage DNS rebinding); the
        public-address filter applies on top of it."""
        self.allow_private = allow_private
        self.timeout = timeout
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None and not self._session.closed:
            return
        resolver: AbstractResolver | None = self._resolver
        if not self.allow_private:
            resolver = PublicAddressResolver(resolver)
        connector = aiohttp.TCPConnector(resolver=resolver) if resolver is not None else aiohttp.TCPConnector()
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": USER_AGENT},
            # One receiver's cookies must never travel to another.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    async def send(
        self, url: str, secret: str, message_id: str, body: bytes, *, timestamp: datetime | None = None
    ) -> Outcome:
        """POST ``body`` (the JSON event) to ``url``, signed with ``secret`` (``whsec_<base64>``)."""
        try:
            target = URL(url)
        except (ValueError, TypeError):
            return Outcome("failed", "invalid URL")
        problem = url_problem(target) or (None if self.allow_private else literal_problem(target))
        if problem is not None:
            return Outcome("failed", problem)
        if not _valid_message_id(message_id):
            return Outcome("failed", "invalid message id")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return Outcome("failed", "body is not UTF-8")
        moment = timestamp or datetime.now(UTC)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        try:
            # The package formats the timestamp itself (whole seconds); the header must carry the same number.
            signature = Webhook(secret).sign(message_id, moment, text)
        except (EmptyWebhookSecretError, binascii.Error, ValueError, TypeError):
            return Outcome("failed", "invalid webhook secret")
        headers = {
            "webhook-id": message_id,
            "webhook-timestamp": str(math.floor(moment.timestamp())),
            "webhook-signature": signature,
            "content-type": "application/json",
        }
        await self.start()
        assert self._session is not None
        try:
            async with self._session.post(target, data=body, headers=headers, allow_redirects=False) as response:
                outcome = response_outcome(response.status, response.headers.get("Retry-After"))
                await _drain(response)
                return outcome
        except aiohttp.InvalidURL:
            return Outcome("failed", "invalid URL")
        except TimeoutError:
            return Outcome("retry", f"no answer within {self.timeout:g}s")
        except aiohttp.ClientConnectorError as exc:
            refusal = _refusal(exc)
            if refusal is not None:
                return Outcome("failed", str(refusal))
            return Outcome("retry", _connection_detail(exc))
        except aiohttp.ServerDisconnectedError:
            return Outcome("retry", "server disconnected")
        except (aiohttp.ClientError, OSError) as exc:
            refusal = _refusal(exc)
            if refusal is not None:
                return Outcome("failed", str(refusal))
            return Outcome("retry", f"request failed: {type(exc).__name__}")


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what is left of a small answer (so the connection is reused); the verdict is already made,
    so a slow or broken body changes nothing."""
    left = MAX_RESPONSE_BYTES
    try:
        while left > 0:
            chunk = await response.content.read(left)
            if not chunk:
                return
            left -= len(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return
