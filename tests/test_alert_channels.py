"""Alert delivery channels against real local servers: a webhook receiver that checks Standard Webhooks
signatures by its own reading of the spec, a Twilio-shaped SMS endpoint, and the aiosmtpd sink."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiosmtpd.controller import Controller
from multidict import CIMultiDict

from services.alerting.channels.mail import (
    read_unsubscribe_token,
    render_alert_email,
    send_alert_email,
    unsubscribe_token,
)
from services.alerting.channels.outcome import Outcome
from services.alerting.channels.sms import GSM_CHARACTERS, SmsSender, sms_text
from services.alerting.channels.webhook import PublicAddressResolver, WebhookSender
from services.alerting.email.service import EmailSender
from shared.settings import ConfigurationError
from tests.conftest import free_port, make_settings
from tests.standard_webhooks import signature_valid

EVENT: dict[str, Any] = {
    "id": "0b7c6a52-1d7e-4c1e-9a40-3f1f0c2b9d11",
    "type": "alert.triggered",
    "alert_id": "5f0d8f3e-7a1b-4e5c-8d2a-6b9c0e1f2a3b",
    "user_id": "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d",
    "symbol": "BTC",
    "vs": "USD",
    "condition": "above",
    "threshold": "50000",
    "value": "50012.5",
    "price": "50012.5",
    "created_at": "2024-05-01T12:00:03Z",
}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


# -- local servers -------------------------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: CIMultiDict[str]
    body: bytes
    form: dict[str, str] = field(default_factory=dict)


@dataclass
class Receiver:
    base: str
    port: int
    secret: str
    hits: list[Hit] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]


@contextlib.asynccontextmanager
async def run_app(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    state = Receiver(base=f"http://127.0.0.1:{port}", port=port, secret=new_secret())

    async def record(request: web.Request) -> bytes:
        body = await request.read()
        state.hits.append(Hit(request.path, CIMultiDict(request.headers), body))
        return body

    async def hook(request: web.Request) -> web.Response:
        body = await record(request)
        valid = signature_valid(state.secret, request.headers, body, now=time.time())
        return web.Response(status=204 if valid else 401)

    async def status(code: int, request: web.Request, headers: dict[str, str] | None = None) -> web.Response:
        await record(request)
        return web.Response(status=code, headers=headers, text="{}")

    async def redirect(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=302, headers={"Location": f"{state.base}/target"})

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await state.release.wait()
        return web.Response(status=204)

    async def target(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/gone", lambda request: status(410, request))
    app.router.add_post("/busy", lambda request: status(429, request, {"Retry-After": "7"}))
    app.router.add_post("/busy-no-hint", lambda request: status(429, request))
    app.router.add_post("/down", lambda request: status(503, request))
    app.router.add_post("/redirect", redirect)
    app.router.add_post("/slow", slow)
    app.router.add_route("*", "/target", target)
    async with run_app(app, port):
        try:
            yield state
        finally:
            state.release.set()


@contextlib.asynccontextmanager
async def webhook_sender(**kwargs: Any) -> AsyncIterator[WebhookSender]:
    sender = WebhookSender(**kwargs)
    await sender.start()
    try:
        yield sender
    finally:
        await sender.close()


def event_body(event: dict[str, Any] | None = None) -> bytes:
    event = event or EVENT
    data = {key: value for key, value in event.items() if key not in ("id", "type", "created_at")}
    envelope = {"type": "alert.triggered", "id": event["id"], "created_at": event["created_at"], "data": data}
    return json.dumps(envelope, separators=(",", ":")).encode()


# -- webhooks: signing ---------------------------------------------------------------------------------------


async def test_webhook_signature_verifies_independently_and_breaks_on_tampering(receiver: Receiver) -> None:
    body = event_body()
    async with webhook_sender(allow_private=True) as sender:
        outcome = await sender.send(f"{receiver.base}/hook", receiver.secret, "msg_" + EVENT["id"], body)
    assert outcome == Outcome("delivered"), outcome
    [hit] = receiver.hits
    assert hit.body == body
    assert hit.headers["webhook-id"] == "msg_" + EVENT["id"]
    assert hit.headers["webhook-timestamp"].isdigit()
    assert hit.headers["webhook-signature"].startswith("v1,")
    assert hit.headers["Content-Type"] == "application/json"
    assert "Coinlytics" in hit.headers["User-Agent"]

    sent_at = int(hit.headers["webhook-timestamp"])
    assert signature_valid(receiver.secret, hit.headers, hit.body, now=sent_at)
    altered = hit.body.replace(b"50012.5", b"50012.6")
    assert altered != hit.body
    assert not signature_valid(receiver.secret, hit.headers, altered, now=sent_at)
    assert not signature_valid(new_secret(), hit.headers, hit.body, now=sent_at)
    # The tolerance edge: 300 s old still passes, 301 s does not.
    assert signature_valid(receiver.secret, hit.headers, hit.body, now=sent_at + 300)
    assert not signature_valid(receiver.secret, hit.headers, hit.body, now=sent_at + 301)


async def test_webhook_timestamp_301_seconds_old_is_rejected_by_the_receiver(receiver: Receiver) -> None:
    old = datetime.now(UTC) - timedelta(seconds=301)
    async with webhook_sender(allow_private=True) as sender:
        outcome = await sender.send(f"{receiver.base}/hook", receiver.secret, "msg_old", event_body(), timestamp=old)
    # The receiver's verification refused it (401), which is not a delivery.
    assert outcome.status == "retry" and outcome.detail == "HTTP 401", outcome
    [hit] = receiver.hits
    assert int(hit.headers["webhook-timestamp"]) == int(old.timestamp())
    # Only the age is wrong: the same request verifies at the moment it claims to have been sent.
    assert signature_valid(receiver.secret, hit.headers, hit.body, now=old.timestamp())


async def test_webhook_with_an_unusable_secret_or_url_fails_without_a_request(receiver: Receiver) -> None:
    async with webhook_sender(allow_private=True) as sender:
        no_secret = await sender.send(f"{receiver.base}/hook", "whsec_", "msg_1", event_body())
        not_base64 = await sender.send(f"{receiver.base}/hook", "whsec_%%%", "msg_2", event_body())
        not_http = await sender.send(f"ftp://127.0.0.1:{receiver.port}/hook", receiver.secret, "msg_3", event_body())
        bad_id = await sender.send(f"{receiver.base}/hook", receiver.secret, "msg 4\r\n", event_body())
        not_an_address = await sender.send(f"http://1.2.3.4.5:{receiver.port}/hook", receiver.secret, "m", b"{}")
    assert [o.status for o in (no_secret, not_base64, not_http, bad_id, not_an_address)] == ["failed"] * 5
    assert no_secret.detail == not_base64.detail == "invalid webhook secret"
    assert receiver.hits == []


# -- webhooks: answers ---------------------------------------------------------------------------------------


async def test_webhook_answers_map_to_outcomes(receiver: Receiver) -> None:
    async with webhook_sender(allow_private=True) as sender:

        async def post(path: str) -> Outcome:
            return await sender.send(f"{receiver.base}{path}", receiver.secret, f"msg{path}", event_body())

        gone, busy, busy_no_hint, down = [await post(p) for p in ("/gone", "/busy", "/busy-no-hint", "/down")]
    assert gone == Outcome("gone", "HTTP 410")
    assert busy == Outcome("retry", "HTTP 429", 7.0)
    assert busy_no_hint == Outcome("retry", "HTTP 429", None)
    assert down.status == "retry" and down.detail == "HTTP 503", down
    assert receiver.paths() == ["/gone", "/busy", "/busy-no-hint", "/down"]


async def test_webhook_redirect_is_not_followed(receiver: Receiver) -> None:
    async with webhook_sender(allow_private=True) as sender:
        outcome = await sender.send(f"{receiver.base}/redirect", receiver.secret, "msg_r", event_body())
    assert outcome.status == "retry", outcome
    assert outcome.detail is not None and "redirect not followed" in outcome.detail
    # The redirect's target would have recorded the request had it been followed.
    assert receiver.paths() == ["/redirect"]


async def test_webhook_slower_than_the_timeout_is_a_retry(receiver: Receiver) -> None:
    async with webhook_sender(allow_private=True, timeout=0.5) as sender:
        outcome = await sender.send(f"{receiver.base}/slow", receiver.secret, "msg_slow", event_body())
    assert outcome.status == "retry", outcome
    assert outcome.detail is not None and "0.5s" in outcome.detail
    assert receiver.paths() == ["/slow"]


async def test_webhook_to_a_closed_port_is_a_retry() -> None:
    async with webhook_sender(allow_private=True) as sender:
        outcome = await sender.send(f"http://127.0.0.1:{free_port()}/hook", new_secret(), "msg_closed", b"{}")
    assert outcome == Outcome("retry", "connection refused")


# -- webhooks: SSRF ------------------------------------------------------------------------------------------

LOOPBACK_FORMS = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://0x7f000001:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[::1]:{port}/hook",
]


@pytest.mark.parametrize("form", LOOPBACK_FORMS)
async def test_webhook_to_loopback_is_refused_unless_private_targets_are_allowed(receiver: Receiver, form: str) -> None:
    url = form.format(port=receiver.port)
    async with webhook_sender(allow_private=False) as sender:
        outcome = await sender.send(url, receiver.secret, "msg_ssrf", event_body())
    assert outcome.status == "failed", outcome
    assert outcome.detail is not None and "loopback" in outcome.detail, outcome
    assert receiver.hits == []


@pytest.mark.parametrize("form", ["http://127.0.0.1:{port}/hook", "http://localhost:{port}/hook"])
async def test_webhook_to_loopback_is_delivered_when_private_targets_are_allowed(receiver: Receiver, form: str) -> None:
    async with webhook_sender(allow_private=True) as sender:
        outcome = await sender.send(form.format(port=receiver.port), receiver.secret, "msg_ok", event_body())
    assert outcome == Outcome("delivered"), outcome
    assert receiver.paths() == ["/hook"]


def _ipv4_mapped_reaches_ipv4() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            return probe.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False


@pytest.mark.skipif(not _ipv4_mapped_reaches_ipv4(), reason="this host's IPv6 sockets do not reach IPv4")
async def test_webhook_to_ipv4_mapped_loopback_reaches_the_receiver_when_allowed(receiver: Receiver) -> None:
    # Proves the refusal above is the guard's doing: the same address is reachable.
    url = f"http://[::ffff:127.0.0.1]:{receiver.port}/hook"
    async with webhook_sender(allow_private=True) as sender:
        outcome = await sender.send(url, receiver.secret, "msg_mapped", event_body())
    assert outcome == Outcome("delivered"), outcome
    assert receiver.paths() == ["/hook"]


class StagedDns(AbstractResolver):
    """DNS as an attacker would run it: the name answers with whatever address ``answers`` holds now."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        addresses = self.answers.get(host.rstrip("."))
        if not addresses:
            raise OSError(f"{host} not found")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


async def test_webhook_name_rebound_to_loopback_is_refused_at_connect_time(receiver: Receiver) -> None:
    # At creation the name might have been public; at delivery it answers 127.0.0.1.
    dns = StagedDns({"hooks.example.test": ["127.0.0.1"]})
    url = f"http://hooks.example.test:{receiver.port}/hook"
    async with webhook_sender(allow_private=False, resolver=dns) as sender:
        refused = await sender.send(url, receiver.secret, "msg_rebind", event_body())
    assert refused == Outcome("failed", "hooks.example.test: address 127.0.0.1 is loopback"), refused
    assert dns.asked, "the refusal must come from the lookup made for the connection"
    assert receiver.hits == []

    async with webhook_sender(allow_private=True, resolver=dns) as sender:
        allowed = await sender.send(url, receiver.secret, "msg_rebind", event_body())
    assert allowed == Outcome("delivered"), allowed
    [hit] = receiver.hits
    assert hit.headers["Host"] == f"hooks.example.test:{receiver.port}"


async def test_public_address_resolver_keeps_only_public_answers() -> None:
    dns = StagedDns(
        {
            "mixed.example.test": ["10.0.0.7", "93.184.215.14", "::1", "2606:4700::1111"],
            "inside.example.test": ["169.254.169.254", "100.64.0.1", "fd00::1"],
        }
    )
    resolver = PublicAddressResolver(dns)
    kept = await resolver.resolve("mixed.example.test", 443, socket.AF_UNSPEC)
    assert [result["host"] for result in kept] == ["93.184.215.14", "2606:4700::1111"]
    with pytest.raises(OSError, match=r"169\.254\.169\.254 is link-local"):
        await resolver.resolve("inside.example.test", 443, socket.AF_UNSPEC)


# -- SMS -----------------------------------------------------------------------------------------------------

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "t0k/en+" + secrets.token_hex(8)
SMS_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"


@dataclass
class TwilioLike:
    port: int
    hits: list[Hit] = field(default_factory=list)

    def url(self, token: str = AUTH_TOKEN) -> str:
        return f"http://{ACCOUNT_SID}:{quote(token, safe='')}@127.0.0.1:{self.port}{SMS_PATH}"


def twilio_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    payload = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}"}
    return web.json_response({**payload, "status": status}, status=status, headers=headers)


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioLike]:
    state = TwilioLike(port=free_port())
    expected_auth = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()

    async def messages(request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        state.hits.append(Hit(request.path, CIMultiDict(request.headers), b"", form))
        if request.headers.get("Authorization") != expected_auth:
            return twilio_error(401, 20003, "Authenticate")
        to = form.get("To", "")
        if to == "+15550000400":
            return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to == "+15550000429":
            return twilio_error(429, 20429, "Too Many Requests", {"Retry-After": "3"})
        if to == "+15550000503":
            return web.Response(status=503)
        if to == "+15550000666":
            # A provider that echoes what it was given, secrets included.
            return twilio_error(400, 21601, f"bad request from {request.headers['Authorization']} ({AUTH_TOKEN})")
        return web.json_response(
            {"sid": "SM" + secrets.token_hex(16), "status": "queued", "to": to, "from": form.get("From")}, status=201
        )

    app = web.Application()
    app.router.add_post(SMS_PATH, messages)
    async with run_app(app, state.port):
        yield state


@contextlib.asynccontextmanager
async def sms_sender(url: str | None, sender: str = "Coinlytics") -> AsyncIterator[SmsSender]:
    client = SmsSender(url, sender)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def test_sms_delivered_with_basic_auth_and_twilio_form_fields(twilio: TwilioLike) -> None:
    text = sms_text(EVENT)
    async with sms_sender(twilio.url(), "+15557654321") as sender:
        assert sender.configured
        outcome = await sender.send("+15550000001", text, idempotency_key="evt-1:sms:0")
    assert outcome == Outcome("delivered"), outcome
    [hit] = twilio.hits
    assert hit.path == SMS_PATH
    assert hit.form == {"To": "+15550000001", "From": "+15557654321", "Body": text}
    assert hit.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert hit.headers["I-Twilio-Idempotency-Token"] == "evt-1:sms:0"
    login, _, password = base64.b64decode(hit.headers["Authorization"].removeprefix("Basic ")).decode().partition(":")
    assert (login, password) == (ACCOUNT_SID, AUTH_TOKEN)


async def test_sms_answers_map_to_outcomes_without_leaking_credentials(twilio: TwilioLike) -> None:
    async with sms_sender(twilio.url()) as sender:
        invalid = await sender.send("+15550000400", "hi", idempotency_key="k1")
        limited = await sender.send("+15550000429", "hi", idempotency_key="k2")
        down = await sender.send("+15550000503", "hi", idempotency_key="k3")
        echoed = await sender.send("+15550000666", "hi", idempotency_key="k4")
    async with sms_sender(twilio.url(token="wrong-token")) as sender:
        unauthorized = await sender.send("+15550000001", "hi", idempotency_key="k5")
    async with sms_sender(f"http://{ACCOUNT_SID}:{quote(AUTH_TOKEN, safe='')}@127.0.0.1:{free_port()}/x") as sender:
        unreachable = await sender.send("+15550000001", "hi", idempotency_key="k6")

    assert invalid.status == "failed", invalid
    assert invalid.detail == "HTTP 400: The 'To' number +15550000400 is not a valid phone number. (code 21211)"
    assert limited == Outcome("retry", "HTTP 429: Too Many Requests (code 20429)", 3.0)
    assert down == Outcome("retry", "HTTP 503")
    assert echoed.status == "failed" and echoed.detail is not None and "***" in echoed.detail, echoed
    assert unauthorized == Outcome("failed", "HTTP 401: Authenticate (code 20003)")
    assert unreachable == Outcome("retry", "connection refused")
    basic = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    for outcome in (invalid, limited, down, echoed, unauthorized, unreachable):
        for secret in (AUTH_TOKEN, quote(AUTH_TOKEN, safe=""), ACCOUNT_SID, basic):
            assert secret not in (outcome.detail or ""), outcome


async def test_sms_unconfigured_and_malformed_urls() -> None:
    async with sms_sender(None) as sender:
        assert not sender.configured
        outcome = await sender.send("+15550000001", "hi", idempotency_key="k")
    assert outcome.status == "failed" and outcome.detail is not None and "COINLYTICS_SMS_URL" in outcome.detail
    for url in (
        f"ftp://{ACCOUNT_SID}:{AUTH_TOKEN}@127.0.0.1/x",
        f"https://{ACCOUNT_SID}:{AUTH_TOKEN}@127.0.0.1:99999/x",
        f"https://{ACCOUNT_SID}:{AUTH_TOKEN}@/x",
        f"https://{ACCOUNT_SID}@127.0.0.1/x",
        "not a url",
    ):
        with pytest.raises(ConfigurationError) as raised:
            SmsSender(url, "Coinlytics")
        assert AUTH_TOKEN not in str(raised.value)


@pytest.mark.parametrize(
    ("condition", "threshold", "value"),
    [("above", "50000", "50012.5"), ("pct_change_down", "5", "-6.4321"), ("spread_above", "1", "1.25")],
)
def test_sms_text_fits_one_gsm_segment(condition: str, threshold: str, value: str) -> None:
    text = sms_text({**EVENT, "condition": condition, "threshold": threshold, "value": value})
    assert len(text) <= 160
    assert set(text) <= GSM_CHARACTERS
    assert "BTC/USD" in text and "50012.5 USD" in text
    long_symbol = sms_text({**EVENT, "symbol": "Ω€" * 100})
    assert len(long_symbol) <= 160 and set(long_symbol) <= GSM_CHARACTERS


# -- email ---------------------------------------------------------------------------------------------------

# As long as a real one: the URL carries a signed token, far beyond a 78-character header line.
UNSUBSCRIBE_URL = (
    "http://127.0.0.1:8000/api/v1/alerts/unsubscribe?token=u1.5f0d8f3e7a1b4e5c8d2a6b9c0e1f2a3b.0."
    + "c" * 64
    + "&channel=email"
)
ALERT_URL = "http://127.0.0.1:8000/alerts/5f0d8f3e-7a1b-4e5c-8d2a-6b9c0e1f2a3b"


def parts(message: EmailMessage) -> tuple[str, str]:
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    assert text_part is not None and html_part is not None
    return str(text_part.get_content()), str(html_part.get_content())


async def test_alert_email_has_text_html_and_one_click_unsubscribe(smtp: Any) -> None:
    sender = EmailSender(smtp.url, "Coinlytics <alerts@localhost>")
    subject, text, html = render_alert_email(EVENT, unsubscribe_url=UNSUBSCRIBE_URL, alert_url=ALERT_URL)
    outcome = await send_alert_email(
        sender, "trader@example.com", subject, text, html, unsubscribe_url=UNSUBSCRIBE_URL, message_id=EVENT["id"]
    )
    assert outcome == Outcome("delivered"), outcome
    message = await smtp.wait_for("trader@example.com", "BTC/USD")
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "Coinlytics alert: BTC/USD rose above 50000 USD"
    assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE_URL}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # As it was on the wire: one line with the bare URL (mail clients don't decode RFC 2047 words in it).
    raw = dict(message.raw_items())
    assert raw["List-Unsubscribe"].strip() == f"<{UNSUBSCRIBE_URL}>", raw["List-Unsubscribe"]
    plain, rich = parts(message)
    for fact in ("BTC/USD", "above 50000 USD", "50012.5 USD", "2024-05-01 12:00:03 UTC", UNSUBSCRIBE_URL, ALERT_URL):
        assert fact in plain, fact
    assert f'href="{UNSUBSCRIBE_URL.replace("&", "&amp;")}"' in rich
    assert "above 50000 USD" in rich and "2024-05-01 12:00:03 UTC" in rich


async def test_alert_email_html_escapes_hostile_values(smtp: Any) -> None:
    hostile = {**EVENT, "symbol": "<script>alert(1)</script>", "price": '"><img src=x onerror=alert(1)>'}
    subject, text, html = render_alert_email(hostile, unsubscribe_url=UNSUBSCRIBE_URL, alert_url=ALERT_URL)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<img" not in html and "&lt;img" in html
    sender = EmailSender(smtp.url, "Coinlytics <alerts@localhost>")
    outcome = await send_alert_email(
        sender, "victim@example.com", subject, text, html, unsubscribe_url=UNSUBSCRIBE_URL, message_id="evt-h"
    )
    assert outcome == Outcome("delivered"), outcome
    _, rich = parts(await smtp.wait_for("victim@example.com", "Coinlytics alert"))
    assert "<script>" not in rich and "&lt;script&gt;" in rich


async def test_plain_email_still_sends_single_part_text(smtp: Any) -> None:
    sender = EmailSender(smtp.url, "Coinlytics <no-reply@localhost>")
    await sender.send("someone@example.com", "Welcome", "Hello there", message_id="welcome-1")
    message = await smtp.wait_for("someone@example.com", "Welcome")
    assert message.get_content_type() == "text/plain"
    assert message.get_content().strip() == "Hello there"
    with pytest.raises(ValueError, match="Subject"):
        await sender.send("someone@example.com", "x", "y", headers={"Subject": "other"})


class RefusingSmtp:
    """An SMTP server that refuses some recipients: permanently (550) or for now (451)."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user"
        if address.startswith("later@"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


@pytest.fixture
def refusing_smtp() -> Iterator[str]:
    port = free_port()
    controller = Controller(RefusingSmtp(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


async def test_alert_email_smtp_errors_map_to_outcomes(refusing_smtp: str) -> None:
    subject, text, html = render_alert_email(EVENT, unsubscribe_url=UNSUBSCRIBE_URL, alert_url=ALERT_URL)

    async def attempt(sender: EmailSender, to: str) -> Outcome:
        return await send_alert_email(
            sender, to, subject, text, html, unsubscribe_url=UNSUBSCRIBE_URL, message_id="evt-smtp"
        )

    refusing = EmailSender(refusing_smtp, "Coinlytics <alerts@localhost>", timeout=5)
    refused = await attempt(refusing, "nobody@example.com")
    deferred = await attempt(refusing, "later@example.com")
    accepted = await attempt(refusing, "fine@example.com")
    unreachable = await attempt(EmailSender(f"smtp://127.0.0.1:{free_port()}", "a@localhost", timeout=5), "x@y.z")
    unconfigured = await attempt(EmailSender(None, "a@localhost"), "x@y.z")
    injected = await attempt(refusing, "fine@example.com\r\nBcc: all@example.com")
    assert refused.status == "failed" and refused.detail == "SMTP 550: 5.1.1 No such user", refused
    assert deferred.status == "retry" and deferred.detail == "SMTP 451: 4.3.0 Try again later", deferred
    assert accepted == Outcome("delivered")
    assert unreachable.status == "retry", unreachable
    assert unconfigured.status == "failed", unconfigured
    assert injected.status == "failed", injected


# -- unsubscribe tokens --------------------------------------------------------------------------------------


@pytest.fixture
def token_settings() -> Any:
    return make_settings("postgresql://unused@127.0.0.1/unused", "redis://127.0.0.1:1/0", "tokens")


def test_unsubscribe_token_round_trip(token_settings: Any) -> None:
    key = token_settings.purpose_key("alert-unsubscribe")
    alert_id = uuid.uuid4()
    token = unsubscribe_token(key, alert_id, 2)
    assert quote(token, safe="") == token
    assert read_unsubscribe_token(key, token) == (alert_id, 2)
    assert read_unsubscribe_token(key, unsubscribe_token(key, alert_id, 0)) == (alert_id, 0)


def test_unsubscribe_token_refuses_tampered_foreign_and_garbage(token_settings: Any) -> None:
    key = token_settings.purpose_key("alert-unsubscribe")
    alert_id = uuid.uuid4()
    token = unsubscribe_token(key, alert_id, 1)
    prefix, alert_hex, index, signature = token.split(".")
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    other_alert = uuid.uuid4().hex
    tampered = [
        f"{prefix}.{alert_hex}.{index}.{flipped}",
        f"{prefix}.{other_alert}.{index}.{signature}",
        f"{prefix}.{alert_hex}.2.{signature}",
        f"{prefix}.{alert_hex}.01.{signature}",
        f"{prefix}.{alert_hex.upper()}.{index}.{signature}",
        token + "0",
        token[:-1],
    ]
    for candidate in tampered:
        assert read_unsubscribe_token(key, candidate) is None, candidate
    foreign = unsubscribe_token(token_settings.purpose_key("cache"), alert_id, 1)
    assert read_unsubscribe_token(key, foreign) is None
    other_master = make_settings("postgresql://unused@127.0.0.1/unused", "redis://127.0.0.1:1/0", "other")
    assert (
        read_unsubscribe_token(key, unsubscribe_token(other_master.purpose_key("alert-unsubscribe"), alert_id, 1))
        is None
    )
    garbage: list[Any] = ["", "u1", "u1...", "....", "x" * 10_000, "é" * 40, "\x00", None, 12, b"u1.bytes"]
    for candidate in garbage:
        assert read_unsubscribe_token(key, candidate) is None, candidate
